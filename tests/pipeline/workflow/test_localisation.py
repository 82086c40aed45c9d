"""Pointing game and pixel ROC AUC against lesion masks, alone and in a real SupervisedEvaluator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import ROCAUC

from networks import ResNextPlus
from pipeline.workflow.batches import PrepareNetworkBatch
from pipeline.workflow.heatmaps import slice_maps
from pipeline.workflow.inferer import SliceAttentionInferer, attention_postprocessing
from pipeline.workflow.localisation import LocalisationMetrics, pointing_chance, pointing_hit, slice_pixel_auc
from pipeline.workflow.metrics import score_and_label

SIZE, SLICES = 32, 4


def test_pointing_hit_counts_the_hottest_pixel_inside_the_dilated_lesion() -> None:
    lesion = np.zeros((8, 8), dtype=bool)
    lesion[2:4, 2:4] = True
    heatmap = np.zeros((8, 8))
    heatmap[3, 3] = 1.0
    assert pointing_hit(heatmap, lesion)
    heatmap[3, 3], heatmap[4, 4] = 0.0, 1.0  # diagonal neighbour: inside the 1-pixel dilation
    assert pointing_hit(heatmap, lesion, tolerance=1)
    assert not pointing_hit(heatmap, lesion, tolerance=0)
    heatmap[4, 4], heatmap[5, 5] = 0.0, 1.0  # two pixels away
    assert not pointing_hit(heatmap, lesion, tolerance=1)
    assert not pointing_hit(np.zeros((8, 8)), lesion), "a map that is zero everywhere points nowhere"


def test_pointing_chance_is_the_share_of_the_region_in_the_dilated_lesion() -> None:
    lesion = np.zeros((8, 8), dtype=bool)
    lesion[2:4, 2:4] = True  # 2 x 2, dilated by one pixel: 4 x 4
    assert pointing_chance(lesion) == pytest.approx(16 / 64)
    assert pointing_chance(lesion, tolerance=0) == pytest.approx(4 / 64)
    lung = np.zeros((8, 8), dtype=bool)
    lung[:, :4] = True  # 32 pixels, 12 of them in the dilated lesion (rows 1-4, columns 1-3)
    assert pointing_chance(lesion, lung) == pytest.approx(12 / 32)
    assert math.isnan(pointing_chance(lesion, np.zeros((8, 8), dtype=bool)))


def test_pixel_auc_ranks_lesion_pixels_within_the_region() -> None:
    lesion = np.array([[1, 1, 0, 0]], dtype=bool)
    heatmap = np.array([[0.9, 0.4, 0.5, 0.1]])
    # pairs (lesion, background): 0.9 > 0.5, 0.9 > 0.1, 0.4 < 0.5, 0.4 > 0.1 -> 3 of 4
    assert slice_pixel_auc(heatmap, lesion) == pytest.approx(0.75)
    # outside the region (the lung), the background pixel 0.5 does not count
    assert slice_pixel_auc(heatmap, lesion, region=np.array([[1, 1, 0, 1]], dtype=bool)) == pytest.approx(1.0)
    assert math.isnan(slice_pixel_auc(heatmap, np.zeros((1, 4), dtype=bool)))


def _case(index: int, label: int, lesion_slices: list[int]) -> dict:
    generator = torch.Generator().manual_seed(index)
    image = torch.rand(2, SIZE, SIZE, SLICES, generator=generator)
    image[1] = 0.0
    image[1, 4:28, 4:28] = 1.0  # the lung
    lesion = torch.zeros(1, SIZE, SIZE, SLICES, dtype=torch.uint8)
    for position in lesion_slices:
        lesion[0, 8:14, 10:16, position] = 1
    return {
        "image": MetaTensor(image, meta={"filename_or_obj": f"case_{index}.nii.gz"}),
        "lesion": MetaTensor(lesion),
        "label": label,
    }


@pytest.mark.parametrize("in_lung", [False, True])
def test_metric_in_an_evaluator_scores_the_lesion_slices_of_positive_volumes(in_lung: bool) -> None:
    torch.manual_seed(0)
    network = ResNextPlus(lstm_hidden=8, fc_hidden=16).eval()
    cases = [_case(0, 1, [1, 2]), _case(1, 0, []), _case(2, 1, [3])]
    metric = LocalisationMetrics(method="gradcampp", in_lung=in_lung, tau=1.0, threshold=0.0)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(cases), batch_size=1),
        network=network,
        prepare_batch=PrepareNetworkBatch(),
        inferer=SliceAttentionInferer(),
        postprocessing=attention_postprocessing(),
        key_val_metric={"val_auc": ROCAUC(output_transform=score_and_label)},  # metrics need a key metric
        additional_metrics={"localisation": metric},
    )
    evaluator.run()
    result = {
        key.removeprefix("localisation_"): value
        for key, value in evaluator.state.metrics.items()
        if key.startswith("localisation_")
    }

    hits, aucs = [], []
    for case in (cases[0], cases[2]):
        slices = np.flatnonzero(case["lesion"][0].numpy().any(axis=(0, 1)))
        maps = slice_maps(network, case["image"], slices, method="gradcampp", in_lung=in_lung).numpy()
        lung = case["image"][1].numpy() > 0
        for position, index in enumerate(slices):
            lesion = case["lesion"][0, ..., index].numpy() > 0
            hits.append(pointing_hit(maps[position], lesion))
            aucs.append(slice_pixel_auc(maps[position], lesion, lung[..., index]))
    assert result["slices"] == 3 and result["volumes"] == 2  # the negative volume is skipped
    assert result["pointing_game"] == pytest.approx(np.mean(hits))
    assert result["pixel_auc"] == pytest.approx(np.mean(aucs))
    assert result["pointing_game_chance"] == pytest.approx(8 * 8 / 24**2)  # dilated 6 x 6 lesion in the lung
    assert 0 <= result["slices_called"] <= 3  # threshold 0: every volume may have its slices called
    assert (
        result["pixel_auc_called"] is None
        or math.isnan(result["pixel_auc_called"])
        or (0.0 <= result["pixel_auc_called"] <= 1.0)
    )


def test_masking_by_the_lung_zeroes_the_map_outside_it() -> None:
    torch.manual_seed(0)
    network = ResNextPlus(lstm_hidden=8, fc_hidden=16).eval()
    image = _case(0, 1, [1])["image"]
    plain = slice_maps(network, image, [0, 1], method="layercam")
    masked = slice_maps(network, image, [0, 1], method="layercam", in_lung=True)
    lung = image[1, ..., [0, 1]].permute(2, 0, 1).as_tensor() > 0
    torch.testing.assert_close(masked[lung], plain[lung])
    assert (masked[~lung] == 0).all() and (plain[~lung] > 0).any()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        LocalisationMetrics(method="saliency")
    with pytest.raises(ValueError, match="tolerance"):
        LocalisationMetrics(tolerance=-1)
