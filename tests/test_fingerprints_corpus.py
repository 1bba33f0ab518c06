"""The ``fingerprints/`` corpus: every entry loads into autoseg's types and is what fingerprints/build.py writes."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from autoseg.fingerprint_import import load_corpus_entry

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "fingerprints"
REFERENCE = ROOT.parent / "shared" / "reference"
FILES = sorted(CORPUS.glob("*.json"))


def test_corpus_is_not_empty():
    assert len(FILES) >= 15


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_entry_loads_and_is_consistent(path):
    entry = load_corpus_entry(path)
    assert entry.name == path.stem
    assert entry.source and all(s.repository.startswith("https://") for s in entry.source)
    assert entry.fingerprint is not None or entry.nnunet_decisions
    fp = entry.fingerprint
    if fp is not None:
        assert fp.n_cases == len(fp.cases) > 0
        assert fp.dim in (2, 3)
        assert np.all(fp.spacings > 0) and np.all(fp.shapes_after_crop > 0)
        assert fp.spacings.shape == (fp.n_cases, 3)
        assert np.allclose(fp.median_spacing, np.median(fp.spacings, axis=0))
        assert 0 < fp.median_relative_size_after_cropping <= 1
        assert len({c.id for c in fp.cases}) == fp.n_cases
        assert fp.source.split(":", 1)[0] in ("nnunet", "monai")
        assert fp.unknown  # imported fingerprints say what they lack
    for preset, dec in entry.nnunet_decisions.items():
        assert preset in ("nnunet", "nnunet-resenc-m", "nnunet-resenc-l")
        for name, config in dec.configurations.items():
            if config.inherits_from is None:
                assert config.n_stages == len(config.strides) == len(config.kernel_sizes)
                assert len(config.patch_size) == len(config.spacing)
                assert all(
                    p % int(np.prod([s[a] for s in config.strides])) == 0 for a, p in enumerate(config.patch_size)
                ), name


def test_rsna_batch_size_is_flagged_as_hand_edited():
    rsna = next(p for p in FILES if p.stem.startswith("RSNA2025"))
    assert load_corpus_entry(rsna).caveats["batch_size_edited_by_hand"] is True


def test_build_script_reproduces_the_corpus():
    if not (REFERENCE / "nnunet").is_dir():
        pytest.skip(f"{REFERENCE} not present (reference data lives in ../shared/reference beside the checkout)")
    build = _build_module()
    for path in FILES:
        entry = build.build_entry(REFERENCE / "nnunet" / path.stem, REFERENCE)
        assert build.dumps(entry) == path.read_text(), f"{path.name} is stale: run python fingerprints/build.py"


def _build_module():
    spec = importlib.util.spec_from_file_location("fingerprints_build", CORPUS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_match_table_is_current(tmp_path):
    table = ROOT / "benchmarks" / "results" / "nnunet_preset_match.md"
    n_match, n_total = _build_module().write_match_table([load_corpus_entry(p) for p in FILES], tmp_path / "t.md")
    assert (tmp_path / "t.md").read_text() == table.read_text(), "run python fingerprints/build.py --match-table ..."
    assert n_total - n_match <= 2  # RSNA's hand-edited batch size, OpenEDS's unknown case count
