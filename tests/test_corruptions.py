"""Corruptions against the CIFAR-10-C script's formulas (scipy / PIL / colorsys references)."""
import colorsys
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from _images import photo_crops, to_grayscale, to_tensor
from fastai_jsd.robustness import CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt, corruptions, filters

ALL = CORRUPTIONS + EXTRA_CORRUPTIONS
DETERMINISTIC = {'defocus_blur', 'zoom_blur', 'brightness', 'contrast', 'pixelate', 'jpeg_compression',
                 'gaussian_blur', 'saturate'}


@pytest.fixture(scope='module')
def crops():
    """Six real 32 px RGB crops, float [6, 3, 32, 32], values multiples of 1/255."""
    return to_tensor(photo_crops(6, 32, 32, seed=11))


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def hwc(image):
    """float [C, H, W] tensor -> float64 [H, W, C] array, the script's layout."""
    return image.permute(1, 2, 0).double().numpy()


# ----------------------------------------------------------------------------------------------- general

def test_lists_match_cifar_10_c():
    assert CORRUPTIONS == ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
                           'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
                           'elastic_transform', 'pixelate', 'jpeg_compression')
    assert EXTRA_CORRUPTIONS == ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')


@pytest.mark.parametrize('channels', [3, 1])
def test_every_corruption_keeps_shape_range_input_and_is_reproducible(crops, channels):
    x = crops[:4] if channels == 3 else to_tensor(to_grayscale(photo_crops(4, 32, 32, seed=11)))
    before = x.clone()
    for name in ALL:
        for severity in range(1, 6):
            out = corrupt(x, name, severity, generator=seeded(severity))
            assert out.shape == x.shape and out.dtype == x.dtype, name
            assert 0 <= float(out.min()) and float(out.max()) <= 1, (name, severity)
            assert not torch.equal(out, x), (name, severity)
            again = corrupt(x, name, severity, generator=seeded(severity))
            assert torch.equal(out, again), (name, severity)
            if name not in DETERMINISTIC:
                other = corrupt(x, name, severity, generator=seeded(100 + severity))
                assert not torch.equal(out, other), (name, severity)
    assert torch.equal(x, before)


@pytest.mark.parametrize('name', sorted(set(ALL) - DETERMINISTIC))
def test_each_image_draws_its_own_randomness(name):
    image = to_tensor(photo_crops(1, 32, 32, seed=3))
    out = corrupt(image.expand(4, -1, -1, -1), name, 3, generator=seeded(1))
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[2], out[3])


def test_other_sizes_and_dtypes_work():
    x = to_tensor(photo_crops(2, 20, 48, seed=2))  # non-square, not 32
    for name in ALL:
        out = corrupt(x, name, 5, generator=seeded())
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
        shrunk = torch.nn.functional.avg_pool2d(corrupt(large, name, 5), 2)
        reference = corrupt(torch.nn.functional.avg_pool2d(large, 2), name, 5)
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

NOISE_TABLES = {
    'gaussian_noise': [0.04, 0.06, 0.08, 0.09, 0.10],   # std
    'speckle_noise': [0.06, 0.1, 0.12, 0.16, 0.2],      # std of the multiplicative noise
}


@pytest.mark.parametrize('severity', range(1, 6))
def test_additive_noise_std_matches_the_table(severity):
    gray = torch.full((4, 3, 32, 32), 0.5)  # far enough from 0 and 1 that clipping is negligible
    for name, table in NOISE_TABLES.items():
        noise = corrupt(gray, name, severity, generator=seeded(severity)) - gray
        expected = table[severity - 1] * (0.5 if name == 'speckle_noise' else 1)
        assert abs(float(noise.mean())) < 0.05 * expected
        assert float(noise.std()) == pytest.approx(expected, rel=0.03)


@pytest.mark.parametrize('severity', range(1, 6))
def test_shot_noise_is_poisson_with_the_table_photon_count(severity):
    photons = [500, 250, 100, 75, 50][severity - 1]
    level = torch.full((8, 3, 32, 32), 0.4)
    counts = corrupt(level, 'shot_noise', severity, generator=seeded(severity)) * photons
    assert torch.allclose(counts, counts.round(), atol=1e-3)  # whole photon counts
    assert float(counts.mean()) == pytest.approx(0.4 * photons, rel=0.01)
    assert float(counts.var()) == pytest.approx(0.4 * photons, rel=0.05)


@pytest.mark.parametrize('severity', range(1, 6))
def test_impulse_noise_salts_and_peppers_the_table_fraction(severity):
    amount = [0.01, 0.02, 0.03, 0.05, 0.07][severity - 1]
    gray = torch.full((64, 3, 32, 32), 0.5)
    out = corrupt(gray, 'impulse_noise', severity, generator=seeded(severity))
    n = gray.numel()  # >= 980 expected hits of each kind: 15 % is over 4.5 standard deviations
    assert float((out == 0).sum()) / n == pytest.approx(amount / 2, rel=0.15)
    assert float((out == 1).sum()) / n == pytest.approx(amount / 2, rel=0.15)
    assert bool(((out == 0) | (out == 1) | (out == 0.5)).all())
    # per channel, as skimage's random_noise on an H x W x 3 array
    hit = out != 0.5
    assert bool((hit.any(1) & ~hit.all(1)).any())


