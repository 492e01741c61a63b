"""The common corruptions of CIFAR-10-C, Tiny-ImageNet-C and ImageNet-C as batched torch kernels, and `corrupt`.

The corruptions re-implement the generator scripts of hendrycks/robustness (`ImageNet-C/create_c/`:
`make_cifar_c.py`, `make_tinyimagenet_c.py`, `make_imagenet_c.py`): the same operations with each
benchmark's severity tables (`benchmarks.py`) and per-corruption code. Where the scripts call ImageMagick
(motion blur, snow), cv2 (spatter) or crop photographs (frost), an equivalent is computed in torch; each
such corruption says how it differs. Every kernel takes float images [B, C, H, W] in [0, 1], the
benchmark's setting for the severity (the script's `c`), a generator and the size scale.

Image size: each benchmark's tables are for its native size (32, 64, 224 px). Every length in pixels (blur
sigmas and radii, motion blur length, glass-blur swap distance, snow flake size, elastic displacement,
spatter blob size) is multiplied by `min(H, W) / native size`, so that a corrupted image of another size
looks like the corrupted native-size version scaled. Ratios (zoom factors, pixelation ratio) and
intensities (noise strengths, contrast, brightness, JPEG quality) are size independent.

Storage: the scripts store uint8 images; the CIFAR file keeps them as they are, the Tiny-ImageNet and
ImageNet scripts save them as JPEG at quality 85. `corrupt(..., published_jpeg=True)` (the default) does
the same for those two benchmarks (`np.uint8`'s truncation, then the JPEG round trip), so that errors are
comparable with the published files; otherwise outputs are float and not rounded to 1/255: only
`jpeg_compression` quantizes its output, glass blur and snow an intermediate step (where the scripts
truncate to uint8 between steps).

Devices: no corruption waits for the GPU (see `filters`), except the JPEG round trips (`jpeg_compression`,
and the published-file save of Tiny-ImageNet-C and ImageNet-C), whose encoded bytes must reach the host
for nvJPEG's decoder.
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
from fastai_jsd.robustness.benchmarks import get_benchmark
from fastai_jsd.robustness.filters import (_band_matrix, _canny, _chamfer_distance, _clipped_zoom, _constant,
                                           _correlate2d, _directional_blur, _equalize_hist, _gaussian_blur,
                                           _motion_kernel, _on_device, _on_host, _pil_box_round_trip, _plasma_fractal,
                                           _poisson, _rand, _randint, _randn, _to_gray)
from fastai_jsd.robustness.shuffle import shuffle_sources

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
    'zoom_blur': 'averages zooms about the centre, moving content outwards by up to 12.5% (CIFAR-10-C, '
                 'Tiny-ImageNet-C) or 15% (ImageNet-C) of the image size at severity 5',
}
SEGMENTATION_CORRUPTIONS = tuple(name for name in CORRUPTIONS if name not in _MOVES_PIXELS)

# The published JPEG save of Tiny-ImageNet-C and ImageNet-C (`save(path, quality=85, optimize=True)`).
_PUBLISHED_JPEG_QUALITY = 85


def _through_rgb(corruption):
    """Apply a colour corruption to 1-channel images as to their gray RGB copy, then take the luma."""
    def apply(x, setting, generator, scale):
        if x.shape[1] == 3:
            return corruption(x, setting, generator, scale)
        return _to_gray(corruption(x.expand(-1, 3, -1, -1), setting, generator, scale))
    apply.__name__ = corruption.__name__
    apply.__doc__ = corruption.__doc__
    return apply


def _as_uint8(x):
    """np.uint8 of the script's 0..255 floats: truncated to whole levels, as float values (the small
    offset keeps a level that float round-off put a hair below itself)."""
    return (x * 255 + 1e-3).floor_().clamp_(0, 255)


# ---------------------------------------------------------------------------------------------------
# The corruptions: each takes float images [B, C, H, W] in [0, 1], the benchmark's setting for the severity,
# a generator and `scale` = min(H, W) / the benchmark's native size.

def _gaussian_noise(x, std, generator, scale):
    """x + N(0, std) per pixel and channel."""
    noise = _randn(x.shape, generator, x)
    return noise.mul_(std).add_(x).clamp_(0, 1)


def _shot_noise(x, photons, generator, scale):
    """Poisson(x * photons) / photons."""
    return _poisson(x * photons, generator).div_(photons).clamp_(0, 1)


def _impulse_noise(x, amount, generator, scale):
    """Salt and pepper on a fraction `amount` of the values, half each (skimage's 's&p' mode, per channel)."""
    draw = _rand(x.shape, generator, x)
    salt_or_pepper = (draw >= amount / 2).to(x.dtype)
    return torch.where(draw < amount, salt_or_pepper, x)


def _speckle_noise(x, std, generator, scale):
    """x + x * N(0, std)."""
    noise = _randn(x.shape, generator, x)
    return noise.mul_(std).add_(1).mul_(x).clamp_(0, 1)


def _gaussian_blur_corruption(x, sigma, generator, scale):
    """skimage Gaussian blur with the table's sigma."""
    return _gaussian_blur(x, sigma * scale).clamp_(0, 1)


def _glass_blur(x, setting, generator, scale):
    """Blur, truncate to uint8, shuffle pixels locally (`iterations` sweeps), blur again.

    The shuffle is the script's swap loop (every interior pixel, bottom-right first, swapped with the pixel
    at an offset drawn from -max_delta .. max_delta - 1 per axis), computed exactly by `shuffle.py` in
    batched gathers. Other image sizes scale sigma and max_delta (at least 1).
    """
    sigma, max_delta, iterations = setting
    batch, channels, height, width = x.shape
    reach = max(1, round(max_delta * scale))
    out = _as_uint8(_gaussian_blur(x, sigma * scale)).div_(255)
    steps = (batch, max(height - 2 * reach, 0), max(width - 2 * reach, 0))
    for _ in range(iterations):
        offset_x = _randint(-reach, reach, steps, generator, x)
        offset_y = _randint(-reach, reach, steps, generator, x)
        sources = shuffle_sources(offset_y, offset_x, height, width, reach)
        out = out.reshape(batch, channels, -1).gather(2, sources[:, None].expand(-1, channels, -1)).view_as(x)
    return _gaussian_blur(out, sigma * scale).clamp_(0, 1)


def _defocus_kernel(radius, alias_sigma, scale):
    """The script's `disk`: a pixel disk of `radius` on the grid -L..L (L = 8, or the radius when larger),
    normalised, then cv2.GaussianBlur inside the grid (3 x 3, or 5 x 5 for radii above 8; border
    reflect-101). Other image sizes scale the radius, grid, sigma and window."""
    grid, window = (8, 1) if radius <= 8 else (radius, 2)
    smooth_radius = max(1, round(window * scale))
    radius, alias_sigma = radius * scale, alias_sigma * scale
    half = max(int(grid * scale), math.floor(radius), smooth_radius)
    offsets = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= radius ** 2).double()
    disk = disk / disk.sum()
    taps = torch.arange(-smooth_radius, smooth_radius + 1, dtype=torch.float64)
    smooth = torch.exp(-taps ** 2 / (2 * alias_sigma ** 2))  # cv2.getGaussianKernel for sigma > 0
    smooth = _band_matrix(2 * half + 1, tuple((smooth / smooth.sum()).tolist()), 'mirror')
    kernel = smooth @ disk @ smooth.T
    # Drop the all-zero margin (the grid is wide for small disks): the same correlation, a smaller kernel.
    reach = min(half, math.floor(radius) + smooth_radius)
    return kernel[half - reach:half + reach + 1, half - reach:half + reach + 1]


