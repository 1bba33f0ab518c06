"""Regenerate the ``fingerprints/`` corpus from the reference files of real public datasets.

Run from the repository root::

    python fingerprints/build.py [--reference ../shared/reference] [--out fingerprints]
                                 [--match-table benchmarks/results/nnunet_preset_match.md]

For every folder of ``<reference>/nnunet/`` it writes ``<out>/<folder>.json`` (a :class:`CorpusEntry`): the
provenance from ``SOURCE.txt``, the fingerprint in autoseg's format (nnU-Net's ``dataset_fingerprint.json`` or MONAI's
``datastats_by_case.yaml``), the decisions of every nnU-Net plans file in the folder, keyed by preset, and caveats.
The output is deterministic: the same reference files give byte-identical JSON. ``--match-table`` also plans every
entry with the ``nnunet`` presets and writes the comparison table.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from autoseg.files import write_text_atomic
from autoseg.fingerprint_import import (
    CorpusEntry,
    ReferenceSource,
    fingerprint_from_plans,
    import_monai_datastats,
    import_nnunet_fingerprint,
    read_nnunet_plans,
)
from autoseg.planning.nnunet import PLANNER_PRESETS, compare_with_nnunet, nnunet_view, plan_nnunet
from autoseg.serialization import to_jsonable

DEFAULT_REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
NOT_PLANS = {"dataset.json", "dataset_fingerprint.json", "datalist.json"}

#: Facts about each reference folder that its files do not say themselves (from its SOURCE.txt, the reference
#: README, and what the nnU-Net rules imply). Keys: folder-name prefix.
CAVEATS: dict[str, dict[str, Any]] = {
    "Dataset027_ACDC": {"notes": "Fingerprint only: no default nnU-Net plans were published for this dataset."},
    "Dataset137_BraTS2021": {
        "fingerprint_and_plans_from_different_repositories": True,
        "notes": "Fingerprint from lldzlldz/nnUNet, default plans from katieliuu/cs231n (same 1251 cases). The "
        "plans' 3d_fullres carries a stray key UNet_base_num_features=8, which the current plans layout ignores "
        "(its architecture starts at 32 features).",
    },
    "PANORAMA_PDAC_CT_Dataset103": {
        "images_resampled_before_fingerprint": True,
        "notes": "Images were resampled to about 4.5 x 4.5 x 9 mm before nnU-Net: the fingerprint does not describe "
        "the raw public data, but the fingerprint -> plans pair is genuine planner output (v2.0-2.2 plans layout).",
    },
    "PANORAMA_PDAC_CT_Dataset104": {
        "images_cropped_before_fingerprint": True,
        "notes": "Images were cropped around the pancreas before nnU-Net: the fingerprint does not describe the raw "
        "public data, but the fingerprint -> plans pair is genuine planner output.",
    },
    "RSNA2025_": {
        "images_cropped_before_fingerprint": True,
        "batch_size_edited_by_hand": True,
        "hand_edited": {
            "nnunet-resenc-m": {
                "3d_fullres": ["batch_size"],
                "3d_fullres_bs32": ["configuration added by hand"],
                "2d": ["configuration removed by hand"],
                "3d_lowres": ["configuration removed by hand"],
                "3d_cascade_fullres": ["configuration removed by hand"],
            }
        },
        "notes": "ResEnc-M plans edited by hand: 3d_fullres batch size 8 (the planner gives 2) and an added "
        "3d_fullres_bs32. The planner always writes a 2d configuration, and it sets batch_dice on 3d_fullres only "
        "when it also made 3d_lowres (+ cascade), so those three were removed by hand. The file also names a custom "
        "preprocessor (RSNA_Aneurysm_Preprocessor) and torch resampling. Volumes were cropped before fingerprinting.",
    },
    "autoPET_": {"notes": "Plans dataset_name Dataset102_PETCT; v2.0-2.2 plans layout."},
    "ARCADE_": {
        "plans_only": True,
        "n_cases": 1200,
        "n_labels": 2,
        "notes": "2D X-ray angiography, plans only (no fingerprint); numTraining 1200 from dataset.json; "
        "v2.0-2.2 plans layout.",
    },
    "OpenEDS2019_": {
        "plans_only": True,
        "n_cases": None,
        "n_labels": 4,
        "notes": "2D eye images resized/cropped to 400x400, plans only (no fingerprint, no dataset.json, so "
        "numTraining is unknown); OpenEDS 2019 has 4 classes (background, sclera, iris, pupil).",
    },
    "MM-WHS2017_": {"fingerprint_from_monai": True, "channel_names": ["CT"]},
    "HNTS-MRG2024_": {"fingerprint_from_monai": True, "channel_names": ["T2"]},
    "AOCR2024_": {"fingerprint_from_monai": True, "summary_only": True},
}
MONAI_NOTE = (
    "Fingerprint converted from MONAI Auto3DSeg datastats_by_case.yaml ((x, y, z) reversed): shape_after_crop is "
    "MONAI's own foreground crop, intensity statistics are MONAI's averages of per-case values, channel names were "
    "set by hand from the dataset description, and label names are unknown."
)


def caveats_for(folder: str) -> dict[str, Any]:
    for prefix, facts in CAVEATS.items():
        if folder.startswith(prefix):
            return dict(facts)
    return {}


def parse_source(text: str) -> tuple[ReferenceSource, ...]:
    """Parse a reference folder's SOURCE.txt into one :class:`ReferenceSource` per ``Source repository:`` block."""
    blocks: list[dict[str, Any]] = []
    in_notes = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("Source repository:"):
            url, _, remark = line.split(":", 1)[1].strip().partition(" ")
            blocks.append({"repository": url, "commit": None, "files": {}, "file_commits": set(), "notes": [remark]})
            in_notes = False
        elif not blocks or not line:
            continue
        elif line.startswith("Commit:"):
            blocks[-1]["commit"] = line.split(":", 1)[1].split()[0]
            blocks[-1]["notes"].append(line.split(":", 1)[1].strip().partition(" ")[2])
        elif "<-" in line and not in_notes:
            local, remote = (s.strip() for s in line.split("<-", 1))
            path, _, rest = remote.partition(" @ ")
            blocks[-1]["files"][local] = path.strip()
            if rest:
                blocks[-1]["file_commits"].add(rest.split()[0])
        elif line.startswith("Notes:"):
            in_notes = True
            blocks[-1]["notes"].append(line.split(":", 1)[1].strip())
        else:
            blocks[-1]["notes"].append(line)
    out = []
    for b in blocks:
        commit = b["commit"] or (sorted(b["file_commits"])[0] if len(b["file_commits"]) == 1 else None)
        notes = " ".join(n for n in b["notes"] if n).strip()
        out.append(ReferenceSource(b["repository"], commit, dict(sorted(b["files"].items())), notes))
    return tuple(out)


