"""Batched geometric AugMix kernels: rotate, shear and translate, exactly as PIL resamples them.

Matrix convention (the one PIL's `Image.transform(size, Image.AFFINE, data)` uses):
a matrix maps OUTPUT pixel coordinates to INPUT pixel coordinates. Coordinates are
continuous pixel units with the origin at the top-left corner of the top-left pixel,
x to the right, y down, so pixel (i, j) (column i, row j) is the unit square
[i, i + 1) x [j, j + 1) with its centre at (i + 0.5, j + 0.5). For the output pixel
(i, j) the source position is

    (xs, ys, 1) = M @ (i + 0.5, j + 0.5, 1),   M = [[a, b, c], [d, e, f], [0, 0, 1]]

where (a, b, c, d, e, f) is PIL's `data` tuple. Every builder returns float `[B, 3, 3]`
matrices (`[1, 3, 3]` for a Python number, which `warp_affine` broadcasts over the batch);
`warp_affine` also takes the `[B, 2, 3]` top two rows and ignores a third row.

Composition: applying op A first and then op B is ONE warp with the matrix `A @ B`
(the first op's matrix stands on the left, because each matrix pulls coordinates back
from its output to its input: out_B(p) = out_A(B p) = in(A B p)). A chain op1, op2, op3
is `M1 @ M2 @ M3`, and identity matrices (angle, factor or pixels 0) are neutral. One warp
differs from PIL applying the ops one after the other in two ways: it interpolates once
instead of once per op (sharper), and only the final source position decides between
image and fill, so image content that an earlier op moved out of the frame and a later
op moves back stays image instead of becoming fill.

Sampling (Pillow's `ImagingGenericTransform` with `bilinear_filter*`, libImaging/Geometry.c):
a source position with xs < 0, xs >= W, ys < 0 or ys >= H gets the fill colour; any other
one is interpolated bilinearly between the pixel centres around it, and a neighbour
beyond the image edge is replaced by the nearest edge pixel (`XCLIP`/`YCLIP`), so within
half a pixel of the edge the edge pixel is extended rather than blended with the fill.
PIL then truncates the 8-bit result towards zero; these kernels keep the exact float
value, which is why they differ from PIL's uint8 output by half a level on average.
"""
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor

# Circular if ops.py re-exports this module's kernels at import time: ops.py must define these
# two before it imports from here (or they move to a module of their own).
from fastai_jsd._checks import check_images, per_image


def _matrix_dtype(device):
    """float64, as PIL's matrices are doubles, except on MPS, which has no float64."""
    return torch.float32 if torch.device(device).type == 'mps' else torch.float64


def _as_vector(value, name, device, dtype):
    """A number or a `[B]` tensor as a 1-D tensor (`[1]` for a number) for the matrix builders."""
    if isinstance(value, Tensor):
        if value.ndim > 1:
            raise ValueError(f"{name} must be a number or a tensor of shape [B] (one value per image), "
                             f"got a tensor of shape {tuple(value.shape)}.")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must hold real numbers, got a tensor of dtype {value.dtype}.")
        device = value.device if device is None else device
        return value.reshape(-1).to(device=device, dtype=dtype or _matrix_dtype(device))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a [B] tensor, got {value!r} "
                        f"of type {type(value).__name__}.")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    device = torch.device('cpu') if device is None else device
    return torch.full((1,), float(value), device=device, dtype=dtype or _matrix_dtype(device))


def _affine(a, b, c, d, e, f):
    """Stack six broadcastable `[B]` coefficient tensors into `[B, 3, 3]` matrices."""
    a, b, c, d, e, f = torch.broadcast_tensors(a, b, c, d, e, f)
    zero = torch.zeros_like(a)
    one = torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=-1).view(-1, 3, 3)


def rotation_matrix(degrees, height, width, *, device=None, dtype=None):
    """`[B, 3, 3]` PIL matrices of `img.rotate(degrees)`: counter-clockwise about (width/2, height/2).

    Built as `Image.rotate` builds it (angle taken modulo 360, sin and cos rounded to
    15 decimals), so multiples of 90 degrees give exactly PIL's source positions.
    """
    for size, size_name in ((height, 'height'), (width, 'width')):
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ValueError(f"{size_name} must be a positive int (the image size), got {size!r}.")
    angle = -torch.deg2rad(torch.remainder(_as_vector(degrees, 'degrees', device, dtype), 360.))
    cos = torch.round(torch.cos(angle), decimals=15)
    sin = torch.round(torch.sin(angle), decimals=15)
    centre_x = width / 2
    centre_y = height / 2
    # PIL: (c, f) = R @ (-centre) + centre, so the centre maps onto itself.
    shift_x = centre_x - cos * centre_x - sin * centre_y
    shift_y = centre_y + sin * centre_x - cos * centre_y
    return _affine(cos, sin, shift_x, -sin, cos, shift_y)


