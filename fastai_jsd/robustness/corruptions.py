"""Common corruptions (CIFAR-10-C), calibration error and a robustness report for fastai Learners
(classification and segmentation).

The corruptions re-implement `ImageNet-C/create_c/make_cifar_c.py` of hendrycks/robustness, the script
that generated CIFAR-10-C, as batched torch kernels on any device: same operations, same severity
tables. Where the script calls ImageMagick (motion blur, snow), cv2 (spatter) or ships photographs
(frost), an equivalent is computed in torch; each such corruption says how it differs.

Image size: the tables are for 32 px images. Every length in pixels (blur sigmas and radii, motion
blur length, glass-blur swap distance, snow flake size, elastic displacement, spatter blob size,
frost needles) is multiplied by `min(H, W) / 32`, so that a corrupted image of any size looks like
the corrupted 32 px version scaled up. Ratios (zoom factors, pixelation ratio), intensities (noise
strengths, contrast, brightness, JPEG quality) are size independent and used as they are.

Outputs are float and not rounded to 1/255 (the script stores uint8); only `jpeg_compression`
quantizes, because JPEG works on 8-bit images.

Devices: separable blurs are one matmul with a band matrix per axis, zooms one `grid_sample`. 2-D and
motion-blur kernels are grouped convolutions and per-tap gathers on the CPU while those are cheaper
(small images and kernels), one FFT product otherwise and on a GPU, where each tap would be a full
memory pass; tests run both forms on the CPU and compare them. No corruption waits for the GPU (no
`.item()`, no data-dependent shapes, host-made constants queued with non-blocking copies), except
`jpeg_compression`, whose encoded bytes must reach the host for nvJPEG's decoder.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, ClassVar, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

CORRUPTIONS = (
    'gaussian_noise', 'shot_noise', 'impulse_noise',
    'defocus_blur', 'glass_blur', 'motion_blur', 'zoom_blur',
    'snow', 'frost', 'fog', 'brightness',
    'contrast', 'elastic_transform', 'pixelate', 'jpeg_compression',
)
EXTRA_CORRUPTIONS = ('speckle_noise', 'gaussian_blur', 'spatter', 'saturate')

# Severity tables of make_cifar_c.py, indexed by severity - 1.
_GAUSSIAN_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
_SHOT_NOISE_PHOTONS = (500, 250, 100, 75, 50)
_IMPULSE_NOISE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)
_SPECKLE_NOISE_STD = (0.06, 0.1, 0.12, 0.16, 0.2)
_GAUSSIAN_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
_GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, max_delta, sweeps
_DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))  # disk radius, anti-alias sigma
_MOTION_BLUR = ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))  # ImageMagick radius, sigma
# np.arange(1, 1.06, 0.01) ... np.arange(1, 1.26, 0.01): float rounding makes numpy include the end
# point for the first two, and numpy steps by (1 + 0.01) - 1, which decides round(26 * 1.25...) = 33.
_ZOOM_BLUR_STEPS = (7, 12, 16, 21, 26)
_ZOOM_BLUR_STEP = (1 + 0.01) - 1
_SNOW = ((0.1, 0.2, 1, 0.6, 8, 3, 0.95),  # mean, std, zoom, threshold, blur radius, blur sigma, blend
         (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
         (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
         (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
_FROST = ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
_FOG = ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))  # strength, plasma wibble decay
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
# alpha, sigma, affine jitter, as fractions of the image size (the script multiplies them by IMSIZE = 32)
_ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)
_JPEG_QUALITY = (80, 65, 58, 50, 40)
_SPATTER = ((0.62, 0.1, 0.7, 0.7, 0.5, 0),  # mean, std, blur sigma, threshold, strength, mud
            (0.65, 0.1, 0.8, 0.7, 0.5, 0),
            (0.65, 0.3, 1, 0.69, 0.5, 0),
            (0.65, 0.1, 0.7, 0.69, 0.6, 1),
            (0.65, 0.1, 0.5, 0.68, 0.6, 1))
_SATURATE = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))  # saturation factor, offset

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what PIL's 'L' and cv2's RGB2GRAY use
_MIN_SIZE = 8


# ---------------------------------------------------------------------------------------------------
# Device placement and randomness: drawn on the generator's device (a CPU generator cannot fill a CUDA
# tensor), then moved.

def _move(tensor, device, dtype=None):
    """`tensor` on `device` (and `dtype`); a host-to-device copy is queued, not waited for.

    A blocking copy from pageable memory synchronizes with the GPU; a non-blocking one from the host
    is safe (CUDA stages the source before returning), so host-made constants and CPU-generator draws
    cost no sync. Device-to-host copies stay blocking: the host reads them next.
    """
    return tensor.to(device=device, dtype=dtype, non_blocking=tensor.device.type == 'cpu')


@lru_cache(maxsize=128)
def _on_device(make, args, device, dtype):
    """`make(*args)` (a CPU tensor) on `device` in `dtype`, made and copied once per device and dtype:
    the filter matrices and sampling grids every call of a corruption reuses."""
    return _move(make(*args), device, dtype)


def _constant(values, like):
    """Per-channel constants as a [1, C, 1, 1] tensor with `like`'s dtype and device."""
    return _move(torch.tensor(values, dtype=like.dtype), like.device).view(1, -1, 1, 1)


def _rand(shape, generator, like):
    """U(0, 1) of `shape` with `like`'s dtype and device; `generator=None` uses torch's global RNG."""
    if generator is None:
        return torch.rand(shape, dtype=like.dtype, device=like.device)
    return _move(torch.rand(shape, generator=generator, dtype=like.dtype, device=generator.device), like.device)


def _randn(shape, generator, like):
    """N(0, 1) of `shape` with `like`'s dtype and device."""
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return _move(torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device), like.device)


def _poisson(rates, generator):
    """Poisson draws with the given rates.

    A CPU generator with accelerator rates seeds a generator on the rates' device from one CPU draw:
    the Poisson draws need the rates where the generator is, and copying the rates to the host would
    wait for the GPU. Reproducible from the CPU generator's state, but not the CPU path's pixels.
    """
    if generator is None:
        return torch.poisson(rates)
    if generator.device == rates.device:
        return torch.poisson(rates, generator=generator)
    if generator.device.type == 'cpu':
        seed = int(torch.randint(2 ** 62, (), generator=generator))
        return torch.poisson(rates, generator=torch.Generator(rates.device).manual_seed(seed))
    return torch.poisson(_move(rates, generator.device), generator=generator).to(rates.device)


# ---------------------------------------------------------------------------------------------------
# Filtering helpers matching scipy.ndimage / cv2 border conventions.

def _size_scale(x):
    """How many pixels of `x` one pixel of a 32 px CIFAR image stands for."""
    return min(x.shape[-2], x.shape[-1]) / 32


