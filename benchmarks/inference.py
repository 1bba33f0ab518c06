"""Inference: wall time and peak RAM per case, autoseg vs nnU-Net v2, same network and weights, same cases, on CPU.

    flock /tmp/autoseg-bench.lock python benchmarks/inference.py [--cases 4] [--fov native|wide] [--repeats 2]
                                                                 [--networks NAME ...] [--quick]

For each network (``nnunet_3d_fullres``: nnU-Net's 3d_fullres plan of the synthetic CT dataset; ``autoseg_cpu``:
autoseg's default CPU plan, see benchmarks/train_step.py) autoseg trains one epoch of two iterations
(``autoseg train``), and the same weights are written into an nnU-Net model folder in nnU-Net's checkpoint format
(``_nnunet_models.py export``; a probe input checks that both networks compute the same function). Then both
command-line tools predict the same test cases as separate processes, interleaved (A, B, B, A, ...), each measured
by ``_measure.run_measured`` (wall time, peak RSS of the process tree):

- ``nnUNetv2_predict -device cpu -step_size 0.5`` with its default mirroring (8 flips) and with ``--disable_tta``
  (its default 3 preprocessing + 3 export processes; perform_everything_on_device is off on CPU);
- ``autoseg predict --device cpu --precision fp32`` with ``--mirror all`` (8 flips), ``--no-tta`` and, as an extra
  row, ``--mirror single`` (no flip + one flip per axis, 4 passes); and ``--mirror all --precision bf16``, what
  ``--precision auto`` (the default) chooses on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX).

Per-case time is the process wall time divided by the number of cases (process start-up included). ``--fov wide``
tiles each test image 2 x 2 in-plane (a wider field of view, more sliding-window tiles). Writes
benchmarks/results/inference[_wide].json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import NNUNET_PYTHON, print_table, run_measured, write_results  # noqa: E402
from train_step import DATASET, NETWORKS, WORK, _autoseg, _run, nnunet_arch, nnunet_env, prepare  # noqa: E402

MODES = {  # name -> (autoseg predict flags, nnUNetv2_predict flags); None: that tool has no such row
    "mirror_all": (["--mirror", "all", "--precision", "fp32"], []),
    "no_mirroring": (["--no-tta", "--precision", "fp32"], ["--disable_tta"]),
    "mirror_single": (["--mirror", "single", "--precision", "fp32"], None),
    "mirror_all_sequential": (None, ["-npp", "0", "-nps", "0"]),
    "mirror_all_bf16": (["--mirror", "all", "--precision", "bf16"], None),
}
# (autoseg mode, nnU-Net mode): the comparisons reported
PAIRS = [
    ("mirror_all", "mirror_all"),
    ("no_mirroring", "no_mirroring"),
    ("mirror_single", "mirror_all"),
    ("mirror_all", "mirror_all_sequential"),
    ("mirror_all_bf16", "mirror_all"),
    ("mirror_all_bf16", "mirror_all_sequential"),
]
# autoseg mode -> the nnU-Net mode its label maps are compared with
AGREEMENT = {"mirror_all": "mirror_all", "no_mirroring": "no_mirroring", "mirror_all_bf16": "mirror_all"}
NNUNET_CONFIG = {"nnunet_3d_fullres": "3d_fullres", "autoseg_cpu": "3d_cpu"}


def _run_folder(work: Path, name: str) -> Path:
    """An autoseg run folder whose 3d_fullres configuration is exactly the benchmark network, trained briefly."""
    from autoseg.planning.plans import load_plans

    run = work / f"infer_{name}"
    source = work / ("run_nnunet" if name == "nnunet_3d_fullres" else "run_cpu")
    if not (run / "plans.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(source, run)
        plans, b = load_plans(run), NETWORKS[name]
        c = dataclasses.replace(
            plans.configurations["3d_fullres"], network=b.spec, patch_size=b.patch, batch_size=b.batch
        )
        dataclasses.replace(plans, configurations={"3d_fullres": c}).save(run / "plans.json")
    if not (run / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt").is_file():
        _autoseg("preprocess", str(run), "-c", "3d_fullres")
        sets = ["training.epochs=1", "training.iterations_per_epoch=2", "training.val_iterations=1"]
        _autoseg("train", str(run), "-c", "3d_fullres", "-f", "0", "--device", "cpu", *[f"--set={s}" for s in sets])
    return run


def _export_nnunet(work: Path, name: str, run: Path) -> dict:
    """nnU-Net's model folder with the autoseg run's weights; checks both networks agree on a probe input."""
    import torch

    from autoseg.networks.builder import build_network
    from autoseg.planning.plans import load_plans
    from autoseg.training.checkpoint import load_checkpoint

    b, plans = NETWORKS[name], load_plans(run)
    checkpoint = run / "models" / "3d_fullres" / "fold_0" / "checkpoint_final.pt"
    probe_in, probe_out = work / "setups" / f"probe_{name}_in.npy", work / "setups" / f"probe_{name}_out.npy"
    probe_in.parent.mkdir(parents=True, exist_ok=True)
    probe = np.random.default_rng(1).standard_normal((1, b.in_channels, *b.patch), dtype=np.float32)
    np.save(probe_in, probe)
    config = NNUNET_CONFIG[name]
    setup = {
        "plans_file": str(work / "nnUNet_preprocessed" / DATASET / "nnUNetPlans.json"),
        "dataset_json": str(work / "nnUNet_preprocessed" / DATASET / "dataset.json"),
        "configuration": config,
        "arch": nnunet_arch(b),
        "patch_size": list(b.patch),
        "batch_size": b.batch,
        "batch_dice": b.batch_dice,
        "autoseg_checkpoint": str(checkpoint),
        "model_folder": str(work / "nnUNet_results" / DATASET / f"nnUNetTrainer__nnUNetPlans__{config}"),
        "mirror_axes": list(plans.configurations["3d_fullres"].augmentation.mirror_axes),
        "probe_in": str(probe_in),
        "probe_out": str(probe_out),
    }
    setup_file = work / "setups" / f"export_{name}.json"
    setup_file.write_text(json.dumps(setup, indent=1))
    _run([NNUNET_PYTHON, str(HERE / "_nnunet_models.py"), "export", str(setup_file)], env=nnunet_env(work))
    network = build_network(b.spec, b.in_channels, plans.n_outputs)
    network.load_state_dict(load_checkpoint(checkpoint)["network"])
    network.deep_supervision = False
    with torch.inference_mode():
        ours = network.eval()(torch.from_numpy(probe)).numpy()
    theirs = np.load(probe_out)
    return {
        "params": sum(p.numel() for p in network.parameters()),
        "probe_max_abs_diff": float(np.abs(ours - theirs).max()),
        "probe_logit_scale": float(np.abs(ours).max()),
        "mirror_axes": setup["mirror_axes"],
        "nnunet_configuration": config,
    }


def _test_inputs(work: Path, n: int, fov: str) -> Path:
    """``n`` test cases: the synthetic test images as they are, or tiled 2 x 2 in-plane (``wide``)."""
    from autoseg.data.io import read_image, write_image

    raw = work / "nnUNet_raw" / DATASET / "imagesTs"
    images = sorted(raw.glob("*_0000.nii.gz"))[:n]
    if len(images) < n:
        raise SystemExit(f"{raw}: only {len(images)} test images; delete {work} to make a dataset with {n}")
    out = work / f"test_{fov}_{n}"
    if not out.is_dir():
        out.mkdir(parents=True)
        for path in images:
            if fov == "native":
                shutil.copy(path, out / path.name)
                continue
            image, geometry = read_image(path)
            tiled = np.tile(image[0], (1, 2, 2))
            write_image(tiled, geometry.with_shape(tiled.shape), out / path.name)
    return out


def _commands(work: Path, name: str, run: Path, inputs: Path, mode: str) -> dict[str, tuple[list[str], dict]]:
    autoseg_flags, nnunet_flags = MODES[mode]
    cmds = {}
    if autoseg_flags is not None:
        cmds["autoseg"] = (
            [sys.executable, "-m", "autoseg.cli", "predict", "-m", str(run), "-i", str(inputs)]
            + ["-o", str(work / "pred" / f"{name}_{mode}_autoseg"), "--configs", "3d_fullres", "--folds", "0"]
            + ["--device", "cpu", *autoseg_flags],
            {},
        )
    if nnunet_flags is not None:
        tool = str(Path(NNUNET_PYTHON).parent / "nnUNetv2_predict")
        cmds["nnU-Net v2"] = (
            [tool, "-i", str(inputs), "-o", str(work / "pred" / f"{name}_{mode}_nnunet"), "-d", DATASET[7:10]]
            + ["-c", NNUNET_CONFIG[name], "-f", "0", "-device", "cpu", "-step_size", "0.5", *nnunet_flags],
            nnunet_env(work),
        )
    return cmds


def _agreement(work: Path, name: str, mode: str, nnunet_mode: str, inputs: Path) -> dict:
    """Dice per foreground label between the two tools' label files (same weights: should be close to 1)."""
    from autoseg.data.io import read_label

    dices, equal = [], []
    for path in sorted(inputs.glob("*_0000.nii.gz")):
        case = path.name[: -len("_0000.nii.gz")]
        a, _ = read_label(work / "pred" / f"{name}_{mode}_autoseg" / f"{case}.nii.gz")
        b, _ = read_label(work / "pred" / f"{name}_{nnunet_mode}_nnunet" / f"{case}.nii.gz")
        equal.append(float((a == b).mean()))
        for label in range(1, 4):
            total = (a == label).sum() + (b == label).sum()
            if total:
                dices.append(2 * float(((a == label) & (b == label)).sum()) / float(total))
    return {
        "voxels_equal": round(float(np.mean(equal)), 5),
        "mean_dice": round(float(np.mean(dices)), 4) if dices else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--fov", default="native", choices=["native", "wide"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--networks", nargs="+", default=list(NNUNET_CONFIG), choices=list(NNUNET_CONFIG))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--quick", action="store_true", help="2 cases, 1 repeat")
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args()
    if args.quick:
        args.cases, args.repeats = 2, 1
    checks = prepare(args.work, nnunet=True)
    inputs = _test_inputs(args.work, args.cases, args.fov)
    networks, runs = {}, []
    for name in args.networks:
        run = _run_folder(args.work, name)
        networks[name] = {**_export_nnunet(args.work, name, run), "source": NETWORKS[name].source}
        networks[name]["patch"], networks[name]["batch"] = list(NETWORKS[name].patch), NETWORKS[name].batch
        print(f"{name}: {json.dumps(networks[name])}")
        for rep in range(args.repeats):
            for mode in args.modes:
                cmds = list(_commands(args.work, name, run, inputs, mode).items())
                for tool, (cmd, env) in cmds if rep % 2 == 0 else cmds[::-1]:
                    shutil.rmtree(cmd[cmd.index("-o") + 1], ignore_errors=True)
                    m = run_measured(cmd, env=env)
                    runs.append({"network": name, "mode": mode, "tool": tool, "repeat": rep, **m})
                    print(f"  {name} {mode} {tool} rep {rep}: {m['wall_s']} s, {m['peak_rss_mib']} MiB", flush=True)
        for mode, theirs in AGREEMENT.items():
            if mode in args.modes and theirs in args.modes:
                networks[name][f"agreement_{mode}"] = _agreement(args.work, name, mode, theirs, inputs)
        _report(*_summarise(runs, args.cases), networks, runs, checks, args)  # after each network


