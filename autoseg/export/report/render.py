"""The report as one self-contained HTML page: inline CSS, every image a base64 PNG, no script, nothing fetched.

Each section has a fixed ``id`` (:data:`SECTIONS`) and renders whatever its inputs allow; what is missing is said
in the section itself.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import logging
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from string import Template
from typing import Any

from autoseg.errors import AutosegError
from autoseg.export.report import figures
from autoseg.export.report.collect import CrossValidation, ReportData, class_names
from autoseg.inference.postprocessing import PostprocessingSpec
from autoseg.inference.selection import Selection
from autoseg.planning.plans import Configuration

__all__ = ["SECTIONS", "render_report"]

log = logging.getLogger(__name__)

#: Section id -> heading, in page order.
SECTIONS = {
    "fingerprint": "Dataset fingerprint",
    "plan": "Plan and the reasons for it",
    "training": "Training curves",
    "cross-validation": "Cross-validation and selection",
    "worst-cases": "Worst cases",
    "analysis": "Analysis",
}

#: Rows of an analysis JSON file shown (flattened); the rest is counted.
MAX_JSON_ROWS = 60

PAGE = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>autoseg report: $title</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 1em 3em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ccd; padding-top: 0.6em; } h3 { margin-bottom: 0.3em; }
nav a { margin-right: 1em; } table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ccd; padding: 2px 8px; text-align: left; vertical-align: top; } th { background: #eef; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } img { max-width: 100%; display: block; }
.missing { color: #a40; font-style: italic; } .scroll { max-height: 420px; overflow-y: auto; display: inline-block; }
ul.why li { margin-bottom: 0.2em; } .meta { color: #666; }
</style></head>
<body>
<h1>autoseg report: $title</h1>
<p class="meta">$meta</p>
<nav>$nav</nav>
$sections
</body></html>
""")


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits or value == 0 else f"{value:.2e}"
    return str(value)


