"""The benchmark table of README.md, generated from ``benchmarks/results/*.json`` so the two cannot drift apart.

    python benchmarks/table.py            # print the Markdown table
    python benchmarks/table.py --write    # replace the text between the markers in README.md

Every row names its results file and its conditions. A run that the audit in ``benchmarks/README.md`` found
stale, or in breach of the protocol, is marked :data:`STALE` with the reason, a superseded run :data:`OLD`; a run
newer than the audited one is marked :data:`PENDING` until :data:`AUDIT` is updated; a JSON file without a row
builder still gets a row.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
STALE = "stale: rerun pending (see benchmarks/README.md)"
OLD = "superseded, kept as history (see benchmarks/README.md)"
PENDING = "audit pending (see benchmarks/README.md)"
TOOLS = ("autoseg", "nnunet")  # real.py's tool keys
COLUMNS = ("benchmark", "autoseg", "nnU-Net v2", "comparison", "conditions", "results file")

#: The audit in benchmarks/README.md: file -> (date of the audited run, None if it passed or STALE/OLD, why).
AUDIT: dict[str, tuple[str, str | None, str]] = {
    "fingerprint.json": ("2026-11-26 14:16", None, ""),
    "preprocess.json": ("2026-11-27 03:11", None, ""),
    "dataloader.json": ("2026-11-26 18:01", STALE, "measured before the loader's patch-sampling changes"),
    "train_step_cpu.json": ("2026-11-27 04:47", STALE, "the two tools ran different torch builds"),
    "inference.json": ("2026-11-27 03:02", STALE, "weights trained 2 iterations; autoseg's CPU default not measured"),
    "train_cpu_plan.json": ("2026-11-27 03:57", STALE, "this fold 0 was used to choose the patch-sampling rule"),
    "precision.json": ("2026-11-27 03:09", STALE, "model since retrained; 2 of its 6 cases are end-to-end test cases"),
    "end_to_end.json": ("2026-11-27 04:21", STALE, "test cases re-scored after planner changes; no equal-settings row"),
    "end_to_end_cv10.json": ("2026-11-26 18:41", OLD, "planner before the small-budget rule; same test cases"),
    "memory_model_cpu.json": ("2026-11-26 14:35", STALE, "only the plans the model was written with (in-sample)"),
    "memory_model_cuda.json": ("2026-11-26 14:31", STALE, "estimates recalibrated on these readings (in-sample)"),
    "search.json": ("2026-11-26 17:44", STALE, "before later trainer fixes; rule CV reused from an earlier run"),
    "search_short.json": ("2026-11-26 16:39", OLD, "before the step-pricing and interpolation fixes"),
    "search_flop_priced.json": ("2026-11-26 16:56", OLD, "steps priced by FLOPs; lost on the folds not selected on"),
    "fold_compare_class_balance_isbi_em.json": ("2026-12-07T09:49:28", None, ""),
    "real_isbi_em.json": ("2026-12-07T09:49:13", None, ""),
    "real_hippocampus.json": ("2026-12-07T12:52:09", None, ""),
    "budget_split_hippocampus.json": ("2026-12-07T11:44:28", None, ""),
    "real_dsb2018.json": ("2026-12-07T15:31:19", None, ""),
    "bounded_memory.json": ("2026-12-07T16:23:48", None, ""),
    "onnx_cpu.json": ("2026-12-07T18:34:39", None, ""),
    # analyze outputs carry no date: audited on 2026-12-07
    "calibration_hippocampus.json": ("undated", None, ""),
    "robustness_hippocampus.json": ("undated", None, ""),
    "subgroups_hippocampus.json": ("undated", None, ""),
    "calibration_dsb2018.json": ("undated", None, ""),
    "subgroups_dsb2018.json": ("undated", None, ""),
    "robustness_dsb2018.json": ("undated", None, ""),
    "architectures.json": ("2026-12-07T19:53:50", None, ""),
    "cascade.json": ("2026-12-07T22:28:45", None, ""),
    "transfer.json": ("2026-12-08T00:19:33", None, ""),
}
Data = dict[str, Any]
Cells = tuple[str, str, str, str, str]  # benchmark, autoseg, nnU-Net v2, comparison, conditions


def status(file: str, data: Data) -> str:
    """'' for an audited run that passed; its :data:`STALE` or :data:`OLD` mark and why; else :data:`PENDING`."""
    date, mark, reason = AUDIT.get(file, ("", None, ""))
    if date != file_date(data):
        return PENDING
    return f"{mark}: {reason}" if mark else ""


def file_date(data: Data) -> str:
    """The file's ``date``; for real.py's files (one date per run) the latest run's start."""
    if "date" in data:
        return data["date"]
    return max((started for group in data.get("runs", {}).values() for started in group), default="undated")


