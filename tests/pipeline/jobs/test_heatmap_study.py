"""The heatmap study's settings, ranking and table (the scoring itself runs in the quick demo's test)."""

from __future__ import annotations

import math

from pipeline.jobs.heatmap_study import HeatmapSetting, best_setting, heatmap_settings, study_table


def _row(pixel_auc: float, pointing: float, slices: int = 12, volumes: int = 3) -> dict:
    return {
        "pixel_auc": pixel_auc,
        "pointing_game": pointing,
        "pixel_auc_called": pixel_auc,
        "slices": slices,
        "volumes": volumes,
        "pointing_game_chance": 0.25,
    }


def test_settings_cover_every_layer_weighting_and_masking_once() -> None:
    settings = heatmap_settings()

    assert len(settings) == len(set(settings)) == 18
    setting = HeatmapSetting("encoder.backbone.layer3", "gradcampp", True)
    assert (setting.name, setting.key) == ("layer3 gradcampp x lung", "heatmap_layer3_gradcampp_x_lung")
    assert len({setting.key for setting in settings}) == 18


def test_best_setting_ranks_by_pixel_auc_then_pointing_game_and_skips_missing_values() -> None:
    results = {
        "layer4 gradcam": _row(0.70, 0.90),
        "layer3 gradcam": _row(0.80, 0.10),
        "layer2 gradcam": _row(0.80, 0.30),
        "layer2 layercam": _row(math.nan, 1.00),
    }

    assert best_setting(results) == "layer2 gradcam"


def test_study_table_marks_the_validation_best_and_reports_both_splits() -> None:
    results = {
        "validation": {"layer4 gradcam": _row(0.6, 0.5), "layer3 gradcam": _row(0.7, 0.4)},
        "test": {"layer4 gradcam": _row(0.65, 0.55, 30, 7), "layer3 gradcam": _row(math.nan, 0.45, 30, 7)},
    }

    table = study_table(results)

    lines = table.splitlines()
    assert lines[0].count("pixel AUC") == 4  # pixel AUC and its called-slices variant, per split
    assert lines[2] == "| layer4 gradcam | 0.500 | 0.600 | 0.600 | 0.550 | 0.650 | 0.650 |"
    best = "**layer3 gradcam** (best on validation)"
    assert lines[3] == f"| {best} | 0.400 | 0.700 | 0.700 | 0.450 | n/a | n/a |"
    assert (
        "test: 30 lesion slices in 7 positive volumes, pointing game 0.250 for a pixel drawn at random"
        in table
    )
