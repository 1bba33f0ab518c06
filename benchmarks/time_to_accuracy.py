"""Time to accuracy: test Dice against the training budget, from the runs of ``real.py`` (no training here).

    python benchmarks/time_to_accuracy.py [--dataset hippocampus ...]

``real.py --dataset D --minutes 6 --minutes 15 --minutes 30 --minutes 60 --minutes 120`` trains both tools at each
budget on the fixed split; this script reads every run in ``results/real_<D>.json`` (all of them, the latest run per
budget drawn with a line, earlier ones as points), prints a table per dataset (budget, tool, foreground-mean Dice
with its bootstrap interval, iterations) and draws ``results/time_to_accuracy_<D>.png``: Dice with its 95% interval
against the budget on a log axis, one line per tool. It also says where autoseg's curve does not rise with the
budget, which the planner must then explain or fix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _measure import RESULTS, print_table  # noqa: E402

TOOLS = ("autoseg", "nnunet")


def points(data: dict) -> list[dict]:
    """One point per run and tool: budget, start time, mean Dice and interval, iterations; sorted by budget."""
    out = []
    for runs in data["runs"].values():
        for started, e in runs.items():
            if e["split"].get("max_train"):
                continue  # a subsampled training part is another experiment
            dice = e["metrics"]["dice"]["mean"]
            for tool in TOOLS:
                d = dice[tool]
                out.append(
                    {
                        "budget_min": e["budget_minutes"],
                        "started": started,
                        "tool": tool,
                        "dice": d["mean"],
                        "low": d["low"],
                        "high": d["high"],
                        "iterations": e["iterations"][tool],
                    }
                )
    return sorted(out, key=lambda p: (p["budget_min"], p["tool"], p["started"]))


def latest(pts: list[dict], tool: str) -> list[dict]:
    """The latest run of each budget for ``tool``."""
    by_budget: dict[float, dict] = {}
    for p in pts:
        if p["tool"] == tool:
            by_budget[p["budget_min"]] = p  # sorted by start time within a budget: the last one wins
    return [by_budget[b] for b in sorted(by_budget)]


def falls(curve: list[dict]) -> list[str]:
    """Budgets where the Dice is lower than at a smaller budget by more than that run's interval half-width."""
    notes = []
    for a, b in zip(curve, curve[1:]):
        if b["dice"] is not None and a["dice"] is not None and b["dice"] < a["dice"] - (b["high"] - b["low"]) / 2:
            notes.append(f"{a['budget_min']:g} -> {b['budget_min']:g} min: {a['dice']:.3f} -> {b['dice']:.3f}")
    return notes


def plot(dataset: str, pts: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for tool, colour in zip(TOOLS, ("tab:blue", "tab:orange")):
        curve = [p for p in latest(pts, tool) if p["dice"] is not None]
        if not curve:
            continue
        x = [p["budget_min"] for p in curve]
        y = [p["dice"] for p in curve]
        err = [[p["dice"] - p["low"] for p in curve], [p["high"] - p["dice"] for p in curve]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour, label=tool)
        older = [p for p in pts if p["tool"] == tool and p not in curve and p["dice"] is not None]
        ax.scatter([p["budget_min"] for p in older], [p["dice"] for p in older], color=colour, alpha=0.4, s=12)
    ax.set_xscale("log")
    ax.set_xlabel("training budget per tool (minutes, one CPU core)")
    ax.set_ylabel("test Dice, foreground mean (95% bootstrap)")
    ax.set_title(f"time to accuracy: {dataset}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", help="default: every results/real_*.json")
    args = parser.parse_args()
    files = [RESULTS / f"real_{d}.json" for d in args.dataset] if args.dataset else sorted(RESULTS.glob("real_*.json"))
    for path in files:
        data = json.loads(path.read_text())
        pts = points(data)
        print(f"\n{data['dataset']} ({path.name}): {len(pts) // 2} run(s)")
        rows = [{**p, "dice": f"{p['dice']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"} for p in pts]
        print_table(rows, ["budget_min", "tool", "dice", "iterations", "started"])
        for note in falls(latest(pts, "autoseg")):
            print(f"autoseg's Dice falls with more budget: {note} (find out why)")
        out = RESULTS / f"time_to_accuracy_{data['dataset']}.png"
        plot(data["dataset"], pts, out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
