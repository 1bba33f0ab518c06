"""What label values mean: background (0), the foreground classes, the ignore label, regions.

Every stage that needs "the classes to segment" asks here, so that the ignore label is never scored as a class
and never given a network output.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["foreground_values", "foreground_names", "n_outputs"]


def foreground_values(labels: Mapping[str, int], ignore_label: int | None = None) -> tuple[int, ...]:
    """Sorted label values of the classes to segment: every value but background (0) and the ignore label."""
    return tuple(sorted(v for v in labels.values() if v not in (0, ignore_label)))


def foreground_names(labels: Mapping[str, int], ignore_label: int | None = None) -> tuple[str, ...]:
    """The names of :func:`foreground_values`, in the same order."""
    by_value = {v: k for k, v in labels.items()}
    return tuple(by_value[v] for v in foreground_values(labels, ignore_label))


def n_outputs(labels: Mapping[str, int], regions: Mapping[str, object], ignore_label: int | None = None) -> int:
    """Network output channels: one per region (sigmoid), else one per label value with background (softmax)."""
    return len(regions) if regions else len(foreground_values(labels, ignore_label)) + 1
