"""Batched AugMix op kernels: pure functions of float `[B, C, H, W]` images in [0, 1].

Each kernel matches the PIL call of the original AugMix code (`ImageOps`, `ImageEnhance`)
on the same image, takes its per-image parameter as a Python number or a `[B]` tensor,
never modifies its input, keeps dtype and device, and never loops over images.

Augmentation is not differentiable (levels are rounded, histograms counted), so the public
kernels run under `torch.no_grad()`: an input that requires grad is accepted, and the output
never requires grad. The `*_into` functions write into buffers with `out=` and are for the
AugMix apply path, which runs without autograd too.
"""
import numbers

import torch
from torch import Tensor

from fastai_jsd.augment.devices import move
from fastai_jsd.augment.checks import check_images, per_image
# The geometric kernels live in geometry.py (they share one affine-warp implementation); the op set is
# public here as one namespace, as DESIGN.md lists it.
from fastai_jsd.augment.geometry import rotate, shear_x, shear_y, translate_x, translate_y


# PIL's RGB -> 'L' weights (ITU-R 601-2 luma) in its own 16-bit fixed point: L = (19595 R + 38470 G
# + 7471 B + 0x8000) >> 16 (Convert.c). Exact fractions, so a gray pixel maps to itself.
_LUMA_WEIGHTS = (19595 / 65536, 38470 / 65536, 7471 / 65536)


def _accumulation_dtype(x):
    """float32 for half-precision images (sums and 0..255 levels need more than 8-11 bits), else x's dtype."""
    return torch.float32 if x.element_size() < 4 else x.dtype


