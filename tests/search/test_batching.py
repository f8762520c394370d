"""search.service.batching: concurrent text queries share encoder calls, each gets its own row."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from search.service.batching import TextBatcher
from tests.support.indexes import FixtureEncoder
from vitrine.errors import UserError
from vitrine.timing import stage

TEXTS = [f"red cotton shirt {i}" for i in range(9)]


class GatedEncoder:
    """The fixture encoder, recording each call's texts; the first call waits for `release` (so the
    other requests queue meanwhile) and any text "bad" fails the call, as a tokenizer error would."""

    def __init__(self) -> None:
        self.encoder = FixtureEncoder()
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if len(self.calls) == 1:
            self.entered.set()
            assert self.release.wait(30)
        if "bad" in texts:
            raise UserError("a text tokenised to no tokens")
        with stage("tokenise"):
            pass
        return self.encoder.encode_texts(texts)


def run_concurrently(batcher: TextBatcher, texts: list[str]) -> tuple[dict[str, object], list[threading.Thread]]:
    results: dict[str, object] = {}

    def one(text: str) -> None:
        try:
            results[text] = batcher.encode(text)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[text] = exc

    threads = [threading.Thread(target=one, args=(t,)) for t in texts]
    for thread in threads:
        thread.start()
    return results, threads


def test_queries_queued_behind_a_running_call_share_the_next_call() -> None:
    gated = GatedEncoder()
    batcher = TextBatcher(gated, max_batch=4, max_concurrent=1)
    results, first = run_concurrently(batcher, TEXTS[:1])
    assert gated.entered.wait(30)  # the first query's call is running: the rest queue
    rest, threads = run_concurrently(batcher, TEXTS[1:])
    while len(batcher._queue) < len(TEXTS) - 1:
        threading.Event().wait(0.001)
    gated.release.set()
    for thread in first + threads:
        thread.join(30)
    results.update(rest)
    assert gated.calls[0] == TEXTS[:1]
    assert [len(c) for c in gated.calls[1:]] == [4, 4]  # 8 queued texts, at most 4 per call
    assert sorted(t for call in gated.calls for t in call) == sorted(TEXTS)  # each text encoded once
    lone = FixtureEncoder().encode_texts(TEXTS)
    for text, row in zip(TEXTS, lone):
        encoded = results[text]
        np.testing.assert_array_equal(encoded.embedding, row)  # its own row, not a neighbour's
        assert encoded.batch_size == (1 if text == TEXTS[0] else 4)
        assert set(encoded.parts) == {"tokenise"}


def test_one_bad_text_fails_only_its_own_request() -> None:
    gated = GatedEncoder()
    batcher = TextBatcher(gated, max_batch=8, max_concurrent=1)
    results, first = run_concurrently(batcher, ["blocker"])
    assert gated.entered.wait(30)
    rest, threads = run_concurrently(batcher, ["green dress", "bad", "blue jeans"])
    while len(batcher._queue) < 3:
        threading.Event().wait(0.001)
    gated.release.set()
    for thread in first + threads:
        thread.join(30)
    assert isinstance(rest["bad"], UserError)
    for text in ("green dress", "blue jeans"):
        np.testing.assert_array_equal(rest[text].embedding, FixtureEncoder().encode_texts([text])[0])
    assert not isinstance(results["blocker"], Exception)


def test_a_lone_query_is_encoded_at_once_and_errors_propagate() -> None:
    calls: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        if texts == ["bad"]:
            raise UserError("no tokens")
        return FixtureEncoder().encode_texts(texts)

    batcher = TextBatcher(encode, max_batch=16, max_concurrent=2)
    assert batcher.encode("red").batch_size == 1 and calls == [["red"]]
    with pytest.raises(UserError):
        batcher.encode("bad")
    assert batcher.encode("blue").batch_size == 1  # a failed call leaves the batcher usable
    with pytest.raises(ValueError):
        TextBatcher(encode, max_batch=0)
