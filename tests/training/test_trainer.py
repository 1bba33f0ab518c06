"""The training loop: checkpoints, logs, exact resume, overrides, pruning callback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autoseg.data.synth import make_dataset
from autoseg.errors import ConfigError
from autoseg.fingerprint import extract_fingerprint
from autoseg.planning.overrides import apply_overrides
from autoseg.planning.plans import (
    AugmentationSpec,
    ChannelNormalization,
    Configuration,
    DeviceSpec,
    NetworkSpec,
    Plans,
    TrainingSpec,
    load_plans,
)
from autoseg.preprocessing.preprocess import preprocess
from autoseg.runfolder import record_dataset
from autoseg.training.checkpoint import load_checkpoint
from autoseg.training.trainer import TrainOptions, train_fold


def tiny_plans(fp, epochs: int = 4) -> Plans:
    net = NetworkSpec(
        3, (4, 8, 16), ((1, 3, 3), (3, 3, 3), (3, 3, 3)), ((1, 1, 1), (1, 2, 2), (2, 2, 2)), (1, 1, 1), (1, 1)
    )
    fi = fp.channels[0].foreground_intensity
    norm = ChannelNormalization("ct", clip=(fi.percentile_00_5, fi.percentile_99_5), mean=fi.mean, std=fi.std)
    c = Configuration(
        "3d_fullres",
        (6.0, 3.2, 3.2),
        (4, 12, 12),
        2,
        (13.0, 22.0, 22.0),
        (norm,),
        net,
        AugmentationSpec((1, 2), dummy_2d=True, p_rotation=0.5),
        training=TrainingSpec(epochs=epochs, iterations_per_epoch=2, val_iterations=1),
        data_identifier="3d_fullres",
    )
    return Plans(
        "synth",
        "test",
        DeviceSpec("cpu", 2**30),
        ("CT",),
        fp.labels,
        (0, 1, 2),
        (0, 1, 2),
        fp.median_spacing,
        fp.median_shape_after_crop,
        {"3d_fullres": c},
    )


def make_tiny_run(root: Path, cases: int, epochs: int = 4) -> Path:
    """A preprocessed run folder of ``cases`` synthetic CT cases under ``root`` with :func:`tiny_plans`."""
    data = make_dataset(root / "data", "ct3d", cases=cases, test_cases=0, seed=3)
    fp = extract_fingerprint(data, root / "run" / "fingerprint.json", workers=1)
    record_dataset(root / "run", data)
    tiny_plans(fp, epochs=epochs).save(root / "run" / "plans.json")
    preprocess(root / "run", data_dir=data, workers=1)
    return root / "run"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("train"), cases=5)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(folder / "checkpoint_final.pt")["network"]


def _straight_and_resumed(run_dir: Path, plans: Plans, fold: int, stop_after: int, name: str) -> tuple[Path, Path]:
    """Train ``fold`` straight through in a copy of ``run_dir``, and in ``run_dir`` "killed" after ``stop_after``
    epochs then run again; returns both fold folders."""
    options = TrainOptions(device="cpu", workers=0, deterministic=True)
    straight = run_dir.parent / name
    straight.mkdir()
    for file in ("plans.json", "fingerprint.json"):
        (straight / file).write_bytes((run_dir / file).read_bytes())
    (straight / "preprocessed").symlink_to(run_dir / "preprocessed")
    a = train_fold(straight, "3d_fullres", fold, plans=plans, options=options)
    b = train_fold(
        run_dir,
        "3d_fullres",
        fold,
        plans=plans,
        options=TrainOptions(device="cpu", workers=1, deterministic=True, stop_after_epochs=stop_after),
    )
    assert not (b / "checkpoint_final.pt").exists()
    assert load_checkpoint(b / "checkpoint_latest.pt")["epoch"] == stop_after
    train_fold(run_dir, "3d_fullres", fold, plans=plans, options=options)
    return a, b


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0)


def test_resume_gives_identical_weights(run_dir):
    a, b = _straight_and_resumed(run_dir, load_plans(run_dir), 0, 2, "straight")
    _assert_same_weights(a, b)
    log = [json.loads(line) for line in (b / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2, 3]
    assert log[-1]["lr"] < log[0]["lr"]
    for name in ("checkpoint_best.pt", "training_curve.png", "training.log", "configuration.json"):
        assert (b / name).is_file()
    assert "epoch 4/4" in (b / "training.log").read_text()
    # checkpoints hold no arbitrary pickles
    torch.load(b / "checkpoint_final.pt", weights_only=True)


def test_resume_with_augmentation_on_the_device_is_exact(run_dir):
    """``augmentation.device=gpu`` (here on CPU tensors): the loader only crops, the trainer augments each batch
    from (seed, batch index), so a resumed run still continues the same trajectory."""
    plans = apply_overrides(load_plans(run_dir), ["augmentation.device=gpu", "training.epochs=2"])
    a, b = _straight_and_resumed(run_dir, plans, 4, 1, "straight_gpu")
    _assert_same_weights(a, b)
    assert "augmentation on cpu: whole batches" in (b / "training.log").read_text()
    assert json.loads((b / "configuration.json").read_text())["augmentation"]["device"] == "gpu"


def test_callback_can_stop_training(run_dir):
    seen = []

    def stop(epoch, record):
        seen.append((epoch, record["mean_fg_dice"]))
        return True

    plans = apply_overrides(load_plans(run_dir), ["training.epochs=3"])
    out = train_fold(
        run_dir,
        "3d_fullres",
        1,
        plans=plans,
        on_epoch_end=stop,
        options=TrainOptions(device="cpu", workers=0),
    )
    assert len(seen) == 1 and 0.0 <= seen[0][1] <= 1.0
    assert not (out / "checkpoint_final.pt").exists()


def test_overrides_are_validated(run_dir):
    plans = load_plans(run_dir)
    p = apply_overrides(
        plans,
        ["3d_fullres.batch_size=4", "training.epochs=50", "loss.name=dice_topk", "augmentation.mirror_axes=[0,1]"],
    )
    c = p.configurations["3d_fullres"]
    assert (c.batch_size, c.training.epochs, c.loss.name, c.augmentation.mirror_axes) == (4, 50, "dice_topk", (0, 1))
    assert any("--set" in w for w in c.why)
    with pytest.raises(ConfigError, match="valid keys"):
        apply_overrides(plans, ["training.epoch=5"])
    with pytest.raises(ConfigError, match="expected an integer"):
        apply_overrides(plans, ["3d_fullres.batch_size=two"])
    with pytest.raises(ConfigError, match="neither a configuration"):
        apply_overrides(plans, ["2d.batch_size=2"])


def test_data_parallel_job_with_torchrun_on_cpu(run_dir):
    """Two DDP ranks (gloo) train one fold: rank 0 writes the checkpoints and predicts the validation cases."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    from autoseg.training.jobs import JobSpec, job_command

    # a time limit that fits: rank 0 decides the epochs after each one and every rank follows (a broadcast)
    spec = JobSpec(
        str(run_dir), "3d_fullres", "2", ("training.epochs=2", "training.time_limit_hours=1.0"), device="cpu", workers=0
    )
    cmd = job_command(spec, gpus=2)  # what the job runner starts for a job of two devices
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = run_dir / "models" / "3d_fullres" / "fold_2"
    state = load_checkpoint(out / "checkpoint_final.pt")
    assert state["epoch"] == 2 and not any(k.startswith("module.") for k in state["network"])
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert (out / "validation" / "summary.json").is_file()