def _border_index(n, before, after, mode, device):
    """Indices into a length-`n` axis padded by `before`/`after` entries with a scipy border `mode`."""
    idx = torch.arange(-before, n + after, device=device)
    if mode == 'nearest':
        return idx.clamp(0, n - 1)
    if mode == 'mirror':  # d c b | a b c d: cv2's BORDER_REFLECT_101, scipy's 'mirror'
        if n == 1:
            return torch.zeros_like(idx)
        folded = idx.remainder(2 * n - 2)
        return torch.where(folded >= n, 2 * n - 2 - folded, folded)
    folded = idx.remainder(2 * n)  # 'reflect': d c b a | a b c d, scipy's 'reflect'
    return torch.where(folded >= n, 2 * n - 1 - folded, folded)


def _on_host(x):
    """Whether `x` is on the CPU, where small filters are cheaper as grouped convolutions and per-tap gathers."""
    return x.device.type == 'cpu'


def _correlate_separable(x, kernel_y, kernel_x, mode):
    """Correlate every channel of `x` [B, C, H, W] with the 1-D kernels along H then W.

    One matmul with a band matrix per axis, borders folded into the matrix: on one CPU thread 4-16x
    faster than summing shifted slices (32-224 px, 5-57 taps), and one pass instead of one per tap on
    a GPU.
    """
    height, width = x.shape[-2:]
    rows = _on_device(_band_matrix, (height, tuple(kernel_y.tolist()), mode), x.device, x.dtype)
    cols = _on_device(_band_matrix, (width, tuple(kernel_x.tolist()), mode), x.device, x.dtype)
    return torch.matmul(rows, x @ cols.T)


def _band_matrix(size, kernel, mode):
    """The [size, size] matrix M with (M @ v)[i] = sum_t kernel[t] * v[border(i + t - radius)] (float64, CPU)."""
    radius = len(kernel) // 2
    source = _border_index(size, radius, radius, mode, 'cpu')
    rows = torch.arange(size)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for tap, weight in enumerate(kernel):
        matrix.index_put_((rows, source[tap:tap + size]), torch.full((size,), weight, dtype=torch.float64),
                          accumulate=True)  # reflected taps can land on the same pixel
    return matrix


def _correlate2d(x, kernel, mode, method=None):
    """Correlate every channel of `x` with one odd-sized 2-D kernel (cv2.filter2D's convention).

    `method`: 'conv' (one grouped convolution) or 'fft' (one FFT product). None: 'conv' on the CPU for
    kernels up to 17 x 17, 'fft' for larger ones and on a GPU (on one CPU thread the convolution wins
    for small kernels, they are even at 17 x 17, and the FFT is 6.7x faster at 37 x 37, 224 px).
    """
    if method is None:
        method = 'conv' if _on_host(x) and kernel.shape[0] <= 17 else 'fft'
    if method == 'fft':
        return _fft_correlate(x, _move(kernel, x.device, x.dtype)[None, None], mode)
    batch, channels, height, width = x.shape
    radius_y, radius_x = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = x.index_select(2, _border_index(height, radius_y, radius_y, mode, x.device))
    padded = padded.index_select(3, _border_index(width, radius_x, radius_x, mode, x.device))
    # One depthwise convolution over all B * C planes: far faster on CPU than a 1-channel conv2d.
    planes = padded.reshape(1, batch * channels, *padded.shape[-2:])
    weight = _move(kernel, x.device, x.dtype)[None, None].expand(batch * channels, 1, *kernel.shape).contiguous()
    return F.conv2d(planes, weight, groups=batch * channels).view(batch, channels, height, width)


def _fft_size(n):
    """The smallest m >= n with no prime factor above 7: the lengths FFT libraries transform fastest."""
    m = n
    while True:
        rest = m
        for prime in (2, 3, 5, 7):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return m
        m += 1


def _fft_correlate(x, kernels, mode):
    """Correlate image b, channel c of `x` [B, C, H, W] with `kernels[b, c]` ([B or 1, C or 1, K, K], K
    odd, offset 0 at the centre), the border extended by `mode`, through one FFT product."""
    height, width = x.shape[-2:]
    size = kernels.shape[-1]
    radius = size // 2
    fft_h, fft_w = _fft_size(height + 2 * radius), _fft_size(width + 2 * radius)
    # Padded by the radius in front and up to the FFT size behind: an output pixel reads the 2r + 1
    # samples from its own position on, so the circular wrap-around never reaches the outputs kept.
    padded = x.index_select(2, _border_index(height, radius, fft_h - height - radius, mode, x.device))
    padded = padded.index_select(3, _border_index(width, radius, fft_w - width - radius, mode, x.device))
    grid = kernels.new_zeros(*kernels.shape[:-2], fft_h, fft_w)
    grid[..., :size, :size] = kernels
    product = torch.fft.rfft2(padded) * torch.fft.rfft2(grid).conj()
    return torch.fft.irfft2(product, s=(fft_h, fft_w))[..., :height, :width]


def _gaussian_kernel1d(sigma, truncate):
    """scipy.ndimage's Gaussian: radius int(truncate * sigma + 0.5), normalized to sum 1."""
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def _gaussian_blur(x, sigma, mode='nearest', truncate=4.0):
    """skimage.filters.gaussian per channel (its defaults: mode 'nearest', truncate 4)."""
    if sigma <= 0:
        return x.clone()
    kernel = _gaussian_kernel1d(sigma, truncate)
    return _correlate_separable(x, kernel, kernel, mode)


def _clipped_zoom(x, zoom):
    """The script's `clipped_zoom`: zoom the central crop by `zoom` (scipy zoom, order 1), crop back.

    scipy.ndimage.zoom sizes the output as round(size * zoom) and, with grid_mode=False, maps the
    corner pixel centres onto each other (bilinear, align_corners=True); crop, zoom and trim are one
    `grid_sample` with a precomputed grid: on one CPU thread 2-6x faster than interpolating the crop,
    and on a GPU a thread per output pixel, where bilinear interpolate loops over all B * C planes in
    each thread (slow for small images).
    """
    grid = _on_device(_zoom_grid, (*x.shape[-2:], zoom), x.device, x.dtype)
    return F.grid_sample(x, grid.expand(x.shape[0], -1, -1, -1), mode='bilinear', padding_mode='border',
                         align_corners=True)


def _zoom_axis(size, zoom):
    """Where `_clipped_zoom` samples along one axis, in grid_sample's align_corners=True coordinates."""
    crop = math.ceil(size / zoom)
    zoomed = int(round(crop * zoom))
    trim = (zoomed - size) // 2
    # The pixels the script's crop slice takes: below 32 px, snow's zoom * scale can drop under 1,
    # and a crop larger than the image is then cut to it.
    taken = range(size)[(size - crop) // 2:(size - crop) // 2 + crop]
    step = (len(taken) - 1) / (zoomed - 1) if zoomed > 1 else 0.0
    source = taken.start + (torch.arange(size, dtype=torch.float64) + trim) * step
    return source * (2 / (size - 1)) - 1


def _zoom_grid(height, width, zoom):
    """The [1, H, W, 2] (x, y) sampling grid of `_clipped_zoom` (float64, CPU)."""
    ys, xs = _zoom_axis(height, zoom), _zoom_axis(width, zoom)
    return torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)], -1)[None]