def _defocus_blur(x, setting, generator, scale):
    """Correlate with the anti-aliased disk, reflect-101 border (cv2.filter2D)."""
    radius, alias_sigma = setting
    return _correlate2d(x, _defocus_kernel(radius, alias_sigma, scale), 'mirror').clamp_(0, 1)


def _motion_blur(x, setting, generator, scale):
    """ImageMagick's motion blur (radius, sigma of the table), angle U(-45, 45) degrees per image.

    The script runs ImageMagick on a PNG; this computes the same one-sided Gaussian along the
    rounded direction (`_directional_blur`) in float, without the 8-bit round trip.
    """
    radius, sigma = setting
    degrees = _rand((x.shape[0],), generator, x) * 90 - 45
    return _directional_blur(x, _motion_kernel(radius * scale, sigma * scale), degrees).clamp_(0, 1)


@lru_cache(maxsize=32)
def _zoom_factors(stop, step):
    """The script's np.arange(1, stop, step): float rounding decides whether the end point is included."""
    return tuple(np.arange(1, stop, step).tolist())


def _zoom_blur(x, setting, generator, scale):
    """Mean of the image and its centre zooms by the table's factors (the image itself counts twice)."""
    factors = _zoom_factors(*setting)
    total = x.clone()
    for factor in factors:
        total += _clipped_zoom(x, factor)
    return total.div_(len(factors) + 1).clamp_(0, 1)


