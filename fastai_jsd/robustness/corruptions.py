"""The common corruptions of CIFAR-10-C as batched torch kernels on any device, and `corrupt`.

The corruptions re-implement `ImageNet-C/create_c/make_cifar_c.py` of hendrycks/robustness, the script
that generated CIFAR-10-C: same operations, same severity tables (each stands above its kernel, indexed
by severity - 1). Where the script calls ImageMagick (motion blur, snow), cv2 (spatter) or ships
photographs (frost), an equivalent is computed in torch; each such corruption says how it differs.

Image size: the tables are for 32 px images. Every length in pixels (blur sigmas and radii, motion
blur length, glass-blur swap distance, snow flake size, elastic displacement, spatter blob size,
frost needles) is multiplied by `min(H, W) / 32`, so that a corrupted image of any size looks like
the corrupted 32 px version scaled up. Ratios (zoom factors, pixelation ratio), intensities (noise
strengths, contrast, brightness, JPEG quality) are size independent and used as they are.

Outputs are float and not rounded to 1/255 (the script stores uint8); only `jpeg_compression`
quantizes, because JPEG works on 8-bit images.

Devices: no corruption waits for the GPU (see `filters`), except `jpeg_compression`, whose encoded
bytes must reach the host for nvJPEG's decoder.
"""
import contextlib
import io
import math
import warnings
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fastai_jsd._device import move
from fastai_jsd.augment.checks import image_problem
from fastai_jsd.robustness.filters import (_clipped_zoom, _constant, _correlate2d, _directional_blur,
                                           _edge_distance, _equalize, _erode, _gaussian_blur, _motion_kernel,
                                           _on_device, _on_host, _pil_box_round_trip, _plasma_fractal,
                                           _poisson, _rand, _randn, _to_gray)

CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')

# Corruptions that move image content: masks would no longer line up with the corrupted images.
_MOVES_PIXELS = {
    'elastic_transform': 'warps the image (affine jitter and a displacement field)',
    'zoom_blur': 'averages zooms about the centre, moving content outwards by up to 12.5% of the image '
                 'size at severity 5',
}
SEGMENTATION_CORRUPTIONS = tuple(name for name in CORRUPTIONS if name not in _MOVES_PIXELS)


def _size_scale(x):
    """How many pixels of `x` one pixel of a 32 px CIFAR image stands for."""
    return min(x.shape[-2], x.shape[-1]) / 32


def _through_rgb(corruption):
    """Apply a colour corruption to 1-channel images as to their gray RGB copy, then take the luma."""
    def apply(x, level, generator):
        if x.shape[1] == 3:
            return corruption(x, level, generator)
        return _to_gray(corruption(x.expand(-1, 3, -1, -1), level, generator))
    apply.__name__ = corruption.__name__
    apply.__doc__ = corruption.__doc__
    return apply


# ---------------------------------------------------------------------------------------------------
# The corruptions: each takes float images [B, C, H, W] in [0, 1], level = severity - 1, a generator.

_GAUSSIAN_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)


def _gaussian_noise(x, level, generator):
    """x + N(0, std) per pixel and channel."""
    noise = _randn(x.shape, generator, x)
    return noise.mul_(_GAUSSIAN_NOISE_STD[level]).add_(x).clamp_(0, 1)


_SHOT_NOISE_PHOTONS = (500, 250, 100, 75, 50)


def _shot_noise(x, level, generator):
    """Poisson(x * photons) / photons."""
    photons = _SHOT_NOISE_PHOTONS[level]
    return _poisson(x * photons, generator).div_(photons).clamp_(0, 1)


_IMPULSE_NOISE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)


def _impulse_noise(x, level, generator):
    """Salt and pepper on a fraction `amount` of the values, half each (skimage's 's&p' mode, per channel)."""
    amount = _IMPULSE_NOISE_AMOUNT[level]
    draw = _rand(x.shape, generator, x)
    salt_or_pepper = (draw >= amount / 2).to(x.dtype)
    return torch.where(draw < amount, salt_or_pepper, x)


_SPECKLE_NOISE_STD = (0.06, 0.1, 0.12, 0.16, 0.2)


