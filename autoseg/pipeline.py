"""``autoseg run``: every stage from a dataset folder to ``selection.json``, each skipping finished work.

fingerprint (skipped when the inputs are unchanged) -> plan (an existing plans.json is kept, so hand edits and
search results survive) -> preprocess (finished cases skipped) -> [search] -> train every configuration x fold
(finished folds skipped, interrupted ones resumed) -> select -> ``RUN/report.html``. Kill it anywhere; running it
again resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from autoseg.errors import ConfigError, TrainingError
from autoseg.fingerprint import extract_fingerprint
from autoseg.inference.validation import predict_validation
from autoseg.planning.overrides import apply_overrides
from autoseg.planning.planner import plan_run
from autoseg.planning.plans import Plans, load_plans
from autoseg.preprocessing.preprocess import preprocess
from autoseg.runfolder import RunFolder, record_dataset
from autoseg.training.distributed import is_main_process
from autoseg.training.executors import ExecutorOptions, make_executor
from autoseg.training.jobs import Job, JobSpec, detect_devices, job_task, run_jobs
from autoseg.training.splits import load_or_make_splits
from autoseg.training.trainer import TrainOptions, train_fold

__all__ = ["fold_finished", "resume_summary", "run_pipeline", "train_and_validate", "train_jobs"]

log = logging.getLogger(__name__)

Progress = Callable[[str], Callable[[int, int], None] | None]


def fold_finished(run_dir: Path | str, config: str, fold: str, *, validate: bool = True) -> bool:
    """The fold's final checkpoint exists and, for a cross-validation fold, its validation cases are predicted
    and evaluated (a run killed between the two predicts them when it is run again)."""
    run = RunFolder(run_dir)
    if not run.checkpoint(config, fold).is_file():
        return False
    return not validate or fold == "all" or (run.validation(config, fold) / "summary.json").is_file()


def train_and_validate(
    run_dir: Path | str,
    config: str,
    fold: str,
    *,
    plans: Plans,
    overrides: Sequence[str] = (),
    options: TrainOptions | None = None,
    validate: bool = True,
) -> None:
    """One (configuration, fold) job: :func:`train_fold` (resumed if interrupted), then, on the main process, the
    full-resolution prediction and evaluation of the fold's validation cases (resumed case by case)."""
    options = options or TrainOptions()
    train_fold(run_dir, config, fold, plans=plans, overrides=overrides, options=options)
    if not is_main_process() or fold_finished(run_dir, config, fold, validate=validate):
        return
    if RunFolder(run_dir).checkpoint(config, fold).is_file():  # not stopped early
        predict_validation(run_dir, apply_overrides(plans, overrides), config, fold, device=options.device)


def _cascade_waves(
    plans: Plans, names: Sequence[str], folds: Sequence[str] | str
) -> list[tuple[list[str], Sequence[str] | str]]:
    """Groups of configurations trained one group after the other: cascade stages last, after every
    cross-validation fold of their previous stages (whose out-of-fold predictions are their training input)."""
    later = [n for n in names if plans.configurations[n].previous_stage]
    if not later:
        return [(list(names), folds)]
    first = [n for n in names if n not in later]
    stages = list(dict.fromkeys(str(plans.configurations[n].previous_stage) for n in later))
    waves: list[tuple[list[str], Sequence[str] | str]] = [(first, folds)] if first else []
    return [*waves, (stages, "cv"), (later, folds)]


def train_jobs(
    run_dir: Path,
    plans: Plans,
    configs: Sequence[str] | None,
    folds: Sequence[str] | str,
    *,
    devices: str | None = None,
    overrides: Sequence[str] = (),
    in_process: bool | None = None,
    options: TrainOptions | None = None,
    validate: bool = True,
    progress: Callable[[int, int], None] | None = None,
    executor: ExecutorOptions | None = None,
) -> None:
    """Train (configuration, fold) jobs that are not finished (:func:`fold_finished`): in this process on a CPU,
    else spread on GPUs; or, with a cluster ``executor`` (Ray, SLURM), one task each there, placed by the engine.
    Each job is :func:`train_and_validate` (``validate`` False skips the validation cases); ``progress(done,
    total)`` is called as jobs end.

    ``overrides`` (``key=value``) are applied to ``plans`` by each job, which records them with its fold.
    """
    options = options or TrainOptions()
    apply_overrides(plans, overrides)  # checked here, before any job starts
    # a cascade stage trains on its previous stage's out-of-fold predictions: that stage's folds first
    for names, wave_folds in _cascade_waves(plans, list(configs or plans.configurations), folds):
        _train_wave(
            run_dir, plans, names, wave_folds, devices, overrides, in_process, options, validate, progress, executor
        )


