"""Decode a normalized fastai batch to pixels in [0, 1] and encode pixels back, with the DataLoaders' own
`Normalize` transforms.

Statistics are a list of (mean, std) pairs, `[1, C, 1, 1]` tensors, in the order the transforms run; an
empty list means the batch already is pixels. The arithmetic is fastai's own (`Normalize.decodes` is
`x * std + mean`, `encodes` is `(x - mean) / std`), so a round trip here gives fastai's values exactly.
fastai is imported only where a DataLoader is searched: the kernels and `corrupt` never pay its import.
"""
import math

import torch

from fastai_jsd._device import move
from fastai_jsd.augment.checks import image_problem


def find_normalize(dl):
    """The last `Normalize` of `dl.after_batch` (the one applied last), or None when it has none."""
    found = _normalize_transforms(dl)
    return found[-1] if found else None


def normalize_stats(dl, device, dtype=torch.float32):
    """The (mean, std) pairs of every `Normalize` in `dl.after_batch`, in application order, on `device`."""
    return [channel_stats(norm, device, dtype) for norm in _normalize_transforms(dl)]


def channel_stats(norm, device, dtype=torch.float32):
    """One `Normalize`'s (mean, std) as `[1, C, 1, 1]` tensors on `device` in `dtype`.

    A Normalize built without statistics computes them in `setups`, when its DataLoaders are built;
    before that they are None, which would decode to nonsense, so it is refused here.
    """
    if norm.mean is None or norm.std is None:
        raise ValueError("the DataLoaders' Normalize has no statistics yet; build the DataLoaders "
                         "(dls = dblock.dataloaders(...)) before decoding or evaluating.")
    return tuple(_as_channel_stat(value, device, dtype) for value in (norm.mean, norm.std))


def decode(images, stats):
    """Pixels from a normalized batch, as a new plain float tensor (no statistics: a float copy)."""
    pixels = images.as_subclass(torch.Tensor).float()
    if not stats:
        return pixels.clone()
    for mean, std in reversed(stats):  # undo the last transform first
        pixels = pixels * std + mean
    return pixels


def encode(pixels, stats):
    """`pixels` normalized with `stats` into a new tensor (no statistics: `pixels` itself); `pixels` is kept."""
    for mean, std in stats:
        pixels = (pixels - mean) / std
    return pixels


def encode_(pixels, stats):
    """Normalize `pixels` in place with `stats`: for tensors the caller owns, it saves an allocation."""
    for mean, std in stats:
        pixels.sub_(mean).div_(std)
    return pixels


def check_image_batch(xb):
    """The single image tensor of a batch's inputs `xb`; ValueError unless it is a float [B, C, H, W] batch, C in (1, 3)."""
    images = xb[0] if len(xb) == 1 else None
    if images is None or image_problem(images, 'images') is not None:
        raise ValueError(f"AugMixCallback needs image batches (one float tensor [B, C, H, W], C = 1 or 3); "
                         f"got {_describe(xb)}. Use it with an image DataLoaders (ImageBlock) or remove the callback.")
    return images


def pixel_range_problem(pixels, tolerance=0.01):
    """What keeps float `pixels` from being pixels in [0, 1] ('NaN values' or their range), or None when nothing does.

    `tolerance` as AugMix's own input check: interpolation may overshoot [0, 1] a little. Reads two numbers
    back, so on a GPU the host waits for it: callers decide how often to pay that.
    """
    if pixels.numel() == 0:
        return None
    low, high = (value.item() for value in torch.aminmax(pixels.detach()))  # NaN propagates to both
    if math.isnan(low) or math.isnan(high):
        return "NaN values"
    if not (low >= -tolerance and high <= 1 + tolerance):
        return f"values in [{low:.3g}, {high:.3g}]"
    return None


def erases_with_noise(dl):
    """Whether `dl.after_batch` holds fastai's `RandomErasing`, which fills its rectangles with N(0, 1) noise.

    It runs after `Normalize` (order 100), so the noise is in normalized units, and decoded with the
    statistics those pixels fall outside [0, 1] (in pixel space, without Normalize, just the same).
    """
    from fastai.vision.augment import RandomErasing  # here: importing this module must not import fastai
    pipeline = getattr(dl, 'after_batch', None)
    return any(isinstance(tfm, RandomErasing) for tfm in getattr(pipeline, 'fs', None) or ())


def _describe(xb):
    """Shapes and dtypes of a batch tuple, for error messages."""
    parts = [f"{type(t).__name__}{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
             for t in xb]
    return f"{len(parts)} input(s): " + ", ".join(parts)


def _normalize_transforms(dl):
    """Every `Normalize` in `dl.after_batch`, in application order."""
    from fastai.data.transforms import Normalize  # here: importing this module must not import fastai
    pipeline = getattr(dl, 'after_batch', None)
    return [tfm for tfm in getattr(pipeline, 'fs', None) or () if isinstance(tfm, Normalize)]


def _as_channel_stat(value, device, dtype):
    """A statistic as a plain tensor on `device`, a scalar or a per-channel vector shaped `[1, C, 1, 1]`."""
    stat = move(torch.as_tensor(value).as_subclass(torch.Tensor), device, dtype)
    return stat.view(1, -1, 1, 1) if stat.ndim <= 1 else stat