def _speckle_noise(x, level, generator):
    """x + x * N(0, std)."""
    noise = _randn(x.shape, generator, x)
    return noise.mul_(_SPECKLE_NOISE_STD[level]).add_(1).mul_(x).clamp_(0, 1)


_GAUSSIAN_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)


def _gaussian_blur_corruption(x, level, generator):
    """skimage Gaussian blur with the table's sigma."""
    return _gaussian_blur(x, _GAUSSIAN_BLUR_SIGMA[level] * _size_scale(x)).clamp_(0, 1)


_GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, max_delta, sweeps


def _glass_blur(x, level, generator):
    """Blur, shuffle pixels locally, blur again.

    The script swaps every interior pixel with a random neighbour in a sequential Python loop
    (np.random.randint(-1, 1) draws offsets -1 or 0 only). Here each sweep is two passes of uniformly
    random permutations inside 2 x 2 blocks of a randomly offset grid, one gather per offset: at 32 px
    this matches the loop's mean pixel displacement (1.24 px after one sweep; 1.67 against 1.82 px
    after two) without its rare long drifts towards the top-left. Larger images use blocks of
    1 + round(scale) pixels.
    """
    sigma, max_delta, sweeps = _GLASS_BLUR[level]
    scale = _size_scale(x)
    out = _gaussian_blur(x, sigma * scale)
    block = 1 + max(max_delta, round(max_delta * scale))
    for _ in range(2 * sweeps):
        out = _shuffle_blocks(out, block, generator)
    return _gaussian_blur(out, sigma * scale).clamp_(0, 1)


