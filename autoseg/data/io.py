"""Reading and writing images with their geometry.

This is the only module that converts between SimpleITK's (x, y, z) world and autoseg's arrays, which are
(C, Z, Y, X) for images and (Z, Y, X) for label maps. Formats: NIfTI, NRRD, MetaImage (via SimpleITK), DICOM
series folders (SimpleITK/GDCM), 2D PNG/BMP/TIFF (grey, RGB or RGBA: colour components, like the C axis of an
ImageJ hyperstack, become channels) and 3D TIFF stacks whose spacing comes from a JSON sidecar
``{"spacing": [z, y, x]}`` named after the case.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.data.geometry import PLANAR_Z_SPACING_FACTOR, Geometry
from autoseg.errors import DatasetError, ImageReadError
from autoseg.files import atomic_path

__all__ = [
    "IMAGE_ENDINGS",
    "file_ending",
    "strip_ending",
    "is_dicom_series",
    "dicom_series_files",
    "read_image",
    "read_images",
    "read_label",
    "read_header",
    "read_channel_count",
    "write_image",
    "to_sitk",
]

log = logging.getLogger(__name__)

SITK_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".bmp")
TIFF_ENDINGS = (".tif", ".tiff")
IMAGE_ENDINGS = SITK_ENDINGS + TIFF_ENDINGS
_CHANNEL_SUFFIX = re.compile(r"_\d{4}$")


def file_ending(path: Path | str) -> str:
    """The image ending of ``path`` (``.nii.gz`` counts as one ending); '' for a folder or unknown file."""
    name = Path(path).name.lower()
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return ending
    return ""


def strip_ending(path: Path | str) -> str:
    """File name without its image ending (``case_0000.nii.gz`` -> ``case_0000``)."""
    name = Path(path).name
    ending = file_ending(path)
    return name[: len(name) - len(ending)] if ending else name


def _series_ids(path: Path) -> tuple[str, ...]:
    """DICOM series in folder ``path``, without ITK's console warning for a folder that holds none."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def is_dicom_series(path: Path) -> bool:
    """True when ``path`` is a folder that holds a DICOM series."""
    path = Path(path)
    return path.is_dir() and bool(_series_ids(path))


def dicom_series_files(path: Path | str) -> tuple[Path, ...]:
    """The files of the DICOM series read from folder ``path`` (the first series when it holds several), in the
    order GDCM sorts them (by position along the slice normal)."""
    path = Path(path)
    ids = _series_ids(path)
    if not ids:
        raise ImageReadError(f"{path}: folder holds no DICOM series")
    if len(ids) > 1:
        log.warning("%s holds %d DICOM series; reading the first (%s)", path, len(ids), ids[0])
    return tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path), ids[0]))


