"""Corruptions against the generator scripts' tables and formulas (scipy / PIL / colorsys / numpy references),
for each benchmark: CIFAR-10-C, Tiny-ImageNet-C and ImageNet-C."""
import colorsys
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from _images import photo_crops, to_grayscale, to_tensor
from fastai_jsd.robustness import (BENCHMARKS, CORRUPTIONS, EXTRA_CORRUPTIONS, benchmarks, corrupt, corruptions,
                                   filters, shuffle)

ALL = CORRUPTIONS + EXTRA_CORRUPTIONS
DETERMINISTIC = {'defocus_blur', 'zoom_blur', 'brightness', 'contrast', 'pixelate', 'jpeg_compression',
                 'gaussian_blur', 'saturate'}


@pytest.fixture(scope='module')
def crops():
    """Six real 32 px RGB crops, float [6, 3, 32, 32], values multiples of 1/255."""
    return to_tensor(photo_crops(6, 32, 32, seed=11))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def photos_of_size(n, size, seed):
    """`n` real-photo crops as float [n, 3, size, size] for sizes up to 224 px (larger windows than _images'
    photo_crops allows at 224 px, resized)."""
    if size <= 150:
        return to_tensor(photo_crops(n, size, size, seed=seed))
    windows = photo_crops(n, 150, 150, seed=seed)
    return to_tensor(np.stack([np.asarray(Image.fromarray(w).resize((size, size), Image.BILINEAR)) for w in windows]))


def hwc(image):
    """float [C, H, W] tensor -> float64 [H, W, C] array, the script's layout."""
    return image.permute(1, 2, 0).double().numpy()


# ------------------------------------------------------------------------------- the benchmarks' tables

