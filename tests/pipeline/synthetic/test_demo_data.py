"""Demo data: HU per tissue, exact slice labels, lesions inside the lungs, files that MONAI reads back."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd
from scipy import ndimage

from pipeline.data.nifti_files import write_nifti
from pipeline.jobs.cli import main
from pipeline.synthetic import demo_data
from pipeline.synthetic.demo_data import (
    DATALIST_NAME,
    load_base_scan,
    make_base_volume,
    make_demo_data,
    make_phantom_volume,
    split_volumes,
)
from pipeline.synthetic.lesions import LesionSettings, draw_extent, insert_lesions, slice_labels
from pipeline.synthetic.phantom import (
    PHANTOM_FOV_MM,
    TISSUE_HU_RANGES,
    Tissue,
    add_scanner_noise,
    make_chest_phantom,
    phantom_spacing,
)
from tests.conftest import TINY_DEMO
from transforms import LungMask

SETTINGS = LesionSettings()
SPLITS = ("training", "validation", "test")


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _load_itk(path: Path):
    return LoadImaged(keys="image", reader="ITKReader")({"image": str(path)})["image"]


# --- phantom anatomy ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phantom():
    return make_chest_phantom(96, 24, np.random.default_rng(7))


def test_tissue_hu_ranges(phantom):
    for tissue, (low, high) in TISSUE_HU_RANGES.items():
        assert (phantom.tissue == tissue).any(), f"no {tissue.name} in the phantom"
        # Pure voxels hold up to 1 % of another tissue: allow 1 % of the widest HU gap.
        purity, tolerance = (0.5, 1.0) if tissue == Tissue.VESSEL else (0.99, 20.0)
        values = phantom.hu[(phantom.tissue == tissue) & (phantom.purity >= purity)]
        assert values.size, f"no pure {tissue.name} voxel"
        assert low - tolerance <= values.min() and values.max() <= high + tolerance, (
            tissue.name,
            values.min(),
            values.max(),
        )


def test_anatomy_layout(phantom):
    x_mid = phantom.hu.shape[0] / 2
    heart_i = np.nonzero(phantom.tissue == Tissue.HEART)[0]
    bone_i, bone_j, _ = np.nonzero(phantom.tissue == Tissue.BONE)
    table_j = np.nonzero(phantom.tissue == Tissue.TABLE)[1]
    lung_j = np.nonzero(phantom.lungs)[1]
    assert table_j.min() > lung_j.max(), "the table lies behind (under) the patient"
    assert np.median(heart_i) > x_mid, "the heart lies towards the patient's left (+i in LPS)"
    spine = (np.abs(bone_i - x_mid) < 4) & (bone_j > np.median(lung_j))
    assert spine.sum() > 50, "a spine behind the lungs"
    # Both lungs, and their cross-section shrinks towards the apex.
    left = phantom.lungs[: int(x_mid)].sum()
    right = phantom.lungs[int(x_mid) :].sum()
    assert min(left, right) > 0.5 * max(left, right)
    area = phantom.lungs.sum(axis=(0, 1))
    top = np.flatnonzero(area)[-1]
    assert area[top] < 0.5 * area.max()
    assert np.argmax(area) < top - 2


def test_lung_parenchyma_and_vessels(phantom):
    lung = phantom.hu[phantom.tissue == Tissue.LUNG]
    assert -880 < np.median(lung) < -820
    vessels = phantom.tissue == Tissue.VESSEL
    assert 0.002 < vessels.sum() / phantom.lungs.sum() < 0.2
    assert (phantom.lungs & vessels).sum() == vessels.sum(), "vessels lie inside the lungs"
    # Dependent density: the posterior lung is denser than the anterior lung.
    j = np.nonzero(phantom.tissue == Tissue.LUNG)[1]
    front, back = np.percentile(j, 20), np.percentile(j, 90)
    assert np.median(lung[j >= back]) > np.median(lung[j <= front]) + 15


def test_scanner_noise_level():
    flat = np.full((64, 64, 4), -1000.0, dtype=np.float32)
    noisy = add_scanner_noise(flat, 15.0, np.random.default_rng(0))
    assert noisy.std() == pytest.approx(15.0, rel=0.05)
    assert abs(noisy.mean() + 1000) < 1


@pytest.mark.parametrize("size", [32, 128, 256])
def test_field_of_view_independent_of_size(size):
    sx, sy, _ = phantom_spacing(size, 32)
    assert sx == sy
    assert 350 <= sx * size <= 400 and pytest.approx(sx * size) == PHANTOM_FOV_MM


# --- lesions and slice labels ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def positive_and_twin():
    kwargs = {"size": 96, "slices": 24, "seed": 5}
    return make_phantom_volume(1, 0, **kwargs), make_phantom_volume(1, 0, with_lesions=False, **kwargs)


def test_lesion_voxels_are_exactly_where_hu_rose(positive_and_twin):
    positive, twin = positive_and_twin
    changed = positive.hu != twin.hu
    np.testing.assert_array_equal(changed, positive.lesions)
    rise = positive.hu.astype(np.int32) - twin.hu.astype(np.int32)
    assert rise[positive.lesions].min() >= SETTINGS.min_rise_hu - 1
    assert positive.slice_labels == [int(v) for v in positive.lesions.any(axis=(0, 1))]
    assert positive.slice_labels == slice_labels(positive.lesions)
    assert not (positive.lesions & ~positive.lungs).any()


def test_lesions_look_covid_like(positive_and_twin):
    positive, _ = positive_and_twin
    assert any(positive.slice_labels)
    components, count = ndimage.label(positive.lesions)
    min_voxels = SETTINGS.min_slice_area_mm2 / (positive.spacing[0] * positive.spacing[1])
    for index in range(1, count + 1):
        assert (components == index).sum() >= min_voxels, "no specks"
    lesion_hu = positive.hu[positive.lesions]
    assert -750 <= np.median(lesion_hu) <= -250
    assert np.percentile(lesion_hu, 5) > -850 and np.percentile(lesion_hu, 95) < 150
    # Peripheral: every lesion (pieces of 50 voxels and more) reaches the lung surface within a slice.
    in_plane_depth = ndimage.distance_transform_edt(positive.lungs, sampling=(*positive.spacing[:2], 1e4))
    for index in range(1, count + 1):
        if (components == index).sum() >= 50:
            assert in_plane_depth[components == index].min() <= 2 * positive.spacing[0]
    # Learnable size: the largest lesion cross-section covers tens of pixels at 96 px.
    assert positive.lesions.sum(axis=(0, 1)).max() >= 20


def test_positive_volumes_show_mild_disease():
    # MosMedData CT-1 is mild COVID-19: under a quarter of the lung involved.
    for index in range(3):
        positive = make_phantom_volume(1, index, size=64, slices=16, seed=2)
        involved = positive.lesions.sum() / positive.lungs.sum()
        assert 0.002 <= involved <= 0.25, f"volume {index}: {involved:.1%} of the lung"


@pytest.mark.parametrize("slices", [8, 16, 64])
def test_drawn_extent_follows_mosmeddata(slices):
    rng = np.random.default_rng(0)
    counts = np.array([draw_extent(slices, rng) for _ in range(4000)])
    assert counts.min() == 1 and counts.max() <= round(0.8 * slices)
    shares = counts / slices
    assert 0.3 <= np.median(shares) <= 0.5
    # A quarter of the volumes at 25 % of the slices or fewer (up to the rounding to whole slices).
    assert 0.2 <= np.mean(shares <= 0.25 + 0.5 / slices) <= 0.4
    assert np.mean(shares <= 0.15 + 0.5 / slices) >= 0.1


def test_draw_extent_checks_its_quantiles():
    with pytest.raises(ValueError, match="quantile 0 to 1"):
        draw_extent(8, np.random.default_rng(0), ((0.1, 0.1), (1.0, 0.8)))


@pytest.mark.parametrize("slices", [8, 16])
def test_lesion_extent_of_generated_positives(slices):
    # The slices the lesions of generated positives touch, as their slice labels say.
    shares = np.array(
        [
            np.mean(make_phantom_volume(1, index, size=32, slices=slices, seed=3).slice_labels)
            for index in range(30)
        ]
    )
    assert shares.min() > 0
    assert 0.3 <= np.median(shares) <= 0.5
    assert np.mean(shares <= 0.15) >= 0.1, "a long tail down to a single slice"
    assert shares.max() <= 0.8


def test_lesions_lie_more_often_low_and_at_the_back():
    counts = {"low": 0, "high": 0, "back": 0, "front": 0}
    for index in range(12):
        positive = make_phantom_volume(1, index, size=48, slices=16, seed=4)
        room = np.flatnonzero(positive.lungs.any(axis=(0, 1)))
        middle_z = 0.5 * (room[0] + room[-1])
        rows = np.flatnonzero(positive.lungs.any(axis=(0, 2)))
        middle_j = 0.5 * (rows[0] + rows[-1])
        components, count = ndimage.label(positive.lesions)
        for centre in ndimage.center_of_mass(positive.lesions, components, range(1, count + 1)):
            counts["low" if centre[2] < middle_z else "high"] += 1
            counts["back" if centre[1] > middle_j else "front"] += 1
    assert counts["low"] > counts["high"] and counts["back"] > counts["front"], counts


def test_negatives_have_no_lesions():
    negative = make_phantom_volume(0, 3, size=64, slices=16, seed=1)
    assert negative.label == 0 and not negative.lesions.any() and not any(negative.slice_labels)


def test_insert_lesions_fails_loudly_without_room():
    hu = np.full((32, 32, 8), -850.0, dtype=np.float32)
    lungs = np.zeros(hu.shape, dtype=bool)
    with pytest.raises(ValueError, match="no lung voxels"):
        insert_lesions(hu, lungs, (3.0, 3.0, 10.0), np.random.default_rng(0))
    lungs[15:17, 15:17, 3] = True  # 36 mm2: below a lesion's least cross-section
    with pytest.raises(ValueError, match="lungs are too small"):
        insert_lesions(hu, lungs, (3.0, 3.0, 10.0), np.random.default_rng(0))


# --- determinism -------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kwargs = {"n_positive": 3, "n_negative": 3, "size": 48, "slices": 8}
    make_demo_data(tmp_path / "a", seed=11, **kwargs)
    make_demo_data(tmp_path / "b", seed=11, workers=2, **kwargs)  # made in two processes
    make_demo_data(tmp_path / "c", seed=12, **kwargs)
    first, second, other = (_files(tmp_path / name) for name in "abc")
    assert first == second
    assert first.keys() == other.keys()
    for name in first:
        if name.endswith(".nii.gz"):
            assert first[name] != other[name], name


def test_volume_independent_of_generation_order(tiny_demo_dataset):
    # The last positive of the data set equals the same volume made alone.
    index = TINY_DEMO["n_positive"] - 1
    alone = make_phantom_volume(
        1, index, size=TINY_DEMO["size"], slices=TINY_DEMO["slices"], seed=TINY_DEMO["seed"]
    )
    written = nib.load(tiny_demo_dataset / "images" / f"positive_{index:03d}.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), alone.hu)
    other = make_phantom_volume(1, index - 1, size=TINY_DEMO["size"], slices=TINY_DEMO["slices"])
    assert not np.array_equal(other.hu, alone.hu)


# --- files -------------------------------------------------------------------------------------------


def test_datalist_splits_and_paths(tiny_demo_dataset):
    datalist = json.loads((tiny_demo_dataset / DATALIST_NAME).read_text())
    assert tuple(datalist) == SPLITS
    seen = set()
    for split in SPLITS:
        items = datalist[split]
        assert {item["label"] for item in items} == {0, 1}, f"both classes in {split}"
        for item in items:
            assert set(item) == {"image", "label", "slice_labels"} | ({"lesion"} if item["label"] else set())
            assert not Path(item["image"]).is_absolute()
            path = tiny_demo_dataset / item["image"]
            assert path.is_file(), item["image"]
            assert item["image"] not in seen, "split by volume"
            seen.add(item["image"])
            image = nib.load(path)
            assert image.get_data_dtype() == np.int16
            assert len(item["slice_labels"]) == image.shape[2] == TINY_DEMO["slices"]
            assert set(item["slice_labels"]) <= {0, 1}
            assert any(item["slice_labels"]) == bool(item["label"])
            if item["label"]:  # the lesion mask: uint8, on the image's grid, on the labelled slices
                lesion = nib.load(tiny_demo_dataset / item["lesion"])
                mask = np.asarray(lesion.dataobj)
                assert lesion.get_data_dtype() == np.uint8 and mask.shape == image.shape
                np.testing.assert_allclose(lesion.affine, image.affine)
                assert mask.any(axis=(0, 1)).astype(int).tolist() == item["slice_labels"]
    assert len(seen) == TINY_DEMO["n_positive"] + TINY_DEMO["n_negative"]
    readme = (tiny_demo_dataset / "README.txt").read_text()
    assert f"Seed: {TINY_DEMO['seed']}" in readme and "Hounsfield" in readme
    assert not list(tiny_demo_dataset.rglob("*.tmp")), "no temporary files left behind"


def test_monai_itk_reader_reads_back_array_affine_and_spacing(tiny_demo_dataset):
    volume = make_phantom_volume(
        0, 1, size=TINY_DEMO["size"], slices=TINY_DEMO["slices"], seed=TINY_DEMO["seed"]
    )
    image = _load_itk(tiny_demo_dataset / "images" / "negative_001.nii.gz")
    assert tuple(image.shape) == volume.hu.shape
    np.testing.assert_array_equal(image.numpy(), volume.hu)
    np.testing.assert_allclose(image.affine.numpy(), volume.affine, atol=1e-4)
    sx = PHANTOM_FOV_MM / TINY_DEMO["size"]
    np.testing.assert_allclose(image.pixdim.numpy(), [sx, sx, volume.spacing[2]], rtol=1e-5)
    # Axial slices along the last axis, already in the LPS orientation the pipeline uses.
    assert np.argmax(np.abs(volume.affine[2, :3])) == 2
    chain = Compose(
        [
            LoadImaged("image", reader="ITKReader"),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="LPS", labels=None),
        ]
    )
    oriented = chain({"image": str(tiny_demo_dataset / "images" / "negative_001.nii.gz")})["image"]
    np.testing.assert_array_equal(oriented[0].numpy(), volume.hu)


def test_write_nifti_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "volume.nii.gz"
    hu = np.full((8, 8, 4), -1000, dtype=np.int16)

    def failing_replace(source, destination):
        raise OSError("disk full")

    monkeypatch.setattr(demo_data.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(target, hu, np.eye(4))
    assert list(tmp_path.iterdir()) == [], "neither the target nor a temporary file is left"
    monkeypatch.undo()
    write_nifti(target, hu, np.eye(4))
    assert [p.name for p in tmp_path.iterdir()] == ["volume.nii.gz"]


def test_too_few_volumes_fail_loudly(tmp_path):
    with pytest.raises(ValueError, match="positive volumes cannot fill"):
        make_demo_data(tmp_path, n_positive=2, n_negative=8, size=32, slices=8)
    with pytest.raises(ValueError, match="val_fraction"):
        split_volumes(5, 5, 0.5, 0.5, seed=0)
    splits = split_volumes(3, 7, 0.2, 0.2, seed=0)
    for label, count in ((1, 3), (0, 7)):
        indices = sorted(i for split in SPLITS for i in splits[split][label])
        assert indices == list(range(count))
    assert not list(tmp_path.iterdir()), "nothing written when the request is refused"


def test_cli_writes_demo_data(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["make-demo-data", str(out), "--n-positive", "3", "--n-negative", "3", "--size", "32"]
    assert main([*argv, "--slices", "8", "--seed", "4"]) == 0
    assert str(out) in capsys.readouterr().out
    datalist = json.loads((out / DATALIST_NAME).read_text())
    assert sum(len(datalist[split]) for split in SPLITS) == 6
    assert nib.load(out / datalist["test"][0]["image"]).shape == (32, 32, 8)


# --- volumes built on the real CT series -------------------------------------------------------------


@pytest.fixture(scope="module")
def base_scan(real_ct_dir):
    return load_base_scan(real_ct_dir, size=64, slices=8)


def test_base_scan_geometry(base_scan):
    assert base_scan.hu.shape[2] == 64
    first, last = base_scan.lung_range
    assert 0 <= first < last < 64 and last - first > 30
    volume = make_base_volume(base_scan, 0, 0)
    assert volume.hu.shape == (64, 64, 8) and volume.hu.dtype == np.int16
    sx, sy, sz = volume.spacing
    assert sx == pytest.approx(sy)
    assert 0.9 * 512 * 0.8418 <= sx * 64 <= 512 * 0.8418 + 1e-3, "in-plane field of view kept"
    assert 25 < sz < 40, "the lung range resampled to 8 slices"
    assert volume.hu.min() == -1024 and np.median(volume.hu[volume.lungs]) < -700


def test_base_lesions_inside_the_real_lungs(base_scan):
    for index in range(3):
        positive = make_base_volume(base_scan, 1, index, seed=2)
        twin = make_base_volume(base_scan, 1, index, seed=2, with_lesions=False)
        assert positive.lesions.any()
        assert not (positive.lesions & ~positive.lungs).any()
        np.testing.assert_array_equal(twin.lungs, positive.lungs)
        # The mask follows the image: lesion voxels sat in aerated lung before the lesion came.
        assert np.median(twin.hu[positive.lesions]) < -600
        np.testing.assert_array_equal(positive.hu != twin.hu, positive.lesions)
        assert positive.slice_labels == slice_labels(positive.lesions)


def test_lung_mask_finds_both_lungs_of_the_base_volumes(base_scan):
    # At 8 slices the lungs are two regions, and the bottom slice often cuts one lung's base near its
    # tip: that lung is kept, not taken for gas at the scan's bottom. The reference is the volume's
    # own lung mask, resampled from the full-resolution segmentation of the series.
    for index in range(8):
        volume = make_base_volume(base_scan, 0, index)
        image = MetaTensor(torch.from_numpy(volume.hu[None].astype(np.float32)), affine=volume.affine)
        mask = LungMask(dilation_mm=0.0)(image)[0].numpy().astype(bool)
        assert np.count_nonzero(mask & volume.lungs) >= 0.75 * np.count_nonzero(volume.lungs), index


def test_base_volumes_vary_and_repeat(base_scan):
    a = make_base_volume(base_scan, 0, 0, seed=1)
    b = make_base_volume(base_scan, 0, 1, seed=1)
    again = make_base_volume(base_scan, 0, 0, seed=1)
    np.testing.assert_array_equal(a.hu, again.hu)
    np.testing.assert_array_equal(a.affine, again.affine)
    assert not np.array_equal(a.hu, b.hu)


def test_demo_data_from_real_ct_reads_back(base_scan, tmp_path):
    datalist_path = make_demo_data(
        tmp_path, n_positive=3, n_negative=3, size=64, slices=8, seed=0, base_ct=base_scan
    )
    datalist = json.loads(datalist_path.read_text())
    item = datalist["training"][0]
    assert item["label"] == 1 and any(item["slice_labels"])
    image = _load_itk(tmp_path / item["image"])
    assert tuple(image.shape) == (64, 64, 8)
    stored = nib.load(tmp_path / item["image"])
    np.testing.assert_allclose(image.affine.numpy(), stored.affine, atol=1e-4)
    assert "lung-pet-ct-dx-A0001" in (tmp_path / "README.txt").read_text()
