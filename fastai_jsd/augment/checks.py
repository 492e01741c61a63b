"""Argument checks shared by the kernels: images and per-image parameters, validated before any work."""
import math
import numbers

import torch
from torch import Tensor

from fastai_jsd.augment.devices import move


def image_problem(x, name='x'):
    """Why `x` is not a float `[B, C, H, W]` image batch with C in (1, 3), as (exception type, message); None if it is.

    The one image check of the package: the kernels raise it as it is, `corrupt` and the callback
    word it for their callers.
    """
    if not isinstance(x, Tensor):
        return TypeError, f"{name} must be a torch.Tensor of images [B, C, H, W], got {type(x).__name__}."
    if not x.is_floating_point():
        return TypeError, (f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}; "
                           f"convert uint8 images with `{name}.float() / 255`.")
    if x.ndim != 4:
        return ValueError, (f"{name} must be a batch of images [B, C, H, W], got shape {tuple(x.shape)}; "
                            f"add a batch dimension with `{name}[None]` for a single image.")
    if x.shape[1] not in (1, 3):
        hint = f"; for channels-last images use `{name}.permute(0, 3, 1, 2)`" if x.shape[3] in (1, 3) else ""
        return ValueError, (f"{name} must have C = 1 or 3 channels (grayscale or RGB) in dim 1, got shape "
                            f"{tuple(x.shape)}{hint}.")
    if x.shape[2] == 0 or x.shape[3] == 0:
        return ValueError, f"{name} must have at least one pixel, got shape {tuple(x.shape)}."
    return None


def check_images(x, name='x'):
    """Raise TypeError/ValueError unless `x` is a float `[B, C, H, W]` tensor with C in (1, 3)."""
    problem = image_problem(x, name)
    if problem is not None:
        error, message = problem
        raise error(message)


def per_image(value, x, name, dtype=None):
    """A per-image parameter (Python number, 0-d or `[B]` tensor) as a `[B, 1, 1, 1]` tensor on `x`'s device.

    The result has `x`'s dtype unless `dtype` is given, so it broadcasts against `x`
    without promotion; a number or 0-d tensor is expanded (no copy). Raises TypeError for
    a non-number (bool included) and ValueError for a non-finite number or a tensor not
    of shape `[]` or `[B]`. A tensor's values are not inspected: that would force a device sync.
    """
    batch = x.shape[0]
    dtype = x.dtype if dtype is None else dtype
    if isinstance(value, Tensor):
        if value.ndim != 0 and (value.ndim != 1 or value.shape[0] != batch):
            raise ValueError(f"{name} must be a number or a tensor of shape [B] = [{batch}] (one value "
                             f"per image), got a tensor of shape {tuple(value.shape)}.")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must hold real numbers, got a tensor of dtype {value.dtype}.")
        return move(value, x.device, dtype).reshape(-1, 1, 1, 1).expand(batch, 1, 1, 1)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a [B] tensor, got {value!r} "
                        f"of type {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return torch.full((1, 1, 1, 1), float(value), dtype=dtype, device=x.device).expand(batch, 1, 1, 1)
