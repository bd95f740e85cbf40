"""Recovery health in the loop: every validation evaluation of stage (b) says, per missing
modality, whether the recovered features are closer to the truth than the training-set mean and
whether the score nets denoise at all (`imder_sweep.health` holds the numbers' definitions).

The probe reads what the evaluation's forward pass already produced (the recovered features the
fusion sees, after D_k of eq. 17, and the sampler's x~_k of eq. 14 before it) and adds the score
nets' denoising loss (eqs. 13, 18) at fixed times on fixed noise of its own. It never draws from
torch's global RNG or from a training or prediction stream, so training with it on or off is
the same training, bit for bit.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from imder_sweep.health import denoising_loss_by_time, recovery_health
from imder_sweep.modalities import MODALITIES
from imder_sweep.model import IMDer
from imder_sweep.train.config import TrialConfig
from imder_sweep.train.splits import SplitData


def health_generator_seed(seed: int, split: str, modality: str) -> int:
    """Noise of the denoising-loss buckets of one (seed, split, modality): the same at every
    epoch, so the buckets compare across epochs, and apart from every training stream and the
    prediction noise (`evaluate.eval_generator_seed`), which are small integers or drawn."""
    digest = hashlib.sha256(f"recovery-health\0{seed}\0{split}\0{modality}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: a valid manual_seed


@torch.no_grad()
def encoded_stats(
    model: IMDer, data: SplitData, observed_only: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-element mean and (population) variance over the samples of `data` of the encoded
    features, each (3, d, L') in l, a, v order: the "mean" baseline's fill and the reference
    that health's R^2 is measured against, and the Gaussian of the prior score. The encoders
    run in eval mode (no dropout draw); the model's mode is restored. With `observed_only`
    (`train.recovery_targets: observed_only`), each modality's over the samples that have it
    only: no missing value is read."""
    was_training = model.training
    model.eval()
    feats = model.encode(data.erased_inputs())  # modality -> (N, d, L'), row by row
    model.train(was_training)
    if observed_only:
        feats = {m: feats[m][data.masks[:, k]] for k, m in enumerate(MODALITIES)}
    # A modality no sample has (e.g. fixed subset "l", observed only) has no statistics: 0, 1.
    mean = torch.stack(
        [f.mean(dim=0) if len(f) else f.new_zeros(f.shape[1:]) for f in feats.values()]
    )
    var = torch.stack(
        [f.var(dim=0, correction=0) if len(f) else f.new_ones(f.shape[1:]) for f in feats.values()]
    )
    return mean, var


def encoded_mean(model: IMDer, data: SplitData) -> Tensor:
    """The mean of `encoded_stats`, (3, d, L')."""
    return encoded_stats(model, data)[0]


@torch.no_grad()
def missing_targets(
    model: IMDer, data: SplitData, batch_size: int
) -> dict[str, tuple[Tensor, Tensor]]:
    """modality -> (x0, cond), both (n_k, d, L'): the true encoded features of the rows of
    `data` that miss the modality, in row order, and their condition built from the available
    modalities exactly as training builds it (`IMDer.condition`, sec 3.4). Modalities no row
    misses are left out. Call in eval mode."""
    got: dict[str, tuple[list[Tensor], list[Tensor]]] = {m: ([], []) for m in MODALITIES}
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)), device=data.labels.device)
        inputs, _, masks = data.batch(idx)
        feats = model.encode(inputs)  # modality -> (B, d, L')
        for k, m in enumerate(MODALITIES):
            rows = (~masks[:, k]).nonzero().squeeze(1)  # (n,)
            if rows.numel():
                got[m][0].append(feats[m].index_select(0, rows))
                got[m][1].append(model.condition(feats, masks, m).index_select(0, rows))
    return {m: (torch.cat(x0), torch.cat(cond)) for m, (x0, cond) in got.items() if x0}


