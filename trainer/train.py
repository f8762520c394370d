"""Fine-tune a dual encoder on a catalog: ITC, optional FashionKLIP CVA and MML-TP pruning.

One run = one `TrainConfig`. The image tower is locked by default and its trunk
features are cached (LiT-style), which is what makes training practical on a CPU.
Each epoch ends with prototype refresh (CVA) and validation on `val` with the
evaluation harness; the best epoch is kept as `best.pt`, the latest as `last.pt`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from open_clip.loss import ClipLoss
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from trainer.concepts import CONCEPT_PROMPT, ConceptGraph, visual_concepts
from trainer.encoder import ModelEncoder
from trainer.factory import create_model_and_transforms, get_tokenizer
from trainer.features import cached_image_features, products_fingerprint
from trainer.loss import ConceptVisualAlignmentLoss, pruning_loss
from trainer.prototypes import select_prototypes
from trainer.selection import ValidationEvaluators, pick_alphas, resume_state, save_checkpoint, validation_metrics
from vitrine.catalog import read_catalog
from vitrine.catalog.product import Product
from vitrine.errors import UserError
from vitrine.evaluation.protocols import RetrievalSet, index_distinct

log = logging.getLogger(__name__)



@dataclass
class TrainConfig:
    catalog: str
    out: str
    model: str = "fashion-lite"
    pretrained: str | None = None
    model_overrides: dict = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 256
    lr: float = 1e-3  # projection heads and logit scale
    text_lr: float = 3e-5  # text tower layers, when unlocked
    image_lr: float = 1e-4  # cached-token recipe: unlocked image stages and conv head
    weight_decay: float = 0.05
    warmup_steps: int = 50
    text_unlocked_layers: int = 0  # 0: text tower frozen; -1: all layers trainable
    image_unlocked_groups: int = 0  # > 0 trains the image tower's last groups (no feature cache)
    cva: bool = False
    cva_topk: int = 32
    cva_prototypes: int = 4
    cva_mmr_lambda: float = 0.8
    cva_weight: float = 1.0  # cached-token recipe: L = L_ITC + w * L_CVA (the pooled recipe uses ½(L_ITC + L_CVA))
    cva_warmup: int = 0  # cached-token recipe: epochs of ITC alone before CVA starts (prototypes need aligned heads)
    concept_min_count: int = 5
    prune: bool = False
    prune_weight: float = 0.1
    prune_temperature: float | None = None  # cached-token recipe: T of the gates (None: the model config's)
    prune_quantile: float = 0.1  # cached-token recipe: τ starts at this quantile of each layer's token importance
    seed: int = 0
    device: str = "auto"
    # cached-token recipe: bf16 autocast. "cuda": on CUDA only; "auto": also on CPUs with native bf16; "bf16"; "off"
    amp: str = "cuda"
    val_queries: int = 1000
    # The cached-token recipe (models with attention heads, trainer.recipe):
    multi_positive: bool = True  # identical titles are positives of each other
    attr_weight: float = 0.0  # weight of the attribute heads' loss (0: off)
    hard_negatives: float = 0.0  # share of each batch drawn in same-article-type groups
    query_weight: float = 0.0  # weight of the shopper-query loss (trainer.shopper_queries; 0: off)
    val_every: int = 5  # epochs between validations
    image_views: int = 1  # cached views of each training photo (1: the photo itself; more: augmented re-shoots)
    limit: int | None = None  # products per split (tests, smoke runs)
    max_steps_per_epoch: int | None = None
    cache_dir: str = "runs/cache"
    resume: bool = True
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_splits(config: TrainConfig) -> dict[str, list[Product]]:
    catalog = read_catalog(config.catalog)
    splits = {}
    for name in ("train", "val"):
        products = catalog.by_split(name)
        if config.limit:
            products = products[: config.limit]
        if len(products) < 2:
            raise UserError(f"catalog {config.catalog} has {len(products)} products in split {name!r}; need train and val")
        splits[name] = products
    return splits


class TextEmbedder:
    """Batched text encoding with the tokenizer, padding each batch only to its longest row.

    With `frozen_trunk` (text tower locked, no pruning) the pooled trunk features never change,
    so they are cached per text and each step only runs the projection head (LiT-style).
    """

    def __init__(self, model, tokenizer, device: torch.device, batch_size: int = 256, frozen_trunk: bool = False):
        self.model, self.tokenizer, self.device, self.batch_size = model, tokenizer, device, batch_size
        self.frozen_trunk = frozen_trunk
        self._trunk: dict[str, torch.Tensor] = {}

    def _trunk_features(self, texts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(t for t in texts if t not in self._trunk))
        with torch.no_grad():
            for i in range(0, len(missing), self.batch_size):
                chunk = missing[i : i + self.batch_size]
                feats = self.model.text_trunk_features(self.tokenizer(chunk).to(self.device)).float()
                self._trunk.update(zip(chunk, feats))
        return torch.stack([self._trunk[t] for t in texts])

    def __call__(self, texts: Sequence[str], grad: bool = False) -> torch.Tensor:
        if self.frozen_trunk:
            with torch.set_grad_enabled(grad):
                return self.model.encode_text_features(self._trunk_features(texts))
        if grad:
            return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                ids = self.tokenizer(list(texts[i : i + self.batch_size])).to(self.device)
                out.append(self.model.encode_text(ids).float())
        return torch.cat(out) if out else torch.zeros(0, self.model.embed_dim)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)
        self.device = resolve_device(config.device)
        self.amp = self.device.type == "cuda"
        self.splits = load_splits(config)
        self.model, self.preprocess_train, self.preprocess_val = create_model_and_transforms(
            config.model, config.pretrained, pruning=config.prune, device=self.device, **config.model_overrides
        )
        self.tokenizer = get_tokenizer(config.model)
        self.model.lock_image_tower(unlocked_groups=config.image_unlocked_groups)
        if config.text_unlocked_layers >= 0:  # -1: the whole text tower trains
            self.model.lock_text_tower(unlocked_layers=config.text_unlocked_layers)
        frozen_text = config.text_unlocked_layers == 0 and not config.prune and self.model.text_split
        self.embed_texts = TextEmbedder(self.model, self.tokenizer, self.device, frozen_trunk=frozen_text)
        self.itc = ClipLoss()
        self.cva_loss = ConceptVisualAlignmentLoss()
        self.features = self._image_features() if config.image_unlocked_groups == 0 else None
        self.graph = ConceptGraph.build(self.splits["train"], min_count=config.concept_min_count) if config.cva else None
        self.prototypes: np.ndarray | None = None
        self.visual_concepts = visual_concepts(self.graph) if self.graph is not None else []
        self.optimizer = self._optimizer()
        steps = self.steps_per_epoch * config.epochs
        # Warm-up never takes more than half of a short run.
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, min(config.warmup_steps, steps // 2), max(1, steps))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.evaluators = ValidationEvaluators.for_val(queries=config.val_queries, seed=config.seed, progress=config.progress)
        self.epoch = 0
        self.best_score = -1.0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup

    @property
    def steps_per_epoch(self) -> int:
        steps = len(self.splits["train"]) // self.config.batch_size
        steps = max(1, steps)
        return min(steps, self.config.max_steps_per_epoch or steps)

    def _image_features(self) -> dict[str, torch.Tensor]:
        key = f"{self.config.model}|{self.config.pretrained}|{self.model.image_size}|{json.dumps(self.config.model_overrides, sort_keys=True)}"
        feats = {}
        for name, products in self.splits.items():
            arr = cached_image_features(
                self.model, self.preprocess_val, products, Path(self.config.cache_dir), key,
                device=self.device, progress=self.config.progress, desc=f"{name} image features",
            )
            feats[name] = torch.from_numpy(arr).to(self.device)
        return feats

    def _optimizer(self) -> torch.optim.Optimizer:
        tower, head = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (tower if self._is_tower_param(name) else head).append(p)
        groups = [{"params": head, "lr": self.config.lr}]
        if tower:
            groups.append({"params": tower, "lr": self.config.text_lr})
        log.info("trainable: %d head tensors, %d tower tensors", len(head), len(tower))
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)

    @staticmethod
    def _is_tower_param(name: str) -> bool:
        """Pretrained tower weights (slow lr) vs new heads, gates and the logit scale (fast lr)."""
        return (".transformer." in name or ".trunk." in name) and "gate" not in name

    # ------------------------------------------------------------------ steps

    def _images(self, split: str, idx: torch.Tensor) -> torch.Tensor:
        if self.features is not None:
            return self.model.encode_image_features(self.features[split][idx])
        products = self.splits[split]
        pixels = torch.stack([self.preprocess_train(products[i].image.open()) for i in idx.tolist()])
        return self.model.encode_image(pixels.to(self.device))

    def _cva(self, idx: torch.Tensor, image_embs: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        assert self.graph is not None and self.prototypes is not None
        concept_ids = []
        for i in idx.tolist():
            options = self.visual_concepts[i]
            concept_ids.append(int(rng.choice(options)) if len(options) else -1)
        keep = torch.tensor([c >= 0 for c in concept_ids], device=self.device)
        if keep.sum() < 2:
            return image_embs.new_zeros(())
        concept_ids = np.array([c for c in concept_ids if c >= 0])
        unique, inverse = np.unique(concept_ids, return_inverse=True)
        phrases = [CONCEPT_PROMPT.format(self.graph.concepts[c]) for c in unique]
        concept_text = self.embed_texts(phrases, grad=True)[torch.from_numpy(inverse).to(self.device)]
        proto_idx = torch.from_numpy(self.prototypes[concept_ids]).to(self.device)  # [b, q], -1 = none
        proto = self.model.encode_image_features(self.features["train"][proto_idx.clamp(min=0).reshape(-1)])
        return self.cva_loss(
            concept_text_features=concept_text,
            prototypes=proto.reshape(*proto_idx.shape, -1),
            image_features=image_embs[keep],
            concept_ids=torch.from_numpy(concept_ids).to(self.device),
            logit_scale=self.model.logit_scale.exp(),
            prototype_mask=proto_idx >= 0,
        )

    def train_epoch(self) -> dict:
        self.model.train()
        if self.features is not None:
            self.model.lock_image_tower(unlocked_groups=0)  # keep BN stats frozen
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.epoch)
        rng = np.random.default_rng([cfg.seed, self.epoch])
        order = torch.randperm(len(self.splits["train"]), generator=gen)
        titles = [p.title for p in self.splits["train"]]
        sums: dict[str, float] = {}
        bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not cfg.progress)
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            with torch.autocast(self.device.type, enabled=self.amp):
                image_embs = self._images("train", idx)
                batch_titles = [titles[i] for i in idx.tolist()]
                if cfg.prune:  # the gates' masks belong to this forward: read them before any other
                    ids = self.tokenizer(batch_titles).to(self.device)
                    text_embs = self.model.encode_text(ids)
                    prune = pruning_loss(self.model.pruning_masks(), ids != self.tokenizer.pad_token_id)
                else:
                    text_embs = self.embed_texts(batch_titles, grad=True)
                losses = {"itc": self.itc(image_embs, text_embs, self.model.logit_scale.exp())}
                if cfg.prune:
                    losses["prune"] = prune
                if cfg.cva:
                    losses["cva"] = self._cva(idx, image_embs, rng)
                total = 0.5 * (losses["itc"] + losses["cva"]) if cfg.cva else losses["itc"]
                if cfg.prune:
                    total = total + cfg.prune_weight * losses["prune"]
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100))
            for k, v in {"total": total, **losses}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix({k: f"{v / (step + 1):.3f}" for k, v in sums.items()})
        return {f"loss_{k}": v / self.steps_per_epoch for k, v in sums.items()}

    # ------------------------------------------------------------------ concepts

    def refresh_prototypes(self) -> None:
        """Re-pick each concept's visual prototypes with the current model (top-k by Faiss, MMR to q)."""
        assert self.graph is not None and self.features is not None
        self.model.eval()
        with torch.no_grad():
            concept_embs = self.embed_texts([CONCEPT_PROMPT.format(c) for c in self.graph.concepts])
            image_embs = self.model.encode_image_features(self.features["train"]).float()
        self.prototypes = select_prototypes(
            concept_embs.cpu().numpy(), image_embs.cpu().numpy(),
            k=self.config.cva_topk, q=self.config.cva_prototypes, lam=self.config.cva_mmr_lambda,
        )

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def embed_split(self, split: str) -> tuple[RetrievalSet, np.ndarray]:
        self.model.eval()
        products = self.splits[split]
        texts, text_of_product = index_distinct([p.title for p in products])
        text_embs = self.embed_texts(texts).cpu().numpy()
        if self.features is not None:
            image_embs = self.model.encode_image_features(self.features[split]).float().cpu().numpy()
        else:
            image_embs = np.concatenate([
                self._images(split, torch.arange(i, min(i + 64, len(products)))).float().cpu().numpy()
                for i in range(0, len(products), 64)
            ])
        data = RetrievalSet(texts, text_of_product, [p.subcategory for p in products], text_embs, image_embs)
        return data, image_embs

    def encoder(self) -> ModelEncoder:
        """The model being trained, as the evaluators' Encoder."""
        return ModelEncoder(self.model, self.embed_texts, self.preprocess_val, self.device, self.config.model)

    def validate(self) -> dict:
        data, _ = self.embed_split("val")
        return validation_metrics(self.evaluators, self.encoder(), self.splits["val"], data)

    @torch.no_grad()
    def tune_alpha(self) -> dict:
        """Pick α for weighted T2P/I2P scoring on val (per query kind, and jointly)."""
        data, _ = self.embed_split("val")
        return pick_alphas(self.evaluators, self.encoder(), self.splits["val"], data)

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "model_name": self.config.model,
            "pretrained": self.config.pretrained,
            "model_overrides": self.config.model_overrides,
            "pruning": self.config.prune,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "best_score": self.best_score,
            "history": self.history,
            "data_fingerprint": products_fingerprint(self.splits["train"]),
            "prototypes": self.prototypes,
        }

    def save(self, name: str, extra: dict | None = None) -> Path:
        return save_checkpoint(self.out / name, {**self.state(), **(extra or {})})

    def maybe_resume(self) -> None:
        ckpt = resume_state(self.out / "last.pt", self.device, self.model, self.optimizer, self.scheduler) if self.config.resume else None
        if ckpt is not None:
            self.epoch, self.best_score, self.history = ckpt["epoch"], ckpt["best_score"], ckpt["history"]
            self.prototypes = ckpt.get("prototypes")

    # ------------------------------------------------------------------ run

    def fit(self) -> dict:
        self.maybe_resume()
        if self.epoch == 0:
            baseline = self.validate()
            log.info("epoch 0 val %s", json.dumps(baseline))
        while self.epoch < self.config.epochs:
            started = time.perf_counter()
            if self.config.cva and (self.prototypes is None or self.epoch > 0):
                self.refresh_prototypes()
            losses = self.train_epoch()
            self.epoch += 1
            metrics = self.validate()
            record = {"epoch": self.epoch, "seconds": time.perf_counter() - started, **losses, **metrics}
            self.history.append(record)
            log.info("epoch %d %s", self.epoch, json.dumps(record))
            if metrics["score"] > self.best_score:
                self.best_score = metrics["score"]
                self.save("best.pt", {"val": metrics})
            self.save("last.pt")
        return self.finish()

    def finish(self) -> dict:
        """Reload the best epoch, decide inference-time pruning, tune α, write summary.json."""
        best = torch.load(self.out / "best.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(best["state_dict"])
        summary: dict = {"config": self.config.to_dict(), "history": self.history, "val": best["val"],
                         "device": str(self.device), "threads": torch.get_num_threads(),
                         "train_seconds": sum(r["seconds"] for r in self.history)}
        if self.config.prune:
            # Pruning was trained in; keep it at inference only if val says it does not hurt.
            self.model.set_pruning(False)
            off = self.validate()
            self.model.set_pruning(True)
            on = best["val"]
            summary["prune_at_inference"] = on["score"] >= off["score"]
            summary["val_pruning_off"] = off
            self.model.set_pruning(summary["prune_at_inference"])
        summary["alpha"] = self.tune_alpha()
        extra = {"val": best["val"], "alpha": summary["alpha"]["alpha"],
                 "alpha_t2p": summary["alpha"]["alpha_t2p"], "alpha_i2p": summary["alpha"]["alpha_i2p"],
                 "prune_at_inference": summary.get("prune_at_inference", False)}
        self.save("best.pt", {**extra, "history": self.history})
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        return summary


def train(config: TrainConfig) -> dict:
    """Train with the recipe the model calls for: the cached-token recipe for attention-head models."""
    from trainer.factory import has_token_heads

    if has_token_heads(config.model):
        from trainer.recipe import train_cached_tokens

        return train_cached_tokens(config)
    from trainer.distributed import Distributed

    if Distributed.from_env().enabled:
        raise UserError(f"torchrun runs the cached-token recipe (attention-head models); {config.model!r} trains in one process")
    return Trainer(config).fit()
