"""Masking for pretraining: whole-word MLM (KG-MLIM puts attribute words first) and MPM patch zeroing."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MLM_RATIO = 0.15
MPM_RATIO = 0.10
IGNORE_INDEX = -100


def choose_mask_words(
    num_words: int,
    rng: np.random.Generator,
    *,
    ratio: float = MLM_RATIO,
    priority_words: Sequence[int] = (),
) -> list[int]:
    """Which whole words to mask: `ratio` of the words (at least one), taking `priority_words`
    (KG-MLIM: the attribute words) first, then random other words up to the budget."""
    if num_words <= 0:
        return []
    budget = max(1, int(round(ratio * num_words)))
    priority = [w for w in dict.fromkeys(priority_words) if 0 <= w < num_words]
    rng.shuffle(priority)
    chosen = priority[:budget]
    rest = [w for w in range(num_words) if w not in set(chosen)]
    extra = budget - len(chosen)
    if extra > 0 and rest:
        chosen += [int(w) for w in rng.choice(rest, size=min(extra, len(rest)), replace=False)]
    return sorted(chosen)


def mask_words(
    input_ids: np.ndarray,
    word_ids: np.ndarray,
    words: Sequence[int],
    rng: np.random.Generator,
    *,
    mask_id: int,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Whole-word masking: every piece of each chosen word is a target. BERT's 80/10/10 rule is drawn
    per word, so a word is replaced entirely ([MASK] or random pieces) or kept entirely.
    Returns (masked ids, labels with IGNORE_INDEX off target)."""
    assert input_ids.shape == word_ids.shape and input_ids.ndim == 1
    ids = input_ids.copy()
    labels = np.full_like(input_ids, IGNORE_INDEX)
    for w in words:
        pos = np.flatnonzero(word_ids == w)
        if pos.size == 0:
            continue
        labels[pos] = input_ids[pos]
        draw = rng.random()
        if draw < 0.8:
            ids[pos] = mask_id
        elif draw < 0.9:
            ids[pos] = rng.integers(1000, vocab_size, size=pos.size)  # skip [unused]/special ids
    return ids, labels


def mask_patches(num_patches: int, rng: np.random.Generator, ratio: float = MPM_RATIO) -> np.ndarray:
    """MPM: a bool [P] marking at least one patch to zero out and reconstruct."""
    count = max(1, int(round(ratio * num_patches)))
    mask = np.zeros(num_patches, bool)
    mask[rng.choice(num_patches, size=count, replace=False)] = True
    return mask


__all__ = ["IGNORE_INDEX", "MLM_RATIO", "MPM_RATIO", "choose_mask_words", "mask_patches", "mask_words"]