def _summarise(runs: list[dict], n_cases: int) -> tuple[list[dict], list[dict]]:
    """Median rows per (network, mode, tool) and the autoseg-vs-nnU-Net comparisons of :data:`PAIRS`."""
    rows = []
    keys = sorted({(r["network"], r["mode"], r["tool"]) for r in runs}, key=lambda k: (k[0], list(MODES).index(k[1])))
    for network, mode, tool in keys:
        mine = [r for r in runs if (r["network"], r["mode"], r["tool"]) == (network, mode, tool)]
        wall = statistics.median(r["wall_s"] for r in mine)
        rows.append(
            {
                "network": network,
                "mode": mode,
                "tool": tool,
                "wall_s": round(wall, 2),
                "per_case_s": round(wall / n_cases, 2),
                "peak_rss_mib": round(statistics.median(r["peak_rss_mib"] for r in mine), 1),
                "runs": len(mine),
            }
        )
    index = {(r["network"], r["mode"], r["tool"]): r for r in rows}
    comparisons = []
    for network in dict.fromkeys(r["network"] for r in rows):
        for ours, theirs in PAIRS:
            a, n = index.get((network, ours, "autoseg")), index.get((network, theirs, "nnU-Net v2"))
            if a and n:
                comparisons.append(
                    {
                        "network": network,
                        "autoseg": ours,
                        "nnU-Net v2": theirs,
                        "speedup": round(n["wall_s"] / a["wall_s"], 2),
                        "ram_ratio": round(n["peak_rss_mib"] / a["peak_rss_mib"], 2),
                    }
                )
    return rows, comparisons


