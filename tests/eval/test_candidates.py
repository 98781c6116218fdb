import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from bridgevlm.eval.candidates import CandidateQuestion, score_candidates, tokenize_candidates

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 50


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def questions():
    return [
        CandidateQuestion([3, 7, 9, 11], [[5], [6, 8, 2], [12, 13]]),
        CandidateQuestion([4, 4, 21, 30, 31, 2, 17], [[40, 41, 42, 43, 44], [9]]),
        CandidateQuestion([8], [[1, 2, 3, 4, 5, 6]]),  # a single candidate
        CandidateQuestion([10, 20], [[30], [31], [32], [33]]),
    ]


def by_hand(model, prompt, candidate) -> float:
    """Log-likelihood of `candidate` after `prompt`, from one unpadded forward pass."""
    ids = torch.tensor([prompt + candidate])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(candidate))


def test_batched_scores_equal_one_at_a_time_log_likelihoods(model, questions):
    ranked = score_candidates(model, questions, batch_size=4, pad_token_id=0)
    for q, question in enumerate(questions):
        for c, candidate in enumerate(question.candidate_ids):
            expected = by_hand(model, question.prompt_ids, candidate)
            assert ranked.sum_logprobs[q][c] == pytest.approx(expected, abs=1e-5)
            assert ranked.mean_logprobs[q][c] == pytest.approx(expected / len(candidate), abs=1e-5)
            assert ranked.num_tokens[q][c] == len(candidate)


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_batch_size_and_pad_id_do_not_change_scores(model, questions, batch_size):
    reference = score_candidates(model, questions, batch_size=5)
    other = score_candidates(model, questions, batch_size=batch_size, pad_token_id=VOCAB - 1)
    for ref_row, row in zip(reference.sum_logprobs, other.sum_logprobs):
        assert row == pytest.approx(ref_row, abs=1e-5)
    assert other.best == reference.best


def test_best_is_the_argmax_of_the_chosen_normalisation(model, questions):
    by_sum = score_candidates(model, questions, normalisation="sum")
    by_mean = score_candidates(model, questions, normalisation="mean")
    for q in range(len(questions)):
        sums, means = by_sum.sum_logprobs[q], by_sum.mean_logprobs[q]
        assert by_sum.best[q] == max(range(len(sums)), key=sums.__getitem__)
        assert by_mean.best[q] == max(range(len(means)), key=means.__getitem__)
    assert by_sum.best[2] == by_mean.best[2] == 0  # the only candidate


def test_mean_normalisation_can_prefer_a_longer_candidate(model):
    # A long candidate has a lower total but, when its tokens are likely, a higher mean.
    prompt = [3, 7, 9]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    likely = int(logits.argmax())
    long = [likely]
    for _ in range(3):
        with torch.no_grad():
            long.append(int(model(input_ids=torch.tensor([prompt + long])).logits[0, -1].argmax()))
    unlikely = int(logits.argmin())
    question = [CandidateQuestion(prompt, [long, [unlikely]])]
    by_sum = score_candidates(model, question, normalisation="sum")
    by_mean = score_candidates(model, question, normalisation="mean")
    assert by_mean.best == [0]
    assert by_mean.mean_logprobs[0][0] > by_mean.mean_logprobs[0][1]
    assert by_sum.sum_logprobs == by_mean.sum_logprobs
    if by_sum.sum_logprobs[0][0] < by_sum.sum_logprobs[0][1]:
        assert by_sum.best == [1]


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, pad_token_id=0,
                      eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).eval()


def t5_by_hand(model, prompt, candidate) -> float:
    """Log-likelihood of `candidate` as the decoder's output for the encoder reading `prompt`, unpadded."""
    decoder_ids = torch.tensor([[model.config.decoder_start_token_id] + candidate[:-1]])
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([prompt]), decoder_input_ids=decoder_ids).logits[0].double()
    logprobs = logprobs.log_softmax(-1)
    return sum(float(logprobs[i, token]) for i, token in enumerate(candidate))


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_an_encoder_decoder_scores_candidates_as_decoder_targets(t5, questions, batch_size):
    ranked = score_candidates(t5, questions, batch_size=batch_size, pad_token_id=VOCAB - 1)
    for q, question in enumerate(questions):
        for c, candidate in enumerate(question.candidate_ids):
            expected = t5_by_hand(t5, question.prompt_ids, candidate)
            assert ranked.sum_logprobs[q][c] == pytest.approx(expected, abs=1e-5)
    assert ranked.best == [max(range(len(row)), key=row.__getitem__) for row in ranked.sum_logprobs]


def test_tokenize_candidates_appends_eos_when_asked(tokenizer):
    plain = tokenize_candidates(tokenizer, ["Is it red?"], [["yes", "no"]])
    with_eos = tokenize_candidates(tokenizer, ["Is it red?"], [["yes", "no"]], add_eos=True)
    assert plain[0].prompt_ids == tokenizer.encode("Is it red?")
    assert plain[0].candidate_ids[0] == tokenizer.encode("yes", add_special_tokens=False)
    assert [ids[-1] for ids in with_eos[0].candidate_ids] == [tokenizer.eos_token_id] * 2
    assert [ids[:-1] for ids in with_eos[0].candidate_ids] == plain[0].candidate_ids


class RecordingVlm(nn.Module):
    """A VisionLanguageModel stand-in: adds each row's image mean to its logits."""

    def __init__(self, llm):
        super().__init__()
        self.llm = llm
        self.seen = []

    def logits(self, input_ids, attention_mask=None, pixel_values=None):
        self.seen.append(pixel_values)
        logits = self.llm(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits + pixel_values.mean((1, 2, 3))[:, None, None] * torch.arange(VOCAB)


def test_images_follow_their_rows_through_batching(model):
    images = [torch.full((1, 3, 2, 2), value) for value in (0.0, 0.5)]
    questions = [CandidateQuestion([3, 4], [[5], [6, 7]], images[0]),
                 CandidateQuestion([3, 4], [[5], [6, 7]], images[1])]
    vlm = RecordingVlm(model)
    ranked = score_candidates(vlm, questions, batch_size=3)
    assert all(p.shape[0] <= 3 for p in vlm.seen)
    text_only = score_candidates(model, [CandidateQuestion([3, 4], [[5], [6, 7]])])
    assert ranked.sum_logprobs[0] == pytest.approx(text_only.sum_logprobs[0], abs=1e-5)  # a zero image adds 0
    assert ranked.sum_logprobs[1] != pytest.approx(ranked.sum_logprobs[0], abs=1e-3)
    alone = score_candidates(vlm, questions[1:], batch_size=1)
    assert ranked.sum_logprobs[1] == pytest.approx(alone.sum_logprobs[0], abs=1e-5)


def test_images_for_a_text_model_are_an_error(model):
    with pytest.raises(ValueError, match="text-only"):
        score_candidates(model, [CandidateQuestion([1], [[2]], torch.zeros(1, 3, 2, 2))])


@pytest.mark.parametrize("question, message", [
    (CandidateQuestion([1, 2], []), "question 0 has no candidate answers"),
    (CandidateQuestion([], [[1]]), "empty prompt"),
    (CandidateQuestion([1], [[2], []]), "candidate 1 of question 0 has no tokens"),
])
def test_malformed_questions_are_errors(model, question, message):
    with pytest.raises(ValueError, match=message):
        score_candidates(model, [question])


def test_unknown_normalisation_is_an_error(model, questions):
    with pytest.raises(ValueError, match="unknown normalisation 'max'; valid: sum, mean"):
        score_candidates(model, questions, normalisation="max")
