"""Missing-modality protocols of the paper (sec 4.1) as reproducible availability masks.

A mask is a bool array of shape (N, 3) whose columns follow `modalities.MODALITIES` (l, a, v);
True means the modality is available. The paper measures missingness with the missing rate

    MR = 1 - sum_i m_i / (N x M),

where m_i is the number of available modalities of sample i and M = 3, and requires m_i >= 1,
so MR <= (M - 1) / M = 2/3. Its MR grid is 0.0, 0.1, ..., 0.7, where 0.7 stands for 2/3.

The paper's three protocols:

- "random": the paper's random missing protocol, per sample, with the realised MR as close to
  the nominal one as integer counts allow.
- "fixed": the paper's fixed missing protocol (Table 1): every sample has the same subset.
- "reference-schedule": the per-batch schedule of the published code, reproduced so that its
  numbers can be compared with ours on the same footing (see `reference_schedule_masks`).

and those of later work (docs/protocols.md maps each paper's setting to ours):

- "instance_prob" (p): each sample is incomplete with probability p, its pattern uniform over
  the six incomplete ones (MPLMM, CyIN's `miss_prob`).
- "per_modality" (r_l, r_a, r_v): each modality missing with its own rate, at least one kept per
  sample (imbalanced missingness, MissBench).
- "erasure" (rate): no modality is wholly missing; inside every modality a fraction `rate` of
  the time steps is erased, i.e. set to 0, the features' padding value (LNLN, P-RMF). It needs
  time-step masks (`SplitMasks.steps`).
- "test_only" (base, and the base's parameters): complete training data; validation and test
  under the base protocol, with the base's own masks.

Masks are drawn once per split from (protocol, parameters, seed, split name) and attached to
samples, so every trial compared at the same arguments sees identical masks, test included.
With `resample: epoch` the training masks are drawn again every epoch from (..., epoch), still
the same for every trial (`draw_masks(epoch=...)`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from imder_sweep.modalities import MODALITIES, SUBSETS, pattern_to_subset, subset_to_pattern

ProtocolKind = Literal[
    "random",
    "fixed",
    "reference-schedule",
    "instance_prob",
    "per_modality",
    "erasure",
    "test_only",
]
PROTOCOLS: tuple[str, ...] = get_args(ProtocolKind)
# Each protocol's parameters (test_only: `base` and the base protocol's).
PARAMETERS: dict[str, tuple[str, ...]] = {
    "random": ("mr",),
    "fixed": ("subset",),
    "reference-schedule": ("mr",),
    "instance_prob": ("p",),
    "per_modality": ("r_l", "r_a", "r_v"),
    "erasure": ("rate",),
    "test_only": ("base",),
}
# Every protocol parameter a config can set (`ProtocolConfig`).
ALL_PARAMETERS: tuple[str, ...] = tuple(dict.fromkeys(p for ps in PARAMETERS.values() for p in ps))
# How the realised rate of a parameter is measured (`realised_rates`' keys).
REALISED_MEASURE: dict[str, str] = {
    "mr": "mr",
    "p": "incomplete",
    "r_l": "missing_l",
    "r_a": "missing_a",
    "r_v": "missing_v",
    "rate": "erased",
}

M = len(MODALITIES)
MAX_MR = (M - 1) / M
# The paper writes 0.7 for the maximum 2/3 (sec 4.1); values up to it mean 2/3.
PAPER_MAX_MR = 0.7

# Share of each split's batches that the published code makes lose two modalities, then one,
# indexed by nominal MR 0.1 ... 0.7 (its table, read off trains/singleTask/IMDER.py).
_REFERENCE_TWO_MISSING_SHARE = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
_REFERENCE_ONE_MISSING_SHARE = (0.1, 0.2, 0.3, 0.2, 0.1, 0.0, 0.0)


def normalize_mr(mr: float) -> float:
    """Nominal missing rate (paper sec 4.1) as a number in [0, 2/3].

    Values in [0, 2/3] are returned unchanged; the paper's 0.7 (anything in (2/3, 0.7]) means the
    maximum 2/3, where every sample keeps exactly one modality. Anything else raises ValueError.
    """
    value = float(mr)
    # Written so that NaN fails both comparisons and is rejected.
    if 0.0 <= value <= MAX_MR:
        return value
    if MAX_MR < value <= PAPER_MAX_MR:
        return MAX_MR
    raise ValueError(
        f"missing rate {mr!r} is outside [0, {PAPER_MAX_MR}] "
        f"(the paper's MR = 1 - sum_i m_i / (3N) is at most 2/3, written 0.7)"
    )


def _check_count(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_masks(masks: np.ndarray) -> None:
    if masks.ndim != 2 or masks.shape[1] != M or masks.dtype != np.bool_:
        raise ValueError(
            f"masks must be a bool array of shape (N, {M}), got {masks.dtype} {masks.shape}"
        )


def random_masks(n: int, mr: float, rng: np.random.Generator) -> np.ndarray:
    """Random missing protocol (paper sec 4.1): per-sample masks with a controlled MR.

    Exactly round(MR x 3n) entries are missing, so |realised MR - MR| <= 1 / (6n), and every
    sample keeps at least one modality. The mask is drawn uniformly among all masks with that many
    missing entries and no empty sample, i.e. which samples lose one or two modalities, and which
    ones, is uniformly random per sample rather than per batch.
    """
    _check_count("n", n, 0)
    target = round(normalize_mr(mr) * M * n)
    # k2 samples keep one modality, k1 keep two: k1 + 2 k2 = target and k1 + k2 <= n.
    k2_values = np.arange(max(0, target - n), target // 2 + 1)
    k1_values = target - 2 * k2_values
    # Number of masks with (k1, k2): multinomial n! / (k1! k2! (n - k1 - k2)!) times 3 choices of
    # the missing set per incomplete sample; drawing k2 with these weights makes the mask uniform.
    log_weights = np.array(
        [
            math.lgamma(n + 1)
            - math.lgamma(k1 + 1)
            - math.lgamma(k2 + 1)
            - math.lgamma(n - k1 - k2 + 1)
            + (k1 + k2) * math.log(M)
            for k1, k2 in zip(k1_values.tolist(), k2_values.tolist(), strict=True)
        ]
    )
    probabilities = np.exp(log_weights - log_weights.max())
    k2 = int(rng.choice(k2_values, p=probabilities / probabilities.sum()))
    k1 = target - 2 * k2

    order = rng.permutation(n)
    masks = np.ones((n, M), dtype=bool)
    keep_one = order[:k2]
    masks[keep_one] = False
    masks[keep_one, rng.integers(M, size=k2)] = True
    lose_one = order[k2 : k2 + k1]
    masks[lose_one, rng.integers(M, size=k1)] = False
    return masks


def fixed_masks(n: int, subset: str) -> np.ndarray:
    """Fixed missing protocol (paper sec 4.1, Table 1): every sample has the available `subset`."""
    _check_count("n", n, 0)
    return np.tile(np.array(subset_to_pattern(subset), dtype=bool), (n, 1))


def _reference_step(mr: float) -> int:
    """Grid step 0..7 of a nominal MR (0.0, 0.1, ..., 0.7), the only MRs the reference knows."""
    value = normalize_mr(mr)
    if value == MAX_MR:
        return 7
    step = round(value * 10)
    if not math.isclose(value * 10, step, abs_tol=1e-9):
        raise ValueError(
            f"missing rate {mr!r} is not on the reference schedule's grid 0.0, 0.1, ..., 0.7"
        )
    return step


def reference_schedule_masks(
    n: int, mr: float, batch_size: int, rng: np.random.Generator
) -> np.ndarray:
    """Masks of the published code's per-batch schedule for a loader of n samples, in order.

    The reference does not implement the paper's per-sample MR (sec 4.1). It walks the loader's
    batches in order with two counters: while (batches that lost two) / D is below a share from its
    table, the batch loses two modalities; then, while (batches that lost one) / D is below a second
    share, it loses one; the remaining batches are complete. D = round(batches / 10) x 10 with
    numpy's half-to-even rounding. Every sample of a batch gets the same pattern, drawn uniformly
    among the three of its kind (`random.sample` in the reference).

    MR 0.0 means complete data here; the reference indexes its table with MR x 10 - 1 = -1 and
    makes every batch lose two modalities. On MOSI train (1284 samples, batch 32, 41 batches,
    D = 40) this yields realised MRs 0.100 / 0.299 / 0.498 / 0.665 at MR 0.1 / 0.3 / 0.5 / 0.7.
    """
    _check_count("n", n, 0)
    _check_count("batch_size", batch_size, 1)
    step = _reference_step(mr)
    masks = np.ones((n, M), dtype=bool)
    if step == 0:
        return masks
    n_batches = -(-n // batch_size)
    denominator = float(np.round(n_batches / 10) * 10)
    if denominator == 0.0:
        # The reference divides by zero here and, comparing NaN, silently runs complete data.
        raise ValueError(
            f"the reference schedule needs at least 6 batches, got {n_batches} "
            f"({n} samples at batch size {batch_size}); use a smaller batch size"
        )
    two_share = _REFERENCE_TWO_MISSING_SHARE[step - 1]
    one_share = _REFERENCE_ONE_MISSING_SHARE[step - 1]
    lost_two = lost_one = 0
    for start in range(0, n, batch_size):
        batch = masks[start : start + batch_size]
        # Same float comparisons as the reference, so boundary batches fall the same way.
        if lost_two / denominator < two_share:
            batch[:] = False
            batch[:, rng.integers(M)] = True
            lost_two += 1
        elif lost_one / denominator < one_share:
            batch[:, rng.integers(M)] = False
            lost_one += 1
    return masks


def realised_mr(masks: np.ndarray) -> float:
    """Realised missing rate of masks, MR = 1 - sum_i m_i / (N x M) (paper sec 4.1)."""
    _check_masks(masks)
    if masks.shape[0] == 0:
        raise ValueError("the missing rate of zero samples is undefined")
    return 1.0 - float(masks.sum()) / masks.size


def pattern_counts(masks: np.ndarray) -> dict[str, int]:
    """Number of samples per available subset, for all seven subsets in Table 1 order."""
    _check_masks(masks)
    counts = dict.fromkeys(SUBSETS, 0)
    patterns, numbers = np.unique(masks, axis=0, return_counts=True)
    for pattern, number in zip(patterns, numbers, strict=True):
        counts[pattern_to_subset(tuple(bool(x) for x in pattern))] = int(number)
    return counts


def _split_rng(protocol: str, parameter: str, seed: int, split: str) -> np.random.Generator:
    """Generator for one split, keyed by a stable digest (Python's hash() is salted per process)."""
    key = "\0".join((protocol, parameter, split)).encode()
    words = np.frombuffer(hashlib.sha256(key).digest()[:16], dtype="<u4")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(words.tolist())))


