"""Micro-batching of text queries: concurrent cache misses share one encoder call.

No timer and no worker thread: a request that finds fewer than `max_concurrent` encoder calls
running takes everything queued (up to `max_batch`, its own text included) and encodes it as one
batch in its own thread; the others wait for their embedding. A lone query is encoded at once (one
client pays no delay), and under load the queue that builds up during one call becomes the next
call's batch, so the per-call overhead and the small-matrix inefficiency are paid once per batch.

Each row's embedding does not depend on what it is batched with (the text graph masks the padding;
tests/search/test_batching.py checks it against lone encodes). One bad text never fails the
others: a failed batch is retried one text at a time, and only the bad one gets the error.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from vitrine.timing import recording


@dataclass
class _Pending:
    text: str
    embedding: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    batch_size: int = 0
    parts: dict[str, float] = field(default_factory=dict)  # sub-stage ms of the call that encoded it (tokenise, ...)


@dataclass(frozen=True)
class Encoded:
    embedding: np.ndarray  # float32 (D,)
    batch_size: int  # texts in the encoder call that produced it
    parts: dict[str, float]  # that call's sub-stage timings in ms (e.g. tokenise)


class TextBatcher:
    """`encode(text)` for many threads at once; see the module docstring."""

    def __init__(self, encode_texts: Callable[[list[str]], np.ndarray], *, max_batch: int = 16, max_concurrent: int = 2) -> None:
        if max_batch < 1 or max_concurrent < 1:
            raise ValueError(f"max_batch and max_concurrent must be at least 1, got {max_batch}, {max_concurrent}")
        self._encode_texts = encode_texts
        self.max_batch = max_batch
        self.max_concurrent = max_concurrent
        self._queue: deque[_Pending] = deque()
        self._running = 0
        self._cond = threading.Condition()

    def encode(self, text: str) -> Encoded:
        item = _Pending(text)
        with self._cond:
            self._queue.append(item)
            while not item.done:
                if self._running < self.max_concurrent and self._queue:
                    batch = [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]
                    self._running += 1
                    self._cond.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cond.acquire()
                        self._running -= 1
                        self._cond.notify_all()
                else:
                    self._cond.wait()
        if item.error is not None:
            raise item.error
        assert item.embedding is not None
        return Encoded(item.embedding, item.batch_size, item.parts)

    def _run(self, batch: list[_Pending]) -> None:
        """Encode `batch` and mark every item done (with its embedding or its own error)."""
        try:
            try:
                embeddings, parts = self._call([p.text for p in batch])
                for i, pending in enumerate(batch):
                    pending.embedding, pending.batch_size, pending.parts = embeddings[i], len(batch), parts
            except Exception:
                if len(batch) == 1:
                    raise
                for pending in batch:  # find the text that failed; the rest still get answers
                    try:
                        embeddings, parts = self._call([pending.text])
                        pending.embedding, pending.batch_size, pending.parts = embeddings[0], 1, parts
                    except Exception as exc:  # noqa: BLE001 - handed to the request that sent this text
                        pending.error = exc
        except Exception as exc:  # noqa: BLE001 - a lone text's failure belongs to its request
            batch[0].error = exc
        finally:
            for pending in batch:
                if pending.embedding is None and pending.error is None:  # interrupted mid-call
                    pending.error = RuntimeError("the text encoder call was interrupted")
                pending.done = True

    def _call(self, texts: list[str]) -> tuple[np.ndarray, dict[str, float]]:
        parts: dict[str, float] = {}
        with recording(parts):
            embeddings = self._encode_texts(texts)
        assert embeddings.shape[0] == len(texts), (embeddings.shape, len(texts))
        return embeddings, parts
