"""The cached-token recipe: frozen towers run once, attention-pooling heads train for many epochs.

Built for two CPU cores. The towers are frozen, so their token states never change:

1. cache, once per (model, catalog): the image trunk's 7x7 block map of every train/val photo
   ([N, 49, C] float16, through the ONNX-run trunk) and the text tower's last-layer token states of
   every distinct title ([T, L, H] float16 + mask); with `image_views` > 1, also that many - 1
   augmented views of each training photo (seeded re-shoots: crop, flip, colour, JPEG);
2. train the heads (`trainer.heads.AttentionPoolHead` on both sides) for `epochs` epochs over the
   cache: multi-positive InfoNCE (identical titles are positives), optional attribute heads on both
   embeddings and attribute-aware hard negatives in the batch, optional shopper queries spelled from
   each product's attributes ("women red handbags") scored against the batch's matching products;
   photos are augmented in feature space (a horizontal flip of the block map);
3. keep the best epoch on val (the same evaluators `vitrine eval` runs), tune α per query kind on
   val, write best.pt in the checkpoint format `vitrine export` reads.

Under torchrun (`trainer.distributed`) each process trains on its shard of every global batch: rank 0
fills the caches first, DistributedDataParallel averages the gradients, the losses score the local
rows against the gathered global batch, and rank 0 alone validates and writes checkpoints.

Every stage's wall time is recorded in summary.json["stage_seconds"].
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from trainer.batches import CatalogBatchSampler, ShardedBatchSampler
from trainer.concept_alignment import ConceptAlignment
from trainer.distributed import Distributed
from trainer.encoder import ModelEncoder
from trainer.factory import create_model_and_transforms, get_tokenizer
from trainer.features import cached_image_features, products_fingerprint
from trainer.heads import AttributeHeads
from trainer.loss import ClipLoss, attribute_loss, multi_positive_info_nce, pruning_loss, query_product_loss
from trainer.pruning import calibrate_thresholds, pruned_token_report
from trainer.selection import ValidationEvaluators, pick_alphas, resume_state, save_checkpoint, validation_metrics
from trainer.shopper_queries import ShopperQuerySampler
from trainer.train import TrainConfig, load_splits, seed_everything
from vitrine.catalog.product import Product
from vitrine.errors import UserError
from vitrine.evaluation.photos import shopper_photo
from vitrine.evaluation.protocols import RetrievalSet, index_distinct

log = logging.getLogger(__name__)

ATTRIBUTES = ("baseColour", "articleType", "gender", "usage", "season")
MIN_ATTRIBUTE_COUNT = 5  # rarer values are not a class (target ignored)
TEXT_BATCH = 256


@dataclass
class TextStates:
    """Token states of distinct texts: row `index[text]` of `states` [T, L, H] and `mask` [T, L]."""

    texts: list[str]
    states: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        assert self.states.shape[:2] == self.mask.shape and len(self.texts) == self.states.shape[0]
        self.index = {t: i for i, t in enumerate(self.texts)}

    def rows(self, texts: list[str]) -> np.ndarray:
        return np.array([self.index[t] for t in texts], dtype=np.int64)


@torch.no_grad()
def compute_text_states(model, tokenizer, texts: list[str], device: torch.device, progress: bool = False) -> TextStates:
    """Last-layer token states of `texts`, padded to the tokenizer's max length, as float16."""
    model.eval()
    states, masks = [], []
    for start in tqdm(range(0, len(texts), TEXT_BATCH), desc="text token states", disable=not progress):
        ids = tokenizer(texts[start : start + TEXT_BATCH], padding="max_length").to(device)
        hidden, mask = model.text_token_states(ids)
        states.append(hidden.to(torch.float16).cpu().numpy())
        masks.append(mask.to(torch.uint8).cpu().numpy())
    return TextStates(list(texts), np.concatenate(states), np.concatenate(masks))


