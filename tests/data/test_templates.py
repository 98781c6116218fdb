import pytest

from bridgevlm.data.templates import (
    IGNORE_INDEX,
    VICUNA_SYSTEM,
    ConversationError,
    ImagePlaceholder,
    get_template,
    tokenize_conversation,
)

Q1, A1 = "What colour is the circle?", "red"
Q2, A2 = "How many squares are there?", "2"
Q3, A3 = "Is there a yellow diamond?", "no"


def _messages(*pairs, image=True):
    out = []
    for i, (q, a) in enumerate(pairs):
        out.append({"from": "human", "value": ("<image>\n" + q) if (i == 0 and image) else q})
        out.append({"from": "gpt", "value": a})
    return out


def _render(segments):
    return "".join(s.text + ("</s>" if s.eos else "") for s in segments)


def test_vicuna_v1_renders_as_in_spec():
    template = get_template("vicuna_v1")
    rendered = _render(template.segments(_messages((Q1, A1), (Q2, A2))))
    # SPEC.md, "LLaVA and LLaVA-1.5": system then " USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>"
    expected = VICUNA_SYSTEM + f" USER: <image>\n{Q1} ASSISTANT: {A1}</s>USER: {Q2} ASSISTANT: {A2}</s>"
    assert rendered == expected
    assert VICUNA_SYSTEM.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert VICUNA_SYSTEM.endswith("polite answers to the user's questions.")


def test_generation_prompt_ends_with_assistant():
    template = get_template("vicuna_v1")
    messages = _messages((Q1, A1)) + [{"from": "human", "value": Q2}]
    segments = template.segments(messages, add_generation_prompt=True)
    rendered = _render(segments)
    assert rendered.endswith(f"</s>USER: {Q2} ASSISTANT:")
    assert not segments[-1].supervised
    with pytest.raises(ConversationError):
        template.segments(_messages((Q1, A1)), add_generation_prompt=True)


def test_plain_keeps_only_image_then_caption():
    template = get_template("plain")
    segments = template.segments(_messages(("Describe the image.", "a large red circle.")))
    assert [(s.text, s.supervised, s.eos) for s in segments] == [
        ("<image>", False, False), ("a large red circle.", True, True)]
    assert _render(segments) == "<image>a large red circle.</s>"


@pytest.mark.parametrize("name, answer_cue", [("blip2_vqa", "Answer:"), ("blip2_vqa_short", "Short answer:")])
def test_blip2_zero_shot_prompts_put_the_image_first(name, answer_cue):
    # SPEC.md, BLIP-2: OPT "Question: {} Answer:", FlanT5 "Question: {} Short answer:"; InstructBLIP "<Image> Question: {} Short answer:"
    template = get_template(name)
    prompt = _render(template.segments([{"from": "human", "value": f"{Q1}\n<image>"}], add_generation_prompt=True))
    assert prompt == f"<image>Question: {Q1} {answer_cue}"
    rendered = _render(template.segments(_messages((Q1, A1), (Q2, A2))))
    assert rendered == f"<image>Question: {Q1} {answer_cue} {A1}</s>Question: {Q2} {answer_cue} {A2}</s>"


def test_the_instructblip_format_is_the_instruction_as_worded_after_the_image():
    template = get_template("blip2_instruction")
    messages = [{"from": "human", "value": "<image>\nA short image description:"}, {"from": "gpt", "value": "a red star."}]
    assert _render(template.segments(messages)) == "<image>A short image description: a red star.</s>"
    assert _render(template.segments(messages[:1], add_generation_prompt=True)) == "<image>A short image description:"


def test_unknown_template_lists_valid_ones():
    with pytest.raises(KeyError, match="vicuna_v1.*plain|plain.*vicuna_v1"):
        get_template("vicuna_v2")


