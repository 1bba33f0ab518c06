"""Run with nnU-Net's python: throughput of nnU-Net v2's training data loader, built the way nnUNetTrainer does.

    nnUNet_preprocessed=... nnUNet_results=... $NNUNET_PYTHON benchmarks/_nnunet_loader.py PLANS DATASET_JSON \
        --workers 2 --warmup 10 --batches 100

Pieces as in ``nnUNetTrainer.get_dataloaders``: the trainer's deep-supervision scales, rotation / dummy-2D /
initial patch size, ``get_training_transforms`` (its full default augmentation), ``nnUNetDataLoader`` over every
preprocessed case, and ``NonDetMultiThreadedAugmenter`` with the trainer's ``num_cached`` and ``wait_time`` (no
pinned memory: the consumer is the CPU). Only the training loader is built (the trainer also starts a validation
loader, whose workers would compete for the cores). Prints one line ``RESULT {json}``.
"""

import argparse
import json
import time

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def build(plans_file: str, dataset_json: str, configuration: str, workers: int):
    plans = {**load_json(plans_file), "continue_training": False}  # as nnunetv2.run.run_training sets it
    trainer = nnUNetTrainer(plans, configuration, 0, load_json(dataset_json), torch.device("cpu"))
    trainer._set_batch_size_and_oversample()
    cm, lm = trainer.configuration_manager, trainer.label_manager
    scales = trainer._get_deep_supervision_scales()
    rotation, dummy_2d, initial_patch, mirror_axes = (
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    )
    transforms = trainer.get_training_transforms(
        cm.patch_size,
        rotation,
        scales,
        mirror_axes,
        dummy_2d,
        use_mask_for_norm=cm.use_mask_for_norm,
        is_cascaded=trainer.is_cascaded,
        foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None,
        ignore_label=lm.ignore_label,
    )
    folder = trainer.preprocessed_dataset_folder
    dataset = infer_dataset_class(folder)(folder)
    loader = nnUNetDataLoader(
        dataset,
        trainer.batch_size,
        initial_patch,
        cm.patch_size,
        lm,
        oversample_foreground_percent=trainer.oversample_foreground_percent,
        sampling_probabilities=None,
        pad_sides=None,
        transforms=transforms,
        probabilistic_oversampling=trainer.probabilistic_oversampling,
    )
    info = {
        "patch_size": list(cm.patch_size),
        "sampling_patch_size": [int(v) for v in initial_patch],
        "batch_size": trainer.batch_size,
        "dummy_2d": bool(dummy_2d),
        "cases": len(dataset.identifiers),
    }
    augmenter = NonDetMultiThreadedAugmenter(
        data_loader=loader,
        transform=None,
        num_processes=workers,
        num_cached=max(6, workers // 2),
        seeds=None,
        pin_memory=False,
        wait_time=0.002,
    )
    return augmenter, info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("plans")
    parser.add_argument("dataset_json")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args()

    start = time.perf_counter()
    augmenter, info = build(args.plans, args.dataset_json, args.configuration, args.workers)
    batch = next(augmenter)
    first = time.perf_counter() - start
    for _ in range(args.warmup):
        batch = next(augmenter)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        batch = next(augmenter)
    elapsed = time.perf_counter() - t0
    info.update(
        data_shape=list(batch["data"].shape),
        target_shapes=[list(t.shape) for t in batch["target"]],
        first_batch_s=round(first, 3),
        measured_s=round(elapsed, 3),
        batches_per_s=round(args.batches / elapsed, 3),
    )
    augmenter._finish()
    print("RESULT " + json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
