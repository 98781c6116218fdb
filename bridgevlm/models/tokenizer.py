"""Train a byte-level BPE tokenizer on a corpus and save it in Hugging Face format."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, out_dir: str | Path | None = None):
    """Byte-level BPE (so any text is encodable) with the special tokens the templates need.

    Returns a `transformers` fast tokenizer; `AutoTokenizer.from_pretrained(out_dir)` reloads it.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # EOS deliberately not at id 2: HF CLIP text models treat eos_token_id == 2 as a legacy
        # config and pool at the highest token id instead of at the EOS token.
        special_tokens=[PAD, BOS, IMAGE, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