def _to_gray(x):
    """Luma of RGB images [B, 3, H, W] -> [B, 1, H, W]; 1-channel images are already gray."""
    if x.shape[1] == 1:
        return x
    red, green, blue = _LUMA
    return x[:, 0:1] * red + x[:, 1:2] * green + x[:, 2:3] * blue


def _through_rgb(corruption):
    """Apply a colour corruption to 1-channel images as to their gray RGB copy, then take the luma."""
    def apply(x, level, generator):
        if x.shape[1] == 3:
            return corruption(x, level, generator)
        return _to_gray(corruption(x.expand(-1, 3, -1, -1), level, generator))
    apply.__name__ = corruption.__name__
    apply.__doc__ = corruption.__doc__
    return apply


def _motion_kernel(radius, sigma):
    """ImageMagick's MotionBlurImage weights: one-sided Gaussian over 2 * ceil(radius) + 1 taps."""
    taps = torch.arange(2 * math.ceil(radius) + 1, dtype=torch.float64)
    weights = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    weights = weights / weights.sum()
    # Taps below 1e-6 change no 8-bit value; dropping them keeps long kernels cheap.
    return weights[weights >= 1e-6]


def _directional_blur(x, weights, degrees, positions=None, method=None):
    """ImageMagick's motion blur with a per-image angle `degrees` [B]: the tap at position i (default
    0, 1, ...) samples (x + ceil(i cos a - 0.5), y + ceil(i sin a - 0.5)), edges replicated.

    `method`: 'gather' (one gather per tap) or 'fft' (the taps as one kernel per image, one FFT
    product). None: on the CPU whichever costs less by taps x pixels against 9 x padded pixels (one
    thread, 32-224 px: gathers win up to 64 px, the FFT 2.4-4x at 224 px), 'fft' on a GPU. Both
    expect non-negative images and weights.
    """
    if positions is None:
        positions = torch.arange(len(weights), dtype=torch.float64)
    radius = math.ceil(float(positions.abs().max()))
    if method is None:
        height, width = x.shape[-2:]
        padded = _fft_size(height + 2 * radius) * _fft_size(width + 2 * radius)
        method = 'gather' if _on_host(x) and len(weights) * height * width <= 9 * padded else 'fft'
    offset_x, offset_y = _tap_offsets(degrees, positions, x.device)
    if method == 'fft':
        slots = torch.arange(2 * radius + 1, device=x.device)
        along_y = (offset_y[..., None] + radius == slots).to(x.dtype)  # [B, T, K]: one-hot tap rows
        along_x = (offset_x[..., None] + radius == slots).to(x.dtype)
        weighted = along_y * _move(weights, x.device, x.dtype)[None, :, None]
        kernels = torch.bmm(weighted.transpose(1, 2), along_x)  # [B, K, K]: taps that coincide add up
        out = _fft_correlate(x, kernels[:, None], 'nearest')
        # FFT round-off leaves about +-1e-7 where the exact result is 0 (frost's sqrt would turn that
        # into 3e-4): results below 1e-6 become 0, as inputs and weights are non-negative.
        return out.masked_fill_(out < 1e-6, 0)
    batch, channels, height, width = x.shape
    rows = torch.arange(height, device=x.device).view(1, 1, height)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    row_start = (rows + offset_y[:, :, None]).clamp_(0, height - 1).mul_(width)  # [B, T, H]
    col = (cols + offset_x[:, :, None]).clamp_(0, width - 1)  # [B, T, W]
    flat = x.reshape(batch, channels, height * width)
    out = None
    for tap, weight in enumerate(weights.tolist()):
        index = (row_start[:, tap, :, None] + col[:, tap, None, :]).view(batch, 1, -1)
        sample = flat.gather(2, index.expand(batch, channels, -1))
        out = sample.mul_(weight) if out is None else out.add_(sample, alpha=weight)
    return out.view(batch, channels, height, width)


def _tap_offsets(degrees, positions, device):
    """Whole-pixel (x, y) offsets [B, T] of the taps at `positions` (CPU) along each image's angle."""
    angle = torch.deg2rad(degrees.double()).to(device)[:, None]
    positions = _move(positions, device, torch.float64)[None]
    offset_x = torch.ceil(positions * torch.cos(angle) - 0.5).long()
    offset_y = torch.ceil(positions * torch.sin(angle) - 0.5).long()
    return offset_x, offset_y


def _plasma_fractal(batch, size, decay, generator, like):
    """The script's diamond-square `plasma_fractal`, one map per image: [B, size, size] in [0, 1]."""
    maps = torch.zeros(batch, size, size, dtype=like.dtype, device=like.device)
    step, wibble = size, 100.0

    def wibbled_mean(total):
        # The script draws wibble * U(-wibble, wibble); kept, since it sets how fast detail fades.
        return total / 4 + wibble * wibble * (2 * _rand(total.shape, generator, like) - 1)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        square = corners + corners.roll(-1, dims=1)
        square = square + square.roll(-1, dims=2)
        maps[:, half::step, half::step] = wibbled_mean(square)
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        left_right = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        maps[:, 0::step, half::step] = wibbled_mean(left_right)
        top_bottom = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        maps[:, half::step, 0::step] = wibbled_mean(top_bottom)
        step //= 2
        wibble /= decay
    maps = maps - maps.amin((1, 2), keepdim=True)
    return maps / maps.amax((1, 2), keepdim=True)


def _pil_box_round_trip(size, small):
    """The [size, size] matrix of a PIL BOX resize to `small` and back along one axis."""
    return _pil_box_matrix(small, size) @ _pil_box_matrix(size, small)