def test_overrides_that_change_preprocessing_are_refused(run_dir):
    """The preprocessed data were made with the plan's spacing: a network trained with another would be wrong."""
    with pytest.raises(ConfigError, match=r"changes how 3d_fullres is preprocessed .*`autoseg preprocess`"):
        train_fold(run_dir, "3d_fullres", 3, overrides=["3d_fullres.spacing=[3.0,1.6,1.6]"])
    assert not (run_dir / "models" / "3d_fullres" / "fold_3" / "log.jsonl").exists()


def test_a_job_over_its_time_limit_trains_fewer_epochs_and_still_finishes(run_dir):
    """Epochs measured slower than the limit allows: the schedule is shortened (learning rate decayed over the
    epochs that fit) and the job ends with its final checkpoint, as a planned end would."""
    options = TrainOptions(device="cpu", workers=0)
    out = train_fold(run_dir, "3d_fullres", "all", overrides=["training.epochs=4", "training.time_limit_hours=1e-7"])
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["elapsed_seconds"] > 0
    final = load_checkpoint(out / "checkpoint_final.pt")
    assert (final["epoch"], final["epochs"]) == (1, 4)  # saved before the limit was applied; the next run knows
    assert "1 of 4 epochs fit" in (out / "training.log").read_text()
    assert train_fold(run_dir, "3d_fullres", "all", options=options) == out  # finished: nothing to do