def build_entry(folder: Path, reference: Path) -> CorpusEntry:
    """The corpus entry of one reference folder."""
    caveats = caveats_for(folder.name)
    fingerprint = None
    if (folder / "dataset_fingerprint.json").is_file():
        fingerprint = import_nnunet_fingerprint(
            folder / "dataset_fingerprint.json", folder / "dataset.json", dataset_name=folder.name
        )
        fingerprint = replace(
            fingerprint, source=f"nnunet:{(folder / 'dataset_fingerprint.json').relative_to(reference)}"
        )
    elif (folder / "datastats_by_case.yaml").is_file():
        path = folder / "datastats_by_case.yaml"
        fingerprint = import_monai_datastats(
            path, channel_names=tuple(caveats.pop("channel_names")), dataset_name=folder.name
        )
        fingerprint = replace(fingerprint, source=f"monai:{path.relative_to(reference)}")
        caveats["notes"] = MONAI_NOTE
    decisions = {}
    for plans_file in sorted(folder.glob("*.json")):
        if plans_file.name in NOT_PLANS:
            continue
        dec = read_nnunet_plans(plans_file)
        preset = PLANNER_PRESETS.get(dec.planner, dec.planner)
        decisions[preset] = dec
    source = parse_source((folder / "SOURCE.txt").read_text()) if (folder / "SOURCE.txt").is_file() else ()
    return CorpusEntry(
        name=folder.name, source=source, fingerprint=fingerprint, nnunet_decisions=decisions, caveats=caveats
    )


WIDTH = 120


