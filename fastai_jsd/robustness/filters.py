"""Filters and signal helpers the corruptions are built from, with the border conventions of
scipy.ndimage, cv2, ImageMagick and PIL that the generator scripts (make_cifar_c.py and its siblings) rely on.

Separable blurs are one matmul with a band matrix per axis, zooms one `grid_sample`. 2-D and motion-blur
kernels are grouped convolutions and per-tap gathers on the CPU while those are cheaper (small images and
kernels), one FFT product otherwise and on a GPU, where each tap would be a full memory pass; tests run
both forms on the CPU and compare them. Nothing here waits for the GPU: no `.item()`, no data-dependent
shapes, host-made constants queued with non-blocking copies.
"""
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from fastai_jsd._device import move

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what PIL's 'L' and cv2's RGB2GRAY use


# ---------------------------------------------------------------------------------------------------
# Device placement and randomness: drawn on the generator's device (a CPU generator cannot fill a CUDA
# tensor), then moved.

@lru_cache(maxsize=128)
def _on_device(make, args, device, dtype):
    """`make(*args)` (a CPU tensor) on `device` in `dtype`, made and copied once per device and dtype:
    the filter matrices and sampling grids every call of a corruption reuses."""
    return move(make(*args), device, dtype)


def _constant(values, like):
    """Per-channel constants as a [1, C, 1, 1] tensor with `like`'s dtype and device."""
    return move(torch.tensor(values, dtype=like.dtype), like.device).view(1, -1, 1, 1)


def _rand(shape, generator, like):
    """U(0, 1) of `shape` with `like`'s dtype and device; `generator=None` uses torch's global RNG."""
    if generator is None:
        return torch.rand(shape, dtype=like.dtype, device=like.device)
    return move(torch.rand(shape, generator=generator, dtype=like.dtype, device=generator.device), like.device)


def _randn(shape, generator, like):
    """N(0, 1) of `shape` with `like`'s dtype and device."""
    if generator is None:
        return torch.randn(shape, dtype=like.dtype, device=like.device)
    return move(torch.randn(shape, generator=generator, dtype=like.dtype, device=generator.device), like.device)


def _randint(low, high, shape, generator, like):
    """Integers uniform in [low, high) of `shape` (int64) on `like`'s device."""
    if generator is None:
        return torch.randint(low, high, shape, device=like.device)
    return move(torch.randint(low, high, shape, generator=generator, device=generator.device), like.device)


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
    return torch.poisson(move(rates, generator.device), generator=generator).to(rates.device)


# ---------------------------------------------------------------------------------------------------
# Filtering helpers matching scipy.ndimage / cv2 border conventions.

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
        return _fft_correlate(x, move(kernel, x.device, x.dtype)[None, None], mode)
    batch, channels, height, width = x.shape
    radius_y, radius_x = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = x.index_select(2, _border_index(height, radius_y, radius_y, mode, x.device))
    padded = padded.index_select(3, _border_index(width, radius_x, radius_x, mode, x.device))
    # One depthwise convolution over all B * C planes: far faster on CPU than a 1-channel conv2d.
    planes = padded.reshape(1, batch * channels, *padded.shape[-2:])
    weight = move(kernel, x.device, x.dtype)[None, None].expand(batch * channels, 1, *kernel.shape).contiguous()
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
    """Where `_clipped_zoom` samples along one axis (zoom >= 1), in grid_sample's align_corners=True coordinates."""
    if zoom < 1:
        raise ValueError(f"_clipped_zoom needs a zoom of at least 1, got {zoom}")
    crop = math.ceil(size / zoom)
    zoomed = int(round(crop * zoom))
    trim = (zoomed - size) // 2
    start = (size - crop) // 2  # the script's crop slice
    step = (crop - 1) / (zoomed - 1) if zoomed > 1 else 0.0
    source = start + (torch.arange(size, dtype=torch.float64) + trim) * step
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
        weighted = along_y * move(weights, x.device, x.dtype)[None, :, None]
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
    positions = move(positions, device, torch.float64)[None]
    offset_x = torch.ceil(positions * torch.cos(angle) - 0.5).long()
    offset_y = torch.ceil(positions * torch.sin(angle) - 0.5).long()
    return offset_x, offset_y


