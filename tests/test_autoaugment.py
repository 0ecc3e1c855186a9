"""RandAugment and TrivialAugmentWide: each operation against PIL's (which torchvision's
policies call on PIL images), and the policies in the pipeline: reproducible, per image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from resnet_jax.data import autoaugment as aa
from resnet_jax.data import pipeline
from resnet_jax.data.sources import DATASETS, ArraySource


def photo(channels: int = 3, size: int = 32) -> np.ndarray:
    """A smooth random image with some structure (not uniform noise)."""
    rng = np.random.default_rng(channels)
    base = rng.integers(30, 220, (size // 4, size // 4, channels)).astype(np.uint8)
    return np.asarray(Image.fromarray(base.squeeze(-1) if channels == 1 else base).resize(
        (size, size), Image.BILINEAR)).reshape(size, size, channels)


def pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)


def back(image: Image.Image, channels: int) -> np.ndarray:
    out = np.asarray(image)
    return out.reshape(*out.shape[:2], channels)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("ours,theirs,arg", [
    (aa.posterize, ImageOps.posterize, 3),
    (aa.solarize, ImageOps.solarize, 100),
    (aa.autocontrast, lambda im, _: ImageOps.autocontrast(im), None),
    (aa.equalize, lambda im, _: ImageOps.equalize(im), None),
])
def test_pixel_operations_equal_pil(channels, ours, theirs, arg):
    image = photo(channels)
    np.testing.assert_array_equal(ours(image, arg), back(theirs(pil(image), arg), channels))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("ours,enhancer", [
    (aa.brightness, ImageEnhance.Brightness), (aa.color, ImageEnhance.Color),
    (aa.contrast, ImageEnhance.Contrast), (aa.sharpness, ImageEnhance.Sharpness),
])
@pytest.mark.parametrize("m", [-0.7, 0.5])
def test_enhancements_equal_pil_to_one_level(channels, ours, enhancer, m):
    image = photo(channels)
    expected = back(enhancer(pil(image)).enhance(1.0 + m), channels).astype(int)
    got = ours(image, m).astype(int)
    # PIL blends in 8-bit fixed point; one level of rounding apart at most
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize("channels", [1, 3])
def test_geometric_operations_equal_pil(channels):
    image = photo(channels)
    im = pil(image)
    shifted = im.transform(im.size, Image.AFFINE, (1, 0, -5, 0, 1, 0), Image.NEAREST)
    np.testing.assert_array_equal(aa.translate_x(image, 5), back(shifted, channels))
    sheared = im.transform(im.size, Image.AFFINE, (1, 0.3, 0, 0, 1, 0), Image.NEAREST)
    np.testing.assert_array_equal(aa.shear_x(image, 0.3), back(sheared, channels))
    np.testing.assert_array_equal(aa.rotate(image, 90), back(im.rotate(90, Image.NEAREST),
                                                            channels))
    assert np.array_equal(aa.rotate(image, 0), image)


@pytest.mark.torch
def test_the_magnitude_spaces_are_torchvisions():
    assert aa.RAND_AUGMENT["rotate"][1](32, 32)[9] == pytest.approx(9.0)  # 30 * 9 / 30
    assert aa.TRIVIAL_AUGMENT_WIDE["rotate"][1](32, 32)[-1] == pytest.approx(135.0)
    assert list(aa.RAND_AUGMENT["posterize"][1](32, 32)[[0, -1]]) == [8, 4]
    assert list(aa.TRIVIAL_AUGMENT_WIDE["posterize"][1](32, 32)[[0, -1]]) == [8, 2]
    assert aa.RAND_AUGMENT["translate_x"][1](32, 331)[-1] == pytest.approx(150.0)
    assert len(aa.TRIVIAL_AUGMENT_WIDE) == 14


@pytest.mark.parametrize("policy", aa.POLICIES)
def test_a_policy_in_the_pipeline_changes_images_reproducibly_and_per_image(policy):
    rng = np.random.default_rng(0)
    images = np.stack([photo(1, 28)] * 256)
    source = ArraySource(images, rng.integers(0, 10, 256).astype(np.int32))
    info = DATASETS["fashion_mnist"]
    plain = next(pipeline.train_batches(source, info, pipeline.TrainInput(128, 1, augment="none")))
    a = next(pipeline.train_batches(source, info,
                                    pipeline.TrainInput(128, 1, augment="none", policy=policy)))
    b = next(pipeline.train_batches(source, info,
                                    pipeline.TrainInput(128, 1, augment="none", policy=policy)))
    c = next(pipeline.train_batches(source, info,
                                    pipeline.TrainInput(128, 2, augment="none", policy=policy)))
    np.testing.assert_array_equal(a["image"], b["image"])
    changed = np.any(a["image"] != plain["image"], axis=(1, 2, 3))
    assert 0.5 < changed.mean() < 1.0  # identity and no-op draws leave some as they were
    # operations without a magnitude (autocontrast, equalize...) give equal results on these
    # equal images; the rest draw their own magnitudes and signs
    assert len({im.tobytes() for im in a["image"][changed]}) > 0.5 * changed.sum()
    assert not np.array_equal(a["image"], c["image"])