@lru_cache(maxsize=64)
def _pil_box_matrix(in_size, out_size):
    """The [out, in] weights of PIL's BOX resampling along one axis (Resample.c, precompute_coeffs)."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    matrix = np.zeros((out_size, in_size))
    for out_index in range(out_size):
        centre = (out_index + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        last = min(int(centre + support + 0.5), in_size)
        for in_index in range(first, last):
            position = (in_index - centre + 0.5) / filter_scale
            matrix[out_index, in_index] = 1.0 if -0.5 < position <= 0.5 else 0.0
        matrix[out_index] /= max(matrix[out_index].sum(), 1e-12)
    return torch.from_numpy(matrix)


# ---------------------------------------------------------------------------------------------------
# The corruptions: each takes float images [B, C, H, W] in [0, 1], level = severity - 1, a generator.

def _gaussian_noise(x, level, generator):
    """x + N(0, std) per pixel and channel."""
    noise = _randn(x.shape, generator, x)
    return noise.mul_(_GAUSSIAN_NOISE_STD[level]).add_(x).clamp_(0, 1)


def _shot_noise(x, level, generator):
    """Poisson(x * photons) / photons."""
    photons = _SHOT_NOISE_PHOTONS[level]
    return _poisson(x * photons, generator).div_(photons).clamp_(0, 1)


def _impulse_noise(x, level, generator):
    """Salt and pepper on a fraction `amount` of the values, half each (skimage's 's&p' mode, per channel)."""
    amount = _IMPULSE_NOISE_AMOUNT[level]
    draw = _rand(x.shape, generator, x)
    salt_or_pepper = (draw >= amount / 2).to(x.dtype)
    return torch.where(draw < amount, salt_or_pepper, x)


def _speckle_noise(x, level, generator):
    """x + x * N(0, std)."""
    noise = _randn(x.shape, generator, x)
    return noise.mul_(_SPECKLE_NOISE_STD[level]).add_(1).mul_(x).clamp_(0, 1)


def _gaussian_blur_corruption(x, level, generator):
    """skimage Gaussian blur with the table's sigma."""
    return _gaussian_blur(x, _GAUSSIAN_BLUR_SIGMA[level] * _size_scale(x)).clamp_(0, 1)


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


def _motion_blur(x, level, generator):
    """ImageMagick's motion blur (radius, sigma of the table), angle U(-45, 45) degrees per image.

    The script runs ImageMagick on a PNG; this computes the same one-sided Gaussian along the
    rounded direction (`_directional_blur`) in float, without the 8-bit round trip.
    """
    radius, sigma = _MOTION_BLUR[level]
    scale = _size_scale(x)
    degrees = _rand((x.shape[0],), generator, x) * 90 - 45
    return _directional_blur(x, _motion_kernel(radius * scale, sigma * scale), degrees).clamp_(0, 1)


def _zoom_blur(x, level, generator):
    """Mean of the image and its centre zooms by 1, 1.01, ... (the image itself counts twice)."""
    total = x.clone()
    steps = _ZOOM_BLUR_STEPS[level]
    for step in range(steps):
        total += _clipped_zoom(x, 1 + step * _ZOOM_BLUR_STEP)
    return total.div_(steps + 1).clamp_(0, 1)


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


def _frost(x, level, generator):
    """weight * x + frost_weight * ice, with a procedural ice layer instead of the photographs."""
    image_weight, frost_weight = _FROST[level]
    batch, _, height, width = x.shape
    ice = _frost_texture(batch, height, width, _size_scale(x), generator, x)
    return (x * image_weight).add_(ice, alpha=frost_weight).clamp_(0, 1)


def _fog(x, level, generator):
    """Add a plasma fractal (one per image, shared by the channels), rescale by max / (max + strength)."""
    strength, decay = _FOG[level]
    batch, _, height, width = x.shape
    size = 1 << max(5, math.ceil(math.log2(max(height, width))))  # the script's mapsize=32 at 32 px
    plasma = _plasma_fractal(batch, size, decay, generator, x)[:, None, :height, :width]
    peak = x.amax((1, 2, 3), keepdim=True)
    return (x + strength * plasma).mul_(peak / (peak + strength)).clamp_(0, 1)


def _brightness(x, level, generator):
    """Add to the HSV value, clipped at 1 (skimage rgb2hsv/hsv2rgb): with hue and saturation fixed,
    RGB scales with the value, and black turns gray (its saturation is 0)."""
    value = x.amax(1, keepdim=True)
    new_value = (value + _BRIGHTNESS[level]).clamp_(max=1)
    ratio = new_value / value.clamp_min(1e-12)
    return torch.where(value > 0, x * ratio, new_value).clamp_(0, 1)


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


def _contrast(x, level, generator):
    """(x - mean) * factor + mean, with the mean of each channel of each image."""
    means = x.mean((2, 3), keepdim=True)
    return (x - means).mul_(_CONTRAST[level]).add_(means).clamp_(0, 1)


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
    anchors = _move(torch.tensor([[centre_x + arm, centre_y + arm], [centre_x + arm, centre_y - arm],
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


def _pixelate(x, level, generator):
    """PIL BOX resize to int(size * factor), then BOX back to the original size, in float."""
    factor = _PIXELATE[level]
    height, width = x.shape[-2:]
    small_h, small_w = max(int(height * factor), 1), max(int(width * factor), 1)
    rows = _on_device(_pil_box_round_trip, (height, small_h), x.device, x.dtype)
    cols = _on_device(_pil_box_round_trip, (width, small_w), x.device, x.dtype)
    return (rows @ x @ cols.T).clamp_(0, 1)


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
        decoded = _move(decoded, x.device)
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


def _erode(mask):
    """3 x 3 binary erosion of a bool mask [B, 1, H, W] (outside counts as inside)."""
    return -F.max_pool2d(-mask.to(torch.float32), 3, stride=1, padding=1) > 0.5


def _edge_distance(edges, limit):
    """Chamfer distance (1 straight, sqrt 2 diagonal) to the nearest edge pixel, capped at `limit`."""
    distance = torch.where(edges, 0.0, float(limit)).to(torch.float32)
    for _ in range(math.ceil(limit)):
        padded = F.pad(distance, (1, 1, 1, 1), value=float(limit))
        straight = torch.minimum(torch.minimum(padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]),
                                 torch.minimum(padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]))
        diagonal = torch.minimum(torch.minimum(padded[..., :-2, :-2], padded[..., :-2, 2:]),
                                 torch.minimum(padded[..., 2:, :-2], padded[..., 2:, 2:]))
        distance = torch.minimum(distance, torch.minimum(straight + 1, diagonal + math.sqrt(2)))
    return distance.clamp_(max=limit)


def _equalize(levels, bins):
    """cv2.equalizeHist of integer `levels` [B, 1, H, W] in 0..bins-1, mapped to [0, 1]."""
    batch = levels.shape[0]
    flat = levels.reshape(batch, -1)
    counts = torch.zeros(batch, bins, dtype=torch.float32, device=levels.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    cdf = counts.cumsum(1)
    first = torch.where(counts > 0, cdf, cdf[:, -1:]).amin(1, keepdim=True)
    lut = ((cdf - first) / (cdf[:, -1:] - first).clamp_min(1)).clamp_(0, 1)
    return lut.gather(1, flat).view_as(levels)


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
# Public API

def _check_corruption_name(name, argument='name'):
    if not isinstance(name, str) or name not in _CORRUPTION_FUNCTIONS:
        valid = ', '.join(CORRUPTIONS + EXTRA_CORRUPTIONS)
        raise ValueError(f"{argument}={name!r} is not a known corruption; use one of: {valid}.")


def _check_severity(severity, argument='severity'):
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"{argument}={severity!r} must be an integer from 1 to 5 (CIFAR-10-C's severities).")


def _check_images(x, argument='x'):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{argument} must be a torch.Tensor of images [B, C, H, W], got {type(x).__name__}.")
    if not x.is_floating_point():
        raise ValueError(f"{argument} has dtype {x.dtype}; pass float images in [0, 1] "
                         f"(e.g. {argument}.float() / 255 for uint8).")
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{argument} has shape {tuple(x.shape)}; expected images [B, C, H, W] with C = 1 or 3.")
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


def _as_array(values):
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def calibration_error(confidence, correct, p=2, beta=100):
    """Adaptive-binning calibration error of the AugMix paper: RMS for `p=2`, mean absolute for `p=1`.

    `confidence`: the predicted probability of each example's top class, in [0, 1]; `correct`: 1 (or
    True) where that prediction was right, 0 (False) where not. Examples are sorted by confidence and
    cut into bins of `beta` (the last bin takes the remainder, as in hendrycks' `calib_err`); each bin
    adds (bin size / n) * |mean confidence - accuracy| ** p, and the result is the p-th root. Unlike
    `calib_err`, whose loop skips its last bin, every bin counts, and fewer than `beta` examples make
    one bin instead of an error. Ties in confidence keep their input order (stable sort).
    """
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"p={p!r} must be 2 (RMS calibration error) or 1 (mean absolute calibration error).")
    if isinstance(beta, bool) or not isinstance(beta, (int, np.integer)) or beta < 1:
        raise ValueError(f"beta={beta!r} must be a positive integer: the number of examples per bin.")
    conf, hits = _as_array(confidence), _as_array(correct)
    if conf.ndim != 1 or hits.ndim != 1 or len(conf) != len(hits):
        raise ValueError(f"confidence and correct must be 1-D and of the same length, got shapes "
                         f"{conf.shape} and {hits.shape}.")
    if len(conf) == 0:
        raise ValueError("confidence and correct are empty: calibration needs at least one example.")
    if np.isnan(conf).any():
        raise ValueError(f"confidence contains NaN in {int(np.isnan(conf).sum())} of {len(conf)} values; "
                         f"it must hold probabilities in [0, 1].")
    if not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1:
        raise ValueError(f"confidence must be probabilities in [0, 1], got values in "
                         f"[{conf.min():.3g}, {conf.max():.3g}].")
    if np.isnan(hits).any():
        raise ValueError(f"correct contains NaN in {int(np.isnan(hits).sum())} of {len(hits)} values; it must "
                         f"be 1 / True where the prediction was right and 0 / False where not.")
    bad = np.unique(hits[(hits != 0) & (hits != 1)])
    if len(bad):
        shown = ', '.join(f'{value:g}' for value in bad[:5]) + (', ...' if len(bad) > 5 else '')
        raise ValueError(f"correct must be 0 / 1 (or bool): 1 where the prediction was right, got {shown}; "
                         f"pass (predictions == targets), not the labels or a count.")
    order = np.argsort(conf, kind='stable')
    conf, hits = conf[order], hits[order]
    n_bins = max(len(conf) // beta, 1)
    bin_of = np.minimum(np.arange(len(conf)) // beta, n_bins - 1)
    sizes = np.bincount(bin_of, minlength=n_bins)
    gaps = np.abs(np.bincount(bin_of, conf, n_bins) - np.bincount(bin_of, hits, n_bins)) / sizes
    weighted = np.sum(sizes / len(conf) * gaps ** p)
    return float(np.sqrt(weighted) if p == 2 else weighted)


# ---------------------------------------------------------------------------------------------------
# Results

@dataclass
class RobustnessResult:
    """What `evaluate_robustness` measured on a classifier; errors and calibration errors are fractions in [0, 1].

    - `table`: one row per corruption and severity with columns `corruption`, `severity`, `error`
      (top-1) and `rms_calibration_error`.
    - `clean_error`, `clean_calibration`: on the uncorrupted images.
    - `mean_corruption_error`, `corrupted_calibration`: the means over the table's rows (the AugMix
      paper's CIFAR-10-C "error" and RMS calibration error).
    - `mce`: with a baseline, mean over corruptions of sum_s error / sum_s baseline error (the
      ImageNet-C mCE, as a ratio: 1 means as good as the baseline).
    - `relative_mce`: mean over corruptions of sum_s (error - clean error) /
      sum_s (baseline error - baseline clean error): how much accuracy is lost to corruption,
      relative to the baseline (nan where the baseline loses none).
    - `baseline`: the baseline's own result, or None.
    """
    table: pd.DataFrame
    clean_error: float
    clean_calibration: float
    mean_corruption_error: float
    corrupted_calibration: float
    mce: float | None = None
    relative_mce: float | None = None
    baseline: RobustnessResult | None = None

    task: ClassVar[str] = 'classification'
    error_column: ClassVar[str] = 'error'
    error_label: ClassVar[str] = 'top-1 error'

    def per_corruption(self):
        """Error and RMS calibration error per corruption, averaged over severities (a DataFrame)."""
        return self.table.groupby('corruption', sort=False)[['error', 'rms_calibration_error']].mean()

    def summary(self):
        """The scalar results as a dict."""
        return dict(clean_error=self.clean_error, clean_calibration=self.clean_calibration,
                    mean_corruption_error=self.mean_corruption_error,
                    corrupted_calibration=self.corrupted_calibration,
                    mce=self.mce, relative_mce=self.relative_mce)

    def __repr__(self):
        return _result_repr(self)


@dataclass
class SegmentationRobustnessResult:
    """What `evaluate_robustness` measured on a segmentation model; errors and IoUs are fractions in [0, 1].

    - `table`: one row per corruption and severity with columns `corruption`, `severity`,
      `pixel_error` (the fraction of wrongly classified pixels, `ignore_index` pixels left out) and
      `mean_iou` (intersection over union per class, averaged over the classes present in the
      target or the prediction of that condition).
    - `clean_error`, `clean_mean_iou`: pixel error and mean IoU on the uncorrupted images.
    - `mean_corruption_error`, `mean_corrupted_iou`: the means over the table's rows.
    - `mce`, `relative_mce`: against a baseline, as for classification, on pixel error.
    - `baseline`: the baseline's own result, or None.
    """
    table: pd.DataFrame
    clean_error: float
    clean_mean_iou: float
    mean_corruption_error: float
    mean_corrupted_iou: float
    mce: float | None = None
    relative_mce: float | None = None
    baseline: SegmentationRobustnessResult | None = None

    task: ClassVar[str] = 'segmentation'
    error_column: ClassVar[str] = 'pixel_error'
    error_label: ClassVar[str] = 'pixel error'

    def per_corruption(self):
        """Pixel error and mean IoU per corruption, averaged over severities (a DataFrame)."""
        return self.table.groupby('corruption', sort=False)[['pixel_error', 'mean_iou']].mean()

    def summary(self):
        """The scalar results as a dict."""
        return dict(clean_error=self.clean_error, clean_mean_iou=self.clean_mean_iou,
                    mean_corruption_error=self.mean_corruption_error, mean_corrupted_iou=self.mean_corrupted_iou,
                    mce=self.mce, relative_mce=self.relative_mce)

    def __repr__(self):
        return _result_repr(self)


_RESULT_TYPES = (RobustnessResult, SegmentationRobustnessResult)


def _result_repr(result):
    parts = [f"{key}={value:.4f}" for key, value in result.summary().items() if value is not None]
    return f"{type(result).__name__}({', '.join(parts)}, table: {len(result.table)} rows)"


# ---------------------------------------------------------------------------------------------------
# evaluate_robustness

def _normalize_stats(dl, device):
    """(mean, std) pairs of every fastai `Normalize` in `dl.after_batch`, in application order."""
    from fastai.data.transforms import Normalize  # here: `corrupt` alone should not pay fastai's import
    after_batch = getattr(dl, 'after_batch', None)
    stats = []
    for tfm in getattr(after_batch, 'fs', ()):
        if isinstance(tfm, Normalize):
            if tfm.mean is None or tfm.std is None:
                raise ValueError("the DataLoaders' Normalize has no statistics yet; "
                                 "build the DataLoaders (dls = dblock.dataloaders(...)) before evaluating.")
            stats.append(tuple(_as_channel_stat(value, device) for value in (tfm.mean, tfm.std)))
    return stats


def _as_channel_stat(value, device):
    stat = _move(torch.as_tensor(value).as_subclass(torch.Tensor), device, torch.float32)
    return stat.view(1, -1, 1, 1) if stat.ndim <= 1 else stat


def _decode(xb, stats):
    for mean, std in reversed(stats):
        xb = xb * std + mean
    return xb


def _encode(pixels, stats):
    for mean, std in stats:
        pixels = (pixels - mean) / std
    return pixels


def _loader(dls, index):
    """`dls[index]` of a fastai DataLoaders (1 = validation), or None where it has fewer loaders."""
    if dls is None:
        return None
    loaders = getattr(dls, 'loaders', None)
    if loaders is not None:  # dls.valid would raise an IndexError for a DataLoaders without one
        return loaders[index] if len(loaders) > index else None
    return getattr(dls, ('train', 'valid')[index], None)


class _ModelRunner:
    """One model with its input normalization; runs it on pixels and keeps its records."""

    def __init__(self, learn, fallback_dl):
        self.model = learn.model
        first = next(self.model.parameters(), None)
        self.device = first.device if first is not None else torch.device('cpu')
        self.dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        # Each model gets the normalization of its own DataLoaders: pixels are the common ground.
        dls = getattr(learn, 'dls', None)
        own_dl = _loader(dls, 1)
        if own_dl is None:
            own_dl = _loader(dls, 0)
        self.stats = _normalize_stats(own_dl if own_dl is not None else fallback_dl, self.device)
        activation = getattr(learn.loss_func, 'activation', None)
        # Without an activation the outputs are taken as logits, as for any classifier.
        self.activation = activation if callable(activation) else (lambda out: F.softmax(out, -1))
        self.records = None

    def forward(self, pixels):
        out = self.model(_encode(_move(pixels, self.device), self.stats).to(self.dtype))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return torch.as_tensor(out).as_subclass(torch.Tensor)


class _ClassificationRecords:
    """Top-class confidence and hit of every image under every condition, kept on the device."""

    task = RobustnessResult.task

    def __init__(self, activation):
        self.activation = activation
        self.confidences, self.hits = {}, {}

    def check_output(self, out, targets):
        if out.ndim != 2 or out.shape[0] != len(targets):
            raise ValueError(f"the model returned shape {tuple(out.shape)} for {len(targets)} images; "
                             f"evaluate_robustness needs class scores [B, n_classes].")

    def add(self, key, out, targets):
        self.check_output(out, targets)
        confidence, predicted = self.activation(out.float()).as_subclass(torch.Tensor).max(-1)
        self.confidences.setdefault(key, []).append(confidence)
        self.hits.setdefault(key, []).append(predicted == targets)

    def result(self, conditions):
        keys = ['clean'] + conditions
        stacked = torch.stack([torch.stack([torch.cat(self.confidences[key]) for key in keys]),
                               torch.stack([torch.cat(self.hits[key]) for key in keys]).float()])
        confidences, hits = stacked.cpu().double().numpy()  # the one device-to-host copy of the evaluation

        errors = 1 - hits.mean(1)
        calibrations = [calibration_error(conf, hit, p=2) for conf, hit in zip(confidences, hits)]
        rows = [dict(corruption=name, severity=severity, error=float(error), rms_calibration_error=calibration)
                for (name, severity), error, calibration in zip(conditions, errors[1:], calibrations[1:])]
        clean_error, clean_calibration = float(errors[0]), calibrations[0]
        table = pd.DataFrame(rows, columns=['corruption', 'severity', 'error', 'rms_calibration_error'])
        return RobustnessResult(table=table, clean_error=clean_error, clean_calibration=clean_calibration,
                                mean_corruption_error=float(table.error.mean()),
                                corrupted_calibration=float(table.rms_calibration_error.mean()))


class _SegmentationRecords:
    """One confusion matrix (target x predicted class) per condition, accumulated on the device."""

    task = SegmentationRobustnessResult.task

    def __init__(self, ignore_index):
        self.ignore_index = ignore_index
        self.n_classes = None
        self.counts = {}

    def check_output(self, out, targets):
        if out.ndim != 4 or out.shape[0] != targets.shape[0] or out.shape[2:] != targets.shape[1:]:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for masks of shape "
                             f"{tuple(targets.shape)}; evaluate_robustness needs class scores "
                             f"[B, n_classes, H, W] at the masks' size for segmentation.")
        if self.n_classes is not None and out.shape[1] != self.n_classes:
            raise ValueError(f"the model returned {out.shape[1]} classes after {self.n_classes} earlier.")

    def add(self, key, out, targets):
        self.check_output(out, targets)
        n = self.n_classes = out.shape[1]
        predicted = out.argmax(1)
        # Ignored pixels (and labels outside 0..n-1, which the per-batch check refuses) go to an extra
        # bin: a boolean mask would index with a data-dependent size, a host sync on a GPU.
        counted = (targets != self.ignore_index) & (targets >= 0) & (targets < n)
        index = torch.where(counted, targets * n + predicted, n * n).flatten()
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = torch.zeros(n * n + 1, dtype=torch.int64, device=index.device)
        counts.index_add_(0, index, torch.ones_like(index))

    def result(self, conditions):
        keys = ['clean'] + conditions
        counts = torch.stack([self.counts[key] for key in keys]).cpu().numpy()  # the one device-to-host copy
        n = self.n_classes
        scores = [_segmentation_scores(row[:n * n].reshape(n, n)) for row in counts]
        rows = [dict(corruption=name, severity=severity, pixel_error=error, mean_iou=iou)
                for (name, severity), (error, iou) in zip(conditions, scores[1:])]
        table = pd.DataFrame(rows, columns=['corruption', 'severity', 'pixel_error', 'mean_iou'])
        return SegmentationRobustnessResult(table=table, clean_error=scores[0][0], clean_mean_iou=scores[0][1],
                                            mean_corruption_error=float(table.pixel_error.mean()),
                                            mean_corrupted_iou=float(table.mean_iou.mean()))


def _segmentation_scores(confusion):
    """(pixel error, mean IoU) of a [target, predicted] confusion matrix; IoU over the classes that
    occur in the target or the prediction (a class absent from both has no IoU)."""
    total = confusion.sum()
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    error = 1 - intersection.sum() / total if total else float('nan')
    iou = float(np.mean(intersection[present] / union[present])) if present.any() else float('nan')
    return float(error), iou


def _compare(result, baseline):
    """Fill `result`'s mCE and relative mCE against the baseline's result (on its error column)."""
    column = result.error_column
    own = result.table.set_index(['corruption', 'severity'])[column]
    base = baseline.table.set_index(['corruption', 'severity'])[column]
    missing = own.index.difference(base.index)
    if len(missing):
        raise ValueError(f"baseline has no results for {list(missing)[:5]}...; evaluate it on the same "
                         f"corruptions and severities.")
    base = base.loc[own.index]
    names = result.table.corruption.unique()
    ce, relative = [], []
    for name in names:
        own_errors, base_errors = own.loc[name], base.loc[name]
        ce.append(own_errors.sum() / base_errors.sum() if base_errors.sum() > 0 else float('nan'))
        degradation = (base_errors - baseline.clean_error).sum()
        relative.append((own_errors - result.clean_error).sum() / degradation if degradation != 0
                        else float('nan'))
    result.mce = float(np.mean(ce))
    result.relative_mce = float(np.mean(relative))
    result.baseline = baseline
    return result


# Corruptions that move image content: masks would no longer line up with the corrupted images.
_MOVES_PIXELS = {
    'elastic_transform': 'warps the image (affine jitter and a displacement field)',
    'zoom_blur': 'averages zooms about the centre, moving content outwards by up to 12.5% of the image '
                 'size at severity 5',
}
SEGMENTATION_CORRUPTIONS = tuple(name for name in CORRUPTIONS if name not in _MOVES_PIXELS)


def _check_evaluation_args(corruptions, severities, baseline):
    if corruptions is not None:
        if isinstance(corruptions, str):
            raise ValueError(f"corruptions={corruptions!r} must be a sequence of names, e.g. ({corruptions!r},).")
        corruptions = tuple(corruptions)
        if not corruptions:
            raise ValueError("corruptions is empty; pass names from CORRUPTIONS or EXTRA_CORRUPTIONS.")
        for name in corruptions:
            _check_corruption_name(name, 'corruptions')
    severities = (severities,) if isinstance(severities, (int, np.integer)) else tuple(severities)
    if not severities:
        raise ValueError("severities is empty; pass integers from 1 to 5.")
    for severity in severities:
        _check_severity(severity, 'severities')
    if baseline is not None and not isinstance(baseline, _RESULT_TYPES) and not hasattr(baseline, 'model'):
        raise ValueError(f"baseline must be a Learner, a RobustnessResult or None, got {type(baseline).__name__}.")
    return corruptions, tuple(int(s) for s in severities)


def _ignore_index(learn, ignore_index):
    """The label of unlabelled pixels: the argument, else the loss function's `ignore_index`, else -100."""
    if ignore_index is None:
        ignore_index = getattr(learn.loss_func, 'ignore_index', -100)
        return ignore_index if isinstance(ignore_index, (int, np.integer)) else -100
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"ignore_index={ignore_index!r} must be an integer label (or None: the loss "
                         f"function's ignore_index, else -100).")
    return int(ignore_index)


def _evaluation_loader(learn, dl):
    if dl is None:
        dls = getattr(learn, 'dls', None)
        dl = _loader(dls, 1)
        if dl is None:
            raise ValueError("learn.dls has no validation DataLoader (evaluate_robustness uses the validation "
                             "set); build the DataLoaders with a validation split (e.g. valid_pct=0.2) or pass "
                             "dl=learn.dls.test_dl(items, with_labels=True).")
        where = "learn's validation set"
    else:
        where = "dl"
    size = getattr(dl, 'n', None)
    if size is None:
        size = len(dl.dataset) if hasattr(dl, 'dataset') else len(dl)
    if size == 0:
        raise ValueError(f"{where} is empty: nothing to evaluate; build the DataLoaders with a validation "
                         f"split (e.g. valid_pct=0.2) or pass dl=learn.dls.test_dl(items, with_labels=True).")
    if hasattr(dl, 'new') and (getattr(dl, 'shuffle', False) or getattr(dl, 'drop_last', False)):
        dl = dl.new(shuffle=False, drop_last=False)  # as Learner.get_preds: every image, once
    return dl


def _batch_tensors(batch, n_inputs):
    """(images [B, C, H, W], labels) of one batch as plain tensors; labels [B] or masks [B, H, W]."""
    if n_inputs != 1 or len(batch) < 2:
        raise ValueError(f"evaluate_robustness needs batches (images, labels), got {len(batch)} "
                         f"items with n_inp={n_inputs}.")
    images = torch.as_tensor(batch[0]).as_subclass(torch.Tensor)
    targets = torch.as_tensor(batch[1]).as_subclass(torch.Tensor)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"the DataLoader's inputs have shape {tuple(images.shape)}; "
                         f"expected images [B, C, H, W] with C = 1 or 3.")
    integer = not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool
    if integer and targets.ndim == 1:
        return images, targets.long(), 'classification'
    if integer and targets.ndim == 3 and targets.shape[1:] == images.shape[2:]:
        return images, targets.long(), 'segmentation'  # uint8 masks would overflow in target * n_classes
    raise ValueError(f"labels must be integer class indices [B] (classification) or integer masks [B, H, W] "
                     f"of the images' size (segmentation), got {targets.dtype} of shape {tuple(targets.shape)} "
                     f"for images of shape {tuple(images.shape)}.")


