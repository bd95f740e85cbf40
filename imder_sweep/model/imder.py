"""The IMDer model (paper sec 3.2-3.5): encode, recover every missing modality, fuse, predict.

Missing data is per sample: a (B, 3) availability mask (columns l, a, v). For each modality k the
samples missing k are recovered together in one sampler run, each conditioned on its own
available modalities (eq. 15: one modality as is, two fused by concat + 1x1 conv), so a batch of
mixed patterns costs at most three sampler runs, never one per sample. With a Generator, every
sample's noise is drawn from its own row of a full-batch draw on a per-modality stream, so what a
sample gets never depends on which other samples share its batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imder_sweep.losses import sample_time, score_matching_loss
from imder_sweep.modalities import MODALITIES
from imder_sweep.model.config import ModelConfig, SamplerConfig
from imder_sweep.model.fusion import MulTFusion
from imder_sweep.model.reconstruction import Reconstruction
from imder_sweep.model.recovery import PriorScore, StaticRecovery, bucket_size, solve
from imder_sweep.model.score_net import ConditionalScoreUNet
from imder_sweep.sde import VESDE, build_sde

# The two modalities that condition the recovery of each one, in the release's concat order.
CONDITIONS: dict[str, tuple[str, str]] = {"l": ("v", "a"), "a": ("l", "v"), "v": ("l", "a")}


@dataclass
class IMDerOutput:
    pred: Tensor  # (B,) sentiment regression
    loss_score: Tensor  # (B,) sum over the sample's missing modalities of eq. 13 (0 if complete)
    loss_rec: Tensor  # (B,) sum over the sample's missing modalities of the MSE of eq. 17
    features: dict[str, Tensor]  # modality -> (B, d, L') true encoded features
    recovered: dict[str, Tensor] = field(default_factory=dict)  # modality -> (n_k, d, L')
    recovered_rows: dict[str, Tensor] = field(default_factory=dict)  # modality -> (n_k,) rows
    # modality -> (n_k, d, L'): the sampler's x~_k (eq. 14) before D_k; diffusion modes only
    sampled: dict[str, Tensor] = field(default_factory=dict)
    nfe: int = 0  # score evaluations spent sampling this batch (one per sampler run and step)
    # Sum over the sampler runs of NFE x the rows recovered: the network evaluations the batch's
    # samples got, so / B is the NFE per sample (two missing modalities: twice the steps).
    nfe_rows: int = 0


class _RowNoise:
    """N(0, I) for `rows` of a batch of `batch` examples: each call draws the full batch from
    `generator` and keeps the rows, so a row's noise does not depend on the other rows."""

    def __init__(self, generator: torch.Generator, batch: int, rows: Tensor) -> None:
        self.generator, self.batch, self.rows = generator, batch, rows

    def __call__(self, like: Tensor) -> Tensor:
        full = torch.randn(
            (self.batch, *like.shape[1:]),
            device=like.device,
            dtype=like.dtype,
            generator=self.generator,
        )
        return full.index_select(0, self.rows)


def _plain_noise(like: Tensor) -> Tensor:
    return torch.randn_like(like)


RECOVERY_TARGETS: tuple[str, str] = ("simulated", "observed_only")


