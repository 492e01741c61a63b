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

Implementation: rotate (and any matrix given to `warp_affine`) is one `grid_sample` with
border padding, the fill put back with a float inside mask. shear_x and translate_x move every
row by its own amount, shear_y and translate_y every column, so they need no 2-D sampling:
`shift_rows` copies each row's shifted window (`index_select` on an `unfold` view, a memcpy per
row) and interpolates the two neighbouring windows with one `lerp`, which is PIL's bilinear
filter when the other axis stays on pixel centres; `shift_columns` does the same on the
transposed images. Whole-pixel translations (all AugMix draws) are plain copies: exact.
The same PIL rules apply on every path, so the paths agree to float rounding.

The public kernels (`warp_affine`, `rotate`, `shear_x`, `shear_y`, `translate_x`, `translate_y`) run under
`torch.no_grad()`: augmentation is not differentiable here (the buffers are written with `out=`), an input
that requires grad is accepted, and the output never requires grad.
"""
import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastai_jsd.augment.devices import move
from fastai_jsd.augment.checks import check_images, per_image


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
        return move(value.reshape(-1), device, dtype or _matrix_dtype(device))
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


def fill_colour(fill, channels, device, dtype):
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
    _check_fill_values(fill)
    if isinstance(fill, Tensor):  # a CPU colour is queued to the device, not waited for (devices.move)
        return move(fill.reshape(1, -1, 1, 1), device, dtype).expand(1, channels, 1, 1)
    # Written value by value on the device: a blocking host-to-device copy would synchronise the GPU stream.
    colour = torch.empty(1, count, 1, 1, device=device, dtype=dtype)
    for channel, value in enumerate(fill if isinstance(fill, (list, tuple)) else [fill]):
        colour[:, channel] = float(value)
    return colour.expand(1, channels, 1, 1)


def _check_fill_values(fill):
    """Raise ValueError unless the fill colour is finite and in [0, 1]: it becomes pixels of the output.

    A tensor off the CPU is not read (that would make the host wait for the device).
    """
    if isinstance(fill, Tensor):
        if fill.device.type != 'cpu' or fill.numel() == 0:
            return
        values = _flat(fill.tolist())  # read as it is: no tensor op, so no work queued anywhere
    else:
        values = list(fill) if isinstance(fill, (list, tuple)) else [fill]
    if not all(0 <= float(value) <= 1 for value in values):  # written so that NaN fails too
        shown = ', '.join(f'{float(value):.3g}' for value in values[:4])
        raise ValueError(f"fill must be a colour with values in [0, 1] (pixel scale), got ({shown}); for 8-bit "
                         f"colours divide by 255, and NaN or inf is no colour.")


def _flat(values):
    """The numbers of a nested list (`Tensor.tolist()`) in order; a number alone as a list of one."""
    if not isinstance(values, list):
        return [values]
    return [number for value in values for number in _flat(value)]


class Workspace:
    """Buffers that one call reuses from kernel to kernel: `empty(name, shape, dtype)` views the buffer kept as `name`.

    On CPU a fresh tensor above glibc's mmap threshold is new pages every time, and faulting
    them in costs far more than a pass of arithmetic over them; a workspace lives only as long as
    the call that made it, so nothing is shared between calls or threads.
    """

    def __init__(self, device):
        self.device = device
        self.buffers = {}

    def empty(self, name, shape, dtype):
        numel = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
            buffer = torch.empty(numel, device=self.device, dtype=dtype)
            self.buffers[name] = buffer
        return buffer[:numel].view(shape)

    def constant(self, key, make):
        """`make()`, computed once per workspace for the hashable `key` (sizes, dtype): never written to."""
        value = self.buffers.get(key)
        if value is None:
            value = self.buffers[key] = make()
        return value

    def arange(self, end, dtype=torch.int64, step=1, offset=0):
        """The constant `torch.arange(end) * step + offset` (offset 0.5: pixel centres)."""
        return self.constant(('arange', end, dtype, step, offset), lambda: torch.arange(
            end, device=self.device, dtype=dtype).mul_(step).add_(offset))


class _FreshTensors(Workspace):
    """The Workspace interface without reuse, for kernels called on their own."""

    def empty(self, name, shape, dtype):
        return torch.empty(shape, device=self.device, dtype=dtype)


def compute_dtype_of(dtype):
    """float32 for half-precision images: a half-precision position cannot address the pixels of a 224 px image."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fill_outside(out, inside, fill):
    """Replace `out` by `fill` where the float mask `inside` (broadcast over channels) is 0, in place.

    `lerp(fill, out, 1)` is `out` and `lerp(fill, out, 0)` is `fill` exactly, and unlike `where`
    with a boolean mask it runs at memory speed on CPU.
    """
    return torch.lerp(fill, out, inside, out=out)