def machine(data: Data) -> str:
    """'; CPU, cores, date' of a file that records one machine for all its rows, else ''."""
    m = data.get("machine")
    return f"; {m.get('cpu') or '?'}, {m.get('cores', '?')} cores, {data.get('date', 'undated')}" if m else ""


def _tm(r: Data) -> str:
    return f"{r['wall_s']:.3g} s, {r['peak_rss_mib']:.0f} MiB"


def _faster(theirs: float, ours: float) -> str:
    x = max(theirs / ours, ours / theirs)
    return f"{x:.{2 if x < 1.1 else 1}f}x " + ("faster" if theirs >= ours else "slower")


def _not_current(d: Data, network: str) -> str:
    """The results file's own check: is its ``autoseg_cpu`` network still what the planner makes for a CPU?"""
    same = d.get("plan_checks", {}).get("autoseg_cpu_plan_here_equals_autoseg_cpu", True)
    return " (not the planner's current CPU network)" if network == "autoseg_cpu" and not same else ""


def fingerprint(d: Data) -> Iterator[Cells]:
    a, n, r = d["rows"]
    g = d["agreement"]
    same = g["median_spacing_identical"] and g["shapes_after_crop_identical"] and g["percentiles_within_1pct"]
    agree = "median spacing, shapes, percentiles identical" if same else "results differ"
    comp = f"{r['wall_s']}x faster, {r['peak_rss_mib']}x less RAM; {agree}"
    what, cond = f"fingerprint, {d['cases']} synthetic CT cases (seed 0)", f"{d['workers']} workers each; one run"
    yield what, _tm(a), _tm(n), comp, cond


def preprocess(d: Data) -> Iterator[Cells]:
    for r in d["runs"].values():
        (a, n, q), ds, s = r["rows"], r["dataset"], r["agreement"]["summary"]
        what = f"preprocessing, same 3d_fullres plan, {ds['cases']} {ds['kind']} cases x{ds['scale']:g}"
        agree = f"r >= {s['r_min']}, labels >= {s['label_agreement_min']:.4%} equal"
        comp = f"{q['wall_s']}x faster, {q['peak_rss_mib']}x less RAM; {agree}"
        cond = f"seed {ds['seed']}; {r['workers']} workers each; median of {r['repeats']} alternating runs"
        yield what, _tm(a), _tm(n), comp, cond


def dataloader(d: Data) -> Iterator[Cells]:
    for r in d["runs"].values():
        (a, n, q), ds, p = r["rows"], r["dataset"], r["plan"]
        what = f"training data loader, {ds['kind']} x{ds['scale']:g} (seed {ds['seed']})"
        cells = [f"{x['batches_per_s']:.0f} batches/s, {x['peak_rss_mib']:.0f} MiB" for x in (a, n)]
        comp = f"{q['batches_per_s']}x the throughput, {n['peak_rss_mib'] / a['peak_rss_mib']:.1f}x less RAM"
        cond = f"patch {p['patch_size_autoseg']} batch {p['batch_size_autoseg']}, {r['workers']} workers each"
        yield what, *cells, comp, f"{cond}; {r['batches']} batches after {r['warmup']}, median of {r['repeats']}"


