"""The distributions a space file searches a key over, each validated, probed and described here,
and each its own Optuna distribution::

    model.score_net.width: {choice: [0.5, 1.0]}           # any YAML scalars, null included
    model.sde.sigma: {uniform: [5, 50], step: 5}          # a float, on a grid if `step` is given
    model.beta: {loguniform: [0.01, 1.0]}                 # a float, uniform in log space
    model.sampler.steps: {int: [5, 50], step: 5}          # an integer, both ends included

`probes()` lists the points a space file is checked at before Ray starts (every choice and small
int range, both ends plus interior points of float ranges); `describe()` is the plan's line;
`to_optuna()` is what the searcher samples from. Optuna is imported only there, so validating
a space file (and a dry run) stays free of it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

FLOAT_PROBES = 5  # points probed in a float range, both ends included
MAX_INT_PROBED_WHOLE = 16  # int ranges up to this many values are probed at every value


class Strict(BaseModel):
    """A section of a space file: unknown keys are errors, values cannot change once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


class Choice(Strict):
    """One of a list of values (any YAML scalars; null is a key's "off", e.g. `ema: null`)."""

    choice: list[Any] = Field(min_length=1)

    @field_validator("choice")
    @classmethod
    def _scalars(cls, values: list[Any]) -> list[Any]:
        for v in values:
            if not (_is_scalar(v) or v is None):
                raise ValueError(f"choices must be numbers, strings, booleans or null, got {v!r}")
        if len({(type(v), v) for v in values}) != len(values):
            raise ValueError(f"choices must be distinct, got {values}")
        return values

    def probes(self) -> list[Any]:
        return list(self.choice)

    def describe(self) -> str:
        return f"choice {self.choice}"

    def to_optuna(self) -> CategoricalDistribution:
        from optuna.distributions import CategoricalDistribution

        return CategoricalDistribution(self.choice)


class Uniform(Strict):
    """A float drawn uniformly from [lo, hi], on a grid of `step` if given."""

    uniform: tuple[float, float]
    step: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        lo, hi = self.uniform
        if not lo < hi:
            raise ValueError(f"uniform needs lo < hi, got [{lo}, {hi}]")
        if self.step is not None:
            n = (hi - lo) / self.step
            if not math.isclose(n, round(n), abs_tol=1e-9):
                raise ValueError(f"uniform [{lo}, {hi}]: step {self.step} does not divide hi - lo")
        return self

    def probes(self) -> list[float]:
        lo, hi = self.uniform
        if self.step is not None:
            n = round((hi - lo) / self.step)
            ks = sorted({round(i * n / (FLOAT_PROBES - 1)) for i in range(FLOAT_PROBES)})
            return [lo + k * self.step for k in ks]
        return [lo + (hi - lo) * i / (FLOAT_PROBES - 1) for i in range(FLOAT_PROBES)]

    def describe(self) -> str:
        step = f" step {self.step:g}" if self.step is not None else ""
        return f"uniform [{self.uniform[0]:g}, {self.uniform[1]:g}]{step}"

    def to_optuna(self) -> FloatDistribution:
        from optuna.distributions import FloatDistribution

        lo, hi = self.uniform
        return FloatDistribution(lo, hi, step=self.step)


class LogUniform(Strict):
    """A float whose log is uniform on [log lo, log hi]."""

    loguniform: tuple[float, float]

    @model_validator(mode="after")
    def _ordered(self) -> LogUniform:
        lo, hi = self.loguniform
        if not 0.0 < lo < hi:
            raise ValueError(f"loguniform needs 0 < lo < hi, got [{lo}, {hi}]")
        return self

    def probes(self) -> list[float]:
        lo, hi = self.loguniform
        n = FLOAT_PROBES - 1
        return [lo * (hi / lo) ** (i / n) for i in range(FLOAT_PROBES)]

    def describe(self) -> str:
        return f"loguniform [{self.loguniform[0]:g}, {self.loguniform[1]:g}]"

    def to_optuna(self) -> FloatDistribution:
        from optuna.distributions import FloatDistribution

        lo, hi = self.loguniform
        return FloatDistribution(lo, hi, log=True)


class IntRange(Strict):
    """An integer in [lo, hi] (both included) on a grid of `step`."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    bounds: tuple[int, int] = Field(alias="int")
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        lo, hi = self.bounds
        if not lo < hi:
            raise ValueError(f"int needs lo < hi, got [{lo}, {hi}]")
        if (hi - lo) % self.step:
            raise ValueError(f"int [{lo}, {hi}]: step {self.step} does not divide hi - lo")
        return self

    def values(self) -> range:
        return range(self.bounds[0], self.bounds[1] + 1, self.step)

    def probes(self) -> list[int]:
        values = self.values()
        if len(values) <= MAX_INT_PROBED_WHOLE:
            return list(values)
        return sorted({values[round(i * (len(values) - 1) / 4)] for i in range(5)})

    def describe(self) -> str:
        step = f" step {self.step}" if self.step != 1 else ""
        return f"int [{self.bounds[0]}, {self.bounds[1]}]{step}"

    def to_optuna(self) -> IntDistribution:
        from optuna.distributions import IntDistribution

        lo, hi = self.bounds
        return IntDistribution(lo, hi, step=self.step)


# The YAML key that names each kind; a mapping must hold exactly one of them.
KINDS: dict[str, type[Strict]] = {
    "choice": Choice,
    "uniform": Uniform,
    "loguniform": LogUniform,
    "int": IntRange,
}


def _kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kinds = [k for k in KINDS if k in value]
        return kinds[0] if len(kinds) == 1 else None
    return next((k for k, cls in KINDS.items() if type(value) is cls), None)


Distribution = Annotated[
    Annotated[Choice, Tag("choice")]
    | Annotated[Uniform, Tag("uniform")]
    | Annotated[LogUniform, Tag("loguniform")]
    | Annotated[IntRange, Tag("int")],
    Discriminator(
        _kind,
        custom_error_type="distribution",
        custom_error_message=(
            "expected a mapping with exactly one of choice: [...], uniform: [lo, hi], "
            "loguniform: [lo, hi] or int: [lo, hi] (uniform and int take an optional step)"
        ),
    ),
]
