"""The splits of one trial on its training device, with their missing-modality masks."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from imder_sweep.data import SPLITS, MultimodalDataset
from imder_sweep.modalities import MODALITIES
from imder_sweep.protocols import SplitMasks, draw_masks, realised_rates
from imder_sweep.train.config import TrialConfig


@dataclass
class SplitData:
    """One split on the training device: inputs (N, L, D_k), labels (N,), masks (N, 3) and,
    under the erasure protocol, time-step masks `steps` (N, 3, L), False = erased."""

    inputs: dict[str, Tensor]
    labels: Tensor
    masks: Tensor
    ids: np.ndarray
    steps: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Inputs, labels and masks of rows `idx`; erased time steps read 0, the padding value
        (selected, not multiplied, so an erased NaN reads 0 too)."""
        inputs = {m: x.index_select(0, idx) for m, x in self.inputs.items()}
        steps = None if self.steps is None else self.steps.index_select(0, idx)
        return (
            _erased(inputs, steps),
            self.labels.index_select(0, idx),
            self.masks.index_select(0, idx),
        )

    def erased_inputs(self) -> dict[str, Tensor]:
        """Every row's inputs as the model sees them (`batch` of all rows), without a copy
        unless time steps are erased."""
        return _erased(self.inputs, self.steps)

    def with_masks(self, masks: SplitMasks) -> SplitData:
        """The same split under other masks (another protocol, or the next epoch's draw)."""
        device = self.labels.device
        steps = None if masks.steps is None else torch.from_numpy(masks.steps).to(device)
        return replace(self, masks=torch.from_numpy(masks.available).to(device), steps=steps)

    def realised(self) -> dict[str, float]:
        """`protocols.realised_rates` of this split's masks."""
        steps = None if self.steps is None else self.steps.cpu().numpy()
        return realised_rates(SplitMasks(self.masks.cpu().numpy(), steps))


def _erased(inputs: dict[str, Tensor], steps: Tensor | None) -> dict[str, Tensor]:
    """`inputs` with the time steps that `steps` (N, 3, L) marks False set to 0."""
    if steps is None:
        return inputs
    return {
        m: torch.where(steps[:, k, :, None], x, x.new_zeros(()))
        for k, (m, x) in enumerate(inputs.items())
    }


def trial_masks(
    cfg: TrialConfig, sizes: dict[str, int], seq_len: int, epoch: int | None = None
) -> dict[str, SplitMasks]:
    """The protocol's masks of a trial (`protocols.draw_masks`); with `epoch`, the training
    split's draw for that epoch (`protocol.resample: epoch`)."""
    return draw_masks(
        cfg.protocol.kind,
        cfg.protocol.parameters(),
        sizes,
        cfg.seed,
        batch_size=cfg.train.batch_size,
        seq_len=seq_len,
        epoch=epoch,
    )


def prepare_splits(
    dataset: MultimodalDataset, cfg: TrialConfig, device: torch.device, *, complete: bool = False
) -> dict[str, SplitData]:
    """Move the splits to `device` with their masks (complete masks for stage (a))."""
    sizes = {s: len(dataset.splits[s]) for s in SPLITS}
    if complete:
        masks = {s: SplitMasks(np.ones((n, 3), dtype=bool)) for s, n in sizes.items()}
    else:
        masks = trial_masks(cfg, sizes, dataset.seq_len)
    out = {}
    for s in SPLITS:
        split = dataset.splits[s]
        with warnings.catch_warnings():
            # Datasets are read-only (memory-mapped); the loop never writes into its inputs,
            # so sharing the buffer instead of copying gigabytes is safe.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            inputs = {m: torch.from_numpy(split.features(m)).to(device) for m in MODALITIES}
        data = SplitData(
            inputs=inputs,
            labels=torch.from_numpy(np.asarray(split.labels, dtype=np.float32)).to(device),
            masks=torch.empty(0, 3, dtype=torch.bool),
            ids=split.ids,
        )
        out[s] = data.with_masks(masks[s])
    return out
