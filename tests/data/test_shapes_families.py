"""Question families checked on hand-built scenes, with answers worked out by hand."""
import re

import numpy as np

from bridgevlm.data.shapes.families import FAMILIES, ask, refer
from bridgevlm.data.shapes.scene import COLOURS, POSITIONS, SHAPES, Scene, SceneObject, SceneText, sample_scene

SEEDS = range(60)


def _scene(*objects, text=None):
    return Scene("hand", "test", tuple(SceneObject(*o) for o in objects), text)


# Two circles (one red, one green), one blue square; every object has a unique colour.
#   top left: large red circle | middle center: small blue square | bottom right: large green circle
THREE = _scene(("circle", "red", "large", 0, 0), ("square", "blue", "small", 1, 1), ("circle", "green", "large", 2, 2))
# The shortest unique descriptions: 'square' alone suffices, circles need their colour.
THREE_REFS = {"red circle": (0, 0), "square": (1, 1), "green circle": (2, 2)}
# Descriptions that avoid the shape (shape questions): each colour is unique.
THREE_COLOUR_REFS = {"red object": "circle", "blue object": "square", "green object": "circle"}


RELATIONS = ("to the left of", "to the right of", "above", "below")


def _slots(family: str, question: str) -> dict:
    """Fill-ins of the family template that produced `question` (the shortest fit among templates)."""
    slot_patterns = {"rel": "|".join(RELATIONS)}
    fits = []
    for template in FAMILIES[family].templates:
        pattern = re.escape(template)
        for name in re.findall(r"\{(\w+)\}", template):
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{slot_patterns.get(name, '.+?')})", 1)
        match = re.fullmatch(pattern, question)
        if match:
            fits.append(match.groupdict())
    assert fits, f"{question!r} matches no {family} template"
    return min(fits, key=lambda slots: sum(map(len, slots.values())))


def _asked(family, scene, seeds=SEEDS):
    questions = [ask(family, scene, np.random.default_rng(seed)) for seed in seeds]
    assert all(q is not None and q.family == family for q in questions)
    return questions


def test_count():
    # by hand: 2 circles, 1 square, 0 of the other shapes; 1 object of each of red, blue, green
    expected = {"circles": 2, "squares": 1, "triangles": 0, "diamonds": 0, "stars": 0, "objects": 3,
                "red objects": 1, "blue objects": 1, "green objects": 1, "yellow objects": 0,
                "purple objects": 0, "orange objects": 0}
    seen = set()
    for question in _asked("count", THREE):
        (q, a), = question.turns
        things = _slots("count", q)["things"]
        assert a == str(expected[things]), q
        assert a in question.candidates
        seen.add(things)
    assert {"circles", "objects"} <= seen and len(seen) >= 6


def test_count_two_circles():
    scene = _scene(("circle", "red", "small", 0, 1), ("circle", "red", "large", 2, 0))
    for question in _asked("count", scene):
        (q, a), = question.turns
        things = _slots("count", q)["things"]
        if things in ("circles", "red objects", "objects"):
            assert a == "2", q


def test_position_of_unique_objects():
    answers = set()
    for question in _asked("position", THREE):
        (q, a), = question.turns
        ref = _slots("position", q)["ref"]
        row, col = THREE_REFS[ref]
        assert a == POSITIONS[3 * row + col] and a in question.candidates
        answers.add(a)
    assert answers == {"top left", "middle center", "bottom right"}


def test_position_needs_a_nameable_object():
    # two identical large red circles: nothing can be named without its position
    twins = _scene(("circle", "red", "large", 0, 0), ("circle", "red", "large", 1, 1))
    assert ask("position", twins, np.random.default_rng(0)) is None


# (size, colour, shape) of THREE's objects
THREE_OBJECTS = {("large", "red", "circle"), ("small", "blue", "square"), ("large", "green", "circle")}


def _present(thing: str) -> bool:
    words = thing.split()
    return any(all(w in obj for w in words) for obj in THREE_OBJECTS)


def test_existence_yes_and_no_are_true():
    answers = []
    for question in _asked("existence", THREE, range(80)):
        (q, a), = question.turns
        slots = _slots("existence", q)
        thing = slots.get("thing") or re.sub(r"^an? ", "", slots["a_thing"])
        assert a == ("yes" if _present(thing) else "no"), q
        answers.append(a)
    assert answers.count("no") >= 10 and answers.count("yes") >= 10


