"""Image I/O keeps arrays and geometry exactly, for every supported format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoseg.data.geometry import Geometry
from autoseg.data.io import (
    file_ending,
    read_channel_count,
    read_header,
    read_image,
    read_images,
    read_label,
    strip_ending,
    write_image,
)
from autoseg.errors import DatasetError, ImageReadError
from tests.conftest import shared_data, tiny_geometry


def _rotation(angles) -> tuple[float, ...]:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return tuple((rx @ ry @ rz).ravel().tolist())


geometries = st.builds(
    lambda shape, spacing, origin, angles: Geometry(spacing, shape, origin, _rotation(angles), 3),
    st.tuples(*[st.integers(1, 9)] * 3),
    st.tuples(*[st.floats(0.1, 6.0)] * 3),
    st.tuples(*[st.floats(-500, 500)] * 3),
    st.tuples(*[st.floats(-np.pi, np.pi)] * 3),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geometry=geometries, ending=st.sampled_from([".nii.gz", ".nrrd", ".mha"]), seed=st.integers(0, 2**16))
def test_round_trip_keeps_array_and_geometry(tmp_path, geometry, ending, seed):
    array = np.random.default_rng(seed).normal(size=geometry.shape_zyx).astype(np.float32)
    path = tmp_path / f"img{ending}"
    write_image(array, geometry, path)
    back, geo = read_image(path)
    assert back.shape == (1, *geometry.shape_zyx)
    np.testing.assert_array_equal(back[0], array)
    assert geo.shape_zyx == geometry.shape_zyx
    # NIfTI stores geometry in float32 (qform/sform); others in double
    tol = 1e-4 if ending == ".nii.gz" else 1e-9
    np.testing.assert_allclose(geo.spacing_zyx, geometry.spacing_zyx, rtol=tol)
    np.testing.assert_allclose(geo.origin_xyz, geometry.origin_xyz, atol=tol * 500)
    np.testing.assert_allclose(geo.direction_xyz, geometry.direction_xyz, atol=tol * 10)
    assert read_header(path).same_grid(geo)


def test_axis_order_is_zyx(tmp_path):
    image = sitk.Image(13, 11, 7, sitk.sitkFloat32)  # x, y, z sizes
    image.SetSpacing((0.8, 0.7, 3.0))
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    array, geo = read_image(tmp_path / "a.nii.gz")
    assert array.shape == (1, 7, 11, 13)
    assert geo.shape_zyx == (7, 11, 13)
    assert geo.spacing_zyx == pytest.approx((3.0, 0.7, 0.8))


def test_2d_png_grey_and_rgb(tmp_path):
    grey = (np.arange(11 * 13) % 256).astype(np.uint8).reshape(1, 11, 13)
    geo = Geometry((999.0, 1.0, 1.0), (1, 11, 13), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), 2)
    write_image(grey, geo, tmp_path / "g.png")
    back, g = read_image(tmp_path / "g.png")
    assert back.shape == (1, 1, 11, 13) and g.ndim == 2 and g.is_2d
    np.testing.assert_array_equal(back[0], grey)
    rgb = np.stack([grey[0], grey[0] // 2, 255 - grey[0]], axis=-1)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "c.png"))
    back, g = read_image(tmp_path / "c.png")
    assert back.shape == (3, 1, 11, 13)
    np.testing.assert_array_equal(back[2, 0], 255 - grey[0])


def test_channel_count_from_the_header_matches_the_pixels(tmp_path):
    import tifffile

    rng = np.random.default_rng(2)
    colour = rng.integers(0, 256, (11, 13, 4)).astype(np.uint8)  # (y, x, components)
    files = {}
    for name, components in (("grey.png", 1), ("rgb.png", 3), ("rgba.png", 4)):
        pixels = colour[..., :components] if components > 1 else colour[..., 0]
        sitk.WriteImage(sitk.GetImageFromArray(pixels, isVector=components > 1), str(tmp_path / name))
        files[name] = components
    tifffile.imwrite(tmp_path / "rgb.tif", colour[..., :3])  # colour samples: axes YXS
    tifffile.imwrite(tmp_path / "hyper.tif", np.moveaxis(colour, -1, 0), imagej=True, metadata={"axes": "CYX"})
    files.update({"rgb.tif": 3, "hyper.tif": 4})
    msd = sitk.JoinSeries([sitk.GetImageFromArray(rng.normal(size=(7, 11, 13))) for _ in range(2)])
    sitk.WriteImage(msd, str(tmp_path / "msd.nii.gz"))
    files["msd.nii.gz"] = 2
    for name, components in files.items():
        assert read_channel_count(tmp_path / name) == components, name
        array, geometry = read_image(tmp_path / name)
        assert array.shape[0] == components, name
    hyper, geometry = read_image(tmp_path / "hyper.tif")  # ImageJ channels are channels, not a 3D stack
    assert hyper.shape == (4, 1, 11, 13) and geometry.is_2d
    np.testing.assert_array_equal(hyper[2, 0], colour[..., 2])
    with pytest.raises(ImageReadError, match="nope.png: file not found"):
        read_channel_count(tmp_path / "nope.png")


def test_3d_tiff_needs_sidecar_spacing(tmp_path):
    import tifffile

    array = np.random.default_rng(0).integers(0, 100, (7, 11, 13)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "case_0000.tif", array)
    with pytest.raises(ImageReadError, match="case.json"):
        read_image(tmp_path / "case_0000.tif")
    (tmp_path / "case.json").write_text(json.dumps({"spacing": [3.0, 0.7, 0.8]}))
    back, geo = read_image(tmp_path / "case_0000.tif")
    np.testing.assert_array_equal(back[0], array)
    assert geo.spacing_zyx == (3.0, 0.7, 0.8) and geo.ndim == 3
    write_image(array, geo, tmp_path / "out.tif")
    again, geo2 = read_image(tmp_path / "out.tif")
    np.testing.assert_array_equal(again[0], array)
    assert geo2.spacing_zyx == geo.spacing_zyx


def test_msd_4d_channels(tmp_path):
    array = np.random.default_rng(1).normal(size=(2, 7, 11, 13)).astype(np.float32)
    image = sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])  # 4D: ITK (x, y, z, t)
    image.SetSpacing((0.8, 0.7, 3.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "msd.nii.gz"))
    back, geo = read_image(tmp_path / "msd.nii.gz")
    assert back.shape == (2, 7, 11, 13)
    np.testing.assert_allclose(back, array)
    assert geo.spacing_zyx == pytest.approx((3.0, 0.7, 0.8)) and len(geo.direction_xyz) == 9


def test_read_images_stacks_channels_and_rejects_mismatch(tmp_path):
    geo = tiny_geometry()
    write_image(np.zeros(geo.shape_zyx, np.float32), geo, tmp_path / "a_0000.nii.gz")
    write_image(np.ones(geo.shape_zyx, np.float32), geo, tmp_path / "a_0001.nii.gz")
    stacked, _ = read_images([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"])
    assert stacked.shape == (2, 7, 11, 13) and stacked.dtype == np.float32
    other = tiny_geometry(shape=(7, 11, 12))
    write_image(np.ones(other.shape_zyx, np.float32), other, tmp_path / "a_0002.nii.gz")
    with pytest.raises(DatasetError, match="a_0002"):
        read_images([tmp_path / "a_0000.nii.gz", tmp_path / "a_0002.nii.gz"])


def test_label_rejects_non_integer_values(tmp_path):
    geo = tiny_geometry()
    write_image(np.full(geo.shape_zyx, 0.5, np.float32), geo, tmp_path / "l.nii.gz")
    with pytest.raises(ImageReadError, match="non-integer"):
        read_label(tmp_path / "l.nii.gz")
    write_image(np.full(geo.shape_zyx, 2.0, np.float32), geo, tmp_path / "ok.nii.gz")
    label, _ = read_label(tmp_path / "ok.nii.gz")
    assert np.issubdtype(label.dtype, np.integer) and label.max() == 2


def test_label_in_flipped_orientation_maps_exactly(tmp_path):
    geo = tiny_geometry()
    label = np.zeros(geo.shape_zyx, np.uint8)
    label[1, 2, 3] = 1
    label[5, 9, 11] = 2
    image = sitk.GetImageFromArray(label)
    image.SetSpacing(geo.spacing_zyx[::-1])
    image.SetOrigin(geo.origin_xyz)
    flipped = sitk.Flip(image, (False, True, True))  # same physical grid, y and z axes stored reversed
    sitk.WriteImage(flipped, str(tmp_path / "flipped.nii.gz"))
    assert not read_header(tmp_path / "flipped.nii.gz").same_grid(geo)
    mapped, mapped_geo = read_label(tmp_path / "flipped.nii.gz", reference=geo)
    np.testing.assert_array_equal(mapped, label)
    assert mapped_geo.same_grid(geo)


def test_bad_files_name_the_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.nii.gz: file is empty"):
        read_image(tmp_path / "empty.nii.gz")
    (tmp_path / "junk.nrrd").write_text("junk")
    with pytest.raises(ImageReadError, match="junk.nrrd"):
        read_image(tmp_path / "junk.nrrd")
    with pytest.raises(ImageReadError, match="unsupported"):
        read_image(tmp_path / "x.xyz")


def test_endings():
    assert file_ending("a/b_0000.nii.gz") == ".nii.gz"
    assert strip_ending("b_0000.nii.gz") == "b_0000"
    assert file_ending("x.NRRD") == ".nrrd"


def test_dicom_series_and_its_flipped_label():
    series = shared_data("totalseg_dicom", "example_ct_dicom")
    image, geo = read_image(series)
    assert image.shape == (1, 20, 512, 512)
    assert geo.spacing_zyx == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert image.min() < -900  # HU, rescale applied
    label_path = series.parent / "example_seg_dicom.nii.gz"
    raw, raw_geo = read_label(label_path)
    assert raw_geo.direction_xyz[4] == -1.0
    label, label_geo = read_label(label_path, reference=geo)
    assert label_geo.same_grid(geo)
    np.testing.assert_array_equal(label, raw[:, ::-1, :])  # an exact flip of y, no interpolation
    assert set(np.unique(label)) == set(np.unique(raw))


@pytest.mark.parametrize("case", ["brain1", "lung2"])
def test_real_nrrd_round_trip(tmp_path, case):
    path = shared_data("pyradiomics", f"{case}_image.nrrd")
    image, geo = read_image(path)
    write_image(image[0], geo, tmp_path / "copy.nrrd")
    back, geo2 = read_image(tmp_path / "copy.nrrd")
    np.testing.assert_array_equal(back, image)
    assert geo2 == geo