# ---------------------------------------------------------------------------------- photometric, closed form

@pytest.mark.parametrize('severity', range(1, 6))
def test_contrast_matches_the_script(crops, severity):
    factor = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    out = corrupt(crops, 'contrast', severity)
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


@pytest.mark.parametrize('severity', range(1, 6))
def test_brightness_matches_hsv_value_shift(crops, severity):
    shift = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    x = crops[:2].clone()
    x[0, :, :4, :4] = 0  # black: saturation 0, turns gray
    x[1, :, :4, :4] = 0.6  # gray
    out = corrupt(x, 'brightness', severity)
    for image, result in zip(x, out):
        expected = hsv_reference(hwc(image), lambda h, s, v: (h, s, min(v + shift, 1)))
        np.testing.assert_allclose(hwc(result), expected, atol=1e-5)


@pytest.mark.parametrize('severity', range(1, 6))
def test_saturate_matches_hsv_saturation_change(crops, severity):
    factor, offset = [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)][severity - 1]
    x = crops[:2].clone()
    x[0, :, :4, :4] = 0.3  # gray pixels have hue 0 (red) in skimage: an offset tints them red
    out = corrupt(x, 'saturate', severity)
    for image, result in zip(x, out):
        expected = hsv_reference(hwc(image), lambda h, s, v: (h, min(max(s * factor + offset, 0), 1), v))
        np.testing.assert_allclose(hwc(result), expected, atol=1e-5)


def test_brightness_on_one_channel_adds_to_the_value():
    gray = to_tensor(to_grayscale(photo_crops(2, 32, 32, seed=1)))
    torch.testing.assert_close(corrupt(gray, 'brightness', 5), (gray + 0.3).clamp(0, 1))


# -------------------------------------------------------------------------------------------- PIL ones

@pytest.mark.parametrize('size', [(32, 32), (28, 40)])
@pytest.mark.parametrize('severity', range(1, 6))
def test_pixelate_matches_pil_box_resizes(size, severity):
    factor = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    photos = photo_crops(3, *size, seed=6)
    out = corrupt(to_tensor(photos), 'pixelate', severity)
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
    quality = [80, 65, 58, 50, 40][severity - 1]
    photos = photo_crops(3, size, size, seed=8)
    if mode == 'L':
        photos = to_grayscale(photos)
    out = corrupt(to_tensor(photos), 'jpeg_compression', severity)
    for photo, result in zip(photos, out):
        np.testing.assert_allclose(as_array(result), pil_jpeg(photo, quality), atol=1e-6)


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

@pytest.mark.parametrize('severity', range(1, 6))
def test_gaussian_blur_matches_skimage_gaussian(crops, severity):
    sigma = [0.4, 0.6, 0.7, 0.8, 1][severity - 1]
    out = corrupt(crops, 'gaussian_blur', severity)
    for image, result in zip(crops, out):
        # skimage.filters.gaussian(multichannel=True) = scipy gaussian_filter, mode 'nearest', truncate 4
        expected = ndimage.gaussian_filter(hwc(image), sigma=(sigma, sigma, 0), mode='nearest', truncate=4.0)
        np.testing.assert_allclose(hwc(result), np.clip(expected, 0, 1), atol=1e-5)


def disk_reference(radius, alias_blur):
    """The script's `disk`, with cv2.GaussianBlur(ksize=3, BORDER_REFLECT_101) written with scipy."""
    grid = np.arange(-8, 8 + 1)
    xs, ys = np.meshgrid(grid, grid)
    disk = np.array((xs ** 2 + ys ** 2) <= radius ** 2, dtype=np.float64)
    disk /= disk.sum()
    taps = np.exp(-np.arange(-1, 2) ** 2 / (2 * alias_blur ** 2))  # cv2.getGaussianKernel(3, sigma)
    taps /= taps.sum()
    disk = ndimage.correlate1d(disk, taps, axis=0, mode='mirror')
    return ndimage.correlate1d(disk, taps, axis=1, mode='mirror')


@pytest.mark.parametrize('severity', range(1, 6))
def test_defocus_blur_matches_the_script(crops, severity):
    radius, alias_blur = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)][severity - 1]
    kernel = disk_reference(radius, alias_blur)
    out = corrupt(crops, 'defocus_blur', severity)
    for image, result in zip(crops, out):
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


@pytest.mark.parametrize('severity', range(1, 6))
def test_zoom_blur_matches_the_script(crops, severity):
    factors = [np.arange(1, 1.06, 0.01), np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01),
               np.arange(1, 1.21, 0.01), np.arange(1, 1.26, 0.01)][severity - 1]
    out = corrupt(crops[:3], 'zoom_blur', severity)
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