@torch.no_grad()
def autocontrast(x):
    """Stretch every channel of every image to span [0, 1]; matches `ImageOps.autocontrast(img)`.

    PIL maps the darkest value of each channel to 0 and the brightest to 255, leaving a flat
    channel unchanged. PIL truncates `v * scale + offset` to an integer; the float result is
    the exact line it truncates, so it stays below PIL's value + 1/255.

    Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    return autocontrast_into(x, torch.empty_like(x))


def autocontrast_into(x, out):
    """`autocontrast(x)` written into `out`, which may be `x` itself (no checks: the AugMix apply path)."""
    # amin and amax rather than aminmax, whose reduction over a dimension is ten times slower on CPU.
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    flat = high <= low
    span = high.sub_(low).masked_fill_(flat, 1.0)
    # (v - low) / span rather than a fused v * scale - offset: the extremes land exactly on 0 and 1,
    # and the result cannot leave [0, 1].
    return torch.sub(x, low.masked_fill_(flat, 0.0), out=out).div_(span)


@torch.no_grad()
def equalize(x):
    """Equalize the histogram of every channel of every image; matches `ImageOps.equalize(img)`.

    Works on the 256 levels PIL sees (`round(255 v)`, rounded so float noise does not drop a
    level), so the output is quantized to multiples of 1/255, including channels PIL leaves
    unchanged (a single value, or fewer than 255 pixels below the channel's maximum).

    NaN pixels have no level: a ValueError (one host sync). Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    check_no_nan(x)
    out = torch.empty(x.shape, dtype=_accumulation_dtype(x), device=x.device)
    return equalize_into(x, out).to(x.dtype)


def check_no_nan(x, name='x'):
    """ValueError when the images `x` hold NaN (one host sync; `amax` propagates NaN, one pass, no mask)."""
    if bool(torch.isnan(x.amax())):
        count = int(torch.isnan(x).sum())
        raise ValueError(f"{name} holds {count} NaN pixel value(s) (of {x.numel()}); equalize needs pixel values "
                         f"in [0, 1]. Find where the NaN comes from (a division by zero, a bad decode), or replace "
                         f"it with `{name}.nan_to_num(0.)`.")


def equalize_into(x, out, levels=None):
    """`equalize(x)` written into the contiguous `out` (x's dtype, or float32 for half `x`), which may be `x` itself.

    `levels` is an optional int32 buffer of x's shape for the levels (no checks: the AugMix apply path). No
    input crashes it: a NaN pixel, which has no level, counts as some level in 0..255 and never as an index
    outside the histogram (on CUDA that would be a device-side assert, which ends the process).
    """
    batch, channels, height, width = x.shape
    # The scaled levels go through `out`: x is not needed once they are computed.
    scaled = torch.mul(x, 255.0, out=out).add_(0.5).clamp_(0.0, 255.0)
    if levels is None:
        levels = torch.empty(x.shape, dtype=torch.int32, device=x.device)
    levels.copy_(scaled)  # truncation: floor(255 v + 0.5), PIL's level
    # clamp keeps NaN, whose conversion to int is whatever the hardware gives (INT_MIN on x86, 0 on CUDA):
    # clamping the integers too (one int32 pass, no sync) makes every level a valid bin.
    levels.clamp_(0, 255)
    # One histogram for the whole batch: channel k of the batch counts into bins [256 k, 256 k + 256).
    offsets = torch.arange(0, batch * channels * 256, 256, dtype=torch.int32, device=x.device)
    flat_index = levels.add_(offsets.view(batch, channels, 1, 1)).view(-1)
    counts = bin_counts(flat_index, batch * channels * 256).view(batch * channels, 256)
    lut = _pil_equalize_lut(counts, height * width).to(out.dtype).div_(255).view(-1)
    torch.index_select(lut, 0, flat_index, out=out.view(-1))
    return out


def bin_counts(flat_index, bins):
    """Histogram of non-negative integer indices into `bins` bins (int32 counts), without a host sync on any device."""
    if flat_index.device.type == 'cpu':  # twice as fast as index_add_ there
        return torch.bincount(flat_index, minlength=bins).to(torch.int32)
    # index_add_ rather than bincount: CUDA's bincount reads the largest index back to the host
    # to size its output.
    counts = torch.zeros(bins, dtype=torch.int32, device=flat_index.device)
    return counts.index_add_(0, flat_index, counts.new_ones(1).expand(flat_index.numel()))


def _pil_equalize_lut(counts, pixels):
    """PIL's `ImageOps.equalize` lookup table (levels 0..255) for every row of per-level pixel counts `[N, 256]`.

    Integer arithmetic done exactly in float64 (every value is below 2 ** 53, and a quotient of
    integers below 2 ** 26 never rounds onto the next integer), which vectorizes where integer
    division does not. MPS has no float64: there the small table is computed on the CPU.
    """
    if counts.device.type == 'mps':
        return _pil_equalize_lut(counts.cpu(), pixels).to(counts.device, torch.float32)
    counts = counts.double()
    cumulative = counts.cumsum(-1)
    # step = (pixels - pixels at the channel's top level) // 255; the top level is where the
    # cumulative count first reaches its total.
    top = cumulative.argmax(-1, keepdim=True)
    step = (pixels - counts.gather(-1, top)).div_(255).floor_()
    # lut[i] = (step // 2 + pixels below level i) // step, which can pass 255: Image.point clips it.
    below = cumulative.sub_(counts)
    lut = below.add_(torch.floor(step / 2)).div_(step.clamp(min=1)).floor_().clamp_(max=255)
    # PIL leaves a channel unchanged when step is 0, which includes every single-valued channel.
    identity = torch.arange(256, dtype=lut.dtype, device=lut.device)
    return torch.where(step > 0, lut, identity)


def _posterize_step(bits, x):
    """PIL's quantization step 2 ** (8 - bits) per image as `[B, 1, 1, 1]`, after checking bits is an integer in 1..8."""
    if isinstance(bits, Tensor):
        step = per_image(bits, x, 'bits', dtype=_accumulation_dtype(x))
        # One host sync, so a bad value fails here instead of producing a wrong image.
        valid = (step >= 1) & (step <= 8) & (step == step.round())
        if not bool(valid.all()):
            raise ValueError(f"bits must be integers in 1..8 (PIL's ImageOps.posterize range), got "
                             f"{step[~valid].view(-1).tolist()} among the {len(step)} values.")
        return posterize_step(step)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
        raise TypeError(f"bits must be an integer in 1..8 or a [B] tensor of them, got {bits!r} "
                        f"of type {type(bits).__name__}.")
    if not (1 <= bits <= 8 and bits == int(bits)):
        raise ValueError(f"bits must be an integer in 1..8 (PIL's ImageOps.posterize range) or a [B] tensor "
                         f"of them, got {bits!r}.")
    return per_image(2 ** (8 - int(bits)), x, 'bits', dtype=_accumulation_dtype(x))


def posterize_step(bits):
    """PIL's quantization step 2 ** (8 - bits) of posterize for a tensor of bit counts."""
    return torch.exp2(8 - bits)


@torch.no_grad()
def posterize(x, bits):
    """Keep the top `bits` (1..8) bits of every 8-bit level; matches `ImageOps.posterize(img, bits)`.

    PIL keeps `level & ~(2 ** (8 - bits) - 1)`, i.e. `floor(level / step) * step`. With
    `level = round(255 v)` that is `floor((255 v + 0.5) / step) * step`.

    Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    step = _posterize_step(bits, x)
    work = x.to(_accumulation_dtype(x))
    return posterize_into(work, step, torch.empty_like(work)).to(x.dtype)


def posterize_into(x, step, out):
    """`posterize` with quantization step `step` (`[B, 1, 1, 1]`) written into `out`, which may be `x` itself."""
    # A multiply and an add rather than addcmul, which is four times slower on CPU with a per-image addend.
    return torch.mul(x, 255.0 / step, out=out).add_(0.5 / step).floor_().mul_(step / 255.0)


@torch.no_grad()
def solarize(x, threshold):
    """Invert pixels at or above `threshold` (0..1 scale); matches `ImageOps.solarize(img, T)` for threshold T / 255.

    Like posterize and equalize this works on PIL's 256 levels: a pixel is inverted when its
    level `round(255 v)` is at least `round(255 threshold)`, so float noise from decoding
    normalized images (or float16 rounding) cannot flip a pixel that sits on the threshold.
    A threshold of 256 / 255 (PIL's T = 256) inverts nothing; 0 inverts everything.

    Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    threshold = solarize_pixel_threshold(per_image(threshold, x, 'threshold', dtype=_accumulation_dtype(x)), x.dtype)
    out = torch.empty_like(x)
    return solarize_into(x, threshold, out, out)


def solarize_pixel_threshold(threshold, dtype):
    """The pixel value from which solarize inverts, for thresholds on the 0..1 scale (rounded to PIL's levels)."""
    # round(255 v) >= T  <=>  v >= (T - 0.5) / 255, so no pixel needs rounding.
    return threshold.mul(255).round_().sub_(0.5).div_(255).to(dtype)


def solarize_into(x, threshold, out, inverted):
    """Solarize at the pixel threshold `threshold` into `out` (may be `x`), using the buffer `inverted` (not `x`)."""
    # |[v >= t] - v| is v below the threshold and 1 - v at or above it, in two passes after the compare.
    torch.ge(x, threshold, out=inverted)
    return torch.sub(inverted, x, out=out).abs_()


def _blend(degenerate, x, factor, out=None):
    """PIL's `Image.blend(degenerate, img, factor)`: `degenerate + factor * (img - degenerate)`, clipped to [0, 1].

    PIL truncates the result to an integer; the float result is the value it truncates.
    """
    return torch.lerp(degenerate, x, factor, out=out).clamp_(0.0, 1.0)


@torch.no_grad()
def color(x, factor):
    """Blend every image with its grayscale version; matches `ImageEnhance.Color(img).enhance(factor)`.

    The grayscale uses PIL's 'L' conversion weights; a 1-channel image is already gray, so
    PIL (and this kernel) return it unchanged.

    Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    return color_into(x, per_image(factor, x, 'factor'), None)


def color_into(x, factor, out):
    """`color` with per-image `factor` (`[B, 1, 1, 1]`) into `out` (None: a new tensor), which may be `x`."""
    if x.shape[1] == 1:  # already gray: PIL returns it unchanged
        return x.clone() if out is None else out.copy_(x)
    red, green, blue = _LUMA_WEIGHTS
    gray = torch.mul(x[:, 0:1], red).add_(x[:, 1:2], alpha=green).add_(x[:, 2:3], alpha=blue)
    return _blend(gray.expand_as(x), x, factor, out)


@torch.no_grad()
def contrast(x, factor):
    """Blend every image with a constant gray at its mean luma; matches `ImageEnhance.Contrast(img).enhance(factor)`.

    PIL's gray level is the mean of the 'L' conversion rounded to an integer level
    (`int(mean + 0.5)`), so the mean here is rounded to a multiple of 1/255 too.

    Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    return contrast_into(x, per_image(factor, x, 'factor'), None)


def contrast_into(x, factor, out):
    """`contrast` with per-image `factor` (`[B, 1, 1, 1]`) into `out` (None: a new tensor), which may be `x`."""
    channel_means = x.mean(dim=(-2, -1), dtype=_accumulation_dtype(x))
    if x.shape[1] == 3:
        weights = move(torch.tensor(_LUMA_WEIGHTS, dtype=channel_means.dtype), x.device)
        mean = channel_means @ weights
    else:
        mean = channel_means[:, 0]
    mean = mean.mul_(255).add_(0.5).floor_().div_(255).to(x.dtype).view(-1, 1, 1, 1)
    return _blend(mean, x, factor, out)


@torch.no_grad()
def brightness(x, factor):
    """Scale every image towards black; matches `ImageEnhance.Brightness(img).enhance(factor)` (a blend with 0).

    Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    return brightness_into(x, per_image(factor, x, 'factor'), None)


def brightness_into(x, factor, out):
    """`brightness` with per-image `factor` (`[B, 1, 1, 1]`) into `out` (None: a new tensor), which may be `x`."""
    return torch.mul(x, factor, out=out).clamp_(0.0, 1.0)


@torch.no_grad()
def sharpness(x, factor):
    """Blend every image with its smoothed version; matches `ImageEnhance.Sharpness(img).enhance(factor)`.

    PIL's degenerate image is `ImageFilter.SMOOTH` ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13)
    with the one-pixel border copied unfiltered, so border pixels never change; images
    smaller than 3 x 3 are returned unchanged (Filter.c).

    Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    return sharpness_into(x, per_image(factor, x, 'factor'), None)


def sharpness_into(x, factor, out):
    """`sharpness` with per-image `factor` (`[B, 1, 1, 1]`) into `out` (None: a new tensor), which must not be `x`."""
    height, width = x.shape[-2:]
    # Inside: x + (1 - f) * (smooth - x) = (1 - 8 a) x + a * (sum of the 8 neighbours), a = (1 - f) / 13,
    # accumulated in place on the output instead of materializing the smoothed image.
    neighbour_weight = (1.0 - factor) / 13.0
    out = torch.mul(x, 1.0 - 8.0 * neighbour_weight, out=out)
    inside = out[..., 1:-1, 1:-1]
    for dy in range(3):
        for dx in range(3):
            if dy != 1 or dx != 1:
                inside.addcmul_(x[..., dy:height - 2 + dy, dx:width - 2 + dx], neighbour_weight)
    for border in ((..., 0, slice(None)), (..., -1, slice(None)), (..., slice(None), 0), (..., slice(None), -1)):
        out[border] = x[border]
    return out.clamp_(0.0, 1.0)


__all__ = ['check_images', 'per_image', 'autocontrast', 'equalize', 'posterize', 'solarize', 'rotate', 'shear_x',
           'shear_y', 'translate_x', 'translate_y', 'color', 'contrast', 'brightness', 'sharpness']