def _conditions(task, corruptions, severities):
    """The (corruption, severity) pairs to evaluate; pixel-moving corruptions are refused for segmentation."""
    if corruptions is None:
        corruptions = SEGMENTATION_CORRUPTIONS if task == 'segmentation' else CORRUPTIONS
    if task == 'segmentation':
        moving = [name for name in corruptions if name in _MOVES_PIXELS]
        if moving:
            reasons = '; '.join(f"{name} {_MOVES_PIXELS[name]}" for name in moving)
            raise ValueError(f"corruptions {moving} move pixels, so the masks would no longer match the "
                             f"images ({reasons}); leave them out (the default for segmentation is "
                             f"SEGMENTATION_CORRUPTIONS).")
    return [(name, severity) for name in corruptions for severity in severities]


def _check_batch(batch_index, pixels, targets, task, n_classes, ignore_index):
    """Refuse NaN pixels (and, for segmentation, mask labels outside 0..n_classes-1 that are not
    `ignore_index`) with one host sync for the batch."""
    flags = [torch.isnan(pixels).any()]
    if task == 'segmentation':
        flags.append((((targets < 0) | (targets >= n_classes)) & (targets != ignore_index)).any())
    problems = torch.stack(flags).tolist()
    if problems[0]:
        raise ValueError(f"batch {batch_index} of the evaluation set has NaN pixels (after decoding with the "
                         f"DataLoaders' Normalize); corruptions need pixels in [0, 1]: check the images and "
                         f"the Normalize statistics (a zero std?).")
    if task == 'segmentation' and problems[1]:
        labels = torch.unique(targets).tolist()
        shown = ', '.join(map(str, labels[:10])) + (', ...' if len(labels) > 10 else '')
        raise ValueError(f"batch {batch_index} has mask labels {shown}, but the model predicts {n_classes} "
                         f"classes (0..{n_classes - 1}) and ignore_index is {ignore_index}; pass the label of "
                         f"unlabelled pixels as ignore_index=... (or fix the masks' codes).")