def train_step(d: Data) -> Iterator[Cells]:
    for res in d["results"]:
        a, n = (next(r for r in res["rows"] if r["tool"] == t) for t in ("autoseg", "nnU-Net v2"))
        net = d["networks"][res["network"]]
        what = f"training step, {res['network']}{_not_current(d, res['network'])}, {net['patch']} batch {net['batch']}"
        cells = [f"{r['median_s']} s/step, {r['peak_mem_mib']:.0f} MiB" for r in (a, n)]
        comp = f"{_faster(n['median_s'], a['median_s'])}, {res['memory_ratio_nnunet_over_autoseg']}x less memory"
        cond = f"{d['device']} {a['amp']}, {a['params'] / 1e6:.2g} M parameters; median of {d['steps']} steps"
        yield what, *cells, comp, f"{cond} (interleaved) after {d['warmup']}; torch {a['torch']} vs {n['torch']}"


FLIPS = {  # inference.json modes
    "no_mirroring": "no flips",
    "mirror_single": "4 passes",
    "mirror_all": "8 flips",
    "mirror_all_bf16": "8 flips bf16",
    "mirror_all_sequential": "8 flips -npp 0 -nps 0",
}


def inference(d: Data) -> Iterator[Cells]:
    for name, net in d["networks"].items():
        cells = []
        for tool in ("autoseg", "nnU-Net v2"):
            rs = [r for r in d["rows"] if r["network"] == name and r["tool"] == tool]
            times = "; ".join(f"{FLIPS.get(r['mode'], r['mode'])} {r['per_case_s']} s" for r in rs)
            cells.append(f"{times}; peak {max(r['peak_rss_mib'] for r in rs):.0f} MiB")
        pairs = [c for c in d["comparisons"] if c["network"] == name]
        comp = "; ".join(f"{FLIPS[c['autoseg']]} vs {FLIPS[c['nnU-Net v2']]}: {c['speedup']}x faster" for c in pairs)
        what = f"sliding-window inference per case, {name}{_not_current(d, name)}"
        cond = f"{net['params'] / 1e6:.2g} M parameters; {d['cases']} cases ({d['fov']}), median of {d['repeats']}"
        yield what, *cells, comp, f"{cond}; fp32 unless bf16; per case = process wall / cases"


def train_cpu_plan(d: Data) -> Iterator[Cells]:
    s, p = d["setup"], d["plan"]
    its = statistics.median(e["s_per_it"] for e in d["epochs"])
    dice = ", ".join(f"{k} {v}" for k, v in d["validation_dice"].items())
    what = f"training, default CPU plan, synthetic {s['kind']} fold 0 ({s['cases']} cases, seed {s['seed']})"
    auto = f"{d['train_minutes']} min ({its:.2f} s/it); validation Dice {dice} ({d['validation_cases']} cases)"
    cond = f"patch {p['patch_size']} batch {p['batch_size']}, {p['epochs']} x {p['iterations_per_epoch']} it"
    yield what, auto, "-", "-", f"{cond}, loss {p['loss']}"


def precision(d: Data) -> Iterator[Cells]:
    by = {(r["mirror"], r["precision"]): r for r in d["rows"]}
    parts, comp = [], []
    for mirror in dict.fromkeys(m for m, _ in by):
        f, b = by[(mirror, "fp32")], by[(mirror, "bf16")]
        parts.append(
            f"{mirror}: fp32 {f['seconds']} s, Dice {f['mean_dice']}; bf16 {b['seconds']} s, Dice {b['mean_dice']}"
        )
        equal = d["fp32_vs_bf16_labels"][mirror]["voxels_equal_mean"]
        comp.append(f"{mirror}: bf16 {_faster(f['seconds'], b['seconds'])}, {equal:.2%} voxels equal")
    cond = f"{d['rows'][0]['cases']} cases; CPU has native bf16: {d['cpu_native_bf16']}"
    yield "prediction, fp32 vs bf16, trained default CPU model", " / ".join(parts), "-", "; ".join(comp), cond


