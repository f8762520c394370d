"""Data-parallel training under torchrun, as open_clip's training runs.

torchrun starts one process per device and tells each its place in the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `Distributed.from_env()` reads it; without
torchrun it is the single process (rank 0 of 1) and every method below is the identity, so the
single-process and the distributed run share one code path.

Backend: nccl on CUDA (device cuda:LOCAL_RANK), gloo on the CPU. The contrastive losses see the whole
global batch: features are all-gathered with gradient (`all_gather_single`, torch's replacement for the
`torch.distributed.nn.all_gather` open_clip calls; its backward sums every process's gradient of this
process's share), labels and title ids without.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:  # torch >= 2.15
    from torch.distributed._functional_collectives import all_gather_single
except ImportError:  # older torch: the autograd-aware gather open_clip uses (same gradient: the sum over processes)
    from torch.distributed.nn.functional import all_gather as _all_gather_list

    def all_gather_single(tensor: Tensor, gather_dim: int, group) -> Tensor:
        return torch.cat(_all_gather_list(tensor, group=group), dim=gather_dim)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: rank `rank` of `world_size`, device index `local_rank` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        """What torchrun (or any launcher setting its variables) says; one process without them."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 validates, writes checkpoints and the summary, and logs."""
        return self.rank == 0

    def setup(self, device: str) -> torch.device:
        """The process's device (`auto`: cuda:LOCAL_RANK when CUDA is there), and the process group when distributed."""
        cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        if device not in ("auto", "cuda"):
            chosen = torch.device(device)
        else:
            chosen = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if chosen.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)
            log.info("process group: rank %d of %d, backend %s, device %s", self.rank, self.world_size, backend, chosen)
        return chosen

    def shutdown(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block in three waves: rank 0 first (it fills the feature caches), then the first process of
        every other node (a node without the shared filesystem fills its own), then the rest (they read them)."""
        wave = 0 if self.is_main else 1 if self.local_rank == 0 else 2
        for _ in range(wave):
            self.barrier()
        yield
        for _ in range(2 - wave):
            self.barrier()

    def gather(self, tensor: Tensor) -> Tensor:
        """Every process's `tensor`, concatenated in rank order along dim 0, with gradient to this one's share."""
        if not self.enabled:
            return tensor
        return all_gather_single(tensor.contiguous(), 0, dist.group.WORLD)

    @torch.no_grad()
    def gather_labels(self, tensor: Tensor) -> Tensor:
        """`gather` without gradient: labels, title ids, attribute targets."""
        if not self.enabled:
            return tensor
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor.contiguous())
        return torch.cat(out, dim=0)

    @staticmethod
    def _collective_device() -> torch.device:
        """Where a tensor made for a collective lives: nccl reduces CUDA tensors only."""
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def same_everywhere(self, value: int) -> bool:
        """Whether every process holds `value` (the epoch each resumed from)."""
        if not self.enabled:
            return True
        return bool((self.gather_labels(torch.tensor([value], device=self._collective_device())) == value).all())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over processes of per-process numbers (the epoch's logged losses)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        buffer = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(buffer)
        return {k: float(v) / self.world_size for k, v in zip(keys, buffer.cpu().tolist())}

    @torch.no_grad()
    def broadcast(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers of `module` on every process (a module DistributedDataParallel does not wrap)."""
        if self.enabled:
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def wrap(self, module: nn.Module, device: torch.device, **ddp_options) -> nn.Module:
        """DistributedDataParallel around `module` when distributed: it broadcasts rank 0's weights now and
        averages the gradients of its trainable parameters during every backward."""
        if not self.enabled:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, **ddp_options)
