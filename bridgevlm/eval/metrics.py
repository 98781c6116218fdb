"""Evaluation metrics: VQA accuracy, exact match, multiple choice, retrieval recall, classification."""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import torch

# --------------------------------------------------------------------------------------------
# Answer normalisation (modelled on the official VQAv2 evaluation)
# --------------------------------------------------------------------------------------------

# The official eval maps "none" to "0" as well: counting questions are often answered "none".
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Apostrophe-less spellings -> standard contraction. Words that are also ordinary English words
# ("ill", "id", "shed", "well", "were", "its", "lets", "hell", "wed") are deliberately left out.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "couldve": "could've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "hows": "how's", "im": "i'm", "isnt": "isn't", "itll": "it'll",
    "ive": "i've", "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "shant": "shan't", "shes": "she's",
    "shouldnt": "shouldn't", "shouldve": "should've", "thats": "that's", "theres": "there's",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "wasnt": "wasn't",
    "werent": "weren't", "weve": "we've", "whats": "what's", "wheres": "where's", "whos": "who's",
    "wont": "won't", "wouldnt": "wouldn't", "wouldve": "would've", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# The official eval's punctuation set. Apostrophes stay (contractions); '.' is handled apart;
# ':', '%', '#', '$', '&', '*' are kept as in the official eval ("10:30", "50%").
_PUNCT = r"""[;/\[\]"{}()=+\\_\-><@`,?!]"""
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")  # "1,000" -> "1000"
_NON_DECIMAL_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # keep only the '.' in "2.5"
# Punctuation inside a word separates words ("black-and-white"); elsewhere it is just dropped.
_INNER_PUNCT = re.compile(rf"(?<=[^\W_]){_PUNCT}+(?=[^\W_])")
_OTHER_PUNCT = re.compile(_PUNCT)


def normalize_answer(text: str) -> str:
    """Normalise a short answer the way the VQAv2 evaluation does before comparing.

    Lower-cases; turns newlines/tabs into spaces; drops commas inside numbers ("1,000" -> "1000")
    and periods except between digits ("2.5" stays); treats other punctuation between letters as a
    word break ("t-shirt" -> "t shirt") and drops it elsewhere; maps number words "zero".."ten"
    (and "none") to digits; drops the articles a/an/the; restores apostrophes in common
    contractions ("dont" -> "don't"); collapses whitespace.

    Unlike the official script, punctuation is judged per occurrence, not for the whole string.
    """
    text = text.lower().replace("\n", " ").replace("\t", " ").replace("\u2019", "'")
    text = _DIGIT_COMMA.sub("", text)
    text = _NON_DECIMAL_PERIOD.sub("", text)
    text = _INNER_PUNCT.sub(" ", text)
    text = _OTHER_PUNCT.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