# The severity tables as the generator scripts write them (hendrycks/robustness, ImageNet-C/create_c): the
# `c = [...]` of each corruption in make_cifar_c.py, make_tinyimagenet_c.py and make_imagenet_c.py. Zoom blur:
# the (stop, step) of its np.arange(1, stop, step); elastic: the script's IMSIZE (or 244) times its fractions.
SCRIPT_TABLES = {
    'cifar10-c': {
        'gaussian_noise': [0.04, 0.06, .08, .09, .10],
        'shot_noise': [500, 250, 100, 75, 50],
        'impulse_noise': [.01, .02, .03, .05, .07],
        'speckle_noise': [.06, .1, .12, .16, .2],
        'gaussian_blur': [.4, .6, 0.7, .8, 1],
        'glass_blur': [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        'defocus_blur': [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        'motion_blur': [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        'zoom_blur': [(1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)],
        'fog': [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        'frost': [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        'snow': [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
                 (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        'spatter': [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                    (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
        'contrast': [.75, .5, .4, .3, 0.15],
        'brightness': [.05, .1, .15, .2, .3],
        'saturate': [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        'jpeg_compression': [80, 65, 58, 50, 40],
        'pixelate': [0.95, 0.9, 0.85, 0.75, 0.65],
        'elastic_transform': [(32 * 0, 32 * 0, 32 * 0.08), (32 * 0.05, 32 * 0.2, 32 * 0.07),
                              (32 * 0.08, 32 * 0.06, 32 * 0.06), (32 * 0.1, 32 * 0.04, 32 * 0.05),
                              (32 * 0.1, 32 * 0.03, 32 * 0.03)],
    },
    'tiny-imagenet-c': {
        'gaussian_noise': [0.04, 0.08, .12, .15, .18],
        'shot_noise': [250, 100, 50, 30, 15],
        'impulse_noise': [.01, .02, .05, .08, .14],
        'speckle_noise': [.15, .2, 0.25, 0.3, 0.35],
        'gaussian_blur': [.5, .75, 1, 1.25, 1.5],
        'glass_blur': [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
        'defocus_blur': [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        'motion_blur': [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
        'zoom_blur': [(1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)],
        'fog': [(.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)],
        'frost': [(1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)],
        'snow': [(0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
                 (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)],
        'spatter': [(0.62, 0.1, 0.7, 0.7, 0.6, 0), (0.65, 0.1, 0.8, 0.7, 0.6, 0), (0.65, 0.3, 1, 0.69, 0.6, 0),
                    (0.65, 0.1, 0.7, 0.68, 0.6, 1), (0.65, 0.1, 0.5, 0.67, 0.6, 1)],
        'contrast': [.4, .3, .2, .1, 0.05],
        'brightness': [.1, .2, .3, .4, .5],
        'saturate': [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
        'jpeg_compression': [65, 58, 50, 40, 25],
        'pixelate': [0.9, 0.8, 0.7, 0.6, 0.5],
        'elastic_transform': [(64 * 0, 64 * 0, 64 * 0.08), (64 * 0.05, 64 * 0.3, 64 * 0.06),
                              (64 * 0.1, 64 * 0.08, 64 * 0.06), (64 * 0.1, 64 * 0.03, 64 * 0.03),
                              (64 * 0.16, 64 * 0.03, 64 * 0.02)],
    },
    'imagenet-c': {
        'gaussian_noise': [.08, .12, 0.18, 0.26, 0.38],
        'shot_noise': [60, 25, 12, 5, 3],
        'impulse_noise': [.03, .06, .09, 0.17, 0.27],
        'speckle_noise': [.15, .2, 0.35, 0.45, 0.6],
        'gaussian_blur': [1, 2, 3, 4, 6],
        'glass_blur': [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
        'defocus_blur': [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        'motion_blur': [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
        'zoom_blur': [(1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)],
        'fog': [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
        'frost': [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)],
        'snow': [(0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
                 (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)],
        'spatter': [(0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                    (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)],
        'contrast': [0.4, .3, .2, .1, .05],
        'brightness': [.1, .2, .3, .4, .5],
        'saturate': [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
        'jpeg_compression': [25, 18, 15, 10, 7],
        'pixelate': [0.6, 0.5, 0.4, 0.3, 0.25],
        'elastic_transform': [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2),
                              (244 * 0.05, 244 * 0.01, 244 * 0.02), (244 * 0.07, 244 * 0.01, 244 * 0.02),
                              (244 * 0.12, 244 * 0.01, 244 * 0.02)],
    },
}
NATIVE_SIZE = {'cifar10-c': 32, 'tiny-imagenet-c': 64, 'imagenet-c': 224}
EVERY = list(BENCHMARKS)


def table(benchmark, name, severity):
    return SCRIPT_TABLES[benchmark][name][severity - 1]


def test_benchmark_tables_are_the_scripts():
    assert BENCHMARKS == ('cifar10-c', 'tiny-imagenet-c', 'imagenet-c')
    for name, tables in SCRIPT_TABLES.items():
        chosen = benchmarks.get_benchmark(name, 1, 1)
        assert chosen.native_size == NATIVE_SIZE[name]
        assert set(chosen.tables) == set(ALL) == set(tables)
        for corruption, expected in tables.items():
            for severity, setting in enumerate(expected, 1):
                assert chosen.setting(corruption, severity) == pytest.approx(setting, rel=1e-12), (name, corruption)
    # Tiny-ImageNet-C and ImageNet-C files were saved as JPEG (quality 85); CIFAR-10-C's as raw uint8 arrays.
    assert [benchmarks.get_benchmark(name, 1, 1).saved_as_jpeg for name in BENCHMARKS] == [False, True, True]


@pytest.mark.parametrize('size, expected', [((32, 32), 'cifar10-c'), ((48, 48), 'cifar10-c'),
                                            ((49, 49), 'tiny-imagenet-c'), ((64, 64), 'tiny-imagenet-c'),
                                            ((128, 300), 'tiny-imagenet-c'), ((129, 129), 'imagenet-c'),
                                            ((224, 224), 'imagenet-c'), ((40, 500), 'cifar10-c'),
                                            ((500, 100), 'tiny-imagenet-c')])
def test_benchmark_none_chooses_by_the_smaller_side(size, expected):
    assert benchmarks.benchmark_for_size(*size) == expected
    x = torch.rand(2, 3, *size, generator=seeded(1))
    for name in ('pixelate', 'gaussian_noise'):  # their tables differ between all three benchmarks at severity 5
        chosen = corrupt(x, name, 5, seeded(2))
        assert torch.equal(chosen, corrupt(x, name, 5, seeded(2), benchmark=expected)), (size, name)
        for other in set(BENCHMARKS) - {expected}:
            assert not torch.equal(chosen, corrupt(x, name, 5, seeded(2), benchmark=other)), (size, name, other)


def test_unknown_benchmark_lists_the_three(crops):
    for bad in ('cifar100-c', 'ImageNet-C', 3):
        with pytest.raises(ValueError, match="'cifar10-c', 'tiny-imagenet-c', 'imagenet-c'"):
            corrupt(crops, 'fog', 1, benchmark=bad)
    with pytest.raises(ValueError, match='published_jpeg'):
        corrupt(crops, 'fog', 1, published_jpeg='yes')


def published(result):
    """The published files' save, written with numpy and PIL: np.uint8 of the 0..255 values, JPEG quality 85."""
    saved = []
    for image in result:
        buffer = io.BytesIO()
        Image.fromarray(np.uint8(hwc(image) * 255 + 1e-3)).save(buffer, 'JPEG', quality=85, optimize=True)
        saved.append(np.asarray(Image.open(buffer), dtype=np.float64) / 255)
    return np.stack(saved)


@pytest.mark.parametrize('benchmark', EVERY)
def test_published_jpeg_is_the_published_files_save(crops, benchmark):
    x = crops[:3]
    plain = corrupt(x, 'contrast', 2, benchmark=benchmark, published_jpeg=False)
    np.testing.assert_allclose(hwc_batch(plain), np.clip((hwc_batch(x) - hwc_batch(x).mean((1, 2), keepdims=True))
                                                         * table(benchmark, 'contrast', 2)
                                                         + hwc_batch(x).mean((1, 2), keepdims=True), 0, 1),
                               atol=1e-6)
    saved = corrupt(x, 'contrast', 2, benchmark=benchmark)  # published_jpeg=True is the default
    if benchmark == 'cifar10-c':  # its files are raw uint8 arrays: nothing to emulate beyond the corruption
        assert torch.equal(saved, plain)
    else:
        np.testing.assert_allclose(hwc_batch(saved), published(plain), atol=1e-6)
        assert not torch.equal(saved, plain)
    noisy = corrupt(x, 'gaussian_noise', 3, seeded(4), benchmark=benchmark)
    again = corrupt(x, 'gaussian_noise', 3, seeded(4), benchmark=benchmark, published_jpeg=False)
    if benchmark != 'cifar10-c':
        np.testing.assert_allclose(hwc_batch(noisy), published(again), atol=1e-6)


def hwc_batch(images):
    return images.permute(0, 2, 3, 1).double().numpy()


# ----------------------------------------------------------------------------------------------- general

def test_lists_match_cifar_10_c():
    assert CORRUPTIONS == ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
                           'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
                           'elastic_transform', 'pixelate', 'jpeg_compression')
    assert EXTRA_CORRUPTIONS == ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')


@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('channels', [3, 1])
def test_every_corruption_keeps_shape_range_input_and_is_reproducible(crops, channels, benchmark):
    x = crops[:4] if channels == 3 else to_tensor(to_grayscale(photo_crops(4, 32, 32, seed=11)))
    before = x.clone()
    for name in ALL:
        for severity in range(1, 6):
            out = corrupt(x, name, severity, generator=seeded(severity), benchmark=benchmark)
            assert out.shape == x.shape and out.dtype == x.dtype, name
            assert 0 <= float(out.min()) and float(out.max()) <= 1, (name, severity)
            assert not torch.equal(out, x), (name, severity)
            again = corrupt(x, name, severity, generator=seeded(severity), benchmark=benchmark)
            assert torch.equal(out, again), (name, severity)
            if name not in DETERMINISTIC:
                other = corrupt(x, name, severity, generator=seeded(100 + severity), benchmark=benchmark)
                assert not torch.equal(out, other), (name, severity)
    assert torch.equal(x, before)


@pytest.mark.parametrize('name', sorted(set(ALL) - DETERMINISTIC))
def test_each_image_draws_its_own_randomness(name):
    image = to_tensor(photo_crops(1, 32, 32, seed=3))
    for benchmark in EVERY:
        out = corrupt(image.expand(4, -1, -1, -1), name, 3, generator=seeded(1), benchmark=benchmark)
        assert not torch.equal(out[0], out[1]) and not torch.equal(out[2], out[3]), benchmark


def test_other_sizes_and_dtypes_work():
    x = to_tensor(photo_crops(2, 20, 48, seed=2))  # non-square, not 32
    for benchmark in EVERY:
        for name in ALL:
            out = corrupt(x, name, 5, generator=seeded(), benchmark=benchmark)
            assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1, name
    big = to_tensor(photo_crops(2, 96, 96, seed=2)).double()
    for name in ('glass_blur', 'motion_blur', 'elastic_transform', 'snow', 'fog', 'defocus_blur'):
        out = corrupt(big, name, 4, generator=seeded())
        assert out.dtype == torch.float64 and out.shape == big.shape, name


def test_blur_strength_scales_with_image_size():
    """A corrupted 64 px image resized to 32 px is about the 32 px image corrupted (lengths scale)."""
    small = to_tensor(photo_crops(8, 32, 32, seed=4))
    large = torch.nn.functional.interpolate(small, scale_factor=2, mode='bilinear', align_corners=False)
    for name in ('gaussian_blur', 'defocus_blur', 'zoom_blur'):
        shrunk = torch.nn.functional.avg_pool2d(corrupt(large, name, 5, benchmark='cifar10-c'), 2)
        reference = corrupt(torch.nn.functional.avg_pool2d(large, 2), name, 5, benchmark='cifar10-c')
        unscaled = torch.nn.functional.avg_pool2d(large, 2)
        assert (shrunk - reference).abs().mean() < 0.5 * (unscaled - reference).abs().mean(), name


def test_color_corruptions_on_one_channel_are_the_luma_of_the_gray_rgb_image():
    gray = to_tensor(to_grayscale(photo_crops(3, 32, 32, seed=5)))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for name in ('frost', 'spatter', 'saturate'):
        for severity in (2, 4):
            one = corrupt(gray, name, severity, generator=seeded(7))
            three = corrupt(gray.expand(-1, 3, -1, -1), name, severity, generator=seeded(7))
            torch.testing.assert_close(one, (three * luma).sum(1, keepdim=True), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- noises

@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_additive_noise_std_matches_the_table(severity, benchmark):
    gray = torch.full((4, 3, 32, 32), 0.5)
    rng = np.random.default_rng(severity)
    for name in ('gaussian_noise', 'speckle_noise'):
        std = table(benchmark, name, severity)
        out = corrupt(gray, name, severity, generator=seeded(severity), benchmark=benchmark, published_jpeg=False)
        # the script: clip(x + N(0, std)) or clip(x + x N(0, std)), x = 0.5, drawn with numpy
        spread = std * (0.5 if name == 'speckle_noise' else 1)
        expected = np.clip(0.5 + rng.normal(0, spread, 10 ** 6), 0, 1)
        assert float(out.mean()) == pytest.approx(expected.mean(), abs=0.05 * spread)
        assert float(out.std()) == pytest.approx(expected.std(), rel=0.03), (name, std)


@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_shot_noise_is_poisson_with_the_table_photon_count(severity, benchmark):
    photons = table(benchmark, 'shot_noise', severity)
    value = 0.4 if photons >= 50 else 0.1  # few photons: keep counts / photons below the clip at 1
    level = torch.full((8, 3, 32, 32), value)
    out = corrupt(level, 'shot_noise', severity, generator=seeded(severity), benchmark=benchmark,
                  published_jpeg=False)
    counts = out * photons
    assert torch.allclose(counts, counts.round(), atol=1e-3)  # whole photon counts
    assert float(counts.mean()) == pytest.approx(value * photons, rel=0.02)
    assert float(counts.var()) == pytest.approx(value * photons, rel=0.05)


@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_impulse_noise_salts_and_peppers_the_table_fraction(severity, benchmark):
    amount = table(benchmark, 'impulse_noise', severity)
    gray = torch.full((64, 3, 32, 32), 0.5)
    out = corrupt(gray, 'impulse_noise', severity, generator=seeded(severity), benchmark=benchmark,
                  published_jpeg=False)
    n = gray.numel()  # >= 980 expected hits of each kind: 15 % is over 4.5 standard deviations
    assert float((out == 0).sum()) / n == pytest.approx(amount / 2, rel=0.15)
    assert float((out == 1).sum()) / n == pytest.approx(amount / 2, rel=0.15)
    assert bool(((out == 0) | (out == 1) | (out == 0.5)).all())
    # per channel, as skimage's random_noise on an H x W x 3 array
    hit = out != 0.5
    assert bool((hit.any(1) & ~hit.all(1)).any())


# ---------------------------------------------------------------------------------- photometric, closed form

@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_contrast_matches_the_script(crops, severity, benchmark):
    factor = table(benchmark, 'contrast', severity)
    out = corrupt(crops, 'contrast', severity, benchmark=benchmark, published_jpeg=False)
    for image, result in zip(crops, out):
        x = hwc(image)
        means = np.mean(x, axis=(0, 1), keepdims=True)  # the script's per-channel mean
        expected = np.clip((x - means) * factor + means, 0, 1)
        np.testing.assert_allclose(hwc(result), expected, atol=1e-6)


def hsv_reference(image, change):
    """Per-pixel HSV edit with colorsys (the HSV of skimage's rgb2hsv / hsv2rgb)."""
    out = np.empty_like(image)
    for (i, j), _ in np.ndenumerate(image[..., 0]):
        h, s, v = colorsys.rgb_to_hsv(*image[i, j])
        out[i, j] = colorsys.hsv_to_rgb(*change(h, s, v))
    return np.clip(out, 0, 1)


@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_brightness_matches_hsv_value_shift(crops, severity, benchmark):
    shift = table(benchmark, 'brightness', severity)
    x = crops[:2].clone()
    x[0, :, :4, :4] = 0  # black: saturation 0, turns gray
    x[1, :, :4, :4] = 0.6  # gray
    out = corrupt(x, 'brightness', severity, benchmark=benchmark, published_jpeg=False)
    for image, result in zip(x, out):
        expected = hsv_reference(hwc(image), lambda h, s, v: (h, s, min(v + shift, 1)))
        np.testing.assert_allclose(hwc(result), expected, atol=1e-5)


@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_saturate_matches_hsv_saturation_change(crops, severity, benchmark):
    factor, offset = table(benchmark, 'saturate', severity)
    x = crops[:2].clone()
    x[0, :, :4, :4] = 0.3  # gray pixels have hue 0 (red) in skimage: an offset tints them red
    out = corrupt(x, 'saturate', severity, benchmark=benchmark, published_jpeg=False)
    for image, result in zip(x, out):
        expected = hsv_reference(hwc(image), lambda h, s, v: (h, min(max(s * factor + offset, 0), 1), v))
        np.testing.assert_allclose(hwc(result), expected, atol=1e-5)


def test_brightness_on_one_channel_adds_to_the_value():
    gray = to_tensor(to_grayscale(photo_crops(2, 32, 32, seed=1)))
    torch.testing.assert_close(corrupt(gray, 'brightness', 5), (gray + 0.3).clamp(0, 1))


# -------------------------------------------------------------------------------------------- PIL ones

@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('size', [(32, 32), (28, 40)])
@pytest.mark.parametrize('severity', range(1, 6))
def test_pixelate_matches_pil_box_resizes(size, severity, benchmark):
    factor = table(benchmark, 'pixelate', severity)
    photos = photo_crops(3, *size, seed=6)
    out = corrupt(to_tensor(photos), 'pixelate', severity, benchmark=benchmark, published_jpeg=False)
    height, width = size
    for photo, result in zip(photos, out):
        small = Image.fromarray(photo).resize((int(width * factor), int(height * factor)), Image.BOX)
        expected = np.asarray(small.resize((width, height), Image.BOX)) / 255
        # PIL rounds to 8 bits after each of its two passes; the float result is within 1/255.
        np.testing.assert_allclose(hwc(result), expected, atol=1.01 / 255)


def pil_jpeg(photo, quality):
    """PIL's JPEG round trip, what the script runs (its default 4:2:0 chroma sampling)."""
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, 'JPEG', quality=quality)
    return np.asarray(Image.open(buffer), dtype=np.float64) / 255


def as_array(result):
    """float [C, H, W] -> [H, W] or [H, W, C] float64, PIL's layout."""
    return result[0].double().numpy() if result.shape[0] == 1 else hwc(result)


# 32 px goes through torchvision's libjpeg, 144 px (> 128 x 128 pixels) through PIL: both must give PIL's pixels.
@pytest.mark.parametrize('size', [32, 144])
@pytest.mark.parametrize('mode', ['RGB', 'L'])
@pytest.mark.parametrize('severity', range(1, 6))
def test_jpeg_matches_pil(severity, mode, size):
    photos = photo_crops(3, size, size, seed=8)
    if mode == 'L':
        photos = to_grayscale(photos)
    for benchmark in EVERY:
        quality = table(benchmark, 'jpeg_compression', severity)
        out = corrupt(to_tensor(photos), 'jpeg_compression', severity, benchmark=benchmark)
        for photo, result in zip(photos, out):
            expected = pil_jpeg(photo, quality)
            if NATIVE_SIZE[benchmark] > 32:  # and the published files' save: JPEG again, quality 85
                expected = pil_jpeg(np.uint8(np.round(expected * 255)), 85)
            np.testing.assert_allclose(as_array(result), expected, atol=1e-6)


def test_jpeg_without_torchvision_codecs_falls_back_to_pil(monkeypatch):
    monkeypatch.setattr(corruptions, '_torchvision_jpeg', lambda: None)
    photos = photo_crops(2, 32, 32, seed=9)
    out = corrupt(to_tensor(photos), 'jpeg_compression', 4)
    for photo, result in zip(photos, out):
        np.testing.assert_allclose(hwc(result), pil_jpeg(photo, 50), atol=1e-6)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # torchvision 0.29 deprecates its codecs
@pytest.mark.parametrize('mode', ['RGB', 'L'])
def test_jpeg_gpu_batching_with_a_stand_in_codec_gives_pil_pixels(monkeypatch, mode):
    """The CUDA path's batching (one byte copy, split by length, gray sent as RGB and decoded as gray)
    with torchvision's CPU libjpeg standing in for nvJPEG: PIL's pixels exactly (nvJPEG itself differs
    by its 4:4:4 chroma sampling; test_robustness_gpu.py measures that on a GPU)."""
    encode_jpeg, decode_jpeg = corruptions._torchvision_jpeg()
    from torchvision.io import ImageReadMode
    calls = []

    def encode(images, quality):
        calls.append([tuple(image.shape) for image in images])
        return encode_jpeg(images, quality=quality)

    def decode(data, read_mode, device):
        return decode_jpeg(data, mode=ImageReadMode[read_mode], device=device)

    monkeypatch.setattr(corruptions, '_cuda_jpeg_codec', lambda: (encode, decode, False))
    photos = photo_crops(3, 24, 40, seed=10)
    if mode == 'L':
        photos = to_grayscale(photos)
    pixels = (to_tensor(photos) * 255).round().to(torch.uint8)
    out = corruptions._jpeg_round_trip_cuda(pixels, 58)
    assert out.shape == pixels.shape and calls == [[(3, 24, 40)] * 3]
    for photo, result in zip(photos, out):
        np.testing.assert_allclose(as_array(result.float() / 255), pil_jpeg(photo, 58), atol=1e-6)


# ------------------------------------------------------------------------------ blurs, scipy references

@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_gaussian_blur_matches_skimage_gaussian(crops, severity, benchmark):
    sigma = table(benchmark, 'gaussian_blur', severity) * 32 / NATIVE_SIZE[benchmark]
    out = corrupt(crops, 'gaussian_blur', severity, benchmark=benchmark, published_jpeg=False)
    for image, result in zip(crops, out):
        # skimage.filters.gaussian(multichannel=True) = scipy gaussian_filter, mode 'nearest', truncate 4
        expected = ndimage.gaussian_filter(hwc(image), sigma=(sigma, sigma, 0), mode='nearest', truncate=4.0)
        np.testing.assert_allclose(hwc(result), np.clip(expected, 0, 1), atol=1e-5)


def disk_reference(radius, alias_blur):
    """The script's `disk`: on the grid -8..8 with ksize 3 up to radius 8, else on -radius..radius with ksize 5;
    cv2.GaussianBlur (BORDER_REFLECT_101 inside the grid) written with scipy."""
    half, ksize = (8, 3) if radius <= 8 else (radius, 5)
    grid = np.arange(-half, half + 1)
    xs, ys = np.meshgrid(grid, grid)
    disk = np.array((xs ** 2 + ys ** 2) <= radius ** 2, dtype=np.float64)
    disk /= disk.sum()
    taps = np.exp(-np.arange(-(ksize // 2), ksize // 2 + 1) ** 2 / (2 * alias_blur ** 2))  # cv2.getGaussianKernel
    taps /= taps.sum()
    disk = ndimage.correlate1d(disk, taps, axis=0, mode='mirror')
    return ndimage.correlate1d(disk, taps, axis=1, mode='mirror')


@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_defocus_blur_matches_the_script_at_native_size(severity, benchmark):
    size = NATIVE_SIZE[benchmark]
    photos = photos_of_size(1 if size > 32 else 3, size, seed=6)
    radius, alias_blur = table(benchmark, 'defocus_blur', severity)
    kernel = disk_reference(radius, alias_blur)
    out = corrupt(photos, 'defocus_blur', severity, benchmark=benchmark, published_jpeg=False)
    for image, result in zip(photos, out):
        x = hwc(image)
        # cv2.filter2D per channel: correlation, BORDER_REFLECT_101 (scipy 'mirror')
        expected = np.stack([ndimage.correlate(x[..., c], kernel, mode='mirror') for c in range(3)], -1)
        np.testing.assert_allclose(hwc(result), np.clip(expected, 0, 1), atol=1e-5)


def clipped_zoom_reference(img, zoom_factor):
    """The script's clipped_zoom on an H x W x C array."""
    h = img.shape[0]
    ch = int(np.ceil(h / zoom_factor))
    top = (h - ch) // 2
    img = ndimage.zoom(img[top:top + ch, top:top + ch], (zoom_factor, zoom_factor, 1), order=1)
    trim_top = (img.shape[0] - h) // 2
    return img[trim_top:trim_top + h, trim_top:trim_top + h]


@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_zoom_blur_matches_the_script(crops, severity, benchmark):
    factors = np.arange(1, *table(benchmark, 'zoom_blur', severity))  # zoom factors do not scale with size
    out = corrupt(crops[:3], 'zoom_blur', severity, benchmark=benchmark, published_jpeg=False)
    for image, result in zip(crops[:3], out):
        x = hwc(image)
        total = np.zeros_like(x)
        for zoom_factor in factors:
            total += clipped_zoom_reference(x, zoom_factor)
        expected = np.clip((x + total) / (len(factors) + 1), 0, 1)
        np.testing.assert_allclose(hwc(result), expected, atol=1e-5)


def motion_reference(image, radius, sigma, angle):
    """ImageMagick's MotionBlurImage (effect.c) on a C x H x W array: one-sided Gaussian of
    2 * radius + 1 taps, tap i at (x + ceil(i cos a - 0.5), y + ceil(i sin a - 0.5)), edge pixels."""
    width = 2 * math.ceil(radius) + 1
    weights = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    _, height, cols = image.shape
    out = np.zeros_like(image)
    for i, weight in enumerate(weights):
        dx = math.ceil(i * math.cos(math.radians(angle)) - 0.5)
        dy = math.ceil(i * math.sin(math.radians(angle)) - 0.5)
        rows = np.clip(np.arange(height) + dy, 0, height - 1)
        columns = np.clip(np.arange(cols) + dx, 0, cols - 1)
        out += weight * image[:, rows][:, :, columns]
    return out


@pytest.mark.parametrize('radius, sigma', [(6, 1), (6, 2), (9, 2.5), (14, 12)])
def test_directional_blur_matches_imagemagick_formula(crops, radius, sigma):
    angles = torch.tensor([-45.0, -10.0, 0.0, 30.0, -120.0, -80.0], dtype=torch.float64)
    out = filters._directional_blur(crops.double(), filters._motion_kernel(radius, sigma), angles)
    for image, result, angle in zip(crops, out, angles.tolist()):
        expected = motion_reference(image.double().numpy(), radius, sigma, angle)
        np.testing.assert_allclose(result.numpy(), expected, atol=1e-5)


def elastic_reference(image, point_shift, field, alpha, sigma):
    """The script's elastic_transform with given draws: cv2.getAffineTransform / warpAffine
    (bilinear, BORDER_REFLECT_101) written with numpy / scipy, then skimage's gaussian and
    scipy's map_coordinates."""
    shape_size = image.shape[:2]
    center_square = np.float32(shape_size) // 2
    square_size = min(shape_size) // 3
    pts1 = np.float64([center_square + square_size,
                       [center_square[0] + square_size, center_square[1] - square_size],
                       center_square - square_size])
    pts2 = pts1 + point_shift
    forward = np.linalg.solve(np.c_[pts1, np.ones(3)], pts2).T  # 2 x 3, maps (x, y, 1) to the moved points
    inverse = np.linalg.inv(np.vstack([forward, [0, 0, 1]]))
    matrix = [[inverse[1, 1], inverse[1, 0]], [inverse[0, 1], inverse[0, 0]]]  # (row, col) order
    offset = [inverse[1, 2], inverse[0, 2]]
    warped = np.stack([ndimage.affine_transform(image[..., c], matrix, offset, order=1, mode='mirror')
                       for c in range(image.shape[2])], -1)
    if alpha == 0:
        return np.clip(warped, 0, 1)
    dx = ndimage.gaussian_filter(field[0], sigma, mode='reflect', truncate=3) * alpha
    dy = ndimage.gaussian_filter(field[1], sigma, mode='reflect', truncate=3) * alpha
    y, x = np.mgrid[:shape_size[0], :shape_size[1]].astype(np.float64)
    return np.clip(np.stack([ndimage.map_coordinates(warped[..., c], [y + dy, x + dx], order=1, mode='reflect')
                             for c in range(image.shape[2])], -1), 0, 1)


@pytest.mark.parametrize('benchmark', EVERY)
@pytest.mark.parametrize('severity', range(1, 6))
def test_elastic_transform_matches_the_script_given_its_draws(crops, severity, benchmark):
    alpha, sigma, jitter = (v * 32 / NATIVE_SIZE[benchmark] for v in table(benchmark, 'elastic_transform', severity))
    generator = seeded(severity)
    x = crops[:3].double()
    point_shift = (torch.rand(3, 3, 2, generator=generator, dtype=torch.float64) * 2 - 1) * jitter
    field = torch.rand(3, 2, 32, 32, generator=generator, dtype=torch.float64) * 2 - 1
    out = corruptions._elastic_apply(x, point_shift, field, alpha, sigma)
    for i in range(3):
        expected = elastic_reference(hwc(x[i]), point_shift[i].numpy(), field[i].numpy(), alpha, sigma)
        np.testing.assert_allclose(hwc(out[i]), expected, atol=1e-5)


# ------------------------------------------------------------------------ glass, fog, snow, frost, spatter

def script_glass_loop(image, max_delta, offset_y, offset_x):
    """The scripts' shuffle loop on an H x W x 3 array, with the given offsets (in the loop's order)."""
    x = image.copy()
    height, width = x.shape[:2]
    for i, h in enumerate(range(height - max_delta, max_delta, -1)):
        for j, w in enumerate(range(width - max_delta, max_delta, -1)):
            dy, dx = offset_y[i, j], offset_x[i, j]
            x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]  # on 3 channels: views, so a copy
    return x


@pytest.mark.parametrize('height, width, max_delta', [(8, 8, 1), (32, 32, 1), (12, 17, 1), (9, 8, 2), (20, 13, 2),
                                                      (30, 31, 3), (40, 33, 4), (11, 40, 4), (8, 8, 4)])
def test_glass_shuffle_is_the_script_loop(height, width, max_delta):
    rng = np.random.default_rng(height * width + max_delta)
    shape = (3, max(height - 2 * max_delta, 0), max(width - 2 * max_delta, 0))
    offset_y, offset_x = rng.integers(-max_delta, max_delta, shape), rng.integers(-max_delta, max_delta, shape)
    sources = shuffle.shuffle_sources(torch.from_numpy(offset_y), torch.from_numpy(offset_x), height, width,
                                      max_delta).numpy()
    for b in range(3):
        index = np.stack([np.arange(height * width).reshape(height, width)] * 3, -1)
        expected = script_glass_loop(index, max_delta, offset_y[b], offset_x[b])[..., 0].reshape(-1)
        np.testing.assert_array_equal(sources[b], expected)


@pytest.mark.parametrize('benchmark', EVERY)
def test_glass_blur_matches_the_script_given_its_draws(monkeypatch, benchmark):
    """Blur (skimage), np.uint8, the loop, blur again: at the native size for the small benchmarks, at 64 px
    (lengths scaled) for ImageNet-C, whose loop takes long in Python."""
    size = min(NATIVE_SIZE[benchmark], 64)
    photos = photos_of_size(2, size, seed=9).double()
    draws = []

    def recorded(low, high, shape, generator, like):
        draws.append(torch.randint(low, high, shape, generator=generator))
        return draws[-1]
    monkeypatch.setattr(corruptions, '_randint', recorded)
    for severity in (1, 5):
        draws.clear()
        sigma, max_delta, iterations = table(benchmark, 'glass_blur', severity)
        scale = size / NATIVE_SIZE[benchmark]
        sigma, reach = sigma * scale, max(1, round(max_delta * scale))
        out = corrupt(photos, 'glass_blur', severity, seeded(severity), benchmark=benchmark, published_jpeg=False)
        assert len(draws) == 2 * iterations
        for b, (image, result) in enumerate(zip(photos, out)):
            blurred = ndimage.gaussian_filter(hwc(image), sigma=(sigma, sigma, 0), mode='nearest', truncate=4.0)
            # np.uint8 truncates; values within 1e-3 of a level count as that level (float round-off in flat
            # areas, which the script's float64 sums put a hair above or below depending on the kernel)
            x = np.uint8(blurred * 255 + 1e-3)
            for offset_x, offset_y in zip(draws[0::2], draws[1::2]):
                x = script_glass_loop(x, reach, offset_y[b].numpy(), offset_x[b].numpy())
            expected = ndimage.gaussian_filter(x / 255, sigma=(sigma, sigma, 0), mode='nearest', truncate=4.0)
            np.testing.assert_allclose(hwc(result), np.clip(expected, 0, 1), atol=1e-6)


def hashed(level, rows, cols):
    """A fixed pseudo-random value in [-1, 1) for each torus point of the plasma: the same at any window."""
    return np.sin(12.9898 * rows + 78.233 * cols + 37.719 * level) * 43758.5453 % 1 * 2 - 1


def script_plasma(mapsize, decay):
    """The scripts' `plasma_fractal` (diamond-square on a torus, np.roll), unnormalised, with `hashed` noise."""
    maparray = np.zeros((mapsize, mapsize))
    step, wibble, level = mapsize, 100.0, 0
    while step >= 2:
        half = step // 2

        def noise(row, col):
            rows, cols = np.meshgrid(np.arange(row, mapsize, step) // half, np.arange(col, mapsize, step) // half,
                                     indexing='ij')
            return wibble * wibble * hashed(level, rows, cols)
        corners = maparray[0::step, 0::step]
        squares = corners + np.roll(corners, -1, 0)
        squares += np.roll(squares, -1, 1)
        maparray[half::step, half::step] = squares / 4 + noise(half, half)
        squares, corners = maparray[half::step, half::step], maparray[0::step, 0::step]
        across = squares + np.roll(squares, 1, 0) + corners + np.roll(corners, -1, 1)
        maparray[0::step, half::step] = across / 4 + noise(0, half)
        down = squares + np.roll(squares, 1, 1) + corners + np.roll(corners, -1, 0)
        maparray[half::step, 0::step] = down / 4 + noise(half, 0)
        step, wibble, level = step // 2, wibble / decay, level + 1
    return maparray


@pytest.mark.parametrize('mapsize, rows, cols', [(32, 32, 32), (64, 5, 64), (256, 224, 224), (128, 8, 100), (16, 16, 1),
                                                 (1024, 8, 1024)])
def test_plasma_is_the_scripts_diamond_square_on_any_window(mapsize, rows, cols):
    """The same noise per torus point gives the script's map, whole or where only the image's corner is computed."""
    def draw(shape, level, row_index, col_index):
        values = hashed(level, row_index.double().numpy()[:, None], col_index.double().numpy()[None, :])
        return torch.from_numpy(values).expand(shape)

    expected = script_plasma(mapsize, 1.7)
    like = torch.zeros(1, dtype=torch.float64)
    window = filters._plasma_window(2, rows, cols, mapsize, 1.7, draw, like)
    np.testing.assert_allclose(window[1].numpy(), expected[:rows, :cols], rtol=1e-9, atol=1e-6)
    if mapsize <= 256:  # the whole map, as fog and frost compute it for square-ish images
        torus = filters._plasma_torus(2, mapsize, 1.7, draw, like)
        np.testing.assert_allclose(torus[1].numpy(), expected, rtol=1e-9, atol=1e-6)


def largest_intermediate(fn):
    """The most elements of any tensor an aten op produced while `fn` ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        elements = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for value in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(value, torch.Tensor):
                    Largest.elements = max(Largest.elements, value.numel())
            return out

    with Largest():
        fn()
    return Largest.elements


@pytest.mark.parametrize('name', ['fog', 'frost'])
def test_fog_and_frost_memory_grows_with_the_pixels_not_the_longer_side(name):
    """An 8 x 1024 image has about the pixels of a 90 x 90 one: its largest intermediate tensor must be too
    (a map covering the longer side would be 1024 x 1024, 128x the image)."""
    strip, square = torch.rand(2, 3, 8, 1024, generator=seeded(1)), torch.rand(2, 3, 90, 90, generator=seeded(1))
    largest = [largest_intermediate(lambda x=x: corrupt(x, name, 3, seeded(2), published_jpeg=False))
               for x in (strip, square)]
    assert largest[0] <= 2 * largest[1], largest
    assert largest[0] <= 16 * strip.numel(), largest


def test_fog_adds_a_smooth_shared_plasma_and_rescales(crops):
    strength = 1.0  # CIFAR-10-C severity 4
    peak = crops.amax((1, 2, 3), keepdim=True)
    out = corrupt(crops, 'fog', 4, generator=seeded(), benchmark='cifar10-c')
    unclipped = (out > 0) & (out < 1)
    plasma = (out * (peak + strength) / peak - crops) / strength
    plasma = torch.where(unclipped, plasma, float('nan'))
    assert float(plasma.nan_to_num(0.5).min()) > -1e-5 and float(plasma.nan_to_num(0.5).max()) < 1 + 1e-5
    spread = (plasma - plasma.nanmean(1, keepdim=True)).abs().nan_to_num(0)
    assert float(spread.max()) < 1e-5  # one map shared by the channels
    maps = filters._plasma_fractal(4, 32, 32, 2.0, seeded(), torch.zeros(1))
    assert float(maps.amin()) == 0 and float(maps.amax()) == 1
    step = (maps[:, 1:] - maps[:, :-1]).abs().mean()
    assert float(step) < 0.5 * float((maps - maps.roll(16, 1)).abs().mean())  # smooth: neighbours alike


def test_frost_layer_has_the_photographs_colour_statistics():
    """Per image one of the five photographs' profiles (frost2 and frost3 are one picture): the layer's mean
    colour over many images, its spread between images and within one, as measured from the photographs."""
    profiles = np.array(corruptions._FROST_PHOTOS)  # [5, (mean, between, within), RGB]
    layer = corruptions._frost_layer(400, 32, 32, seeded(3), torch.zeros(1, dtype=torch.float64))
    means = layer.mean((2, 3)).numpy()
    np.testing.assert_allclose(means.mean(0), profiles[:, 0].mean(0), atol=0.03)
    # every image's mean lies near one profile's mean
    nearest = np.abs(means[:, None, :] - profiles[None, :, 0]).max(-1).min(1)
    assert np.quantile(nearest, 0.9) < 0.12
    within = layer.std((2, 3)).mean(0).numpy()
    np.testing.assert_allclose(within, profiles[:, 2].mean(0), rtol=0.15)


def test_snow_frost_spatter_brighten_or_cover_the_image(crops):
    for name in ('snow', 'frost'):
        for severity in (1, 5):
            out = corrupt(crops, name, severity, generator=seeded())
            assert float(out.mean()) > float(crops.mean()), (name, severity)
    gray = torch.full((4, 3, 32, 32), 0.3)
    water = corrupt(gray, 'spatter', 3, generator=seeded(2))
    assert float((water - gray).amin()) >= 0 and float((water - gray).amax()) > 0.1  # turquoise drops added
    added = (water - gray).sum((2, 3))
    assert bool((added[:, 1] > added[:, 0]).all())  # more green than red
    mud = corrupt(gray, 'spatter', 5, generator=seeded(2))
    covered = (mud - gray).abs().sum(1) > 1e-6
    brown = torch.tensor([63, 42, 20]) / 255
    blend = (mud - gray) / (brown.view(1, 3, 1, 1) - gray)  # the mud cover, equal in every channel
    assert bool(covered.any()) and float((blend[:, 0] - blend[:, 2])[covered].abs().max()) < 1e-5


def canny_reference(image, low, high):
    """cv2.Canny as OpenCV documents and implements it (canny.cpp), in numpy: Sobel 3 x 3 with replicated
    border, L1 magnitude, non-maximum suppression in four directions (tan 22.5 in 15-bit fixed point), and
    hysteresis as connected components: candidates 8-connected to a strong pixel."""
    padded = np.pad(image.astype(np.int64), 1, mode='edge')
    dx = ndimage.correlate(padded, np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]))[1:-1, 1:-1]
    dy = ndimage.correlate(padded, np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]]))[1:-1, 1:-1]
    magnitude = np.abs(dx) + np.abs(dy)
    around = np.pad(magnitude, 1)
    height, width = image.shape
    candidate = np.zeros_like(image, dtype=bool)
    tg22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
    for i in range(height):
        for j in range(width):
            m = magnitude[i, j]
            if m <= low:
                continue
            x, y = abs(dx[i, j]), abs(dy[i, j]) << 15
            r, c = i + 1, j + 1
            if y < x * tg22:
                keep = m > around[r, c - 1] and m >= around[r, c + 1]
            elif y > x * tg22 + (x << 16):
                keep = m > around[r - 1, c] and m >= around[r + 1, c]
            else:
                s = -1 if (dx[i, j] < 0) != (dy[i, j] < 0) else 1
                keep = m > around[r - 1, c - s] and m > around[r + 1, c + s]
            candidate[i, j] = keep
    labels, _ = ndimage.label(candidate, structure=np.ones((3, 3)))
    strong = np.unique(labels[candidate & (magnitude > high)])
    return np.isin(labels, strong[strong > 0])


def liquid_levels(size, blur, threshold, seed):
    """The water spatter's liquid layer as the script makes it, as uint8 levels."""
    rng = np.random.default_rng(seed)
    liquid = ndimage.gaussian_filter(rng.normal(0.65, 0.3, (size, size)), blur, mode='nearest', truncate=4.0)
    liquid[liquid < threshold] = 0
    return np.uint8(np.clip(liquid, 0, 1) * 255)


@pytest.mark.parametrize('size, blur', [(32, 0.7), (48, 1.0), (64, 2.0)])
def test_canny_is_cv2s(size, blur):
    levels = np.stack([liquid_levels(size, blur, 0.68, seed) for seed in range(3)])
    ours = filters._canny(torch.from_numpy(levels)[:, None].float(), 50, 150)[:, 0].numpy()
    for image, edges in zip(levels, ours):
        np.testing.assert_array_equal(edges, canny_reference(image, 50, 150))


def chamfer_reference(edges, limit):
    """cv2.distanceTransform(DIST_L2, 5) as the classic two-pass chamfer scan (Borgefors): weights 1, 1.4 and
    2.1969, the forward pass over the mask's upper half, the backward pass over its lower half."""
    height, width = edges.shape
    big = 1e9
    distance = np.where(edges, 0.0, big)
    mask = [(dy, dx, {1: 1.0, 2: 1.4, 5: 2.1969}[dy * dy + dx * dx])
            for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx in (1, 2, 5)]
    forward = [(dy, dx, w) for dy, dx, w in mask if dy < 0 or (dy == 0 and dx < 0)]
    backward = [(-dy, -dx, w) for dy, dx, w in forward]
    for rows, cols, half in ((range(height), range(width), forward),
                             (range(height - 1, -1, -1), range(width - 1, -1, -1), backward)):
        for i in rows:
            for j in cols:
                for dy, dx, weight in half:
                    if 0 <= i + dy < height and 0 <= j + dx < width:
                        distance[i, j] = min(distance[i, j], distance[i + dy, j + dx] + weight)
    return np.minimum(distance, limit)


def test_chamfer_distance_is_cv2s():
    for seed, size in ((0, 32), (1, 40)):
        edges = canny_reference(liquid_levels(size, 1.0, 0.68, seed), 50, 150)
        ours = filters._chamfer_distance(torch.from_numpy(edges)[None, None], 20)[0, 0].numpy()
        np.testing.assert_allclose(ours, chamfer_reference(edges, 20), atol=1e-5)


def test_equalize_hist_is_cv2s():
    """cv2.equalizeHist's table: 0 for the lowest level present, then round(255 (cdf - its count) / (pixels -
    its count)); an image of one level stays as it is."""
    rng = np.random.default_rng(5)
    images = np.stack([rng.integers(3, 21, (16, 16)), np.full((16, 16), 7)])
    ours = filters._equalize_hist(torch.from_numpy(images)[:, None].float())[:, 0].numpy()
    for image, result in zip(images, ours):
        counts = np.bincount(image.ravel(), minlength=256)
        lowest = counts[image.min()]
        if lowest == image.size:
            expected = image
        else:
            table = np.round((np.cumsum(counts) - lowest) * 255 / (image.size - lowest)).clip(0, 255)
            expected = table[image]
        np.testing.assert_array_equal(result, expected)


# ------------------------------------------------------------------------------------------- bad input

def test_bad_corrupt_arguments_raise_value_error(crops):
    with pytest.raises(ValueError, match="'blur'.*gaussian_noise, shot_noise"):
        corrupt(crops, 'blur', 1)
    for severity in (0, 6, 2.5, True, '3'):
        with pytest.raises(ValueError, match='severity'):
            corrupt(crops, 'fog', severity)
    with pytest.raises(ValueError, match='torch.Tensor'):
        corrupt(crops.numpy(), 'fog', 1)
    with pytest.raises(ValueError, match='dtype'):
        corrupt((crops * 255).byte(), 'fog', 1)
    with pytest.raises(ValueError, match=r'shape \(3, 32, 32\)'):
        corrupt(crops[0], 'fog', 1)
    with pytest.raises(ValueError, match='C = 1 or 3'):
        corrupt(crops[:, :2], 'fog', 1)
    with pytest.raises(ValueError, match='at least 8'):
        corrupt(crops[..., :4, :4], 'fog', 1)
    with pytest.raises(ValueError, match='decode normalized'):
        corrupt(crops * 4 - 2, 'fog', 1)
    with pytest.raises(ValueError, match='generator'):
        corrupt(crops, 'fog', 1, generator=3)


def test_nan_pixels_raise_value_error(crops):
    x = crops.clone()
    x[1, 2, 5, 7] = float('nan')
    for name in ('fog', 'contrast', 'pixelate', 'jpeg_compression', 'shot_noise'):
        with pytest.raises(ValueError, match='NaN in 1 of'):
            corrupt(x, name, 3)


# --------------------------------------------------------------------------------- accelerator forms on CPU

@pytest.mark.parametrize('shape, benchmark', [((3, 3, 32, 32), 'cifar10-c'), ((2, 3, 20, 48), 'tiny-imagenet-c'),
                                              ((2, 1, 40, 40), 'imagenet-c'), ((2, 3, 8, 8), 'cifar10-c'),
                                              ((1, 3, 96, 80), 'imagenet-c'), ((1, 3, 64, 64), 'tiny-imagenet-c')])
def test_accelerator_filter_forms_give_the_cpu_forms_pixels(monkeypatch, shape, benchmark):
    """On a GPU the filters run as band-matrix matmuls, FFT products and grid_sample zooms; here the
    same code runs on CPU tensors and must give the CPU forms' pixels for the same draws (before the
    published JPEG save, the same code on both, where a level flipped by round-off would spread)."""
    batch, channels, height, width = shape
    photos = photo_crops(batch, height, width, seed=12)
    x = to_tensor(photos if channels == 3 else to_grayscale(photos))
    options = dict(benchmark=benchmark, published_jpeg=False)
    for name in ALL:
        for severity in (1, 3, 5):
            reference = corrupt(x, name, severity, generator=seeded(severity), **options)
            with monkeypatch.context() as patch:
                patch.setattr(filters, '_on_host', lambda tensor: False)  # the filters' forms
                patch.setattr(corruptions, '_on_host', lambda tensor: False)  # and, as on a GPU, no value check
                accelerated = corrupt(x, name, severity, generator=seeded(severity), **options)
            # frost: a square root of needles near 0; spatter: a floor of a distance (both within 1/255)
            atol = 1e-3 if name in ('frost', 'spatter') else 1e-5
            torch.testing.assert_close(accelerated, reference, atol=atol, rtol=0, msg=f'{name} {severity}')


def test_fft_correlation_matches_scipy_for_every_border_mode(crops):
    kernel = torch.rand(7, 7, generator=seeded(3), dtype=torch.float64) - 0.3  # not symmetric, signed
    x = crops[:2].double()
    for mode in ('nearest', 'mirror', 'reflect'):
        got = filters._fft_correlate(x, kernel[None, None], mode)
        for image, result in zip(x, got):
            expected = np.stack([ndimage.correlate(image[c].numpy(), kernel.numpy(), mode=mode) for c in range(3)])
            np.testing.assert_allclose(result.numpy(), expected, atol=1e-9)