def _read_sitk(path: Path) -> sitk.Image:
    if not path.exists():
        raise ImageReadError(f"{path}: file not found")
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in dicom_series_files(path)])
        try:
            return reader.Execute()
        except RuntimeError as exc:
            raise ImageReadError(f"{path}: cannot read DICOM series ({_first_line(exc)})") from None
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageReadError(f"{path}: cannot read image ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _from_sitk(image: sitk.Image) -> tuple[np.ndarray, Geometry]:
    """SimpleITK image -> ((C, Z, Y, X) array, Geometry). The one place where axis orders are converted."""
    array = sitk.GetArrayFromImage(image)  # (z, y, x[, comp]) or (t, z, y, x) for 4D
    ndim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:  # vector pixels (RGB): components -> leading channel axis
        array = np.moveaxis(array, -1, 0)
    else:
        array = array[None] if ndim <= 3 else array
    spacing = tuple(float(s) for s in image.GetSpacing())
    origin = tuple(float(o) for o in image.GetOrigin())
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(ndim, ndim)
    if ndim == 4:  # MSD-style 4D: last ITK axis holds the channels
        spacing, origin, direction, ndim = spacing[:3], origin[:3], direction[:3, :3], 3
    if ndim == 2:
        array = array[:, None]
        spacing_zyx = (PLANAR_Z_SPACING_FACTOR * max(spacing), spacing[1], spacing[0])
    else:
        spacing_zyx = (spacing[2], spacing[1], spacing[0])
    geometry = Geometry(
        spacing_zyx=spacing_zyx,  # type: ignore[arg-type]
        shape_zyx=tuple(int(s) for s in array.shape[1:]),  # type: ignore[arg-type]
        origin_xyz=origin,
        direction_xyz=tuple(float(d) for d in direction.ravel()),
        ndim=ndim,
    )
    return array, geometry


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """(Z, Y, X) array + Geometry -> SimpleITK image with the geometry's spacing, origin and direction."""
    if array.ndim != 3 or tuple(array.shape) != tuple(geometry.shape_zyx):
        raise ValueError(f"array shape {array.shape} does not match geometry shape {geometry.shape_zyx}")
    if geometry.is_2d:
        image = sitk.GetImageFromArray(array[0])
        image.SetSpacing((geometry.spacing_zyx[2], geometry.spacing_zyx[1]))
    else:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in geometry.spacing_zyx[::-1]))
    image.SetOrigin(geometry.origin_xyz)
    image.SetDirection(geometry.direction_xyz)
    return image


def _tiff_sidecar(path: Path) -> Path | None:
    stem = strip_ending(path)
    for name in (stem, _CHANNEL_SUFFIX.sub("", stem)):
        candidate = path.with_name(name + ".json")
        if candidate.is_file():
            return candidate
    return None


def _tiff_channel_axis(path: Path, axes: str) -> int | None:
    """Index of the channel axis in tifffile's ``axes`` (S: colour samples, C: ImageJ channels), or None."""
    found = [i for i, a in enumerate(axes) if a in "SC"]
    if len(found) > 1:
        raise ImageReadError(f"{path}: unsupported TIFF layout (axes {axes}: both colour samples and channels)")
    return found[0] if found else None


def _read_tiff(path: Path) -> tuple[np.ndarray, Geometry]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, array = series.axes, series.asarray()
    except Exception as exc:  # tifffile raises many types for broken files
        raise ImageReadError(f"{path}: cannot read TIFF ({exc})") from None
    channel_axis = _tiff_channel_axis(path, axes)
    if channel_axis is not None:  # colour samples (S) or ImageJ channels (C) -> leading channel axis
        array = np.moveaxis(array, channel_axis, 0)
        axes = "C" + axes.replace(axes[channel_axis], "")
    else:
        array, axes = array[None], "C" + axes
    sidecar = _tiff_sidecar(path)
    if array.ndim == 3:  # 2D
        array = array[:, None]
        spacing: tuple[float, ...] = (1.0, 1.0)
        if sidecar is not None:
            spacing = tuple(float(s) for s in json.loads(sidecar.read_text())["spacing"])[-2:]
        spacing_zyx: tuple[float, ...] = (PLANAR_Z_SPACING_FACTOR * max(spacing), spacing[0], spacing[1])
        ndim = 2
    elif array.ndim == 4:
        if sidecar is None:
            raise ImageReadError(
                f"{path}: 3D TIFF without spacing; add {path.with_name(_CHANNEL_SUFFIX.sub('', strip_ending(path)))}"
                '.json with {"spacing": [z, y, x]} in mm'
            )
        spacing_zyx = tuple(float(s) for s in json.loads(sidecar.read_text())["spacing"])
        if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
            raise ImageReadError(f"{sidecar}: 'spacing' must be three positive numbers [z, y, x]")
        ndim = 3
    else:
        raise ImageReadError(f"{path}: unsupported TIFF layout (axes {axes})")
    origin = (0.0,) * ndim
    direction = tuple(np.eye(ndim).ravel().tolist())
    shape = tuple(int(s) for s in array.shape[1:])
    return array, Geometry(spacing_zyx, shape, origin, direction, ndim)  # type: ignore[arg-type]