def test_spatial_matches_rows_and_columns():
    answers = []
    for question in _asked("spatial", THREE):
        (q, a), = question.turns
        slots = _slots("spatial", q)
        (ra, ca), (rb, cb) = THREE_REFS[slots["a"]], THREE_REFS[slots["b"]]
        holds = {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[slots["rel"]]
        assert a == ("yes" if holds else "no"), q
        answers.append(a)
    assert {"yes", "no"} == set(answers)


def test_comparison_matches_counts():
    counts = {"circles": 2, "squares": 1, "red objects": 1, "blue objects": 1, "green objects": 1}
    answers = []
    for question in _asked("comparison", THREE):
        (q, a), = question.turns
        slots = _slots("comparison", q)
        x, y = counts.get(slots["x"], 0), counts.get(slots["y"], 0)
        assert x or y  # never compares two absent kinds
        assert a == ("yes" if x > y else "no"), q
        answers.append(a)
    assert {"yes", "no"} == set(answers)


def test_multiple_choice_letter_points_at_the_right_option():
    colours = {"circle at the top left": "red", "square": "blue", "circle at the bottom right": "green"}
    kinds = set()
    for question in _asked("multiple_choice", THREE):
        (q, a), = question.turns
        options = dict(re.findall(r"\(([A-D])\) ([a-z]+(?: (?:left|center|right))?)", q))
        assert sorted(options) == ["A", "B", "C", "D"] and len(set(options.values())) == 4
        assert a in "ABCD" and question.candidates == ("A", "B", "C", "D")
        inner = re.search(r"(What colour|What shape|Where) is the (.+?)\?", q)
        kind, ref = inner[1], inner[2]
        if kind == "What colour":
            truth = colours[ref]
        elif kind == "What shape":
            truth = THREE_COLOUR_REFS[ref]
        else:
            row, col = THREE_REFS[ref]
            truth = POSITIONS[3 * row + col]
        assert options[a] == truth, q
        kinds.add(kind)
    assert kinds == {"What colour", "What shape", "Where"}


def test_reading_returns_the_text():
    scene = _scene(("star", "yellow", "small", 0, 0), text=SceneText("dog", 0, 2))
    for question in _asked("reading", scene):
        (q, a), = question.turns
        assert a == "dog"
        position = _slots("reading", q).get("position")
        assert position in (None, "top right")
    assert ask("reading", THREE, np.random.default_rng(0)) is None


def test_dialogue_asks_shape_colour_size_of_one_object():
    by_position = {"top left": ("circle", "red", "large"), "middle center": ("square", "blue", "small"),
                   "bottom right": ("circle", "green", "large")}
    seen = set()
    for question in _asked("dialogue", THREE):
        assert len(question.turns) == 3 and question.candidates is None
        (q1, shape), (q2, colour), (q3, size) = question.turns
        position = _slots("dialogue", q1)["position"]
        assert (shape, colour, size) == by_position[position]
        colour_turns, size_turns = FAMILIES["dialogue"].follow_ups
        assert q2 in colour_turns and q3 in size_turns
        seen.add(position)
    assert seen == set(by_position)


def test_colour_and_shape_answers():
    # avoiding colour, the two large circles can only be told apart by position
    colours = {"circle at the top left": "red", "square": "blue", "circle at the bottom right": "green"}
    for question in _asked("colour", THREE):
        (q, a), = question.turns
        assert a == colours[_slots("colour", q)["ref"]] and a in question.candidates
    for question in _asked("shape", THREE):
        (q, a), = question.turns
        assert a == THREE_COLOUR_REFS[_slots("shape", q)["ref"]] and a in question.candidates


def test_colour_questions_never_name_the_answer():
    # two circles of the same size differ only by colour: the reference must fall back to the position
    scene = _scene(("circle", "red", "large", 0, 0), ("circle", "blue", "large", 0, 1))
    for question in _asked("colour", scene):
        (q, a), = question.turns
        assert "at the top" in q and a not in q.split()
    for seed in range(300):
        rng = np.random.default_rng(seed)
        scene = sample_scene(rng, "s", "train", 0.3)
        for obj in scene.objects:
            description = refer(obj, scene, avoid="colour")
            assert obj.colour not in description.split(), (scene, description)
            assert not set(description.split()) & set(COLOURS)
        question = ask("colour", scene, rng)
        (q, a), = question.turns
        assert a not in re.findall(r"[a-z]+", q.lower()), q


def test_refer_picks_out_exactly_one_object():
    """Resolve every description independently and check it names its object alone."""
    def resolve(description, scene):
        words = description.split()
        if "at" in words:  # '<shape> at the <row> <col>'
            shape, position = words[0], " ".join(words[3:])
            return [o for o in scene.objects if o.shape == shape and o.position == position]
        return [o for o in scene.objects if all(w in (o.shape, o.colour, o.size) for w in words)]

    for seed in range(300):
        scene = sample_scene(np.random.default_rng(seed), "s", "train", 0.0)
        for obj in scene.objects:
            for avoid in (None, "colour", "size"):
                description = refer(obj, scene, avoid=avoid)
                assert resolve(description, scene) == [obj], (scene, description)
                assert description.split()[-1] in SHAPES or " at the " in description