def _snow(x, setting, generator, scale):
    """Zoomed, thresholded noise streaked by a motion blur at U(-135, -45) degrees, over a paled image.

    The flakes are truncated to uint8 as the script's 'L' image is; the streaks use `_directional_blur`
    instead of ImageMagick, in float instead of 8-bit PNG.
    """
    mean, std, zoom, threshold, blur_radius, blur_sigma, blend = setting
    batch, _, height, width = x.shape
    flakes = _randn((batch, 1, height, width), generator, x).mul_(std).add_(mean)
    # Flakes zoom * scale pixels wide; below the native size that can drop under 1 px: plain noise then.
    flakes = _clipped_zoom(flakes, max(zoom * scale, 1.0))
    flakes = _as_uint8(torch.where(flakes < threshold, 0, flakes).clamp_(0, 1)).div_(255)
    degrees = _rand((batch,), generator, x) * 90 - 135
    flakes = _directional_blur(flakes, _motion_kernel(blur_radius * scale, blur_sigma * scale), degrees)
    paled = torch.maximum(x, _to_gray(x) * 1.5 + 0.5)
    out = x * blend + paled * (1 - blend)
    return out.add_(flakes).add_(flakes.flip(-2, -1)).clamp_(0, 1)


# The scripts crop one of five frost photographs (frost1.png ... frost5.jpg; frost2 and frost3 are the
# same picture). Measured from 300 random crops of each, at the three benchmarks' scales (the scripts resize
# by 0.2, 0.3 and 1: the statistics agree within 0.01): the RGB mean, the spread of a crop's mean around it
# and the spread of the pixels within a crop. The procedural layer reproduces these, not the pictures.
_FROST_PHOTOS = (  # (RGB mean, between-crop sd, within-crop sd)
    ((0.301, 0.578, 0.642), (0.060, 0.032, 0.025), (0.091, 0.055, 0.052)),  # frost1: dark, cyan
    ((0.777, 0.794, 0.831), (0.022, 0.024, 0.025), (0.076, 0.078, 0.081)),  # frost2: bright, white
    ((0.777, 0.794, 0.831), (0.022, 0.024, 0.025), (0.076, 0.078, 0.081)),  # frost3 = frost2
    ((0.568, 0.626, 0.677), (0.024, 0.024, 0.026), (0.102, 0.102, 0.107)),  # frost4
    ((0.401, 0.445, 0.491), (0.048, 0.046, 0.043), (0.143, 0.141, 0.138)),  # frost5: gray, contrasty
)


def _frost_pattern(batch, height, width, generator, like):
    """Ice crystals [B, 1, H, W] with mean 0 and standard deviation 1 per image: bright needles in three
    directions (about min(H, W) / 4 long) over a plasma haze."""
    haze = _plasma_fractal(batch, height, width, 2.0, generator, like)[:, None]
    texture_scale = min(height, width) / 32
    base_angle = _rand((batch,), generator, like) * 180
    half_length = math.ceil(4 * texture_scale)
    positions = torch.arange(-half_length, half_length + 1, dtype=torch.float64)
    weights = torch.exp(-positions ** 2 / (2 * (2.5 * texture_scale) ** 2))  # needles grow both ways from a seed
    needles = None
    for turn in (0, 60, 120):
        seeds = (_rand((batch, 1, height, width), generator, like) < 0.06).to(like.dtype)
        streak = _directional_blur(seeds, weights, base_angle + turn, positions)
        needles = streak if needles is None else torch.maximum(needles, streak)
    needles = needles / needles.amax((2, 3), keepdim=True).clamp_min(1e-6)
    ice = 0.55 * haze + 0.9 * needles.sqrt()
    ice = ice - ice.mean((2, 3), keepdim=True)
    return ice / ice.square().mean((2, 3), keepdim=True).sqrt().clamp_min(1e-6)


def _frost_layer(batch, height, width, generator, like):
    """A procedural ice layer [B, 3, H, W] in [0, 1] with the colour statistics of the scripts' frost crops:
    per image one of the five photographs' profiles, a crop-to-crop shift of its mean, and crystals."""
    profiles = torch.tensor(_FROST_PHOTOS, dtype=like.dtype)  # [5, 3 (mean, between, within), 3 (RGB)]
    choice = _randint(0, len(_FROST_PHOTOS), (batch,), generator, like)
    profile = move(profiles, like.device)[choice]  # [B, 3, 3]
    mean, between, within = (profile[:, row, :, None, None] for row in range(3))
    shift = _randn((batch, 1, 1, 1), generator, like)
    pattern = _frost_pattern(batch, height, width, generator, like)
    return (mean + between * shift + within * pattern).clamp_(0, 1)