def _plasma_fractal(batch, height, width, decay, generator, like):
    """The script's diamond-square `plasma_fractal`, one map per image, cropped to [B, height, width] in [0, 1].

    The map is the script's: a square of side `mapsize` = the power of two covering the image (32, 64 and
    256 for the three benchmarks' 32, 64 and 224 px), cropped to the image's top-left corner. Where the map
    has at most 4 x H x W cells it is computed whole and normalised over the whole map, as the script does;
    for elongated images (say 8 x 4096, whose map has 4096^2 cells) only the cells that the image's
    corner depends on are computed, and normalised over the image: memory grows with H x W, not max(H, W)^2.
    """
    mapsize = 1 << max(1, math.ceil(math.log2(max(height, width))))
    whole = mapsize * mapsize <= 4 * height * width
    rows, cols = (mapsize, mapsize) if whole else (height, width)

    def draw(shape, level, row_index, col_index):
        return 2 * _rand(shape, generator, like) - 1

    if whole:
        maps = _plasma_torus(batch, mapsize, decay, draw, like)
    else:
        maps = _plasma_window(batch, rows, cols, mapsize, decay, draw, like)
    maps = maps - maps.amin((1, 2), keepdim=True)
    maps = maps / maps.amax((1, 2), keepdim=True)
    return maps[:, :height, :width]


def _plasma_torus(batch, mapsize, decay, draw, like):
    """The script's whole diamond-square map [B, mapsize, mapsize] (not normalised), with its np.roll steps:
    fewer and simpler steps than `_plasma_window` where the whole map is wanted. `draw` as there."""
    maps = torch.zeros(batch, mapsize, mapsize, dtype=like.dtype, device=like.device)
    step, wibble, level = mapsize, 100.0, 0
    while step >= 2:
        half = step // 2
        coarse = torch.arange(0, mapsize, step) // half  # torus indices at the fine spacing
        corners = maps[:, 0::step, 0::step]
        square = corners + corners.roll(-1, dims=1)
        square = square + square.roll(-1, dims=2)
        noise = draw(square.shape, level, move(coarse + 1, like.device), move(coarse + 1, like.device))
        maps[:, half::step, half::step] = square / 4 + wibble * wibble * noise
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        left_right = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        noise = draw(left_right.shape, level, move(coarse, like.device), move(coarse + 1, like.device))
        maps[:, 0::step, half::step] = left_right / 4 + wibble * wibble * noise
        top_bottom = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        noise = draw(top_bottom.shape, level, move(coarse + 1, like.device), move(coarse, like.device))
        maps[:, half::step, 0::step] = top_bottom / 4 + wibble * wibble * noise
        step, wibble, level = half, wibble / decay, level + 1
    return maps


def _plasma_window(batch, rows, cols, mapsize, decay, draw, like):
    """Cells [0, rows) x [0, cols) of the script's diamond-square map (not normalised): [B, rows, cols].

    The map is a torus (the script's np.roll). Each level halves the grid spacing: squares (the centres of
    the grid's cells) average their four corners, diamonds (edge midpoints) their two squares and two
    corners, each plus wibble * U(-wibble, wibble); wibble starts at 100 and is divided by `decay` per level.
    Every level computes only the torus window (per axis) that the finer levels need, found backwards from
    the requested cells; the noise comes from `draw(shape, row_index, col_index)` (U(-1, 1) values for the
    `level` at the fine grid's torus indices given: tests replace the random draw by a function of them).
    """
    levels = int(math.log2(mapsize))
    row_windows = _plasma_windows(rows, mapsize, levels)
    col_windows = _plasma_windows(cols, mapsize, levels)
    device = like.device
    corners = torch.zeros(batch, 1, 1, dtype=like.dtype, device=device)  # the one corner at spacing mapsize
    wibble = 100.0
    for level in range(levels):
        period = 1 << level  # grid points per axis before this level
        (corner_r, half_r, fine_r), (corner_c, half_c, fine_c) = row_windows[level], col_windows[level]
        index_r = _plasma_indices(corner_r, half_r, fine_r, period, device)
        index_c = _plasma_indices(corner_c, half_c, fine_c, period, device)
        # Squares on the half-point window: the mean of their four corners.
        (r0, r1), (c0, c1) = index_r['square_corners'], index_c['square_corners']
        top, bottom = corners.index_select(1, r0), corners.index_select(1, r1)
        total = (top.index_select(2, c0) + bottom.index_select(2, c0) + top.index_select(2, c1)
                 + bottom.index_select(2, c1))
        squares = total / 4 + wibble * wibble * draw(total.shape, level, 2 * index_r['half'] + 1,
                                                      2 * index_c['half'] + 1)
        fine = _plasma_fine(corners, squares, index_r, index_c)
        noise = draw(fine['shape'], level, index_r['fine'], index_c['fine'])
        diamonds = fine['diamond_sum'] / 4 + wibble * wibble * noise
        corners = torch.where(fine['is_corner'], fine['corner'],
                              torch.where(fine['is_square'], fine['square'], diamonds))
        wibble /= decay
    return corners