@pytest.mark.parametrize('severity', range(1, 6))
def test_elastic_transform_matches_the_script_given_its_draws(crops, severity):
    alpha, sigma, jitter = (32 * v for v in
                            [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                             (0.1, 0.03, 0.03)][severity - 1])
    generator = seeded(severity)
    x = crops[:3].double()
    point_shift = (torch.rand(3, 3, 2, generator=generator, dtype=torch.float64) * 2 - 1) * jitter
    field = torch.rand(3, 2, 32, 32, generator=generator, dtype=torch.float64) * 2 - 1
    out = corruptions._elastic_apply(x, point_shift, field, alpha, sigma)
    for i in range(3):
        expected = elastic_reference(hwc(x[i]), point_shift[i].numpy(), field[i].numpy(), alpha, sigma)
        np.testing.assert_allclose(hwc(out[i]), expected, atol=1e-5)


# ------------------------------------------------------------------------ glass, fog, snow, frost, spatter

def glass_loop_displacement(sweeps, rng):
    """Mean pixel displacement of the script's sequential swap loop on a 32 x 32 image."""
    position = np.stack(np.mgrid[:32, :32], -1)
    origin = position.copy()
    for _ in range(sweeps):
        for h in range(31, 1, -1):
            for w in range(31, 1, -1):
                dx, dy = rng.integers(-1, 1, size=(2,))
                position[h, w], position[h + dy, w + dx] = (position[h + dy, w + dx].copy(),
                                                            position[h, w].copy())
    return np.sqrt(((position - origin) ** 2).sum(-1)).mean()


def test_glass_shuffle_is_a_local_permutation_as_strong_as_the_script_loop():
    index = torch.arange(32 * 32, dtype=torch.float64).view(1, 1, 32, 32).expand(16, 1, -1, -1)
    shuffled = corruptions._shuffle_blocks(corruptions._shuffle_blocks(index, 2, seeded(1)), 2, seeded(2))
    source = shuffled.long()
    # a permutation of every image's pixels, each moved at most 2 pixels per axis (two passes)
    assert torch.equal(source.view(16, -1).sort(-1).values, index.long().view(16, -1).sort(-1).values)
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing='ij')
    dy, dx = source // 32 - rows, source % 32 - cols
    assert int(dy.abs().max()) <= 2 and int(dx.abs().max()) <= 2
    ours = float(torch.sqrt((dy ** 2 + dx ** 2).double()).mean())
    rng = np.random.default_rng(0)
    script = np.mean([glass_loop_displacement(1, rng) for _ in range(3)])
    assert ours == pytest.approx(script, rel=0.15)


def test_fog_adds_a_smooth_shared_plasma_and_rescales(crops):
    strength = 1.0  # severity 4
    peak = crops.amax((1, 2, 3), keepdim=True)
    out = corrupt(crops, 'fog', 4, generator=seeded())
    unclipped = (out > 0) & (out < 1)
    plasma = (out * (peak + strength) / peak - crops) / strength
    plasma = torch.where(unclipped, plasma, float('nan'))
    assert float(plasma.nan_to_num(0.5).min()) > -1e-5 and float(plasma.nan_to_num(0.5).max()) < 1 + 1e-5
    spread = (plasma - plasma.nanmean(1, keepdim=True)).abs().nan_to_num(0)
    assert float(spread.max()) < 1e-5  # one map shared by the channels
    maps = filters._plasma_fractal(4, 32, 2.0, seeded(), torch.zeros(1))
    assert float(maps.amin()) == 0 and float(maps.amax()) == 1
    step = (maps[:, 1:] - maps[:, :-1]).abs().mean()
    assert float(step) < 0.5 * float((maps - maps.roll(16, 1)).abs().mean())  # smooth: neighbours alike


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

@pytest.mark.parametrize('shape', [(3, 3, 32, 32), (2, 3, 20, 48), (2, 1, 40, 40), (2, 3, 8, 8), (1, 3, 96, 80)])
def test_accelerator_filter_forms_give_the_cpu_forms_pixels(monkeypatch, shape):
    """On a GPU the filters run as band-matrix matmuls, FFT products and grid_sample zooms; here the
    same code runs on CPU tensors and must give the CPU forms' pixels for the same draws."""
    batch, channels, height, width = shape
    photos = photo_crops(batch, height, width, seed=12)
    x = to_tensor(photos if channels == 3 else to_grayscale(photos))
    for name in ALL:
        for severity in (1, 3, 5):
            reference = corrupt(x, name, severity, generator=seeded(severity))
            with monkeypatch.context() as patch:
                patch.setattr(filters, '_on_host', lambda tensor: False)  # the filters' forms
                patch.setattr(corruptions, '_on_host', lambda tensor: False)  # and, as on a GPU, no value check
                accelerated = corrupt(x, name, severity, generator=seeded(severity))
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
