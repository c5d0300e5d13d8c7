"""Condition fidelity (diffscaler.eval.fidelity) on inputs with known answers: identical maps score 1, disjoint
maps 0, a 1-px shift of an edge still 1; the reference rows; maps that do not fit their images.

.venv/bin/python -m pytest tests/test_fidelity.py -q
"""

from __future__ import annotations

import numpy as np
import pytest

from diffscaler.config import DataConfig
from diffscaler.data.conditions import ConditionError, ConditionSpec, foreground_mask
from diffscaler.eval.fidelity import (
    condition_fidelity,
    derangement,
    edge_f1,
    mask_iou,
    mismatched_fidelity,
    reference_rows,
)

CANNY = ConditionSpec.from_config("canny", DataConfig())
MASK = ConditionSpec.from_config("mask", DataConfig())


def line_map(column: int, size: int = 16) -> np.ndarray:
    """(1, 1, size, size) uint8: a vertical 1-px edge at `column`, rows 2..13."""
    out = np.zeros((1, 1, size, size), np.uint8)
    out[0, 0, 2:14, column] = 255
    return out


def squares(n: int = 6, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """n images of one dark square each on white, squares at different places, and their masks."""
    images = np.full((n, size, size, 3), 255, np.uint8)
    masks = np.zeros((n, 1, size, size), np.uint8)
    for i in range(n):
        y, x = (i * 5) % 9, (i * 3) % 9
        images[i, y : y + 6, x : x + 6] = (30 + 20 * i, 60, 90)
        masks[i, 0, y : y + 6, x : x + 6] = 255
    return images, masks


def test_edge_f1_known_answers():
    edge = line_map(7)
    assert edge_f1(edge, edge).tolist() == [1.0]  # identical
    assert edge_f1(line_map(8), edge).tolist() == [1.0]  # a 1-px shift is within the tolerance
    assert edge_f1(line_map(6), edge).tolist() == [1.0]
    assert edge_f1(line_map(9), edge).tolist() == [0.0]  # 2 px off: disjoint at 1-px tolerance
    assert edge_f1(line_map(9), edge, tolerance=2).tolist() == [1.0]
    assert edge_f1(line_map(12), edge).tolist() == [0.0]  # disjoint
    empty = np.zeros_like(edge)
    assert edge_f1(empty, empty).tolist() == [1.0]  # nothing asked, nothing drawn
    assert edge_f1(empty, edge).tolist() == [0.0] and edge_f1(edge, empty).tolist() == [0.0]
    # half the predicted edge lies on the line (rows 2..7), half far away: P = 6/12; the given edge's rows
    # 2..8 are within 1 px of a predicted pixel: R = 7/12; F1 = 2PR / (P + R) = 7/13
    half = np.zeros_like(edge)
    half[0, 0, 2:8, 7] = 255
    half[0, 0, 8:14, 13] = 255
    np.testing.assert_allclose(edge_f1(half, edge), [7 / 13])


def test_mask_iou_known_answers():
    a = np.zeros((1, 1, 8, 8), np.uint8)
    a[..., :, :4] = 255  # left half
    b = np.zeros_like(a)
    b[..., :, 2:6] = 255  # middle half: overlaps a on 2 of 6 columns
    assert mask_iou(a, a).tolist() == [1.0]
    np.testing.assert_allclose(mask_iou(a, b), [1 / 3])
    assert mask_iou(a, 255 - a).tolist() == [0.0]  # disjoint
    assert mask_iou(np.zeros_like(a), np.zeros_like(a)).tolist() == [1.0]


def test_rgb_mask_extractor_keeps_white_inside_the_outline():
    images, masks = squares(1)
    images[0, 3:5, 3:5] = 255  # a white "eye" inside the square at (0, 0)
    assert (foreground_mask(images[0], 24) == masks[0, 0]).all()


def test_generated_images_scored_with_the_task_extractor_and_reference_rows():
    images, masks = squares()
    score = condition_fidelity(MASK, images, masks)
    assert score.metric == "mask_iou" and score.mean == 1.0 and score.n == 6
    edges = CANNY.extract(images)[:, None]
    assert condition_fidelity(CANNY, images, edges).mean == 1.0  # the canny ceiling: exact by construction
    rows = reference_rows(MASK, images, masks, seed=0)
    assert rows["ceiling"].mean == 1.0
    assert 0 <= rows["mismatched"].mean < 0.7  # other images' squares overlap only partly
    assert rows["mismatched"] == mismatched_fidelity(MASK, images, masks, seed=0)  # deterministic
    order = derangement(50, seed=3)
    assert sorted(order) == list(range(50)) and not (order == np.arange(50)).any()
    assert (derangement(50, seed=3) == order).all() and not (derangement(50, seed=4) == order).all()
    # a map made by another tool has no extractor here: fidelity n/a
    key = ConditionSpec.from_config("key:depth.png", DataConfig())
    assert condition_fidelity(key, images, masks) is None


def test_maps_that_do_not_fit_their_images_are_named():
    images, masks = squares()
    with pytest.raises(ConditionError, match=r"6 images of 16x16 px, but 6 maps of 8x8 px"):
        condition_fidelity(MASK, images, masks[:, :, ::2, ::2])
    with pytest.raises(ConditionError, match=r"6 images of 16x16 px, but 5 maps"):
        condition_fidelity(MASK, images, masks[:5])
    with pytest.raises(ConditionError, match=r"single-channel maps"):
        condition_fidelity(MASK, images, np.repeat(masks, 3, axis=1))
    with pytest.raises(ConditionError, match=r"uint8 RGB"):
        condition_fidelity(MASK, images.astype(np.float32), masks)
