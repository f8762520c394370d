"""FashionKLIP concept-visual alignment (CVA) for the cached-token recipe.

Each training title has concepts a photo can show (`trainer.concepts`); each concept has q visual
prototypes, training photos picked with the *current* model (top-k by cosine, MMR to q) at the start
of every epoch. A batch pairs each photo with one of its title's concepts and contrasts the concept
phrase's text embedding with the photo-weighted fusion of the concept's prototypes
(`loss.ConceptVisualAlignmentLoss`, FashionKLIP Eq. 3-4).

Prototype embeddings are taken at the refresh, without gradient: encoding q prototypes per pair with
gradient would quadruple the image work of a step on two cores, and the refresh keeps them at most one
epoch old. The gradient reaches the text side (concept phrases) and the batch photos (the fusion
weights), which is what ties concepts to looks.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.concepts import CONCEPT_PROMPT, ConceptGraph, visual_concepts
from trainer.loss import ConceptVisualAlignmentLoss
from trainer.prototypes import select_prototypes
from vitrine.catalog.product import Product


class ConceptAlignment:
    """The concept graph of the training products, their prototypes, and the CVA loss of a batch."""

    def __init__(self, products: Sequence[Product], *, min_count: int = 5, topk: int = 32, prototypes: int = 4,
                 mmr_lambda: float = 0.8) -> None:  # fmt: skip
        self.graph = ConceptGraph.build(products, min_count=min_count)
        self.concepts_of_product = visual_concepts(self.graph)
        self.prompts = [CONCEPT_PROMPT.format(c) for c in self.graph.concepts]
        self.topk, self.q, self.mmr_lambda = topk, prototypes, mmr_lambda
        self.loss_fn = ConceptVisualAlignmentLoss()
        self.prototype_ids: np.ndarray | None = None  # [C, q] rows of the training photos, -1 = none
        self.prototype_embs: Tensor | None = None  # [C, q, D], L2-normalised, no grad

    def refresh(self, concept_embs: Tensor, image_embs: Tensor) -> None:
        """Re-pick prototypes from the current model's concept [C, D] and training-photo [N, D] embeddings."""
        assert concept_embs.shape[0] == len(self.prompts) and image_embs.dim() == 2
        ids = select_prototypes(concept_embs.float().cpu().numpy(), image_embs.float().cpu().numpy(),
                                k=self.topk, q=self.q, lam=self.mmr_lambda)  # fmt: skip
        self.prototype_ids = ids
        self.prototype_embs = image_embs.detach()[torch.from_numpy(ids).clamp(min=0)].to(image_embs.device)

    def loss(self, rows: np.ndarray, image: Tensor, encode_prompts: Callable[[list[int]], Tensor],
             logit_scale: Tensor, rng: np.random.Generator) -> Tensor:  # fmt: skip
        """CVA of a batch: `rows` are training-product indices, `image` their photo embeddings [B, D];
        `encode_prompts(concept_ids)` embeds concept phrases (with gradient)."""
        if self.prototype_ids is None or self.prototype_embs is None:
            raise RuntimeError("refresh() the prototypes before the first CVA step")
        assert image.shape[0] == len(rows)
        picked = [int(rng.choice(self.concepts_of_product[r])) if self.concepts_of_product[r] else -1 for r in rows]
        keep = np.array([c >= 0 for c in picked])
        if keep.sum() < 2:
            return image.new_zeros(())
        concepts = np.array([c for c in picked if c >= 0])
        unique, inverse = np.unique(concepts, return_inverse=True)
        text = encode_prompts(unique.tolist())[torch.from_numpy(inverse).to(image.device)]
        ids = torch.from_numpy(concepts).to(image.device)
        return self.loss_fn(
            concept_text_features=text,
            prototypes=self.prototype_embs[ids],
            image_features=image[torch.from_numpy(keep).to(image.device)],
            concept_ids=ids,
            logit_scale=logit_scale,
            prototype_mask=torch.from_numpy(self.prototype_ids[concepts] >= 0).to(image.device),
        )

    def stats(self) -> dict:
        covered = sum(bool(c) for c in self.concepts_of_product)
        return {**self.graph.stats(), "products_with_visual_concepts": covered}
