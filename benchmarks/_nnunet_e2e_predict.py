"""Run by nnU-Net's own Python (``NNUNET_PYTHON``): what ``nnUNetv2_predict -device cpu`` does, on one thread.

    python _nnunet_e2e_predict.py MODEL_FOLDER FOLD CHECKPOINT INPUT_FOLDER OUTPUT_FOLDER

``nnUNetv2_predict -device cpu`` sets torch to one thread per core of the machine, which oversubscribes a process
pinned to one core; everything else is its default (step 0.5, Gaussian weighting, mirroring on). Cases are
predicted in this process, one after another (``-npp 0 -nps 0``), like autoseg's predictor.
"""

import os
import sys

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor


def main() -> None:
    model, fold, checkpoint, inputs, outputs = sys.argv[1:6]
    torch.set_num_threads(1)
    os.makedirs(outputs, exist_ok=True)
    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,  # what nnU-Net falls back to on a CPU
        device=torch.device("cpu"),
        verbose=False,
        verbose_preprocessing=False,
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(model, (fold,), checkpoint_name=checkpoint)
    predictor.predict_from_files_sequential(inputs, outputs, save_probabilities=False, overwrite=True)


if __name__ == "__main__":
    main()
