"""Training objectives: image-text contrast (ITC), concept-visual alignment (CVA), token-pruning sparsity,
attribute heads, and shopper queries against the products they name.

The pooled trainer combines them as  L = ½(L_ITC + L_CVA) + λ·L_prune  (λ = 0.1); the cached-token recipe
(`trainer.recipe`) as  L_ITC + w_attr·L_attr + w_query·L_query + w_cva·L_CVA + λ·L_prune.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn

__all__ = [
    "ClipLoss",
    "ConceptVisualAlignmentLoss",
    "attribute_loss",
    "concept_image_embeddings",
    "multi_positive_info_nce",
    "pruning_loss",
    "query_product_loss",
]


def concept_image_embeddings(
    prototypes: Tensor, image_features: Tensor, prototype_mask: Tensor | None = None
) -> Tensor:
    """FashionKLIP Eq. 3: fuse each pair's concept prototypes into one concept image u_i.

    w_ip = max(cos(p, v_i), 0), renormalised to sum 1 over the pair's prototypes, so prototypes
    that look like the input image count most and unrelated (orthogonal or opposite) ones not at
    all. Clamping at zero keeps u_i a convex combination (a point "between" real concept images)
    rather than letting dissimilar prototypes push it away. If every weight is zero the pair falls
    back to the plain mean of its prototypes. The weights are differentiable (not detached).

    prototypes [B, q, D], image_features [B, D], prototype_mask [B, q] (True = real prototype,
    for concepts with fewer than q) -> u [B, D], L2-normalised.
    """
    if prototypes.dim() != 3 or image_features.dim() != 2:
        raise ValueError(
            f"expected prototypes [B, q, D] and image features [B, D], got "
            f"{tuple(prototypes.shape)} and {tuple(image_features.shape)}"
        )
    batch, q, dim = prototypes.shape
    if image_features.shape != (batch, dim):
        raise ValueError(f"image features {tuple(image_features.shape)} do not match prototypes {tuple(prototypes.shape)}")
    if prototype_mask is None:
        prototype_mask = torch.ones(batch, q, dtype=torch.bool, device=prototypes.device)
    elif prototype_mask.shape != (batch, q):
        raise ValueError(f"prototype_mask must be [{batch}, {q}], got {tuple(prototype_mask.shape)}")
    if not bool(prototype_mask.any(dim=1).all()):
        raise ValueError("every pair needs at least one prototype")

    protos = F.normalize(prototypes, dim=-1)
    image = F.normalize(image_features, dim=-1)
    weights = torch.einsum("bqd,bd->bq", protos, image).clamp(min=0) * prototype_mask
    totals = weights.sum(dim=1, keepdim=True)
    uniform = prototype_mask.to(weights.dtype) / prototype_mask.sum(dim=1, keepdim=True)
    weights = torch.where(totals > 0, weights / totals.clamp(min=torch.finfo(weights.dtype).tiny), uniform)
    fused = torch.einsum("bq,bqd->bd", weights, protos)
    return F.normalize(fused, dim=-1)


class ConceptVisualAlignmentLoss(nn.Module):
    """FashionKLIP Eq. 4: symmetric in-batch InfoNCE between concept phrases and concept images.

    Pair i contributes its sampled concept's text embedding t_i^c and its concept image u_i
    (`concept_image_embeddings`). The other pairs' concept images (texts) are the negatives,
    except pairs whose concept is the same one: those would be false negatives and are masked out.
    """

    def forward(
        self,
        concept_text_features: Tensor,
        prototypes: Tensor,
        image_features: Tensor,
        concept_ids: Tensor,
        logit_scale: Tensor,
        prototype_mask: Tensor | None = None,
    ) -> Tensor:
        """concept_text_features [B, D], prototypes [B, q, D], image_features [B, D],
        concept_ids [B] (int), logit_scale: the exp'd scale as VitrineModel.forward returns it."""
        batch = concept_text_features.shape[0]
        if concept_text_features.dim() != 2 or concept_ids.shape != (batch,):
            raise ValueError(
                f"expected concept_text_features [B, D] and concept_ids [B], got "
                f"{tuple(concept_text_features.shape)} and {tuple(concept_ids.shape)}"
            )
        concept_images = concept_image_embeddings(prototypes, image_features, prototype_mask)
        if concept_images.shape != concept_text_features.shape:
            raise ValueError(
                f"concept text {tuple(concept_text_features.shape)} and concept image "
                f"{tuple(concept_images.shape)} embeddings differ in shape"
            )
        text = F.normalize(concept_text_features, dim=-1)
        logits = logit_scale * text @ concept_images.T
        same_concept = concept_ids.unsqueeze(0) == concept_ids.unsqueeze(1)
        duplicates = same_concept & ~torch.eye(batch, dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(duplicates, float("-inf"))
        labels = torch.arange(batch, device=logits.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def pruning_loss(masks: Sequence[Tensor], attention_mask: Tensor) -> Tensor:
    """MML-TP sparsity: L_prune = Σ_l ‖M_l‖₁ / d_l, averaged over the batch.

    masks: one [B, L] soft mask per layer (`VitrineModel.pruning_masks()`); attention_mask [B, L]
    (1 = real token); d_l = number of real tokens of the text. Padding is ignored.
    """
    if len(masks) == 0:
        raise ValueError("no pruning masks (is pruning enabled and has a text forward run?)")
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, L], got {tuple(attention_mask.shape)}")
    real = attention_mask.to(masks[0].dtype)
    lengths = real.sum(dim=1).clamp(min=1)
    total = masks[0].new_zeros(())
    for layer, mask in enumerate(masks):
        if mask.shape != attention_mask.shape:
            raise ValueError(f"mask of layer {layer} is {tuple(mask.shape)}, attention mask {tuple(attention_mask.shape)}")
        total = total + ((mask * real).sum(dim=1) / lengths).mean()
    return total


def multi_positive_info_nce(image: Tensor, text: Tensor, groups: Tensor, logit_scale: Tensor,
                            columns: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:  # fmt: skip
    """Symmetric InfoNCE where every pair in the batch with the same `groups` id is a positive.

    image, text [B, D] L2-normalised; groups [B] int (here: the title's id, so products with an
    identical title are positives of each other, as the evaluation counts them relevant). Each row's
    loss is -log(sum of softmax over its positives); with distinct groups this is open_clip's ClipLoss.

    `columns` (all images, all texts, all groups: the global batch of a data-parallel run, gathered
    with gradient) makes this open_clip's `local_loss`: the rows are this process's pairs, scored
    against every pair of the global batch; the mean over processes of equal-sized shards is then the
    loss of the whole batch, and so is the averaged gradient.
    """
    all_image, all_text, all_groups = columns if columns is not None else (image, text, groups)
    if image.shape != text.shape or groups.shape != image.shape[:1]:
        raise ValueError(f"image {tuple(image.shape)}, text {tuple(text.shape)}, groups {tuple(groups.shape)} do not match")
    if all_image.shape != all_text.shape or all_groups.shape != all_image.shape[:1]:
        raise ValueError(f"columns {tuple(all_image.shape)}, {tuple(all_text.shape)}, {tuple(all_groups.shape)} do not match")
    positive = groups[:, None] == all_groups[None, :]
    i2t = -((logit_scale * image @ all_text.t()).log_softmax(dim=1).masked_fill(~positive, float("-inf")).logsumexp(dim=1))
    t2i = -((logit_scale * text @ all_image.t()).log_softmax(dim=1).masked_fill(~positive, float("-inf")).logsumexp(dim=1))
    return (i2t.mean() + t2i.mean()) / 2


def query_product_loss(queries: Tensor, titles: Tensor, images: Tensor, positive: Tensor, logit_scale: Tensor,
                       reduction: str = "mean") -> Tensor:  # fmt: skip
    """Shopper queries against the batch's products: each query's -log of the softmax mass on the products
    that match every attribute it names, scored once against their titles and once against their photos
    (the two averaged).

    queries [q, D], titles and images [n, D], all L2-normalised; positive [q, n] bool, >= 1 per row.
    reduction "none" gives the [q] per-query losses (a data-parallel run normalises by the global count).
    """
    if titles.shape != images.shape or queries.shape[1:] != titles.shape[1:] or positive.shape != (queries.shape[0], titles.shape[0]):
        raise ValueError(f"queries {tuple(queries.shape)}, titles {tuple(titles.shape)}, images {tuple(images.shape)}, "
                         f"positive {tuple(positive.shape)} do not match")
    if not bool(positive.any(dim=1).all()):
        raise ValueError("every query needs at least one matching product")
    losses = [-((logit_scale * queries @ side.t()).log_softmax(dim=1).masked_fill(~positive, float("-inf")).logsumexp(dim=1))
              for side in (titles, images)]  # fmt: skip
    per_query = (losses[0] + losses[1]) / 2
    return per_query.mean() if reduction == "mean" else per_query


def attribute_loss(logits: dict[str, Tensor], targets: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the attribute heads; target -1 (value missing or too rare) is ignored."""
    losses = [F.cross_entropy(logits[name], targets[name], ignore_index=-1) for name in logits if (targets[name] >= 0).any()]
    if not losses:
        return next(iter(logits.values())).sum() * 0.0
    return torch.stack(losses).mean()
