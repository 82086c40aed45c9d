"""LungMask / LungMaskd / segment_lungs on chest phantoms with known lungs and on the real CT series,
whole and made into partial-lung scans (lung bases, gas below the diaphragm, a small field of view)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from scipy import ndimage

from benchmarks.partial_lung_cases import PartialLungCase, abdomen_without_lung, partial_lung_cases
from transforms import (
    InvalidVolumeError,
    LungMask,
    LungMaskD,
    LungMaskd,
    LungMaskDict,
    NoLungFoundError,
    find_lungs,
    segment_lungs,
)

SPACING = (3.5, 3.5, 6.0)
SHAPE = (96, 96, 32)


@dataclass
class Phantom:
    """A synthetic chest CT in HU with its true lungs and the structures the mask must (not) take in."""

    hu: np.ndarray
    lungs: np.ndarray
    heart: np.ndarray
    nodule_in_lung: np.ndarray
    other_air: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        return np.diag([*SPACING, 1.0])


def make_phantom(seed: int = 0, airway_bridge: bool = False, noise_hu: float = 60.0) -> Phantom:
    """A 336 x 336 x 192 mm chest: soft-tissue body, two lungs (-850 HU, vessels, noise) bitten by the heart,
    a juxtapleural nodule, a trachea, a bowel gas bubble, a table with a hollow core and air outside a
    circular field of view, with Gaussian noise of ``noise_hu``. ``airway_bridge`` joins both lungs through
    the trachea and main bronchi."""
    rng = np.random.default_rng(seed)
    axes = (
        (np.arange(n) - (n - 1) / 2) * s for n, s in zip(SHAPE, SPACING, strict=True)
    )  # mm from the centre
    x, y, z = np.meshgrid(*axes, indexing="ij")

    def ellipsoid(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1.0

    body = (x / 150.0) ** 2 + (y / 105.0) ** 2 <= 1.0
    heart = ellipsoid(5, 15, -10, 55, 50, 60)  # the lungs wrap around it
    right_lung = ellipsoid(-62, -5, 5, 60, 72, 80) & ~heart
    lungs = right_lung | (ellipsoid(62, -5, 5, 60, 72, 80) & ~heart)
    nodule = ellipsoid(-122, -5, 10, 12, 12, 12)  # on the lateral edge of the right lung
    vessels = (ellipsoid(-60, 10, 0, 4, 4, 30) | ellipsoid(65, -20, 20, 4, 30, 4)) & lungs
    trachea = ((x**2 + (y + 25) ** 2) <= 9.0**2) & (z > 50)
    bowel_gas = ellipsoid(40, 20, -85, 18, 18, 10)
    table = (np.abs(x) <= 140) & (y >= 120) & (y <= 138)
    table_core = (np.abs(x) <= 30) & (y >= 126) & (y <= 132)
    outside_fov = x**2 + y**2 > 166.0**2

    hu = np.full(SHAPE, -1000.0)
    hu[body] = 40.0
    hu[lungs] = -850.0
    hu[vessels | (nodule & body)] = 40.0
    hu[trachea | bowel_gas] = -1000.0
    if airway_bridge:
        bronchi = (np.abs(y + 25) <= 8) & (np.abs(z - 50) <= 8) & (np.abs(x) <= 80)
        hu[bronchi & ~lungs] = -1000.0
    hu[table] = 300.0
    hu[table_core] = -1000.0
    hu += rng.normal(0.0, noise_hu, SHAPE)
    hu[outside_fov] = -2048.0
    return Phantom(
        hu=hu.astype(np.float32),
        lungs=lungs,
        heart=heart & ~lungs,
        nodule_in_lung=nodule & right_lung,
        other_air=trachea | bowel_gas | table_core,
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def voxel_litres() -> float:
    return float(np.prod(SPACING)) / 1e6


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom()


def as_meta_tensor(phantom: Phantom, filename: str = "phantom.nii.gz") -> MetaTensor:
    return MetaTensor(
        torch.from_numpy(phantom.hu[None]),
        affine=torch.from_numpy(phantom.affine),
        meta={"filename_or_obj": filename},
    )


@pytest.mark.parametrize("noise_hu", [60.0, 150.0])
@pytest.mark.parametrize("airway_bridge", [False, True], ids=["separate", "joined_by_airways"])
def test_phantom_lungs_match_truth(airway_bridge, noise_hu):
    phantom = make_phantom(seed=1, airway_bridge=airway_bridge, noise_hu=noise_hu)
    result = find_lungs(phantom.hu, SPACING, dilation_mm=0.0)
    assert dice(result.mask, phantom.lungs) >= 0.95
    assert result.num_lungs == 2
    assert result.lung_volume_l == pytest.approx(np.count_nonzero(phantom.lungs) * voxel_litres(), rel=0.05)


def test_hull_fills_juxtapleural_nodule_but_not_heart(phantom):
    def covered(mask, part):
        return np.count_nonzero(mask & part) / np.count_nonzero(part)

    lungs = segment_lungs(phantom.hu, SPACING, dilation_mm=0.0)
    without_hull = segment_lungs(phantom.hu, SPACING, dilation_mm=0.0, max_hull_ratio=1.0)
    unlimited_hull = segment_lungs(phantom.hu, SPACING, dilation_mm=0.0, max_hull_depth_mm=np.inf)
    assert covered(without_hull, phantom.nodule_in_lung) == 0.0
    assert covered(lungs, phantom.nodule_in_lung) >= 0.6  # all but the lung's outermost pixel column
    assert covered(unlimited_hull, phantom.heart) >= 0.3  # a lung's plain convex hull swallows the heart
    assert covered(lungs, phantom.heart) <= 0.06  # only the rim of shallow parts of the bite


def test_other_air_inside_the_body_is_left_out(phantom):
    lungs = segment_lungs(phantom.hu, SPACING, dilation_mm=0.0)
    assert not np.any(lungs & phantom.other_air)  # trachea, bowel gas, the table's hollow core


@pytest.mark.parametrize("radius_mm", [5.0, 7.0])
def test_dilation_is_a_ball_in_millimetres(phantom, radius_mm):
    lungs = segment_lungs(phantom.hu, SPACING, dilation_mm=0.0)
    dilated = segment_lungs(phantom.hu, SPACING, dilation_mm=radius_mm)
    expected = ndimage.distance_transform_edt(~lungs, sampling=SPACING) <= radius_mm + 1e-6
    np.testing.assert_array_equal(dilated, expected)
    # 6 mm slices: a 5 mm ball does not reach the next slice, a 7 mm ball does.
    top = np.flatnonzero(lungs.any(axis=(0, 1))).max()
    assert dilated[:, :, top + 1].any() == (radius_mm >= SPACING[2])


def test_array_transform_keeps_type_and_meta(phantom):
    image = as_meta_tensor(phantom)
    mask = LungMask()(image)
    assert isinstance(mask, MetaTensor)
    assert mask.dtype == torch.uint8 and tuple(mask.shape) == (1, *SHAPE)
    assert set(torch.unique(mask).tolist()) == {0, 1}
    torch.testing.assert_close(mask.affine, image.affine)
    assert mask.meta["filename_or_obj"] == "phantom.nii.gz"
    expected_l = np.count_nonzero(phantom.lungs) * voxel_litres()
    assert mask.meta["lung_volume_l"] == pytest.approx(expected_l, rel=0.05)
    assert mask.meta["lung_mask_warning"] == ""
    assert "lung_volume_l" not in image.meta
    assert np.all(mask[0].numpy().astype(bool) >= phantom.lungs)  # the dilated mask covers the lungs


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_array_transform_plain_arrays(phantom, kind):
    image = phantom.hu[None] if kind == "numpy" else torch.from_numpy(phantom.hu[None])
    reference = LungMask()(as_meta_tensor(phantom))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = LungMask(spacing_mm=SPACING)(image)
    assert type(mask) is type(image)
    assert mask.dtype in (np.uint8, torch.uint8)
    np.testing.assert_array_equal(np.asarray(mask), reference.numpy())


def test_spacing_comes_from_affine(phantom):
    image = as_meta_tensor(phantom)
    image.affine = torch.diag(torch.tensor([7.0, 7.0, 12.0, 1.0], dtype=torch.float64))
    mask = LungMask(dilation_mm=0.0, lung_volume_l=(0.1, 50.0))(image)
    expected_l = 8 * np.count_nonzero(phantom.lungs) * voxel_litres()
    assert mask.meta["lung_volume_l"] == pytest.approx(expected_l, rel=0.05)


def test_unknown_spacing_warns_and_uses_1mm(phantom):
    options = {"lung_volume_l": (0.001, 12.0), "min_component_ml": 0.01}
    with pytest.warns(UserWarning, match="assuming 1 mm"):
        mask = LungMask(**options)(phantom.hu[None])
    np.testing.assert_array_equal(mask, LungMask(spacing_mm=(1.0, 1.0, 1.0), **options)(phantom.hu[None]))


def test_dictionary_transform(phantom):
    data = {"image": as_meta_tensor(phantom), "label": 1}
    for transform in (LungMaskd(), LungMaskD(keys="image"), LungMaskDict("image", mask_key="mask")):
        out = transform(data)
        assert out["image"] is data["image"] and "mask" not in data
        assert out["mask"].shape == (1, *SHAPE) and out["mask"].meta["lung_volume_l"] > 1.0
    assert LungMaskd(keys=("image", "ct"), mask_key=("mask", "ct_mask"), allow_missing_keys=True)(
        data
    ).keys() == {
        "image",
        "label",
        "mask",
    }
    with pytest.raises(KeyError):
        LungMaskd(keys="ct")(data)


def test_no_lung_raises_with_file_name():
    hu = np.full((1, *SHAPE), 40.0, dtype=np.float32)
    hu[..., :2] = -1000.0
    image = MetaTensor(torch.from_numpy(hu), meta={"filename_or_obj": "/data/abdomen.nii.gz"})
    with pytest.raises(NoLungFoundError, match=r"abdomen\.nii\.gz: no lung found"):
        LungMask()(image)
    assert issubclass(NoLungFoundError, InvalidVolumeError)


def test_no_lung_full_option_returns_ones_and_records_warning(phantom):
    hu = np.full((1, *SHAPE), 40.0, dtype=np.float32)
    hu[..., :2] = -1000.0
    image = MetaTensor(torch.from_numpy(hu), meta={"filename_or_obj": "abdomen.nii.gz"})
    masker = LungMask(on_failure="full")
    with pytest.warns(UserWarning, match="no lung found"):
        mask = masker(image)
    assert bool(torch.all(mask == 1))
    assert "no lung found" in mask.meta["lung_mask_warning"]
    assert np.isnan(mask.meta["lung_volume_l"])
    batch = list_data_collate([{"mask": masker(as_meta_tensor(phantom))}, {"mask": mask}])
    assert batch["mask"].shape == (2, 1, *SHAPE)
    assert batch["mask"].meta["lung_mask_warning"][0] == ""


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.random.default_rng(0).uniform(0, 255, (1, 32, 32, 8)), "not CT in Hounsfield units"),
        (np.random.default_rng(0).uniform(0, 1, (1, 32, 32, 8)), "not CT in Hounsfield units"),
        (np.full((1, 32, 32), -1000.0), "2D image"),
        (np.zeros((1, 0, 32, 8)), "empty"),
        (np.full((2, 32, 32, 8), -1000.0), "one channel"),
        (np.where(np.eye(32)[None, :, :, None] > 0, np.nan, -1000.0), "NaN"),
    ],
    ids=["0-255", "0-1", "2d", "empty", "two-channels", "nan"],
)
def test_invalid_input_is_refused(image, message):
    with pytest.raises(InvalidVolumeError, match=message):
        LungMask(spacing_mm=(1.0, 1.0, 1.0))(image)


def test_hu_check_can_be_skipped():
    scaled = np.random.default_rng(0).uniform(0, 1, (1, 32, 32, 8))
    with pytest.raises(NoLungFoundError):
        LungMask(spacing_mm=(1.0, 1.0, 1.0), check_hu=False)(scaled)


def test_invalid_options():
    with pytest.raises(ValueError, match="on_failure"):
        LungMask(on_failure="ignore")
    with pytest.raises(ValueError, match="lung_volume_l"):
        LungMask(lung_volume_l=(8.0, 2.0))


def test_compose_on_nifti(tmp_path, phantom):
    path = tmp_path / "chest.nii.gz"
    nib.save(nib.Nifti1Image(phantom.hu, phantom.affine), path)
    pipeline = Compose(
        [
            LoadImaged(keys="image", reader="ITKReader", image_only=True),
            EnsureChannelFirstd(keys="image"),
            LungMaskd(keys="image", mask_key="mask", dilation_mm=0.0),
        ]
    )
    out = pipeline({"image": str(path)})
    mask = out["mask"]
    assert isinstance(mask, MetaTensor) and mask.shape == out["image"].shape == (1, *SHAPE)
    assert mask.meta["filename_or_obj"] == str(path)
    torch.testing.assert_close(mask.affine, out["image"].affine)
    np.testing.assert_allclose(mask.pixdim, SPACING, rtol=1e-5)
    assert dice(mask[0].numpy().astype(bool), phantom.lungs) >= 0.95


@pytest.fixture(scope="module")
def real_series(real_ct_dir):
    """The real series loaded and masked once: (image, mask, undilated lungs)."""
    pipeline = Compose(
        [
            LoadImaged(keys="image", reader="ITKReader", image_only=True),
            EnsureChannelFirstd(keys="image"),
            LungMaskd(keys="image", mask_key="mask"),
        ]
    )
    return pipeline({"image": str(real_ct_dir)})


def _body(hu: np.ndarray) -> np.ndarray:
    """The largest region above -500 HU with its in-slice holes (lungs, airways, gas) filled."""
    labels, _ = ndimage.label(hu > -500)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(labels == sizes.argmax(), structure=in_plane)


@pytest.mark.slow
def test_real_series_lungs(real_series, real_ct_dir):
    image, mask = real_series["image"], real_series["mask"]
    assert mask.shape == image.shape == (1, 512, 512, 64) and mask.dtype == torch.uint8
    torch.testing.assert_close(mask.affine, image.affine)
    assert mask.meta["filename_or_obj"] == image.meta["filename_or_obj"]
    assert 2.0 <= mask.meta["lung_volume_l"] <= 8.0

    hu = image[0].numpy()
    lungs = mask[0].numpy().astype(bool)
    voxel_l = float(torch.prod(image.pixdim)) / 1e6
    half = lungs.shape[0] // 2
    assert lungs[:half].sum() * voxel_l >= 1.0 and lungs[half:].sum() * voxel_l >= 1.0  # both lungs

    body = _body(hu)
    parenchyma = (hu < -700) & body
    assert np.count_nonzero(lungs & parenchyma) >= 0.97 * np.count_nonzero(parenchyma)
    assert not np.any(lungs & ~body)
    assert np.count_nonzero(lungs & (hu > -100)) <= 0.2 * np.count_nonzero(lungs)  # heart not swallowed


def test_gas_at_the_scan_bottom_is_left_out():
    phantom = make_phantom(seed=2, airway_bridge=True)  # one lung region: any other could be kept beside it
    axes = ((np.arange(n) - (n - 1) / 2) * s for n, s in zip(SHAPE, SPACING, strict=True))
    x, y, z = np.meshgrid(*axes, indexing="ij")
    gas = ((x - 5) / 40) ** 2 + ((y - 88) / 10) ** 2 + ((z + 93) / 12) ** 2 <= 1.0  # in front of the heart
    assert not np.any(gas & phantom.lungs.any(axis=2, keepdims=True))  # under no lung: only the bottom tells
    hu = np.where(gas, -1000.0, phantom.hu).astype(np.float32)
    options = {"dilation_mm": 0.0, "min_lung_fraction": 0.001, "max_lungs": 3}  # the table core is a third

    lungs = segment_lungs(hu, SPACING, **options)

    assert not np.any(lungs & gas) and dice(lungs, phantom.lungs) >= 0.95
    # Of a lung's density (-850 HU) instead of gas's, only its place at the scan's bottom leaves it out.
    dense = np.where(gas, -850.0, phantom.hu).astype(np.float32)
    assert not np.any(segment_lungs(dense, SPACING, **options) & gas)
    assert np.all(segment_lungs(dense, SPACING, head_last=False, **options)[gas])  # at the top: kept


def test_air_wide_open_at_the_scan_bottom_only_is_not_trusted(phantom):
    upper_half = phantom.hu[:, :, SHAPE[2] // 2 :]  # the scan stops inside the lungs: their cut is wide
    image = MetaTensor(torch.from_numpy(upper_half[None].copy()), affine=torch.from_numpy(phantom.affine))
    with pytest.raises(NoLungFoundError, match=r"no lung found \(scan bottom check\).*cannot be trusted"):
        LungMask()(image)
    with pytest.warns(UserWarning, match="scan bottom check"):
        mask = LungMask(on_failure="full")(image)
    assert bool(torch.all(mask == 1)) and "scan bottom check" in mask.meta["lung_mask_warning"]
    # Had the slices run head first (the affine says so), the wide cut would be the scan's top: trusted.
    image.affine = torch.from_numpy(phantom.affine @ np.diag([1.0, 1.0, -1.0, 1.0]))
    assert LungMask()(image).meta["lung_mask_warning"] == ""


@pytest.mark.parametrize("head_last", [True, False])
def test_slice_order_comes_from_the_affine(phantom, head_last):
    hu = phantom.hu if head_last else phantom.hu[:, :, ::-1]
    flip = np.diag([1.0, 1.0, 1.0 if head_last else -1.0, 1.0])
    image = MetaTensor(torch.from_numpy(hu[None].copy()), affine=torch.from_numpy(phantom.affine @ flip))
    mask = LungMask()(image)[0].numpy().astype(bool)
    expected = LungMask(head_last=True, spacing_mm=SPACING)(phantom.hu[None])[0].astype(bool)
    np.testing.assert_array_equal(mask if head_last else mask[:, :, ::-1], expected)


@pytest.fixture(scope="module")
def partial_cases(real_series) -> dict[str, PartialLungCase]:
    """The partial-lung scans of ``benchmarks/partial_lung_cases.py``, built from the real series.

    The reference lung of each case is the real series' undilated lung mask (a whole-chest scan, where
    the mask is excellent: see ``test_real_series_lungs``) restricted to the slices or window the case
    keeps; the gas is inserted at known voxels, 10 mm or more from any air of the series.
    """
    image = real_series["image"]
    hu = image[0].numpy()
    spacing = np.asarray(image.pixdim, dtype=np.float64)
    lungs = segment_lungs(hu, spacing, dilation_mm=0.0)
    return {case.name: case for case in partial_lung_cases(hu, lungs, spacing, seed=0)}


THIN_BASES = ("lung bases, 0.1 l", "abdomen + 0.1 l of bases, gas")
"""Cases whose lung is thin crescents: a full 5 mm wall would more than double their volume."""


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["lung bases", "abdomen + bases, gas", "chest + gas below", "small field of view", *THIN_BASES]
)
def test_partial_lung_scans_cover_the_lung_and_leave_the_gas_out(real_series, partial_cases, name):
    case = partial_cases[name]
    image = MetaTensor(torch.from_numpy(case.hu[None].copy()), affine=real_series["image"].affine)
    mask = LungMask()(image)[0].numpy().astype(bool)  # the 5 mm dilation included, as the pipeline uses it
    lung = np.count_nonzero(case.lungs)
    assert np.count_nonzero(mask & case.lungs) >= 0.95 * lung
    assert np.count_nonzero(mask) <= 1.6 * lung  # thin bases: the dilation's radius shrinks to stay within
    undilated = LungMask(dilation_mm=0.0)(image)[0].numpy().astype(bool)
    assert (
        np.count_nonzero(undilated & case.lungs) >= 0.95 * lung and np.count_nonzero(undilated) <= 1.1 * lung
    )
    assert not np.any(mask & case.gas)  # the gas lies 10 mm or more from the lungs: beyond the dilation
    gas_l = np.count_nonzero(case.gas) * float(torch.prod(image.pixdim)) / 1e6
    assert gas_l == 0.0 or gas_l >= 0.3  # when inserted, as much gas as a lung base holds air


@pytest.mark.slow
def test_the_whole_chest_keeps_the_full_dilation(real_series):
    image = real_series["image"]
    bounded = LungMask()(image)[0].numpy()
    unbounded = LungMask(max_dilation_growth=None)(image)[0].numpy()
    assert np.array_equal(bounded, unbounded)  # the whole chest grows about 1.3 times: under the bound


@pytest.mark.slow
def test_an_abdomen_without_lung_is_refused_though_it_holds_gas(real_series):
    image = real_series["image"]
    hu = image[0].numpy()
    spacing = np.asarray(image.pixdim, dtype=np.float64)
    case = abdomen_without_lung(hu, segment_lungs(hu, spacing, dilation_mm=0.0), spacing)
    assert np.count_nonzero(case.gas) * float(np.prod(spacing)) / 1e6 >= 0.3  # more air than 0.1 l of bases
    scan = MetaTensor(
        torch.from_numpy(case.hu[None].copy()), affine=image.affine, meta={"filename_or_obj": "abd.nii"}
    )
    with pytest.raises(
        NoLungFoundError, match=r"abd\.nii: no lung found \(lung volume check\).*gas of -960 HU"
    ):
        LungMask()(scan)


@pytest.mark.parametrize("slices", [5, 6])
def test_a_scan_of_the_lung_bases_alone_keeps_them(phantom, slices):
    bases, truth = phantom.hu[:, :, :slices], phantom.lungs[:, :, :slices]
    assert np.count_nonzero(truth) * voxel_litres() < 0.1  # below the minimum expected of whole lungs

    lungs = segment_lungs(bases, SPACING, dilation_mm=0.0)

    assert dice(lungs, truth) >= 0.95
    with pytest.raises(NoLungFoundError, match="lung volume check"):  # a chest scan holding that little
        segment_lungs(bases, SPACING, head_last=False)  # lung (its bases cut by its bottom) is refused


def test_gas_cut_by_the_top_of_a_scan_without_lung_is_not_taken_for_lung_bases(phantom):
    hu = phantom.hu[:, :, :4].copy()  # below the lungs
    axes = ((np.arange(n) - (n - 1) / 2) * s for n, s in zip(SHAPE[:2], SPACING[:2], strict=True))
    x, y = np.meshgrid(*axes, indexing="ij")
    stomach = np.zeros(hu.shape, dtype=bool)
    stomach[:, :, 1:] = (((x - 40) / 50) ** 2 + ((y + 10) / 40) ** 2 <= 1.0)[:, :, None]
    assert np.count_nonzero(stomach) * voxel_litres() >= 0.1  # more than the minimum: cut wide by the top

    with pytest.raises(NoLungFoundError, match="holds 0 l"):
        segment_lungs(np.where(stomach, -1000.0, hu), SPACING)
    dense = segment_lungs(np.where(stomach, -850.0, hu), SPACING, dilation_mm=0.0)  # lung density: kept,
    assert dice(dense, stomach) >= 0.9  # so only its density tells this gas from lung bases


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stays_on_gpu(phantom):
    image = as_meta_tensor(phantom).cuda()
    mask = LungMask()(image)
    assert isinstance(mask, MetaTensor) and mask.device == image.device and mask.dtype == torch.uint8
    np.testing.assert_array_equal(mask.cpu().numpy(), LungMask()(as_meta_tensor(phantom)).numpy())
    assert mask.meta["lung_volume_l"] > 1.0