def _sizes(width, height, device, dtype):
    """`[[[width]], [[height]]]`, written on the device (a host-to-device copy would synchronise a GPU stream)."""
    sizes = torch.empty(2, 1, 1, device=device, dtype=dtype)
    sizes[0] = width
    sizes[1] = height
    return sizes


def _warp_into(image, coeffs, fill, out, workspace=None):
    """Write PIL's bilinear resampling of `image` at the source positions of `coeffs` ([N or 1, 3, 3]) into `out`."""
    batch, channels, height, width = image.shape
    dtype = image.dtype
    workspace = workspace or _FreshTensors(image.device)
    matrices = coeffs.shape[0]
    col = workspace.arange(width, dtype, offset=0.5)
    row = workspace.arange(height, dtype, offset=0.5)[:, None]
    size = workspace.constant(('warp sizes', width, height, dtype), lambda: _sizes(width, height, image.device, dtype))
    # Source positions in pixel units first, one broadcast add (both axes at once, dim 1): exact
    # for integer and half-integer matrices (translations, multiples of 90 degrees), so PIL's
    # inside test is decided exactly where a source lands on the image edge.
    rows_of_matrix = coeffs[:, :2, :, None, None]
    along_x = rows_of_matrix[:, :, 0] * col
    along_y = torch.addcmul(rows_of_matrix[:, :, 2], rows_of_matrix[:, :, 1], row)
    source = torch.add(along_x, along_y, out=workspace.empty('source', (matrices, 2, height, width), dtype))
    # The inside mask as 0/1 floats: compares into a float tensor run several times faster than into bool.
    inside_axis = torch.ge(source, 0, out=workspace.empty('inside_axis', source.shape, dtype))
    inside_axis.mul_(torch.lt(source, size, out=workspace.empty('below_size', source.shape, dtype)))
    inside = torch.mul(inside_axis[:, :1], inside_axis[:, 1:], out=workspace.empty(
        'inside', (matrices, 1, height, width), dtype))
    # grid_sample's align_corners=False normalisation: -1 and 1 are the outer image edges.
    scale = 2 / size
    grid = workspace.empty('grid', (matrices, height, width, 2), dtype)
    torch.add(along_x.mul_(scale), along_y.mul_(scale).sub_(1), out=grid.permute(0, 3, 1, 2))
    # Border padding is PIL's edge rule (XCLIP/YCLIP) inside the image; outside, the mask puts `fill`.
    sampled = F.grid_sample(image, grid.expand(batch, height, width, 2), mode='bilinear', padding_mode='border',
                            align_corners=False)
    # Bilinear weights summing to 1 + ulp overshoot [0, 1] by an ulp; the caller's fill is left as given.
    sampled.clamp_(0, 1)
    return torch.lerp(fill, sampled, inside, out=out)


@torch.no_grad()
def warp_affine(x, matrix, fill=0.):
    """Resample `x` at the source positions `matrix` gives (PIL convention, see module docs).

    One `grid_sample` with border padding reproduces PIL's edge rule inside the image;
    positions PIL counts as outside get `fill`. Half-precision inputs are resampled in
    float32, since a half-precision grid cannot address pixels of a 224 px image.
    Not differentiable: runs under torch.no_grad().
    """
    check_images(x)
    _check_matrix(matrix, x.shape[0])
    compute_dtype = compute_dtype_of(x.dtype)
    fill = fill_colour(fill, x.shape[1], x.device, compute_dtype)
    coeffs = move(matrix, x.device, compute_dtype)
    image = x.to(compute_dtype)
    out = _warp_into(image, coeffs, fill, torch.empty(image.shape, device=x.device, dtype=compute_dtype))
    return out.to(x.dtype)