def read_image(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Read one image file or DICOM series folder.

    Returns
    -------
    array : (C, Z, Y, X), the file's dtype. C > 1 for RGB images and 4D (MSD) files.
    geometry : spacing (z, y, x) in mm, origin, direction, shape.
    """
    path = Path(path)
    if file_ending(path) in TIFF_ENDINGS:
        return _read_tiff(path)
    if not path.is_dir() and file_ending(path) == "":
        raise ImageReadError(f"{path}: unsupported file type; supported: {', '.join(IMAGE_ENDINGS)} or a DICOM folder")
    return _from_sitk(_read_sitk(path))


def _header_reader(path: Path) -> sitk.ImageFileReader:
    """A SimpleITK reader that has read ``path``'s header (no voxels)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(f"{path}: cannot read image header ({_first_line(exc)})") from None
    return reader


def read_header(path: Path | str) -> Geometry:
    """Geometry of an image file from its header alone (no voxels read where the format allows)."""
    path = Path(path)
    if path.is_dir() or file_ending(path) in TIFF_ENDINGS:
        return read_image(path)[1]
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    reader = _header_reader(path)
    size = reader.GetSize()
    probe = sitk.Image([1] * len(size), reader.GetPixelID(), reader.GetNumberOfComponents())
    probe.SetSpacing(reader.GetSpacing())
    probe.SetOrigin(reader.GetOrigin())
    probe.SetDirection(reader.GetDirection())
    _, geometry = _from_sitk(probe)
    shape = tuple(int(s) for s in size[::-1][-3:]) if len(size) >= 3 else (1, int(size[1]), int(size[0]))
    return geometry.with_shape(shape)  # type: ignore[arg-type]


def read_channel_count(path: Path | str) -> int:
    """Number of channels in one image file or DICOM series folder, read from the header where the format allows.

    RGB PNG gives 3, RGBA 4, a 4D (MSD) NIfTI its fourth size, a TIFF the size of its colour-sample or ImageJ
    channel axis; every other image 1. The count equals ``read_image(path)[0].shape[0]``.
    """
    path = Path(path)
    if path.is_dir():
        return int(read_image(path)[0].shape[0])  # DICOM series: rare enough to read in full
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if file_ending(path) in TIFF_ENDINGS:
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                axes, shape = tif.series[0].axes, tif.series[0].shape
        except Exception as exc:  # tifffile raises many types for broken files
            raise ImageReadError(f"{path}: cannot read TIFF ({exc})") from None
        channel_axis = _tiff_channel_axis(path, axes)
        return 1 if channel_axis is None else int(shape[channel_axis])
    reader = _header_reader(path)
    if reader.GetNumberOfComponents() > 1:
        return int(reader.GetNumberOfComponents())
    return int(reader.GetSize()[3]) if reader.GetDimension() == 4 else 1


def read_images(paths: Sequence[Path]) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case and stack them: ((C, Z, Y, X) float32, geometry of the first file).

    Every file must have the same shape; a spacing mismatch raises too (the case would be ambiguous).
    """
    arrays, geometry = [], None
    for p in paths:
        array, geo = read_image(p)
        if geometry is None:
            geometry = geo
        elif geo.shape_zyx != geometry.shape_zyx:
            raise DatasetError(f"{p}: shape {geo.shape_zyx} differs from {paths[0]} {geometry.shape_zyx}")
        elif not np.allclose(geo.spacing_zyx, geometry.spacing_zyx, rtol=1e-3):
            raise DatasetError(f"{p}: spacing {geo.spacing_zyx} differs from {paths[0]} {geometry.spacing_zyx}")
        arrays.append(array.astype(np.float32, copy=False))
    if geometry is None:
        raise DatasetError("read_images: no image files given")
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)), geometry


def read_label(path: Path | str, reference: Geometry | None = None) -> tuple[np.ndarray, Geometry]:
    """Read a label map as a (Z, Y, X) integer array.

    With ``reference`` (the image's geometry), a label stored in another orientation of the same physical grid
    (axes flipped or permuted, as DICOM-derived exports often are) is mapped onto the image grid exactly, without
    interpolation. Raises ImageReadError for multi-channel or non-integer label files.
    """
    path = Path(path)
    if file_ending(path) in TIFF_ENDINGS:
        array, geometry = _read_tiff(path)
    else:
        image = _read_sitk(path)
        if reference is not None and reference.ndim == 3 == image.GetDimension():
            image = _orient_like(image, reference)
        array, geometry = _from_sitk(image)
    if array.shape[0] != 1:
        raise ImageReadError(f"{path}: label map has {array.shape[0]} channels; expected one")
    label = array[0]
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)):
            raise ImageReadError(f"{path}: label map contains NaN or Inf")
        rounded = np.rint(label)
        if not np.array_equal(rounded, label):
            bad = np.unique(label[rounded != label])[:5]
            raise ImageReadError(f"{path}: label map has non-integer values, e.g. {bad.tolist()}")
        label = rounded.astype(np.int32 if rounded.max(initial=0) > 255 else np.uint8)
    return label, geometry


def _orient_like(image: sitk.Image, reference: Geometry) -> sitk.Image:
    """Flip/permute ``image``'s axes so that its direction matches ``reference`` (exact; no interpolation).

    Only applied when the directions differ by a signed permutation and the result lands on the reference grid;
    otherwise ``image`` is returned unchanged and the caller reports the mismatch.
    """
    if np.allclose(image.GetDirection(), reference.direction_xyz, atol=1e-4):
        return image
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reference.direction_xyz)
    try:
        oriented = sitk.DICOMOrient(image, code)
    except RuntimeError:
        return image
    _, geometry = _from_sitk(oriented[:1, :1, :1])  # geometry of the reoriented grid, without copying voxels
    same = (
        tuple(oriented.GetSize()[::-1]) == tuple(reference.shape_zyx)
        and np.allclose(oriented.GetDirection(), reference.direction_xyz, atol=1e-4)
        and np.allclose(oriented.GetOrigin(), reference.origin_xyz, atol=1e-2 * min(reference.spacing_zyx))
        and np.allclose(geometry.spacing_zyx, reference.spacing_zyx, rtol=1e-4)
    )
    if not same:
        return image
    log.info(
        "label stored in orientation %s mapped exactly onto the image orientation %s",
        sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection()),
        code,
    )
    return oriented


def write_image(array: np.ndarray, geometry: Geometry, path: Path | str) -> None:
    """Write a (Z, Y, X) array (or (C, Z, Y, X) with C == 1) with ``geometry``, atomically.

    The format follows the ending of ``path``. PNG label maps are written as 8 or 16 bit; TIFF files get a JSON
    spacing sidecar.
    """
    path = Path(path)
    if array.ndim == 4:
        if array.shape[0] != 1:
            raise ValueError(f"write_image writes one channel; got {array.shape[0]}")
        array = array[0]
    ending = file_ending(path)
    if ending == "":
        raise DatasetError(f"{path}: unsupported output file type; use one of {', '.join(IMAGE_ENDINGS)}")
    if ending in (".png", ".bmp") and array.dtype not in (np.uint8, np.uint16):
        array = array.astype(np.uint8 if array.max(initial=0) < 256 else np.uint16)
    if ending in TIFF_ENDINGS:
        import tifffile

        def write_tiff(tmp: Path) -> None:
            tifffile.imwrite(tmp, array[0] if geometry.is_2d else array, compression="zlib")

        def write_sidecar(tmp: Path) -> None:
            spacing = list(geometry.spacing_zyx[1:] if geometry.is_2d else geometry.spacing_zyx)
            tmp.write_text(json.dumps({"spacing": spacing}))

        atomic_path(path, write_tiff)
        atomic_path(path.with_name(strip_ending(path) + ".json"), write_sidecar)
        return
    image = to_sitk(array, geometry)
    atomic_path(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))