# --------------------------------------------------------------------------------------------
# Open-ended answers
# --------------------------------------------------------------------------------------------


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one predicted answer against the annotators' answers.

    With one reference this is exact match after :func:`normalize_answer`. With several it is the
    official VQA formula: the mean, over every subset leaving one reference out, of
    ``min(matches in subset / 3, 1)`` -- for VQAv2's 10 answers, the average over the 10 subsets of 9.

    Note the formula needs at least 4 references to reach 1.0: with 2 the maximum is 1/3, with 3 it
    is 2/3.

    Raises:
        ValueError: if ``references`` is empty.
    """
    if len(references) == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer, got none")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(ref) == pred for ref in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # Leaving out reference i removes one match iff reference i itself matched.
    return mean(min((total - left_out) / 3, 1.0) for left_out in matches)


def exact_match(prediction: str, reference: str, normalize: bool = True) -> float:
    """1.0 if ``prediction`` equals ``reference`` (after :func:`normalize_answer` if ``normalize``), else 0.0."""
    if normalize:
        return float(normalize_answer(prediction) == normalize_answer(reference))
    return float(prediction == reference)


# --------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------

# "answer is", "Answer:", "option", "the correct choice is" ...; the text after the last one is parsed.
_ANSWER_CUE = re.compile(r"\b(?:answer|option|choice)\b(?:\s+is\b)?\s*[:\-]?\s*", re.IGNORECASE)
# A bare letter: "B", "b", "(B)", "[B]", "B.", "B)", "B:".
_BARE_LETTER = re.compile(r"^[(\[]?([A-Za-z])[)\]]?[.:)]?$")
# A marked letter followed by text: "(B) red", "B) red", "B. red", "B: red".
_LETTER_THEN_TEXT = re.compile(r"^(?:[(\[]([A-Za-z])[)\]]|([A-Za-z])[.:)])\s+(.+)$")
# After an answer cue only: a capital letter followed by prose, "... answer is B because ...".
_CAPITAL_THEN_TEXT = re.compile(r"^([A-Z])(?![\w'])[.,;:)]?\s*(.*)$")


def match_choice(prediction: str, candidates: Sequence[str]) -> int | None:
    """Map a generated multiple-choice answer to the index of the candidate it names.

    Understands letters (A = candidates[0], ...) written as "B", "b", "(B)", "B.", "B)", "B) red",
    "Option B" or "the answer is B", and the candidate text itself after :func:`normalize_answer`
    ("Red." for "red"). Letters beyond the number of candidates are ignored.

    Returns:
        The candidate index, or None if nothing matches or the answer is ambiguous (e.g. names two
        candidates, or a letter whose following text is a different candidate).
    """
    if len(candidates) > 26:
        raise ValueError(f"match_choice supports at most 26 candidates (letters A-Z), got {len(candidates)}")
    keys = [_choice_key(c) for c in candidates]

    def by_text(text: str) -> set[int]:
        key = _choice_key(text)
        return {i for i, k in enumerate(keys) if k == key} if key else set()

    text = prediction.strip()
    votes = by_text(text)
    cues = list(_ANSWER_CUE.finditer(text))
    body = text[cues[-1].end():].strip() if cues else text
    body = body.splitlines()[0].strip() if body else ""
    if body != text:
        votes |= by_text(body)

    letter, rest = None, ""
    if m := _BARE_LETTER.match(body):
        letter = m.group(1)
    elif m := _LETTER_THEN_TEXT.match(body):
        letter, rest = m.group(1) or m.group(2), m.group(3)
    elif cues and (m := _CAPITAL_THEN_TEXT.match(body)):
        letter, rest = m.group(1), m.group(2)
    if letter is not None and ord(letter.upper()) - ord("A") < len(candidates):
        votes.add(ord(letter.upper()) - ord("A"))
        # Text after the letter usually repeats the option; if it names another one, it is ambiguous.
        votes |= by_text(rest)
    return votes.pop() if len(votes) == 1 else None


def _choice_key(text: str) -> str:
    # normalize_answer("a") is "" (an article); fall back so such candidates stay matchable.
    return normalize_answer(text) or text.strip().lower()


def multiple_choice_accuracy(
    predictions: Sequence[str], candidates: Sequence[Sequence[str]], answers: Sequence[int]
) -> float:
    """Fraction of predictions that :func:`match_choice` maps to the correct candidate index.

    Unparseable or ambiguous predictions count as wrong.

    Raises:
        ValueError: if the three sequences differ in length or are empty.
    """
    if len(predictions) == 0:
        raise ValueError("multiple_choice_accuracy needs at least one prediction, got none")
    if not len(predictions) == len(candidates) == len(answers):
        raise ValueError(
            f"predictions, candidates and answers must have the same length, got "
            f"{len(predictions)}, {len(candidates)} and {len(answers)}"
        )
    return mean(float(match_choice(p, c) == a) for p, c, a in zip(predictions, candidates, answers))


# --------------------------------------------------------------------------------------------
# Retrieval and classification
# --------------------------------------------------------------------------------------------


def retrieval_recall(
    similarity: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Recall@k: the fraction of queries with at least one positive among their top-k candidates.

    Args:
        similarity: ``[Nq, Nc]`` scores, higher = more similar.
        positives: ``[Nq, Nc]`` bool, True where candidate j is a correct match for query i (a query
            may have several, e.g. an image with five captions).
        ks: cut-offs; a k larger than ``Nc`` is clipped to ``Nc``.

    Ties are counted against the query: a negative scoring equal to the best positive ranks ahead
    of it, so constant similarities do not score perfectly.

    Returns:
        ``{k: recall}`` for each requested k.

    Raises:
        ValueError: on mismatched or non-2-D shapes, NaN scores, a k < 1, or a query with no positive.
    """
    if similarity.dim() != 2 or similarity.shape != positives.shape:
        raise ValueError(
            f"similarity and positives must both be [num_queries, num_candidates], got "
            f"{list(similarity.shape)} and {list(positives.shape)}"
        )
    num_queries, num_candidates = similarity.shape
    if num_queries == 0 or num_candidates == 0:
        raise ValueError(f"retrieval_recall needs at least one query and one candidate, got {list(similarity.shape)}")
    if bad := [k for k in ks if k < 1]:
        raise ValueError(f"recall cut-offs must be >= 1, got {bad}")
    sim = similarity.detach().float()
    if torch.isnan(sim).any():
        raise ValueError("similarity contains NaN; recall would be meaningless")
    pos = positives.detach().to(device=sim.device, dtype=torch.bool)
    has_positive = pos.any(dim=1)
    if not has_positive.all():
        missing = (~has_positive).nonzero().flatten().tolist()
        raise ValueError(
            f"query {missing[0]} has no positive candidate ({len(missing)} queries without one: "
            f"{missing[:10]}); every query needs at least one correct item"
        )
    best_positive = sim.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)
    # 0-based rank of the best positive = number of negatives scoring at least as high.
    rank = ((sim >= best_positive) & ~pos).sum(dim=1)
    return {k: (rank < min(k, num_candidates)).float().mean().item() for k in ks}


def classification_accuracy(
    predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor
) -> float:
    """Fraction of predicted class ids equal to the labels.

    Raises:
        ValueError: if the shapes differ (e.g. logits passed instead of ids) or there are no items.
    """
    preds, labs = torch.as_tensor(predictions), torch.as_tensor(labels)
    if preds.shape != labs.shape:
        hint = "; pass class ids (e.g. logits.argmax(-1)), not logits" if preds.dim() == labs.dim() + 1 else ""
        raise ValueError(f"predictions and labels must have the same shape, got "
                         f"{list(preds.shape)} and {list(labs.shape)}{hint}")
    if preds.numel() == 0:
        raise ValueError("classification_accuracy needs at least one prediction, got none")
    return (preds.to(labs.device) == labs).float().mean().item()


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean of ``values``.

    Raises:
        ValueError: if ``values`` is empty (a mean of nothing usually means a bug upstream).
    """
    items = [float(v) for v in values]
    if not items:
        raise ValueError("mean of an empty sequence is undefined")
    return math.fsum(items) / len(items)
