"""Question families of the Shapes world, in the InstructBLIP manner.

Each family owns its natural-language templates and a generator that turns a scene into a
question with its answer (and closed-set candidates where the family has them). A generator
returns None when the scene cannot support an unambiguous question of that family.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .scene import COLOURS, POSITIONS, SHAPES, SIZES, TEXTS, Scene, SceneObject

YES_NO = ("yes", "no")
COUNTS = tuple(str(n) for n in range(5))
LETTERS = "ABCD"


@dataclass(frozen=True)
class Question:
    family: str
    turns: tuple[tuple[str, str], ...]  # (question, answer) pairs; one pair for single-turn families
    candidates: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    templates: tuple[str, ...]
    make: Callable[[Scene, np.random.Generator, "Family"], Question | None]
    follow_ups: tuple[tuple[str, ...], ...] = ()  # templates of later turns (dialogue)

    def pick(self, rng: np.random.Generator) -> str:
        return self.templates[rng.integers(len(self.templates))]


# --- referring expressions -------------------------------------------------------------------

def _matches(scene: Scene, **attrs) -> list[SceneObject]:
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in attrs.items())]


def refer(obj: SceneObject, scene: Scene, allow_position: bool = True, avoid: str | None = None) -> str | None:
    """Shortest description that picks out `obj` alone: 'circle', 'red circle', 'small red circle'...
    `avoid` names an attribute the description must not use (the one the question asks for)."""
    for keys in (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape")):
        if avoid in keys:
            continue
        if len(_matches(scene, **{k: getattr(obj, k) for k in keys})) == 1:
            return " ".join(getattr(obj, k) for k in keys)
    return f"{obj.shape} at the {obj.position}" if allow_position else None


def refer_by_colour(obj: SceneObject, scene: Scene) -> str:
    """Describe an object without naming its shape: 'red object', 'large red object', 'object at the top left'."""
    for keys in (("colour",), ("size", "colour")):
        if len(_matches(scene, **{k: getattr(obj, k) for k in keys})) == 1:
            return " ".join(getattr(obj, k) for k in keys) + " object"
    return f"object at the {obj.position}"


def _choice(rng: np.random.Generator, items):
    return items[rng.integers(len(items))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- generators ------------------------------------------------------------------------------

def _colour(scene, rng, fam):
    obj = _choice(rng, scene.objects)
    return Question(fam.name, ((fam.pick(rng).format(ref=refer(obj, scene, avoid="colour")), obj.colour),), COLOURS)


def _shape(scene, rng, fam):
    obj = _choice(rng, scene.objects)
    return Question(fam.name, ((fam.pick(rng).format(ref=refer_by_colour(obj, scene)), obj.shape),), SHAPES)


def _count(scene, rng, fam):
    kind = rng.integers(5)
    if kind == 0:
        shape = _choice(rng, SHAPES)
        things, n = shape + "s", len(_matches(scene, shape=shape))
    elif kind == 1:
        colour = _choice(rng, COLOURS)
        things, n = f"{colour} objects", len(_matches(scene, colour=colour))
    elif kind == 2:
        things, n = "objects", len(scene.objects)
    elif kind == 3:  # kinds that are present, so counts above zero are common
        obj = _choice(rng, scene.objects)
        things, n = obj.shape + "s", len(_matches(scene, shape=obj.shape))
    else:
        obj = _choice(rng, scene.objects)
        things, n = f"{obj.colour} objects", len(_matches(scene, colour=obj.colour))
    return Question(fam.name, ((fam.pick(rng).format(things=things), str(n)),), COUNTS)


def _position(scene, rng, fam):
    candidates = [o for o in scene.objects if refer(o, scene, allow_position=False)]
    if not candidates:
        return None
    obj = _choice(rng, candidates)
    return Question(fam.name, ((fam.pick(rng).format(ref=refer(obj, scene, False)), obj.position),), POSITIONS)


def _existence(scene, rng, fam):
    obj = _choice(rng, scene.objects)
    keys = _choice(rng, (("colour", "shape"), ("size", "colour", "shape"), ("shape",), ("colour", "shape")))
    attrs = {k: getattr(obj, k) for k in keys}
    if rng.random() < 0.5:  # a negative: change one attribute to a value the scene lacks in that combination
        key = _choice(rng, keys)
        pool = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}[key]
        options = [v for v in pool if not _matches(scene, **{**attrs, key: v})]
        if not options:
            return None
        attrs[key] = _choice(rng, options)
    thing = " ".join(attrs[k] for k in ("size", "colour", "shape") if k in attrs)
    answer = "yes" if _matches(scene, **attrs) else "no"
    return Question(fam.name, ((fam.pick(rng).format(a_thing=f"{_article(thing)} {thing}", thing=thing), answer),), YES_NO)


def _multiple_choice(scene, rng, fam):
    obj = _choice(rng, scene.objects)
    kind = rng.integers(3)
    if kind == 0:
        question, answer, pool = f"What colour is the {refer(obj, scene, avoid='colour')}?", obj.colour, COLOURS
    elif kind == 1:
        question, answer, pool = f"What shape is the {refer_by_colour(obj, scene)}?", obj.shape, SHAPES
    else:
        ref = refer(obj, scene, allow_position=False)
        if ref is None:
            return None
        question, answer, pool = f"Where is the {ref}?", obj.position, POSITIONS
    distractors = [v for v in pool if v != answer]
    options = [answer] + [distractors[i] for i in rng.permutation(len(distractors))[:3]]
    options = [options[i] for i in rng.permutation(4)]
    rendered = " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    letter = LETTERS[options.index(answer)]
    text = fam.pick(rng).format(question=question, options=rendered)
    return Question(fam.name, ((text, letter),), tuple(LETTERS))


def _reading(scene, rng, fam):
    if scene.text is None:
        return None
    return Question(fam.name, ((fam.pick(rng).format(position=scene.text.position), scene.text.value),), TEXTS)


_RELATIONS = {
    "to the left of": lambda a, b: a.col < b.col,
    "to the right of": lambda a, b: a.col > b.col,
    "above": lambda a, b: a.row < b.row,
    "below": lambda a, b: a.row > b.row,
}


def _spatial(scene, rng, fam):
    nameable = [o for o in scene.objects if refer(o, scene, allow_position=False)]
    want = "yes" if rng.random() < 0.5 else "no"
    options = [
        (a, b, rel)
        for a in nameable
        for b in nameable
        if a is not b
        for rel, holds in _RELATIONS.items()
        if ("yes" if holds(a, b) else "no") == want
    ]
    if not options:
        return None
    a, b, rel = options[rng.integers(len(options))]
    text = fam.pick(rng).format(a=refer(a, scene, False), b=refer(b, scene, False), rel=rel)
    return Question(fam.name, ((text, want),), YES_NO)


def _comparison(scene, rng, fam):
    want = "yes" if rng.random() < 0.5 else "no"
    shapes, colours = Counter(o.shape for o in scene.objects), Counter(o.colour for o in scene.objects)
    options = []
    for x in SHAPES:
        for y in SHAPES:
            if x != y and (shapes[x] or shapes[y]) and ("yes" if shapes[x] > shapes[y] else "no") == want:
                options.append((x + "s", y + "s"))
    for x in COLOURS:
        for y in COLOURS:
            if x != y and (colours[x] or colours[y]) and ("yes" if colours[x] > colours[y] else "no") == want:
                options.append((f"{x} objects", f"{y} objects"))
    if not options:
        return None
    x, y = options[rng.integers(len(options))]
    return Question(fam.name, ((fam.pick(rng).format(x=x, y=y), want),), YES_NO)


def _dialogue(scene, rng, fam):
    obj = _choice(rng, scene.objects)
    colour_turns, size_turns = fam.follow_ups
    turns = (
        (fam.pick(rng).format(position=obj.position), obj.shape),
        (_choice(rng, colour_turns), obj.colour),
        (_choice(rng, size_turns), obj.size),
    )
    return Question(fam.name, turns)


# --- the families ----------------------------------------------------------------------------

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("colour", "name the colour of an object", (
            "What colour is the {ref}?", "What is the colour of the {ref}?", "Which colour does the {ref} have?",
            "Tell me the colour of the {ref}.", "What color is the {ref}?", "Name the colour of the {ref}.",
            "The {ref} is what colour?", "Can you tell me what colour the {ref} is?",
            "Identify the colour of the {ref}.", "In what colour is the {ref} drawn?",
            "Look at the {ref}. What colour is it?",
        ), _colour),
        Family("shape", "name the shape of an object", (
            "What shape is the {ref}?", "What is the shape of the {ref}?", "Which shape is the {ref}?",
            "Tell me the shape of the {ref}.", "Name the shape of the {ref}.", "The {ref} is what shape?",
            "Can you tell me what shape the {ref} is?", "Identify the shape of the {ref}.",
            "What kind of shape is the {ref}?", "Look at the {ref}. What shape is it?",
        ), _shape),
        Family("count", "count objects of a shape or colour", (
            "How many {things} are there?", "How many {things} can you see?", "Count the {things}.",
            "What is the number of {things}?", "How many {things} are in the image?",
            "Tell me how many {things} there are.", "Count the {things} in the picture.",
            "How many {things} are shown?", "What number of {things} is present?", "How many {things} do you see?",
        ), _count),
        Family("position", "say where an object is on the 3x3 grid", (
            "Where is the {ref}?", "Where is the {ref} located?", "In which part of the image is the {ref}?",
            "What is the position of the {ref}?", "Tell me where the {ref} is.", "Where can you find the {ref}?",
            "Which cell of the grid holds the {ref}?", "Locate the {ref}.", "Where in the picture is the {ref}?",
            "Give the location of the {ref}.",
        ), _position),
        Family("existence", "answer yes or no: is there such an object", (
            "Is there {a_thing}?", "Is there {a_thing} in the image?", "Does the image contain {a_thing}?",
            "Can you see {a_thing}?", "Is {a_thing} present?", "Do you see {a_thing} in the picture?",
            "Does the picture show {a_thing}?", "Is any {thing} visible?", "Is there at least one {thing}?",
            "Can {a_thing} be found in the image?",
        ), _existence),
        Family("multiple_choice", "pick the letter of the right option", (
            "{question} Options: {options}.", "{question} Choose from: {options}.",
            "{question} Pick one of the options: {options}.", "{question} Select the correct option: {options}.",
            "Answer with the option's letter. {question} {options}",
            "{question} The options are {options}. Reply with a letter.", "Multiple choice: {question} {options}",
            "{question} Which option is right? {options}", "{question} Possible answers: {options}.",
            "Choose the right letter. {question} Options: {options}.",
        ), _multiple_choice),
        Family("reading", "read the rendered word or digit", (
            "What is written in the image?", "What does the text say?", "Read the text in the image.",
            "What word or digit is shown?", "What is the written text?", "Tell me what is written.",
            "What does the writing say?", "Read out the text.", "What is written at the {position}?",
            "Which word or digit can you read in the image?", "What text appears in the picture?",
        ), _reading),
        Family("spatial", "answer yes or no about left/right/above/below", (
            "Is the {a} {rel} the {b}?", "Is the {a} located {rel} the {b}?",
            "Would you say the {a} is {rel} the {b}?", "Is it true that the {a} is {rel} the {b}?",
            "Does the {a} appear {rel} the {b}?", "Can the {a} be found {rel} the {b}?",
            "Looking at the picture, is the {a} {rel} the {b}?", "Is the {a} placed {rel} the {b}?",
            "Is the {a} positioned {rel} the {b}?", "Check whether the {a} is {rel} the {b}. Yes or no?",
        ), _spatial),
        Family("comparison", "answer yes or no: are there more of one kind than another", (
            "Are there more {x} than {y}?", "Does the image have more {x} than {y}?",
            "Are {x} more numerous than {y}?", "Do the {x} outnumber the {y}?",
            "Is the number of {x} greater than the number of {y}?", "Can you see more {x} than {y}?",
            "Are there fewer {y} than {x}?", "Compared with the {y}, are there more {x}?",
            "Is the count of {x} larger than the count of {y}?", "Does the picture show more {x} than {y}?",
        ), _comparison),
        Family("dialogue", "three turns about one object: its shape, then its colour and size", (
            "What shape is at the {position}?", "Which shape do you see at the {position}?",
            "What is the shape at the {position}?", "Tell me which shape is at the {position}.",
            "What kind of shape sits at the {position}?", "Look at the {position}. What shape is there?",
            "Name the shape at the {position}.", "What shape can be found at the {position}?",
            "Identify the shape at the {position}.", "At the {position}, what shape is drawn?",
        ), _dialogue, follow_ups=(
            ("What colour is it?", "And its colour?", "Which colour does it have?", "What is its colour?",
             "What colour is that shape?", "Tell me its colour."),
            ("Is it large or small?", "How big is it?", "What size is it?", "Is it small or large?",
             "And its size?", "Tell me its size."),
        )),
    )
}

HELD_IN = ("colour", "shape", "count", "position", "existence", "reading", "dialogue")
HELD_OUT = ("multiple_choice", "spatial", "comparison")
assert set(HELD_IN) | set(HELD_OUT) == set(FAMILIES) and not set(HELD_IN) & set(HELD_OUT)


def canonical(fam: Family) -> Family:
    """The family with only its first phrasing (first template, first follow-ups)."""
    return dataclasses.replace(fam, templates=fam.templates[:1], follow_ups=tuple(f[:1] for f in fam.follow_ups))


def ask(family: str, scene: Scene, rng: np.random.Generator, tries: int = 4,
        phrasing: str = "varied") -> Question | None:
    """A question of `family` about `scene`, or None if the scene cannot support one.
    `phrasing="canonical"` always uses the family's first template."""
    fam = FAMILIES[family] if phrasing == "varied" else canonical(FAMILIES[family])
    for _ in range(tries):
        question = fam.make(scene, rng, fam)
        if question is not None:
            return question
    return None
