"""ToneMap / ToneMapd: the paper's sigmoid curve after a HU window, rescaled to span [0, 1]."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from transforms import InvalidVolumeError, ToneMap, ToneMapD, ToneMapd, ToneMapDict, tone_curve


def paper_curve(x: np.ndarray, gamma: float = 1.5, a: float = 0.35) -> np.ndarray:
    """``1 / (1 + exp(-a * x^(1/gamma)))`` as printed in the paper, in float64."""
    return 1.0 / (1.0 + np.exp(-a * x ** (1.0 / gamma)))


def hu_volume(shape=(1, 16, 16, 4), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1500.0, 400.0, shape).astype(np.float32)


def test_curve_is_the_papers_rescaled_to_unit_range():
    x = np.linspace(0.0, 1.0, 1001)
    out = ToneMap(window=None)(x)
    expected = (paper_curve(x) - paper_curve(0.0)) / (paper_curve(1.0) - paper_curve(0.0))
    np.testing.assert_allclose(out, expected, atol=1e-9)
    assert out[0] == 0.0 and out[-1] == pytest.approx(1.0)
    assert np.all(np.diff(out) > 0)
    np.testing.assert_allclose(out, x ** (2.0 / 3.0), atol=0.004)  # close to I^(2/3), as documented


@pytest.mark.parametrize(("gamma", "a"), [(1.0, 1.0), (2.0, 3.0)])
def test_other_parameters(gamma, a):
    x = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    expected = (paper_curve(x.numpy(), gamma, a) - 0.5) / (paper_curve(1.0, gamma, a) - 0.5)
    np.testing.assert_allclose(ToneMap(window=None, gamma=gamma, a=a)(x).numpy(), expected, atol=1e-9)
    np.testing.assert_allclose(tone_curve(x, gamma, a).numpy(), expected, atol=1e-9)


def test_window_maps_hu_to_unit_range_and_clips():
    hu = np.array([[[[-2000.0, -1350.0, -600.0, 150.0, 1000.0]]]], dtype=np.float32)
    out = ToneMap()(hu)
    unit = np.array([0.0, 0.0, 0.5, 1.0, 1.0])
    expected = (paper_curve(unit) - 0.5) / (paper_curve(1.0) - 0.5)
    np.testing.assert_allclose(out[0, 0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("gamma, a", [(1.5, 0.35), (1.0, 0.35), (2.0, 1.0), (1.5, 0.05)])
def test_float32_output_never_leaves_the_unit_range(gamma, a):
    # the top of the window (and everything above it) maps to 1 within float32 rounding, never above
    hu = np.concatenate([np.linspace(-2000.0, 1000.0, 20001), [150.0, 150.0 - 1e-3]]).astype(np.float32)
    for image in (hu, torch.as_tensor(hu), MetaTensor(torch.as_tensor(hu))):
        out = torch.as_tensor(ToneMap(gamma=gamma, a=a)(image.reshape(1, 1, 1, -1)))
        assert out.dtype == torch.float32
        assert float(out.min()) == 0.0
        assert 1.0 - 1e-5 <= float(out.max()) <= 1.0
    unit = torch.linspace(0.0, 1.0, 100001)
    assert float(tone_curve(unit, gamma, a).max()) <= 1.0


def test_custom_window():
    hu = np.array([-1000.0, -500.0, 0.0], dtype=np.float32)
    out = ToneMap(window=(-1000.0, 0.0))(hu)
    np.testing.assert_allclose(out, [0.0, ToneMap(window=None)(np.array([0.5]))[0], 1.0], atol=1e-6)


@pytest.mark.parametrize("kind", ["numpy", "torch", "metatensor"])
def test_types_dtypes_and_meta(kind):
    hu = hu_volume()
    expected = ToneMap()(hu.astype(np.float64))
    if kind == "numpy":
        image = hu.astype(np.int16)
    elif kind == "torch":
        image = torch.from_numpy(hu)
    else:
        affine = torch.diag(torch.tensor([0.8, 0.8, 5.0, 1.0], dtype=torch.float64))
        image = MetaTensor(torch.from_numpy(hu), affine=affine, meta={"filename_or_obj": "ct.nii.gz"})
    out = ToneMap()(image)
    assert type(out) is type(image)
    assert out.dtype in (np.float32, torch.float32)  # int16 HU becomes float32
    assert tuple(out.shape) == hu.shape
    if kind == "numpy":  # the int16 cast rounded the HU values
        expected = ToneMap()(hu.astype(np.int16).astype(np.float64))
    np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    if kind == "metatensor":
        torch.testing.assert_close(out.affine, image.affine)
        assert out.meta["filename_or_obj"] == "ct.nii.gz"


def test_output_dtype_option():
    out = ToneMap(dtype=torch.float64)(torch.from_numpy(hu_volume()))
    assert out.dtype == torch.float64


def test_dictionary_transform_and_missing_keys():
    data = {"image": hu_volume(), "mask": np.ones((1, 16, 16, 4), dtype=np.uint8)}
    for transform in (
        ToneMapd(keys="image"),
        ToneMapD("image"),
        ToneMapDict(("image", "ct"), allow_missing_keys=True),
    ):
        out = transform(data)
        np.testing.assert_allclose(out["image"], ToneMap()(data["image"]))
        assert out["mask"] is data["mask"]
    with pytest.raises(KeyError):
        ToneMapd(keys="ct")(data)


@pytest.mark.parametrize(
    ("transform", "image", "message"),
    [
        (ToneMap(), np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 2)), "not CT in Hounsfield units"),
        (ToneMap(), np.random.default_rng(0).uniform(0, 1, (1, 8, 8, 2)), "not CT in Hounsfield units"),
        (ToneMap(window=None), np.random.default_rng(0).uniform(0, 255, (1, 8, 8, 2)), r"expected \[0, 1\]"),
        (ToneMap(window=None), np.full((1, 8, 8, 2), -1000.0), r"expected \[0, 1\]"),
        (ToneMap(), np.where(np.eye(8)[None, :, :, None] > 0, np.nan, -1000.0), "NaN"),
    ],
    ids=["0-255-in-HU-window", "0-1-in-HU-window", "0-255-no-window", "HU-no-window", "nan"],
)
def test_invalid_input_is_refused(transform, image, message):
    image = MetaTensor(torch.as_tensor(image), meta={"filename_or_obj": "scan.nii.gz"})
    with pytest.raises(InvalidVolumeError, match=message) as error:
        transform(image)
    assert "scan.nii.gz" in str(error.value)


def test_slight_overshoot_is_clipped_and_hu_check_can_be_skipped():
    overshoot = np.array([-0.01, 0.5, 1.02])
    np.testing.assert_allclose(ToneMap(window=None)(overshoot)[[0, 2]], [0.0, 1.0])
    scaled = np.linspace(0.0, 255.0, 11)
    np.testing.assert_allclose(
        ToneMap(window=(0.0, 255.0), check_hu=False)(scaled), ToneMap(window=None)(scaled / 255)
    )


def test_invalid_options():
    with pytest.raises(ValueError, match="window"):
        ToneMap(window=(150.0, -1350.0))
    with pytest.raises(ValueError, match="positive"):
        ToneMap(gamma=0.0)


def test_compose_on_nifti(tmp_path):
    hu = hu_volume(shape=(16, 16, 4))
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 5.0, 1.0])), path)
    pipeline = Compose(
        [
            LoadImaged(keys="image", reader="ITKReader", image_only=True),
            EnsureChannelFirstd(keys="image"),
            ToneMapd(keys="image"),
        ]
    )
    out = pipeline({"image": str(path)})["image"]
    assert isinstance(out, MetaTensor) and out.shape == (1, 16, 16, 4)
    assert out.meta["filename_or_obj"] == str(path)
    np.testing.assert_allclose(out.pixdim, [0.8, 0.8, 5.0], rtol=1e-5)
    np.testing.assert_allclose(out[0].numpy(), ToneMap()(hu), atol=1e-6)


@pytest.mark.slow
def test_compose_on_real_series(real_ct_dir):
    pipeline = Compose(
        [
            LoadImaged(keys="image", reader="ITKReader", image_only=True),
            EnsureChannelFirstd(keys="image"),
            ToneMapd(keys="image"),
        ]
    )
    out = pipeline({"image": str(real_ct_dir)})["image"]
    assert isinstance(out, MetaTensor) and out.shape == (1, 512, 512, 64) and out.dtype == torch.float32
    assert out.meta["filename_or_obj"] == str(real_ct_dir)
    assert float(out.min()) >= 0.0 and float(out.max()) == pytest.approx(1.0)  # bone reaches the window's top
    # -1024 HU (air) lies at 0.217 of the lung window.
    assert float(out.min()) == pytest.approx(
        float(tone_curve(torch.tensor((1350.0 - 1024.0) / 1500.0))), abs=1e-5
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stays_on_gpu():
    image = MetaTensor(torch.from_numpy(hu_volume()).cuda(), meta={"filename_or_obj": "ct.nii.gz"})
    out = ToneMap()(image)
    assert out.device == image.device and isinstance(out, MetaTensor)
    np.testing.assert_allclose(out.cpu().numpy(), ToneMap()(hu_volume()), atol=1e-5)
