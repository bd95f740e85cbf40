"""Missing-modality protocols (paper sec 4.1): realised MR, reproducibility, reference schedule."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import imder_sweep
from imder_sweep.modalities import SUBSETS, subset_to_pattern
from imder_sweep.protocols import (
    PROTOCOLS,
    fixed_masks,
    normalize_mr,
    pattern_counts,
    random_masks,
    realised_mr,
    reference_schedule_masks,
    split_masks,
)

MR_GRID = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
SIZES = [1, 7, 229, 686]
MOSI_SIZES = {"train": 1284, "valid": 229, "test": 686}


@pytest.mark.parametrize(
    ("mr", "expected"),
    [(0.0, 0.0), (0.3, 0.3), (2 / 3, 2 / 3), (0.68, 2 / 3), (0.7, 2 / 3)],
)
def test_normalize_mr_maps_the_papers_0_7_to_two_thirds(mr: float, expected: float) -> None:
    assert normalize_mr(mr) == pytest.approx(expected, abs=0)


@pytest.mark.parametrize("mr", [0.75, -0.1, 0.7000001, 1.0, float("nan")])
def test_invalid_mr_raises_naming_the_value(mr: float) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(mr))):
        normalize_mr(mr)
    with pytest.raises(ValueError, match="missing rate"):
        random_masks(10, mr, np.random.default_rng(0))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mr", MR_GRID)
def test_random_masks_realise_the_mr_within_one_sample(n: int, mr: float) -> None:
    masks = random_masks(n, mr, np.random.default_rng(123))
    assert masks.shape == (n, 3)
    assert masks.dtype == np.bool_
    assert masks.any(axis=1).all(), "every sample keeps at least one modality"
    missing = int((~masks).sum())
    assert abs(missing - normalize_mr(mr) * 3 * n) <= 0.5
    assert realised_mr(masks) == pytest.approx(missing / (3 * n))


def test_random_masks_at_the_extremes() -> None:
    rng = np.random.default_rng(5)
    assert random_masks(229, 0.0, rng).all()
    assert (random_masks(229, 0.7, rng).sum(axis=1) == 1).all()
    assert random_masks(0, 0.3, rng).shape == (0, 3)


def test_random_masks_are_uniform_over_valid_masks() -> None:
    # Two samples, two missing entries: 6 masks where one sample keeps one modality and
    # 9 where each sample loses one; a uniform draw hits each of the 15 equally often.
    rng = np.random.default_rng(11)
    draws = 6000
    seen = Counter(random_masks(2, 1 / 3, rng).tobytes() for _ in range(draws))
    assert len(seen) == 15
    expected = draws / 15
    assert all(abs(count - expected) < 100 for count in seen.values()), seen


def test_random_masks_spread_over_modalities_and_patterns() -> None:
    masks = random_masks(686, 0.3, np.random.default_rng(2))
    missing_per_modality = (~masks).sum(axis=0)
    assert np.all(np.abs(missing_per_modality / missing_per_modality.sum() - 1 / 3) < 0.06)
    assert all(count > 0 for count in pattern_counts(masks).values())


@pytest.mark.parametrize("subset", SUBSETS)
def test_fixed_masks_are_exact(subset: str) -> None:
    masks = fixed_masks(229, subset)
    assert (masks == np.array(subset_to_pattern(subset))).all()
    assert realised_mr(masks) == pytest.approx(1 - len(subset) / 3)
    counts = pattern_counts(masks)
    assert counts[subset] == 229
    assert sum(counts.values()) == 229


def test_fixed_masks_reject_bad_subsets() -> None:
    with pytest.raises(ValueError, match="'lx'"):
        fixed_masks(3, "lx")


@pytest.mark.parametrize(
    ("mr", "train_mr"), [(0.1, 0.100), (0.3, 0.299), (0.5, 0.498), (0.7, 0.665)]
)
def test_reference_schedule_matches_the_published_code_on_mosi_train(
    mr: float, train_mr: float
) -> None:
    masks = reference_schedule_masks(1284, mr, 32, np.random.default_rng(0))
    assert round(realised_mr(masks), 3) == train_mr
    assert masks.any(axis=1).all()


@pytest.mark.parametrize(("mr", "test_mr"), [(0.1, 0.093), (0.7, 0.622)])
def test_reference_schedule_realised_mr_differs_on_mosi_test(mr: float, test_mr: float) -> None:
    # The per-split drift that the reference's users see (reference-facts.md, fault 3).
    masks = reference_schedule_masks(686, mr, 32, np.random.default_rng(0))
    assert round(realised_mr(masks), 3) == test_mr


def test_reference_schedule_is_per_batch_and_ordered() -> None:
    masks = reference_schedule_masks(1284, 0.3, 32, np.random.default_rng(1))
    kept = masks.sum(axis=1)
    for start in range(0, 1284, 32):
        batch = masks[start : start + 32]
        assert (batch == batch[0]).all(), "one pattern per batch"
    # 12 batches keep one modality, the next 12 keep two, the rest are complete.
    assert (kept[: 12 * 32] == 1).all()
    assert (kept[12 * 32 : 24 * 32] == 2).all()
    assert (kept[24 * 32 :] == 3).all()


def test_reference_schedule_at_mr_0_is_complete() -> None:
    assert reference_schedule_masks(1284, 0.0, 32, np.random.default_rng(0)).all()


def test_reference_schedule_rejects_what_the_reference_cannot_run() -> None:
    with pytest.raises(ValueError, match="grid"):
        reference_schedule_masks(1284, 0.25, 32, np.random.default_rng(0))
    # 5 batches: the reference's denominator round(0.5) * 10 is 0.
    with pytest.raises(ValueError, match="at least 6 batches"):
        reference_schedule_masks(160, 0.3, 32, np.random.default_rng(0))


def test_realised_mr_and_pattern_counts() -> None:
    masks = np.array([[1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=bool)
    assert realised_mr(masks) == pytest.approx(1 - 8 / 12)
    counts = pattern_counts(masks)
    assert list(counts) == list(SUBSETS)
    assert counts == {"l": 1, "v": 0, "a": 0, "lv": 1, "la": 0, "va": 1, "lva": 1}
    with pytest.raises(ValueError, match="no available modality"):
        pattern_counts(np.zeros((1, 3), dtype=bool))
    with pytest.raises(ValueError, match="zero samples"):
        realised_mr(np.ones((0, 3), dtype=bool))
    with pytest.raises(ValueError, match="bool array"):
        realised_mr(np.ones((2, 3)))


@pytest.mark.parametrize("protocol", ["random", "reference-schedule"])
def test_split_masks_are_reproducible_and_seed_dependent(protocol: str) -> None:
    first = split_masks(protocol, MOSI_SIZES, 0.5, None, seed=7)
    again = split_masks(protocol, MOSI_SIZES, 0.5, None, seed=7)
    other = split_masks(protocol, MOSI_SIZES, 0.5, None, seed=8)
    assert list(first) == list(MOSI_SIZES)
    for split, n in MOSI_SIZES.items():
        assert first[split].shape == (n, 3)
        assert np.array_equal(first[split], again[split])
    assert any(not np.array_equal(first[s], other[s]) for s in MOSI_SIZES)


def test_split_masks_differ_between_splits_of_equal_size() -> None:
    masks = split_masks("random", {"valid": 500, "test": 500}, 0.3, None, seed=0)
    assert not np.array_equal(masks["valid"], masks["test"])


def test_split_masks_do_not_depend_on_the_process_hash_seed() -> None:
    code = (
        "from imder_sweep.protocols import split_masks;"
        "import hashlib;"
        "m = split_masks('random', {'train': 300, 'test': 100}, 0.4, None, seed=3);"
        "print(hashlib.sha256(m['train'].tobytes() + m['test'].tobytes()).hexdigest())"
    )
    package_root = str(Path(imder_sweep.__file__).resolve().parents[1])
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": hash_seed, "PYTHONPATH": package_root},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(digests) == 1


def test_split_masks_fixed_and_argument_checks() -> None:
    masks = split_masks("fixed", MOSI_SIZES, None, "va", seed=0)
    assert all((m == np.array(subset_to_pattern("va"))).all() for m in masks.values())
    with pytest.raises(ValueError, match=", ".join(PROTOCOLS)):
        split_masks("per-batch", MOSI_SIZES, 0.3, None, seed=0)
    with pytest.raises(ValueError, match="subset"):
        split_masks("fixed", MOSI_SIZES, 0.3, None, seed=0)
    with pytest.raises(ValueError, match="missing rate"):
        split_masks("random", MOSI_SIZES, None, None, seed=0)
    with pytest.raises(ValueError, match=r"0\.8"):
        split_masks("random", MOSI_SIZES, 0.8, None, seed=0)