def _shuffle_blocks(x, block, generator):
    """Permute the pixels inside every whole `block` x `block` cell of a grid offset at random per image.

    One gather for the whole batch: every pixel looks up where its source is, from its image's grid
    offset and its cell's permutation. Cells cut by the border stay in place, as the script leaves the
    border rows and columns alone.
    """
    batch, channels, height, width = x.shape
    cell_size = block * block
    phases = (_rand((batch,), generator, x) * cell_size).long().clamp_(max=cell_size - 1)
    cells_y, cells_x = height // block, width // block
    keys = _rand((batch, cells_y, cells_x, cell_size), generator, x)
    source_slot = keys.argsort(-1)  # a uniform random permutation of each cell's pixels
    top, left = phases // block, phases % block  # the grid offset of each image [B]
    # The flat image index each (image, cell, slot) takes its value from, laid out like the pixels of
    # the whole cells ([B, cells_y * block, cells_x * block]) so that the lookup below reads in order.
    slot = torch.arange(cell_size, device=x.device)
    source = (slot // block * width + slot % block).take(source_slot)
    source = source.view(batch, cells_y, cells_x, block, block).permute(0, 1, 3, 2, 4)
    source = source.reshape(batch, cells_y * block, cells_x * block)
    source += (top[:, None] + torch.arange(cells_y * block, device=x.device) // block * block)[:, :, None] * width
    source += (left[:, None] + torch.arange(cells_x * block, device=x.device) // block * block)[:, None, :]
    # Pixel (r, c) of an image with offset (top, left) finds its source at (r - top, c - left).
    rows, cols = torch.arange(height, device=x.device), torch.arange(width, device=x.device)
    row_in_cells, inside_y = _whole_cells(rows, top, block, height)  # [B, H]
    col_in_cells, inside_x = _whole_cells(cols, left, block, width)  # [B, W]
    first = torch.arange(batch, device=x.device)[:, None] * source[0].numel()
    shuffled = source.view(-1).take((row_in_cells * (cells_x * block) + first)[:, :, None] + col_in_cells[:, None, :])
    inside = inside_y[:, :, None] & inside_x[:, None, :]
    index = torch.where(inside, shuffled, rows[:, None] * width + cols)
    flat = x.reshape(batch, channels, height * width)
    return flat.gather(2, index.view(batch, 1, -1).expand(-1, channels, -1)).view_as(x)


def _whole_cells(positions, offsets, block, size):
    """Position [B, N] relative to grids starting at `offsets` [B] (clamped into the whole cells), and
    whether it lies in a whole cell."""
    relative = positions[None] - offsets[:, None]
    whole = (relative >= 0) & (relative < ((size - offsets) // block * block)[:, None])
    return relative.clamp_(0, size // block * block - 1), whole


_DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, anti-alias sigma


def _defocus_kernel(radius, alias_sigma, scale):
    """The script's `disk`: a pixel disk of `radius`, normalized, smoothed by cv2.GaussianBlur (3 x 3
    at 32 px, reflect-101 border). Larger images scale radius, sigma and the smoothing window."""
    radius, alias_sigma = radius * scale, alias_sigma * scale
    smooth_radius = max(1, round(scale))
    half = math.ceil(radius) + smooth_radius  # zero margin: the border mode of the smoothing never matters
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius ** 2).double()
    disk = disk / disk.sum()
    taps = torch.arange(-smooth_radius, smooth_radius + 1, dtype=torch.float64)
    smooth = torch.exp(-taps ** 2 / (2 * alias_sigma ** 2))  # cv2.getGaussianKernel for sigma > 0
    smooth = smooth / smooth.sum()
    kernel = F.conv2d(disk[None, None], smooth.view(1, 1, -1, 1), padding=(smooth_radius, 0))
    kernel = F.conv2d(kernel, smooth.view(1, 1, 1, -1), padding=(0, smooth_radius))[0, 0]
    return kernel


def _defocus_blur(x, level, generator):
    """Correlate with the anti-aliased disk, reflect-101 border (cv2.filter2D)."""
    radius, alias_sigma = _DEFOCUS_BLUR[level]
    kernel = _defocus_kernel(radius, alias_sigma, _size_scale(x))
    return _correlate2d(x, kernel, 'mirror').clamp_(0, 1)


_MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # ImageMagick radius, sigma


def _motion_blur(x, level, generator):
    """ImageMagick's motion blur (radius, sigma of the table), angle U(-45, 45) degrees per image.

    The script runs ImageMagick on a PNG; this computes the same one-sided Gaussian along the
    rounded direction (`_directional_blur`) in float, without the 8-bit round trip.
    """
    radius, sigma = _MOTION_BLUR[level]
    scale = _size_scale(x)
    degrees = _rand((x.shape[0],), generator, x) * 90 - 45
    return _directional_blur(x, _motion_kernel(radius * scale, sigma * scale), degrees).clamp_(0, 1)


# np.arange(1, 1.06, 0.01) ... np.arange(1, 1.26, 0.01): float rounding makes numpy include the end
# point for the first two, and numpy steps by (1 + 0.01) - 1, which decides round(26 * 1.25...) = 33.
_ZOOM_BLUR_STEPS = (7, 12, 16, 21, 26)
_ZOOM_BLUR_STEP = (1 + 0.01) - 1


def _zoom_blur(x, level, generator):
    """Mean of the image and its centre zooms by 1, 1.01, ... (the image itself counts twice)."""
    total = x.clone()
    steps = _ZOOM_BLUR_STEPS[level]
    for step in range(steps):
        total += _clipped_zoom(x, 1 + step * _ZOOM_BLUR_STEP)
    return total.div_(steps + 1).clamp_(0, 1)


_SNOW = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95),  # mean, std, zoom, threshold, blur radius, blur sigma, blend
         (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
         (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
         (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))


def _snow(x, level, generator):
    """Zoomed, thresholded noise streaked by a motion blur at U(-135, -45) degrees, over a paled image.

    The streaks use `_directional_blur` instead of ImageMagick, in float instead of 8-bit PNG.
    """
    mean, std, zoom, threshold, blur_radius, blur_sigma, blend = _SNOW[level]
    batch, _, height, width = x.shape
    scale = _size_scale(x)
    flakes = _randn((batch, 1, height, width), generator, x).mul_(std).add_(mean)
    flakes = _clipped_zoom(flakes, zoom * scale)
    flakes = torch.where(flakes < threshold, 0, flakes).clamp_(0, 1)
    degrees = _rand((batch,), generator, x) * 90 - 135
    flakes = _directional_blur(flakes, _motion_kernel(blur_radius * scale, blur_sigma * scale), degrees)
    paled = torch.maximum(x, _to_gray(x) * 1.5 + 0.5)
    out = x * blend + paled * (1 - blend)
    return out.add_(flakes).add_(flakes.flip(-2, -1)).clamp_(0, 1)


def _frost_texture(batch, height, width, scale, generator, like):
    """A procedural ice layer [B, 3, H, W] in [0, 1]: bright needles in three directions over a haze.

    Stands in for the six frost photographs the script crops from: mean about 0.55-0.6, bluish white.
    """
    size = 1 << max(5, math.ceil(math.log2(max(height, width))))
    haze = _plasma_fractal(batch, size, 2.0, generator, like)[:, None, :height, :width]
    needles = None
    base_angle = _rand((batch,), generator, like) * 180
    half_length = math.ceil(4 * scale)
    positions = torch.arange(-half_length, half_length + 1, dtype=torch.float64)
    weights = torch.exp(-positions ** 2 / (2 * (2.5 * scale) ** 2))  # needles grow both ways from a seed
    for turn in (0, 60, 120):
        seeds = (_rand((batch, 1, height, width), generator, like) < 0.06).to(like.dtype)
        streak = _directional_blur(seeds, weights, base_angle + turn, positions)
        needles = streak if needles is None else torch.maximum(needles, streak)
    needles = needles / needles.amax((2, 3), keepdim=True).clamp_min(1e-6)
    ice = (0.55 * haze + 0.9 * needles.sqrt()).clamp_(0, 1)
    return ice * _constant((0.85, 0.93, 1.0), like)


_FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight


def _frost(x, level, generator):
    """weight * x + frost_weight * ice, with a procedural ice layer instead of the photographs."""
    image_weight, frost_weight = _FROST[level]
    batch, _, height, width = x.shape
    ice = _frost_texture(batch, height, width, _size_scale(x), generator, x)
    return (x * image_weight).add_(ice, alpha=frost_weight).clamp_(0, 1)


_FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # strength, plasma wibble decay


def _fog(x, level, generator):
    """Add a plasma fractal (one per image, shared by the channels), rescale by max / (max + strength)."""
    strength, decay = _FOG[level]
    batch, _, height, width = x.shape
    size = 1 << max(5, math.ceil(math.log2(max(height, width))))  # the script's mapsize=32 at 32 px
    plasma = _plasma_fractal(batch, size, decay, generator, x)[:, None, :height, :width]
    peak = x.amax((1, 2, 3), keepdim=True)
    return (x + strength * plasma).mul_(peak / (peak + strength)).clamp_(0, 1)


_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)


def _brightness(x, level, generator):
    """Add to the HSV value, clipped at 1 (skimage rgb2hsv/hsv2rgb): with hue and saturation fixed,
    RGB scales with the value, and black turns gray (its saturation is 0)."""
    value = x.amax(1, keepdim=True)
    new_value = (value + _BRIGHTNESS[level]).clamp_(max=1)
    ratio = new_value / value.clamp_min(1e-12)
    return torch.where(value > 0, x * ratio, new_value).clamp_(0, 1)


_SATURATE = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))  # saturation factor, offset


def _saturate(x, level, generator):
    """Scale and shift the HSV saturation (skimage's conversion: gray has hue 0, red)."""
    factor, offset = _SATURATE[level]
    value = x.amax(1, keepdim=True)
    spread = value - x.amin(1, keepdim=True)
    chromatic = spread > 0
    saturation = torch.where(chromatic, spread / value.clamp_min(1e-12), 0)
    new_saturation = (saturation * factor + offset).clamp_(0, 1)
    # Each channel is value * (1 - saturation * g(hue)): rescale its distance below the value.
    ratio = new_saturation / saturation.clamp_min(1e-12)
    colourful = value - (value - x) * ratio
    from_gray = value * (1 - new_saturation * _constant((0.0, 1.0, 1.0), x))
    return torch.where(chromatic, colourful, from_gray).clamp_(0, 1)


_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)


def _contrast(x, level, generator):
    """(x - mean) * factor + mean, with the mean of each channel of each image."""
    means = x.mean((2, 3), keepdim=True)
    return (x - means).mul_(_CONTRAST[level]).add_(means).clamp_(0, 1)


# alpha, sigma, affine jitter, as fractions of the image size (the script multiplies them by IMSIZE = 32)
_ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))


