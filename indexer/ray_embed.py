"""Embedding a catalog on Ray Data: the same ProductEmbedder, scheduled over a pool of actors.

`build_index(..., embed_step=RayEmbedding(...))` swaps only the embedding step; the store,
vectors, patches, Faiss indexes, manifest and the atomic switch are the single-process code.

- The driver's products (already read and de-duplicated by `vitrine.catalog` and `build_index`)
  become a Ray dataset of pickled records, `block_size` products a block. Only references travel
  (paths, h5 rows; an in-memory upload's bytes): images are read and decoded in the actors.
- `map_batches` runs `ProductEncoderActor`, a stateful class: each actor loads the bundle once
  (`BundleLoader`) and runs `ProductEmbedder.embed` on its batches, so decoding, preprocessing,
  the ONNX graphs, patch features and the per-row error report are exactly the single-process
  functions. Every input row comes back once, embedded or with its error.
- The driver streams the results into arrays by row number and orders the errors as
  `ProductEmbedder.embed` does (bad data in catalog order, then non-finite embeddings), so the
  result equals the single-process one row for row.
- A block whose actor dies (OOM kill, lost node) is retried on a restarted actor
  (`max_restarts`, `max_task_retries`), and one whose encoder raises is retried too
  (`DataContext.actor_task_retry_on_errors`); after `retries` attempts the build fails and the
  previous version stays live.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitrine.catalog.product import Product
from vitrine.embed import PATCH_DTYPE, EmbeddingResult, ProductEmbedder, ProductError
from vitrine.errors import UserError
from vitrine.protocols import ServingEncoder

LOCAL = "local"  # `--ray` without an address: start a Ray instance on this machine
DEFAULT_BLOCK_SIZE = 256  # products per dataset block: one actor task, one retry unit
EMBEDDING_STAGE = "embedding"  # ProductEmbedder reports non-finite vectors after all bad data


@dataclass(frozen=True)
class BundleLoader:
    """Opens the bundle inside an actor (picklable: a path, not sessions)."""

    path: Path
    threads: int = 1
    device: str = "cpu"

    def __call__(self) -> ServingEncoder:
        from vitrine.runtime import load_bundle

        return load_bundle(self.path, threads=self.threads, device=self.device)


@dataclass(frozen=True)
class RayOptions:
    """How the embedding step is spread: actors, threads and GPUs per actor, blocks, retries."""

    actors: int = 1  # actor pool size (concurrent encoders)
    threads_per_actor: int = 1  # ORT intra-op and image-decoding threads; also the CPUs each actor reserves
    gpus_per_actor: float = 0.0  # > 0: reserve GPUs and run the bundle on onnxruntime's CUDA provider
    block_size: int = DEFAULT_BLOCK_SIZE
    retries: int = 3  # actor restarts and retries of a block's task, failures and exceptions alike

    def __post_init__(self) -> None:
        if self.actors < 1 or self.threads_per_actor < 1 or self.block_size < 1 or self.retries < 0:
            raise ValueError(f"bad Ray options {self}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"GPUs per actor must be >= 0, got {self.gpus_per_actor}")


@dataclass
class RayRunStats:
    """What the last run measured: wall time on the driver and time the actors spent embedding."""

    products: int = 0
    blocks: int = 0
    wall_seconds: float = 0.0
    actor_seconds: float = 0.0  # summed over blocks: ProductEmbedder.embed time inside the actors
    first_block_started_seconds: float | None = None  # until an actor started its first block (start-up, bundle load)
    last_block_finished_seconds: float | None = None  # until the last block was embedded
    first_result_seconds: float | None = None  # until the driver got its first block back
    feed_seconds: float = 0.0  # the driver pickling the products into the dataset
    collect_seconds: float = 0.0  # the driver placing the returned rows
    record_bytes: int = 0  # pickled product records put into the dataset


class ProductEncoderActor:
    """The map_batches UDF: one bundle per actor, `ProductEmbedder.embed` per batch."""

    def __init__(self, load_encoder: Callable[[], ServingEncoder], batch_size: int, threads: int) -> None:
        self.embedder = ProductEmbedder(load_encoder(), batch_size=batch_size, threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.asarray(batch["row"], np.int64)
        products: list[Product] = [pickle.loads(data) for data in batch["product"]]
        started = time.time()  # wall clock, comparable across processes: when blocks ran, not only how long
        result = self.embedder.embed(products)
        out = _rows_of(result, products, rows, self.embedder)
        out["block_started"], out["block_finished"] = np.full(len(rows), started), np.full(len(rows), time.time())
        return out


def _rows_of(
    result: EmbeddingResult, products: Sequence[Product], rows: np.ndarray, embedder: ProductEmbedder
) -> dict[str, np.ndarray]:
    """One output row per input row: the embedding, or zeros and the row's error."""
    n, dim = len(products), embedder.dim
    at = {p.id: k for k, p in enumerate(products)}
    text = np.zeros((n, dim), np.float32)
    image = np.zeros((n, dim), np.float32)
    image_ref = np.full(n, "", dtype=object)
    content_hash = np.full(n, "", dtype=object)
    stage = np.full(n, "", dtype=object)
    message = np.full(n, "", dtype=object)
    kept = np.array([at[p.id] for p in result.products], np.int64)
    if kept.size:
        text[kept], image[kept] = result.text, result.image
        image_ref[kept] = [json.dumps(ref) for ref in result.image_refs]
        content_hash[kept] = result.content_hashes
    for error in result.errors:
        stage[at[error.id]], message[at[error.id]] = error.stage, error.message
    out = {
        "row": rows, "ok": stage == "", "stage": stage, "message": message, "text": text, "image": image,
        "image_ref": image_ref, "content_hash": content_hash,
    }  # fmt: skip
    if embedder.patch_spec is not None:
        patches = np.zeros((n, *embedder.patch_spec.shape), PATCH_DTYPE)
        if kept.size:
            patches[kept] = result.patches
        out["patches"] = patches
    return out