def evaluate_robustness(learn, dl=None, corruptions=None, severities=(1, 2, 3, 4, 5), baseline=None,
                        *, generator=None, show_progress=True, ignore_index=None):
    """Error of `learn`'s model on its validation set (or `dl`), clean and under every corruption x
    severity: a `RobustnessResult` for classification, a `SegmentationRobustnessResult` for segmentation.

    Batches are decoded to pixels with the DataLoaders' `Normalize` (none: the batch already is
    pixels in [0, 1]), moved to the model's device, corrupted there with `corrupt`, re-encoded and
    run through the model in eval mode without gradients; the model's train/eval mode is restored
    afterwards. `baseline` (another Learner, evaluated on the very same corrupted images, or its
    result) adds `mce` and `relative_mce`. `generator` seeds the corruptions (None: torch's global
    RNG; on a GPU pass a generator on the GPU, so that the draws are made there).

    The task follows the labels. Class indices [B]: top-1 error and RMS calibration error
    (`corruptions` default `CORRUPTIONS`). Masks [B, H, W] with a model returning [B, n_classes, H, W]
    (e.g. `unet_learner` on `SegmentationDataLoaders`): pixel error and mean IoU, pixels labelled
    `ignore_index` left out (default: the loss function's `ignore_index`, else -100). Segmentation uses
    only corruptions that keep image content in place, `SEGMENTATION_CORRUPTIONS` by default: the 15
    of CIFAR-10-C but `elastic_transform` (a warp) and `zoom_blur` (zooms about the centre, moving
    content outwards by up to 12.5% of the image size); passing either is a ValueError. `glass_blur`
    stays: its local pixel shuffles have no direction and move content by about as much as the
    Gaussian blurs around them; `motion_blur` stays: the sharpest copy is the unmoved one, the others
    trail in one direction as any blur kernel spreads content (pixel-moving corruptions are what
    segmentation robustness benchmarks such as Cityscapes-C leave out).

    Results stay on the model's device until the end (one device-to-host copy); each batch is read
    back once, to refuse NaN pixels and unknown mask labels, where fastai's DataLoader has just
    waited for the GPU anyway to copy the batch.
    """
    corruptions, severities = _check_evaluation_args(corruptions, severities, baseline)
    ignore_index = _ignore_index(learn, ignore_index)
    dl = _evaluation_loader(learn, dl)
    runners = [_ModelRunner(learn, dl)]
    if baseline is not None and not isinstance(baseline, _RESULT_TYPES):
        runners.append(_ModelRunner(baseline, dl))
    modes = [runner.model.training for runner in runners]
    task, conditions, stats, bar = None, None, None, None
    try:
        for runner in runners:
            runner.model.eval()
        with torch.no_grad():
            for batch_index, batch in enumerate(dl):
                images, targets, batch_task = _batch_tensors(batch, getattr(dl, 'n_inp', 1))
                if task is None:  # the first batch decides the task, before any work
                    task, conditions = batch_task, _conditions(batch_task, corruptions, severities)
                    _prepare_records(runners, task, baseline, ignore_index)
                    stats = _normalize_stats(dl, images.device)
                    bar = _progress_bar(len(dl) * len(conditions)) if show_progress else None
                elif batch_task != task:
                    raise ValueError(f"batch {batch_index} has {batch_task} labels after {task} ones.")
                pixels = _move(_decode(images.float(), stats).clamp_(0, 1), runners[0].device)
                targets = _move(targets, runners[0].device)
                _evaluate_batch(batch_index, runners, pixels, targets, conditions, generator, ignore_index, bar)
    finally:
        for runner, training in zip(runners, modes):
            runner.model.train(training)
        if bar is not None and bar.last_v != bar.total:
            bar.on_iter_end()
    result = runners[0].records.result(conditions)
    if baseline is None:
        return result
    base_result = baseline if isinstance(baseline, _RESULT_TYPES) else runners[1].records.result(conditions)
    return _compare(result, base_result)