def end_to_end(d: Data) -> Iterator[Cells]:
    s, (a, n), pn = d["settings"], d["rows"], d["plans"]["nnunet"]
    classes = list(d["scores"]["autoseg"]["dice"])

    def cell(r: Data) -> str:
        dice = ", ".join(f"{k} {r[k]}" for k in classes)
        gib = r["predict_rss_mib"] / 1024
        return f"Dice {r['mean_dice']} ({dice}); {r['iterations']} it; predict {r['predict_s']} s, {gib:.1f} GiB"

    configs = d["plans"]["autoseg"]["configurations"].items()
    nets = ", ".join(f"{k} {c['patch_size']} b{c['batch_size']} {c['parameters'] / 1e6:.1f} M" for k, c in configs)
    what = f"end to end, {s['cases']} synthetic {s['kind']} cases (seed {s['seed']}), {s['minutes']:g} min training"
    comp = f"{a['mean_dice'] - n['mean_dice']:+.3f} Dice; prediction {_faster(n['predict_s'], a['predict_s'])}"
    predict = s.get("prediction", "prediction flips and precision not recorded")
    cond = f"{s['test_cases']} held-out cases; one core, {s['threads_per_tool']} thread each; one run per tool"
    nn = f"nnU-Net 3d_fullres {pn['patch_size']} b{pn['batch_size']} {pn['parameters'] / 1e6:.1f} M"
    yield what, cell(a), cell(n), comp, f"{cond}; autoseg {nets}; {nn}; {predict}"


def memory_model(d: Data) -> Iterator[Cells]:
    rows, env = d["rows"], d.get("environment", {})
    auto = f"within {max(abs(r['ratio'] - 1) for r in rows):.1%} of the measured peak on {len(rows)} plans"
    if all("estimate_mib_at_run" in r for r in rows):
        at_run = max(abs(r["estimate_mib_at_run"] / r["measured_mib"] - 1) for r in rows)
        auto += f" (before recalibration on them: {at_run:.1%})"
    precisions = "/".join(sorted({r["precision"] for r in rows}))
    cond = f"{env.get('gpu', d['device'])}, torch {env.get('torch')}, {precisions}"
    yield f"memory model vs measured peak training memory, {d['device']}", auto, "(no byte model)", "-", cond


def search(d: Data) -> Iterator[Cells]:
    s, r, q, se = d["setup"], d["cv_rule"], d["cv_search"], d["search"]
    rf, qf = r["fold_mean_dice"], q["fold_mean_dice"]
    classes = ", ".join(f"{k} {r['dice_per_class'][k]} -> {v}" for k, v in q["dice_per_class"].items())
    held = f"{statistics.fmean(rf[1:]):.4f} -> {statistics.fmean(qf[1:]):.4f}"
    auto = f"CV Dice {r['mean_foreground_dice']} -> {q['mean_foreground_dice']} ({classes})"
    auto += f"; folds 1-{len(rf) - 1} only (not selected on): {held}"
    wall = se["wall_seconds"]
    share, total = (q["train_seconds"] / r["train_seconds"], (q["train_seconds"] + wall) / r["train_seconds"])
    comp = f"training {share:.0%} of the rule plan's; {total:.0%} with the search's own {wall:.0f} s"
    rule = f"rule plan at --cpu-gflops {s['cpu_gflops']:g} ({s['epochs']} x {s['iterations']} it)"
    trials = f"{s['trials']} trials on fold 0 ({se['complete']} complete, {se['pruned']} pruned)"
    what = f"search vs rule plan, synthetic {s['dataset'].split()[-1]} (seed {s['seed']}), {len(rf)}-fold CV"
    yield what, auto, "(no search)", comp, f"{rule}; {trials}; mirroring {s['mirroring']}"


def _ci(s: Data) -> str:
    """``{mean, low, high}`` (a bootstrap interval of real.py) as ``mean [low, high]``."""
    return "undefined" if s["mean"] is None else f"{s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}]"


