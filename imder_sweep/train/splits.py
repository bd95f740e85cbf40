"""The splits of one trial on its training device, with their fixed missing-modality masks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from imder_sweep.data import SPLITS, MultimodalDataset
from imder_sweep.modalities import MODALITIES
from imder_sweep.protocols import split_masks
from imder_sweep.train.config import TrialConfig


@dataclass
class SplitData:
    """One split on the training device: inputs (N, L, D_k), labels (N,), masks (N, 3)."""

    inputs: dict[str, Tensor]
    labels: Tensor
    masks: Tensor
    ids: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        return (
            {m: x.index_select(0, idx) for m, x in self.inputs.items()},
            self.labels.index_select(0, idx),
            self.masks.index_select(0, idx),
        )


def prepare_splits(
    dataset: MultimodalDataset, cfg: TrialConfig, device: torch.device, *, complete: bool = False
) -> dict[str, SplitData]:
    """Move the splits to `device` with their fixed masks (complete masks for stage (a))."""
    sizes = {s: len(dataset.splits[s]) for s in SPLITS}
    if complete:
        masks = {s: np.ones((n, 3), dtype=bool) for s, n in sizes.items()}
    else:
        masks = split_masks(
            sizes=sizes, seed=cfg.seed, batch_size=cfg.train.batch_size, **cfg.protocol.masks_args()
        )
    out = {}
    for s in SPLITS:
        split = dataset.splits[s]
        with warnings.catch_warnings():
            # Datasets are read-only (memory-mapped); the loop never writes into its inputs,
            # so sharing the buffer instead of copying gigabytes is safe.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            inputs = {m: torch.from_numpy(split.features(m)).to(device) for m in MODALITIES}
        out[s] = SplitData(
            inputs=inputs,
            labels=torch.from_numpy(np.asarray(split.labels, dtype=np.float32)).to(device),
            masks=torch.from_numpy(masks[s]).to(device),
            ids=split.ids,
        )
    return out