def _prepare_records(runners, task, baseline, ignore_index):
    if isinstance(baseline, _RESULT_TYPES) and baseline.task != task:
        raise ValueError(f"baseline is a {type(baseline).__name__}, but learn's labels make this a {task} "
                         f"evaluation; pass the baseline's result for the same task.")
    for runner in runners:
        runner.records = (_SegmentationRecords(ignore_index) if task == 'segmentation'
                          else _ClassificationRecords(runner.activation))


def _progress_bar(total):
    from fastprogress.fastprogress import progress_bar
    bar = progress_bar(range(total), leave=False)
    bar.update(0)
    return bar


def _evaluate_batch(batch_index, runners, pixels, targets, conditions, generator, ignore_index, bar):
    """Record every runner's outputs on the clean and on every corrupted version of one batch."""
    clean = [runner.forward(pixels) for runner in runners]
    for runner, out in zip(runners, clean):
        runner.records.check_output(out, targets)
    _check_batch(batch_index, pixels, targets, runners[0].records.task, clean[0].shape[1], ignore_index)
    for runner, out in zip(runners, clean):
        runner.records.add('clean', out, _move(targets, out.device))
    for done, (name, severity) in enumerate(conditions, batch_index * len(conditions) + 1):
        corrupted = corrupt(pixels, name, severity, generator)
        for runner in runners:
            out = runner.forward(corrupted)
            runner.records.add((name, severity), out, _move(targets, out.device))
        if bar is not None:
            bar.update(done)