def _report(rows: list[dict], comparisons: list[dict], networks: dict, runs: list[dict], checks: dict, args) -> None:
    what = f"{args.cases} synthetic CT cases ({args.fov} field of view)"
    print(f"\nprediction of {what} on CPU, median of {args.repeats} run(s) per row")
    print_table(rows, ["network", "mode", "tool", "wall_s", "per_case_s", "peak_rss_mib", "runs"])
    print("\nautoseg vs nnU-Net v2 (speedup = nnU-Net wall / autoseg wall; ram_ratio = nnU-Net peak / autoseg peak)")
    print_table(comparisons, ["network", "autoseg", "nnU-Net v2", "speedup", "ram_ratio"])
    name = "inference" if args.fov == "native" else f"inference_{args.fov}"
    payload = {
        "cases": args.cases,
        "fov": args.fov,
        "repeats": args.repeats,
        "networks": networks,
        "plan_checks": checks,
        "rows": rows,
        "comparisons": comparisons,
        "runs": [{k: v for k, v in r.items() if k != "output_tail"} for r in runs],
        "note": "one process per tool, mode and repeat; per_case_s = process wall / cases (start-up included); "
        "peak RSS of the whole process tree (nnU-Net's preprocessing/export workers included)",
    }
    print(f"wrote {write_results(name, payload)}")


if __name__ == "__main__":
    main()