def split_masks(
    protocol: str,
    sizes: dict[str, int],
    mr: float | None,
    subset: str | None,
    seed: int,
    batch_size: int = 32,
) -> dict[str, np.ndarray]:
    """Masks for every split (e.g. train/valid/test) under one protocol (paper sec 4.1).

    "random" and "reference-schedule" take `mr` (the same MR for every split, as in the paper) and
    no `subset`; "fixed" takes `subset` and no `mr`. `batch_size` only matters for
    "reference-schedule". The masks depend on nothing but the arguments and the split name, so
    every trial with the same arguments gets the same masks.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
    _check_count("seed", seed, 0)
    if protocol == "fixed":
        if subset is None or mr is not None:
            raise ValueError("the fixed protocol takes a subset and no missing rate")
        return {split: fixed_masks(n, subset) for split, n in sizes.items()}
    if mr is None or subset is not None:
        raise ValueError(f"the {protocol} protocol takes a missing rate and no subset")
    value = normalize_mr(mr)
    if protocol == "random":
        return {
            split: random_masks(n, value, _split_rng(protocol, repr(value), seed, split))
            for split, n in sizes.items()
        }
    parameter = f"{value!r}/{batch_size}"
    return {
        split: reference_schedule_masks(
            n, value, batch_size, _split_rng(protocol, parameter, seed, split)
        )
        for split, n in sizes.items()
    }


# --- the protocols of later work ------------------------------------------------------------

# The six incomplete availability patterns (l, a, v): one or two modalities kept.
INCOMPLETE_PATTERNS = np.array(
    [subset_to_pattern(s) for s in SUBSETS if len(s) < M], dtype=bool
)  # (6, 3)


@dataclass(frozen=True, eq=False)
class SplitMasks:
    """One split's masks: `available` (N, 3) bool, True = the modality is there (alpha_k = 1,
    sec 3.1); under "erasure" also `steps` (N, 3, L) bool, False = that time step is erased."""

    available: np.ndarray
    steps: np.ndarray | None = None


def _check_rate(name: str, value: Any) -> float:
    """A rate in [0, 1]; NaN, booleans and non-numbers are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number in [0, 1]")
    rate = float(value)
    if not 0.0 <= rate <= 1.0:  # written so that NaN fails
        raise ValueError(f"{name} must be in [0, 1]")
    return rate


