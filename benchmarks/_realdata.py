"""The real datasets of ``../shared/realdata`` and their test splits, fixed here before any tuning.

Every real-data benchmark and every experiment that chooses a rule or a default uses :func:`materialise`, which
lays out the *training* part of a dataset (and, separately, its test part) as an nnU-Net v2 raw folder of symbolic
links; both tools read that layout. The test cases are chosen by :func:`test_cases` from fixed rules and a fixed
seed, written down before the first experiment of issue 11, and never changed after seeing a result:

- ``hippocampus``: 20% of the 208 cases, seeded random choice (the cases are independent subjects).
- ``isbi_em``: the last 6 of the 30 serial sections (a contiguous block: neighbouring sections are nearly the same
  image, so a random choice would put near-copies of test slices into training).
- ``dsb2018``: 20% of each image size (size stands for the acquisition: stain, magnification, microscope), seeded.

Planner rules may be tuned only by cross-validation or on the training part; the test part scores results only.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "realdata"
SEED = 2026_11  # fixed once, before any experiment
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class RealDataset:
    key: str
    folder: str
    nnunet_id: int
    ending: str
    channels: dict[str, str]
    labels: dict[str, int]
    dim: int

    @property
    def root(self) -> Path:
        return REALDATA / self.folder

    @property
    def nnunet_name(self) -> str:
        return f"Dataset{self.nnunet_id:03d}_{self.key}"

    def cases(self) -> list[str]:
        """Every case id, sorted."""
        if self.key == "hippocampus":
            return sorted(p.name[: -len("_0000.nii.gz")] for p in (self.root / "imagesTr").glob("*_0000.nii.gz"))
        return sorted(p.stem for p in (self.root / "images").glob("*.png"))

    def image(self, case: str) -> Path:
        if self.key == "hippocampus":
            return self.root / "imagesTr" / f"{case}_0000.nii.gz"
        return self.root / "images" / f"{case}.png"

    def label(self, case: str) -> Path:
        if self.key == "hippocampus":
            return self.root / "labelsTr" / f"{case}.nii.gz"
        return self.root / "labels" / f"{case}.png"


DATASETS = {
    "hippocampus": RealDataset(
        "hippocampus",
        "Dataset004_Hippocampus",
        941,
        ".nii.gz",
        {"0": "MRI"},
        {"background": 0, "anterior": 1, "posterior": 2},
        3,
    ),
    "isbi_em": RealDataset(
        "isbi_em", "isbi2012_em_membrane", 942, ".png", {"0": "EM"}, {"background": 0, "membrane": 1}, 2
    ),
    "dsb2018": RealDataset(
        "dsb2018",
        "dsb2018_nuclei",
        943,
        ".png",
        {"0": "R", "1": "G", "2": "B"},
        {"background": 0, "nucleus": 1},
        2,
    ),
}


def _per_size(ds: RealDataset, cases: list[str], rng: random.Random, *, at_least_one: bool) -> list[str]:
    """``TEST_FRACTION`` of each image size, chosen with ``rng`` (size by size, in sorted order)."""
    sizes = json.loads((ds.root / "cases.json").read_text())
    groups: dict[tuple[int, int], list[str]] = {}
    for c in cases:
        groups.setdefault(tuple(sizes[c]["size_wh"]), []).append(c)
    chosen = []
    for key in sorted(groups):
        n = round(TEST_FRACTION * len(groups[key]))
        chosen += rng.sample(groups[key], max(1, n) if at_least_one else n)
    return sorted(chosen)


def test_cases(ds: RealDataset) -> list[str]:
    """The fixed test split (see the module docstring)."""
    cases = ds.cases()
    rng = random.Random(SEED)
    if ds.key == "isbi_em":
        return cases[-round(TEST_FRACTION * len(cases)) :]
    if ds.key == "dsb2018":
        return _per_size(ds, cases, rng, at_least_one=True)
    return sorted(rng.sample(cases, round(TEST_FRACTION * len(cases))))


def train_cases(ds: RealDataset) -> list[str]:
    test = set(test_cases(ds))
    return [c for c in ds.cases() if c not in test]


def dev_cases(ds: RealDataset) -> list[str]:
    """A development split of the *training* part, for experiments that compare whole runs (a cross-validation fold
    cannot score an ensemble of folds): the same rules as :func:`test_cases` applied to the training part, with the
    seed ``SEED + 1`` (isbi_em: the last 5 training sections)."""
    cases = train_cases(ds)
    if ds.key == "isbi_em":
        return cases[-round(TEST_FRACTION * len(cases)) :]
    rng = random.Random(SEED + 1)
    if ds.key == "dsb2018":
        return _per_size(ds, cases, rng, at_least_one=False)
    return sorted(rng.sample(cases, round(TEST_FRACTION * len(cases))))


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def materialise(ds: RealDataset, out: Path, *, max_train: int | None = None, dev: bool = False) -> Path:
    """Lay out ``out/<nnunet_name>/`` (nnU-Net v2 raw layout, symbolic links): imagesTr/labelsTr hold the training
    part (its first ``max_train`` cases when given), imagesTs/labelsTs the test part. With ``dev`` the test part is
    never laid out: imagesTs/labelsTs hold the development split (:func:`dev_cases`) and imagesTr/labelsTr the rest
    of the training part. Returns the dataset folder."""
    root = out / ds.nnunet_name
    held_out = dev_cases(ds) if dev else test_cases(ds)
    train = [c for c in train_cases(ds) if c not in set(held_out)]
    train = train[:max_train] if max_train else train
    for case in train:
        _link(ds.image(case), root / "imagesTr" / f"{case}_0000{ds.ending}")
        _link(ds.label(case), root / "labelsTr" / f"{case}{ds.ending}")
    for case in held_out:
        _link(ds.image(case), root / "imagesTs" / f"{case}_0000{ds.ending}")
        _link(ds.label(case), root / "labelsTs" / f"{case}{ds.ending}")
    meta = {
        "channel_names": ds.channels,
        "labels": ds.labels,
        "numTraining": len(train),
        "file_ending": ds.ending,
        "name": ds.key,
        "test_split": {
            "rule": (dev_cases if dev else test_cases).__doc__,
            "seed": SEED + 1 if dev else SEED,
            "cases": held_out,
        },
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