# --- Shifts along one axis -------------------------------------------------------------------------------------------
# shear_x and translate_x move every row by its own amount, shear_y and translate_y every column:
# a one-dimensional resampling. Rather than a 2-D grid_sample, these kernels copy shifted windows
# of the rows with `index_select` on an `unfold` view (a memcpy per row) and interpolate with
# one `lerp`; whole-pixel shifts (AugMix's translations) need no interpolation at all. The images
# sit in a padded buffer (a `PaddedImages`) so that a window overhanging a row's end reads finite
# padding, never leaves the storage, and whatever it reads there is replaced by `fill` afterwards.

class PaddedImages(NamedTuple):
    """Images `[S, C, H, W]` in one contiguous buffer whose first `fill_slot + 1` slots hold the fill colour.

    The fill slot is where whole uncovered rows are copied from (translate_y). The shift kernels
    read up to `width + 1` elements beyond a source image, so the slots before the first and
    after the last source image must be finite padding (fill slots do).
    """
    images: Tensor
    fill_slot: int = 0


def padding_slots(channels, height, width):
    """Image slots of padding covering the `width + 1` elements a row window may overhang (one, unless tiny images)."""
    return -(-(width + 2) // (channels * height * width))


def pad_images(x, fill):
    """`x` copied into a PaddedImages between fill-colour padding, and the slots it occupies there."""
    batch, channels, height, width = x.shape
    pad = padding_slots(channels, height, width)
    images = torch.empty((pad + batch + pad, channels, height, width), device=x.device, dtype=fill.dtype)
    images[:pad] = fill
    images[pad + batch:] = fill
    images[pad:pad + batch] = x
    return PaddedImages(images), torch.arange(pad, pad + batch, device=x.device)


def _interval_mask(shift, length, dtype, workspace):
    """Float mask `[*shift.shape, length]`: 1 at the i where PIL samples the image, 0 where it fills.

    Output pixel i samples source position i + 0.5 + shift (pixel units along the axis), which
    PIL counts as inside when 0 <= i + 0.5 + shift < length: for first = ceil(-0.5 - shift),
    the i in [first, first + length). That is the window at length - first of the pattern
    [0] * length + [1] * length + [0] * length: one row copy per mask row.
    """
    def make_pattern():
        pattern = torch.zeros(3 * length, device=workspace.device, dtype=dtype)
        pattern[length:2 * length] = 1
        return pattern
    pattern = workspace.constant(('interval pattern', length, dtype), make_pattern)
    first = torch.ceil(-0.5 - shift).clamp_(-length, length).long()
    mask = workspace.empty('mask', (first.numel(), length), dtype)
    torch.index_select(pattern.unfold(0, length, 1), 0, (length - first).flatten(), out=mask)
    return mask.view(*shift.shape, length)


def _sample_rows(flat, row_start, shift, length, out, workspace):
    """out[r, i]: the `length` pixels at flat[row_start[r]:] resampled at i + shift[r] by PIL's bilinear filter.

    A neighbour beyond either end of the row takes the edge pixel's value (PIL's XCLIP), so
    within half a pixel of the edge the edge pixel is extended; the caller fills what lies
    outside. `flat` must hold `length + 1` finite elements before and after every row.
    """
    whole = torch.floor(shift)
    fraction = (shift - whole).to(out.dtype)
    # A shift beyond the row leaves only fill (masked by the caller): clamp so the window stays in the padding.
    whole = whole.clamp_(-(length + 1), length).long()
    taps = workspace.empty('taps', (row_start.numel(), length + 1), out.dtype)
    torch.index_select(flat.unfold(0, length + 1, 1), 0, row_start + whole, out=taps)
    # taps[r, p] holds column p + whole[r]; output i interpolates taps p = i and i + 1. A window
    # shifted left (whole < 0) holds column -1 at p = -1 - whole, one shifted right holds column
    # `length` at p = length - whole: that tap takes the edge column's value, its neighbour. The
    # output pixel using it is then the edge pixel (PIL's XCLIP), every other one using it is filled.
    # A window beyond the row has no edge column: the clamps make its copy a no-op.
    left = whole < 0
    target = torch.where(left, -1 - whole, length - whole).clamp_(0, length)
    source = torch.where(left, target + 1, target - 1).clamp_(0, length)
    first_tap = workspace.arange(taps.shape[0], step=length + 1)
    flat_taps = taps.view(-1)
    flat_taps[first_tap + target] = flat_taps[first_tap + source]
    return torch.lerp(taps[:, :-1], taps[:, 1:], fraction[:, None], out=out)


def shift_rows(source, positions, shift, fill, out, workspace=None):
    """Write the images `source.images[positions]` with row j of image n resampled at x + shift[n, j] into `out`.

    shear_x (shift = factor * (j + 0.5)) and translate_x (a constant shift); PIL's bilinear
    filter along x, `fill` where the source position leaves the image.
    """
    _, channels, height, width = source.images.shape
    workspace = workspace or _FreshTensors(out.device)
    row_offset = workspace.arange(channels * height, step=width).view(channels, height)
    row_start = positions.mul(channels * height * width).view(-1, 1, 1) + row_offset
    rows_shift = shift[:, None, :].expand(-1, channels, -1)
    _sample_rows(source.images.view(-1), row_start.flatten(), rows_shift.flatten(), width, out.view(-1, width),
                 workspace)
    return _fill_outside(out, _interval_mask(shift[:, None, :], width, out.dtype, workspace), fill)


def translate_whole_columns(source, positions, pixels, fill, out, workspace=None):
    """Write `source.images[positions]` moved by whole `pixels` along x (output(x, y) = input(x + p, y)) into `out`.

    A whole-pixel shift of every row is a shift of the whole flattened image: one window per
    image; the columns that wrapped into the neighbouring row are then filled.
    """
    _, channels, height, width = source.images.shape
    image_size = channels * height * width
    whole = pixels.clamp(-width, width).long()
    windows = source.images.view(-1).unfold(0, image_size, 1)
    torch.index_select(windows, 0, positions * image_size + whole, out=out.view(-1, image_size))
    inside = _interval_mask(pixels[:, None, None], width, out.dtype, workspace or _FreshTensors(out.device))
    return _fill_outside(out, inside, fill)


def translate_whole_rows(source, positions, pixels, fill, out, workspace=None):
    """Write `source.images[positions]` moved by whole `pixels` along y (output(x, y) = input(x, y + p)) into `out`.

    One row copy per output row: from the source row, or from the fill slot (which holds
    `fill`) where it is uncovered.
    """
    _, channels, height, width = source.images.shape
    workspace = workspace or _FreshTensors(out.device)
    source_row = workspace.arange(height) + pixels.long()[:, None]
    inside = (source_row >= 0) & (source_row < height)
    channel_row = workspace.arange(channels, step=height)[:, None]
    row_index = (positions * (channels * height))[:, None, None] + channel_row + source_row[:, None, :]
    fill_row = source.fill_slot * channels * height + channel_row
    row_index = torch.where(inside[:, None, :], row_index, fill_row)
    torch.index_select(source.images.view(-1, width), 0, row_index.flatten(), out=out.view(-1, width))
    return out


def shift_columns(source, positions, shift, fill, out, workspace=None):
    """Write `source.images[positions]` with column i of image n resampled at y + shift[n, i] into `out`.

    shear_y (shift = factor * (i + 0.5)) and fractional translate_y: the rows kernel on the
    transposed images (gathered and transposed in one `index_select`), transposed back at the end.
    """
    _, channels, height, width = source.images.shape
    batch = positions.shape[0]
    device = positions.device
    workspace = workspace or _FreshTensors(device)
    pad = height + 1
    columns = workspace.empty('columns', (pad + batch * channels * width * height + pad,), out.dtype)
    columns[:pad] = 0
    columns[-pad:] = 0
    transposed = columns[pad:-pad].view(batch, channels, width, height)
    torch.index_select(source.images.transpose(-1, -2), 0, positions, out=transposed)
    column_start = workspace.arange(batch * channels * width, step=height, offset=pad)
    resampled = workspace.empty('resampled', transposed.shape, out.dtype)
    columns_shift = shift[:, None, :].expand(-1, channels, -1)
    _sample_rows(columns, column_start, columns_shift.flatten(), height, resampled.view(-1, height), workspace)
    _fill_outside(resampled, _interval_mask(shift[:, None, :], height, out.dtype, workspace), fill)
    return out.copy_(resampled.transpose(-1, -2))


def warp_images(source, positions, coeffs, fill, out, workspace=None):
    """Write `source.images[positions]` resampled with the PIL matrices `coeffs` (`[N, 3, 3]`) into `out`."""
    workspace = workspace or _FreshTensors(out.device)
    gathered = workspace.empty('gathered', out.shape, out.dtype)
    torch.index_select(source.images, 0, positions, out=gathered)
    return _warp_into(gathered, coeffs.to(out.dtype), fill, out, workspace)


def _per_image_vector(value, x, name):
    """Validate a per-image parameter against `x` and return it as a `[B]` matrix-precision tensor."""
    return per_image(value, x, name, dtype=_matrix_dtype(x.device)).reshape(-1)


def _on_padded_copy(x, fill, kernel, argument):
    """`kernel(source, positions, argument, fill, out)` (a shift kernel) on a padded copy of `x`; a new tensor."""
    compute_dtype = compute_dtype_of(x.dtype)
    fill = fill_colour(fill, x.shape[1], x.device, compute_dtype)
    source, positions = pad_images(x, fill)
    out = torch.empty(x.shape, device=x.device, dtype=compute_dtype)
    return kernel(source, positions, argument, fill, out).to(x.dtype)


def pixel_centres(count, like):
    """Pixel centres 0.5, 1.5, ... as a row vector in `like`'s dtype and device."""
    return torch.arange(count, device=like.device, dtype=like.dtype).add_(0.5)


def is_whole(pixels):
    """True when every value of the `[B]` tensor is an integer (one host sync)."""
    return bool((pixels == torch.floor(pixels)).all())


@torch.no_grad()
def rotate(x, degrees, fill=0.):
    """Rotate counter-clockwise about the centre, as `img.rotate(degrees, resample=Image.BILINEAR)`; no autograd."""
    check_images(x)
    degrees = _per_image_vector(degrees, x, 'degrees')
    return warp_affine(x, rotation_matrix(degrees, x.shape[2], x.shape[3]), fill)


@torch.no_grad()
def shear_x(x, factor, fill=0.):
    """output(x, y) = input(x + factor*y, y), as PIL's AFFINE data (1, factor, 0, 0, 1, 0); no autograd."""
    check_images(x)
    factor = _per_image_vector(factor, x, 'factor').expand(x.shape[0])
    return _on_padded_copy(x, fill, shift_rows, factor[:, None] * pixel_centres(x.shape[2], factor))


@torch.no_grad()
def shear_y(x, factor, fill=0.):
    """output(x, y) = input(x, y + factor*x), as PIL's AFFINE data (1, 0, 0, factor, 1, 0); no autograd."""
    check_images(x)
    factor = _per_image_vector(factor, x, 'factor').expand(x.shape[0])
    return _on_padded_copy(x, fill, shift_columns, factor[:, None] * pixel_centres(x.shape[3], factor))


@torch.no_grad()
def translate_x(x, pixels, fill=0.):
    """output(x, y) = input(x + pixels, y), as PIL's AFFINE transform with data (1, 0, pixels, 0, 1, 0); no autograd."""
    check_images(x)
    pixels = _per_image_vector(pixels, x, 'pixels').expand(x.shape[0])
    if is_whole(pixels):  # AugMix's translations: a copy, no interpolation
        return _on_padded_copy(x, fill, translate_whole_columns, pixels)
    return _on_padded_copy(x, fill, shift_rows, pixels[:, None].expand(-1, x.shape[2]))


@torch.no_grad()
def translate_y(x, pixels, fill=0.):
    """output(x, y) = input(x, y + pixels), as PIL's AFFINE transform with data (1, 0, 0, 0, 1, pixels); no autograd."""
    check_images(x)
    pixels = _per_image_vector(pixels, x, 'pixels').expand(x.shape[0])
    if is_whole(pixels):  # AugMix's translations: a copy, no interpolation
        return _on_padded_copy(x, fill, translate_whole_rows, pixels)
    return _on_padded_copy(x, fill, shift_columns, pixels[:, None].expand(-1, x.shape[3]))
