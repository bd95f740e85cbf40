"""Score warm-up (`train.score_warmup_epochs`): denoising score matching alone (eqs. 13, 18) on
the complete training data (under `train.recovery_targets: observed_only`, the observed
modalities of the training split only), before stage (b).

In stage (b) a score net s_k learns only from the samples that miss k, while the sampler runs
inside every step. The warm-up trains every s_k on every training sample instead: modality k is
the target, conditioned on the sample's other two modalities with missing ones simulated (both
kept, or only one, each with probability 1/3), no sampler in the loop, so an epoch costs a few
forward passes of the nets. It trains the score nets and the condition's pair convolutions with
their own Adam; the EMA copy (`score_net.ema`) follows it. It never draws from torch's global RNG.

What it produces depends only on the stage-(a) checkpoint (its key), the score nets' and SDE's
configuration and the warm-up's optimisation, not on beta, the sampler or D_k; so it is cached
beside the stage-(a) checkpoints (`warmup-KEY/`), and every trial of a sweep that shares those
(e.g. a search over beta and steps at one width and sigma) reuses it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from imder_sweep.losses import sample_time, score_matching_loss
from imder_sweep.modalities import MODALITIES
from imder_sweep.model import IMDer
from imder_sweep.model.imder import observed_inputs, observed_rows
from imder_sweep.train.config import TrialConfig
from imder_sweep.train.splits import SplitData
from imder_sweep.train.state import atomic_torch_save
from imder_sweep.util import atomic_write_json

WARMUP_FILE = "score-warmup.json"  # the record, in the trial's directory
# The modules the warm-up trains (and the EMA's counter): what its cache entry holds.
WARMED_PREFIXES = ("score.", "score_ema.", "ema_updates", "pair_convs.")


def warmup_seed(seed: int) -> int:
    """The warm-up's own stream (orders, times, noise, simulated masks), apart from training's."""
    digest = hashlib.sha256(f"score-warmup\0{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def warmup_key(cfg: TrialConfig, pretrain_key: str) -> str:
    """What the warm-up's result depends on: the stage-(a) checkpoint (`pretrain_key`, which
    holds the data, the seed and the encoders), the model's shapes, the score nets, the SDE and
    the loss, the warm-up's epochs and optimisation."""
    m, t = cfg.model, cfg.train
    key = {
        "pretrain": pretrain_key,
        "model": m.model_dump(
            mode="json", include={"dims", "seq_len", "d_model", "encoder_kernel"}
        ),
        "score": m.model_dump(mode="json", include={"score_net", "sde", "score_loss"}),
        "train": t.model_dump(
            mode="json",
            include={"score_warmup_epochs", "batch_size", "lr", "weight_decay", "grad_clip"},
        ),
    }
    if t.recovery_targets == "observed_only":  # it learns from the training masks then
        key["observed_only"] = cfg.protocol.masks_args()
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def warm_up(
    cfg: TrialConfig,
    model: IMDer,
    train: SplitData,
    resumed: bool,
    state_dir: Path | None,
    pretrain_key: str | None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The score warm-up before stage (b) and its record (kept in `state_dir`): reused from the
    cache beside the stage-(a) checkpoint when one matches (`reused` true), else run and cached.
    A resumed stage's state already holds the warmed-up nets, so it only reads the record back.
    Nothing without `train.score_warmup_epochs` or score nets."""
    if not cfg.train.score_warmup_epochs or model.score is None:
        return {}
    path = state_dir / WARMUP_FILE if state_dir is not None else None
    if resumed:
        return json.loads(path.read_text()) if path is not None and path.exists() else {}
    entry = None
    if cache_dir is not None and pretrain_key is not None:
        entry = Path(cache_dir) / f"warmup-{warmup_key(cfg, pretrain_key)}"
    if entry is not None and (entry / "meta.json").exists() and (entry / "model.pt").exists():
        state = torch.load(entry / "model.pt", map_location=train.labels.device)
        loaded = model.load_state_dict(state, strict=False)
        assert not loaded.unexpected_keys, loaded.unexpected_keys
        record = {**json.loads((entry / "meta.json").read_text()), "reused": True}
    else:
        devices = [train.labels.device] if train.labels.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            record = {**score_warmup(model, train, cfg), "reused": False}
        if entry is not None:
            kept = {k: v for k, v in model.state_dict().items() if k.startswith(WARMED_PREFIXES)}
            atomic_torch_save(entry / "model.pt", kept)
            atomic_write_json(
                entry / "meta.json", {k: v for k, v in record.items() if k != "reused"}
            )
    if path is not None:
        atomic_write_json(path, record)
    return record


def simulated_mask(target: int, batch: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """(B, 3) availability with `target` missing and, of the other two, both kept or one of
    them, each pattern with probability 1/3."""
    others = [k for k in range(len(MODALITIES)) if k != target]
    pattern = torch.randint(0, 3, (batch,), generator=gen, device=device)
    mask = torch.zeros(batch, len(MODALITIES), dtype=torch.bool, device=device)
    mask[:, others[0]] = pattern != 2  # pattern 0: both, 1: only the first, 2: only the second
    mask[:, others[1]] = pattern != 1
    return mask


def warmup_loss(
    model: IMDer, feats: dict[str, Tensor], gen: torch.Generator, observed: Tensor | None = None
) -> Tensor:
    """Eq. 13 summed over the three modalities as targets, averaged over the batch. With
    `observed` (B, 3), the batch's own availability (`train.recovery_targets:
    observed_only`): target k only at the rows that have it and another modality, conditioned
    on those others, averaged over those rows; no simulated masks, no missing value."""
    cfg = model.cfg
    edm = cfg.score_net.parameterization == "edm"
    total = torch.zeros((), device=feats["l"].device)
    for k, m in enumerate(MODALITIES):
        x0, device = feats[m], feats[m].device
        if observed is None:
            cond = model.condition(feats, simulated_mask(k, x0.shape[0], gen, device), m)
        else:
            rows = observed_rows(observed, k)
            if rows.numel() == 0:
                continue
            cond = model.condition(feats, observed, m).index_select(0, rows)
            x0 = x0.index_select(0, rows)
        n = x0.shape[0]
        t = sample_time(n, cfg.score_loss.t_eps, device=device, generator=gen)
        z = torch.randn(x0.shape, device=device, generator=gen)
        independent = cfg.score_loss.condition_noise == "independent"
        z_cond = torch.randn(x0.shape, device=device, generator=gen) if independent else None
        loss = score_matching_loss(
            model.score[m],
            model.sde,
            x0,
            t,
            z,
            cond,
            condition_noise=cfg.score_loss.condition_noise,
            z_cond=z_cond,
            sigma_data=model.score[m].sigma_data if edm else None,
        )
        total = total + loss.mean()
    return total


def score_warmup(model: IMDer, train: SplitData, cfg: TrialConfig) -> dict[str, Any]:
    """Run `cfg.train.score_warmup_epochs` epochs of the warm-up on `train` (its masks
    ignored, every sample complete, unless `train.recovery_targets` is observed_only: then
    each modality learns at the samples that have it); returns its record: per-epoch mean
    loss per element and the seconds, in total and per epoch."""
    if model.score is None:
        raise ValueError(f"model.recovery={cfg.model.recovery!r} has no score nets to warm up")
    tc, device = cfg.train, train.labels.device
    observed_only = tc.recovery_targets == "observed_only"
    params = [*model.score.parameters(), *model.pair_convs.parameters()]
    opt = torch.optim.Adam(params, lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator(device=device).manual_seed(warmup_seed(cfg.seed))
    order_gen = torch.Generator().manual_seed(warmup_seed(cfg.seed))
    elements = model.cfg.d_model * model.cfg.feature_len * len(MODALITIES)
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    for _ in range(tc.score_warmup_epochs):
        order, total, seen = torch.randperm(len(train), generator=order_gen), 0.0, 0
        for start in range(0, len(order), tc.batch_size):
            inputs, _, masks = train.batch(order[start : start + tc.batch_size].to(device))
            observed = masks if observed_only else None
            if observed is not None:  # missing values are never read, not even encoded
                inputs = observed_inputs(inputs, observed)
            with torch.no_grad():
                feats = model.encode(inputs)
            loss = warmup_loss(model, feats, gen, observed)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip is not None:
                torch.nn.utils.clip_grad_value_(params, tc.grad_clip)
            opt.step()
            model.update_ema()
            total += float(loss.detach()) * len(inputs["l"])
            seen += len(inputs["l"])
        losses.append(total / max(seen, 1) / elements)
    seconds = time.perf_counter() - t0
    return {
        "epochs": tc.score_warmup_epochs,
        "loss_per_element": losses,
        "seconds": seconds,
        "seconds_per_epoch": seconds / max(tc.score_warmup_epochs, 1),
    }
