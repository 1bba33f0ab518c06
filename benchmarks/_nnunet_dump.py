"""Run with nnU-Net's python: dump its preprocessed cases of FOLDER to OUT/<id>_data.npy and OUT/<id>_seg.npy.

    $NNUNET_PYTHON benchmarks/_nnunet_dump.py FOLDER OUT

Reads through nnU-Net's own dataset class, so whatever its storage format (blosc2 ``.b2nd`` or ``.npy``), the
arrays are the ones its trainer would see.
"""

import sys
from pathlib import Path

import numpy as np
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class


def main() -> None:
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    dataset = infer_dataset_class(str(folder))(str(folder))
    for identifier in dataset.identifiers:
        data, seg, _, _ = dataset.load_case(identifier)
        np.save(out / f"{identifier}_data.npy", np.asarray(data[:]))
        np.save(out / f"{identifier}_seg.npy", np.asarray(seg[:]))


if __name__ == "__main__":
    main()