def _train_wave(
    run_dir: Path,
    plans: Plans,
    names: list[str],
    folds: Sequence[str] | str,
    devices: str | None,
    overrides: Sequence[str],
    in_process: bool | None,
    options: TrainOptions,
    validate: bool,
    progress: Callable[[int, int], None] | None,
    executor: ExecutorOptions | None,
) -> None:
    """:func:`train_jobs` for configurations that do not depend on one another."""
    from autoseg.preprocessing.store import list_cases, preprocessed_folder

    effective = apply_overrides(plans, overrides)
    cases = list_cases(preprocessed_folder(run_dir, names[0]))
    splits = load_or_make_splits(run_dir, cases)
    if folds in ("cv", ["cv"]):  # the plan's folds: every cross-validation fold, or one model on all cases
        fold_list = [str(f) for f in range(splits.n_folds)] if plans.cross_validation else ["all"]
    else:
        fold_list = [str(f) for f in folds]
    jobs = [
        Job(c, f, effective.configurations[c].training.gpus_per_job)
        for c in names
        for f in fold_list
        if not fold_finished(run_dir, c, f, validate=validate)
    ]
    if not jobs:
        log.info("every requested fold is trained")
        return
    if progress is not None:
        progress(0, len(jobs))
    if executor is not None and executor.name != "local":
        _run_on_cluster(run_dir, plans, jobs, executor, overrides, options.workers, validate, progress)
        return
    device_list = detect_devices(devices)
    if in_process or (in_process is None and device_list == ["cpu"]):
        for done, job in enumerate(jobs, 1):
            train_and_validate(
                run_dir,
                job.config,
                job.fold,
                plans=plans,
                overrides=overrides,
                options=TrainOptions(device=device_list[0], workers=options.workers),
                validate=validate,
            )
            if progress is not None:
                progress(done, len(jobs))
        return
    results = run_jobs(
        run_dir, jobs, device_list, overrides=overrides, workers=options.workers, validate=validate, progress=progress
    )
    _check_results([(f"{r.job.config} fold {r.job.fold}", r.log, r.ok) for r in results])


def _run_on_cluster(
    run_dir: Path,
    plans: Plans,
    jobs: Sequence[Job],
    executor: ExecutorOptions,
    overrides: Sequence[str],
    workers: int | None,
    validate: bool,
    progress: Callable[[int, int], None] | None,
) -> None:
    """Each job as a task of the cluster ``executor``, with the plan's GPUs per job (none for a CPU plan)."""
    run_dir = run_dir.resolve()  # workers start elsewhere
    runner = make_executor(executor, run_dir)
    settings = (tuple(overrides), "auto", workers, validate)
    tasks = [
        job_task(JobSpec(str(run_dir), j.config, j.fold, *settings), j.gpus if plans.device.kind == "cuda" else 0)
        for j in jobs
    ]
    try:
        results = runner.run(tasks, progress)
    finally:
        runner.close()
    _check_results([(r.task.name, r.task.log, r.ok) for r in results])


def _check_results(results: Sequence[tuple[str, Path, bool]]) -> None:
    """Raise TrainingError naming every failed job (name, log, ok) and its log."""
    failed = [(name, path) for name, path, ok in results if not ok]
    if failed:
        raise TrainingError(
            f"{len(failed)} of {len(results)} training job(s) failed: "
            + ", ".join(f"{name} (log {path})" for name, path in failed)
        )


def resume_summary(run_dir: Path | str) -> str | None:
    """Where ``autoseg run`` on ``run_dir`` resumes (what is finished, which folds stopped at which epoch), or None
    for a new run folder."""
    from autoseg.preprocessing.store import list_cases

    run_dir = Path(run_dir)
    run = RunFolder(run_dir)
    if not run.fingerprint.is_file():
        return None
    done = ["fingerprint"]
    if not run.plans.is_file():
        return "resuming after the fingerprint: planning next"
    done.append("plan")
    stored = {f.name: len(list_cases(f)) for f in sorted(run.preprocessed_root.glob("*")) if f.is_dir()}
    if stored:
        done.append("preprocessed " + ", ".join(f"{n} ({k} cases)" for n, k in stored.items()))
    finished, partial = [], []
    for folder in sorted(run.models.glob("*/fold_*")):
        name = f"{folder.parent.name} {folder.name}"
        if (folder / "checkpoint_final.pt").is_file():
            finished.append(name)
        elif (folder / "checkpoint_latest.pt").is_file() and (folder / "log.jsonl").is_file():
            partial.append(f"{name} at epoch {len((folder / 'log.jsonl').read_text().splitlines())}")
    if finished:
        done.append(f"{len(finished)} fold(s) trained ({', '.join(finished)})")
    text = "done: " + "; ".join(done)
    if partial:
        text += "; resuming " + ", ".join(partial)
    return text