def cached_text_states(model, tokenizer, texts: list[str], cache_dir: Path, key: str, device: torch.device,
                       progress: bool = False) -> TextStates:  # fmt: skip
    """`compute_text_states`, reusing `cache_dir/text-states-<key>.npz` when it holds the same texts."""
    digest = hashlib.sha256(json.dumps([key, texts]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"text-states-{digest}.npz"
    if path.is_file():
        with np.load(path) as z:
            log.info("text token states from cache %s", path)
            return TextStates(list(texts), z["states"], z["mask"])
    out = compute_text_states(model, tokenizer, texts, device, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, states=out.states, mask=out.mask)
    tmp.replace(path)
    return out


def cpu_has_native_bf16() -> bool:
    """This CPU has bf16 instructions (AVX512-BF16 or AMX), which oneDNN's bf16 kernels need to beat float32.

    Read from /proc/cpuinfo's flags; where that file is missing, oneDNN's own (broader) bf16 check decides."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The training forward's autocast dtype (bf16 needs no loss scaling), or None for float32.

    "cuda": bf16 on CUDA only; "auto": also on a CPU with native bf16; "bf16": anywhere; "off": never."""
    if amp not in ("auto", "cuda", "bf16", "off"):
        raise UserError(f"amp must be auto, cuda, bf16 or off, not {amp!r}")
    if amp == "bf16" or (amp in ("auto", "cuda") and device.type == "cuda"):
        return torch.bfloat16
    if amp == "auto" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def view_rng(product_id: str, view: int) -> np.random.Generator:
    """The generator of one training photo's augmented view: fixed per (product, view)."""
    digest = hashlib.sha256(f"{product_id}|{view}".encode()).digest()
    return np.random.default_rng([int.from_bytes(digest[:8], "little"), 17])


def attribute_vocab(products: list[Product]) -> dict[str, list[str]]:
    """Per attribute, the values seen at least MIN_ATTRIBUTE_COUNT times in training (the classes)."""
    vocab = {}
    for name in ATTRIBUTES:
        values, counts = np.unique([p.attribute(name).strip().lower() for p in products], return_counts=True)
        vocab[name] = sorted(v for v, c in zip(values, counts) if v and c >= MIN_ATTRIBUTE_COUNT)
    return vocab


def attribute_targets(products: list[Product], vocab: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Per attribute, each product's class index, -1 when missing or rare."""
    out = {}
    for name, values in vocab.items():
        lookup = {v: i for i, v in enumerate(values)}
        out[name] = np.array([lookup.get(p.attribute(name).strip().lower(), -1) for p in products], dtype=np.int64)
    return out


def concat_padded(*parts: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Token states [b_i, L_i, H] and masks [b_i, L_i] stacked along the batch, zero-padded to the longest L."""
    length = max(states.shape[1] for states, _ in parts)
    pad = [(torch.nn.functional.pad(s, (0, 0, 0, length - s.shape[1])), torch.nn.functional.pad(m, (0, length - m.shape[1])))
           for s, m in parts]  # fmt: skip
    return torch.cat([s for s, _ in pad]), torch.cat([m for _, m in pad])


class TokenForward(nn.Module):
    """One training forward over cached tokens: the heads, the unlocked tower parts, the logit scale.
    The module DistributedDataParallel wraps; every trainable parameter of the model is reached here."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_tokens: Tensor, text_states: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        return model.encode_image_features(image_tokens), model.encode_text_tokens(text_states, text_mask), model.logit_scale.exp()


class TokenRecipeTrainer:
    """Trains a token-head model (`heads_cfg.type == "attention"`, e.g. fashion-lite-apc) over cached token states.

    `dist` is this process's place in a torchrun run (default: what the environment says; one process without torchrun).
    """

    def __init__(self, config: TrainConfig, dist: Distributed | None = None) -> None:
        self.config = config
        self.dist = dist or Distributed.from_env()
        if self.dist.enabled and config.cva:
            raise UserError("--cva runs in one process only: its in-batch concept negatives are not gathered across processes")
        if config.batch_size < 2 * self.dist.world_size:
            raise UserError(f"--batch-size {config.batch_size} is the global batch: give each of the {self.dist.world_size} "
                            "processes at least 2 rows")
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)
        seed_everything(config.seed)
        self.device = self.dist.setup(config.device)
        self.autocast_dtype = autocast_dtype(config.amp, self.device)
        self.progress = config.progress and self.dist.is_main
        self.stage_seconds: dict[str, float] = {}
        started = time.perf_counter()
        self.splits = load_splits(config)
        self.model, _, self.preprocess_val = create_model_and_transforms(
            config.model, config.pretrained, device=self.device, **config.model_overrides
        )
        if not getattr(self.model, "token_heads", False):
            raise ValueError(f"model {config.model!r} has no attention heads; use the standard trainer")
        self.tokenizer = get_tokenizer(config.model)
        self.model.requires_grad_(False)
        trainable = [self.model.image_head, self.model.text_head]
        for module in trainable:
            module.requires_grad_(True)
        self.model.clip.logit_scale.requires_grad_(True)
        self.tower_groups = self._unlock_towers()
        self.stage_seconds["load"] = time.perf_counter() - started

        with self.dist.main_first():  # rank 0 writes the caches, the other processes then read them
            self._fill_caches()

        train = self.splits["train"]
        self.train_text_rows = torch.from_numpy(self.text.rows([p.title for p in train]))
        self.prune_gates, self.prune_init = self._setup_pruning() if config.prune else ([], [])
        gate_thresholds = [g.threshold for g in self.prune_gates]
        _, title_ids = index_distinct([p.title for p in train])
        self.title_ids = torch.as_tensor(np.asarray(title_ids), dtype=torch.long)
        self.vocab = attribute_vocab(train) if config.attr_weight > 0 else {}
        self.attr_targets = {k: torch.from_numpy(v) for k, v in attribute_targets(train, self.vocab).items()}
        if self.vocab:
            classes = {name: len(values) for name, values in self.vocab.items() if values}
            self.image_attributes = AttributeHeads(self.model.embed_dim, classes).to(self.device)
            self.text_attributes = AttributeHeads(self.model.embed_dim, classes).to(self.device)
            trainable += [self.image_attributes, self.text_attributes]
            for heads in (self.image_attributes, self.text_attributes):
                self.dist.broadcast(heads)
        # --batch-size is the global batch: the same batches, steps and schedule on any number of processes.
        self.batches = ShardedBatchSampler(CatalogBatchSampler(
            [p.attribute("articleType") or p.subcategory for p in train], config.batch_size,
            hard_fraction=config.hard_negatives, seed=config.seed,
        ), self.dist.rank, self.dist.world_size)  # fmt: skip
        params = [p for m in trainable for p in m.parameters()] + [self.model.clip.logit_scale] + gate_thresholds
        groups = [{"params": params, "lr": config.lr}] + [
            {"params": [p for m in modules for p in m.parameters()], "lr": lr}
            for modules, lr in ((self.tower_groups["image"], config.image_lr), (self.tower_groups["text"], config.text_lr))
            if modules
        ]  # fmt: skip
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
        steps = len(self.batches) * config.epochs
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, min(config.warmup_steps, steps // 2), max(1, steps))
        self.itc = ClipLoss(local_loss=True, gather_with_grad=True, rank=self.dist.rank, world_size=self.dist.world_size)
        # The attribute heads stay outside: they score the gathered global batch, identically on every process,
        # so their gradients agree without averaging (and a head with no labelled row in a batch breaks nothing).
        # The towers stay in eval mode (frozen BatchNorm statistics): buffers are synced once, at the start.
        self.forward_step = self.dist.wrap(TokenForward(self.model), self.device, forward_sync_buffers=False)
        self.evaluators = ValidationEvaluators.for_val(queries=config.val_queries, seed=config.seed)
        self.epoch, self.best_score, self.history = 0, -1.0, []

    def _fill_caches(self) -> None:
        """The frozen towers' outputs: image grids (train, val, extra views), text token states, CVA prompt states."""
        config = self.config
        started = time.perf_counter()
        # The heads do not change what the towers compute below the boundary: caches are shared across heads_cfg.
        tower_overrides = {k: v for k, v in config.model_overrides.items() if k != "heads_cfg"}
        key = f"{config.model}|{config.pretrained}|{self.model.image_size}|grid|{json.dumps(tower_overrides, sort_keys=True)}"
        image_key = key + (f"|top-stages{self.model.image_top_stages}" if self.model.image_top_stages else "")
        text_key = key + (f"|top-layers{self.model.text_top_layers}" if self.model.text_top_layers else "")
        self.grids = {
            name: cached_image_features(
                self.model, self.preprocess_val, products, Path(config.cache_dir), image_key,
                device=self.device, progress=self.progress, desc=f"{name} image grids",
            ).astype(np.float16)
            for name, products in self.splits.items()
        }  # fmt: skip
        # Extra augmented views of the training photos: seeded re-shoots (crop, flip, colour, JPEG).
        self.train_views = [self.grids["train"]] + [
            cached_image_features(
                self.model, self.preprocess_val, self.splits["train"], Path(config.cache_dir), f"{image_key}|view{view}",
                device=self.device, progress=self.progress, desc=f"train image grids, view {view}",
                open_image=lambda product, view=view: shopper_photo(product.image.open(), view_rng(product.id, view)),
            ).astype(np.float16)
            for view in range(1, config.image_views)
        ]  # fmt: skip
        self.stage_seconds["cache_images"] = time.perf_counter() - started
        started = time.perf_counter()
        texts = sorted({p.title for products in self.splits.values() for p in products})
        self.text = cached_text_states(self.model, self.tokenizer, texts, Path(config.cache_dir), f"{text_key}|text",
                                       self.device, self.progress)  # fmt: skip
        self.cva = None
        if config.cva:  # concept phrases are texts too: their token states are cached the same way
            self.cva = ConceptAlignment(self.splits["train"], min_count=config.concept_min_count, topk=config.cva_topk,
                                        prototypes=config.cva_prototypes, mmr_lambda=config.cva_mmr_lambda)  # fmt: skip
            self.prompt_text = cached_text_states(self.model, self.tokenizer, self.cva.prompts, Path(config.cache_dir),
                                                  f"{text_key}|text", self.device, self.progress)  # fmt: skip
        self.queries = None
        if config.query_weight > 0:  # shopper queries are texts too, cached the same way
            self.queries = ShopperQuerySampler(self.splits["train"])
            self.query_text = cached_text_states(self.model, self.tokenizer, self.queries.texts, Path(config.cache_dir),
                                                 f"{text_key}|text", self.device, self.progress)  # fmt: skip
        self.stage_seconds["cache_texts"] = time.perf_counter() - started

    def _unlock_towers(self) -> dict[str, list[torch.nn.Module]]:
        """Cut the towers at the cache boundary and make the parts above it trainable.

        `image_unlocked_groups` counts timm's groups from the top, as the pooled recipe does: 1 is the conv
        head (+ its BatchNorm; used when heads_cfg.image_summary is "conv_head"), 2 adds the last block stage,
        and so on. `text_unlocked_layers` counts text layers from the top (-1: all). Unlocked parts stay in
        eval mode: BatchNorm statistics and dropout are those of the pretrained towers; their weights train.
        """
        config, model = self.config, self.model
        layers = len(model.text_layers)
        text_layers = layers if config.text_unlocked_layers < 0 else config.text_unlocked_layers
        image_stages = max(0, config.image_unlocked_groups - 1)
        model.set_cache_boundary(image_stages=image_stages, text_layers=text_layers)
        trunk = model.clip.visual.trunk
        image = model.image_block_stages[-image_stages:] if image_stages else []
        if config.image_unlocked_groups >= 1:
            if model.image_summary == "conv_head":
                image += [trunk.conv_head, trunk.bn2]
            else:
                log.warning("image group 1 (the conv head) is not used by this head (image_summary 'blocks'); it stays frozen")
        text = model.text_layers[layers - text_layers :] if text_layers else []
        for module in image + text:
            module.requires_grad_(True)
        log.info("unlocked: %d image modules (%d block stages), %d text layers", len(image), image_stages, text_layers)
        return {"image": image, "text": text}

    def _setup_pruning(self) -> tuple[list, list[float]]:
        """MML-TP on the unlocked text layers: their gates train (τ calibrated to a quantile of each layer's
        token importance, temperature from the config); the gates below the cache never close (τ = -1), so
        the cached states stay what the pruned model computes there, at training and at inference."""
        top = self.model.text_top_layers
        if not top:
            raise UserError("MML-TP in the cached-token recipe prunes in the trained text layers: pass --text-unlocked-layers N")
        gates = list(self.model.pruning_gates)
        for gate in gates[: len(gates) - top]:
            gate.threshold.data.fill_(-1.0)
        trained = gates[len(gates) - top :]
        for gate in trained:
            if self.config.prune_temperature:
                gate.temperature = float(self.config.prune_temperature)
            gate.threshold.requires_grad_(True)
        self.model.set_pruning(True)
        self.model.eval()
        rows = np.random.default_rng(self.config.seed).permutation(len(self.train_text_rows))[:2048]
        states, mask = self._text_tokens(self.train_text_rows[rows].numpy())
        taus = calibrate_thresholds(trained, lambda: self.model.encode_text_tokens(states, mask), mask,
                                    self.config.prune_quantile)  # fmt: skip
        log.info("MML-TP: τ calibrated at quantile %.2f: %s", self.config.prune_quantile, taus)
        return trained, taus

    @torch.no_grad()
    def pruning_report(self) -> dict:
        """What the trained gates prune on the val titles at inference (hard gates)."""
        self.model.eval()
        texts = sorted({p.title for p in self.splits["val"]})
        ids = self.tokenizer(texts, padding="max_length")
        states, mask = self._text_tokens(self.text.rows(texts))
        masks = []
        for start in range(0, len(texts), TEXT_BATCH):
            block = slice(start, start + TEXT_BATCH)
            self.model.encode_text_tokens(states[block], mask[block])
            masks.append([torch.nn.functional.pad(g.last_mask, (0, ids.shape[1] - g.last_mask.shape[1])) for g in self.prune_gates])
        per_layer = [torch.cat([m[i] for m in masks]).cpu() for i in range(len(self.prune_gates))]
        real = torch.nn.functional.pad(mask.cpu(), (0, ids.shape[1] - mask.shape[1]))
        report = pruned_token_report(ids.cpu(), real, per_layer, lambda i: self.tokenizer.hf.convert_ids_to_tokens(i))
        first = len(self.model.pruning_gates) - len(self.prune_gates)
        for offset, layer in enumerate(report["layers"]):
            layer["layer"] = first + offset + 1  # 1-based, as the paper counts
        return report

    # ------------------------------------------------------------------ steps

    def _draw_augmentation(self) -> None:
        """Each training photo's cached view and flip for this epoch, drawn per product, so that a photo looks
        the same whichever process's shard it lands in (and the sharded run computes the single-process batch)."""
        rng = np.random.default_rng([self.config.seed, self.epoch, 13])
        n = len(self.splits["train"])
        self.epoch_views, self.epoch_flips = rng.integers(len(self.train_views), size=n), rng.random(n) < 0.5
        self.epoch_queries = rng.integers(1 << 30, size=n)  # which of its shopper queries each product spells

    def _image_tokens(self, split: str, rows: np.ndarray, augment: bool) -> torch.Tensor:
        if augment and len(self.train_views) > 1:  # each photo in one of its cached views
            tokens = torch.from_numpy(np.stack([self.train_views[v][r] for v, r in zip(self.epoch_views[rows], rows)]).astype(np.float32))
        else:
            tokens = torch.from_numpy(self.grids[split][rows].astype(np.float32))
        if augment:  # horizontal flip of the (square) block map for half of the photos
            h = w = round(tokens.shape[1] ** 0.5)
            flip = torch.from_numpy(self.epoch_flips[rows])
            grid = tokens[flip].view(-1, h, w, tokens.shape[-1]).flip(2)
            tokens[flip] = grid.reshape(-1, h * w, tokens.shape[-1])
        return tokens.to(self.device)

    def _text_tokens(self, rows: np.ndarray, source: TextStates | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        source = source or self.text
        mask = source.mask[rows]
        length = max(1, int(mask.sum(axis=1).max()))  # cached at max length; padding past the longest is dead weight
        states = torch.from_numpy(source.states[rows, :length].astype(np.float32)).to(self.device)
        return states, torch.from_numpy(mask[:, :length]).to(self.device)

    def _encode_prompts(self, concept_ids: list[int]) -> torch.Tensor:
        return self.model.encode_text_tokens(*self._text_tokens(np.asarray(concept_ids), self.prompt_text))

    @torch.no_grad()
    def _embed_images(self, split: str) -> torch.Tensor:
        self.model.eval()
        out = [self.model.encode_image_features(self._image_tokens(split, np.arange(i, min(i + TEXT_BATCH, len(self.grids[split]))),
                                                                   augment=False))
               for i in range(0, len(self.grids[split]), TEXT_BATCH)]  # fmt: skip
        return torch.cat(out).float()

    @torch.no_grad()
    def refresh_prototypes(self) -> None:
        """CVA: each concept's prototypes, picked with the model as it is now."""
        assert self.cva is not None
        self.model.eval()
        prompts = [self._encode_prompts(list(range(i, min(i + TEXT_BATCH, len(self.cva.prompts)))))
                   for i in range(0, len(self.cva.prompts), TEXT_BATCH)]  # fmt: skip
        self.cva.refresh(torch.cat(prompts).float(), self._embed_images("train"))

    def cva_active(self) -> bool:
        return self.cva is not None and self.config.cva_weight > 0 and self.epoch >= self.config.cva_warmup

    def _train_mode(self) -> None:
        """Heads and trained gates (soft masks) in training mode; the towers keep their eval behaviour."""
        self.model.eval()
        for module in [self.model.image_head, self.model.text_head, *self.prune_gates]:
            module.train()

    def batch_losses(self, rows: np.ndarray, cva: bool = False, rng: np.random.Generator | None = None) -> dict[str, Tensor]:
        """The losses of this process's rows of a batch ("total" is what backward runs on).

        The contrastive and attribute losses score the local rows against the global batch, gathered with
        gradient (one process: the batch itself); the mean over processes of "total" is the full batch's loss,
        and DistributedDataParallel's average of the gradients is its gradient.
        """
        states, text_mask = self._text_tokens(self.train_text_rows[rows].numpy())
        query_codes = None
        if self.queries is not None:  # the queries ride in the same text forward as the titles
            _, text_ids, query_codes = self.queries.draw(rows, self.epoch_queries[rows])
            if len(text_ids):
                states, text_mask = concat_padded((states, text_mask), self._text_tokens(text_ids, self.query_text))
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            image, text, scale = self.forward_step(self._image_tokens("train", rows, augment=True), states, text_mask)
        image, text, scale = image.float(), text.float(), scale.float()  # losses and gathers in float32
        text, query = text[: len(rows)], text[len(rows) :]
        # read the gates' masks of this forward before any other text forward (CVA's) replaces them
        prune = (pruning_loss([g.last_mask[: len(rows)] for g in self.prune_gates], text_mask[: len(rows)])
                 if self.prune_gates else None)  # fmt: skip
        all_rows = self.dist.gather_labels(torch.from_numpy(rows).to(self.device)).cpu()
        all_image, all_text = self.dist.gather(image), self.dist.gather(text)
        if self.config.multi_positive:
            ids = self.title_ids[rows].to(self.device)
            itc = multi_positive_info_nce(image, text, ids, scale, (all_image, all_text, self.title_ids[all_rows].to(self.device)))
        else:
            itc = self.itc(image, text, scale)
        losses = {"itc": itc}
        if self.vocab:
            targets = {k: v[all_rows].to(self.device) for k, v in self.attr_targets.items() if k in self.image_attributes.names}
            losses["attr"] = (attribute_loss(self.image_attributes(all_image), targets)
                              + attribute_loss(self.text_attributes(all_text), targets)) / 2  # fmt: skip
        if query_codes is not None:
            # processes may draw different numbers of queries: each sums its own and divides by the global mean
            # count, so the mean over processes is the whole batch's mean (and so is the averaged gradient)
            total = int(self.dist.gather_labels(torch.tensor([len(query_codes)], device=self.device)).sum())
            if len(query_codes):
                positive = torch.from_numpy(self.queries.positives(query_codes, all_rows.numpy())).to(self.device)
                per_query = query_product_loss(query, all_text, all_image, positive, scale, reduction="none")
                losses["query"] = per_query.sum() * self.dist.world_size / total
        if cva:
            losses["cva"] = self.cva.loss(rows, image, self._encode_prompts, scale, rng)
        if prune is not None:
            losses["prune"] = prune
        losses["total"] = (losses["itc"] + self.config.attr_weight * losses.get("attr", 0.0)
                           + self.config.query_weight * losses.get("query", 0.0)
                           + (self.config.cva_weight * losses["cva"] if cva else 0.0)
                           + (self.config.prune_weight * prune if prune is not None else 0.0))  # fmt: skip
        return losses

    def train_epoch(self) -> dict[str, float]:
        sums: dict[str, float] = {}
        self.batches.set_epoch(self.epoch)
        batches = list(self.batches)
        cva = self.cva_active()
        if cva:
            self.refresh_prototypes()
        self._train_mode()
        self._draw_augmentation()
        rng = np.random.default_rng([self.config.seed, self.epoch, 7])
        for rows in tqdm(batches, desc=f"epoch {self.epoch + 1}", disable=not self.progress):
            losses = self.batch_losses(rows, cva, rng)
            self.optimizer.zero_grad(set_to_none=True)
            losses["total"].backward()
            self.optimizer.step()
            self.scheduler.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, float(np.log(100)))
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        return self.dist.mean({f"loss_{k}": v / max(1, len(batches)) for k, v in sums.items()})

    # ------------------------------------------------------------------ validation

    @torch.no_grad()
    def embed_split(self, split: str) -> RetrievalSet:
        self.model.eval()
        products = self.splits[split]
        texts, text_of_product = index_distinct([p.title for p in products])
        rows = self.text.rows(texts)
        text_embs = [self.model.encode_text_tokens(*self._text_tokens(rows[start : start + TEXT_BATCH])).cpu()
                     for start in range(0, len(texts), TEXT_BATCH)]  # fmt: skip
        return RetrievalSet(texts, text_of_product, [p.subcategory for p in products],
                            torch.cat(text_embs).float().numpy(), self._embed_images(split).cpu().numpy())  # fmt: skip

    def encoder(self) -> ModelEncoder:
        return ModelEncoder(self.model, lambda texts: self.model.encode_text(self.tokenizer(texts).to(self.device)),
                            self.preprocess_val, self.device, self.config.model)  # fmt: skip

    def validate(self) -> dict:
        return validation_metrics(self.evaluators, self.encoder(), self.splits["val"], self.embed_split("val"))

    @torch.no_grad()
    def tune_alpha(self) -> dict:
        """α per query kind on val, as the standard trainer does (same evaluators)."""
        return pick_alphas(self.evaluators, self.encoder(), self.splits["val"], self.embed_split("val"))

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        return {
            "config": self.config.to_dict(), "model_name": self.config.model, "pretrained": self.config.pretrained,
            "model_overrides": self.config.model_overrides, "pruning": self.config.prune, "recipe": "cached-token",
            "state_dict": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "best_score": self.best_score,
            "history": self.history, "data_fingerprint": products_fingerprint(self.splits["train"]),
            "attribute_heads": {"image": self.image_attributes.state_dict(), "text": self.text_attributes.state_dict()}
            if self.vocab else None,
        }  # fmt: skip

    def save(self, name: str, extra: dict | None = None) -> Path:
        return save_checkpoint(self.out / name, {**self.state(), **(extra or {})})

    def maybe_resume(self) -> None:
        ckpt = resume_state(self.out / "last.pt", self.device, self.model, self.optimizer, self.scheduler) if self.config.resume else None
        if ckpt is not None:
            self.epoch, self.best_score, self.history = ckpt["epoch"], ckpt["best_score"], ckpt["history"]
            if self.vocab and ckpt.get("attribute_heads"):
                self.image_attributes.load_state_dict(ckpt["attribute_heads"]["image"])
                self.text_attributes.load_state_dict(ckpt["attribute_heads"]["text"])
        if not self.dist.same_everywhere(self.epoch):
            raise UserError(f"the processes resumed from different epochs (rank {self.dist.rank}: {self.epoch}); "
                            "--out must be one folder every process reads")

    # ------------------------------------------------------------------ run

    def fit(self) -> dict:
        self.maybe_resume()
        started = time.perf_counter()
        while self.epoch < self.config.epochs:
            t0 = time.perf_counter()
            losses = self.train_epoch()
            self.epoch += 1
            record: dict = {"epoch": self.epoch, **losses, "seconds": time.perf_counter() - t0}
            self.history.append(record)
            if self.dist.is_main:  # the weights are the same on every process: one validates and writes
                if self.epoch % self.config.val_every == 0 or self.epoch == self.config.epochs:
                    record["val"] = self.validate()
                    log.info("epoch %d val %s", self.epoch, json.dumps(record["val"]))
                    if record["val"]["score"] > self.best_score:
                        self.best_score = record["val"]["score"]
                        self.save("best.pt", {"val": record["val"]})
                self.save("last.pt")
            self.dist.barrier()
        self.stage_seconds["train"] = time.perf_counter() - started
        return self.finish() if self.dist.is_main else {}

    def finish(self) -> dict:
        started = time.perf_counter()
        best = torch.load(self.out / "best.pt", map_location=self.device, weights_only=False)
        self.model.load_state_dict(best["state_dict"])
        pruning = None
        if self.prune_gates:  # trained in; kept at inference only if val says it does not hurt
            report = self.pruning_report()
            self.model.set_pruning(False)
            off = self.validate()
            keep = best["val"]["score"] >= off["score"]
            self.model.set_pruning(keep)
            pruning = {"at_inference": keep, "val_pruning_off": off, "quantile": self.config.prune_quantile,
                       "temperature": self.prune_gates[0].temperature, "thresholds_init": self.prune_init,
                       "thresholds": [float(g.threshold.detach()) for g in self.prune_gates], **report}  # fmt: skip
        alpha = self.tune_alpha()
        self.stage_seconds["tune_alpha"] = time.perf_counter() - started
        summary = {"config": self.config.to_dict(), "recipe": "cached-token", "history": self.history,
                   "val": best["val"], "device": str(self.device), "threads": torch.get_num_threads(),
                   "processes": self.dist.world_size,
                   "train_seconds": sum(r["seconds"] for r in self.history), "alpha": alpha,
                   "stage_seconds": {k: round(v, 1) for k, v in self.stage_seconds.items()},
                   "attribute_classes": {k: len(v) for k, v in self.vocab.items()},
                   "concepts": self.cva.stats() if self.cva is not None else None, "pruning": pruning,
                   "shopper_queries": {"texts": len(self.queries.texts), "products_with_one": int(sum(map(bool, self.queries.choices)))}
                   if self.queries is not None else None,
                   "unlocked": {"image_stages": self.model.image_top_stages, "text_layers": self.model.text_top_layers,
                                "conv_head": any(m is self.model.clip.visual.trunk.conv_head for m in self.tower_groups["image"])}}  # fmt: skip
        extra = {"val": best["val"], "alpha": alpha["alpha"], "alpha_t2p": alpha["alpha_t2p"],
                 "alpha_i2p": alpha["alpha_i2p"], "prune_at_inference": bool(pruning and pruning["at_inference"]),
                 "history": self.history}  # fmt: skip
        self.epoch = best["epoch"]
        self.save("best.pt", extra)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
        return summary


def train_cached_tokens(config: TrainConfig) -> dict:
    """Train; under torchrun, rank 0 returns the summary and the other processes an empty dict."""
    trainer = TokenRecipeTrainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.dist.shutdown()
