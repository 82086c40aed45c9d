"""``ranked_cuts``: the threshold sweep behind the ROC and precision-recall curves and the slice rule."""

from __future__ import annotations

import numpy as np

from pipeline.workflow.ranking import ranked_cuts


def test_ties_are_called_together_and_counts_accumulate():
    ranked, cuts, true_positives = ranked_cuts([0.2, 0.9, 0.5, 0.5, 0.1], [0, 1, 1, 0, 1])
    np.testing.assert_array_equal(ranked, [0.9, 0.5, 0.5, 0.2, 0.1])
    np.testing.assert_array_equal(cuts + 1, [1, 3, 4, 5])  # samples called at each cut
    np.testing.assert_array_equal(true_positives, [1, 2, 2, 3])


def test_no_samples_give_no_cuts():
    ranked, cuts, true_positives = ranked_cuts([], [])
    assert ranked.size == cuts.size == true_positives.size == 0
