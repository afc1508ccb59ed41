"""Metric functions against hand-computed cases (pure numpy, milliseconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lpt import metrics as M

# Training counts straddling both group boundaries; class 4 has exactly n = 20 (medium in the
# standard convention, few in the authors').
COUNTS = [150, 101, 100, 21, 20, 19, 5]
#                 class:  0  1  1  2  3  4  4  5  5  5  6
LABELS = np.array([0, 1, 1, 2, 3, 4, 4, 5, 5, 5, 6])
PREDS = np.array([0, 1, 0, 3, 3, 4, 4, 6, 6, 6, 6])
# per-class accuracy: [1, .5, 0, 1, 1, 0, 1]


def one_hot_scores(preds: np.ndarray, num_classes: int) -> np.ndarray:
    s = np.zeros((len(preds), num_classes))
    s[np.arange(len(preds)), preds] = 1.0
    return s


def test_class_groups_boundaries_both_conventions():
    assert M.class_groups(COUNTS, "standard").tolist() == ["many", "many", "medium", "medium", "medium", "few", "few"]
    assert M.class_groups(COUNTS, "authors").tolist() == ["many", "many", "medium", "medium", "few", "few", "few"]
    with pytest.raises(ValueError):
        M.class_groups(COUNTS, "paper")


def test_per_class_and_mean_per_class():
    acc = M.per_class_accuracy(PREDS, LABELS, 7)
    np.testing.assert_allclose(acc, [1, 0.5, 0, 1, 1, 0, 1])
    assert M.mean_per_class_accuracy(PREDS, LABELS, 7) == pytest.approx(4.5 / 7)
    # a class without test samples is NaN and excluded from the mean
    acc8 = M.per_class_accuracy(PREDS, LABELS, 8)
    assert math.isnan(acc8[7])
    assert M.mean_per_class_accuracy(PREDS, LABELS, 8) == pytest.approx(4.5 / 7)


def test_group_accuracy_n20_boundary_and_class_mean():
    std = M.group_accuracy(PREDS, LABELS, COUNTS, "standard")
    auth = M.group_accuracy(PREDS, LABELS, COUNTS, "authors")
    assert std == pytest.approx({"many": 0.75, "medium": 2 / 3, "few": 0.5})
    assert auth == pytest.approx({"many": 0.75, "medium": 0.5, "few": 2 / 3})
    # few (standard) is the mean of class accuracies (0 and 1), not the sample accuracy 1/4
    assert std["few"] != pytest.approx(0.25)


def test_group_accuracy_empty_group_is_nan():
    out = M.group_accuracy(np.array([0, 1]), np.array([0, 1]), [500, 300], "standard")
    assert out["many"] == 1.0 and math.isnan(out["medium"]) and math.isnan(out["few"])


def test_topk_accuracy():
    scores = one_hot_scores(PREDS, 7)
    assert M.topk_accuracy(scores, LABELS, 1) == pytest.approx(6 / 11)
    # label ranked 5th of 6 counts for top-5, 6th does not
    s = np.array([[6, 5, 4, 3, 2, 1], [6, 5, 4, 3, 2, 1.0]])
    assert M.topk_accuracy(s, np.array([4, 5]), 5) == pytest.approx(0.5)
    assert M.topk_accuracy(s, np.array([4, 5]), 1) == 0.0
    # k beyond C: everything is a hit
    assert M.topk_accuracy(s[:, :3], np.array([2, 0]), 5) == 1.0
    # ties broken by class index, like argmax
    assert M.topk_accuracy(np.zeros((2, 3)), np.array([0, 1]), 1) == 0.5


def test_ece_hand_computed():
    ln3, ln9 = math.log(3), math.log(9)
    # confidences 0.75 (1 of 2 right) and 0.9 (2 of 2 right)
    cos = np.array([[ln3, 0], [ln3, 0], [0, ln9], [0, ln9]])
    labels = np.array([0, 1, 1, 1])
    assert M.expected_calibration_error(cos, labels, scale=1.0, n_bins=10) == pytest.approx(0.5 * 0.25 + 0.5 * 0.1)
    # one bin: |mean acc - mean conf| = |0.75 - 0.825|
    assert M.expected_calibration_error(cos, labels, scale=1.0, n_bins=1) == pytest.approx(0.075)
    # the scale multiplies the cosines before the softmax
    assert M.expected_calibration_error(cos / 20, labels, scale=20.0, n_bins=10) == pytest.approx(0.175)
    # perfectly confident and right: 0
    assert M.expected_calibration_error(np.array([[50.0, 0.0]]), np.array([0]), 1.0, 15) == pytest.approx(0.0, abs=1e-12)


def test_confusion_matrix_rows_are_actual():
    cm = M.confusion_matrix(PREDS, LABELS, 7)
    assert cm.shape == (7, 7) and cm.sum() == len(LABELS)
    assert cm[5, 6] == 3 and cm[2, 3] == 1 and cm[1, 0] == 1 and cm[1, 1] == 1
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(LABELS, minlength=7))


def test_prompt_usage_per_group():
    counts = [200, 50, 10]  # many, medium, few
    labels = np.array([0, 0, 1, 2])
    selected = np.array([[0, 1], [1, 2], [0, 3], [3, 3]])
    use = M.prompt_usage(selected, labels, counts, pool_size=5)
    np.testing.assert_array_equal(use["all"], [2, 2, 1, 3, 0])
    np.testing.assert_array_equal(use["many"], [1, 2, 1, 0, 0])
    np.testing.assert_array_equal(use["medium"], [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(use["few"], [0, 0, 0, 2, 0])
    assert use["all"].sum() == selected.size
    none = M.prompt_usage(None, labels, counts, pool_size=5)
    assert all(v.sum() == 0 for v in none.values())
    with pytest.raises(ValueError):
        M.prompt_usage(np.array([[0, 5]] * 4), labels, counts, pool_size=5)


def test_trainable_share():
    # the paper's ViT-B/16 figure: 1,028,160 prompt+key params / 85.8 M backbone ≈ 1.2 %
    assert M.trainable_share(1_028_160, 85_798_656) == pytest.approx(0.012, abs=5e-4)
    with pytest.raises(ValueError):
        M.trainable_share(10, 0)


def test_summarize_keys_and_json_safe():
    scores = one_hot_scores(PREDS, 7)
    out = M.summarize(scores, LABELS, COUNTS, scale=20.0, ece_bins=15)
    assert out["overall"] == pytest.approx(6 / 11)
    assert out["few"] == pytest.approx(0.5) and out["few_authors"] == pytest.approx(2 / 3)
    assert out["medium"] == pytest.approx(2 / 3) and out["medium_authors"] == pytest.approx(0.5)
    assert out["mean_per_class"] == pytest.approx(4.5 / 7)
    assert out["num_samples"] == 11
    # no few class -> None (valid JSON), not NaN
    out2 = M.summarize(one_hot_scores(np.array([0, 1]), 2), np.array([0, 1]), [500, 300], 20.0)
    assert out2["few"] is None
    json.dumps(out2, allow_nan=False)