def real(d: Data) -> Iterator[Cells]:
    """``real_<dataset>.json`` of benchmarks/real.py: one row per run (budget x start time)."""
    for group, runs in d["runs"].items():
        for started, e in runs.items():
            dice, it, st = e["metrics"]["dice"], e["iterations"], e["settings"]
            cells = [f"Dice {'; '.join(f'{c} {_ci(v[t])}' for c, v in dice.items())}; {it[t]} it" for t in TOOLS]
            split, m = e["split"], e["machine"]
            what = f"real data, {d['dataset']}, {e['budget_minutes']:g} min training each ({group})"
            comp = f"Dice autoseg - nnU-Net, foreground mean, paired: {_ci(dice['mean']['autoseg_minus_nnunet'])}"
            equal = dice["mean"].get("autoseg_nnunet_settings_minus_nnunet")
            if equal is not None:  # the same autoseg model predicting with nnU-Net's flips and precision
                comp += f"; with nnU-Net's prediction settings (all flips, fp32): {_ci(equal)}"
            n_train, n_test = len(split["train_cases"]), len(split["test_cases"])
            data = f"{n_train} training / {n_test} test cases (split seed {split['seed']})"
            flips = "; ".join(
                f"{t}: {st[t]['prediction']['mirroring']}, {st[t]['prediction']['precision']}" for t in TOOLS
            )
            code = e["versions"]["autoseg_commit"]
            code = code[:7] + ("+uncommitted" if "+" in code else "")
            where = f"autoseg {code}; one core, {m['threads_per_tool']} thread each; {m['cpu']}, {m['cores']} cores"
            yield what, *cells, comp, f"{data}; prediction {flips}; 95% bootstrap over test cases; {where}, {started}"


def fold_compare(d: Data) -> Iterator[Cells]:
    """``fold_compare_<name>.json`` of benchmarks/fold_compare.py: plan variants on one cross-validation fold of the
    training part (never the test split); one row per variant, the first is the reference."""
    for started, e in d["runs"]["comparisons"].items():
        first = next(iter(e["statistics"]))
        for label, stats in e["statistics"].items():
            v = e["variants"][label]
            c = v["configuration"]
            setting = f"{c['loss']['name']}, oversampling {c['foreground_oversampling']}"
            cell = f"Dice {_ci(stats['mean'])}; {v['iterations']} it ({setting})"
            comp = "reference" if label == first else f"minus {first}: {_ci(stats['mean']['minus_' + first])}"
            n = len(e["validation_cases"])
            cond = f"{e['config']} fold {e['fold']} of the training part, {n} validation cases; {e['what']}; {started}"
            yield f"plan variant '{label}' (cross-validation fold)", cell, "-", comp, cond


def budget_split(d: Data) -> Iterator[Cells]:
    """``budget_split_<dataset>.json`` of benchmarks/budget_split.py: one model vs a 5-fold ensemble at one budget,
    scored on a development split of the training part; one row per run."""
    for runs in d["runs"].values():
        for started, e in runs.items():
            dice, it = e["metrics"]["dice"], e["iterations"]
            cells = {
                v: f"Dice {'; '.join(f'{c} {_ci(x[v])}' for c, x in dice.items())}; {it[v]} it"
                for v in ("one_model", "cross_validation")
            }
            comp = f"one model - 5-fold ensemble, mean, paired: {_ci(dice['mean']['one_model_minus_cross_validation'])}"
            code = e["versions"]["autoseg_commit"]
            code = code[:7] + ("+uncommitted" if "+" in code else "")
            cond = (
                f"{len(e['split']['dev_cases'])} development cases of the training part (seed {e['split']['seed']}; "
                f"the test split untouched); autoseg {code}, one core each, side by side; {started}"
            )
            what = f"budget split, {d['dataset']}, {e['budget_minutes']:g} min: one model | 5-fold ensemble"
            yield what, cells["one_model"], cells["cross_validation"], comp, cond