def instance_prob_masks(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """ "instance_prob": each sample is incomplete with probability p, its pattern drawn
    uniformly from the six incomplete ones, so the expected MR is p / 2 (MPLMM, CyIN)."""
    _check_count("n", n, 0)
    incomplete = rng.random(n) < _check_rate("p", p)
    patterns = INCOMPLETE_PATTERNS[rng.integers(len(INCOMPLETE_PATTERNS), size=n)]
    return np.where(incomplete[:, None], patterns, True)


def per_modality_draw_rates(rates: tuple[float, float, float]) -> np.ndarray:
    """Per-modality probabilities q_k of independent draws that, conditioned on a sample
    keeping at least one modality (rejection), miss modality k with probability r_k.

    With Q = q_l q_a q_v: P(k missing | not all missing) = (q_k - Q) / (1 - Q) = r_k, so
    q_k = r_k (1 - Q) + Q, and Q solves g(Q) = prod_k (r_k + (1 - r_k) Q) - Q = 0. g is
    convex on [0, 1] with g(0) >= 0 and g(1) = 0, and g'(1) = 2 - sum_k r_k > 0 exactly when
    the rates are feasible, so the root in [0, 1) is unique; found by bisection."""
    r = np.array([_check_rate(f"r_{m}", x) for m, x in zip(MODALITIES, rates, strict=True)])
    if r.sum() >= M - 1:
        raise ValueError(
            f"r_l + r_a + r_v = {r.sum():g} must be below {M - 1}: every sample keeps at least "
            "one modality, so at most two of three are missing"
        )

    def g(q_all: float) -> float:
        return float(np.prod(r + (1.0 - r) * q_all)) - q_all

    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if g(mid) > 0 else (lo, mid)
    q_all = lo
    return r * (1.0 - q_all) + q_all


def per_modality_masks(
    n: int, rates: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """ "per_modality": modality k missing with probability r_k, independently, conditioned
    on the sample keeping at least one (MissBench's imbalanced missingness): drawn with
    `per_modality_draw_rates` and samples missing all three drawn again."""
    _check_count("n", n, 0)
    q = per_modality_draw_rates(rates)
    kept: list[np.ndarray] = []
    need = n
    while need > 0:
        draw = rng.random((max(need, 64), M)) >= q  # True = available
        draw = draw[draw.any(axis=1)][:need]
        kept.append(draw)
        need -= draw.shape[0]
    return np.concatenate(kept) if kept else np.ones((0, M), dtype=bool)


def erasure_steps(n: int, seq_len: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """ "erasure": (n, 3, L) bool, each time step of each modality erased (False) with
    probability `rate`, independently (LNLN's per-step Bernoulli mask)."""
    _check_count("n", n, 0)
    _check_count("seq_len", seq_len, 1)
    return rng.random((n, M, seq_len)) >= _check_rate("rate", rate)


def check_parameters(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters `kind` takes, checked, with everything else None: a ValueError names the
    parameter and the value. test_only takes `base` and the base protocol's parameters."""
    if kind not in PROTOCOLS:
        raise ValueError(f"unknown protocol {kind!r}; valid protocols: {', '.join(PROTOCOLS)}")
    wanted = set(PARAMETERS[kind])
    if kind == "test_only":
        base = params.get("base")
        if base not in PROTOCOLS or base == "test_only":
            valid = ", ".join(p for p in PROTOCOLS if p != "test_only")
            raise ValueError(
                f"base: the test_only protocol needs a base protocol ({valid}) (got {base!r})"
            )
        wanted |= set(PARAMETERS[base])
    for key, value in params.items():
        if key not in wanted and value is not None:
            raise ValueError(
                f"{key}: the {kind} protocol takes {', '.join(sorted(wanted))}, not {key} "
                f"(got {value!r})"
            )
    out = {key: params.get(key) for key in sorted(wanted)}
    for key in wanted - {"base"}:
        if out[key] is None:
            raise ValueError(f"{key}: the {kind} protocol needs {key} (got None)")
    checks: dict[str, Any] = {
        "mr": normalize_mr,
        "subset": subset_to_pattern,
        "p": lambda v: _check_rate("p", v),
        "rate": lambda v: _check_rate("rate", v),
    }
    for key, check in checks.items():
        if key in out:
            try:
                check(out[key])
            except ValueError as exc:
                raise ValueError(f"{key}: {exc} (got {out[key]!r})") from None
    if "r_l" in out:
        try:
            per_modality_draw_rates((out["r_l"], out["r_a"], out["r_v"]))
        except ValueError as exc:
            shown = ", ".join(f"r_{m}={out[f'r_{m}']!r}" for m in MODALITIES)
            raise ValueError(f"r_l, r_a, r_v: {exc} (got {shown})") from None
    return out


def protocol_label(kind: str, params: Mapping[str, Any]) -> str:
    """Short name of a protocol at its parameters: `mr0.3`, `fixed-lv`, `erasure-rate0.3`,
    `per_modality-r0.1-0.2-0.3`, `test_only-mr0.5`."""
    if kind == "fixed":
        return f"fixed-{params['subset']}"
    if kind in ("random", "reference-schedule"):
        return f"mr{params['mr']:g}"
    if kind == "per_modality":
        return "per_modality-r" + "-".join(f"{params[f'r_{m}']:g}" for m in MODALITIES)
    if kind == "test_only":
        return f"test_only-{protocol_label(params['base'], params)}"
    (name,) = PARAMETERS[kind]
    return f"{kind}-{name}{params[name]:g}"


def draw_masks(
    kind: str,
    params: Mapping[str, Any],
    sizes: Mapping[str, int],
    seed: int,
    *,
    batch_size: int = 32,
    seq_len: int = 50,
    epoch: int | None = None,
) -> dict[str, SplitMasks]:
    """Masks for every split under any protocol, deterministic from (protocol, parameters,
    seed, split name) and, with `epoch` (`resample: epoch`), the epoch: then only the
    training split is drawn, from its own stream per epoch. Every trial with the same
    arguments gets the same masks.

    test_only trains on complete data and draws validation and test exactly as its base
    protocol does, so its test masks are the base protocol's test masks."""
    params = check_parameters(kind, params)
    _check_count("seed", seed, 0)
    if epoch is not None:
        _check_count("epoch", epoch, 1)
        sizes = {"train": sizes["train"]}
    if kind == "test_only":
        out = (
            {"train": SplitMasks(np.ones((sizes["train"], M), dtype=bool))}
            if ("train" in sizes)
            else {}
        )
        rest = {s: n for s, n in sizes.items() if s != "train"}
        if epoch is not None or not rest:
            return out
        base = {k: v for k, v in params.items() if k != "base"}
        return out | draw_masks(
            params["base"], base, rest, seed, batch_size=batch_size, seq_len=seq_len
        )
    names = {s: s if epoch is None else f"{s}@epoch{epoch}" for s in sizes}
    if kind in ("random", "fixed", "reference-schedule"):
        if epoch is not None and kind == "reference-schedule":
            raise ValueError(
                "resample: epoch does not apply to the reference-schedule protocol "
                "(the published code assigns its schedule once)"
            )
        drawn = split_masks(
            kind,
            {names[s]: n for s, n in sizes.items()},
            params.get("mr"),
            params.get("subset"),
            seed,
            batch_size,
        )
        return {s: SplitMasks(drawn[names[s]]) for s in sizes}
    return {s: _draw_split(kind, params, n, seed, names[s], seq_len) for s, n in sizes.items()}


def _draw_split(
    kind: str, params: Mapping[str, Any], n: int, seed: int, name: str, seq_len: int
) -> SplitMasks:
    """One split's masks under instance_prob, per_modality or erasure, from its own stream."""
    if kind == "instance_prob":
        rng = _split_rng(kind, repr(float(params["p"])), seed, name)
        return SplitMasks(instance_prob_masks(n, params["p"], rng))
    if kind == "per_modality":
        rates = tuple(float(params[f"r_{m}"]) for m in MODALITIES)
        rng = _split_rng(kind, repr(rates), seed, name)
        return SplitMasks(per_modality_masks(n, rates, rng))  # type: ignore[arg-type]
    rng = _split_rng(kind, repr(float(params["rate"])), seed, name)
    return SplitMasks(np.ones((n, M), dtype=bool), erasure_steps(n, seq_len, params["rate"], rng))


def realised_rates(masks: SplitMasks) -> dict[str, float]:
    """What was realised in one split, next to every protocol's nominal parameter: the MR
    (sec 4.1), the share of incomplete samples (instance_prob's p), each modality's missing
    share (per_modality's r_k) and the share of erased time steps (erasure's rate; 0 without
    time-step masks)."""
    available = masks.available
    _check_masks(available)
    if available.shape[0] == 0:
        raise ValueError("the realised rates of zero samples are undefined")
    out = {
        "mr": realised_mr(available),
        "incomplete": float((~available.all(axis=1)).mean()),
        **{f"missing_{m}": float((~available[:, k]).mean()) for k, m in enumerate(MODALITIES)},
    }
    out["erased"] = 0.0 if masks.steps is None else 1.0 - float(masks.steps.mean())
    return out
