"""Stage (b) as one rank of a data-parallel run (e.g. DDP under Ray Train): its shard of each
epoch and the training metrics of all ranks together."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from imder_sweep.util import ConfigError


@dataclass(frozen=True)
class DataParallel:
    """Stage (b) as one of `world_size` data-parallel processes (e.g. DDP under Ray Train).

    Every rank draws the same shuffled order each epoch and trains on its own equal-sized slice of
    it, with the masks fixed per sample; validation, early stopping and the best checkpoint run on
    the full splits on every rank, so all ranks stop at the same epoch and report equally often.
    `wrap` turns the model into the module whose forward synchronises gradients.
    """

    rank: int
    world_size: int
    wrap: Callable[[torch.nn.Module], torch.nn.Module]

    def check_batch(self, batch_size: int) -> None:
        """`train.batch_size` is the global batch: each rank takes an equal share of it."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"train.batch_size: {batch_size} is not divisible by {self.world_size} "
                "workers (batch_size is the global batch)"
            )

    def shard(self, order: Tensor) -> Tensor:
        # The same number of batches on every rank: the last len(order) % world_size samples of
        # this epoch's order are left out (a different few each epoch). Rank r's i-th sample of
        # its k-th batch is sample r + world_size * i of the k-th global batch.
        usable = len(order) // self.world_size * self.world_size
        return order[self.rank : usable : self.world_size]

    def reduce(self, metrics: dict[str, float], device: torch.device) -> dict[str, float]:
        """Training metrics of the whole global batch stream: per-sample means averaged over
        ranks (every rank saw as many samples), NFE summed. `device`: the model's (NCCL
        reduces GPU tensors only)."""
        import torch.distributed as dist

        keys = sorted(metrics)
        values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(values)
        return {
            k: float(v) if k == "nfe" else float(v) / self.world_size
            for k, v in zip(keys, values.tolist(), strict=True)
        }