def _plasma_windows(size, mapsize, levels):
    """Per level (coarse to fine), the torus windows (start, length) of the corners it reads, the squares it
    makes and the fine grid it leaves, so that the finest grid covers [0, size); a window as long as the
    torus is the whole torus."""
    windows = []
    fine = (0, size)
    for level in reversed(range(levels)):
        period = 1 << level
        start, length = fine
        first = -(-start // 2) - 1  # ceil(start / 2) - 1: the square left of an even fine index
        last = (start + length - 1) // 2
        half = (first, last - first + 1) if last - first + 1 < period else (0, period)
        corner = (first, last - first + 2) if last - first + 2 < period else (0, period)
        windows.append((corner, half, fine))
        fine = corner
    return windows[::-1]


def _plasma_indices(corner, half, fine, period, device):
    """Index tensors along one axis for one level: positions in the corner and square windows of the
    corners and squares each fine index reads, with the fine indices' parities."""
    def position(index, window):
        start, length = window
        return torch.remainder(index - start, period).clamp_(max=length - 1)

    half_index = torch.remainder(torch.arange(half[1]) + half[0], period)
    fine_index = torch.arange(fine[1]) + fine[0]  # torus indices at the fine spacing (period 2 * period)
    floor_half, ceil_half = torch.div(fine_index, 2, rounding_mode='floor'), -torch.div(-fine_index, 2,
                                                                                         rounding_mode='floor')
    indices = {
        'square_corners': (position(half_index, corner), position(half_index + 1, corner)),
        'half': half_index,
        'fine': torch.remainder(fine_index, 2 * period),
        'odd': torch.remainder(fine_index, 2) == 1,
        'corner0': position(floor_half, corner),
        'corner1': position(floor_half + 1, corner),
        'half0': position(ceil_half - 1, half),
        'half1': position(floor_half, half),
    }
    return {key: (tuple(move(v, device) for v in value) if isinstance(value, tuple) else move(value, device))
            for key, value in indices.items()}


def _plasma_fine(corners, squares, index_r, index_c):
    """The fine grid's corners, squares and diamond sums, each computed on every fine cell, and the masks
    saying which one a cell is."""
    def pick(values, rows, cols):
        return values.index_select(1, rows).index_select(2, cols)

    odd_r, odd_c = index_r['odd'][:, None], index_c['odd'][None, :]
    corner = pick(corners, index_r['corner0'], index_c['corner0'])
    square = pick(squares, index_r['half0'], index_c['half0'])
    # Even row, odd column: the squares above and below, the corners left and right.
    across = (square + pick(squares, index_r['half1'], index_c['half0'])
              + corner + pick(corners, index_r['corner0'], index_c['corner1']))
    # Odd row, even column: the squares left and right, the corners above and below.
    down = (square + pick(squares, index_r['half0'], index_c['half1'])
            + corner + pick(corners, index_r['corner1'], index_c['corner0']))
    return dict(shape=corner.shape, corner=corner, square=square,
                diamond_sum=torch.where(odd_c, across, down),
                is_corner=~odd_r & ~odd_c, is_square=odd_r & odd_c)


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


# cv2.Canny's gradient directions in fixed point: tan(22.5 degrees) * 2^15 (imgproc/src/canny.cpp).
_CANNY_SHIFT = 15
_CANNY_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)


