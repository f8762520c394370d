"""The reranker's three training stages, each a run directory with `model.pt`, `log.jsonl`, `summary.json`:

  pretrain  FashionBERT MLM + MPM + TIA on catalog (title, image) pairs, Eq. 6 adaptive weights;
            KG-MLIM / KG-ITM when `knowledge` is on
  finetune  listwise reranking on (query, title, image) groups with the dual encoder's hard negatives,
            plus KG-ITM swapped queries as negatives of the positive (when `knowledge` is on)
  distill   a student with the teacher's first `student_layers` layers, fit to the teacher's logits
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from trainer.cross_encoder.data import Batch, DualEmbeddings, PretrainSampler, RerankGroup, rows_for_groups
from trainer.cross_encoder.factory import create_cross_encoder, get_cross_encoder_config, load_cross_encoder, save_cross_encoder
from trainer.cross_encoder.knowledge import AttributeSchema
from trainer.cross_encoder.loss import AdaptiveLoss, distillation_loss, listwise_rerank_loss, masked_patch_kl
from trainer.cross_encoder.masking import IGNORE_INDEX
from trainer.cross_encoder.model import CrossEncoder
from trainer.recipe import autocast_dtype
from vitrine.catalog.product import Product
from vitrine.runtime.patch_grid import pool_patches

log = logging.getLogger(__name__)
STAGES = ("pretrain", "finetune", "distill")


@dataclass
class RerankerTrainConfig:
    stage: str
    out_dir: str
    model: str = "minilm-l6"  # registry name, for pretraining from the backbone
    init: str | None = None  # checkpoint to start from (finetune: the pretrained model; distill: the teacher)
    pretrained_backbone: bool = True
    knowledge: bool = True
    steps: int = 300
    batch_size: int = 24  # pretraining TIA rows per step (plus a masked copy of each matched one)
    groups_per_step: int = 4  # reranking groups per step (each 1 + negatives rows, plus a KG-ITM row)
    negatives: int = 7
    negative_pool: int = 20  # the dual encoder's top 20: what the service reranks
    title_drop: float = 0.5
    student_layers: int = 2
    hidden_distill: float = 0.0  # distill: weight of TinyBERT's hidden-state MSE (student layer m <- teacher layer m * N / M)
    lr: float = 5e-5
    new_params_lr: float = 5e-4  # patch embedding, segments and heads start from scratch
    prior_init: float | None = 20.0  # finetune: the first-stage score's weight to start from (None: keep the checkpoint's)
    prior_lr: float = 0.05  # the weight is one scalar of order 10: it needs its own, larger rate
    head_lr: float | None = None  # finetune: the [CLS] match head's rate (None: new_params_lr, as a fresh part)
    residual_head: bool = False  # finetune: zero the match head's output layer, so training starts at the first stage's ranking
    protocol_groups: bool = False  # finetune/distill: groups drawn as the protocols are (mining.PROTOCOL_KINDS)
    amp: str = "cuda"  # bf16 autocast of the forward, as the dual encoder's recipe: auto, cuda (here: never, CPU only), bf16, off
    warmup: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    threads: int | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage in ("finetune", "distill") and not self.init:
            raise ValueError(f"stage {self.stage} needs init= (a pretrained / teacher checkpoint)")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


NEW_PARAM_PREFIXES = ("patch_embedding.", "segment_embeddings.", "match_head.", "mlm_", "mpm_head.", "aligned_embedding.")
# Scalars of order 10 that need the larger rate: the first-stage prior and the similarity head's weights.
PRIOR_PARAM_PREFIXES = ("prior_weight", "similarity_head.")


def _optimizer(model: CrossEncoder, cfg: RerankerTrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    fresh = cfg.stage != "distill"  # after a short pretraining the new parts still need the larger rate
    own_head = cfg.head_lr is not None and cfg.stage == "finetune"
    groups: dict[str, list] = {"backbone": [], "new": [], "prior": [], "head": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(PRIOR_PARAM_PREFIXES):
            groups["prior"].append(p)
        elif own_head and name.startswith("match_head."):
            groups["head"].append(p)
        else:
            groups["new" if fresh and name.startswith(NEW_PARAM_PREFIXES) else "backbone"].append(p)
    param_groups = [{"params": groups["backbone"], "lr": cfg.lr}, {"params": groups["new"], "lr": cfg.new_params_lr},
                    {"params": groups["prior"], "lr": cfg.prior_lr, "weight_decay": 0.0}]
    if own_head:
        param_groups.append({"params": groups["head"], "lr": cfg.head_lr})
    opt = torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, max(1, int(cfg.warmup * cfg.steps)), cfg.steps)


def pretrain_losses(model: CrossEncoder, batch: Batch) -> dict[str, torch.Tensor]:
    hidden = model(**batch.inputs())
    t, p = batch.input_ids.shape[1], batch.patches.shape[1]
    tia = batch.extra.get("tia_rows", hidden.shape[0])
    aligned = None if batch.aligned is None else batch.aligned[:tia]
    losses = {"tia": F.binary_cross_entropy_with_logits(model.match_logits(hidden[:tia], aligned), batch.match[:tia])}
    target = batch.mlm_labels != IGNORE_INDEX
    if bool(target.any()):
        logits = model.mlm_logits(hidden[:, :t][target])
        losses["mlm"] = F.cross_entropy(logits, batch.mlm_labels[target])
    pmask = batch.patch_mask
    if pmask is not None and bool(pmask.any()):
        losses["mpm"] = masked_patch_kl(model.mpm_logits(hidden[:, t : t + p][pmask]), batch.patch_targets[pmask])
    return losses


def group_scores(model: CrossEncoder, batch: Batch, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([G, width] group scores, [S] scores of the KG-ITM swap rows): match logits plus the weighted
    first-stage scores when the batch carries them."""
    logits = model.with_prior(model.score(**batch.inputs()), batch.extra.get("first_stage"))
    g = batch.extra["groups"]
    return logits[: g * width].view(g, width), logits[g * width :]