def _frost(x, setting, generator, scale):
    """image_weight * x + frost_weight * ice, with a procedural ice layer instead of the photographs."""
    image_weight, frost_weight = setting
    batch, _, height, width = x.shape
    ice = _frost_layer(batch, height, width, generator, x)
    return (x * image_weight).add_(ice, alpha=frost_weight).clamp_(0, 1)


def _fog(x, setting, generator, scale):
    """Add a plasma fractal (one per image, shared by the channels), rescale by max / (max + strength)."""
    strength, decay = setting
    batch, _, height, width = x.shape
    plasma = _plasma_fractal(batch, height, width, decay, generator, x)[:, None]
    peak = x.amax((1, 2, 3), keepdim=True)
    return (x + strength * plasma).mul_(peak / (peak + strength)).clamp_(0, 1)


def _brightness(x, shift, generator, scale):
    """Add to the HSV value, clipped at 1 (skimage rgb2hsv/hsv2rgb): with hue and saturation fixed,
    RGB scales with the value, and black turns gray (its saturation is 0)."""
    value = x.amax(1, keepdim=True)
    new_value = (value + shift).clamp_(max=1)
    ratio = new_value / value.clamp_min(1e-12)
    return torch.where(value > 0, x * ratio, new_value).clamp_(0, 1)


def _saturate(x, setting, generator, scale):
    """Scale and shift the HSV saturation (skimage's conversion: gray has hue 0, red)."""
    factor, offset = setting
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


def _contrast(x, factor, generator, scale):
    """(x - mean) * factor + mean, with the mean of each channel of each image."""
    means = x.mean((2, 3), keepdim=True)
    return (x - means).mul_(factor).add_(means).clamp_(0, 1)


def _elastic_transform(x, setting, generator, scale):
    """Random affine (3 jittered points, cv2.warpAffine, reflect-101) then a smooth random
    displacement field (scipy map_coordinates, order 1, mode 'reflect')."""
    alpha, sigma, jitter = (value * scale for value in setting)
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


def _pixelate(x, factor, generator, scale):
    """PIL BOX resize to int(size * factor), then BOX back to the original size, in float."""
    height, width = x.shape[-2:]
    small_h, small_w = max(int(height * factor), 1), max(int(width * factor), 1)
    rows = _on_device(_pil_box_round_trip, (height, small_h), x.device, x.dtype)
    cols = _on_device(_pil_box_round_trip, (width, small_w), x.device, x.dtype)
    return (rows @ x @ cols.T).clamp_(0, 1)


def _jpeg_compression(x, quality, generator, scale):
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
    pixels = (x * 255).round_().clamp_(0, 255)
    return _jpeg_round_trip(pixels, quality).to(x.dtype).div_(255)


def _jpeg_round_trip(pixels, quality):
    """JPEG round trip of images [B, C, H, W] holding whole levels 0..255 (any float or uint8 dtype), on
    their device: uint8 [B, C, H, W]."""
    pixels = pixels.to(torch.uint8)
    if pixels.device.type == 'cuda':
        return _jpeg_round_trip_cuda(pixels, quality)
    host = pixels.cpu()
    small = host.shape[-2] * host.shape[-1] <= _TORCHVISION_JPEG_MAX_PIXELS
    codec = _torchvision_jpeg() if small else None
    decoded = _jpeg_round_trip_pil(host, quality) if codec is None else _jpeg_round_trip_torchvision(
        host, quality, *codec)
    return move(decoded, pixels.device)


def _published_save(x):
    """The save of the published Tiny-ImageNet-C / ImageNet-C files: np.uint8 (truncation), then JPEG at
    quality 85 (PIL's 4:2:0 on the CPU, nvJPEG's 4:4:4 on a GPU: see `_jpeg_compression`)."""
    return _jpeg_round_trip(_as_uint8(x), _PUBLISHED_JPEG_QUALITY).to(x.dtype).div_(255)


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