def _canny(levels, low, high, rounds=None):
    """cv2.Canny(image, low, high) of integer levels [B, 1, H, W] (0..255): a bool edge map.

    As canny.cpp: 3 x 3 Sobel gradients (border replicated), L1 magnitude, non-maximum suppression
    along the gradient direction quantized to 0, 45, 90, 135 degrees (its fixed-point tests and its
    tie rules), then hysteresis: candidates (magnitude > low, local maximum) 8-connected to a strong
    one (magnitude > high) are edges. The hysteresis grows the edges one pixel per round: on the CPU
    until nothing changes, on a GPU `rounds` times (default 16) without waiting for it.
    """
    padded = F.pad(levels.to(torch.float32), (1, 1, 1, 1), mode='replicate')
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=levels.device)
    dx = F.conv2d(padded, sobel[None, None]).round_().to(torch.int32)  # exact: small integers in float32
    dy = F.conv2d(padded, sobel.T.contiguous()[None, None]).round_().to(torch.int32)
    magnitude = dx.abs() + dy.abs()
    around = F.pad(magnitude, (1, 1, 1, 1))  # zero outside the image, as canny.cpp's magnitude rows
    height, width = magnitude.shape[-2:]

    def neighbour(row, col):
        return around[..., 1 + row:1 + row + height, 1 + col:1 + col + width]

    x, y = dx.abs(), dy.abs() << _CANNY_SHIFT
    tg22x = x * _CANNY_TG22
    tg67x = tg22x + (x << (_CANNY_SHIFT + 1))
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg67x)
    same_sign = (dx < 0) == (dy < 0)
    diagonal_up = torch.where(same_sign, neighbour(-1, -1), neighbour(-1, 1))
    diagonal_down = torch.where(same_sign, neighbour(1, 1), neighbour(1, -1))
    local_maximum = torch.where(
        horizontal, (magnitude > neighbour(0, -1)) & (magnitude >= neighbour(0, 1)),
        torch.where(vertical, (magnitude > neighbour(-1, 0)) & (magnitude >= neighbour(1, 0)),
                    (magnitude > diagonal_up) & (magnitude > diagonal_down)))
    candidate = local_maximum & (magnitude > low)
    edges = candidate & (magnitude > high)
    if rounds is None and not _on_host(levels):
        rounds = 16
    for _ in range(rounds if rounds is not None else height * width):
        grown = candidate & (F.max_pool2d(edges.to(torch.float32), 3, stride=1, padding=1) > 0)
        if rounds is None and torch.equal(grown, edges):
            break
        edges = grown
    return edges


# cv2.distanceTransform(DIST_L2, 5)'s chamfer weights: 1 straight, 1.4 diagonal, 2.1969 a knight's move.
_CHAMFER_5 = tuple((dy, dx, {1: 1.0, 2: 1.4, 5: 2.1969}[dy * dy + dx * dx])
                   for dy in range(-2, 3) for dx in range(-2, 3) if dy * dy + dx * dx in (1, 2, 5))


def _chamfer_distance(edges, limit):
    """cv2.distanceTransform(non-edges, DIST_L2, 5) truncated at `limit`: the cheapest path to an edge
    pixel with steps of the 5 x 5 chamfer mask, relaxed ceil(limit) times (every step costs at least 1)."""
    far = float(limit) + 3
    distance = torch.where(edges, 0.0, far).to(torch.float32)
    height, width = distance.shape[-2:]
    for _ in range(math.ceil(limit)):
        padded = F.pad(distance, (2, 2, 2, 2), value=far)
        best = distance
        for dy, dx, weight in _CHAMFER_5:
            best = torch.minimum(best, padded[..., 2 + dy:2 + dy + height, 2 + dx:2 + dx + width] + weight)
        distance = best
    return distance.clamp_(max=limit)


def _equalize_hist(levels):
    """cv2.equalizeHist of integer levels [B, 1, H, W] (0..255): levels 0..255 as float.

    Its lookup table: 0 for the lowest level present, then round(255 * (count up to the level - count of
    the lowest) / (pixels - count of the lowest)); an image of one level stays as it is.
    """
    batch = levels.shape[0]
    flat = levels.reshape(batch, -1).long()
    counts = torch.zeros(batch, 256, dtype=torch.float64, device=levels.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float64))
    cdf = counts.cumsum(1)
    lowest = torch.where(counts > 0, cdf, cdf[:, -1:]).amin(1, keepdim=True)  # the count of the lowest level
    spread = cdf[:, -1:] - lowest
    lut = ((cdf - lowest) * 255 / spread.clamp_min(1)).round_().clamp_(0, 255)
    lut = torch.where(spread > 0, lut, torch.arange(256, dtype=torch.float64, device=levels.device))
    return lut.gather(1, flat).view_as(levels).to(torch.float32)