def _elastic_transform(x, level, generator):
    """Random affine (3 jittered points, cv2.warpAffine, reflect-101) then a smooth random
    displacement field (scipy map_coordinates, order 1, mode 'reflect')."""
    alpha, sigma, jitter = (value * min(x.shape[-2:]) for value in _ELASTIC[level])
    point_shift = (2 * _rand((x.shape[0], 3, 2), generator, x) - 1) * jitter
    field = 2 * _rand((x.shape[0], 2, *x.shape[-2:]), generator, x) - 1
    return _elastic_apply(x, point_shift, field, alpha, sigma)


def _elastic_apply(x, point_shift, field, alpha, sigma):
    """Elastic transform of `x` given its random draws: `point_shift` [B, 3, 2] moves the script's
    three anchor points (x, y), `field` [B, 2, H, W] in [-1, 1] is the raw (dx, dy) noise."""
    batch, _, height, width = x.shape
    centre_x, centre_y, arm = width // 2, height // 2, min(height, width) // 3
    anchors = move(torch.tensor([[centre_x + arm, centre_y + arm], [centre_x + arm, centre_y - arm],
                                  [centre_x - arm, centre_y - arm]], dtype=torch.float64), x.device)
    moved = anchors + point_shift.double()
    # warpAffine samples the source at the inverse map: the affine taking moved anchors to anchors.
    homogeneous = torch.cat([moved, torch.ones(batch, 3, 1, dtype=torch.float64, device=x.device)], -1)
    inverse = _solve3(homogeneous, anchors.expand(batch, 3, 2))  # [B, 3, 2]
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64, device=x.device),
                                torch.arange(width, dtype=torch.float64, device=x.device), indexing='ij')
    pixels = torch.stack([cols, rows, torch.ones_like(rows)], -1).view(1, height * width, 3)
    source = (pixels @ inverse).view(batch, height, width, 2)
    # align_corners=True + reflection reflects about the edge pixel centres: cv2's BORDER_REFLECT_101.
    grid = torch.stack([source[..., 0] * (2 / max(width - 1, 1)), source[..., 1] * (2 / max(height - 1, 1))], -1) - 1
    warped = F.grid_sample(x, grid.to(x.dtype), mode='bilinear', padding_mode='reflection',
                           align_corners=True)
    if alpha == 0:
        return warped.clamp_(0, 1)
    # skimage gaussian(mode='reflect', truncate=3) of the uniform noise, times alpha.
    shift = _gaussian_blur(field.to(x.dtype), sigma, mode='reflect', truncate=3) * alpha
    sample_x = cols.to(x.dtype) + shift[:, 0]
    sample_y = rows.to(x.dtype) + shift[:, 1]
    # align_corners=False + reflection reflects about the image edges: scipy's 'reflect'.
    grid = torch.stack([(2 * sample_x + 1) / width - 1, (2 * sample_y + 1) / height - 1], -1)
    return F.grid_sample(warped, grid, mode='bilinear', padding_mode='reflection',
                         align_corners=False).clamp_(0, 1)


