"""The ONNX text encoder: texts -> L2-normalised embeddings, no fixed-length padding."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from vitrine.errors import UserError
from vitrine.runtime.tokenizer import TextTokenizer
from vitrine.timing import stage


class TextEncoder:
    """Tokenises, pads each chunk to its own longest row and runs the text graph.

    Batches larger than `batch_size` are sorted by token length before chunking,
    so each chunk pads to a similar length; results come back in input order.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        tokenizer: TextTokenizer,
        *,
        embed_dim: int,
        input_name: str = "input_ids",
        output_name: str = "embeddings",
        batch_size: int = 64,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"text batch size must be at least 1, got {batch_size}")
        self.session = session
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.input_name = input_name
        self.output_name = output_name
        self.batch_size = batch_size

    def encode_ids(self, input_ids: np.ndarray) -> np.ndarray:
        """(n, L) int64 ids padded with the pad id -> (n, D) float32 embeddings."""
        assert input_ids.ndim == 2 and input_ids.shape[1] >= 1, input_ids.shape
        (out,) = self.session.run([self.output_name], {self.input_name: input_ids.astype(np.int64, copy=False)})
        assert out.shape == (input_ids.shape[0], self.embed_dim), out.shape
        return out.astype(np.float32, copy=False)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), D) float32 embeddings in input order."""
        with stage("tokenise"):
            rows = self.tokenizer.encode_rows(texts)
        n = len(rows)
        if n == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        if any(len(r) == 0 for r in rows):
            raise UserError("a text tokenised to no tokens (the tokenizer adds no special tokens?)")
        if n <= self.batch_size:
            with stage("tokenise"):
                ids = self.tokenizer.pad(rows)
            return self.encode_ids(ids)
        order = np.argsort([len(r) for r in rows], kind="stable")
        out = np.empty((n, self.embed_dim), dtype=np.float32)
        for start in range(0, n, self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self.encode_ids(self.tokenizer.pad([rows[i] for i in chunk]))
        return out
