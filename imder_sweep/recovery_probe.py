"""A controlled recovery problem (issue 14): can a score net trained by our loop recover a
modality that is nearly a function of its condition?

The condition c is N(0, 1) of shape (d, L'); the target is x0 = tanh(W c) + 0.05 noise with a fixed
channel mix W, so the exact answer has an MSE near 0.0025 and the mean fill one of Var(x0). The
probe builds a small IMDer (the real score nets, loss, EMA, preconditioning and samplers, the
condition passed as is: one available modality), trains the target's score net by denoising
score matching (eq. 13) for a fixed number of Adam steps, samples it (eq. 14) and reports the
recovery's correlation and R^2 against the training mean (`imder_sweep.health`). `cut_condition`
hides the condition from the net (zeros in training and sampling): a net that ignores its
condition cannot beat the mean, so a probe that passes with it has not measured conditioning.

    python -m imder_sweep.recovery_probe --steps 400 --set score_loss.condition_noise=clean
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from imder_sweep.health import recovery_health
from imder_sweep.losses import sample_time, score_matching_loss
from imder_sweep.model import IMDer, ModelConfig
from imder_sweep.train.config import parse_set
from imder_sweep.util import deep_merge

D, SEQ = 16, 10  # d and the input length; the features are (d, L' = 8)
PROBE_MODEL: dict[str, Any] = {
    "dims": (D, D, D),
    "seq_len": SEQ,
    "d_model": D,
    "recovery": "diffusion",
    "score_net": {"channels": (16, 32), "heads": 4, "time_embed_dim": 32, "attn_layers": 1},
    "fusion": {"heads": 4, "nlevels": 1},
    "sampler": {"steps": 50},
}


@dataclass(frozen=True)
class ProbeResult:
    corr: float  # Pearson correlation of the recovered and true features, pooled
    r2: float  # 1 - MSE / MSE of the training mean
    mse: float
    mean_fill_mse: float
    spread: float  # std of the recovered features over the true ones' (1: calibrated)
    train_loss: float  # per element, the last 50 steps
    nfe: int


def probe_data(n: int, gen: torch.Generator, mix: Tensor) -> tuple[Tensor, Tensor]:
    """(x0, c), both (n, d, L'): c ~ N(0, 1), x0 = tanh(W c) + 0.05 noise."""
    c = torch.randn(n, D, SEQ - 2, generator=gen)
    x0 = torch.tanh(torch.einsum("ij,njl->nil", mix, c)) + 0.05 * torch.randn(
        c.shape, generator=gen
    )
    return x0, c


def run_probe(
    overrides: dict[str, Any] | None = None,
    *,
    steps: int = 400,
    batch: int = 32,
    lr: float = 2e-3,
    seed: int = 0,
    cut_condition: bool = False,
    n_test: int = 128,
) -> ProbeResult:
    """Train the target's score net for `steps` Adam steps under `overrides` of the probe's
    model config (e.g. {"score_net": {"parameterization": "edm"}}) and recover `n_test` fresh
    samples."""
    torch.manual_seed(seed)
    cfg = ModelConfig.model_validate(deep_merge(PROBE_MODEL, overrides or {}))
    model = IMDer(cfg)
    gen = torch.Generator().manual_seed(seed + 1)
    mix = torch.randn(D, D, generator=gen) / D**0.5 * 1.5
    x_train, c_train = probe_data(4096, gen, mix)
    if cut_condition:
        c_train = torch.zeros_like(c_train)
    mean, var = x_train.mean(dim=0), x_train.var(dim=0, correction=0)
    model.set_feature_stats(mean.expand(3, -1, -1), var.expand(3, -1, -1))
    net = model.score["l"]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_train), (batch,), generator=gen)
        loss = _probe_loss(model, x_train[idx], c_train[idx], gen).mean() / x_train[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_value_(net.parameters(), 1.0)
        opt.step()
        model.update_ema()
        losses.append(loss.item())
    x_test, c_test = probe_data(n_test, gen, mix)
    if cut_condition:
        c_test = torch.zeros_like(c_test)
    model.eval()
    sample_gen = torch.Generator().manual_seed(seed + 2)
    recovered, nfe = model.sample_modality(
        "l", c_test, noise=lambda like: torch.randn(like.shape, generator=sample_gen)
    )
    health = recovery_health(recovered, x_test, mean)
    tail = losses[-50:]
    return ProbeResult(
        corr=health.corr,
        r2=health.r2,
        mse=health.mse,
        mean_fill_mse=float(((x_test - mean) ** 2).mean()),
        spread=float(recovered.std() / x_test.std()),
        train_loss=sum(tail) / len(tail),
        nfe=nfe,
    )


def _probe_loss(model: IMDer, x0: Tensor, cond: Tensor, gen: torch.Generator) -> Tensor:
    cfg = model.cfg
    t = sample_time(x0.shape[0], cfg.score_loss.t_eps, generator=gen)
    z = torch.randn(x0.shape, generator=gen)
    z_cond = torch.randn(x0.shape, generator=gen)
    edm = cfg.score_net.parameterization == "edm"
    return score_matching_loss(
        model.score["l"],
        model.sde,
        x0,
        t,
        z,
        cond,
        condition_noise=cfg.score_loss.condition_noise,
        z_cond=z_cond,
        sigma_data=model.score["l"].sigma_data if edm else None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cut-condition", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    result = run_probe(
        parse_set(args.set), steps=args.steps, seed=args.seed, cut_condition=args.cut_condition
    )
    print(json.dumps(asdict(result)))


if __name__ == "__main__":
    main()