def shear_x_matrix(factor, *, device=None, dtype=None):
    """`[B, 3, 3]` matrices of PIL data (1, factor, 0, 0, 1, 0): output(x, y) = input(x + factor*y, y)."""
    factor = _as_vector(factor, 'factor', device, dtype)
    zero = torch.zeros_like(factor)
    one = torch.ones_like(factor)
    return _affine(one, factor, zero, zero, one, zero)


def shear_y_matrix(factor, *, device=None, dtype=None):
    """`[B, 3, 3]` matrices of PIL data (1, 0, 0, factor, 1, 0): output(x, y) = input(x, y + factor*x)."""
    factor = _as_vector(factor, 'factor', device, dtype)
    zero = torch.zeros_like(factor)
    one = torch.ones_like(factor)
    return _affine(one, zero, zero, factor, one, zero)


def translate_x_matrix(pixels, *, device=None, dtype=None):
    """`[B, 3, 3]` matrices of PIL data (1, 0, pixels, 0, 1, 0): output(x, y) = input(x + pixels, y)."""
    pixels = _as_vector(pixels, 'pixels', device, dtype)
    zero = torch.zeros_like(pixels)
    one = torch.ones_like(pixels)
    return _affine(one, zero, pixels, zero, one, zero)


def translate_y_matrix(pixels, *, device=None, dtype=None):
    """`[B, 3, 3]` matrices of PIL data (1, 0, 0, 0, 1, pixels): output(x, y) = input(x, y + pixels)."""
    pixels = _as_vector(pixels, 'pixels', device, dtype)
    zero = torch.zeros_like(pixels)
    one = torch.ones_like(pixels)
    return _affine(one, zero, zero, zero, one, pixels)