def _tok(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _vicuna_pieces(tokenizer, pairs):
    """(ids, supervised) pieces built by hand from the SPEC rendering, independently of `segments()`."""
    eos = tokenizer.eos_token_id
    pieces = []
    for i, (q, a) in enumerate(pairs):
        user = (VICUNA_SYSTEM + " USER: <image>\n" if i == 0 else "USER: ") + q + " ASSISTANT:"
        pieces.append((_tok(tokenizer, user), False))
        pieces.append((_tok(tokenizer, " " + a) + [eos], True))
    return pieces


def test_ids_are_concatenated_segments_and_labels_mark_answers(tokenizer):
    pairs = [(Q1, A1), (Q2, A2)]
    sample = tokenize_conversation(tokenizer, get_template("vicuna_v1"), _messages(*pairs))
    expected_ids = [tokenizer.bos_token_id]
    expected_labels = [IGNORE_INDEX]
    for ids, supervised in _vicuna_pieces(tokenizer, pairs):
        expected_ids += ids
        expected_labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    assert sample.input_ids == expected_ids
    assert sample.labels == expected_labels
    assert sample.truncated_turns == 0
    # the image tag is one token, present once
    assert sample.input_ids.count(tokenizer.convert_tokens_to_ids("<image>")) == 1
    # the supervised tokens decode to the answers, each followed by EOS
    runs, run = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs.append(run)
    assert [r[-1] for r in runs] == [tokenizer.eos_token_id] * 2
    assert [tokenizer.decode(r, skip_special_tokens=True).strip() for r in runs] == [A1, A2]


def test_generation_prompt_tokens_are_unsupervised(tokenizer):
    messages = [{"from": "human", "value": "<image>\n" + Q1}]
    sample = tokenize_conversation(tokenizer, get_template("vicuna_v1"), messages, add_generation_prompt=True)
    assert set(sample.labels) == {IGNORE_INDEX}
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False).endswith("ASSISTANT:")


def test_plain_tokenisation(tokenizer):
    sample = tokenize_conversation(tokenizer, get_template("plain"), _messages(("Describe it.", "a red circle.")))
    caption = _tok(tokenizer, "a red circle.") + [tokenizer.eos_token_id]
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert sample.input_ids == [tokenizer.bos_token_id, image] + caption
    assert sample.labels == [IGNORE_INDEX, IGNORE_INDEX] + caption


def test_no_assistant_turn_is_an_error(tokenizer):
    with pytest.raises(ConversationError, match="no assistant turn"):
        tokenize_conversation(tokenizer, get_template("vicuna_v1"), [{"from": "human", "value": "<image>\nhi"}])


@pytest.mark.parametrize("messages", [
    [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}],
    [{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a"}],
    [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}],
    [{"from": "system", "value": "q"}, {"from": "gpt", "value": "a"}],
    [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}],
])
def test_bad_roles_are_errors(tokenizer, messages):
    with pytest.raises(ConversationError, match="message"):
        tokenize_conversation(tokenizer, get_template("vicuna_v1"), messages)


def test_truncation_drops_whole_trailing_exchanges(tokenizer):
    pairs = [(Q1, A1), (Q2, A2), (Q3, A3)]
    template = get_template("vicuna_v1")
    full = tokenize_conversation(tokenizer, template, _messages(*pairs))
    pieces = _vicuna_pieces(tokenizer, pairs)
    # end of exchange k = BOS + lengths of its question and answer pieces and all before
    ends, length = [], 1
    for ids, supervised in pieces:
        length += len(ids)
        if supervised:
            ends.append(length)
    assert len(full.input_ids) == ends[2]

    exact = tokenize_conversation(tokenizer, template, _messages(*pairs), max_length=ends[2])
    assert exact.input_ids == full.input_ids and exact.truncated_turns == 0

    # one token short of the whole conversation: exchange 3 goes, exchanges 1-2 stay whole
    cut = tokenize_conversation(tokenizer, template, _messages(*pairs), max_length=ends[2] - 1)
    assert cut.truncated_turns == 1
    assert cut.input_ids == full.input_ids[: ends[1]]
    assert cut.labels == full.labels[: ends[1]]
    assert cut.input_ids[-1] == tokenizer.eos_token_id

    # a limit in the middle of exchange 2 keeps exchange 1 only
    cut = tokenize_conversation(tokenizer, template, _messages(*pairs), max_length=ends[1] - 3)
    assert cut.truncated_turns == 2
    assert cut.input_ids == full.input_ids[: ends[0]]

    with pytest.raises(ConversationError, match="first exchange"):
        tokenize_conversation(tokenizer, template, _messages(*pairs), max_length=ends[0] - 1)


