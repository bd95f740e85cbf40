"""A training stage's progress and its resumable state (`state.pt`), written and read here only.

A stage selects its best epoch on validation only and stops early after `train.early_stop`
epochs without improvement; both survive a resume, so a resumed stage decides exactly as one
uninterrupted process would.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imder_sweep.train.config import TrialConfig
from imder_sweep.util import atomic_path, is_better

STATE_FILE = "state.pt"  # in the loop's `<stage>-state` directory


def atomic_torch_save(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


@dataclass
class Progress:
    """Where a stage stands after `epoch` epochs: its per-epoch rows and its best epoch so far
    (value of the selection metric, epoch, valid metrics, state dict on the CPU)."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_state: dict[str, Tensor] = field(default_factory=dict)
    since_best: int = 0  # epochs since the best one

    def record(
        self,
        epoch: int,
        valid: dict[str, float],
        value: float,
        model: torch.nn.Module,
        mode: str,
    ) -> None:
        """Epoch `epoch` ended with validation metrics `valid`; `value` is the one selected on."""
        self.epoch = epoch
        if is_better(value, self.best_value, mode):
            self.best_value, self.best_epoch, self.since_best = value, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            self.best_metrics = dict(valid)
        else:
            self.since_best += 1

    def done(self, epochs: int, early_stop: int) -> bool:
        """The loop's own stop: the last epoch, or `early_stop` epochs without improvement."""
        return self.epoch >= epochs or self.since_best >= early_stop


@dataclass
class LoopState:
    """Everything a stage needs to go on after its last finished epoch exactly as if it had not
    stopped: its progress, the module, optimiser and scheduler states, and the random states
    (the epoch order's generator and torch's global CPU generator)."""

    stage: str
    progress: Progress
    model: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    order_rng: Tensor
    torch_rng: Tensor
    config: dict[str, Any]  # the resolved trial config

    @classmethod
    def capture(
        cls,
        stage: str,
        progress: Progress,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.ReduceLROnPlateau,
        order_gen: torch.Generator,
        cfg: TrialConfig,
    ) -> LoopState:
        return cls(
            stage=stage,
            progress=progress,
            model=model.state_dict(),
            optimizer=opt.state_dict(),
            scheduler=sched.state_dict(),
            order_rng=order_gen.get_state(),
            torch_rng=torch.get_rng_state(),
            config=cfg.model_dump(mode="json"),
        )

    def restore(
        self,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        sched: torch.optim.lr_scheduler.ReduceLROnPlateau,
        order_gen: torch.Generator,
    ) -> Progress:
        """Put the saved states back into the stage's objects; returns its progress."""
        model.load_state_dict(self.model)
        opt.load_state_dict(self.optimizer)
        sched.load_state_dict(self.scheduler)
        # CPU generators' states, wherever the file was mapped to.
        order_gen.set_state(self.order_rng.cpu())
        torch.set_rng_state(self.torch_rng.cpu())
        return self.progress

    def save(self, path: Path) -> None:
        """One flat mapping: the progress fields (`epoch`, `history`, `best_state`, ...) next to
        `stage`, `model`, `optimizer`, `scheduler`, `order_rng`, `torch_rng` and `config`."""
        # Not dataclasses.asdict: it would deep-copy every tensor of the state dicts.
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "progress"}
        flat.update({f.name: getattr(self.progress, f.name) for f in fields(Progress)})
        atomic_torch_save(path, flat)

    @classmethod
    def load(cls, path: Path, device: torch.device | str = "cpu") -> LoopState:
        flat = torch.load(path, map_location=device, weights_only=True)
        progress = Progress(**{f.name: flat.pop(f.name) for f in fields(Progress)})
        return cls(progress=progress, **flat)