def _list(values: Iterable[Any]) -> str:
    return "[" + ", ".join(_num(float(v) if isinstance(v, float) else v) for v in values) + "]"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table; numbers right-aligned, every cell escaped."""

    def cell(value: Any) -> str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f'<td class="num">{_e(_num(value))}</td>'
        return f"<td>{_e(value)}</td>"

    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _missing(texts: Iterable[str]) -> str:
    return "".join(f'<p class="missing">{_e(t)}</p>' for t in texts)


def _why(reasons: Sequence[str]) -> str:
    return '<ul class="why">' + "".join(f"<li>{_e(r)}</li>" for r in reasons) + "</ul>" if reasons else ""


def _fingerprint(data: ReportData, names: dict[str, str]) -> str:
    fp = data.fingerprint
    if fp is None:
        return ""
    rows = [
        ("dataset", fp.dataset_name),
        ("cases", fp.n_cases),
        ("dimensions", f"{fp.dim}D"),
        ("channels", ", ".join(f"{c.name} ({c.normalization_hint})" for c in fp.channels)),
        ("median spacing (z, y, x) mm", _list(fp.median_spacing)),
        ("median size after cropping (z, y, x)", _list(fp.median_shape_after_crop)),
        ("median size kept by cropping", f"{fp.median_relative_size_after_cropping:.0%}"),
    ]
    classes = [
        (
            names.get(str(c.label), c.name),
            c.label,
            c.voxel_fraction,
            c.present_fraction,
            c.median_object_volume_mm3,
            c.median_components_per_case,
        )
        for c in fp.classes
    ]
    intensity = [
        (c.name, s.mean, s.std, s.median, s.percentile_00_5, s.percentile_99_5)
        for c in fp.channels
        if (s := c.foreground_intensity) is not None
    ]
    return (
        _table(("", "value"), rows)
        + _img(figures.fingerprint_png(fp, names), "fingerprint plots")
        + "<h3>Foreground intensity per channel</h3>"
        + _table(("channel", "mean", "std", "median", "0.5%", "99.5%"), intensity)
        + "<h3>Classes</h3>"
        + _table(
            ("class", "label", "share of foreground", "share of cases", "median object mm³", "components per case"),
            classes,
        )
    )


def _configuration(c: Configuration) -> str:
    n = c.network
    norm = "; ".join(f"{x.scheme}" + (f" clip {_list(x.clip)}" if x.clip else "") for x in c.normalization)
    rows = [
        ("spacing (mm)", _list(c.spacing)),
        ("patch, batch", f"{_list(c.patch_size)} x {c.batch_size}"),
        ("network", f"{n.block}, {n.n_stages} stages, features {_list(n.features_per_stage)}"),
        ("normalisation", norm),
        ("loss", c.loss.name),
        ("foreground oversampling", c.foreground_oversampling),
        (
            "schedule",
            f"{c.training.epochs} epochs x {c.training.iterations_per_epoch} iterations, "
            f"{c.training.optimizer} lr {c.training.learning_rate:g}",
        ),
        ("augmentation", f"mirror axes {_list(c.augmentation.mirror_axes)}, strength {c.augmentation.strength:g}"),
        ("estimated memory", f"{c.estimated_memory_bytes / 2**20:,.0f} MB"),
    ]
    return f"<h3>{_e(c.name)}</h3>" + _table(("", "value"), rows) + "<p>Why:</p>" + _why(c.why)


def _plan(data: ReportData) -> str:
    plans = data.plans
    if plans is None:
        return ""
    rows = [
        ("planner", plans.planner),
        ("device", f"{plans.device.kind} ({plans.device.name}), {plans.device.memory_bytes / 2**30:.1f} GB"),
        ("time budget", "none given" if plans.time_budget_hours is None else f"{plans.time_budget_hours:g} h"),
        ("cross-validation", "yes" if plans.cross_validation else "no: one model trained on all cases"),
        ("configurations", ", ".join(plans.configurations)),
    ]
    text = _table(("", "value"), rows) + _why(plans.why)
    text += "".join(_configuration(c) for c in plans.configurations.values())
    if plans.search:
        text += "<h3>Search</h3><pre>" + _e(json.dumps(plans.search, indent=1)[:4000]) + "</pre>"
    text += "".join(_img(p.read_bytes(), p.name) for p in data.search_images)
    return text


def _training(data: ReportData) -> str:
    parts = []
    for config, folds in data.curves.items():
        rows = [
            (fold, len(h), *(h[-1].get(k) for k in ("train_loss", "val_loss", "ema_dice", "seconds_per_iteration")))
            for fold, h in sorted(folds.items())
        ]
        parts.append(
            f"<h3>{_e(config)}</h3>"
            + _img(figures.curves_png(config, folds), f"training curves {config}")
            + _table(("fold", "epochs", "training loss", "validation loss", "pseudo-Dice EMA", "s/iteration"), rows)
        )
    untrained = [c for c in (data.plans.configurations if data.plans else ()) if c not in data.curves]
    if data.curves and untrained:
        parts.append(_missing([f"planned but not trained: {', '.join(untrained)}"]))
    return "".join(parts)


def _interval(cv: CrossValidation, key: str) -> str:
    iv = cv.intervals[key]
    return f"{_num(iv.mean)} [{_num(iv.low)}, {_num(iv.high)}] (n={iv.n})" if iv.n else "n/a"


def _postprocessing(spec: PostprocessingSpec, names: dict[str, str]) -> str:
    steps = ["keep the largest connected component of all foreground"] if spec.keep_largest_foreground else []
    steps += [f"keep the largest component of {names.get(str(v), v)}" for v in spec.keep_largest_classes]
    steps += [f"remove {names.get(k, k)} components under {v:g} mm³" for k, v in spec.min_component_mm3.items()]
    return "; ".join(steps)


def _selection(s: Selection, names: dict[str, str]) -> str:
    """What ``autoseg select`` chose, against the runner-up, and the postprocessing."""
    text = (
        f"<p>Chosen: <b>{_e(s.best)}</b> (configurations {_e(', '.join(s.configurations))}) "
        f"on {s.n_cases} cases, by mean foreground Dice.</p>"
    )
    if s.runner_up and s.difference_to_runner_up:
        d = s.difference_to_runner_up
        text += (
            f"<p>Versus the runner-up {_e(s.runner_up)}: {_num(d['mean'])} "
            f"(paired bootstrap 95% interval {_num(d['ci_low'])} .. {_num(d['ci_high'])}).</p>"
        )
    post = s.postprocessing
    if post is None:
        text += "<p>Postprocessing: none (no candidate improved the mean without lowering a class).</p>"
    else:
        dice = s.postprocessing_dice
        text += (
            f"<p>Postprocessing: {_e(_postprocessing(post, names))}; mean Dice {_num(dice.get('before'))} -> "
            f"{_num(dice.get('after'))}. The numbers below are before postprocessing.</p>"
        )
    return text


def _cross_validation(data: ReportData, names: dict[str, str]) -> str:
    s = data.selection
    text = _selection(s, names) if s is not None else ""
    results = data.cross_validation
    if not results:
        return text
    keys = list(dict.fromkeys(k for cv in results for k in cv.classes))
    rows = [(cv.name, *(_interval(cv, k) for k in [*keys, "mean"])) for cv in results]
    text += "<h3>Dice per class: mean [bootstrap 95% interval] over out-of-fold cases</h3>"
    text += _table(("candidate", *(names.get(k, k) for k in keys), "foreground mean"), rows)
    for cv in results:
        if cv.folds_missing:
            text += _missing([f"{cv.name}: {', '.join(cv.folds_missing)} without validation results yet"])
    text += _img(figures.cross_validation_png(results, names), "cross-validation Dice")
    chosen = next((cv for cv in results if s is not None and cv.name == s.best), results[0])
    ranked = sorted(chosen.cases, key=lambda c: (math.isnan(chosen.case_dice(c)), chosen.case_dice(c)))
    case_rows = [
        (c.case, *(c.metrics[k].dice if k in c.metrics else "n/a" for k in chosen.classes), chosen.case_dice(c))
        for c in ranked
    ]
    text += f"<h3>Dice per case of {_e(chosen.name)} (worst first; source {_e(chosen.source)})</h3>"
    text += '<div class="scroll">' + _table(("case", *(names.get(k, k) for k in chosen.classes), "mean"), case_rows)
    return text + "</div>"


def _worst_cases(data: ReportData, names: dict[str, str]) -> str:
    parts = []
    if data.worst and data.selection is not None and data.selection.postprocessing is not None:
        parts.append("<p>Predictions are shown before postprocessing.</p>")
    for case in data.worst:
        try:
            png, z = figures.overlay_png(case, names)
        except (AutosegError, OSError, ValueError) as exc:
            parts.append(_missing([f"{case.case}: overlay not drawn ({exc})"]))
            continue
        image = "" if case.image is not None else " (image not available: labels only)"
        parts.append(
            f"<h3>{_e(case.case)}: mean Dice {_num(case.dice)} ({_e(case.candidate)}), slice z={z}{_e(image)}</h3>"
            + _img(png, f"overlay {case.case}")
        )
    return "".join(parts)


def _flatten(value: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and len(value) > 8:
        yield prefix, f"list of {len(value)}"
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def _analysis(data: ReportData) -> str:
    text = "".join(f"<h3>{_e(p.name)}</h3>" + _img(p.read_bytes(), p.name) for p in data.analysis_images)
    for name, parsed in data.analysis_json.items():
        rows = list(_flatten(parsed))
        text += f"<h3>{_e(name)}</h3>" + _table(("field", "value"), rows[:MAX_JSON_ROWS])
        if len(rows) > MAX_JSON_ROWS:
            text += f"<p>... and {len(rows) - MAX_JSON_ROWS} more fields in {_e(name)}</p>"
    return text


def render_report(data: ReportData) -> str:
    """The whole page for ``data``; a section whose drawing fails says so instead of breaking the page."""
    names = class_names(data.plans, data.fingerprint)
    builders = {
        "fingerprint": lambda: _fingerprint(data, names),
        "plan": lambda: _plan(data),
        "training": lambda: _training(data),
        "cross-validation": lambda: _cross_validation(data, names),
        "worst-cases": lambda: _worst_cases(data, names),
        "analysis": lambda: _analysis(data),
    }
    sections = []
    for key, heading in SECTIONS.items():
        try:
            body = builders[key]()
        except Exception as exc:  # one broken artifact must not cost the reader the other sections
            log.warning("report section %s failed: %s", key, exc, exc_info=True)
            body = _missing([f"this section could not be drawn: {type(exc).__name__}: {exc}"])
        notes = _missing(data.missing.get(key, []))
        sections.append(f'<section id="{key}"><h2>{_e(heading)}</h2>{notes}{body}</section>')
    source = data.plans or data.fingerprint
    title = source.dataset_name if source is not None else data.run.name
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    version = data.plans.autoseg_version if data.plans and data.plans.autoseg_version else "unknown"
    return PAGE.substitute(
        title=_e(title),
        meta=_e(f"run folder {Path(data.run).resolve()}; written {when}; planned with autoseg {version}"),
        nav="".join(f'<a href="#{k}">{_e(h)}</a>' for k, h in SECTIONS.items()),
        sections="\n".join(sections),
    )
