from transformers import AutoTokenizer

from bridgevlm.models.tokenizer import train_tokenizer

TEXTS = ["a large red circle at the top left.", "USER: <image>\nWhat colour is it? ASSISTANT: blue"] * 3


def _check_specials(tokenizer):
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>" and tokenizer.pad_token == "<pad>"
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    # HF CLIP treats eos_token_id == 2 as a legacy config and pools at the highest id instead
    assert tokenizer.eos_token_id != 2
    image = tokenizer.convert_tokens_to_ids("<image>")
    assert image not in (None, tokenizer.unk_token_id)
    for name in ("<s>", "</s>", "<pad>", "<image>"):
        assert tokenizer(f"x{name}y", add_special_tokens=False)["input_ids"][1:2] == [tokenizer.convert_tokens_to_ids(name)]
    assert tokenizer("<image>\nhi", add_special_tokens=False)["input_ids"].count(image) == 1
    assert "<image>" in tokenizer.all_special_tokens
    assert tokenizer.image_token == "<image>" and tokenizer.image_token_id == image


def test_tokenizer_saves_and_reloads(tmp_path):
    trained = train_tokenizer(TEXTS, vocab_size=300, out_dir=tmp_path)
    _check_specials(trained)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    _check_specials(reloaded)
    assert len(reloaded) == len(trained)
    for text in TEXTS + ["Zebra! ünïcödé 123 \t tabs", "<image>\nhello"]:
        a = trained(text, add_special_tokens=False)["input_ids"]
        assert reloaded(text, add_special_tokens=False)["input_ids"] == a
        assert reloaded.decode(a) == text  # byte-level: any text round-trips


def test_fixture_round_trips_unseen_text(tokenizer):
    text = "   Multiple   spaces, newlines\n\nand émoji 🙂 survive."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.eos_token_id != 2
