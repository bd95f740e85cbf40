"""Denoising score matching (paper eqs. 3, 5, 13, 18).

With the Gaussian kernel of eq. 4, grad log p_0t(x(t) | x(0)) = -z / std(t) for x(t) = x(0) + std z.
Weighting by lambda(t) = std(t)^2 turns eq. 3 into eq. 5: || std(t) s(x(t), t) + z ||^2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from imder_sweep.sde import SDE, batch_broadcast

ConditionalScore = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def sample_time(
    batch: int,
    t_eps: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """t ~ U(t_eps, 1), shape (B,)."""
    return torch.rand(batch, device=device, generator=generator) * (1.0 - t_eps) + t_eps


def score_matching_loss(
    score: ConditionalScore,
    sde: SDE,
    x0: Tensor,
    t: Tensor,
    z: Tensor,
    cond: Tensor | None = None,
    *,
    condition_noise: Literal["same", "independent", "clean"] = "same",
    z_cond: Tensor | None = None,
    sigma_data: Tensor | None = None,
) -> Tensor:
    """Per-example conditional score-matching loss (eq. 13), shape (B,).

    loss_i = sum over all non-batch dims of (std(t_i) s(x_i(t_i), c_i(t_i), t_i) + z_i)^2, where the
    condition c(t) is perturbed with the same z as x (the release), with its own `z_cond`
    ("independent"), or not at all ("clean").

    With `sigma_data` (EDM preconditioning) each term is weighted by (std^2 + sigma_data^2) /
    sigma_data^2: since std s + z = (D(x) - x0) / std, that is Karras et al.'s loss weight
    lambda = (std^2 + sigma_data^2) / (std sigma_data)^2 on ||D(x) - x0||^2, under which the
    network's own target has unit weight at every noise level.
    """
    mean, std = sde.marginal_mean_std(x0, t)
    s = batch_broadcast(std, x0)
    x_t = mean + s * z
    cond_t = cond
    if cond is not None and condition_noise != "clean":
        if condition_noise == "same":
            noise = z
        elif z_cond is None:
            raise ValueError("condition_noise='independent' needs z_cond")
        else:
            noise = z_cond
        cond_t = cond + batch_broadcast(std, cond) * noise
    out = score(x_t, t, cond_t)
    loss = ((out * s + z) ** 2).flatten(1).sum(dim=1)
    if sigma_data is None:
        return loss
    return loss * (std**2 + sigma_data**2) / sigma_data**2
