"""The three modalities and the seven availability patterns (paper sec 3.3, Table 1).

Every (N, 3) availability mask in the project orders its columns as `MODALITIES`:
language, audio, vision, the order of the MMSA feature dims (768 / 5 / 20 for MOSI).
A mask entry is True where the modality is available (alpha_k = 1 in sec 3.1).
"""

from __future__ import annotations

MODALITIES: tuple[str, str, str] = ("l", "a", "v")
MODALITY_NAMES: dict[str, str] = {"l": "language", "a": "audio", "v": "vision"}
# Keys of the MMSA pickle for each modality.
MMSA_KEYS: dict[str, str] = {"l": "text", "a": "audio", "v": "vision"}

# The fixed-missing protocol's available subsets, in the paper's Table 1 row order.
SUBSETS: tuple[str, ...] = ("l", "v", "a", "lv", "la", "va", "lva")


def subset_to_pattern(subset: str) -> tuple[bool, bool, bool]:
    """Availability pattern (l, a, v) of a subset name such as "lv" (order of letters is free)."""
    letters = set(subset)
    if not letters or not letters <= set(MODALITIES) or len(letters) != len(subset):
        raise ValueError(
            f"invalid modality subset {subset!r}: "
            "use one to three distinct letters of 'l', 'v', 'a'"
        )
    return tuple(m in letters for m in MODALITIES)  # type: ignore[return-value]


def pattern_to_subset(pattern: tuple[bool, ...]) -> str:
    """Canonical subset name of an availability pattern, in Table 1 spelling ("lv", "va", ...)."""
    letters = {m for m, available in zip(MODALITIES, pattern, strict=True) if available}
    for subset in SUBSETS:
        if set(subset) == letters:
            return subset
    raise ValueError(f"pattern {pattern!r} has no available modality")
