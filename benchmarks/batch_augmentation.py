"""Time per training batch: the CPU loader's augmentation vs batch augmentation in torch, same plan and patches.

    flock /tmp/autoseg-bench.lock python benchmarks/batch_augmentation.py
        [--fingerprint fingerprints/Dataset004_Hippocampus.json] [--config 3d_fullres] [--gpu-memory GB | --cpu-plan]
        [--batches 20] [--threads 1] [--devices cpu,cuda] [--save]

The default planner's plan for the fingerprint (for this machine's GPU, else a GPU of ``--gpu-memory`` GB, 80 by
default: augmentation on the device is what GPU plans get; ``--cpu-plan`` for the CPU plan), on synthetic cases of
the plan's median image size. Per batch, the same batch indices for each:

- ``cpu loader``: what one loader worker does for a batch today: crop the enlarged patch, batchgenerators'
  augmentation and the deep-supervision targets (``make_batch`` with the plan's transforms);
- ``batch on DEVICE``: the loader's crop only, then :func:`augment_batch` on DEVICE tensors (crop and augmentation
  timed apart; CUDA synchronised).

torch uses ``--threads`` threads (a loader worker uses 1). ``--save`` writes benchmarks/results/batch_augmentation.json;
run it on a quiet machine (timings of a shared machine are not worth keeping).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _measure import print_table, write_results  # noqa: E402

from autoseg.fingerprint_import import load_corpus_entry  # noqa: E402
from autoseg.planning.planner import make_plans  # noqa: E402
from autoseg.planning.plans import Plans  # noqa: E402
from autoseg.training.augmentation import build_transforms  # noqa: E402
from autoseg.training.batch_augmentation import augment_batch, batch_generator  # noqa: E402
from autoseg.training.loader import CaseData, make_batch  # noqa: E402
from autoseg.training.trainer import _recipes  # noqa: E402


@dataclasses.dataclass(frozen=True)
class SyntheticCases:
    """Cases of one shape: smooth random images, a few label blobs (a CaseSource)."""

    cases: dict[str, CaseData]

    def open(self, case_id: str) -> CaseData:
        return self.cases[case_id]


def synthetic_cases(shape, channels: int, classes: int, n: int = 4, seed: int = 0) -> SyntheticCases:
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    out = {}
    for i in range(n):
        label = np.zeros(shape, np.int16)
        for value in range(1, classes):
            centre = rng.uniform(-0.5, 0.5, (len(shape), 1, 1, 1))
            label[((grid - centre) ** 2).sum(0) < rng.uniform(0.05, 0.15)] = value
        image = rng.normal(size=(channels, *shape)).astype(np.float32) + label
        locations = {v: np.argwhere(label == v) for v in range(1, classes)}
        out[f"case_{i}"] = CaseData(image, label, locations)
    return SyntheticCases(out)


def time_per_batch(plans: Plans, name: str, devices: list[str], batches: int, warmup: int = 2) -> list[dict]:
    """Milliseconds per batch of the CPU loader's augmentation and of batch augmentation on each device."""
    c = plans.configurations[name]
    shape = tuple(max(int(round(s)), p) for s, p in zip(c.median_image_size, c.patch_size))
    source = synthetic_cases(shape if len(shape) == 3 else (1, *shape), len(plans.channels), plans.n_outputs)
    n_ds = len(c.network.strides) - 1 if c.network.deep_supervision else 1
    ids = list(source.cases)

    def recipe(where: str):
        with_device = dataclasses.replace(c, augmentation=dataclasses.replace(c.augmentation, device=where))
        return _recipes(plans, with_device, ids, None, n_ds, 0)[0], with_device

    loader_recipe, _ = recipe("cpu")
    transforms = build_transforms(
        loader_recipe.patch_size, loader_recipe.augmentation, ds_scales=loader_recipe.ds_scales
    )
    crop_recipe, on_device = recipe("gpu")
    scales = loader_recipe.ds_scales
    rows = []
    seconds = []
    for i in range(warmup + batches):
        start = time.perf_counter()
        make_batch(source, loader_recipe, i, transforms)
        seconds.append(time.perf_counter() - start)
    rows.append({"pipeline": "cpu loader", "crop+augment ms": _ms(seconds[warmup:])})
    spec, patch = on_device.augmentation, on_device.patch_size
    for device in devices:
        crop, augment = [], []
        for i in range(warmup + batches):
            start = time.perf_counter()
            batch = make_batch(source, crop_recipe, i)
            crop.append(time.perf_counter() - start)
            data = torch.from_numpy(batch["data"]).to(device)
            seg = torch.from_numpy(batch["target"][0]).to(device).long()
            _synchronize(device)
            start = time.perf_counter()
            augment_batch(data, seg, spec, patch, batch_generator(0, i), ds_scales=scales)
            _synchronize(device)
            augment.append(time.perf_counter() - start)
        rows.append(
            {"pipeline": f"batch on {device}", "crop ms": _ms(crop[warmup:]), "augment ms": _ms(augment[warmup:])}
        )
    for row in rows:
        row.update(
            patch=list(c.patch_size),
            sampling_patch=list(loader_recipe.sampling_patch_size),
            batch=c.batch_size,
            dummy_2d=c.augmentation.dummy_2d,
        )
    return rows


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _ms(seconds: list[float]) -> float:
    return round(1000 * float(np.median(seconds)), 1)


def plan_for(fingerprint: Path, gpu_memory: float | None = None, cpu_plan: bool = False) -> Plans:
    """The default planner's plan: for this GPU, else a GPU of ``gpu_memory`` GB (80), or for a CPU."""
    fp = load_corpus_entry(fingerprint).fingerprint
    if cpu_plan:
        return make_plans(fp, device="cpu", check_speed=False, cpu_flops=25e9)
    if gpu_memory is None and torch.cuda.is_available():
        return make_plans(fp, device="cuda")
    return make_plans(fp, gpu_memory_gb=gpu_memory or 80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprint", type=Path, default=ROOT / "fingerprints" / "Dataset004_Hippocampus.json")
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--gpu-memory", type=float, default=None)
    parser.add_argument("--cpu-plan", action="store_true")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plans = plan_for(args.fingerprint, args.gpu_memory, args.cpu_plan)
    rows = time_per_batch(plans, args.config, args.devices.split(","), args.batches)
    print(f"{plans.dataset_name} {args.config}, plan for {plans.device.name}, torch threads {args.threads}")
    print_table(rows, ["pipeline", "crop+augment ms", "crop ms", "augment ms", "patch", "sampling_patch", "batch"])
    if args.save:
        print("wrote", write_results("batch_augmentation", {"plan_device": plans.device.name, "rows": rows}))


if __name__ == "__main__":
    main()
