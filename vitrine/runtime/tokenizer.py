"""The bundle's text tokenizer, via the torch-free `tokenizers` library.

Texts are truncated to the model's max length and padded only to the longest
row of their own batch: short queries cost short sequences.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from vitrine.errors import UserError

TOKENIZER_FILE = "tokenizer.json"


class TokenizerSettings(BaseModel):
    """Where the tokenizer lives in the bundle and how ids are truncated and padded."""

    model_config = ConfigDict(extra="allow", frozen=True)

    dir: str = "tokenizer"
    file: str = TOKENIZER_FILE
    max_length: int = Field(ge=2)
    pad_token_id: int = Field(ge=0)
    pad_token: str | None = None
    lowercase: bool | None = None  # informational: the normaliser inside tokenizer.json lowercases
    truncation_side: str = "right"
    # "longest": pad each batch to its longest row; "max_length": always to max_length (towers
    # trained on fixed-length ids, e.g. open_clip's CLIP and SigLIP text towers).
    padding: Literal["longest", "max_length"] = "longest"


class TextTokenizer:
    """Texts -> int64 token ids, truncated to `max_length`, padded to the batch's longest row."""

    def __init__(self, tokenizer: Tokenizer, settings: TokenizerSettings) -> None:
        self.settings = settings
        self.max_length = settings.max_length
        self.pad_token_id = settings.pad_token_id
        tokenizer.no_padding()
        tokenizer.enable_truncation(settings.max_length, direction=settings.truncation_side)
        self._tokenizer = tokenizer

    @classmethod
    def from_dir(cls, directory: Path, settings: TokenizerSettings) -> TextTokenizer:
        path = Path(directory) / settings.file
        if not path.is_file():
            raise UserError(f"tokenizer file missing: {path}")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception on malformed files
            raise UserError(f"cannot read tokenizer {path}: {exc}") from exc
        return cls(tokenizer, settings)

    def encode_rows(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One int64 id array per text, unpadded."""
        if isinstance(texts, str):
            raise UserError("encode_texts expects a list of strings, got a single string")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise UserError(f"text {i} is {type(text).__name__}, expected str")
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def pad(self, rows: Sequence[np.ndarray]) -> np.ndarray:
        """(n, longest) int64 ids (n, max_length with `padding: max_length`), right-padded with the pad id."""
        longest = self.max_length if self.settings.padding == "max_length" else max((len(r) for r in rows), default=0)
        batch = np.full((len(rows), longest), self.pad_token_id, dtype=np.int64)
        for i, row in enumerate(rows):
            batch[i, : len(row)] = row
        return batch

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """(n, longest) int64 ids for a batch."""
        return self.pad(self.encode_rows(texts))