class IMDer(nn.Module):
    """`recovery_targets` (`train.recovery_targets`): what L_score and L_rec learn from.
    "simulated" (the paper): the simulated-missing modality's ground truth, at the rows that
    miss it. "observed_only": for each modality k, only the rows that have k and at least one
    other modality, with k hidden from its condition (the row's other observed modalities);
    rows missing k add no recovery loss, and the features of a missing modality are set to 0
    before anything reads them, so no loss and no prediction ever reads a missing value."""

    def __init__(self, cfg: ModelConfig, recovery_targets: str = "simulated") -> None:
        super().__init__()
        if recovery_targets not in RECOVERY_TARGETS:
            raise ValueError(
                f"recovery_targets must be one of {', '.join(RECOVERY_TARGETS)}, got "
                f"{recovery_targets!r}"
            )
        self.cfg = cfg
        self.recovery_targets = recovery_targets
        d, length = cfg.d_model, cfg.feature_len
        self.sde = build_sde(cfg.sde.kind, sigma=cfg.sde.sigma)
        self.encoders = nn.ModuleDict(
            {
                m: nn.Conv1d(dim, d, kernel_size=cfg.encoder_kernel, padding=0, bias=False)
                for m, dim in zip(MODALITIES, cfg.dims, strict=True)
            }
        )
        self.pair_convs = nn.ModuleDict(
            {"".join(CONDITIONS[m]): nn.Conv1d(2 * d, d, 1) for m in MODALITIES}
        )
        uses_score = cfg.recovery in ("diffusion+reconstruction", "diffusion")
        uses_rec = cfg.recovery in ("diffusion+reconstruction", "reconstruction")
        self.score = (
            nn.ModuleDict(
                {m: ConditionalScoreUNet(cfg.score_net, d, length, self.sde) for m in MODALITIES}
            )
            if uses_score
            else None
        )
        # The EMA copy the sampler uses (score_net.ema); never trained by the optimiser.
        self.score_ema = None
        if self.score is not None and cfg.score_net.ema is not None:
            self.score_ema = copy.deepcopy(self.score).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.rec = (
            nn.ModuleDict({m: Reconstruction(cfg.reconstruction, d) for m in MODALITIES})
            if uses_rec
            else None
        )
        self.fusion = MulTFusion(cfg.fusion, d)
        # (modality, sampler, bucket size, device, dtype) -> its static-shape sampler
        self._static: dict[
            tuple[str, SamplerConfig, int, torch.device, torch.dtype], StaticRecovery
        ] = {}
        # Training-set mean of the encoded features, for the "mean" baseline (set by the trainer).
        self.register_buffer("feature_mean", torch.zeros(len(MODALITIES), d, length))
        if self.needs_feature_stats:
            # ... and their variance, for the prior score, EDM's sigma_data and sigma_from_data.
            self.register_buffer("feature_var", torch.ones(len(MODALITIES), d, length))
        if cfg.sde.sigma_from_data is not None:
            self.register_buffer("sde_sigma", torch.tensor(cfg.sde.sigma, dtype=torch.float64))
            self.register_load_state_dict_post_hook(_apply_loaded_sigma)

    @property
    def needs_feature_stats(self) -> bool:
        """Whether recovery reads the training features' mean and variance (set_feature_stats)."""
        c = self.cfg
        return self.score is not None and (
            c.sampler.prior_score_above is not None
            or c.score_net.parameterization == "edm"
            or c.sde.sigma_from_data is not None
        )

    def set_feature_stats(self, mean: Tensor, var: Tensor) -> None:
        """The training split's per-element mean and variance of the encoded features, both
        (3, d, L') in l, a, v order, set once at the start of stage (b) (encoders frozen):
        the mean baseline's fill, the prior score's Gaussian, EDM's sigma_data (each
        modality's RMS) and, with `sde.sigma_from_data`, the SDE's sigma."""
        self.feature_mean.copy_(mean)
        if not self.needs_feature_stats:
            return
        self.feature_var.copy_(var)
        if self.cfg.score_net.parameterization == "edm":
            rms = (var + mean**2).flatten(1).mean(dim=1).sqrt()  # (3,)
            for nets in (self.score, self.score_ema):
                for k, m in enumerate(MODALITIES):
                    if nets is not None:
                        nets[m].sigma_data.fill_(float(rms[k]))
        if self.cfg.sde.sigma_from_data is not None:
            std = float(var.flatten(1).mean(dim=1).sqrt().max())
            self.sde_sigma.fill_(sigma_for_prior_std(self.cfg.sde.sigma_from_data * std))
            self.set_sigma(float(self.sde_sigma))

    def set_sigma(self, sigma: float) -> None:
        """Replace the VE SDE by one of this sigma, in the model and every score net."""
        self.sde = VESDE(sigma)
        for nets in (self.score, self.score_ema):
            for net in (nets or {}).values():
                net.sde = self.sde
        self._static.clear()

    def sampling_net(self, m: str) -> nn.Module:
        """The score net the sampler uses for modality m: the EMA copy when there is one."""
        if self.score is None:
            raise RuntimeError(f"recovery mode {self.cfg.recovery!r} has no score network")
        return (self.score_ema or self.score)[m]

    @torch.no_grad()
    def update_ema(self) -> None:
        """One EMA step after an optimiser step: decay min(ema, (1 + n) / (10 + n)) at update n,
        so the average follows the early, fast-moving weights (a no-op without EMA)."""
        if self.score_ema is None:
            return
        n = int(self.ema_updates)
        decay = min(self.cfg.score_net.ema, (1 + n) / (10 + n))
        for avg, p in zip(self.score_ema.parameters(), self.score.parameters(), strict=True):
            avg.lerp_(p, 1.0 - decay)
        self.ema_updates += 1

    @torch.no_grad()
    def reset_ema(self) -> None:
        """Start the average again from the current weights (after the score warm-up)."""
        if self.score_ema is None:
            return
        for avg, p in zip(self.score_ema.parameters(), self.score.parameters(), strict=True):
            avg.copy_(p)
        self.ema_updates.zero_()

    def encode(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Shallow features E_k (sec 3.3): modality -> (B, L, D_k) to modality -> (B, d, L')."""
        out = {}
        for m in MODALITIES:
            x = inputs[m].transpose(1, 2)  # (B, D_k, L)
            if m == "l":
                x = F.dropout(x, self.cfg.fusion.text_dropout, self.training)
            out[m] = self.encoders[m](x)
        return out

    def condition(self, feats: dict[str, Tensor], mask: Tensor, target: str) -> Tensor:
        """Per-sample condition for recovering `target` (B, d, L'): the one available modality,
        or the pair fused by concat + 1x1 conv (sec 3.4). Rows where `target` is available get
        an arbitrary (unused) value."""
        j1, j2 = CONDITIONS[target]
        has1 = mask[:, MODALITIES.index(j1), None, None]
        has2 = mask[:, MODALITIES.index(j2), None, None]
        pair = self.pair_convs[j1 + j2](torch.cat([feats[j1], feats[j2]], dim=1))
        return torch.where(has1 & has2, pair, torch.where(has1, feats[j1], feats[j2]))

    def sample_modality(
        self,
        target: str,
        cond: Tensor,
        noise: Callable[[Tensor], Tensor] | None = None,
        sampler: SamplerConfig | None = None,
    ) -> tuple[Tensor, int]:
        """Recover x~_k by solving eq. 14 from the prior, conditioned on `cond` (n, d, L'), with
        `sampler` (None: the model's own `cfg.sampler`, the one D_k trains on).

        The condition is re-noised to the current time at every score evaluation, as released,
        unless the score nets train on a clean one (`score_loss.condition_noise: clean`): the
        sampler then conditions on it clean too. The EMA net samples when there is one.
        With a bucket (always under the graph and compile backends) the n rows run padded on
        static buffers (`recovery.StaticRecovery`), one set per (modality, bucket, sampler).
        """
        net = self.sampling_net(target)
        scfg = sampler or self.cfg.sampler
        draw = noise or _plain_noise
        renoise = self.cfg.score_loss.condition_noise != "clean"
        prior = None
        if scfg.prior_score_above is not None:
            prior = PriorScore(*self._stats(target), scfg.prior_score_above)
        bucket = scfg.effective_bucket()
        if bucket is None:
            return solve(net, self.sde, cond, draw, scfg, renoise, prior)
        size = bucket_size(cond.shape[0], bucket)
        key = (target, scfg, size, cond.device, cond.dtype)
        if key not in self._static:
            self._static[key] = StaticRecovery(net, self.sde, scfg, size, cond, renoise, prior)
        return self._static[key](cond, draw)

    def _stats(self, m: str) -> tuple[Tensor, Tensor]:
        if not hasattr(self, "feature_var"):
            raise RuntimeError(
                "a sampler with prior_score_above needs the training features' variance, which "
                "this model does not keep: set model.sampler.prior_score_above in its config"
            )
        k = MODALITIES.index(m)
        return self.feature_mean[k], self.feature_var[k]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> IMDer:
        # Moving or casting the weights invalidates the static buffers and captured graphs.
        self._static.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, object]:
        # Copies and pickles carry the weights, not the compiled or captured samplers.
        return {**super().__getstate__(), "_static": {}}

    def forward(
        self,
        inputs: dict[str, Tensor],
        mask: Tensor,
        generator: torch.Generator | None = None,
        positions: tuple[int, Tensor] | None = None,
        sampler: SamplerConfig | None = None,
    ) -> IMDerOutput:
        """inputs: modality -> (B, L, D_k); mask: (B, 3) bool, True = available (l, a, v).

        Returns the prediction, the per-example L_score and L_rec over missing modalities (eqs.
        17, 18) and the recovered features. The sampler never carries gradients; D_k, the pair
        convs and the score nets learn through L_rec, the task loss and L_score.

        `positions` = (N, rows): this batch is rows `rows` (B,) of a batch of N whose noise
        `generator` describes, e.g. one data-parallel rank's share of the global batch; every
        sample then gets exactly the noise it gets when the whole batch runs in one process.
        `sampler` solves eq. 14 for this call (None: `cfg.sampler`, the training sampler), so a
        trained model is evaluated under another solver or step count without being rebuilt."""
        mask = mask.to(torch.bool)
        observed_only = self.recovery_targets == "observed_only"
        feats = self.encode(observed_inputs(inputs, mask) if observed_only else inputs)
        B, device = mask.shape[0], mask.device
        full, where = positions or (B, torch.arange(B, device=device))
        zeros = torch.zeros(B, device=device)
        out = IMDerOutput(
            pred=zeros, loss_score=zeros.clone(), loss_rec=zeros.clone(), features=feats
        )
        mask_cpu = mask.cpu()  # the one host sync per batch: which rows miss what
        missing_rows = {
            m: r.to(device) for m, r in zip(MODALITIES, _missing_rows(mask_cpu), strict=True)
        }
        seeds = _modality_seeds(generator)
        fused_inputs = dict(feats)
        for k, m in enumerate(MODALITIES):
            rows = missing_rows[m]
            if rows.numel() == 0:
                continue
            filled, sampled, loss_score, loss_rec, nfe = self._recover(
                m,
                feats,
                mask,
                rows,
                seeds[k] if seeds else None,
                (full, where.index_select(0, rows)),
                sampler,
                losses=not observed_only,
            )
            out.nfe += nfe
            out.nfe_rows += nfe * rows.numel()
            out.recovered[m], out.recovered_rows[m] = filled, rows
            if sampled is not None:
                out.sampled[m] = sampled
            fused_inputs[m] = feats[m].index_copy(0, rows, filled.to(feats[m].dtype))
            out.loss_score = out.loss_score.index_add(0, rows, loss_score)
            out.loss_rec = out.loss_rec.index_add(0, rows, loss_rec)
        if observed_only and self.training:
            self._observed_losses(out, feats, mask, mask_cpu, generator, (full, where))
        out.pred, _ = self.fusion(fused_inputs)
        return out

    def _observed_losses(
        self,
        out: IMDerOutput,
        feats: dict[str, Tensor],
        mask: Tensor,
        mask_cpu: Tensor,
        generator: torch.Generator | None,
        positions: tuple[int, Tensor],
    ) -> None:
        """`recovery_targets: observed_only`: L_score and L_rec of each modality k at the rows
        that have k and another modality, k recovered from the others alone (`condition` reads
        only the other two modalities' availability); added to `out`'s per-row losses. Their
        noise comes from a second set of modality streams, so the recovery of missing rows
        draws what it draws under "simulated"."""
        if self.cfg.recovery in ("zero", "mean"):
            return
        seeds = _modality_seeds(generator)
        full, where = positions
        for k, m in enumerate(MODALITIES):
            rows = observed_rows(mask_cpu, k)
            if rows.numel() == 0:
                continue
            rows = rows.to(mask.device)
            _, _, loss_score, loss_rec, nfe = self._recover(
                m,
                feats,
                mask,
                rows,
                seeds[k] if seeds else None,
                (full, where.index_select(0, rows)),
                None,
                fill=self.cfg.recovery == "diffusion+reconstruction",
            )
            out.nfe += nfe
            out.nfe_rows += nfe * rows.numel()
            out.loss_score = out.loss_score.index_add(0, rows, loss_score)
            out.loss_rec = out.loss_rec.index_add(0, rows, loss_rec)

    def _recover(
        self,
        m: str,
        feats: dict[str, Tensor],
        mask: Tensor,
        rows: Tensor,
        seed: int | None,
        noise_rows: tuple[int, Tensor],
        sampler: SamplerConfig | None,
        losses: bool = True,
        fill: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, int]:
        """Recovered features, the sampler's output (None without one), per-row L_score and
        L_rec, and NFE for modality m at `rows`; `noise_rows` = (N, where): their rows in the
        batch of N that the noise stream draws. Without `losses` both losses are 0 and the
        rows' own features are never read; without `fill` the sampler runs only when L_rec
        needs its output (the returned features are then not the recovery)."""
        mode = self.cfg.recovery
        n = rows.numel()
        full, where = noise_rows
        truth = feats[m].index_select(0, rows)  # (n, d, L'); read only with `losses`
        zero = truth.new_zeros(n)
        if mode == "zero":
            return torch.zeros_like(truth), None, zero, zero, 0
        if mode == "mean":
            return self.feature_mean[MODALITIES.index(m)].expand_as(truth), None, zero, zero, 0
        cond = self.condition(feats, mask, m).index_select(0, rows)
        if mode == "reconstruction":
            rec = self.rec[m](cond)
            return rec, None, zero, _mse(rec, truth) if losses else zero, 0
        gen, draw = None, None
        if seed is not None:
            gen = torch.Generator(device=truth.device).manual_seed(seed)
            draw = _RowNoise(gen, full, where)
        draw = draw or _plain_noise
        loss_score = zero
        if self.training and losses:
            loss_score = self._score_loss(m, truth, cond, gen, draw, noise_rows)
        if not fill:
            return truth, None, loss_score, zero, 0
        sampled, nfe = self.sample_modality(m, cond.detach(), noise=draw, sampler=sampler)
        if mode == "diffusion":
            return sampled, sampled, loss_score, zero, nfe
        rec = self.rec[m](sampled)
        return rec, sampled, loss_score, _mse(rec, truth) if losses else zero, nfe

    def _score_loss(
        self,
        m: str,
        truth: Tensor,
        cond: Tensor,
        gen: torch.Generator | None,
        draw: Callable[[Tensor], Tensor],
        noise_rows: tuple[int, Tensor],
    ) -> Tensor:
        """Per-row L_score of modality m (eq. 13): times and noise from the rows' own stream."""
        full, where = noise_rows
        t_eps = self.cfg.score_loss.t_eps
        if gen is not None:
            t = sample_time(full, t_eps, device=truth.device, generator=gen).index_select(0, where)
        else:
            t = sample_time(truth.shape[0], t_eps, device=truth.device)
        z = draw(truth)
        z_cond = draw(truth) if self.cfg.score_loss.condition_noise == "independent" else None
        edm = self.cfg.score_net.parameterization == "edm"
        return score_matching_loss(
            self.score[m],
            self.sde,
            truth,
            t,
            z,
            cond,
            condition_noise=self.cfg.score_loss.condition_noise,
            z_cond=z_cond,
            sigma_data=self.score[m].sigma_data if edm else None,
        )

    def loss(self, out: IMDerOutput, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 20: L_task (L1) + beta (L_score + L_rec), averaged over the batch."""
        task = (out.pred - labels).abs().mean()
        score, rec = out.loss_score.mean(), out.loss_rec.mean()
        total = task + self.cfg.beta * (score + rec)
        return total, {"task": task.detach(), "score": score.detach(), "rec": rec.detach()}


def sigma_for_prior_std(std1: float) -> float:
    """The VE SDE's sigma whose std(1) = sqrt((sigma^2 - 1) / (2 ln sigma)) (eq. 14) is `std1`,
    by bisection on log sigma (std(1) rises with sigma from 1 at sigma -> 1)."""
    if not std1 > 1.0:
        raise ValueError(
            f"sde.sigma_from_data asks for a prior std(1) of {std1:.4g}, but the VE SDE's std(1) "
            "exceeds 1 at every sigma > 1: raise sde.sigma_from_data"
        )
    lo, hi = 1e-9, 1.0
    while math.sqrt(math.expm1(2 * hi) / (2 * hi)) < std1:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.sqrt(math.expm1(2 * mid) / (2 * mid)) < std1 else (lo, mid)
    return math.exp((lo + hi) / 2)


def _apply_loaded_sigma(module: nn.Module, incompatible: Any) -> None:
    # A loaded checkpoint brings the sigma chosen from its training data.
    module.set_sigma(float(module.sde_sigma))


def observed_inputs(inputs: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
    """The inputs with every missing modality set to 0 (`mask` (B, 3), True = available):
    selected, not multiplied, so a missing NaN reads 0 as well."""
    return {
        m: torch.where(mask[:, k, None, None], inputs[m], inputs[m].new_zeros(()))
        for k, m in enumerate(MODALITIES)
    }


def observed_rows(mask: Tensor, k: int) -> Tensor:
    """(n,) the rows of `mask` (B, 3) that have modality k and at least one other: where
    `observed_only` learns k's recovery, conditioned on those others."""
    others = [j for j in range(mask.shape[1]) if j != k]
    return (mask[:, k] & mask[:, others].any(dim=1)).nonzero().squeeze(1)


def _mse(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-example mean squared error over (d, L'), shape (n,)."""
    return ((pred - truth) ** 2).flatten(1).mean(dim=1)


def _modality_seeds(generator: torch.Generator | None) -> list[int] | None:
    """One seed per modality, drawn up front: no stream depends on which modalities are missing."""
    if generator is None:
        return None
    return torch.randint(
        0, 2**62, (len(MODALITIES),), generator=generator, device=generator.device
    ).tolist()


def _missing_rows(mask_cpu: Tensor) -> list[Tensor]:
    return [(~mask_cpu[:, k]).nonzero().squeeze(1) for k in range(mask_cpu.shape[1])]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