def _spatter(x, setting, generator, scale):
    """Water drops (severities 1-3) or mud (4-5) from thresholded, blurred noise, as the script.

    Water: the script's cv2 chain on the liquid layer's uint8 levels (`_canny`, `_chamfer_distance`,
    truncation at 20 px, 3 x 3 box blurs, `_equalize_hist`, the emboss kernel, cv2's rounding and
    saturation to uint8 between the steps), the drops shaded by it in pale turquoise.
    """
    mean, std, blur, threshold, strength, mud = setting
    batch, _, height, width = x.shape
    liquid = _randn((batch, 1, height, width), generator, x).mul_(std).add_(mean)
    liquid = _gaussian_blur(liquid, blur * scale)
    liquid = torch.where(liquid < threshold, 0, liquid)
    if mud:
        cover = _gaussian_blur((liquid > threshold).to(x.dtype), strength * scale)
        cover = torch.where(cover < 0.8, 0, cover)
        brown = _constant((63 / 255, 42 / 255, 20 / 255), x)
        return (x * (1 - cover) + brown * cover).clamp_(0, 1)
    levels = _as_uint8(liquid.clamp(max=1))
    box = torch.full((3, 3), 1 / 9, dtype=torch.float64)
    distance = _chamfer_distance(_canny(levels, 50, 150), 20 * scale)
    # cv2.blur in float, then .astype(np.uint8); a plateau of equal distances averages to that very value,
    # which float round-off can put just below: floor it from 1e-4 above.
    shade = _correlate2d(distance, box, 'mirror').add_(1e-4).floor_().clamp_(0, 255)
    shade = _equalize_hist(shade)
    emboss = torch.tensor([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=torch.float64)
    shade = _correlate2d(shade, emboss, 'mirror').round_().clamp_(0, 255)  # filter2D to CV_8U
    shade = _correlate2d(shade, box, 'mirror').round_()  # cv2.blur of uint8 rounds
    wet = (levels * shade).to(x.dtype)
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
        raise ValueError(f"{argument}={severity!r} must be an integer from 1 to 5 (the benchmarks' severities).")


def _check_published_jpeg(published_jpeg):
    if not isinstance(published_jpeg, (bool, np.bool_)):
        raise ValueError(f"published_jpeg={published_jpeg!r} must be True (the JPEG save of the published "
                         f"Tiny-ImageNet-C / ImageNet-C files) or False.")


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


def corrupt(x, name, severity, generator=None, benchmark=None, published_jpeg=True):
    """Corrupt images `x` (float [B, C, H, W] in [0, 1], C = 1 or 3) with corruption `name` at `severity` 1-5.

    `benchmark`: whose tables and code, one of `BENCHMARKS`: 'cifar10-c' (32 px; CIFAR-100-C uses the
    same), 'tiny-imagenet-c' (64 px) or 'imagenet-c' (224 px); lengths scale by min(H, W) / that size.
    None chooses by the smaller image side: up to 48 px CIFAR-10-C, up to 128 px Tiny-ImageNet-C, else
    ImageNet-C. `published_jpeg`: for Tiny-ImageNet-C and ImageNet-C, also the quality-85 JPEG save that
    every published file went through (8-bit output); no effect for CIFAR-10-C, whose files were not
    compressed.

    Returns a new tensor of the same shape, dtype and device, in [0, 1]; `x` is never modified.
    Every image draws its own noise; the same `generator` state gives the same output (with
    `generator=None` torch's global RNG is used, which fastai's `set_seed` seeds). Random numbers are
    drawn on the generator's device, so pass one on `x`'s device to avoid copies.

    CPU tensors with NaN or values outside [0, 1] raise a ValueError. On a GPU the values are not
    checked: reading one back would make every call wait for the GPU, which is what the GPU path
    avoids (no corruption synchronizes but the JPEG round trips: `jpeg_compression` and the published
    save); values there are clamped to [0, 1] and NaN stays NaN. `evaluate_robustness` checks every batch
    once, on any device.
    """
    _check_corruption_name(name)
    _check_severity(severity)
    _check_images(x)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")
    _check_published_jpeg(published_jpeg)
    chosen = get_benchmark(benchmark, *x.shape[-2:])
    images = x.detach().as_subclass(torch.Tensor)
    work_dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    images = images.to(work_dtype).clamp(0, 1)  # a new tensor: the kernels may work in place on it
    if images.shape[0] == 0:
        return images.to(x.dtype)
    setting = chosen.setting(name, int(severity))
    scale = min(images.shape[-2:]) / chosen.native_size
    with torch.no_grad(), _no_autocast(images.device):
        out = _CORRUPTION_FUNCTIONS[name](images, setting, generator, scale)
        if published_jpeg and chosen.saved_as_jpeg:
            out = _published_save(out)
    return out.to(x.dtype)