def feature_health(
    recovered: dict[str, dict[str, np.ndarray]], train_mean: Tensor
) -> dict[str, float]:
    """`health_{mse,r2,corr}_{m}` of what the fusion sees and, where the sampler ran,
    `health_sampler_{mse,r2,corr}_{m}` of its output; R^2 against `train_mean` (3, d, L').

    recovered: modality -> {"recovered", "true"[, "sampled"]: (n_k, d, L')}, `predict`'s
    collected features."""
    out: dict[str, float] = {}
    for m, got in recovered.items():
        mean = train_mean[MODALITIES.index(m)]  # (d, L')
        for key, prefix in (("recovered", "health"), ("sampled", "health_sampler")):
            if key in got:
                h = recovery_health(got[key], got["true"], mean)
                out |= {f"{prefix}_{name}_{m}": getattr(h, name) for name in ("mse", "r2", "corr")}
    return out


@dataclass
class HealthProbe:
    """Recovery health of one split (validation) for every evaluation of a stage.

    `train_mean` (3, d, L') is the training split's encoded mean, computed once when the
    encoders are frozen (stage (b)'s default); with trainable encoders, `train` is kept and the
    mean is recomputed at every evaluation. `condition_noise` perturbs the condition of the
    denoising loss as training does (cfg.model.score_loss.condition_noise)."""

    split: str
    seed: int
    batch_size: int
    condition_noise: Literal["same", "independent", "clean"]
    train_mean: Tensor | None
    train: SplitData | None = None

    @classmethod
    def build(
        cls, model: IMDer, train: SplitData, split: str, seed: int, batch_size: int
    ) -> HealthProbe:
        frozen = not any(p.requires_grad for p in model.encoders.parameters())
        return cls(
            split=split,
            seed=seed,
            batch_size=batch_size,
            condition_noise=model.cfg.score_loss.condition_noise,
            train_mean=encoded_mean(model, train) if frozen else None,
            train=None if frozen else train,
        )

    def metrics(
        self, model: IMDer, data: SplitData, recovered: dict[str, dict[str, np.ndarray]]
    ) -> dict[str, float]:
        """Feature health of `recovered` (the evaluation's collected features of `data`) and,
        when the model has score nets, their denoising loss by time."""
        mean = self.train_mean if self.train is None else encoded_mean(model, self.train)
        out = feature_health(recovered, mean)
        if model.score is not None:
            out |= self.denoising(model, data)
        return out

    def denoising(self, model: IMDer, data: SplitData) -> dict[str, float]:
        """`dsm_{m}_t{t}` and `dsm_gauss_{m}_t{t}` per missing modality (eqs. 13, 18 on the
        rows of `data` that miss m), and `dsm_zero`, each modality on its own fixed noise; of the
        net the sampler uses (the EMA copy when there is one)."""
        model.eval()
        out: dict[str, float] = {}
        for m, (x0, cond) in missing_targets(model, data, self.batch_size).items():
            gen = torch.Generator(device=x0.device)
            gen.manual_seed(health_generator_seed(self.seed, self.split, m))
            by_time = denoising_loss_by_time(
                model.sampling_net(m),
                model.sde,
                x0,
                cond,
                generator=gen,
                condition_noise=self.condition_noise,
                batch_size=self.batch_size,
            )
            for t, loss, gauss in zip(by_time.times, by_time.loss, by_time.gaussian, strict=True):
                out[f"dsm_{m}_t{t:g}"], out[f"dsm_gauss_{m}_t{t:g}"] = loss, gauss
            out["dsm_zero"] = by_time.zero
        return out


def stage_probe(
    model: IMDer, splits: dict[str, SplitData], cfg: TrialConfig, batch_size: int
) -> HealthProbe | None:
    """The probe of a stage's validation evaluations, or None: `train.recovery_health` off, or
    no validation row misses a modality (stage (a), MR 0), so there is nothing to recover."""
    if not cfg.train.recovery_health or bool(splits["valid"].masks.all()):
        return None
    return HealthProbe.build(model, splits["train"], "valid", cfg.seed, batch_size)