def bounded_memory(d: Data) -> Iterator[Cells]:
    """``bounded_memory.json`` of benchmarks/bounded_memory.py: labels-only prediction with a 117-class network;
    one row per run and volume."""
    for started, e in d["runs"]["cpu"].items():
        c = e["conditions"]
        by_volume: dict[str, dict[str, Data]] = {}
        for r in e["rows"]:
            by_volume.setdefault(r["volume"], {})[r["tool"]] = r

        def cell(r: Data | None, limit: float = c["nnunet_ulimit_v_gb"]) -> str:
            if r is None:
                return "not run at this size"
            if not r["ok"]:
                return f"failed ({r['error']}) under ulimit -v {limit:g} GB"
            return f"peak {r['peak_rss_gib']:.2f} GiB, {r['wall_s']:.0f} s"

        for volume, tools in by_volume.items():
            ours, theirs = tools.get("autoseg"), tools.get("nnU-Net v2")
            comp = "-"
            if ours and theirs and ours["ok"] and theirs["ok"]:
                comp = f"{theirs['peak_rss_gib'] / ours['peak_rss_gib']:.2f}x less RAM"
                equal = e["labels_equal"].get(volume.split("x")[-1])
                comp += f"; labels equal on {equal:.1%} of voxels" if equal is not None else ""
            elif ours and ours["ok"] and theirs and not theirs["ok"]:
                comp = f"nnU-Net cannot hold it in {c['nnunet_ulimit_v_gb']:g} GB"
            cond = (
                f"{c['classes']} classes, patch {c['patch']}, network {c['network_spacing_mm']} mm, image "
                f"{c['image_spacing_mm']} mm; mirroring {c['mirroring']}, {c['precision']}; nnU-Net "
                f"{c['nnunet_flags']}; peak RSS of the process tree; one run each; {started}"
            )
            yield f"labels-only prediction, 117 classes, {volume} CT-like", cell(ours), cell(theirs), comp, cond


def onnx_cpu(d: Data) -> Iterator[Cells]:
    """``onnx_cpu.json`` of benchmarks/onnx_cpu.py: CPU seconds per case by forward-pass engine, one row per run."""
    for runs in d["runs"].values():
        for started, e in runs.items():
            c, rows = e["conditions"], e["rows"]
            ours = "; ".join(f"{r['engine']} {r['s_per_case']:.3g} s" for r in rows)
            comp = "; ".join(
                f"{r['engine']} {r['speed_vs_torch_fp32']:.2f}x the speed of torch fp32, labels equal on "
                f"{r['voxels_equal']:.3%} of voxels (Dice {r['mean_dice']})"
                for r in rows
                if r["engine"] != "torch_fp32"
            )
            diff = max(m["max_abs_diff"] for m in e["onnx_checks"]["members"].values())
            v = c["versions"]
            cond = (
                f"{len(c['cases'])} Hippocampus test cases, {c['weights']} weights, patch {c['patch']}, mirror "
                f"{c['mirror']}, median of {c['repeats']} rounds; one core, {c['threads']} thread(s); native bf16: "
                f"{c['cpu_has_native_bf16']}; ONNX max abs logit difference {diff:.1e}; autoseg "
                f"{v['autoseg_commit'][:7]}{'+uncommitted' if 'uncommitted' in v['autoseg_commit'] else ''}, torch "
                f"{v['torch']}, onnxruntime {v['onnxruntime']}, openvino {v['openvino'] or 'not installed'}; "
                f"{c['machine']['cpu'] or '?'}, {c['machine']['cores']} cores, {started}"
            )
            yield f"CPU inference per case by engine, hippocampus {c['configuration']}", ours, "-", comp, cond


def calibration(d: Data) -> Iterator[Cells]:
    """``calibration_*.json`` of ``autoseg analyze calibration``: ECE before/after temperature scaling and the best
    uncertainty score."""
    best = d["scores"][d["best_score"]]
    ours = (
        f"ECE {d['ece_before']:.3f} -> {d['ece_after']:.3f} (T = {d['temperature']:.2f}); best score "
        f"{d['best_score']}: Spearman {best['spearman']:.2f} with 1 - Dice, AURC {best['aurc']:.3f} "
        f"(oracle {best['aurc_optimal']:.3f})"
    )
    others = "; ".join(f"{k} Spearman {v['spearman']:.2f}" for k, v in d["scores"].items() if k != d["best_score"])
    cond = f"{d['configuration']}, {d['n_cases']} {d['source']} cases, band {d['band_voxels']} voxels; {others}"
    yield "calibration and failure detection", ours, "-", "no nnU-Net counterpart", cond