def render(value: Any, indent: int = 0) -> str:
    """JSON with every object or list that fits in ``WIDTH`` columns on one line (deterministic)."""
    flat = json.dumps(value, allow_nan=False)
    if not isinstance(value, (dict, list)) or not value or indent + len(flat) <= WIDTH:
        return flat
    pad = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{pad}{json.dumps(k)}: {render(v, indent + 2)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    return "[\n" + ",\n".join(pad + render(v, indent + 2) for v in value) + "\n" + " " * indent + "]"


def dumps(entry: CorpusEntry) -> str:
    """The entry as JSON; per-case fields an imported fingerprint lacks (None, their default) are left out."""
    data = to_jsonable(entry)
    if data["fingerprint"] is not None:
        data["fingerprint"]["cases"] = [
            {k: v for k, v in c.items() if v is not None} for c in data["fingerprint"]["cases"]
        ]
    return render(data) + "\n"


def match_rows(entry: CorpusEntry) -> list[tuple[str, str, str, str, str]]:
    """(preset, configuration, result, fields equal / compared, notes) per configuration of ``entry``'s plans."""
    rows = []
    edited = entry.caveats.get("hand_edited", {})
    for preset, dec in entry.nnunet_decisions.items():
        fingerprint, unchecked = entry.fingerprint, {}
        if fingerprint is None:  # plans-only 2D dataset: every case at the median (all its 2D plan depends on)
            n_cases = entry.caveats.get("n_cases")
            fingerprint = fingerprint_from_plans(dec, n_cases=n_cases or 400, n_labels=entry.caveats["n_labels"])
            if n_cases is None:
                unchecked["batch_size"] = "numTraining unknown (the 5% cap needs it); 400 cases assumed"
        plans = plan_nnunet(fingerprint, preset)
        for name, theirs in dec.configurations.items():
            hand = edited.get(preset, {}).get(name, [])
            ours = plans.configurations.get(name)
            if ours is None:
                rows.append((preset, name, "hand-edited" if hand else "MISSING", "", "; ".join(hand) or "not planned"))
                continue
            compared = sum(getattr(theirs, key) is not None for key in nnunet_view(ours))
            diff = compare_with_nnunet(ours, theirs)
            result, notes = _verdict(diff, hand, unchecked, entry)
            rows.append((preset, name, result, f"{compared - len(diff)}/{compared}", notes))
        for name in plans.configurations:
            if name not in dec.configurations:
                why = "; ".join(edited.get(preset, {}).get(name, [])) or "not in nnU-Net's file"
                rows.append((preset, name, "hand-edited" if name in edited.get(preset, {}) else "EXTRA", "", why))
    return rows


def _verdict(
    diff: dict[str, tuple[Any, Any]], hand: list[str], unchecked: dict[str, str], entry: CorpusEntry
) -> tuple[str, str]:
    """Result and notes of one configuration: differences a person made in nnU-Net's file, or that cannot be
    checked, are listed but do not count as mismatches."""
    unexplained = {k: v for k, v in diff.items() if k not in hand and k not in unchecked}
    notes = ["from the median image only (no fingerprint)"] if entry.fingerprint is None else []
    notes += [f"{k} not checked: {why}" for k, why in unchecked.items()]
    notes += [f"{k} edited by hand in nnU-Net's file: ours {a} vs {b}" for k, (a, b) in diff.items() if k in hand]
    if unexplained:
        return "MISMATCH", "; ".join([f"{k}: ours {a} vs {b}" for k, (a, b) in unexplained.items()] + notes)
    if unchecked or any(k in hand for k in diff):
        return "match*", "; ".join(notes)
    return "match", "; ".join(notes)


def write_match_table(entries: list[CorpusEntry], path: Path) -> tuple[int, int]:
    """Write the preset comparison as a markdown table; return (exact matches, configurations compared)."""
    lines = []
    n_match = n_total = 0
    for entry in entries:
        for preset, name, result, fields, why in match_rows(entry):
            if result in ("match", "match*", "MISMATCH"):
                n_total += 1
                n_match += result == "match"
            lines.append(f"| {entry.name} | {preset} | {name} | {result} | {fields} | {why} |")
    head = [
        "# nnU-Net preset match",
        "",
        "Generated by `python fingerprints/build.py --match-table benchmarks/results/nnunet_preset_match.md`:",
        "every `fingerprints/` entry with a fingerprint is planned with `autoseg.planning.nnunet.plan_nnunet` for",
        "each preset whose nnU-Net plans file is recorded, and each configuration is compared field by field with",
        "nnU-Net's file: spacing, patch size, batch size, median image size, normalisation schemes, mask use, batch",
        "Dice, network class, number of stages, strides, kernel sizes, features per stage, convolutions (blocks) per",
        "encoder and decoder stage, previous stage / inherits from (fields nnU-Net's file does not set are not",
        "compared). Plans-only 2D datasets (no fingerprint) are checked from their median image in",
        "`tests/planning/test_nnunet_preset.py::test_plans_only_2d_entries_match_from_their_median`.",
        "",
        f"**{n_match} of {n_total} configurations match exactly**; `match*` = identical except fields a person edited",
        "in nnU-Net's file or that cannot be checked (listed); `hand-edited` = a configuration a person added to or",
        "removed from nnU-Net's file.",
        "",
        "| dataset | preset | configuration | result | fields equal | notes |",
        "|---|---|---|---|---|---|",
    ]
    write_text_atomic(path, "\n".join(head + lines) + "\n")
    return n_match, n_total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--out", type=Path, default=Path("fingerprints"))
    parser.add_argument("--match-table", type=Path, default=None)
    args = parser.parse_args(argv)
    folders = sorted(p for p in (args.reference / "nnunet").iterdir() if p.is_dir())
    entries = []
    for folder in folders:
        entry = build_entry(folder, args.reference)
        if entry.fingerprint is None and not entry.nnunet_decisions:
            print(f"skipped {folder.name}: no fingerprint by case and no plans", file=sys.stderr)
            continue
        write_text_atomic(args.out / f"{folder.name}.json", dumps(entry))
        entries.append(entry)
    print(f"wrote {len(entries)} entries to {args.out}")
    if args.match_table:
        n_match, n_total = write_match_table(entries, args.match_table)
        print(f"{n_match}/{n_total} configurations match nnU-Net exactly; table in {args.match_table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
