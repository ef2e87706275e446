"""A byte-level tokenizer with no merges: every UTF-8 byte is one token (ids 0-255), plus BOS/EOS/PAD (256-258).

Built in-process with the ``tokenizers`` library, so it needs no download: the tiny test models and
``caldera synth`` folders carry it, and calibration text becomes token ids below 259 for any vocabulary.
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258  # the special tokens' ids, after the 256 bytes
VOCAB_SIZE = 259


def byte_tokenizer(path: Path | str):
    """Byte-level tokenizer (256 byte tokens + BOS/EOS/PAD), saved into ``path``; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins for the bytes
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({tok: len(alphabet) + i for i, tok in enumerate(SPECIAL_TOKENS)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    tokenizer.save_pretrained(path)
    return tokenizer
