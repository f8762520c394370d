"""CVA and token-pruning losses on hand-made inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.loss import ConceptVisualAlignmentLoss, concept_image_embeddings, pruning_loss
from trainer.pruning import PruningGate, initial_thresholds

pytestmark = pytest.mark.torch  # needs the train extra


def unit(*values: float) -> torch.Tensor:
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=-1)


def test_prototype_orthogonal_to_the_image_gets_no_weight():
    image = unit(1, 0, 0).unsqueeze(0)
    aligned, orthogonal = unit(1, 1, 0), unit(0, 0, 1)
    fused = concept_image_embeddings(torch.stack([aligned, orthogonal]).unsqueeze(0), image)
    assert torch.allclose(fused[0], aligned, atol=1e-6)


def test_weights_follow_similarity_to_the_image():
    image = unit(1, 0).unsqueeze(0)
    near, far = unit(1, 0.2), unit(0.2, 1)
    fused = concept_image_embeddings(torch.stack([near, far]).unsqueeze(0), image)[0]
    w_near, w_far = F.cosine_similarity(near, image[0], dim=0), F.cosine_similarity(far, image[0], dim=0)
    expected = F.normalize((w_near * near + w_far * far) / (w_near + w_far), dim=0)
    assert torch.allclose(fused, expected, atol=1e-6)
    assert fused @ near > fused @ far


def test_all_dissimilar_prototypes_fall_back_to_their_mean_and_masked_ones_are_skipped():
    image = unit(1, 0, 0).unsqueeze(0)
    protos = torch.stack([unit(-1, 1, 0), unit(-1, 0, 1), unit(1, 0, 0)]).unsqueeze(0)
    mask = torch.tensor([[True, True, False]])
    fused = concept_image_embeddings(protos, image, mask)[0]
    assert torch.allclose(fused, F.normalize(protos[0, 0] + protos[0, 1], dim=0), atol=1e-6)
    with pytest.raises(ValueError, match="at least one prototype"):
        concept_image_embeddings(protos, image, torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError):
        concept_image_embeddings(protos, torch.randn(2, 3))


def _cva_inputs(seed: int = 0, batch: int = 4, q: int = 3, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(batch, dim, generator=g), dim=-1),
        F.normalize(torch.randn(batch, q, dim, generator=g), dim=-1),
        F.normalize(torch.randn(batch, dim, generator=g), dim=-1),
    )


def test_cva_matches_a_hand_computed_symmetric_infonce():
    texts, protos, images = _cva_inputs()
    scale = torch.tensor(10.0)
    loss = ConceptVisualAlignmentLoss()(texts, protos, images, torch.arange(4), scale)
    u = concept_image_embeddings(protos, images)
    logits = scale * texts @ u.T
    row = -torch.log_softmax(logits, dim=1).diagonal().mean()
    col = -torch.log_softmax(logits, dim=0).diagonal().mean()
    assert loss.item() == pytest.approx(0.5 * (row + col).item(), rel=1e-5)


def test_cva_is_symmetric_in_concept_texts_and_concept_images():
    texts, _, _ = _cva_inputs()
    other = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(3)), dim=-1)
    ids, scale, loss = torch.arange(4), torch.tensor(5.0), ConceptVisualAlignmentLoss()
    # With one prototype equal to the image, the concept image u is that vector: swapping roles
    # (texts <-> concept images) transposes the logits and must leave the symmetric loss unchanged.
    forward = loss(texts, other.unsqueeze(1), other, ids, scale)
    swapped = loss(other, texts.unsqueeze(1), texts, ids, scale)
    assert forward.item() == pytest.approx(swapped.item(), rel=1e-6)
    # A perfect alignment beats a shuffled one.
    aligned = loss(texts, texts.unsqueeze(1), texts, ids, scale)
    shuffled = loss(texts, texts.roll(1, 0).unsqueeze(1), texts.roll(1, 0), ids, scale)
    assert aligned < shuffled


def test_pairs_sharing_a_concept_are_not_negatives():
    texts, protos, images = _cva_inputs(batch=3)
    # Pairs 0 and 1 carry the same concept: identical phrase embedding.
    texts = texts.clone()
    texts[1] = texts[0]
    scale = torch.tensor(10.0)
    loss_fn = ConceptVisualAlignmentLoss()
    masked = loss_fn(texts, protos, images, torch.tensor([7, 7, 2]), scale)
    u = concept_image_embeddings(protos, images)
    logits = scale * texts @ u.T
    logits[0, 1] = logits[1, 0] = -math.inf
    expected = 0.5 * (
        F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.T, torch.arange(3))
    )
    assert masked.item() == pytest.approx(expected.item(), rel=1e-5)
    unmasked = loss_fn(texts, protos, images, torch.tensor([7, 8, 2]), scale)
    assert unmasked > masked  # the duplicate no longer counts as a (false) negative
    with pytest.raises(ValueError):
        loss_fn(texts, protos, images, torch.tensor([0, 1]), scale)


def test_cva_gradients_reach_text_prototypes_and_images():
    texts, protos, images = (t.clone().requires_grad_(True) for t in _cva_inputs())
    ConceptVisualAlignmentLoss()(texts, protos, images, torch.arange(4), torch.tensor(10.0)).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (texts, protos, images))


def test_pruning_loss_value_on_known_masks():
    attention = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    layer1 = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.5, 0.9, 0.9]])  # padding values are ignored
    layer2 = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # layer1: (2/4 + 1.5/2) / 2 = 0.625; layer2: (1/4 + 2/2) / 2 = 0.625
    assert pruning_loss([layer1, layer2], attention).item() == pytest.approx(1.25)
    with pytest.raises(ValueError):
        pruning_loss([], attention)
    with pytest.raises(ValueError):
        pruning_loss([layer1[:, :3]], attention)


def test_pruning_loss_gradient_raises_the_threshold():
    gate = PruningGate(threshold=0.1, temperature=1e-2)
    probs = torch.zeros(1, 2, 4, 4)
    probs[..., 0] = torch.tensor([0.5, 0.12, 0.09, 0.1])  # tokens near the threshold: soft masks
    _, mask = gate(torch.ones(1, 4, 3), probs)
    loss = pruning_loss([mask], torch.ones(1, 4, dtype=torch.long))
    loss.backward()
    assert gate.threshold.grad < 0  # gradient descent increases tau, pruning more tokens
    before = gate.threshold.item()
    with torch.no_grad():
        gate.threshold -= 0.01 * gate.threshold.grad
    assert gate.threshold.item() > before


def test_gate_mask_formula_and_cls_kept():
    gate = PruningGate(threshold=0.2, temperature=0.05)
    probs = torch.zeros(2, 2, 3, 3)  # [B, heads, L, L]
    probs[:, 0, :, 0] = torch.tensor([0.0, 0.3, 0.2])
    probs[:, 1, :, 0] = torch.tensor([0.0, 0.1, 0.0])  # head mean: [0, 0.2, 0.1]
    hidden = torch.ones(2, 3, 4)
    gated, mask = gate(hidden, probs)
    expected = torch.tensor([1.0, 0.5, torch.sigmoid(torch.tensor(-2.0)).item()])
    assert torch.allclose(mask, expected.expand(2, 3), atol=1e-6)
    assert torch.allclose(gated, hidden * mask.unsqueeze(-1))
    with pytest.raises(ValueError):
        PruningGate(0.1, temperature=0.0)


def test_initial_thresholds_rise_linearly_to_the_final_value():
    t = initial_thresholds(6)
    assert t[-1].item() == pytest.approx(0.01)
    assert torch.allclose(t.diff(), torch.full((5,), 0.01 / 6))


def test_gate_is_a_hard_step_at_inference():
    gate = PruningGate(threshold=0.3)
    probs = torch.zeros(1, 2, 4, 4)
    probs[0, :, :, 0] = torch.tensor([0.9, 0.31, 0.29999, 0.1])  # attention to [CLS] per token
    gate.train()
    soft = gate.token_mask(probs)
    gate.eval()
    hard = gate.token_mask(probs)
    assert hard.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert torch.all((soft > 0.5) == (hard > 0.5))
