"""Visual prototypes of concepts: a few relevant yet diverse training images per concept.

For every concept phrase, the top-k images by cosine similarity (Faiss `IndexFlatIP` on
L2-normalised embeddings) are re-ranked with Maximal Marginal Relevance,
    argmax_d  λ·sim(c, d) − (1−λ)·max_{s∈S} sim(d, s),
keeping q of them, so near-duplicate product shots do not crowd out other looks of the concept.
"""
from __future__ import annotations

import numpy as np


def _normalized(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [n, D] array, got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} contains all-zero vectors")
    return x / norms


def select_prototypes(
    concept_embs: np.ndarray,
    image_embs: np.ndarray,
    k: int = 32,
    q: int = 4,
    lam: float = 0.8,
) -> np.ndarray:
    """Indices into `image_embs` of q prototypes per concept: int64 [C, q].

    concept_embs [C, D] (concept phrases through the text tower), image_embs [N, D] (training
    images through the image tower); both are L2-normalised here, so similarity is cosine.
    Rows are in MMR selection order; when N < q the missing slots are -1.
    """
    if k < 1 or q < 1:
        raise ValueError(f"k and q must be >= 1, got k={k}, q={q}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    concepts = _normalized(concept_embs, "concept_embs")
    images = _normalized(image_embs, "image_embs")
    if concepts.shape[1] != images.shape[1]:
        raise ValueError(f"embedding widths differ: concepts {concepts.shape[1]}, images {images.shape[1]}")
    n_concepts, n_images = concepts.shape[0], images.shape[0]
    k = min(max(k, q), n_images)
    q_eff = min(q, k)

    import faiss  # only CVA needs it: a training run without CVA does not load Faiss

    index = faiss.IndexFlatIP(images.shape[1])
    index.add(images)
    relevance, candidates = index.search(concepts, k)  # [C, k], best first
    cand_vecs = images[candidates]  # [C, k, D]
    redundancy = np.einsum("ckd,cjd->ckj", cand_vecs, cand_vecs)  # sim(d, s) among candidates

    chosen = np.full((n_concepts, q), -1, dtype=np.int64)
    taken = np.zeros((n_concepts, k), dtype=bool)
    max_sim_to_selected = np.full((n_concepts, k), -np.inf, dtype=np.float32)
    rows = np.arange(n_concepts)
    for step in range(q_eff):
        penalty = np.where(np.isinf(max_sim_to_selected), 0.0, max_sim_to_selected)  # max over empty S = 0
        score = lam * relevance - (1.0 - lam) * penalty
        score[taken] = -np.inf
        pick = score.argmax(axis=1)
        chosen[:, step] = candidates[rows, pick]
        taken[rows, pick] = True
        max_sim_to_selected = np.maximum(max_sim_to_selected, redundancy[rows, :, pick])
    return chosen