def _solve3(a, b):
    """a^-1 @ b for a batch of 3 x 3 matrices `a` by the adjugate: torch.linalg.solve checks for a singular
    matrix on the host, which waits for the GPU (the jittered anchors are never collinear)."""
    r0, r1, r2 = a.unbind(-2)
    adjugate = torch.stack([torch.linalg.cross(r1, r2), torch.linalg.cross(r2, r0), torch.linalg.cross(r0, r1)], -1)
    determinant = (r0 * adjugate[..., 0]).sum(-1)
    return adjugate @ b / determinant[..., None, None]


_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)


def _pixelate(x, level, generator):
    """PIL BOX resize to int(size * factor), then BOX back to the original size, in float."""
    factor = _PIXELATE[level]
    height, width = x.shape[-2:]
    small_h, small_w = max(int(height * factor), 1), max(int(width * factor), 1)
    rows = _on_device(_pil_box_round_trip, (height, small_h), x.device, x.dtype)
    cols = _on_device(_pil_box_round_trip, (width, small_w), x.device, x.dtype)
    return (rows @ x @ cols.T).clamp_(0, 1)


_JPEG_QUALITY = (80, 65, 58, 50, 40)


def _jpeg_compression(x, level, generator):
    """JPEG round trip at the table's quality, per image (8-bit: the input is rounded to 1/255).

    CPU batches give PIL's round trip exactly (what the script runs; tests compare pixel for pixel):
    through torchvision's libjpeg calls up to 128 x 128 pixels, through PIL above. Both use the same
    libjpeg-turbo settings (4:2:0 chroma, islow DCT) and give identical bytes; per image, PIL's
    overhead costs more at 32 px (torchvision 2.7x faster on one thread) and torchvision's CHW
    layout copies more at 224 px (PIL about 1.1x faster), crossing near 128 px.

    CUDA batches go through the GPU's codec, nvJPEG (TorchCodec's when it is installed, torchvision's
    otherwise). Both encode with 4:4:4 chroma sampling where PIL uses 4:2:0, so colours lose less and
    the images differ from PIL's. PIL's own 4:4:4 round trip, as a stand-in measured on CPU for these
    qualities, differs from its 4:2:0 one by 2.4-4.4/255 on average and loses 14-27% less (mean
    absolute change, 32 and 224 px photos); `test_robustness_gpu.py` bounds nvJPEG's difference from
    PIL by 6/255 on average and its loss at 60-110% of PIL's. nvJPEG's decoder parses the encoded bytes
    on the host: this is the one corruption that waits for the GPU (one device-to-host copy per call;
    with torchvision's encoder, which works on its own stream, also one wait before encoding).
    """
    quality = _JPEG_QUALITY[level]
    pixels = (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    if x.device.type == 'cuda':
        decoded = _jpeg_round_trip_cuda(pixels, quality)
    else:
        host = pixels.cpu()
        small = host.shape[-2] * host.shape[-1] <= _TORCHVISION_JPEG_MAX_PIXELS
        codec = _torchvision_jpeg() if small else None
        decoded = _jpeg_round_trip_pil(host, quality) if codec is None else _jpeg_round_trip_torchvision(
            host, quality, *codec)
        decoded = move(decoded, x.device)
    return decoded.to(x.dtype).div_(255)


_TORCHVISION_JPEG_MAX_PIXELS = 128 * 128


def _jpeg_round_trip_pil(pixels, quality):
    """PIL's JPEG round trip of uint8 CPU images [B, C, H, W], one image at a time."""
    arrays = pixels[:, 0].numpy() if pixels.shape[1] == 1 else pixels.permute(0, 2, 3, 1).numpy()
    decoded = []
    for image in arrays:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, 'JPEG', quality=quality)
        decoded.append(np.asarray(Image.open(buffer)))
    out = torch.from_numpy(np.stack(decoded))
    return out[:, None] if pixels.shape[1] == 1 else out.permute(0, 3, 1, 2).contiguous()


