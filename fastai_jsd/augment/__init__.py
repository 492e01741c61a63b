"""AugMix itself: per-image draws (sampling.py) applied by the torch or the Triton kernels. Imports nothing from fastai.

`augmix` validates, samples and applies; `apply_augmix` replays a draw with the backend the images'
device calls for (backends.py).
"""
import math

import torch

from fastai_jsd.augment import geometry, torch_apply
from fastai_jsd.augment.checks import check_images
from fastai_jsd.augment.backends import BACKENDS, resolve_backend, triton_kernels
from fastai_jsd.augment.sampling import (NO_OP, OP_NAMES, OPS, PAPER_OP_COUNT, AugMixParams, _check_generator,
                                         check_augmix_args, check_param_values, check_params, op_set, sample_augmix)

__all__ = ['augmix', 'apply_augmix', 'sample_augmix', 'AugMixParams', 'BACKENDS', 'resolve_backend', 'op_set',
           'check_augmix_args', 'check_fill', 'check_value_range', 'OP_NAMES', 'OPS', 'NO_OP', 'PAPER_OP_COUNT']


def check_fill(fill, channels=3):
    """TypeError/ValueError unless `fill` is a colour AugMix can fill with: a finite number in [0, 1], or 1 or
    `channels` of them (a sequence or a tensor). The same rule `augmix` applies, for checks made before any batch."""
    device = fill.device if isinstance(fill, torch.Tensor) else 'cpu'
    geometry.fill_colour(fill, channels, device, torch.float32)


def check_value_range(x, name='x'):
    """Raise ValueError unless `x` looks like pixels in [0, 1] (normalized images do not; NaN neither).

    Not on CUDA: reading the range back would make the host wait for the GPU on every call.
    """
    if x.numel() == 0 or x.device.type == 'cuda':
        return
    low, high = torch.aminmax(x)
    low, high = low.item(), high.item()
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{name} holds NaN pixels; AugMix needs pixel values in [0, 1]. Find where the NaN "
                         f"come from (a division by zero in preprocessing?) or replace them with torch.nan_to_num.")
    if not (low >= -0.01 and high <= 1.01):
        raise ValueError(f"{name} must hold pixel values in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
                         f"the images look normalized (or 0..255): decode them to [0, 1] first, e.g. "
                         f"with fastai's `Normalize.decode` or `/ 255`.")


def apply_augmix(x, params, fill=0., backend=None):
    """Apply one AugMix draw to `x` (float `[B, C, H, W]` in [0, 1]); a new tensor, `x` is untouched.

    mixed = (1 - m) * x + m * sum_i w_i * chain_i(x), the paper's mixing, with every image's
    own m, w, ops and arguments from `params`. `backend`: 'torch' (the grouped kernels of this
    module, any device), 'triton' (fused CUDA kernels, triton_apply.py) or None ('triton' for CUDA
    tensors when Triton >= 3.4 imports and the GPU is an NVIDIA one of compute capability >= 7.0,
    else 'torch'); both give the same pixels to within 1/255.
    `params` and a tensor `fill` may be on the CPU: they are queued to x's device without waiting
    for it. Half-precision images are augmented in float32. Augmentation is not differentiable: it
    runs without autograd, and the result never requires grad. The values of params that
    `sample_augmix` did not draw are checked first (one host sync on a GPU), and `backend='torch'`
    on a GPU waits for it once per call (to size its op groups); 'triton' never does.
    """
    check_images(x)
    check_params(params, x.shape[0])
    backend = resolve_backend(backend, x.device)
    fill = geometry.fill_colour(fill, x.shape[1], x.device, _compute_dtype(x, backend))
    check_value_range(x)
    if not params.sampled:
        check_param_values(params)
    with torch.no_grad():
        return _apply(x, params.to(x.device), fill, backend)


def _compute_dtype(x, backend):
    """The pixels' dtype while augmenting: float32 for half precision (and always on the Triton path)."""
    return torch.float32 if backend == 'triton' else geometry.compute_dtype_of(x.dtype)


def _apply(x, params, fill, backend):
    """`apply_augmix` after the checks, with `fill` from geometry.fill_colour in the compute dtype."""
    if backend == 'triton':
        return triton_kernels().apply_augmix(x, params, fill.reshape(-1).contiguous())
    return torch_apply.apply(x, params, fill)


def augmix(x, severity=3, width=3, depth=-1, alpha=1., all_ops=False, fill=0., generator=None, geometric=True,
           backend=None):
    """AugMix (Hendrycks et al. 2020) of every image of `x` (float `[B, C, H, W]` in [0, 1]), independently.

    Every image draws its own chain weights, blend weight, chain depths, ops and magnitudes,
    unlike torchvision's batched AugMix, which gives the whole batch one op chain. Same
    `generator` seed, same output; with `generator=None` torch's global RNG is used, which
    fastai's `set_seed` seeds. Returns a new tensor of `x`'s shape, dtype and device.
    `geometric=False` leaves rotate, shear and translate out, so every pixel stays where it
    was (views that still match a segmentation mask). `backend` as in `apply_augmix`: on CUDA
    the default is the fused Triton kernels, which run without a single host sync (so there
    the [0, 1] range of `x` is not checked: that would mean waiting for the GPU).
    Augmentation is not differentiable: it runs without autograd.
    """
    check_images(x)
    check_augmix_args(severity, width, depth, alpha, all_ops, geometric)
    _check_generator(generator)
    backend = resolve_backend(backend, x.device)
    fill = geometry.fill_colour(fill, x.shape[1], x.device, _compute_dtype(x, backend))
    check_value_range(x)
    with torch.no_grad():
        params = sample_augmix(x.shape[0], x.shape[2], x.shape[3], severity=severity, width=width, depth=depth,
                               alpha=alpha, all_ops=all_ops, generator=generator, device=x.device,
                               geometric=geometric)
        return _apply(x, params, fill, backend)