def run_pipeline(
    data_dir: Path | str,
    run_dir: Path | str,
    *,
    device: str = "auto",
    gpu_memory_gb: float | None = None,
    time_budget_hours: float | None = None,
    preset: str = "default",
    overrides: Sequence[str] = (),
    configs: Sequence[str] | None = None,
    folds: Sequence[str] | str = "cv",
    devices: str | None = None,
    workers: int | None = None,
    search_trials: int = 0,
    search_hours: float | None = None,
    n_folds: int = 5,
    cross_validation: bool | None = None,
    progress: Progress | None = None,
    like: Plans | None = None,
    executor: ExecutorOptions | None = None,
    search_workers: int = 2,
):
    """Run every stage up to ``select`` and write the report; returns the Selection (None when nothing is selected).

    ``executor``: where the search workers (``search_workers`` of them) and the training jobs run (default: this
    machine); the stages before and ``select`` run here."""
    from autoseg.inference.select import select

    data_dir, run_dir = Path(data_dir), Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_dataset(run_dir, data_dir)
    extract_fingerprint(
        data_dir,
        RunFolder(run_dir).fingerprint,
        workers=workers,
        progress=progress("fingerprint") if progress else None,
    )
    if RunFolder(run_dir).plans.is_file():
        log.info("%s exists: keeping it (delete it to plan again)", RunFolder(run_dir).plans)
    else:
        plan_run(
            run_dir,
            n_folds=n_folds,
            cross_validation=cross_validation,
            preset=preset,
            device=device,
            gpu_memory_gb=gpu_memory_gb,
            time_budget_hours=time_budget_hours,
            overrides=overrides,
            like=like,
        )
    plans = load_plans(run_dir)
    names = list(configs or plans.configurations)
    missing = [c for c in names if c not in plans.configurations]
    if missing:
        raise ConfigError(
            f"--configs {missing}: not in {run_dir / 'plans.json'} (planned: {list(plans.configurations)}; a small "
            "--time-budget plans one configuration)"
        )
    stages = [str(plans.configurations[n].previous_stage) for n in names if plans.configurations[n].previous_stage]
    preprocess(
        run_dir,
        configurations=list(dict.fromkeys([*names, *stages])),
        workers=workers,
        data_dir=data_dir,
        progress=progress("preprocess") if progress else None,
    )
    from autoseg.preprocessing.store import list_cases, preprocessed_folder

    load_or_make_splits(run_dir, list_cases(preprocessed_folder(run_dir, names[0])), n_folds=n_folds)
    if search_trials or search_hours:
        from autoseg.search import search

        # only what was preprocessed competes; one name fixes the configuration, several are searched over
        alone = [n for n in names if not plans.configurations[n].previous_stage]  # a cascade stage is not searched
        search(
            run_dir,
            trials=search_trials or None,
            time_budget_hours=search_hours,
            config=alone,
            device=device,
            executor=executor,
            search_workers=search_workers,
        )
        plans = load_plans(run_dir)
    train_jobs(
        run_dir,
        plans,
        names,
        folds,
        devices=devices,
        options=TrainOptions(device=device),
        progress=progress("train (jobs)") if progress else None,
        executor=executor,
    )
    selection = None
    if not plans.cross_validation and folds in ("cv", ["cv"]):
        log.warning("the plan trains one model on all cases (small time budget): no cross-validation to select from")
    elif folds not in ("cv", ["cv"]):
        log.info("only folds %s trained: selection needs all cross-validation folds; skipped", list(folds))
    else:
        selection = select(run_dir, configurations=names)
    _write_report(run_dir)
    return selection


def _write_report(run_dir: Path) -> None:
    """``RUN/report.html``; a failure is logged, not raised: the trained models and the selection stand without it."""
    from autoseg.export.report import write_report

    try:
        log.info("report written to %s", write_report(run_dir))
    except Exception as exc:  # the report reads every artifact; none of its faults may fail a finished run
        log.warning("the report could not be written (%s); retry with `autoseg report %s`", exc, run_dir)
