"""Stochastic differential equations that perturb data into noise (paper sec 2.2, eqs. 1-5, 14).

An SDE here is pure math: drift f(x, t), diffusion g(t), the marginal of the transition kernel
p_0t(x(t) | x(0)) and its prior at t = T. It owns no step count and knows nothing of networks, so a
sampler (samplers.py) or a loss (losses.py) can pair any SDE with any solver. Every function works
for tensors of any shape (B, ...): time is a (B,) tensor and broadcasts over the trailing dims.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def batch_broadcast(values: Tensor, like: Tensor) -> Tensor:
    """Reshape per-example values (B,) so they broadcast against `like` (B, ...)."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


class SDE(ABC):
    """dx = f(x, t) dt + g(t) dw on t in [0, T] (eq. 1) with a Gaussian transition kernel."""

    T: float = 1.0

    @abstractmethod
    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        """f(x, t), same shape as x."""

    @abstractmethod
    def diffusion(self, t: Tensor) -> Tensor:
        """g(t), shape (B,)."""

    @abstractmethod
    def marginal_mean_std(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean (shape of x0) and std (B,) of p_0t(x(t) | x(0)) (eq. 4)."""

    @abstractmethod
    def prior_std(self) -> float:
        """Standard deviation of the prior p_T (a centred isotropic Gaussian)."""

    def marginal_std(self, t: Tensor) -> Tensor:
        """std(t) of the transition kernel, shape (B,); lambda(t) = std(t)^2 weights the loss."""
        return self.marginal_mean_std(torch.zeros_like(t), t)[1]

    def prior_sample(
        self,
        shape: tuple[int, ...],
        *,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x(T) ~ p_T."""
        return torch.randn(shape, device=device, generator=generator) * self.prior_std()

    def reverse_drift(self, x: Tensor, t: Tensor, score: Tensor, probability_flow: bool) -> Tensor:
        """Drift of the reverse-time SDE f - g^2 s (eq. 2), or of the probability-flow ODE
        f - g^2 s / 2 when `probability_flow`."""
        g2 = batch_broadcast(self.diffusion(t) ** 2, x)
        scale = 0.5 if probability_flow else 1.0
        return self.drift(x, t) - scale * g2 * score


class VESDE(SDE):
    """Variance-exploding SDE dx = sigma^t dw, t in [0, 1] (eqs. 4 and 14).

    std(t) = sqrt((sigma^(2t) - 1) / (2 ln sigma)) and g(t) = sigma^t, so that d std^2 / dt = g^2.
    The published IMDer code uses sigma = 25.
    """

    def __init__(self, sigma: float = 25.0) -> None:
        if not sigma > 1.0:
            raise ValueError(f"VE SDE sigma must be > 1, got {sigma!r}")
        self.sigma = float(sigma)
        self._log_sigma = math.log(self.sigma)

    def __repr__(self) -> str:
        return f"VESDE(sigma={self.sigma})"

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.exp(t * self._log_sigma)  # sigma^t

    def marginal_mean_std(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # sigma^(2t) - 1 via expm1 keeps precision for small t.
        std = torch.sqrt(torch.expm1(2.0 * t * self._log_sigma) / (2.0 * self._log_sigma))
        return x0, std

    def prior_std(self) -> float:
        return math.sqrt((self.sigma ** (2.0 * self.T) - 1.0) / (2.0 * self._log_sigma))


SDES: dict[str, type[SDE]] = {"ve": VESDE}


def build_sde(kind: str, **params: float) -> SDE:
    """Build a registered SDE by name ("ve"); VP and sub-VP SDEs slot in beside it."""
    try:
        cls = SDES[kind]
    except KeyError:
        raise ValueError(f"unknown SDE {kind!r}; known: {sorted(SDES)}") from None
    return cls(**params)
