"""Error types. Every message names the file or field at fault and, where possible, the fix."""

from __future__ import annotations


class AutosegError(Exception):
    """Base class for every error autoseg raises on purpose (the CLI prints these without a traceback)."""


class DatasetError(AutosegError):
    """The dataset folder, its dataset.json or one of its files is unusable."""


class ImageReadError(DatasetError):
    """An image or label file cannot be read."""


class ConfigError(AutosegError):
    """A JSON artifact (fingerprint, plans, ...) or an override has an unknown key, a wrong type or version."""


class PlanningError(AutosegError):
    """The planner cannot produce a valid plan for this fingerprint and device."""


class PreprocessingError(AutosegError):
    """A case could not be preprocessed."""


class TrainingError(AutosegError):
    """A training job failed."""


class InferenceError(AutosegError):
    """Prediction failed."""