def robustness(d: Data) -> Iterator[Cells]:
    """``robustness_*.json`` of ``autoseg analyze robustness``: Dice at the highest severity per perturbation."""
    worst = d["most_harmful"]
    last = {name: p["levels"][-1] for name, p in d["perturbations"].items()}
    ours = f"unperturbed {d['reference']['mean_dice']:.3f}; " + "; ".join(
        f"{name} {lv['mean_dice']:.3f}" for name, lv in last.items()
    )
    cond = f"{d['config']}, {len(d['cases'])} {d['source']} cases, mirror {d['mirror_mode']}, highest severity"
    yield "Dice under perturbations", ours, "-", f"hurts most: {worst['name']} (-{worst['drop']:.3f})", cond


def subgroups(d: Data) -> Iterator[Cells]:
    """``subgroups_*.json`` of ``autoseg analyze subgroups``: the worst group against the rest, per grouping."""
    for column, a in d["analyses"].items():
        w = a.get("worst_vs_rest")
        if w is None:  # a single group (e.g. one spacing): nothing to compare
            continue
        ours = (
            f"{w['group']}: {w['difference']:+.3f} [{w['ci_low']:+.3f}, {w['ci_high']:+.3f}] vs the rest; "
            f"groups differ p = {a['p_value']:.3f}"
        )
        cond = f"{d['configuration']}, {d['n_cases']} {d['source']} cases, groups by {column}"
        yield f"Dice by subgroup ({column})", ours, "-", "no nnU-Net counterpart", cond


def architectures(d: Data) -> Iterator[Cells]:
    """``architectures.json`` of benchmarks/architectures.py: one row per dataset run and family."""
    for dataset, runs in d["runs"].items():
        for started, e in runs.items():
            mean, m = e["dice"]["dice"]["mean"], e["machine"]
            cond = (
                f"{e['configuration']}, rule plan with only the family changed, {e['budget']['iterations']} iterations "
                f"each, fold all; {e['test_cases']} test cases, 95% bootstrap; one core, {m['threads']} thread; "
                f"{m['cpu']}, {m['cores']} cores, {started}"
            )
            if "merged" in e:
                cond += "; some families trained in a second run with --keep (the file's `merged` says which and when)"
            for family, r in e["families"].items():
                what = f"architecture {family}, {dataset}"
                if "excluded" in r:
                    yield what, f"excluded: {r['excluded']}", "-", "-", cond
                    continue
                ours = f"Dice {_ci(mean[family])}; {r['step_s']} s/step, {r['parameters'] / 1e6:.2g} M parameters"
                ours += "".join(f"; {note}" for note in r["repairs"])
                diff = mean.get(f"{family}-plain")
                comp = "reference family" if family == "plain" else f"vs plain, paired: {_ci(diff)}" if diff else "-"
                yield what, ours, "-", comp, cond
            for family in e.get("families_pending", []):
                yield f"architecture {family}, {dataset}", "not yet measured", "-", "-", f"{e.get('note', '')}; {cond}"


def cascade(d: Data) -> Iterator[Cells]:
    """``cascade.json`` of benchmarks/cascade.py: one row per configuration of each run, against 3d_fullres."""
    for group, runs in d["runs"].items():
        for started, e in runs.items():
            mean, m, ds, cv = e["dice"]["dice"]["mean"], e["machine"], e["dataset"], e["cross_validation"]
            code = e.get("autoseg_commit", "?")[:7]
            cond = (
                f"synthetic {ds['kind']} (seed {ds['seed']}), {ds['cases']} training / {ds['test_cases']} test cases; "
                f"{e['folds']} folds, each fold's model ensembled on the test cases, no mirroring; select chose "
                f"{cv['chosen']}; 95% bootstrap over test cases; autoseg {code}; one core, "
                f"{m['threads']} thread; {m['cpu']}, {m['cores']} cores, {started} ({group})"
            )
            for name, iterations in e["iterations"].items():
                if name not in mean:
                    continue  # 3d_lowres: scored only as the cascade's first stage
                cv_dice = cv["candidates"].get(name)
                ours = f"test Dice {_ci(mean[name])}; {iterations} it per fold"
                ours += f" (+{e['iterations']['3d_lowres']} of 3d_lowres)" if "cascade" in name else ""
                ours += f"; CV Dice {cv_dice:.3f}" if cv_dice is not None else ""
                ours += f"; train {e['train_s'][name]:.0f} s, predict {e['predict_s'][name]:.0f} s"
                diff = mean.get(f"{name}-3d_fullres")
                comp = "reference" if diff is None else f"vs 3d_fullres, paired: {_ci(diff)}"
                yield f"cascade benchmark: {name}", ours, "-", comp, cond


