"""Preprocessing: crop to the non-zero region, normalise, resample to the plan's spacing, store; and the exact
inverse for predictions (:func:`revert`)."""

from autoseg.preprocessing.preprocess import plan_hash, preprocess, preprocess_case, revert, target_spacing
from autoseg.preprocessing.store import (
    CaseProperties,
    list_cases,
    load_case,
    preprocessed_folder,
    read_case,
    read_class_locations,
)

__all__ = [
    "CaseProperties",
    "list_cases",
    "load_case",
    "plan_hash",
    "preprocess",
    "preprocess_case",
    "preprocessed_folder",
    "read_case",
    "read_class_locations",
    "revert",
    "target_spacing",
]
