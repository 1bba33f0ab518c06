"""Kill anywhere, lose nothing: ``autoseg run`` killed with SIGKILL in every stage and run again ends exactly where
an uninterrupted run ends.

One uninterrupted run is the reference. A second run folder is driven through the pipeline by a chain of SIGKILLs,
each sent the moment the run reaches a stage (the fingerprint, preprocessing, a checkpoint being written, an epoch,
the validation predictions, selection; after a random delay of a few milliseconds, seeded), each followed by the
same command again. Then the chain's last command runs to the end, and every result must equal the reference's:
the weights of every fold, the validation predictions and metrics, ``selection.json``; and no temporary file may
be left where a finished one belongs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.data.io import read_label
from autoseg.data.synth import make_dataset
from autoseg.fingerprint import extract_fingerprint
from autoseg.training.checkpoint import load_checkpoint
from tests.training.test_trainer import tiny_plans

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")

FOLDS = [f"fold_{k}" for k in range(5)]


def _models(run: Path) -> Path:
    return run / "models" / "3d_fullres"


def _tmp_in_folds(run: Path) -> bool:
    return any(True for _ in _models(run).glob("fold_*/.checkpoint_*tmp*"))


def _epoch_logged(run: Path) -> bool:
    return any(f.stat().st_size > 0 for f in _models(run).glob("fold_*/log.jsonl"))


def _predicting(run: Path) -> bool:
    return any(
        (f / "validation").is_dir() and not (f / "validation" / "summary.json").is_file()
        for f in _models(run).glob("fold_*")
    )


def _all_trained(run: Path) -> bool:
    return all((_models(run) / f / "validation" / "summary.json").is_file() for f in FOLDS)


#: (stage, condition on the run folder that means the run is in that stage)
TRIGGERS = [
    ("fingerprint", lambda run: (run / "run.json").is_file()),
    ("preprocessing", lambda run: any((run / "preprocessed").glob("*/*.json"))),
    ("checkpoint write", _tmp_in_folds),
    ("epoch", _epoch_logged),
    ("validation prediction", _predicting),
    ("selection", _all_trained),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dataset and the tiny plans both runs use (``autoseg run`` keeps a plans.json it finds)."""
    root = tmp_path_factory.mktemp("kill")
    data = make_dataset(root / "data", "ct3d", cases=5, test_cases=0, seed=21)
    fp = extract_fingerprint(data, root / "scratch" / "fingerprint.json", workers=1)
    plans = root / "plans.json"
    tiny_plans(fp, epochs=3).save(plans)
    return data, plans


def _command(data: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "autoseg.cli", "run", str(data), "-o", str(run), "--device", "cpu", "-j", "1"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _new_run(run: Path, plans: Path) -> None:
    run.mkdir()
    (run / "plans.json").write_bytes(plans.read_bytes())


def _run_to_end(data: Path, run: Path) -> None:
    done = subprocess.run(_command(data, run), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _kill_when(data: Path, run: Path, condition, delay: float) -> bool:
    """Start the run, SIGKILL it ``delay`` seconds after ``condition(run)`` holds; False if it ended first."""
    with open(run.parent / f"{run.name}.log", "ab") as log:
        proc = subprocess.Popen(_command(data, run), env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        while proc.poll() is None:
            if condition(run):
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return True
            time.sleep(0.002)
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _results(run: Path) -> dict:
    out = {"selection": json.loads((run / "selection.json").read_text())}
    for fold in FOLDS:
        folder = _models(run) / fold
        out[fold] = {
            "weights": load_checkpoint(folder / "checkpoint_final.pt")["network"],
            "log": [
                {k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "peak_memory_bytes"}
                for line in (folder / "log.jsonl").read_text().splitlines()
            ],
            "validation": {p.name: read_label(p)[0] for p in sorted((folder / "validation").glob("*.nii.gz"))},
        }
    return out


def _strip_paths(value, run: Path):
    if isinstance(value, dict):
        return {k: _strip_paths(v, run) for k, v in value.items()}
    if isinstance(value, list):
        return [_strip_paths(v, run) for v in value]
    return value.replace(str(run), "RUN") if isinstance(value, str) else value


def test_sigkill_in_every_stage_then_rerun_gives_the_uninterrupted_result(dataset, tmp_path):
    data, plans = dataset
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _new_run(reference, plans)
    _run_to_end(data, reference)
    _new_run(killed, plans)
    rng = random.Random(2026)
    hit = []
    for stage, condition in TRIGGERS:
        if _kill_when(data, killed, condition, delay=rng.uniform(0, 0.02)):
            hit.append(stage)
    print("stages killed in:", hit)
    assert len(hit) >= 4, f"the run ended before most kills; stages hit: {hit}"
    _run_to_end(data, killed)

    # a write killed half-way leaves only a hidden temporary file, never a file under a finished name
    leftovers = [p for p in killed.rglob("*") if ".tmp" in p.name]
    assert all(p.name.startswith(".") for p in leftovers), leftovers
    want, got = _results(reference), _results(killed)
    assert _strip_paths(got["selection"], killed) == _strip_paths(want["selection"], reference)
    for fold in FOLDS:
        assert got[fold]["log"] == want[fold]["log"], fold
        assert want[fold]["weights"].keys() == got[fold]["weights"].keys()
        for name, tensor in want[fold]["weights"].items():
            assert torch.equal(tensor, got[fold]["weights"][name]), (fold, name)
        assert want[fold]["validation"].keys() == got[fold]["validation"].keys()
        for case, labels in want[fold]["validation"].items():
            assert np.array_equal(labels, got[fold]["validation"][case]), (fold, case)