def transfer(d: Data) -> Iterator[Cells]:
    """``transfer.json`` of benchmarks/transfer.py: one row per run, label count and method."""
    for group, runs in d["runs"].items():
        for started, e in runs.items():
            c, m = e["conditions"], e["machine"]
            cond = (
                f"{d['dataset']}, the first N training-part cases labelled, {len(c['test_cases'])} fixed test cases; "
                f"{c['fine_tune_iterations']} fine-tuning iterations every method; pretraining "
                f"{c['pretrain_iterations']} iterations of masked image modelling on every training-part image (no "
                f"labels, no test image); other dataset: synthetic mr3d, {c['source_iterations']} iterations; "
                f"mean foreground Dice, 95% bootstrap over test cases; autoseg {e.get('autoseg_commit', '?')[:7]}; "
                f"cores {c['cores']}; {m['cpu']}, {m['cores']} cores, {started} ({group})"
            )
            cond += f"; {e['notes']}" if e.get("notes") else ""
            for n, methods in e["results"].items():
                for method, r in methods.items():
                    diff = r["minus_scratch"]
                    comp = "reference" if diff is None else f"vs scratch, paired: {_ci(diff)}"
                    ours = f"Dice {_ci(r['dice'])}"
                    if method in e.get("invalid", {}):  # kept as reported, with why it measures nothing
                        ours += f" — **invalid: {e['invalid'][method]}**"
                    yield f"transfer, {n} labelled cases: {method}", ours, "-", comp, cond


#: Row builders in table order; each reads the files ``<its name>*.json``.
BUILDERS: tuple[Callable[[Data], Iterator[Cells]], ...] = (
    fingerprint, preprocess, dataloader, train_step, inference, train_cpu_plan, precision, end_to_end, real,
    memory_model, search, fold_compare, budget_split, bounded_memory, onnx_cpu, calibration, robustness, subgroups,
    architectures, cascade, transfer,
)  # fmt: skip


def table_rows(results: Path = RESULTS) -> list[list[str]]:
    """One list of cells per row (:data:`COLUMNS`), every results file in :data:`BUILDERS` order, then the rest."""
    rows: list[list[str]] = []
    seen: set[str] = set()
    for build in BUILDERS:
        for path in sorted(p for p in results.glob(f"{build.__name__}*.json") if p.name not in seen):
            seen.add(path.name)
            data = json.loads(path.read_text())
            mark = status(path.name, data)
            for what, *cells, cond in build(data):
                what += f" — **{mark}**" if mark else ""
                rows.append([what, *cells, cond + machine(data), f"`{path.name}`"])
    for path in sorted(p for p in results.glob("*.json") if p.name not in seen):
        rows.append([path.name, "-", "-", "-", "no row builder in benchmarks/table.py", f"`{path.name}`"])
    return rows


def markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def replace_section(text: str, table: str) -> str:
    """``text`` with everything between :data:`BEGIN` and :data:`END` replaced by ``table``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"markers {BEGIN} ... {END} not found: add them around the benchmark table")
    return text[: start + len(BEGIN)] + "\n" + table + text[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the marked section of README.md")
    args = parser.parse_args()
    table = markdown(table_rows())
    if args.write:
        README.write_text(replace_section(README.read_text(), table))
        print(f"wrote the benchmark table into {README}")
    else:
        print(table, end="")


if __name__ == "__main__":
    main()
