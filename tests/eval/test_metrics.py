"""Tests for bridgevlm.eval.metrics against hand-checked values."""
from __future__ import annotations

import pytest
import torch

from bridgevlm.eval.metrics import (
    classification_accuracy,
    exact_match,
    match_choice,
    mean,
    multiple_choice_accuracy,
    normalize_answer,
    retrieval_recall,
    vqa_accuracy,
)


@pytest.mark.parametrize("text, expected", [
    ("  Yes!\n", "yes"),
    ("Two", "2"),
    ("ten dogs", "10 dogs"),
    ("none", "0"),  # as in the official VQA eval
    ("The Dog.", "dog"),
    ("an apple\ttree", "apple tree"),
    ("2.5", "2.5"),  # a '.' between digits is a decimal point
    ("U.S.A.", "usa"),
    ("1,000", "1000"),  # thousands separator
    ("red, blue", "red blue"),
    ("black-and-white", "black and white"),  # punctuation inside a word splits it
    ("(red)", "red"),
    ("10:30", "10:30"),  # ':' is not in the official punctuation set
    ("dont know", "don't know"),
    ("isnt", "isn't"),
    ("it\u2019s", "it's"),  # typographic apostrophe
    ("a   big    cat", "big cat"),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_vqa_accuracy_single_reference_is_exact_match():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("3", ["2"]) == 0.0


@pytest.mark.parametrize("matching, expected", [
    # 10 references, `matching` of them equal to the prediction. Leaving out a matching reference
    # leaves matching-1 matches, leaving out another leaves `matching`; each scores min(m/3, 1).
    (0, 0.0),
    (1, 0.3),  # (1 * 0/3 + 9 * 1/3) / 10 = 3/10
    (2, 0.6),  # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10
    (3, 0.9),  # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10
    (4, 1.0),  # every 9-subset still holds >= 3 matches
    (10, 1.0),
])
def test_vqa_accuracy_ten_annotators(matching, expected):
    references = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_accuracy("two", references) == pytest.approx(expected)


def test_vqa_accuracy_few_references_and_errors():
    # 2 references, both matching: each leave-one-out subset has 1 match -> 1/3.
    assert vqa_accuracy("cat", ["cat", "Cat"]) == pytest.approx(1 / 3)
    # 3 references, 2 matching: subsets have 1, 1, 2 matches -> (1/3 + 1/3 + 2/3) / 3 = 4/9.
    assert vqa_accuracy("cat", ["cat", "dog", "a cat"]) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("cat", [])


def test_exact_match():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("The Cat!", "cat", normalize=False) == 0.0
    assert exact_match("cat", "cat", normalize=False) == 1.0
    assert exact_match("dog", "cat") == 0.0


CANDIDATES = ["red", "blue", "green"]


@pytest.mark.parametrize("prediction, expected", [
    ("B", 1), ("b", 1), ("(B)", 1), ("B.", 1), ("B)", 1), ("B) blue", 1), ("Option B", 1),
    ("the answer is B", 1), ("The answer is B because the sky is clear.", 1), ("Answer: c", 2),
    ("(C) green\nThe leaves are green.", 2),
    ("Red", 0), ("red.", 0), ("The answer is green.", 2),
    ("B) red", None),  # letter and text disagree
    ("D", None),  # no fourth candidate
    ("A red car", None),  # an article, not a letter; not a candidate's text either
    ("I think it is purple", None),
    ("", None),
])
def test_match_choice(prediction, expected):
    assert match_choice(prediction, CANDIDATES) == expected


def test_match_choice_ambiguous_when_letter_is_also_other_candidate_text():
    # "b" is candidate 0's text but letter B means candidate 1.
    assert match_choice("b", ["b", "c"]) is None
    assert match_choice("b", ["b", "a"]) is None


def test_multiple_choice_accuracy():
    predictions = ["B", "red", "no idea", "(C)"]
    answers = [1, 0, 0, 1]
    # right, right, unparseable -> wrong, C != B -> wrong: 2 / 4
    assert multiple_choice_accuracy(predictions, [CANDIDATES] * 4, answers) == 0.5
    with pytest.raises(ValueError, match="same length"):
        multiple_choice_accuracy(predictions, [CANDIDATES] * 3, answers)


def test_retrieval_recall():
    similarity = torch.tensor([
        [0.9, 0.1, 0.2, 0.3],  # positive 0 scores highest: rank 0
        [0.5, 0.8, 0.7, 0.1],  # positive 2 (0.7) beaten by 0.8: rank 1
        [0.4, 0.3, 0.2, 0.1],  # positives 2, 3: best 0.2 beaten by 0.4 and 0.3: rank 2
    ])
    positives = torch.zeros(3, 4, dtype=torch.bool)
    positives[0, 0] = positives[1, 2] = positives[2, 2] = positives[2, 3] = True
    recall = retrieval_recall(similarity, positives, ks=(1, 2, 3, 10))
    # recall@k = #(rank < k) / 3; k=10 is clipped to 4 candidates
    assert recall == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0, 10: 1.0})


def test_retrieval_recall_ties_count_against_the_query():
    # All scores equal: both negatives tie with the positive, so it ranks 2 (third).
    recall = retrieval_recall(torch.zeros(1, 3), torch.tensor([[False, True, False]]), ks=(1, 2, 3))
    assert recall == {1: 0.0, 2: 0.0, 3: 1.0}


def test_retrieval_recall_errors():
    with pytest.raises(ValueError, match=r"got \[2, 3\] and \[2, 2\]"):
        retrieval_recall(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
    positives = torch.tensor([[True, False], [False, False]])
    with pytest.raises(ValueError, match="query 1 has no positive"):
        retrieval_recall(torch.zeros(2, 2), positives)


def test_classification_accuracy():
    # 3 of 4 equal
    assert classification_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert classification_accuracy(torch.tensor([0, 1]), torch.tensor([1, 1])) == 0.5
    with pytest.raises(ValueError, match="not logits"):
        classification_accuracy(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))


def test_mean():
    assert mean([1.0, 2.0, 4.0]) == pytest.approx(7 / 3)
    assert mean(x for x in (1, 0)) == 0.5
    with pytest.raises(ValueError, match="empty"):
        mean([])
