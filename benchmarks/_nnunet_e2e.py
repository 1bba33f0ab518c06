"""Glue of ``end_to_end.py``: pinned stages with a deadline, and nnU-Net v2's trainer sized to a wall-clock budget.

nnU-Net runs from its own virtual environment (``NNUNET_PYTHON``); nothing here imports it. Its training length is
changed the way nnU-Net users change it, by a trainer subclass inside ``nnunetv2/training/nnUNetTrainer/`` (like the
stock ``nnUNetTrainer_Xepochs`` variants); :data:`TRAINER_SOURCE` is that file, written into the benchmark-only venv
at run time. A short probe run of the same trainer measures nnU-Net's real iteration time (data loading and
augmentation included) and :func:`fit_schedule` turns it into epochs x iterations that fit.

The file sits at the top of ``nnUNetTrainer/``, not in ``variants/``: nnU-Net finds a trainer by importing that
package's modules, the top level first and then the subpackages in name order, and its ``primus`` subpackage (before
``variants``) imports timm, which imports torchvision; the benchmark venv has the CPU build of torch and no torchvision
to match it (the registry's Linux torchvision wheels need CUDA torch), so reaching ``primus`` would fail.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import NNUNET_PYTHON, _rss, _tree  # noqa: E402

#: Probe run: one epoch of this many training / validation iterations (the first of each is a warm-up).
PROBE_ITERATIONS, PROBE_VAL_ITERATIONS = 8, 3
#: nnU-Net's stock schedule: 1000 epochs of 250 training and 50 validation iterations.
STOCK_EPOCHS, STOCK_ITERATIONS, STOCK_VAL_RATIO = 1000, 250, 50 / 250
#: Fewest iterations per epoch, and the epoch count the schedule aims for when iterations must shrink.
MIN_ITERATIONS, TARGET_EPOCHS = 10, 20
#: Epochs of a budget too small for one epoch of MIN_ITERATIONS.
SHORT_EPOCHS = 4

TRAINER_FILE = "nnUNetTrainer_autoseg_e2e.py"
TRAINER_SOURCE = '''"""Written by autoseg's benchmarks/end_to_end.py or real.py (benchmark only; safe to delete).

nnU-Net's default trainer with only the training length changed, as in the stock _Xepochs variants, plus what a
one-core wall-clock budget needs: one torch thread (the process is pinned to one core), a checkpoint every epoch
(a run stopped at the budget keeps its weights) and no final validation (with fold 'all' the validation cases are
the training cases). Timestamps go to e2e_stats.json in the output folder.
"""
import json
import os
import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class _E2EBudgetTrainer(nnUNetTrainer):
    e2e_epochs = 1
    e2e_iterations = {probe_iterations}
    e2e_val_iterations = {probe_val_iterations}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        torch.set_num_threads(1)
        self.num_epochs = self.e2e_epochs
        self.num_iterations_per_epoch = self.e2e_iterations
        self.num_val_iterations_per_epoch = self.e2e_val_iterations
        self.save_every = 1
        self.e2e = dict(created=time.time(), epochs=self.num_epochs, iterations=self.num_iterations_per_epoch,
                        val_iterations=self.num_val_iterations_per_epoch, train_starts=[], val_starts=[],
                        epoch_starts=[], epoch_ends=[], save_seconds=[], parameters=None)

    def _e2e_dump(self):
        path = os.path.join(self.output_folder, "e2e_stats.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(self.e2e, fh)
        os.replace(path + ".tmp", path)

    def on_train_start(self):
        super().on_train_start()
        self.e2e["parameters"] = sum(p.numel() for p in self.network.parameters())
        self.e2e["threads"] = torch.get_num_threads()
        self.e2e["mirror_axes"] = [int(a) for a in self.inference_allowed_mirroring_axes or ()]
        self.e2e["batch_size"] = self.batch_size

    def on_epoch_start(self):
        self.e2e["epoch_starts"].append(time.time())
        super().on_epoch_start()

    def train_step(self, batch: dict) -> dict:
        self.e2e["train_starts"].append(time.time())
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self.e2e["val_starts"].append(time.time())
        return super().validation_step(batch)

    def on_epoch_end(self):
        super().on_epoch_end()
        self.e2e["epoch_ends"].append(time.time())
        self._e2e_dump()

    def save_checkpoint(self, filename: str) -> None:
        start = time.time()
        super().save_checkpoint(filename)
        self.e2e["save_seconds"].append(time.time() - start)

    def on_train_end(self):
        super().on_train_end()
        self.e2e["finished"] = time.time()
        self._e2e_dump()

    def perform_actual_validation(self, save_probabilities: bool = False):
        self.print_to_log_file("final validation skipped (equal-budget benchmark)")


class nnUNetTrainerE2EProbe(_E2EBudgetTrainer):
    pass


class nnUNetTrainerE2EBudget(_E2EBudgetTrainer):
    e2e_epochs = {epochs}
    e2e_iterations = {iterations}
    e2e_val_iterations = {val_iterations}
'''


@dataclass(frozen=True)
class Schedule:
    """nnU-Net's training length for the budget, and the measurements it came from."""

    epochs: int
    iterations: int
    val_iterations: int
    seconds_per_iteration: float
    seconds_per_val_iteration: float
    seconds_per_epoch_fixed: float
    startup_seconds: float
    estimated_seconds: float
    why: str