def _check_matrix(matrix, batch):
    """Raise unless `matrix` is a float `[B, 3, 3]` or `[B, 2, 3]` tensor (B may be 1)."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"matrix must be a torch.Tensor of shape [B, 3, 3] or [B, 2, 3], "
                        f"got {type(matrix).__name__}.")
    if not matrix.is_floating_point():
        raise TypeError(f"matrix must be a float tensor, got dtype {matrix.dtype}.")
    if matrix.ndim != 3 or matrix.shape[1:] not in ((3, 3), (2, 3)) or matrix.shape[0] not in (1, batch):
        raise ValueError(f"matrix must have shape [B, 3, 3] or [B, 2, 3] with B = {batch} (or 1 for all "
                         f"images), got shape {tuple(matrix.shape)}; build it with rotation_matrix, "
                         f"shear_x_matrix, ... and multiply for a chain.")


def _fill_colour(fill, channels, device, dtype):
    """`fill` (a number, or 1 or C values) as a `[1, C, 1, 1]` tensor on `device`."""
    if isinstance(fill, Tensor):
        if fill.dtype == torch.bool or fill.is_complex():
            raise TypeError(f"fill must hold real numbers, got a tensor of dtype {fill.dtype}.")
        count = fill.numel()
    elif isinstance(fill, numbers.Real) and not isinstance(fill, bool):
        count = 1
    elif isinstance(fill, (list, tuple)) and all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in fill):
        count = len(fill)
    else:
        raise TypeError(f"fill must be a number or a sequence of {channels} numbers (a colour in [0, 1]), "
                        f"got {fill!r}.")
    if count not in (1, channels):
        raise ValueError(f"fill must hold 1 or C = {channels} values (one per channel), got {fill!r}; "
                         f"for 8-bit colours divide by 255.")
    if isinstance(fill, Tensor):
        return fill.reshape(1, -1, 1, 1).to(device=device, dtype=dtype).expand(1, channels, 1, 1)
    # Written value by value on the device: a host-to-device copy would synchronise the GPU stream.
    colour = torch.empty(1, count, 1, 1, device=device, dtype=dtype)
    for channel, value in enumerate(fill if isinstance(fill, (list, tuple)) else [fill]):
        colour[:, channel] = float(value)
    return colour.expand(1, channels, 1, 1)


def warp_affine(x, matrix, fill=0.):
    """Resample `x` at the source positions `matrix` gives (PIL convention, see module docs).

    One `grid_sample` with border padding reproduces PIL's edge rule inside the image;
    positions PIL counts as outside get `fill`. Half-precision inputs are resampled in
    float32, since a half-precision grid cannot address pixels of a 224 px image.
    """
    check_images(x)
    batch, channels, height, width = x.shape
    _check_matrix(matrix, batch)
    compute_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    fill = _fill_colour(fill, channels, x.device, compute_dtype)
    coeffs = matrix.to(device=x.device, dtype=compute_dtype)
    col = torch.arange(width, device=x.device, dtype=compute_dtype).add_(0.5)
    row = torch.arange(height, device=x.device, dtype=compute_dtype).add_(0.5)

    grid = torch.empty(coeffs.shape[0], height, width, 2, device=x.device, dtype=compute_dtype)
    source = torch.empty(coeffs.shape[0], height, width, device=x.device, dtype=compute_dtype)
    inside = None
    for axis, size in ((0, width), (1, height)):
        # Source positions in pixel units first, one broadcast add per axis: exact for integer and
        # half-integer matrices (translations, multiples of 90 degrees), so PIL's inside test is
        # decided exactly where a source lands on the image edge.
        along_x = coeffs[:, axis, 0, None, None] * col
        along_y = torch.addcmul(coeffs[:, axis, 2, None, None], coeffs[:, axis, 1, None, None], row[:, None])
        torch.add(along_x, along_y, out=source)
        axis_inside = source >= 0
        axis_inside &= source < size
        inside = axis_inside if inside is None else inside.logical_and_(axis_inside)
        # grid_sample's align_corners=False normalisation: -1 and 1 are the outer image edges.
        torch.add(along_x.mul_(2 / size), along_y.mul_(2 / size).sub_(1), out=grid[..., axis])

    image = x if x.dtype == compute_dtype else x.to(compute_dtype)
    grid = grid.expand(batch, height, width, 2)
    out = F.grid_sample(image, grid, mode='bilinear', padding_mode='border', align_corners=False)
    inside = inside.expand(batch, height, width).unsqueeze(1)
    # Bilinear weights summing to 1 + ulp overshoot [0, 1] by an ulp; the caller's fill is left as given.
    out = torch.where(inside, out.clamp_(0, 1), fill, out=out)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _per_image_vector(value, x, name):
    """Validate a per-image parameter against `x` and return it as a `[B]` matrix-precision tensor."""
    return per_image(value, x, name, dtype=_matrix_dtype(x.device)).reshape(-1)


def rotate(x, degrees, fill=0.):
    """Rotate counter-clockwise about the centre, as `img.rotate(degrees, resample=Image.BILINEAR)`."""
    check_images(x)
    degrees = _per_image_vector(degrees, x, 'degrees')
    return warp_affine(x, rotation_matrix(degrees, x.shape[2], x.shape[3]), fill)


def shear_x(x, factor, fill=0.):
    """output(x, y) = input(x + factor*y, y), as PIL's AFFINE transform with data (1, factor, 0, 0, 1, 0)."""
    check_images(x)
    return warp_affine(x, shear_x_matrix(_per_image_vector(factor, x, 'factor')), fill)


def shear_y(x, factor, fill=0.):
    """output(x, y) = input(x, y + factor*x), as PIL's AFFINE transform with data (1, 0, 0, factor, 1, 0)."""
    check_images(x)
    return warp_affine(x, shear_y_matrix(_per_image_vector(factor, x, 'factor')), fill)


def translate_x(x, pixels, fill=0.):
    """output(x, y) = input(x + pixels, y), as PIL's AFFINE transform with data (1, 0, pixels, 0, 1, 0)."""
    check_images(x)
    return warp_affine(x, translate_x_matrix(_per_image_vector(pixels, x, 'pixels')), fill)


def translate_y(x, pixels, fill=0.):
    """output(x, y) = input(x, y + pixels), as PIL's AFFINE transform with data (1, 0, 0, 0, 1, pixels)."""
    check_images(x)
    return warp_affine(x, translate_y_matrix(_per_image_vector(pixels, x, 'pixels')), fill)
