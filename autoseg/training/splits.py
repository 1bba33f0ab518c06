"""Cross-validation splits: which cases each fold trains and validates on.

Splits are made once per run and saved as ``splits.json`` so that every configuration trains on the same folds
(cross-validation results are then comparable and can be ensembled). Every case is in exactly one validation
fold; a fold trains on all the other cases. Cases of one group (for example several scans of one patient) always
land in the same fold, so no patient is in both the training and the validation set of a fold.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from autoseg.errors import ConfigError, DatasetError
from autoseg.runfolder import RunFolder
from autoseg.serialization import load_json, save_json

__all__ = ["FORMAT", "Fold", "Splits", "make_splits", "load_or_make_splits", "save_splits", "load_splits", "fold_cases"]

FORMAT = 1

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fold:
    """One fold: case ids to train on and to validate on (each sorted)."""

    train: tuple[str, ...]
    val: tuple[str, ...]


@dataclass(frozen=True)
class Splits:
    """``splits.json``: the folds of a cross-validation and the seed that made them."""

    folds: tuple[Fold, ...]
    seed: int
    format: int = FORMAT

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    @property
    def case_ids(self) -> tuple[str, ...]:
        """Every case of the splits, sorted."""
        return tuple(sorted({case for fold in self.folds for case in (*fold.train, *fold.val)}))


def _group_members(case_ids: Sequence[str], groups: Mapping[str, str] | None) -> dict[str, list[str]]:
    """Group name -> its cases (sorted); a case without a group is a group of its own."""
    duplicates = sorted(case for case, count in Counter(case_ids).items() if count > 1)
    if duplicates:
        raise DatasetError(f"splits: case ids {duplicates} appear more than once; case ids must be unique")
    members: dict[str, list[str]] = {}
    for case in sorted(case_ids):
        key = ("group", groups[case]) if groups is not None and case in groups else ("case", case)
        members.setdefault(repr(key), []).append(case)
    return members


def make_splits(
    case_ids: Sequence[str], *, n_folds: int = 5, seed: int = 12345, groups: Mapping[str, str] | None = None
) -> Splits:
    """Split cases into ``n_folds`` folds for cross-validation (group k-fold, balanced sizes).

    Parameters
    ----------
    case_ids : sequence of str
        Unique case ids; their order does not matter.
    n_folds : int
        Number of folds, at least 2 (train on every case with fold ``"all"`` of :func:`fold_cases` instead).
    seed : int
        Seed of the shuffle; the same cases, groups and seed always give the same splits.
    groups : mapping of case id to group name, optional
        Cases sharing a group (e.g. a patient) stay in one fold. A case missing from it is its own group.

    Returns
    -------
    Splits
        Fold ``k`` validates on its ``val`` cases and trains on all others. Fold sizes (in cases) differ by at
        most the size of the largest group (by at most one without groups).

    Raises
    ------
    ConfigError
        ``n_folds`` is below 2 or above the number of cases (or groups).
    DatasetError
        A case id appears twice.
    """
    if n_folds < 2:
        raise ConfigError(f"n_folds: {n_folds} folds leave nothing to validate on; use at least 2 (or fold 'all')")
    members = _group_members(case_ids, groups)
    if len(members) < n_folds:
        unit = "cases" if groups is None else "groups (cases of one group stay in one fold)"
        fix = f"pass n_folds={len(members)} or fewer" if len(members) >= 2 else "add cases"
        raise ConfigError(f"n_folds: {n_folds} folds need at least {n_folds} {unit}, found {len(members)}; {fix}")
    rng = np.random.default_rng(seed)
    names = sorted(members)
    order = [names[i] for i in rng.permutation(len(names))]
    # largest groups first (the shuffle breaks ties), each into the currently smallest fold
    order.sort(key=lambda name: -len(members[name]))
    val: list[list[str]] = [[] for _ in range(n_folds)]
    for name in order:
        smallest = min(range(n_folds), key=lambda k: len(val[k]))
        val[smallest].extend(members[name])
    all_cases = sorted(case_ids)
    return Splits(folds=tuple(_fold(all_cases, set(v)) for v in val), seed=seed)


def _fold(all_cases: list[str], val: set[str]) -> Fold:
    return Fold(train=tuple(c for c in all_cases if c not in val), val=tuple(sorted(val)))


def save_splits(splits: Splits, path: Path | str) -> None:
    """Write ``splits`` to ``path`` (JSON, atomically)."""
    save_json(splits, Path(path))


def load_splits(path: Path | str) -> Splits:
    """Read splits written by :func:`save_splits` (or edited by hand), checking that no fold validates on a case
    it trains on."""
    path = Path(path)
    splits = load_json(Splits, path, format_version=FORMAT)
    for k, fold in enumerate(splits.folds):
        overlap = sorted(set(fold.train) & set(fold.val))
        if overlap:
            raise ConfigError(f"{path}: folds[{k}] trains and validates on the same case(s) {overlap}; fix the file")
    val_cases = [case for fold in splits.folds for case in fold.val]
    if len(set(val_cases)) != len(val_cases) or set(val_cases) != set(splits.case_ids):
        logger.warning("%s: the validation folds do not partition the cases (edited by hand?)", path)
    return splits


def fold_cases(splits: Splits, fold: int | Literal["all"]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Training and validation case ids of ``fold``; ``"all"`` trains on every case and validates on none."""
    if fold == "all":
        return splits.case_ids, ()
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < splits.n_folds:
        raise ConfigError(
            f"fold: {fold!r} does not exist; the splits have {splits.n_folds} folds, "
            f"use 0 to {splits.n_folds - 1} or 'all'"
        )
    return splits.folds[fold].train, splits.folds[fold].val


def load_or_make_splits(run_dir: Path | str, case_ids: Sequence[str], *, n_folds: int = 5, seed: int = 12345) -> Splits:
    """``RUN/splits.json`` if it exists (it must cover ``case_ids``), else new splits saved there.

    Datasets with fewer cases than ``n_folds`` get one fold per case (logged), so tiny datasets still train.
    """
    path = RunFolder(run_dir).splits
    if path.is_file():
        splits = load_splits(path)
        missing = sorted(set(case_ids) - set(splits.case_ids))
        if missing:
            raise ConfigError(f"{path}: cases {missing[:5]} are in no fold; delete the file to make new splits")
        return splits
    if len(case_ids) < n_folds:
        logger.warning("only %d cases: using %d folds instead of %d", len(case_ids), len(case_ids), n_folds)
        n_folds = len(case_ids)
    splits = make_splits(case_ids, n_folds=n_folds, seed=seed)
    save_splits(splits, path)
    return splits