def trainer_folder() -> Path:
    """``training/nnUNetTrainer`` of the nnU-Net venv (where the trainer file goes; see the module docstring)."""
    code = "import os, nnunetv2; print(os.path.dirname(nnunetv2.__file__))"
    root = subprocess.run([NNUNET_PYTHON, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    return Path(root) / "training" / "nnUNetTrainer"


def write_trainers(schedule: Schedule | None) -> Path:
    """Write the probe and (once ``schedule`` is known) the budget trainer into nnU-Net's venv."""
    s = schedule or Schedule(1, PROBE_ITERATIONS, PROBE_VAL_ITERATIONS, 0, 0, 0, 0, 0, "")
    folder = trainer_folder()
    (folder / "variants" / "training_length" / TRAINER_FILE).unlink(missing_ok=True)  # where earlier runs wrote it
    path = folder / TRAINER_FILE
    path.write_text(
        TRAINER_SOURCE.format(
            probe_iterations=PROBE_ITERATIONS,
            probe_val_iterations=PROBE_VAL_ITERATIONS,
            epochs=s.epochs,
            iterations=s.iterations,
            val_iterations=s.val_iterations,
        )
    )
    return path


def fit_schedule(stats: dict, probe_wall_s: float, budget_s: float, *, margin: float = 0.85) -> Schedule:
    """Epochs x iterations whose estimated time, start-up included, is ``margin`` of ``budget_s``.

    Iterations per epoch stay at nnU-Net's 250 when at least 20 such epochs fit; otherwise they shrink (to at least
    10) so that the poly learning-rate schedule still has ~20 epochs. Validation iterations keep nnU-Net's 1:5 ratio.
    When not even one epoch of 10 iterations fits, what fits is split into ~:data:`SHORT_EPOCHS` epochs (at least 1
    iteration and 1 validation iteration each): a run stopped at the budget keeps the checkpoint of its last full
    epoch, and one long epoch that overran the estimate would leave none to predict with. The time whole epochs
    leave over is spread over them as more iterations (1.9 epochs of 10 iterations used to become 1 epoch of 10,
    half the budget unused).
    """
    train, val = stats["train_starts"], stats["val_starts"]
    t = statistics.median(b - a for a, b in zip(train[1:-1], train[2:]))
    v = statistics.median(b - a for a, b in zip(val[:-1], val[1:]))
    epoch = stats["epoch_ends"][0] - stats["epoch_starts"][0]
    fixed = max(0.0, epoch - len(train) * t - len(val) * v) + max(stats["save_seconds"] or [0.0])
    startup = max(0.0, probe_wall_s - epoch)
    available = margin * budget_s - startup
    total_iterations = available / (t * (1 + STOCK_VAL_RATIO * v / t))
    iterations = int(min(STOCK_ITERATIONS, max(MIN_ITERATIONS, round(total_iterations / TARGET_EPOCHS))))
    val_iterations = max(1, round(STOCK_VAL_RATIO * iterations))
    per_epoch = iterations * t + val_iterations * v + fixed
    if per_epoch > available:
        iterations, val_iterations = max(1, round(total_iterations / SHORT_EPOCHS)), 1
        per_epoch = iterations * t + val_iterations * v + fixed
    epochs = int(min(STOCK_EPOCHS, max(1, available // per_epoch)))
    if iterations < STOCK_ITERATIONS:  # whole epochs leave up to one epoch unused: spread it over the epochs
        fill = int(min(STOCK_ITERATIONS, (available / epochs - val_iterations * v - fixed) // t))
        while fill > iterations:
            fill_val = max(1, round(STOCK_VAL_RATIO * fill))
            if epochs * (fill * t + fill_val * v + fixed) <= available:
                iterations, val_iterations = fill, fill_val
                break
            fill -= 1
        per_epoch = iterations * t + val_iterations * v + fixed
    estimate = startup + epochs * per_epoch
    why = (
        f"probe: {t:.2f} s per training iteration (data loading included), {v:.2f} s per validation iteration, "
        f"{fixed:.1f} s per epoch for logging/checkpoints, {startup:.0f} s start-up; {margin:.0%} of the "
        f"{budget_s:.0f} s budget -> {epochs} epochs x {iterations} iterations ({val_iterations} validation), "
        f"estimated {estimate:.0f} s"
    )
    return Schedule(epochs, iterations, val_iterations, t, v, fixed, startup, estimate, why)


def schedule_dict(schedule: Schedule) -> dict:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(schedule).items()}


def run_stage(
    cmd: list[str], log: Path, *, cpu: int, env: dict[str, str] | None = None, deadline_s: float | None = None
) -> dict:
    """Run ``cmd`` pinned to core ``cpu`` (output to ``log``); stop it at ``deadline_s`` seconds.

    Returns wall seconds, the peak summed RSS of the process tree (MiB), the exit code and whether it was stopped.
    A stopped process gets SIGINT, then SIGKILL after 20 s. Raises RuntimeError when it fails on its own.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *cmd],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        peak, stopped, done = 0, False, threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, sum(_rss(p) for p in _tree(proc.pid)))
                time.sleep(0.1)

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            stopped = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        done.set()
        thread.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0 and not stopped:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mib": round(peak / 2**20, 1), "stopped_at_budget": stopped}


def read_stats(folder: Path) -> dict:
    """``e2e_stats.json`` written by the trainer (empty when it wrote none)."""
    path = folder / "e2e_stats.json"
    return json.loads(path.read_text()) if path.is_file() else {}
