"""benchmarks/table.py: the README's benchmark table is generated from the committed results, and stays so."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_table", ROOT / "benchmarks" / "table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def test_every_committed_results_file_gets_rows_with_all_columns():
    rows = table.table_rows()
    files = {f"`{p.name}`" for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    assert {r[-1] for r in rows} == files
    assert all(len(r) == len(table.COLUMNS) and all(r) for r in rows)


def test_runs_the_audit_flagged_carry_their_mark_and_reason():
    rows = table.table_rows()
    for file, (_, mark, reason) in table.AUDIT.items():
        mine = [r for r in rows if r[-1] == f"`{file}`"]
        if mine and mark:
            assert all(f"**{mark}: {reason}**" in r[0] for r in mine), file
        if mine and not mark:
            assert not any("see benchmarks/README.md" in r[0] for r in mine), file


def test_readme_section_equals_the_generated_table():
    readme = (ROOT / "README.md").read_text()
    generated = table.replace_section(readme, table.markdown(table.table_rows()))
    assert readme == generated, "README.md's benchmark table is stale: run `python benchmarks/table.py --write`"


def test_tiny_results_folder(tmp_path, monkeypatch):
    machine = {"cpu": "Test CPU", "cores": 3}
    fingerprint = {
        "machine": machine,
        "date": "2030-01-01 00:00",
        "cases": 5,
        "workers": 1,
        "rows": [
            {"tool": "autoseg", "wall_s": 1.0, "peak_rss_mib": 100.0},
            {"tool": "nnU-Net v2", "wall_s": 4.0, "peak_rss_mib": 400.0},
            {"tool": "ratio nnU-Net/autoseg", "wall_s": 4.0, "peak_rss_mib": 4.0},
        ],
        "agreement": {
            "median_spacing_identical": True,
            "shapes_after_crop_identical": True,
            "percentiles_within_1pct": True,
        },
    }
    ci = {"mean": 0.9, "low": 0.88, "high": 0.92, "n": 40, "n_undefined": 0}
    per_class = {"autoseg": ci, "nnunet": {**ci, "mean": 0.85}, "autoseg_minus_nnunet": {**ci, "mean": 0.05}}
    prediction = {"mirroring": "4 passes", "precision": "bf16"}
    real = {  # as benchmarks/real.py writes it
        "dataset": "hippocampus",
        "format": 1,
        "runs": {
            "30min": {
                "2030-01-02T00:00:00": {
                    "budget_minutes": 30.0,
                    "split": {"seed": 202611, "train_cases": ["a", "b", "c"], "test_cases": ["d"]},
                    "machine": {**machine, "threads_per_tool": 1},
                    "versions": {"autoseg_commit": "0123456789abcdef+uncommitted changes in autoseg/"},
                    "iterations": {"autoseg": 500, "nnunet": 100},
                    "settings": {"autoseg": {"prediction": prediction}, "nnunet": {"prediction": prediction}},
                    "metrics": {"dice": {"anterior": per_class, "mean": per_class}},
                }
            }
        },
    }
    (tmp_path / "fingerprint.json").write_text(json.dumps(fingerprint))
    (tmp_path / "real_hippocampus.json").write_text(json.dumps(real))
    (tmp_path / "unknown.json").write_text("{}")
    monkeypatch.setattr(table, "AUDIT", {"fingerprint.json": ("2030-01-01 00:00", table.STALE, "a test reason")})

    rows = table.table_rows(tmp_path)

    assert [r[-1] for r in rows] == ["`fingerprint.json`", "`real_hippocampus.json`", "`unknown.json`"]
    fp, real_row, unknown = rows
    assert fp[0] == f"fingerprint, 5 synthetic CT cases (seed 0) — **{table.STALE}: a test reason**"
    assert fp[1:4] == [
        "1 s, 100 MiB",
        "4 s, 400 MiB",
        "4.0x faster, 4.0x less RAM; median spacing, shapes, percentiles identical",
    ]
    assert fp[4] == "1 workers each; one run; Test CPU, 3 cores, 2030-01-01 00:00"
    assert real_row[0] == f"real data, hippocampus, 30 min training each (30min) — **{table.PENDING}**"
    assert real_row[1] == "Dice anterior 0.900 [0.880, 0.920]; mean 0.900 [0.880, 0.920]; 500 it"
    assert real_row[3] == "Dice autoseg - nnU-Net, foreground mean, paired: 0.050 [0.880, 0.920]"
    assert real_row[4].startswith("3 training / 1 test cases (split seed 202611); prediction autoseg: 4 passes, bf16")
    assert real_row[4].endswith(
        "autoseg 0123456+uncommitted; one core, 1 thread each; Test CPU, 3 cores, 2030-01-02T00:00:00"
    )
    assert unknown[4] == "no row builder in benchmarks/table.py"
    lines = table.markdown(rows).splitlines()
    assert lines[0] == "| " + " | ".join(table.COLUMNS) + " |" and len(lines) == 2 + len(rows)


def test_replace_section_keeps_the_text_around_the_markers():
    text = f"intro\n{table.BEGIN}\nold table\n{table.END}\noutro\n"
    assert table.replace_section(text, "| new |\n") == f"intro\n{table.BEGIN}\n| new |\n{table.END}\noutro\n"
    with pytest.raises(ValueError, match="markers"):
        table.replace_section("no markers here", "| new |\n")


def test_onnx_cpu_rows(tmp_path):
    rows = [
        {"engine": "torch_fp32", "s_per_case": 2.0, "speed_vs_torch_fp32": 1.0, "voxels_equal": 1.0, "mean_dice": 1.0},
        {"engine": "onnxruntime_fp32", "s_per_case": 1.6, "speed_vs_torch_fp32": 1.25, "voxels_equal": 0.999991},
    ]
    rows[1]["mean_dice"] = 0.9999
    conditions = {  # as benchmarks/onnx_cpu.py writes them
        "weights": "trained",
        "configuration": "3d_fullres",
        "patch": [32, 40, 32],
        "mirror": "single",
        "cases": ["a", "b"],
        "repeats": 3,
        "threads": 1,
        "cpu_has_native_bf16": True,
        "machine": {"cpu": "Test CPU", "cores": 3},
        "versions": {"autoseg_commit": "0123456789+uncommitted changes in autoseg/", "torch": "2.13.0"}
        | {"onnxruntime": "1.32.0", "openvino": None},
    }
    entry = {"conditions": conditions, "onnx_checks": {"members": {"3d_fullres/fold_all": {"max_abs_diff": 4e-5}}}}
    data = {"benchmark": "onnx_cpu", "runs": {"mirror_single": {"2030-01-03T00:00:00": {**entry, "rows": rows}}}}
    (tmp_path / "onnx_cpu.json").write_text(json.dumps(data))
    (row,) = table.table_rows(tmp_path)
    assert row[0] == f"CPU inference per case by engine, hippocampus 3d_fullres — **{table.PENDING}**"
    assert row[1:4] == [
        "torch_fp32 2 s; onnxruntime_fp32 1.6 s",
        "-",
        "onnxruntime_fp32 1.25x the speed of torch fp32, labels equal on 99.999% of voxels (Dice 0.9999)",
    ]
    assert row[4].startswith("2 Hippocampus test cases, trained weights, patch [32, 40, 32], mirror single, median of")
    assert "ONNX max abs logit difference 4.0e-05; autoseg 0123456+uncommitted" in row[4]
    assert row[4].endswith("openvino not installed; Test CPU, 3 cores, 2030-01-03T00:00:00")