def test_openai_style_messages(tokenizer):
    llava = _messages((Q1, A1), (Q2, A2))
    openai = [{"role": "user" if m["from"] == "human" else "assistant", "content": m["value"]} for m in llava]
    template = get_template("vicuna_v1")
    a = tokenize_conversation(tokenizer, template, llava)
    b = tokenize_conversation(tokenizer, template, openai)
    assert a.input_ids == b.input_ids and a.labels == b.labels


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_template_segments_supervise_only_the_replies(tokenizer):
    import copy

    from bridgevlm.data.templates import CHAT_TEMPLATE

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    template = get_template(CHAT_TEMPLATE, tok)
    messages = _messages(("What colour?", "red"), ("Sure?", "yes"), image=False)
    segments = template.segments(messages)
    assert [s.text for s in segments] == [
        "<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n", "red<|im_end|>\n",
        "<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n", "yes<|im_end|>\n"]
    assert [s.supervised for s in segments] == [False, True, False, True]
    sample = tokenize_conversation(tok, template, messages)
    assert tok.decode(sample.input_ids) == tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in (("user", "What colour?"), ("assistant", "red"), ("user", "Sure?"),
                                                ("assistant", "yes"))], tokenize=False)
    supervised = [i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert tok.decode(supervised) == "red<|im_end|>\nyes<|im_end|>\n"
    prompt = tokenize_conversation(tok, template, messages[:3], add_generation_prompt=True)
    assert tok.decode(prompt.input_ids).endswith("Sure?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_errors(tokenizer):
    import copy

    from bridgevlm.data.templates import CHAT_TEMPLATE

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with pytest.raises(ConversationError, match="no chat template"):
        get_template(CHAT_TEMPLATE, tok)
    with pytest.raises(ConversationError, match="needs the tokenizer"):
        get_template(CHAT_TEMPLATE)
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }};{% endfor %}"  # not prefix-stable
    with pytest.raises(ConversationError, match="extension of the turns before it"):
        get_template(CHAT_TEMPLATE, tok).segments(_messages(("a", "b"), ("c", "d")))
    with pytest.raises(KeyError, match="valid: vicuna_v1, vicuna_v1_nosys, plain, blip2_vqa, blip2_vqa_short, blip2_instruction, chat_template"):
        get_template("vicuna")


def test_a_placeholder_with_a_text_copy_puts_the_turns_shifted_ids_before_each_image(tokenizer):
    image = tokenizer.convert_tokens_to_ids("<image>")
    offset = 10_000
    messages = _messages(("What colour is<image> here? And<image>?", "red"), ("And now?", "blue"), image=False)
    template = get_template("vicuna_v1_nosys")
    bare = tokenize_conversation(tokenizer, template, messages, image_placeholder=ImagePlaceholder(image, 2))
    copied = tokenize_conversation(tokenizer, template, messages,
                                   image_placeholder=ImagePlaceholder(image, 2, text_copy_offset=offset))
    turn = _tok(tokenizer, "USER: What colour is") + _tok(tokenizer, " here? And") + _tok(tokenizer, "? ASSISTANT:")
    copy = [i + offset for i in turn]
    first = [tokenizer.bos_token_id] + _tok(tokenizer, "USER: What colour is") + copy + [image] * 2
    first += _tok(tokenizer, " here? And") + copy + [image] * 2 + _tok(tokenizer, "? ASSISTANT:")
    assert copied.input_ids[:len(first)] == first and copied.num_images == bare.num_images == 2
    # the copy is prompt, never a target, and the second turn (no image) is untouched
    assert copied.labels[:len(first)] == [IGNORE_INDEX] * len(first)
    assert copied.input_ids[len(first):] == bare.input_ids[len(bare.input_ids) - len(copied.input_ids) + len(first):]
    assert [i - offset for i in copied.input_ids if i >= offset] == turn * 2
