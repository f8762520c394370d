"""open_clip's CLIP BPE tokenizer (`SimpleTokenizer`) as a `tokenizers` fast tokenizer.

A model bundle carries its tokenizer as tokenizer.json, read by the torch-free runtime. open_clip's
CLIP towers tokenize with a pure-Python BPE; this rebuilds the same BPE (its vocabulary and merge
ranks, CLIP's pre-tokenizer pattern, lower-casing, start/end tokens) in `tokenizers`, the way HF's
CLIP converter does. ids match open_clip's on real titles (the export's parity check verifies it on
every bundle); open_clip's ftfy/HTML clean-up of broken text is not reproduced.
"""
from __future__ import annotations

from typing import Any

PAD = "!"  # open_clip pads with id 0, which is "!" in CLIP's vocabulary
CLIP_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_bpe_fast_tokenizer(simple: Any) -> Any:
    """A transformers `PreTrainedTokenizerFast` equivalent to an open_clip `SimpleTokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    start, end = simple.decoder[simple.sot_token_id], simple.decoder[simple.eot_token_id]
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    backend = Tokenizer(models.BPE(vocab=dict(simple.encoder), merges=merges, continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False, unk_token=end))  # fmt: skip
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{start} $A {end}", special_tokens=[(start, simple.sot_token_id), (end, simple.eot_token_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=start, eos_token=end, unk_token=end, pad_token=PAD)
