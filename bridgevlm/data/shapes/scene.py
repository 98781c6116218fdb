"""Scene graphs of the Shapes world: what is in a picture, independent of how it is drawn."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle", "diamond", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
# Short words and digits that a scene may show as rendered text.
WORDS = ("cat", "dog", "sun", "hat", "box", "cup", "pen", "map", "key", "bus")
DIGITS = tuple(str(d) for d in range(10))
TEXTS = DIGITS + WORDS

MIN_OBJECTS, MAX_OBJECTS = 1, 4
# More objects make harder, more informative scenes; single-object scenes stay common enough
# to serve as the classification set.
OBJECT_COUNT_WEIGHTS = (0.16, 0.26, 0.29, 0.29)


def position_name(row: int, col: int) -> str:
    """'top left', 'middle center', ... — always row word then column word."""
    return f"{ROWS[row]} {COLUMNS[col]}"


POSITIONS = tuple(position_name(r, c) for r in range(3) for c in range(3))


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    def phrase(self) -> str:
        """'large red circle'."""
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneText:
    value: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Scene:
    """One picture's content. Objects are kept in reading order (row-major)."""

    id: str
    split: str
    objects: tuple[SceneObject, ...]
    text: SceneText | None = None
    # Per-scene rendering noise (jitter, shade); part of the graph so rendering is a pure function.
    render_seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def key(self) -> tuple:
        """Identity of the content, ignoring rendering noise: equal keys mean the same scene."""
        text = (self.text.value, self.text.row, self.text.col) if self.text else None
        return (tuple((o.shape, o.colour, o.size, o.row, o.col) for o in self.objects), text)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "split": self.split,
            "objects": [asdict(o) for o in self.objects],
            "text": asdict(self.text) if self.text else None,
            "render_seed": self.render_seed,
        }

    @staticmethod
    def from_json(data: dict) -> Scene:
        text = data.get("text")
        return Scene(
            id=data["id"],
            split=data["split"],
            objects=tuple(SceneObject(**o) for o in data["objects"]),
            text=SceneText(**text) if text else None,
            render_seed=int(data.get("render_seed", 0)),
        )


def sample_scene(rng: np.random.Generator, scene_id: str, split: str, text_probability: float,
                 max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw 1–4 objects in distinct grid cells, and maybe a rendered word or digit in another.
    `max_objects` caps the count for a language-model curriculum (fewer distractors first); the
    world's own scenes always use the full range."""
    if not MIN_OBJECTS <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be between {MIN_OBJECTS} and {MAX_OBJECTS}, got {max_objects}")
    weights = np.asarray(OBJECT_COUNT_WEIGHTS[:max_objects - MIN_OBJECTS + 1], dtype=float)
    if max_objects < MAX_OBJECTS:
        weights /= weights.sum()
    count = int(rng.choice(np.arange(MIN_OBJECTS, max_objects + 1), p=weights))
    has_text = rng.random() < text_probability
    cells = rng.permutation(9)[: count + int(has_text)]
    objects = [
        SceneObject(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=COLOURS[rng.integers(len(COLOURS))],
            size=SIZES[rng.integers(len(SIZES))],
            row=int(cell) // 3,
            col=int(cell) % 3,
        )
        for cell in cells[:count]
    ]
    objects.sort(key=lambda o: (o.row, o.col))
    text = None
    if has_text:
        cell = int(cells[count])
        text = SceneText(value=TEXTS[rng.integers(len(TEXTS))], row=cell // 3, col=cell % 3)
    return Scene(
        id=scene_id,
        split=split,
        objects=tuple(objects),
        text=text,
        render_seed=int(rng.integers(2**31)),
    )


def join_phrases(phrases: list[str]) -> str:
    """['a', 'b', 'c'] -> 'a, b and c'."""
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def short_caption(scene: Scene) -> str:
    """'a large red circle and a small blue square.'"""
    parts = [f"a {o.phrase()}" for o in scene.objects]
    if scene.text:
        parts.append(f"the {text_kind(scene.text.value)} {scene.text.value}")
    return join_phrases(parts) + "."


def detailed_caption(scene: Scene) -> str:
    """Every object with its size, colour, shape and position, in reading order.

    This is also the scene's text form that the language model learns to answer questions from.
    Position comes first so that, under causal attention, an object's last word (its shape) can
    see all of its attributes: a question is then answered by matching one token and reading it.
    """
    noun = "object" if len(scene.objects) == 1 else "objects"
    sentences = [f"There {'is' if len(scene.objects) == 1 else 'are'} {len(scene.objects)} {noun}."]
    sentences += [f"At the {o.position}, a {o.phrase()}." for o in scene.objects]
    if scene.text:
        sentences.append(f"At the {scene.text.position}, the {text_kind(scene.text.value)} {scene.text.value}.")
    return " ".join(sentences)


def class_prompts() -> list[str]:
    """Every caption the world writes for a one-object scene, with "{}" where its class ("red circle")
    goes: the prompt ensemble for zero-shot classification in the captions' own words, as CLIP
    writes prompts for each dataset in that dataset's manner."""
    prompts = []
    for size in SIZES:
        for row in range(3):
            for col in range(3):
                scene = Scene("prompt", "prompt", (SceneObject("\0", "\1", size, row, col),))
                prompts += [caption(scene).replace("\1 \0", "{}") for caption in (short_caption, detailed_caption)]
    return sorted(set(prompts))


def compact_caption(scene: Scene) -> str:
    """'small red circle top left, large blue square center.': few words between an object's
    attributes and the next object, so in-context look-ups are short-range (a first curriculum
    stage for the language model; see LmRecipe.scene_text)."""
    parts = [f"{o.size} {o.colour} {o.shape} {o.position}" for o in scene.objects]
    if scene.text:
        parts.append(f"{text_kind(scene.text.value)} {scene.text.value} {scene.text.position}")
    return ", ".join(parts) + "."


def minimal_caption(scene: Scene) -> str:
    """'red circle, blue square.': colour and shape only, adjacent, the shortest look-up there is
    (the language model's first curriculum phase; it cannot tell apart objects that share a colour
    or a shape, so corpora using it keep only scenes whose objects it names uniquely)."""
    parts = [f"{o.colour} {o.shape}" for o in scene.objects]
    if scene.text:
        parts.append(f"{text_kind(scene.text.value)} {scene.text.value}")
    return ", ".join(parts) + "."


def names_objects_uniquely(scene: Scene) -> bool:
    """True when no two objects share a colour or a shape (so `minimal_caption` is unambiguous)."""
    return (len({o.colour for o in scene.objects}) == len(scene.objects)
            and len({o.shape for o in scene.objects}) == len(scene.objects))


def text_kind(value: str) -> str:
    return "digit" if value.isdigit() else "word"
