"""Bounded-memory prediction: peak RAM and time of labels-only prediction with a 117-class network (random
weights) on CT-like volumes of 512 x 512 x Z voxels (0.8 x 0.8 x 1.5 mm), autoseg vs nnU-Net v2, same network,
same weights, same volumes, CPU, one run at a time:

    flock /tmp/autoseg-bench.lock python benchmarks/bounded_memory.py [--slices 40 150 600] [--nnunet-slices 20 40]

The network is a plain U-Net (features 8-16-32-64, patch 64 x 128 x 128) with a 117-channel head, planned at
1.5 mm isotropic as TotalSegmentator's model is: the 512 x 512 in-plane grid is predicted at 273 x 273 and each
class's probabilities are resampled back to 512 x 512, where nnU-Net holds every class at full resolution in
float32 (117 x 512 x 512 x 600 x 4 bytes = 74 GB, twice: logits and probabilities). Both tools come from
``train_step.prepare`` (the synthetic CT dataset, autoseg's ``--preset nnunet`` plan and nnU-Net's plan; both are
then set to this network and spacing), autoseg's weights are written into nnU-Net's model folder
(``_nnunet_models.py export``, checked on a probe input), and both predict without mirroring in fp32:
``autoseg predict --mirror none --precision fp32`` and ``nnUNetv2_predict --disable_tta -npp 1 -nps 1``.
nnU-Net runs under ``ulimit -v`` (``--nnunet-limit-gb``, default 22 of the machine's 24 GB) so that a volume it
cannot hold fails with MemoryError instead of swapping the machine; a failed run is reported as such.

Peak RSS is the summed RSS of the process tree (``_measure.run_measured``). Writes
benchmarks/results/bounded_memory.json (every run kept) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import NNUNET_PYTHON, add_run, machine, print_table, run_measured  # noqa: E402
from train_step import DATASET, K3, WORK, Bench, _plain, _run, nnunet_arch, nnunet_env, prepare  # noqa: E402

CLASSES = 117
SPACING = (1.5, 1.5, 1.5)  # the network's (z, y, x) spacing
IMAGE_SPACING = (1.5, 0.8, 0.8)
BENCH = Bench(
    _plain((8, 16, 32, 64), [K3] * 4, [(1, 1, 1)] + [(2, 2, 2)] * 3),
    (64, 128, 128),
    2,
    "plain U-Net 8-16-32-64 with a 117-class head, random weights",
    n_outputs=CLASSES,
)
CONFIG = "3d_bench117"


def _labels() -> dict[str, int]:
    return {"background": 0, **{f"class_{i:03d}": i for i in range(1, CLASSES)}}


def _autoseg_run(work: Path) -> Path:
    """autoseg run folder: the nnU-Net preset plan with the benchmark network, 117 labels and random weights."""
    import torch

    from autoseg.networks.builder import build_network
    from autoseg.planning.plans import load_plans
    from autoseg.serialization import to_jsonable

    run = work / "bounded_run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "models" / "3d_fullres" / "fold_0").mkdir(parents=True)
    plans = load_plans(work / "run_nnunet")
    c = dataclasses.replace(
        plans.configurations["3d_fullres"], network=BENCH.spec, patch_size=BENCH.patch, spacing=SPACING
    )
    plans = dataclasses.replace(plans, labels=_labels(), configurations={"3d_fullres": c})
    plans.save(run / "plans.json")
    torch.manual_seed(0)
    network = build_network(c.network, 1, CLASSES)
    state = {"network": network.state_dict(), "configuration": json.dumps(to_jsonable(c))}
    torch.save(state, run / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt")
    return run


def _nnunet_model(work: Path, run: Path) -> dict:
    """nnU-Net's model folder with the same weights; returns the probe check."""
    import torch

    from autoseg.networks.builder import build_network
    from autoseg.planning.plans import load_plans
    from autoseg.training.checkpoint import load_checkpoint

    source = work / "nnUNet_preprocessed" / DATASET
    plans = json.loads((source / "nnUNetPlans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = list(SPACING)
    dataset = json.loads((source / "dataset.json").read_text())
    dataset["labels"] = _labels()
    setups = work / "setups"
    setups.mkdir(parents=True, exist_ok=True)
    (setups / "bounded_plans.json").write_text(json.dumps(plans, indent=1))
    (setups / "bounded_dataset.json").write_text(json.dumps(dataset, indent=1))
    probe = np.random.default_rng(1).standard_normal((1, 1, *BENCH.patch), dtype=np.float32)
    np.save(setups / "bounded_probe_in.npy", probe)
    checkpoint = run / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt"
    setup = {
        "plans_file": str(setups / "bounded_plans.json"),
        "dataset_json": str(setups / "bounded_dataset.json"),
        "configuration": CONFIG,
        "arch": nnunet_arch(BENCH),
        "patch_size": list(BENCH.patch),
        "batch_size": BENCH.batch,
        "batch_dice": False,
        "autoseg_checkpoint": str(checkpoint),
        "model_folder": str(work / "nnUNet_results" / DATASET / f"nnUNetTrainer__nnUNetPlans__{CONFIG}"),
        "mirror_axes": [0, 1, 2],
        "probe_in": str(setups / "bounded_probe_in.npy"),
        "probe_out": str(setups / "bounded_probe_out.npy"),
    }
    (setups / "bounded_export.json").write_text(json.dumps(setup, indent=1))
    _run(
        [NNUNET_PYTHON, str(HERE / "_nnunet_models.py"), "export", str(setups / "bounded_export.json")],
        nnunet_env(work),
    )
    network = build_network(BENCH.spec, 1, CLASSES)
    network.load_state_dict(load_checkpoint(checkpoint)["network"])
    network.deep_supervision = False
    with torch.inference_mode():
        ours = network.eval()(torch.from_numpy(probe)).numpy()
    theirs = np.load(setup["probe_out"])
    plans_autoseg = load_plans(run)
    return {
        "params": sum(p.numel() for p in network.parameters()),
        "probe_max_abs_diff": float(np.abs(ours - theirs).max()),
        "probe_logit_scale": float(np.abs(ours).max()),
        "n_outputs": plans_autoseg.n_outputs,
    }


def _volume(work: Path, slices: int) -> Path:
    """A CT-like 512 x 512 x ``slices`` image: air, a body ellipse of soft tissue with noise, denser blobs."""
    from autoseg.data.geometry import Geometry
    from autoseg.data.io import write_image

    folder = work / f"bounded_input_{slices}"
    if (folder / "ct_000_0000.nii.gz").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(slices)
    y, x = np.mgrid[:512, :512]
    body = ((y - 256) / 200.0) ** 2 + ((x - 256) / 240.0) ** 2 < 1
    image = np.full((slices, 512, 512), -1000, np.int16)
    for z in range(slices):
        plane = np.where(body, 40, -1000) + rng.normal(0, 20, (512, 512))
        cy, cx = 256 + 60 * np.sin(z / 17), 256 + 80 * np.cos(z / 23)
        plane[((y - cy) / 40) ** 2 + ((x - cx) / 55) ** 2 < 1] = 300
        image[z] = plane.astype(np.int16)
    geometry = Geometry(IMAGE_SPACING, (slices, 512, 512), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    write_image(image, geometry, folder / "ct_000_0000.nii.gz")
    return folder


def _measure(cmd: list[str], env: dict | None = None) -> dict:
    try:
        return {"ok": True, **run_measured(cmd, env=env)}
    except RuntimeError as exc:
        tail = str(exc)[-600:]
        return {
            "ok": False,
            "error": "MemoryError" if "MemoryError" in tail or "alloc" in tail else "failed",
            "output_tail": tail,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[40, 150, 600], help="autoseg's volumes")
    parser.add_argument("--nnunet-slices", type=int, nargs="+", default=[20, 40], help="nnU-Net's volumes")
    parser.add_argument("--nnunet-limit-gb", type=float, default=22.0, help="ulimit -v for nnU-Net")
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    checks = prepare(args.work)
    run = _autoseg_run(args.work)
    network = _nnunet_model(args.work, run)
    rows, agreement = [], {}
    for slices in sorted(set(args.slices) | set(args.nnunet_slices)):
        inputs = _volume(args.work, slices)
        out = args.work / "bounded_pred"
        sides = {}
        if slices in args.slices:
            cmd = [sys.executable, "-m", "autoseg.cli", "predict", "-m", str(run), "-i", str(inputs)]
            cmd += ["-o", str(out / f"autoseg_{slices}"), "--device", "cpu", "--mirror", "none", "--precision", "fp32"]
            sides["autoseg"] = _measure(cmd)
        if slices in args.nnunet_slices:
            tool = str(Path(NNUNET_PYTHON).parent / "nnUNetv2_predict")
            inner = [tool, "-i", str(inputs), "-o", str(out / f"nnunet_{slices}"), "-d", DATASET[7:10], "-c", CONFIG]
            inner += ["-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
            limit = int(args.nnunet_limit_gb * 2**20)
            cmd = ["bash", "-c", f"ulimit -v {limit} && exec " + " ".join(inner)]
            sides["nnU-Net v2"] = _measure(cmd, nnunet_env(args.work))
        for tool, result in sides.items():
            rows.append(
                {
                    "tool": tool,
                    "volume": f"512x512x{slices}",
                    "ok": result["ok"],
                    "wall_s": result.get("wall_s"),
                    "peak_rss_gib": round(result["peak_rss_mib"] / 1024, 2) if result["ok"] else None,
                    "error": result.get("error"),
                }
            )
        if all(r["ok"] for r in sides.values()) and len(sides) == 2:
            from autoseg.data.io import read_label

            a, _ = read_label(out / f"autoseg_{slices}" / "ct_000.nii.gz")
            b, _ = read_label(out / f"nnunet_{slices}" / "ct_000.nii.gz")
            agreement[str(slices)] = round(float((a == b).mean()), 6)
    print_table(rows, ["tool", "volume", "ok", "wall_s", "peak_rss_gib", "error"])
    print("labels equal (share of voxels):", agreement)
    entry = {
        "machine": machine(),
        "conditions": {
            "network": BENCH.source,
            "patch": list(BENCH.patch),
            "classes": CLASSES,
            "network_spacing_mm": list(SPACING),
            "image_spacing_mm": list(IMAGE_SPACING),
            "mirroring": "none",
            "precision": "fp32",
            "nnunet_flags": "--disable_tta -npp 1 -nps 1",
            "nnunet_ulimit_v_gb": args.nnunet_limit_gb,
        },
        "network_check": network,
        "plan_checks": checks,
        "rows": rows,
        "labels_equal": agreement,
    }
    add_run("bounded_memory", {"benchmark": "bounded_memory"}, "cpu", started, entry)


if __name__ == "__main__":
    main()
