"""Tests for autoseg.training.splits."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autoseg.errors import ConfigError, DatasetError
from autoseg.training.splits import FORMAT, Fold, Splits, fold_cases, load_splits, make_splits, save_splits

CASES = [f"case_{i:03d}" for i in range(12)]

case_lists = st.lists(st.text("abcdefgh0123_", min_size=1, max_size=6), min_size=2, max_size=40, unique=True)


def _check_partition(splits: Splits, case_ids: list[str]) -> None:
    val_cases = [case for fold in splits.folds for case in fold.val]
    assert sorted(val_cases) == sorted(case_ids)  # every case validated exactly once
    for fold in splits.folds:
        assert len(fold.val) > 0
        assert set(fold.train) | set(fold.val) == set(case_ids)
        assert set(fold.train) & set(fold.val) == set()
        assert list(fold.train) == sorted(fold.train) and list(fold.val) == sorted(fold.val)


@settings(max_examples=60, deadline=None)
@given(case_ids=case_lists, n_folds=st.integers(2, 8), seed=st.integers(0, 2**31))
def test_splits_partition_cases_in_balanced_folds(case_ids: list[str], n_folds: int, seed: int) -> None:
    n_folds = min(n_folds, len(case_ids))
    splits = make_splits(case_ids, n_folds=n_folds, seed=seed)
    assert splits.n_folds == n_folds
    _check_partition(splits, case_ids)
    sizes = [len(fold.val) for fold in splits.folds]
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=60, deadline=None)
@given(
    case_ids=case_lists,
    n_groups=st.integers(1, 10),
    n_folds=st.integers(2, 5),
    seed=st.integers(0, 2**31),
    data=st.data(),
)
def test_groups_never_cross_folds(case_ids: list[str], n_groups: int, n_folds: int, seed: int, data) -> None:
    group_of = data.draw(st.lists(st.integers(0, n_groups - 1), min_size=len(case_ids), max_size=len(case_ids)))
    groups = {case: f"patient{g}" for case, g in zip(case_ids, group_of)}
    n_distinct = len(set(group_of))
    if n_distinct < n_folds:
        with pytest.raises(ConfigError, match=f"at least {n_folds} groups"):
            make_splits(case_ids, n_folds=n_folds, seed=seed, groups=groups)
        return
    splits = make_splits(case_ids, n_folds=n_folds, seed=seed, groups=groups)
    _check_partition(splits, case_ids)
    fold_of = {case: k for k, fold in enumerate(splits.folds) for case in fold.val}
    for group in set(groups.values()):
        assert len({fold_of[c] for c in case_ids if groups[c] == group}) == 1
    sizes = [len(fold.val) for fold in splits.folds]
    largest_group = max(group_of.count(g) for g in set(group_of))
    assert max(sizes) - min(sizes) <= largest_group


@settings(max_examples=30, deadline=None)
@given(case_ids=case_lists, seed=st.integers(0, 2**31), data=st.data())
def test_splits_are_deterministic_and_ignore_input_order(case_ids: list[str], seed: int, data) -> None:
    shuffled = data.draw(st.permutations(case_ids))
    n_folds = min(3, len(case_ids))
    assert make_splits(shuffled, n_folds=n_folds, seed=seed) == make_splits(case_ids, n_folds=n_folds, seed=seed)


def test_seed_changes_the_splits() -> None:
    assert make_splits(CASES, seed=1) != make_splits(CASES, seed=2)
    assert make_splits(CASES, seed=1) == make_splits(CASES, seed=1)


def test_cases_without_a_group_are_their_own_group() -> None:
    groups = {"case_000": "p", "case_001": "p", "case_002": "p"}
    splits = make_splits(CASES, n_folds=5, groups=groups)
    _check_partition(splits, CASES)
    assert any({"case_000", "case_001", "case_002"} <= set(fold.val) for fold in splits.folds)


def test_fewer_cases_than_folds_says_how_many_are_needed() -> None:
    with pytest.raises(ConfigError, match="5 folds need at least 5 cases, found 3; pass n_folds=3 or fewer"):
        make_splits(CASES[:3], n_folds=5)
    groups = {case: f"p{i % 2}" for i, case in enumerate(CASES)}
    with pytest.raises(ConfigError, match="need at least 3 groups .* found 2; pass n_folds=2 or fewer"):
        make_splits(CASES, n_folds=3, groups=groups)
    with pytest.raises(ConfigError, match="found 1; add cases"):
        make_splits(CASES[:1], n_folds=2)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ConfigError, match="use at least 2"):
        make_splits(CASES, n_folds=1)
    with pytest.raises(DatasetError, match=r"case ids \['case_001'\] appear more than once"):
        make_splits([*CASES, "case_001"])


def test_fold_cases_and_all() -> None:
    splits = make_splits(CASES, n_folds=4)
    train, val = fold_cases(splits, 2)
    assert (train, val) == (splits.folds[2].train, splits.folds[2].val)
    assert len(val) == 3 and len(train) == 9
    assert fold_cases(splits, "all") == (tuple(CASES), ())
    for bad in (4, -1, True, "2"):
        with pytest.raises(ConfigError, match="use 0 to 3 or 'all'"):
            fold_cases(splits, bad)  # type: ignore[arg-type]


def test_save_load_round_trip(tmp_path: Path) -> None:
    splits = make_splits(CASES, n_folds=5, seed=7)
    path = tmp_path / "run" / "splits.json"
    save_splits(splits, path)
    assert load_splits(path) == splits
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["seed"] == 7
    assert data["folds"][0] == {"train": list(splits.folds[0].train), "val": list(splits.folds[0].val)}
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temporary file left behind


def test_load_rejects_overlap_and_warns_on_non_partition(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "splits.json"
    save_splits(Splits(folds=(Fold(("a", "b"), ("b",)), Fold(("a",), ("b",))), seed=0), path)
    with pytest.raises(ConfigError, match=r"folds\[0\] trains and validates on the same case\(s\) \['b'\]"):
        load_splits(path)
    save_splits(Splits(folds=(Fold(("a",), ("b",)), Fold(("b",), ("c",))), seed=0), path)
    with caplog.at_level(logging.WARNING):
        load_splits(path)
    assert "do not partition" in caplog.text
    data = json.loads(path.read_text())
    data["format"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="format 99 is not the supported format 1"):
        load_splits(path)
