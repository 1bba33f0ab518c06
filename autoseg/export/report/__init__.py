"""``autoseg report``: one self-contained HTML page about a run (fingerprint, plan and its reasons, training
curves, cross-validation with intervals, worst cases, analysis), readable offline and easy to pass around.

:mod:`~autoseg.export.report.collect` reads the run folder, :mod:`~autoseg.export.report.figures` draws,
:mod:`~autoseg.export.report.render` writes the page.
"""

from __future__ import annotations

from pathlib import Path

from autoseg.errors import ConfigError
from autoseg.export.report.collect import ReportData, collect_report_data
from autoseg.export.report.render import SECTIONS, render_report
from autoseg.files import write_text_atomic
from autoseg.runfolder import RunFolder

__all__ = ["SECTIONS", "ReportData", "collect_report_data", "render_report", "write_report"]


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN/report.html``), atomically; returns its path.

    Every section renders from whatever the run folder holds: a run without cross-validation yet gets a page that
    says so in those sections.
    """
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir}: no such run folder; give the folder `autoseg run DATA -o RUN` wrote")
    path = Path(out) if out is not None else RunFolder(run_dir).report
    write_text_atomic(path, render_report(collect_report_data(run_dir)))
    return path
