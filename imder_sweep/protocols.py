"""Missing-modality protocols of the paper (sec 4.1) as reproducible availability masks.

A mask is a bool array of shape (N, 3) whose columns follow `modalities.MODALITIES` (l, a, v);
True means the modality is available. The paper measures missingness with the missing rate

    MR = 1 - sum_i m_i / (N x M),

where m_i is the number of available modalities of sample i and M = 3, and requires m_i >= 1,
so MR <= (M - 1) / M = 2/3. Its MR grid is 0.0, 0.1, ..., 0.7, where 0.7 stands for 2/3.

Three protocols:

- "random": the paper's random missing protocol, per sample, with the realised MR as close to
  the nominal one as integer counts allow.
- "fixed": the paper's fixed missing protocol (Table 1): every sample has the same subset.
- "reference-schedule": the per-batch schedule of the published code, reproduced so that its
  numbers can be compared with ours on the same footing (see `reference_schedule_masks`).

Masks are drawn once per split from (protocol, MR or subset, seed, split name) and attached to
samples, so every trial compared at the same arguments sees identical masks, test included.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from imder_sweep.modalities import MODALITIES, SUBSETS, pattern_to_subset, subset_to_pattern

PROTOCOLS: tuple[str, ...] = ("random", "fixed", "reference-schedule")

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