def _jpeg_round_trip_torchvision(pixels, quality, encode, decode):
    """torchvision's libjpeg round trip of uint8 CPU images [B, C, H, W]."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # torchvision 0.29 deprecates its codecs
        return torch.stack(decode(encode(list(pixels), quality=quality)))


@lru_cache(maxsize=1)
def _torchvision_jpeg():
    """torchvision's (encode_jpeg, decode_jpeg), or None where its image extension does not load."""
    try:
        from torchvision.io import decode_jpeg, encode_jpeg
        _jpeg_round_trip_torchvision(torch.zeros(1, 1, 8, 8, dtype=torch.uint8), 75, encode_jpeg, decode_jpeg)
    except Exception:  # not built with libjpeg, or removed in a later release
        return None
    return encode_jpeg, decode_jpeg


def _jpeg_round_trip_cuda(pixels, quality):
    """nvJPEG round trip of uint8 CUDA images [B, C, H, W]; 1-channel images are encoded as gray RGB
    (nvJPEG encodes RGB only: luma = the gray value, chroma neutral) and decoded as gray."""
    encode, decode, own_stream = _cuda_jpeg_codec()
    rgb = pixels.expand(-1, 3, -1, -1).contiguous() if pixels.shape[1] == 1 else pixels.contiguous()
    if own_stream:  # torchvision encodes on its own stream, which does not wait for ours
        torch.cuda.current_stream(pixels.device).synchronize()
    encoded = encode(list(rgb), quality)
    lengths = [len(data) for data in encoded]  # known on the host: no wait
    on_host = torch.cat(encoded).cpu()  # one copy for the batch; the decoder parses on the host
    decoded = decode(list(on_host.split(lengths)), 'GRAY' if pixels.shape[1] == 1 else 'RGB', pixels.device)
    return torch.stack(decoded)


