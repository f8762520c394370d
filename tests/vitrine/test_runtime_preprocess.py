"""The preprocessing's resize is bounded before it runs: a thin image cannot grow to gigabytes (issue 14)."""
from __future__ import annotations

import time

import pytest
from PIL import Image

from vitrine.errors import UserError
from vitrine.runtime.preprocess import MAX_RESIZED_CROPS, PreprocessSettings, checked_resized_size, preprocess_image

SHORTEST = PreprocessSettings(image_size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
LONGEST = PreprocessSettings(image_size=224, resize_mode="longest", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("size", [(1, 10_000), (10_000, 1), (1, 100_000), (3, 1000)])
def test_thin_images_are_refused_before_resizing(size):
    image = Image.new("RGB", size)
    started = time.perf_counter()
    with pytest.raises(UserError, match="too elongated"):
        preprocess_image(image, SHORTEST)  # unbounded, 1x10000 would resize to 224 x 2,240,000 px
    assert time.perf_counter() - started < 0.5


def test_a_resize_to_zero_pixels_is_refused():
    with pytest.raises(UserError, match="too thin"):
        checked_resized_size(1, 10_000, LONGEST)  # the short side would round to 0 px


def test_the_bound_is_an_aspect_ratio_of_max_resized_crops():
    assert checked_resized_size(1, MAX_RESIZED_CROPS, SHORTEST) == (224, 224 * MAX_RESIZED_CROPS)
    with pytest.raises(UserError):
        checked_resized_size(1, MAX_RESIZED_CROPS + 1, SHORTEST)
    assert preprocess_image(Image.new("RGB", (20, 400)), SHORTEST).shape == (3, 224, 224)  # 20:1 is fine
