"""Evaluation: spacing-aware metrics (Dice, IoU, HD95, ASSD, NSD, volumes), folder summaries and statistics."""

from autoseg.evaluation.evaluate import CaseResult, MetricStats, Summary, evaluate_folders
from autoseg.evaluation.metrics import (
    ClassMetrics,
    assd,
    class_metrics,
    dice,
    evaluate_case,
    hd95,
    iou,
    nsd,
    surface_distances,
    surface_mask,
)
from autoseg.evaluation.statistics import paired_bootstrap

__all__ = [
    "ClassMetrics",
    "CaseResult",
    "MetricStats",
    "Summary",
    "assd",
    "class_metrics",
    "dice",
    "evaluate_case",
    "evaluate_folders",
    "hd95",
    "iou",
    "nsd",
    "paired_bootstrap",
    "surface_distances",
    "surface_mask",
]