def plot_corruption_errors(results, ax=None, title=None):
    """Bar chart of the error in percent per corruption (mean over severities, clean first) for one or
    more models: top-1 error for classifiers, pixel error for segmentation.

    `results`: a `RobustnessResult` / `SegmentationRobustnessResult` or a dict {model name: result}, all
    of one kind. `title` replaces the default one. Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt
    if isinstance(results, _RESULT_TYPES):
        results = {'model': results}
    if not isinstance(results, Mapping) or not results or not all(
            isinstance(r, _RESULT_TYPES) for r in results.values()):
        raise ValueError("results must be a RobustnessResult (or SegmentationRobustnessResult) or a non-empty "
                         "dict {name: result}.")
    kinds = {type(r) for r in results.values()}
    if len(kinds) > 1:
        raise ValueError(f"results mix {sorted(k.__name__ for k in kinds)}; plot classification and "
                         f"segmentation results separately.")
    kind = kinds.pop()
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 4))
    names = ['clean'] + list(dict.fromkeys(n for r in results.values() for n in r.table.corruption))
    width = 0.8 / len(results)
    for i, (label, result) in enumerate(results.items()):
        errors = result.per_corruption()[kind.error_column]
        heights = [result.clean_error] + [errors.get(name, float('nan')) for name in names[1:]]
        positions = np.arange(len(names)) + (i - (len(results) - 1) / 2) * width
        ax.bar(positions, 100 * np.asarray(heights, dtype=np.float64), width=width, label=label)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([name.replace('_', ' ') for name in names], rotation=45, ha='right')
    severities = sorted({int(s) for r in results.values() for s in r.table.severity})
    ax.set_ylabel(f'{kind.error_label} (%)')
    ax.set_title(title if title is not None else
                 f'{kind.error_label.capitalize()} (%) per corruption, clean and mean over severities '
                 f'{_severity_span(severities)} (lower is better)')
    ax.legend()
    return ax


def _severity_span(severities):
    consecutive = severities == list(range(severities[0], severities[-1] + 1))
    if len(severities) > 1 and consecutive:
        return f'{severities[0]}-{severities[-1]}'
    return ', '.join(map(str, severities))
