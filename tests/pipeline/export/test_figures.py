"""Heatmap overlays: the lesion outline drawn over the map, and only where a slice has a lesion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.export.figures import plot_heatmap_slices


def _white_pixels(path: Path) -> int:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return int((pixels.min(axis=2) > 120).sum())


def test_lesion_outline_is_drawn_on_the_slices_that_have_one(tmp_path: Path) -> None:
    ct, heat = np.zeros((32, 32)), np.zeros((32, 32))  # black slice, no heat
    lesion = np.zeros((32, 32), dtype=bool)
    lesion[10:20, 12:22] = True
    paths = plot_heatmap_slices(
        [
            (tmp_path / "with.png", ct, heat, "slice", lesion),
            (tmp_path / "without.png", ct, heat, "slice", None),
            (tmp_path / "again.png", ct, heat, "slice", lesion),
        ]
    )

    assert [path.name for path in paths] == ["with.png", "without.png", "again.png"]
    # the white title area and colour bar are the same in each; the outline adds white pixels
    with_outline, without, again = (_white_pixels(path) for path in paths)
    assert with_outline > without + 20
    assert again == with_outline  # the previous slice's outline was removed, not drawn twice
