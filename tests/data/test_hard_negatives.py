import pytest

from bridgevlm.data.hard_negatives import WordSwapNegatives

CLASSES = [["red", "green", "blue"], ["circle", "square"], ["left", "right"]]


def test_swaps_exactly_one_classed_word_for_another_of_its_class():
    make = WordSwapNegatives(CLASSES, seed=0)
    caption = "At the top left, a large red circle."
    seen = set()
    for index in range(60):
        negative = make(caption, index)
        changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
        assert len(changed) == 1
        old, new = (w.strip(",.") for w in changed[0])
        cls = next(c for c in CLASSES if old in c)
        assert new in cls and new != old
        seen.add(new)
    assert seen == {"green", "blue", "square", "right"}  # every swap can happen


def test_same_index_same_negative_and_capitals_kept():
    make = WordSwapNegatives([["red", "blue"]], seed=3)
    assert make("Red circle", 5) == make("Red circle", 5) == "Blue circle"


def test_no_swappable_word_gives_none_and_bad_classes_are_rejected():
    assert WordSwapNegatives(CLASSES)("a large star.", 0) is None
    with pytest.raises(ValueError, match="two distinct words"):
        WordSwapNegatives([["red"]])
    with pytest.raises(ValueError, match="two hard-negative word classes"):
        WordSwapNegatives([["red", "blue"], ["red", "green"]])
