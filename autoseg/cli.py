"""The ``autoseg`` command: argument parsing only; every command calls one public function.

A user's data problem (an :class:`~autoseg.errors.AutosegError`) is printed as one clear message, without a
traceback, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from autoseg.errors import AutosegError

__all__ = ["main", "build_parser"]


@contextmanager
def _progress_bar(desc: str):
    """Yield a ``progress(done, total)`` callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, leave=True)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _cmd_synth(args: argparse.Namespace) -> int:
    from autoseg.data.synth import make_dataset

    out = make_dataset(args.out, args.kind, args.cases, test_cases=args.test_cases, seed=args.seed)
    print(f"wrote {args.cases} training and {args.test_cases} test cases ({args.kind}) to {out}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from autoseg.data.verify import verify_dataset

    with _progress_bar("verify") as progress:
        report = verify_dataset(args.data, workers=args.workers, progress=progress)
    for note in report.notes:
        print(f"note: {note}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    for error in report.errors:
        print(f"error: {error}")
    status = "OK" if report.ok else f"{len(report.errors)} error(s)"
    print(
        f"{args.data}: {report.n_cases} training case(s), label values {report.label_values}, "
        f"{len(report.warnings)} warning(s): {status}"
    )
    return 0 if report.ok else 1


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    out = Path(args.output) / "fingerprint.json"
    if args.from_nnunet:
        from autoseg.fingerprint_import import import_nnunet_fingerprint

        if not args.dataset_json:
            raise AutosegError("--from-nnunet needs --dataset-json (the dataset.json nnU-Net planned from)")
        fingerprint = import_nnunet_fingerprint(Path(args.from_nnunet), Path(args.dataset_json))
        fingerprint.save(out)
    else:
        from autoseg.fingerprint import extract_fingerprint

        if not args.data:
            raise AutosegError("give the dataset folder (autoseg fingerprint DATA -o RUN) or --from-nnunet FILE")
        with _progress_bar("fingerprint") as progress:
            fingerprint = extract_fingerprint(args.data, out, workers=args.workers, seed=args.seed, progress=progress)
    print(
        f"{out}: {fingerprint.n_cases} cases, {fingerprint.dim}D, median spacing (z, y, x) "
        f"{tuple(round(s, 3) for s in fingerprint.median_spacing)} mm, median shape after crop "
        f"{tuple(round(s) for s in fingerprint.median_shape_after_crop)}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``autoseg`` command (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="autoseg", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, Callable[[argparse.Namespace], int]] = {}

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        p.set_defaults(func=func)
        commands[name] = func
        return p

    p = add("synth", _cmd_synth, "write a synthetic dataset with known truth (nnU-Net v2 layout)")
    p.add_argument("out", type=Path, help="output dataset folder")
    p.add_argument("--kind", choices=["ct3d", "mr3d", "2d"], default="ct3d")
    p.add_argument("--cases", type=int, default=8, help="training cases (default 8)")
    p.add_argument("--test-cases", type=int, default=2, help="held-out cases in imagesTs/labelsTs (default 2)")
    p.add_argument("--seed", type=int, default=0)

    p = add("verify", _cmd_verify, "check a dataset folder and report every problem")
    p.add_argument("data", type=Path, help="dataset folder")
    p.add_argument("-j", "--workers", type=int, default=None, help="parallel workers (default: 2)")

    p = add("fingerprint", _cmd_fingerprint, "compute the dataset fingerprint (RUN/fingerprint.json)")
    p.add_argument("data", type=Path, nargs="?", help="dataset folder")
    p.add_argument("-o", "--output", type=Path, required=True, help="run folder")
    p.add_argument("-j", "--workers", type=int, default=None, help="parallel workers (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the foreground intensity sampling")
    p.add_argument("--from-nnunet", metavar="FILE", help="import an nnU-Net v2 dataset_fingerprint.json instead")
    p.add_argument("--dataset-json", metavar="FILE", help="the dataset.json that goes with --from-nnunet")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``autoseg`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except AutosegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