@lru_cache(maxsize=1)
def _cuda_jpeg_codec():
    """(encode, decode, encodes on its own stream) of TorchCodec (>= 0.16) when it loads, else torchvision."""
    try:
        from torchcodec.decoders import decode_jpeg as torchcodec_decode
        from torchcodec.encoders import JpegEncoder
    except Exception:  # not installed, older than 0.16, or its libraries do not load
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        def encode(images, quality):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                return encode_jpeg(images, quality=quality)

        def decode(data, mode, device):
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', DeprecationWarning)
                return decode_jpeg(data, mode=ImageReadMode[mode], device=device)

        return encode, decode, True

    def encode(images, quality):
        return [JpegEncoder(image).to_tensor(quality=quality) for image in images]

    def decode(data, mode, device):
        return torchcodec_decode(data, mode=mode, device=device)

    return encode, decode, False


_SPATTER = ((0.62, 0.1, 0.7, 0.7, 0.5, 0),  # mean, std, blur sigma, threshold, strength, mud
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1))


def _spatter(x, level, generator):
    """Water drops (severities 1-3) or mud (4-5) from thresholded, blurred noise.

    Mud follows the script. For water the script shades the drops with cv2 (Canny edges, distance
    transform, histogram equalization, emboss); this uses the drop boundary as the edges and a
    chamfer distance instead of cv2's, then the same equalize / emboss / 3 x 3 blur chain.
    """
    mean, std, blur, threshold, strength, mud = _SPATTER[level]
    batch, _, height, width = x.shape
    scale = _size_scale(x)
    liquid = _randn((batch, 1, height, width), generator, x).mul_(std).add_(mean)
    liquid = _gaussian_blur(liquid, blur * scale)
    liquid = torch.where(liquid < threshold, 0, liquid)
    if mud:
        cover = _gaussian_blur((liquid > threshold).to(x.dtype), strength * scale)
        cover = torch.where(cover < 0.8, 0, cover)
        brown = _constant((63 / 255, 42 / 255, 20 / 255), x)
        return (x * (1 - cover) + brown * cover).clamp_(0, 1)
    drops = liquid > 0
    limit = 20 * scale
    distance = _edge_distance(drops & ~_erode(drops), limit)
    box = torch.full((3, 3), 1 / 9, dtype=torch.float64)
    distance = _correlate2d(distance, box, 'mirror')
    # cv2 truncates the blurred distance to uint8. A plateau of equal distances averages to that very
    # value, which float round-off (of either filter form) can put just below: floor it from 1e-4 above.
    levels = distance.add_(1e-4).floor_().long().clamp_(0, math.ceil(limit))
    shade = _equalize(levels, math.ceil(limit) + 1)
    emboss = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=torch.float64)
    shade = _correlate2d(shade, emboss, 'mirror').clamp_(0, 1)  # cv2.CV_8U saturates
    shade = _correlate2d(shade, box, 'mirror').to(x.dtype)
    wet = liquid * shade
    wet = wet / wet.amax((2, 3), keepdim=True).clamp_min(1e-12) * strength
    turquoise = _constant((175 / 255, 238 / 255, 238 / 255), x)
    return (x + wet * turquoise).clamp_(0, 1)


