"""The HTML report: one self-contained page whose every section renders, from a bare run folder to a trained one.

``check_page`` (the page's structure, read with the standard library's HTML parser) and ``check_in_chromium`` (the
page loaded in headless Chromium) are shared with the end-to-end test, which renders the report of a trained run.
"""

from __future__ import annotations

import base64
import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from autoseg.cli import main
from autoseg.errors import ConfigError
from autoseg.export.report import SECTIONS, write_report
from autoseg.export.report.figures import _slice_index
from autoseg.fingerprint import extract_fingerprint
from autoseg.planning.planner import make_plans
from tests.conftest import write_nnunet_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Sections (id -> text), notes of what is missing (section id -> texts), images and anything external."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.missing: dict[str, list[str]] = {}
        self.images: list[tuple[str, bytes]] = []  # (section, PNG bytes)
        self.external: list[str] = []
        self._section: str | None = None
        self._in_missing = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._section = a["id"]
            self.sections[self._section] = ""
        if tag in ("script", "link", "iframe", "object", "embed"):
            self.external.append(f"<{tag}>")
        if tag == "img":
            src = a.get("src", "")
            prefix = "data:image/png;base64,"
            if not src.startswith(prefix):
                self.external.append(src[:80])
            else:
                self.images.append((self._section or "", base64.b64decode(src[len(prefix) :], validate=True)))
        if tag == "p" and a.get("class") == "missing":
            self._in_missing = True
            self.missing.setdefault(self._section or "", []).append("")

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        if tag == "p":
            self._in_missing = False

    def handle_data(self, data):
        if self._section is not None:
            self.sections[self._section] += data
        if self._in_missing:
            self.missing[self._section or ""][-1] += data


def check_page(path: Path) -> _Page:
    """Parse ``path``; assert every section is there, in order, and the page needs nothing outside itself."""
    page = _Page()
    page.feed(path.read_text())
    assert list(page.sections) == list(SECTIONS)
    assert not page.external, page.external
    assert "http://" not in path.read_text().replace("http://www.w3.org", "") and "https://" not in path.read_text()
    for section, png in page.images:
        assert png.startswith(PNG_MAGIC), f"image in {section} is not a PNG"
    for texts in page.missing.values():
        assert not any("could not be drawn" in t for t in texts), texts
    return page


def check_in_chromium(path: Path) -> list[dict]:
    """Load ``path`` in headless Chromium (Debian's ``chromium``, driven by playwright): no console error, no page
    error, no request leaving the file, every section visible; returns the images' alt, naturalWidth, height."""
    sync_api = pytest.importorskip("playwright.sync_api")  # the dev extra installs it
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    errors: list[str] = []
    outside: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else outside.append(r.url))
            page.goto(path.resolve().as_uri(), wait_until="load")
            for key in SECTIONS:
                assert page.locator(f"section#{key}").is_visible(), key
                assert page.locator(f"section#{key} h2").inner_text() == SECTIONS[key]
            images = page.evaluate(
                "Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete,"
                " width: i.naturalWidth, height: i.naturalHeight}))"
            )
        finally:
            browser.close()
    assert not errors, errors
    assert not outside, outside
    assert all(i["complete"] and i["width"] > 0 and i["height"] > 0 for i in images), images
    return images


@pytest.fixture(scope="module")
def _planned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("planned")
    data = write_nnunet_dataset(root / "data", shape=(10, 20, 30))
    run = root / "run"
    fp = extract_fingerprint(data, run / "fingerprint.json", workers=1)
    make_plans(fp, device="cpu", check_speed=False, cpu_flops=5e7).save(run / "plans.json")
    return run


@pytest.fixture
def planned_run(_planned: Path, tmp_path: Path) -> Path:
    """A run folder with a fingerprint and a plan, nothing trained (a copy per test)."""
    return Path(shutil.copytree(_planned, tmp_path / "run"))


def test_a_run_without_training_gets_every_section_saying_what_is_missing(planned_run):
    out = write_report(planned_run)
    assert out == planned_run / "report.html"
    page = check_page(out)
    assert "fingerprint" not in page.missing and "plan" not in page.missing
    assert [s for s, _ in page.images] == ["fingerprint"]
    assert "case_00" not in page.sections["fingerprint"]  # dataset-level facts only
    assert "3d_fullres" in page.sections["plan"] and "normalisation: CT" in page.sections["plan"]  # the reasons
    assert any("no trained fold" in t for t in page.missing["training"])
    assert any("no fold has validation results" in t for t in page.missing["cross-validation"])
    assert page.missing["worst-cases"] == ["no cross-validation results yet"]
    assert any("no analysis yet" in t for t in page.missing["analysis"])


def test_analysis_results_are_embedded_when_present(planned_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = planned_run / "analysis"
    folder.mkdir()
    plt.imsave(folder / "reliability.png", np.linspace(0, 1, 10 * 20).reshape(10, 20))
    (folder / "calibration.json").write_text(json.dumps({"ece": 0.0421, "per_class": {"a": {"ece": 0.03}}}))
    page = check_page(write_report(planned_run, planned_run / "out" / "r.html"))
    assert "analysis" not in page.missing
    assert [png for s, png in page.images if s == "analysis"] == [(folder / "reliability.png").read_bytes()]
    text = page.sections["analysis"]
    assert "calibration.json" in text and "per_class.a.ece" in text and "0.042" in text


def test_unreadable_artifacts_are_named_and_the_rest_still_renders(planned_run, capsys):
    (planned_run / "plans.json").write_text("{")
    (planned_run / "models" / "2d" / "fold_0").mkdir(parents=True)
    (planned_run / "models" / "2d" / "fold_0" / "log.jsonl").write_text("not json\n")
    assert main(["report", str(planned_run), "-o", str(planned_run / "r.html")]) == 0
    assert "self-contained" in capsys.readouterr().out
    page = check_page(planned_run / "r.html")
    assert any("plans.json: could not be read" in t for t in page.missing["plan"])
    assert any("log.jsonl: could not be read" in t for t in page.missing["training"])
    assert [s for s, _ in page.images] == ["fingerprint"]


def test_a_missing_run_folder_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such run folder"):
        write_report(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


def test_overlay_slice_has_the_most_reference_foreground():
    reference = np.zeros((10, 20, 30), np.uint8)
    prediction = np.zeros_like(reference)
    reference[3, :4, :5] = 1
    reference[7, :5, :5] = 2
    prediction[2] = 1
    assert _slice_index(reference, prediction) == 7
    assert _slice_index(np.zeros_like(reference), prediction) == 2  # empty reference: the most predicted
