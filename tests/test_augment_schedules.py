"""Augmentation (crops, flips) and learning-rate schedules."""

import math

import numpy as np
import pytest

from dpnet.augment import Augmentation
from dpnet.data.images import ImageArray
from dpnet.schedules import make_schedule


def test_crop_and_flip_move_pixels_exactly():
    X = np.arange(2 * 1 * 4 * 4, dtype=np.float64).reshape(2, 1, 4, 4)
    aug = Augmentation(crop_padding=1, flip_probability=0.5)
    choices = (np.array([False, True]), np.array([0, 2]), np.array([1, 1]))
    out = aug.apply(X, choices)
    # image 0: shifted down by one (dy=0 takes the padded row above), dx=1 is no horizontal shift
    np.testing.assert_array_equal(out[0, 0, 0], 0)
    np.testing.assert_array_equal(out[0, 0, 1:], X[0, 0, :3])
    # image 1: shifted up by one (dy=2), then mirrored
    np.testing.assert_array_equal(out[1, 0, :3], X[1, 0, 1:, ::-1])
    np.testing.assert_array_equal(out[1, 0, 3], 0)
    assert out.shape == X.shape and not np.shares_memory(out, X)


def test_shards_transform_like_the_whole_batch():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10, 3, 8, 8))
    aug = Augmentation()
    choices = aug.draw(np.random.default_rng(7), 10)
    whole = aug.apply(X, choices)
    parts = [aug.apply(X[a:b], tuple(c[a:b] for c in choices)) for a, b in ((0, 3), (3, 7), (7, 10))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("padding", [0, 1, 4])
def test_uint8_crops_give_the_converted_crops_bit_for_bit(dtype, padding):
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, size=(40, 3, 8, 6), dtype=np.uint8)
    mean = rng.uniform(0, 255, size=(3, 8, 6))  # not representable in float32: the rounding is tested
    images = ImageArray(raw, mean, dtype)
    aug = Augmentation(crop_padding=padding)
    rows = np.array([3, 3, 0, 39, 17, 5, 22, 8, 11, 30, 2, 19, 25, 36, 14, 7, 1, 33, 28])  # repeats, any order
    choices = aug.draw(np.random.default_rng(4), len(rows))
    expected = aug.apply(images[rows], choices)
    got = aug.take(images, rows, choices)
    assert got.dtype == expected.dtype == dtype and got.shape == expected.shape
    assert np.array_equal(got.view(np.uint8), expected.view(np.uint8))  # every bit, padding zeros included
    plain = rng.standard_normal((40, 3, 8, 6))  # not an ImageArray: take is apply
    np.testing.assert_array_equal(aug.take(plain, rows, choices), aug.apply(plain[rows], choices))


def test_draw_statistics():
    flips, dy, dx = Augmentation(crop_padding=4, flip_probability=0.5).draw(np.random.default_rng(1), 20000)
    assert abs(flips.mean() - 0.5) < 0.02
    assert dy.min() == 0 and dy.max() == 8 and abs(dx.mean() - 4) < 0.1


def test_no_padding_only_flips():
    X = np.arange(8.0).reshape(1, 1, 2, 4)
    out = Augmentation(crop_padding=0, flip_probability=1.0).apply(X, (np.array([True]), np.zeros(1, int),
                                                                        np.zeros(1, int)))
    np.testing.assert_array_equal(out, X[..., ::-1])


@pytest.mark.parametrize("kwargs", [dict(crop_padding=-1), dict(crop_padding=1.5), dict(flip_probability=2)])
def test_bad_augmentation_arguments(kwargs):
    with pytest.raises(ValueError):
        Augmentation(**kwargs)


def test_schedules():
    assert make_schedule()(12345) == 1.0
    step = make_schedule("step", milestones=[10, 20], decay=0.1)
    assert [step(t) for t in (0, 9, 10, 19, 20)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    cosine = make_schedule("cosine", total_iterations=100)
    assert cosine(0) == 1.0 and cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    warm = make_schedule("cosine", total_iterations=100, warmup_iterations=10)
    assert warm(0) == pytest.approx(0.1) and warm(9) == pytest.approx(1.0)
    assert warm(55) == pytest.approx(0.5) and warm(100) == pytest.approx(0.0)
    assert make_schedule("cosine", total_iterations=10, final_factor=0.1)(10) == pytest.approx(0.1)
    exponential = make_schedule("exponential", decay=0.5, iterations_per_epoch=10)
    assert [exponential(t) for t in (0, 9, 10, 25)] == [1, 1, 0.5, 0.25]
    assert all(math.isfinite(warm(t)) for t in range(200))


@pytest.mark.parametrize("kwargs, match", [(dict(name="linear"), "unknown"), (dict(name="cosine"), "total"),
                                           (dict(name="exponential"), "iterations_per_epoch"),
                                           (dict(warmup_iterations=-1), "warmup")])
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)