@dataclass
class RayEmbedding:
    """An `indexer.build.EmbeddingStep`: embeds products with a pool of Ray actors.

    `load_encoder` opens the encoder inside each actor (a `BundleLoader` for a bundle); the
    driver's `ProductEmbedder` (given by build_index) only supplies batch size, dim and patch spec.
    Needs a connected Ray (`ray_session`).
    """

    load_encoder: Callable[[], ServingEncoder]
    options: RayOptions = field(default_factory=RayOptions)
    progress: bool = False
    stats: RayRunStats = field(default_factory=RayRunStats)

    def __call__(self, embedder: ProductEmbedder, products: Sequence[Product]) -> EmbeddingResult:
        import ray.data

        start, start_epoch = time.perf_counter(), time.time()
        opts, n = self.options, len(products)
        self.stats = RayRunStats(products=n, blocks=-(-n // opts.block_size))
        context = ray.data.DataContext.get_current()
        saved = (context.actor_task_retry_on_errors, context.enable_progress_bars)
        context.actor_task_retry_on_errors = opts.retries > 0  # an encoder exception: retry the block
        context.enable_progress_bars = self.progress
        try:
            # References, not pixels, cross the object store (~0.3 KB a product, spilled to disk when it fills);
            # results stream back a block at a time under Ray Data's backpressure.
            items = [{"row": i, "product": pickle.dumps(p)} for i, p in enumerate(products)]
            self.stats.record_bytes = sum(len(item["product"]) for item in items)
            dataset = ray.data.from_items(items, override_num_blocks=self.stats.blocks)
            del items
            self.stats.feed_seconds = time.perf_counter() - start
            with warnings.catch_warnings():
                # Ray Data restarts actors and retries blocks without bound by default; bounding them still takes
                # max_restarts / max_task_retries as ray_remote_args, deprecated (without a replacement yet) in 2.60.
                warnings.simplefilter("ignore", DeprecationWarning)
                encoded = dataset.map_batches(
                    ProductEncoderActor,
                    fn_constructor_kwargs={"load_encoder": self.load_encoder, "batch_size": embedder.batch_size,
                                           "threads": opts.threads_per_actor},
                    batch_size=opts.block_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=opts.actors),
                    num_cpus=opts.threads_per_actor, num_gpus=opts.gpus_per_actor or None,
                    max_restarts=opts.retries, max_task_retries=opts.retries,
                )  # fmt: skip
            result = self._collect(embedder, products, encoded.iter_batches(batch_size=None, batch_format="numpy"), start,
                                   start_epoch)  # fmt: skip
        finally:
            context.actor_task_retry_on_errors, context.enable_progress_bars = saved
        self.stats.wall_seconds = time.perf_counter() - start
        result.seconds = self.stats.wall_seconds
        return result

    def _collect(self, embedder: ProductEmbedder, products: Sequence[Product],
                 batches: Iterator[dict[str, np.ndarray]], start: float, start_epoch: float) -> EmbeddingResult:  # fmt: skip
        """Place each returned row at its row number; rows of a retried block count once."""
        n, dim, spec = len(products), embedder.dim, embedder.patch_spec
        text = np.zeros((n, dim), np.float32)
        image = np.zeros((n, dim), np.float32)
        patches = np.empty((n, *spec.shape), PATCH_DTYPE) if spec is not None else None  # untouched pages cost nothing
        seen = np.zeros(n, bool)
        ok = np.zeros(n, bool)
        refs: dict[int, tuple[dict[str, Any], str]] = {}
        errors: dict[int, ProductError] = {}
        blocks: set[tuple[float, float]] = set()  # (started, finished) of each embedded block
        for batch in batches:
            placing = time.perf_counter()
            if self.stats.first_result_seconds is None:
                self.stats.first_result_seconds = placing - start
            rows = batch["row"]
            seen[rows] = True
            blocks.update(zip(batch["block_started"].tolist(), batch["block_finished"].tolist()))
            good = batch["ok"].astype(bool)
            ok[rows] = good
            text[rows[good]], image[rows[good]] = batch["text"][good], batch["image"][good]
            if patches is not None:
                patches[rows[good]] = batch["patches"][good]
            for k in np.flatnonzero(good):
                refs[int(rows[k])] = (json.loads(batch["image_ref"][k]), str(batch["content_hash"][k]))
            for k in np.flatnonzero(~good):
                row = int(rows[k])
                errors[row] = ProductError(id=products[row].id, stage=str(batch["stage"][k]), message=str(batch["message"][k]))
            self.stats.collect_seconds += time.perf_counter() - placing
        if blocks:
            self.stats.actor_seconds = sum(finished - started for started, finished in blocks)
            self.stats.first_block_started_seconds = min(started for started, _ in blocks) - start_epoch
            self.stats.last_block_finished_seconds = max(finished for _, finished in blocks) - start_epoch
        if not seen.all():  # Ray lost no block unless something is badly wrong: never index a partial catalog
            raise RuntimeError(f"Ray returned {int(seen.sum()):,} of {n:,} products")
        kept = np.flatnonzero(ok)
        ordered = sorted(errors.items(), key=lambda item: (item[1].stage == EMBEDDING_STAGE, item[0]))
        return EmbeddingResult(
            products=[products[i] for i in kept],
            image_refs=[refs[i][0] for i in kept],
            content_hashes=[refs[i][1] for i in kept],
            text=text[kept],
            image=image[kept],
            errors=[error for _, error in ordered],
            patches=patches[kept] if patches is not None else None,
        )


@contextmanager
def ray_session(address: str | None = LOCAL, *, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to the Ray cluster at `address`, or start a local instance (`LOCAL`/None) and stop it afterwards.

    A local instance listens on 127.0.0.1 only and starts no dashboard. An existing connection
    (ray.init done by the caller) is used as it is and left open.
    """
    try:
        import ray
    except ImportError as exc:  # the extra is optional: say how to get it
        raise UserError('--ray needs Ray Data: pip install "vitrine[ray]"') from exc
    local = address in (None, LOCAL)
    if num_cpus is not None and not local:
        raise UserError("--ray-cpus sizes a local Ray instance; a cluster at an address has its own CPUs")
    if ray.is_initialized():
        yield
        return
    if local:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level=logging.WARNING, configure_logging=False)  # fmt: skip
    else:
        ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