def distill_losses(
    student: CrossEncoder, teacher: CrossEncoder, batch: Batch, width: int, hidden_weight: float = 0.0
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The student fit to the teacher on the same rows: its group scores (MSE + softened KL) and swap
    rows' scores, plus, with `hidden_weight`, TinyBERT's layer-mapped hidden-state MSE. Returns the
    losses and the student's group scores."""
    feeds, prior = batch.inputs(), batch.extra.get("first_stage")
    s_layers: list[torch.Tensor] = []
    with torch.no_grad():
        t_layers: list[torch.Tensor] = []
        t_hidden = teacher(**feeds, layers=t_layers)
        t_all = teacher.with_prior(teacher.match_logits(t_hidden, batch.aligned), prior)
    s_hidden = student(**feeds, layers=s_layers)
    s_all = student.with_prior(student.match_logits(s_hidden, batch.aligned), prior)
    g = batch.extra["groups"]
    logits, t_logits = s_all[: g * width].view(g, width), t_all[: g * width].view(g, width)
    losses = {"distill": distillation_loss(logits, t_logits)}
    if s_all.numel() > g * width:
        losses["distill_swaps"] = F.mse_loss(s_all[g * width :], t_all[g * width :])
    if hidden_weight > 0:
        step = len(t_layers) // len(s_layers)
        mask = torch.cat([batch.attention_mask.to(s_hidden.dtype), s_hidden.new_ones(s_hidden.shape[0], s_hidden.shape[1] - batch.attention_mask.shape[1])], 1)
        per_layer = [(((s - t_layers[(m + 1) * step - 1]) ** 2).mean(-1) * mask).sum() / mask.sum() for m, s in enumerate(s_layers)]
        losses["hidden"] = hidden_weight * torch.stack(per_layer).mean()
    return losses, logits


def rerank_loss(groups_logits: torch.Tensor, swap_logits: torch.Tensor, swap_positive_logits: torch.Tensor) -> dict[str, torch.Tensor]:
    losses = {"listwise": listwise_rerank_loss(groups_logits)}
    if swap_logits.numel():
        # The positive must outscore its attribute-swapped query: a pairwise logistic loss.
        losses["kg_itm"] = F.softplus(swap_logits - swap_positive_logits).mean()
    return losses


def _swap_positive_logits(groups_logits: torch.Tensor, groups: Sequence[RerankGroup]) -> torch.Tensor:
    keep = torch.tensor([g.swapped_query is not None for g in groups])
    return groups_logits[keep, 0]


class RerankerTrainer:
    def __init__(
        self,
        cfg: RerankerTrainConfig,
        products: Sequence[Product],
        patches: np.ndarray,
        *,
        groups: Sequence[RerankGroup] | None = None,
        schema: AttributeSchema | None = None,
        dual: DualEmbeddings | None = None,
        hard: tuple[np.ndarray, np.ndarray] | None = None,
        source_grid: tuple[int, int] | None = None,
        project_patches_with: nn.Module | None = None,  # pretrain: patches through this dual encoder's frozen image head
        progress: bool = True,
    ) -> None:
        self.cfg, self.products, self.patches, self.progress = cfg, list(products), patches, progress
        self.dual, self.hard = dual, hard
        self.schema = schema or AttributeSchema.from_products(self.products)
        self.groups = list(groups or [])
        if cfg.stage != "pretrain":
            needed = cfg.steps * cfg.groups_per_step
            if len(self.groups) < needed:
                raise ValueError(f"{cfg.stage} needs {needed} groups ({cfg.steps} steps x {cfg.groups_per_step}), got {len(self.groups)}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.teacher: CrossEncoder | None = None
        if cfg.stage == "pretrain":
            # an aligned config reads embeddings of the dual encoder's size, whatever its JSON says
            aligned_dim = int(dual.titles.shape[1]) if dual is not None and get_cross_encoder_config(cfg.model).aligned_dim else None
            self.model, self.encoder = create_cross_encoder(cfg.model, pretrained=cfg.pretrained_backbone, aligned_dim=aligned_dim,
                                                            project_patches_with=project_patches_with)
        else:
            if project_patches_with is not None:
                raise ValueError("project_patches_with builds a new cross-encoder: it belongs to the pretrain stage")
            model, self.encoder, _ = load_cross_encoder(cfg.init)
            if cfg.stage == "distill":
                self.teacher = model.eval()
                for p in self.teacher.parameters():
                    p.requires_grad_(False)
                self.model = model.truncated(cfg.student_layers)
                for p in self.model.parameters():
                    p.requires_grad_(True)
                if self.model.patch_projection is not None:  # the dual encoder's head stays as trained
                    self.model.patch_projection.requires_grad_(False)
            else:
                self.model = model
                with torch.no_grad():
                    if cfg.prior_init is not None:
                        model.prior_weight.fill_(cfg.prior_init)
                    if cfg.residual_head:  # the [CLS] term starts at 0: a correction learned from the first stage's order
                        nn.init.zeros_(model.match_head[-1].weight)
                        nn.init.zeros_(model.match_head[-1].bias)
        if self.model.aligned and self.dual is None:
            raise ValueError("an aligned cross-encoder trains on the dual encoder's embeddings: pass dual=")
        if not self.model.aligned:
            self.dual = None  # a plain model ignores them (the same groups train both kinds)
        grid = self.model.config.patch_grid
        if source_grid is not None and tuple(source_grid) != grid and self.patches.shape[1] == source_grid[0] * source_grid[1]:
            self.patches = pool_patches(self.patches, tuple(source_grid), grid)  # once: every row is read many times
        if self.patches.shape[1:] != (self.model.config.num_patches, self.model.config.patch_dim):
            raise ValueError(
                f"patch features {self.patches.shape[1:]} do not fit the model "
                f"({self.model.config.num_patches}, {self.model.config.patch_dim})"
            )

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        model = self.model.train()
        opt, sched = _optimizer(model, cfg)
        adaptive = AdaptiveLoss(model.shared_parameters()) if cfg.stage == "pretrain" else None
        sampler = (
            PretrainSampler(self.products, self.patches, self.encoder, self.schema, knowledge=cfg.knowledge, seed=cfg.seed,
                            hard=self.hard, dual=self.dual)
            if cfg.stage == "pretrain" else None
        )
        history: list[dict[str, Any]] = []
        dtype = autocast_dtype(cfg.amp, torch.device("cpu"))
        started = time.perf_counter()
        with open(out / "log.jsonl", "w") as logf:
            for step in tqdm(range(cfg.steps), desc=f"reranker {cfg.stage}", disable=not self.progress):
                t0 = time.perf_counter()
                record: dict[str, Any] = {"step": step + 1}
                if sampler is not None:
                    batch = sampler.batch(cfg.batch_size)
                    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                        losses = pretrain_losses(model, batch)
                    # Eq. 6 reads task gradients: in float32, whatever the forward ran in
                    total, weights, sq = adaptive({k: v.float() for k, v in losses.items()})
                    record["weights"], record["grad_sq_norms"] = weights, sq
                else:
                    groups = self.groups[step * cfg.groups_per_step : (step + 1) * cfg.groups_per_step]
                    batch, width = rows_for_groups(groups, self.products, self.patches, self.encoder, self.dual)
                    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                        if self.teacher is not None:
                            losses, logits = distill_losses(model, self.teacher, batch, width, cfg.hidden_distill)
                        else:
                            logits, swaps = group_scores(model, batch, width)
                            logits, swaps = logits.float(), swaps.float()  # the losses in float32
                            losses = rerank_loss(logits, swaps, _swap_positive_logits(logits, groups))
                    record["group_acc"] = float((logits.argmax(1) == 0).float().mean())
                    total = sum(v.float() for v in losses.values())
                opt.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                if sampler is None:
                    record["prior_weight"] = float(model.prior_weight.detach())  # after the update: what gets saved
                record["losses"] = {k: float(v.detach()) for k, v in losses.items()}
                record["total"] = float(total.detach())
                record["sec"] = round(time.perf_counter() - t0, 3)
                history.append(record)
                logf.write(json.dumps(record) + "\n")
                if (step + 1) % cfg.log_every == 0:
                    logf.flush()
                    log.info("step %d %s", step + 1, record["losses"])
        model.eval()
        save_cross_encoder(model, out / "model.pt", stage=cfg.stage, knowledge=cfg.knowledge, schema=self.schema.to_dict())
        summary = self._summary(history, time.perf_counter() - started, sampler)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _summary(self, history: list[dict[str, Any]], seconds: float, sampler: PretrainSampler | None) -> dict[str, Any]:
        tail = history[-max(1, len(history) // 10) :]
        mean = lambda key: {k: float(np.mean([h[key][k] for h in tail if k in h[key]])) for k in tail[-1][key]}  # noqa: E731
        summary: dict[str, Any] = {
            "stage": self.cfg.stage,
            "knowledge": self.cfg.knowledge,
            "layers": self.model.num_layers,
            "steps": len(history),
            "train_seconds": round(seconds, 1),
            "sec_per_step": round(seconds / max(1, len(history)), 3),
            "autocast": str(autocast_dtype(self.cfg.amp, torch.device("cpu"))),
            "final_losses": mean("losses"),
        }
        if sampler is not None:
            summary["final_weights"] = mean("weights")
            summary["first_weights"] = history[0]["weights"]
            summary["sampler"] = dict(sampler.stats)
        if "group_acc" in tail[-1]:
            summary["final_group_acc"] = float(np.mean([h["group_acc"] for h in tail]))
            summary["first_group_acc"] = float(np.mean([h["group_acc"] for h in history[: len(tail)]]))
        if "prior_weight" in tail[-1]:
            summary["prior_weight"] = tail[-1]["prior_weight"]
        return summary


__all__ = ["STAGES", "RerankerTrainConfig", "RerankerTrainer", "distill_losses", "group_scores", "pretrain_losses"]