_CORRUPTION_FUNCTIONS: dict[str, Callable] = {
    'gaussian_noise': _gaussian_noise,
    'shot_noise': _shot_noise,
    'impulse_noise': _impulse_noise,
    'defocus_blur': _defocus_blur,
    'glass_blur': _glass_blur,
    'motion_blur': _motion_blur,
    'zoom_blur': _zoom_blur,
    'snow': _snow,
    'frost': _through_rgb(_frost),
    'fog': _fog,
    'brightness': _brightness,
    'contrast': _contrast,
    'elastic_transform': _elastic_transform,
    'pixelate': _pixelate,
    'jpeg_compression': _jpeg_compression,
    'speckle_noise': _speckle_noise,
    'gaussian_blur': _gaussian_blur_corruption,
    'spatter': _through_rgb(_spatter),
    'saturate': _through_rgb(_saturate),
}


# ---------------------------------------------------------------------------------------------------
# Argument checks and `corrupt`

_MIN_SIZE = 8


def _check_corruption_name(name, argument='name'):
    if not isinstance(name, str) or name not in _CORRUPTION_FUNCTIONS:
        valid = ', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)
        raise ValueError(f"{argument}={name!r} is not a known corruption; use one of: {valid}.")


def _check_severity(severity, argument='severity'):
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"{argument}={severity!r} must be an integer from 1 to 5 (CIFAR-10-C's severities).")


def _check_images(x, argument='x'):
    """ValueError unless `x` is a batch of float images of at least 8 x 8 pixels in [0, 1] (values read on the host only)."""
    problem = image_problem(x, argument)
    if problem is not None:
        raise ValueError(problem[1])
    if min(x.shape[-2:]) < _MIN_SIZE:
        raise ValueError(f"{argument} has shape {tuple(x.shape)}; images must be at least "
                         f"{_MIN_SIZE} x {_MIN_SIZE} pixels.")
    if _on_host(x) and x.numel():  # on a GPU, reading a value back would wait for it (see `corrupt`)
        _check_pixel_values(x, argument)


def _check_pixel_values(x, argument):
    """Raise ValueError for NaN or values outside [0, 1] (reads values: a host sync on a GPU)."""
    low, high = torch.aminmax(x)  # one pass; NaN propagates into both
    if torch.isnan(low):
        raise ValueError(f"{argument} contains NaN in {int(torch.isnan(x).sum())} of {x.numel()} values; "
                         f"corruptions need pixels in [0, 1]: find where the NaN come from (a zero std in a "
                         f"normalization?) before corrupting.")
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(f"{argument} has values in [{float(low):.3g}, {float(high):.3g}]; corruptions "
                         f"work on pixels in [0, 1]: decode normalized batches first (x * std + mean).")


def _no_autocast(device):
    """A context that runs the corruptions in their own precision even inside the caller's autocast."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def corrupt(x, name, severity, generator=None):
    """Corrupt images `x` (float [B, C, H, W] in [0, 1], C = 1 or 3) with CIFAR-10-C's `name` at `severity` 1-5.

    Returns a new tensor of the same shape, dtype and device, in [0, 1]; `x` is never modified.
    Every image draws its own noise; the same `generator` state gives the same output (with
    `generator=None` torch's global RNG is used, which fastai's `set_seed` seeds). Random numbers are
    drawn on the generator's device, so pass one on `x`'s device to avoid copies.

    CPU tensors with NaN or values outside [0, 1] raise a ValueError. On a GPU the values are not
    checked: reading one back would make every call wait for the GPU, which is what the GPU path
    avoids (no corruption but `jpeg_compression` synchronizes); values there are clamped to [0, 1]
    and NaN stays NaN. `evaluate_robustness` checks every batch once, on any device.
    """
    _check_corruption_name(name)
    _check_severity(severity)
    _check_images(x)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")
    images = x.detach().as_subclass(torch.Tensor)
    work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    images = images.to(work_dtype).clamp(0, 1)  # a new tensor: the kernels may work in place on it
    if images.shape[0] == 0:
        return images.to(x.dtype)
    with torch.no_grad(), _no_autocast(images.device):
        out = _CORRUPTION_FUNCTIONS[name](images, int(severity) - 1, generator)
    return out.to(x.dtype)
