"""MML-TP learned token pruning gates for the text tower.

Each transformer layer gets a soft mask over its tokens,
    s_i = mean over heads of the attention from token i to [CLS] (key 0),
    M_i = sigmoid((s_i - tau_l) / T),
with a learnable threshold tau_l per layer and a fixed temperature T. The hidden state of
every token is multiplied by its mask right after the layer's attention block; [CLS] is
never pruned. Padding is not special-cased here: padded positions are excluded by the
attention mask in later layers, by mean pooling, and by `loss.pruning_loss`.

The gates are plain tensor ops (mean, sub, div, sigmoid, mul, concat) so they export to ONNX.
They are installed as forward hooks on the HF attention modules, which keeps the HF state
dict names untouched (pretrained weights and checkpoints load as usual).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

DEFAULT_TEMPERATURE = 1e-4
DEFAULT_FINAL_THRESHOLD = 0.01


def token_importance(attention_probs: Tensor) -> Tensor:
    """[B, heads, L, L] attention probabilities -> [B, L]: how much each token attends to [CLS], mean over heads."""
    return attention_probs[:, :, :, 0].float().mean(dim=1)


def initial_thresholds(num_layers: int, final_threshold: float = DEFAULT_FINAL_THRESHOLD) -> Tensor:
    """Linearly rising thresholds: final/L for the first layer up to `final` for the last.

    Later layers can afford to prune more, as in LTP/MML-TP.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    return torch.arange(1, num_layers + 1, dtype=torch.float32) * (final_threshold / num_layers)


class PruningGate(nn.Module):
    """The soft token mask of one layer, with its learnable threshold."""

    def __init__(self, threshold: float, temperature: float = DEFAULT_TEMPERATURE):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))
        self.temperature = float(temperature)
        self.enabled = False
        # Mask and token importance of the last forward, [B, L]; read by the trainer (L_prune, calibration).
        self.last_mask: Tensor | None = None
        self.last_importance: Tensor | None = None

    def token_mask(self, attention_probs: Tensor) -> Tensor:
        """[B, heads, L, L] attention probabilities -> [B, L] soft mask (1 keeps a token)."""
        if attention_probs.dim() != 4:
            raise ValueError(f"attention probabilities must be [B, heads, L, L], got {tuple(attention_probs.shape)}")
        # float32: with T = 1e-4, half-precision scores would quantise the gate to 0/1 steps.
        importance = token_importance(attention_probs)
        if not _is_tracing():
            self.last_importance = importance.detach()
        if self.training:
            mask = torch.sigmoid((importance - self.threshold.float()) / self.temperature)
        else:
            # At T = 1e-4 the soft gate is a step whose value float rounding can flip near τ
            # (ONNX vs torch differ by 1e-3); inference uses the step itself.
            mask = (importance > self.threshold.float()).to(importance.dtype)
        # [CLS] carries the pooled meaning for some towers and anchors the score: always kept.
        return torch.cat([torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)

    def forward(self, hidden_states: Tensor, attention_probs: Tensor) -> tuple[Tensor, Tensor]:
        mask = self.token_mask(attention_probs).to(hidden_states.dtype)
        return hidden_states * mask.unsqueeze(-1), mask

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, enabled={self.enabled}"


def _attention_modules(transformer: nn.Module) -> list[nn.Module]:
    """The self-attention block (attention + output LayerNorm) of each encoder layer of a BERT-like HF model."""
    encoder = getattr(transformer, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not all(hasattr(layer, "attention") for layer in layers):
        raise ValueError(
            f"token pruning needs a BERT-like text tower (encoder.layer[i].attention); got {type(transformer).__name__}"
        )
    return [layer.attention for layer in layers]


def attach_pruning_gates(
    transformer: nn.Module,
    temperature: float = DEFAULT_TEMPERATURE,
    final_threshold: float = DEFAULT_FINAL_THRESHOLD,
) -> nn.ModuleList:
    """Create one gate per layer and hook it after that layer's attention block.

    Switches the model to eager attention, the implementation that returns probabilities.
    Returns the gates (disabled); register them on the owning module so tau is trained and saved.
    """
    attention_blocks = _attention_modules(transformer)
    if hasattr(transformer, "set_attn_implementation"):
        transformer.set_attn_implementation("eager")
    else:
        transformer.config._attn_implementation = "eager"
    thresholds = initial_thresholds(len(attention_blocks), final_threshold)
    gates = nn.ModuleList(PruningGate(float(t), temperature) for t in thresholds)
    for block, gate in zip(attention_blocks, gates):
        block.register_forward_hook(_make_hook(gate))
    return gates


def _is_tracing() -> bool:
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()


def _make_hook(gate: PruningGate):
    def hook(module: nn.Module, args, output):
        if not gate.enabled:
            return None
        hidden_states, attention_probs = output[0], output[1]
        if attention_probs is None:
            raise RuntimeError("token pruning needs attention probabilities: use attn_implementation='eager'")
        gated, mask = gate(hidden_states, attention_probs)
        if not _is_tracing():  # stashing tensors on modules would leak tracer values out of ONNX export
            gate.last_mask = mask
        return (gated, attention_probs, *output[2:])

    return hook


@torch.no_grad()
def calibrate_thresholds(gates: Sequence[PruningGate], forward: Callable[[], None], real: Tensor,
                         quantile: float) -> list[float]:  # fmt: skip
    """Set each gate's τ inside its own importance distribution: the `quantile` of the importance of the
    real, non-[CLS] tokens of a sample (`forward()` runs it through the layers; `real` is its [B, L] mask).

    Layer by layer, so each τ sees the tokens the gates below it already pruned. A fixed small τ (the
    paper's linear ramp from 0.01) sits below nearly every token's importance here, and the gate never
    closes; a quantile starts it where it prunes about that share.
    """
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    candidates = real.bool().clone()
    candidates[:, 0] = False  # [CLS] is never pruned
    for gate in gates:
        gate.threshold.fill_(-1.0)  # importance >= 0: keeps every token until calibrated
    taus = []
    for gate in gates:
        forward()
        if gate.last_importance is None:
            raise RuntimeError("the calibration forward did not run this gate (is it enabled?)")
        values = gate.last_importance[candidates[:, : gate.last_importance.shape[1]]]
        tau = float(torch.quantile(values, quantile)) if values.numel() else -1.0
        gate.threshold.fill_(tau)
        taus.append(tau)
    return taus


def pruned_token_report(token_ids: Tensor, real: Tensor, masks: Sequence[Tensor], decode: Callable[[int], str],
                        *, top: int = 30, min_count: int = 20) -> dict:  # fmt: skip
    """What hard gates pruned on a set of texts: per layer, the share of real non-[CLS] tokens whose mask is 0
    there (and at or below it), and the `top` word pieces pruned most often (share of their occurrences,
    among pieces seen at least `min_count` times)."""
    if token_ids.shape != real.shape or any(m.shape != real.shape for m in masks):
        raise ValueError("token_ids, real and every mask must have the same [N, L] shape")
    counted = real.bool().clone()
    counted[:, 0] = False
    pruned_any = torch.zeros_like(counted)
    layers = []
    for mask in masks:
        here = (mask < 0.5) & counted
        pruned_any |= here
        total = max(1, int(counted.sum()))
        layers.append({"pruned_share": int(here.sum()) / total, "pruned_so_far": int(pruned_any.sum()) / total})
    ids, hits = token_ids[counted], pruned_any[counted]
    seen = torch.bincount(ids)
    pruned = torch.bincount(ids[hits], minlength=seen.numel())
    frequent = (seen >= min_count).nonzero().flatten()
    rate = pruned[frequent].float() / seen[frequent].float()
    order = sorted(range(frequent.numel()), key=lambda i: (-float(rate[i]), -int(seen[frequent[i]])))[:top]
    words = [{"token": decode(int(frequent[i])), "pruned": int(pruned[frequent[i]]), "seen": int(seen[frequent[i]]),
              "share": float(rate[i])} for i in order]  # fmt: skip
    return {"layers": layers, "tokens": int(counted.sum()), "most_pruned": words}
