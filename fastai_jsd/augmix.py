"""AugMix on a batch: every image draws its own chains, ops, magnitudes and mixing weights.

Sampling is separate from application (kornia's split): `sample_augmix` draws an
`AugMixParams` of per-image tensors, `apply_augmix` replays it, and `augmix` does
validate -> sample -> apply. Ops and magnitudes follow the paper's code
(google-research/augmix `augmentations.py`, `augment_and_mix.py`).
"""
import numbers
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastai_jsd import geometry, ops
from fastai_jsd.ops import check_images

NO_OP = -1  # op index of the steps after a chain's depth: the image passes through unchanged


@dataclass(eq=False)  # tensors have no single truth value to compare by
class AugMixParams:
    """One AugMix draw for a batch of B images with `width` chains of at most `steps` ops.

    `op_index` indexes `OP_NAMES` (`NO_OP` past a chain's depth); `op_argument` is what the
    kernel receives (posterize bits, solarize threshold on the 0..1 scale, signed degrees,
    shear factor or pixels, enhance factor; 0 where unused). `sample_augmix` returns float64
    tensors (float32 on MPS), so a threshold T / 255 rounds exactly like the images' pixels.
    """
    chain_weights: Tensor  # [B, width], Dirichlet(alpha): how the chains are mixed
    blend: Tensor          # [B], Beta(alpha, alpha): weight m of the mix against the clean image
    op_index: Tensor       # [B, width, steps] int64
    op_argument: Tensor    # [B, width, steps]

    @property
    def batch_size(self): return self.op_index.shape[0]

    @property
    def width(self): return self.op_index.shape[1]

    @property
    def steps(self): return self.op_index.shape[2]

    def to(self, device):
        """The same draw with every tensor on `device` (float64 becomes float32 on MPS, which lacks it)."""
        device = torch.device(device)
        def move(t):
            if device.type == 'mps' and t.dtype == torch.float64:
                t = t.float()
            return t.to(device)
        return AugMixParams(*(move(t) for t in (self.chain_weights, self.blend, self.op_index, self.op_argument)))


# Level -> argument, as in the paper's augmentations.py: int_parameter(level, maxval) is
# int(level * maxval / 10), float_parameter is level * maxval / 10. Levels are positive, so
# floor is Python's int(). The random sign of the geometric ops is drawn separately.

def _no_argument(level, height, width): return torch.zeros_like(level)
def _posterize_bits(level, height, width): return 4 - torch.floor(level * 4 / 10)
def _rotate_degrees(level, height, width): return torch.floor(level * 30 / 10)
def _shear_factor(level, height, width): return level * 0.3 / 10
def _translate_x_pixels(level, height, width): return torch.floor(level * (width / 3) / 10)
def _translate_y_pixels(level, height, width): return torch.floor(level * (height / 3) / 10)
def _enhance_factor(level, height, width): return level * 1.8 / 10 + 0.1


def _solarize_threshold(level, height, width):
    # PIL's threshold 256 - int(level * 256 / 10) on 0..255, as the 0..1 threshold of ops.solarize
    return (256 - torch.floor(level * 256 / 10)) / 255


def _autocontrast(x, argument): return ops.autocontrast(x)
def _equalize(x, argument): return ops.equalize(x)
def _shear_x_matrix(factor, height, width): return geometry.shear_x_matrix(factor)
def _shear_y_matrix(factor, height, width): return geometry.shear_y_matrix(factor)
def _translate_x_matrix(pixels, height, width): return geometry.translate_x_matrix(pixels)
def _translate_y_matrix(pixels, height, width): return geometry.translate_y_matrix(pixels)


class AugMixOp(NamedTuple):
    """One row of the op table: how to apply the op and how its argument follows from the level.

    `function` is a kernel `(x, argument) -> x` for pixel ops, or a matrix builder
    `(argument, height, width) -> [N, 3, 3]` for geometric ops, which share one warp per step.
    """
    function: Callable
    level_to_argument: Callable
    geometric: bool = False
    signed: bool = False


# Order of the paper's `augmentations_all`; its first 9 are `augmentations`.
OPS = {
    'autocontrast': AugMixOp(_autocontrast, _no_argument),
    'equalize': AugMixOp(_equalize, _no_argument),
    'posterize': AugMixOp(ops.posterize, _posterize_bits),
    'rotate': AugMixOp(geometry.rotation_matrix, _rotate_degrees, geometric=True, signed=True),
    'solarize': AugMixOp(ops.solarize, _solarize_threshold),
    'shear_x': AugMixOp(_shear_x_matrix, _shear_factor, geometric=True, signed=True),
    'shear_y': AugMixOp(_shear_y_matrix, _shear_factor, geometric=True, signed=True),
    'translate_x': AugMixOp(_translate_x_matrix, _translate_x_pixels, geometric=True, signed=True),
    'translate_y': AugMixOp(_translate_y_matrix, _translate_y_pixels, geometric=True, signed=True),
    'color': AugMixOp(ops.color, _enhance_factor),
    'contrast': AugMixOp(ops.contrast, _enhance_factor),
    'brightness': AugMixOp(ops.brightness, _enhance_factor),
    'sharpness': AugMixOp(ops.sharpness, _enhance_factor),
}
OP_NAMES = tuple(OPS)
PAPER_OP_COUNT = 9  # `augmentations` of the paper; `all_ops=True` adds the 4 ImageNet-C overlaps


def _check_int(value, name, low, high=None, allowed=()):
    """Raise unless `value` is an int in [low, high] (or one of `allowed`)."""
    valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if valid and (value in allowed or (value >= low and (high is None or value <= high))):
        return
    bounds = f"in {low}..{high}" if high is not None else f">= {low}"
    extra = f" or {' or '.join(map(str, allowed))}" if allowed else ""
    raise ValueError(f"{name} must be an integer {bounds}{extra}, got {value!r}.")


def check_augmix_args(severity, width, depth, alpha, all_ops=False):
    """Raise ValueError/TypeError naming the first AugMix hyper-parameter that is out of range."""
    if isinstance(severity, bool) or not isinstance(severity, numbers.Real) or not 1 <= severity <= 10:
        raise ValueError(f"severity must be a number in 1..10 (the paper's level scale; 3 is its default), "
                         f"got {severity!r}.")
    _check_int(width, 'width (the number of chains)', 1)
    _check_int(depth, 'depth (ops per chain; -1 draws 1..3 per chain)', 1, 10, allowed=(-1,))
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < float('inf'):
        raise ValueError(f"alpha (the Dirichlet and Beta concentration) must be a finite number > 0, "
                         f"got {alpha!r}.")
    if not isinstance(all_ops, bool):
        raise TypeError(f"all_ops must be True or False, got {all_ops!r}.")


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None (torch's global RNG), "
                        f"got {generator!r} of type {type(generator).__name__}.")


def _check_size(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def _sampling_dtype(device):
    """float64, as the paper's numpy levels are, except on MPS, which has no float64."""
    return torch.float32 if device.type == 'mps' else torch.float64


def sample_augmix(batch_size, image_height, image_width, severity=3, width=3, depth=-1, alpha=1.,
                  all_ops=False, generator=None, device=None):
    """Draw one AugMix configuration per image: chain weights, blend, chain depths, ops, magnitudes.

    Sampling runs on `generator`'s device when one is given (so a CPU generator gives the same
    draw whatever the images' device), else on `device` with torch's global RNG, which
    fastai's `set_seed` seeds; the result is moved to `device`.
    """
    _check_size(batch_size, 'batch_size')
    _check_size(image_height, 'image_height')
    _check_size(image_width, 'image_width')
    check_augmix_args(severity, width, depth, alpha, all_ops)
    _check_generator(generator)
    device = torch.device('cpu') if device is None else torch.device(device)
    sample_device = generator.device if generator is not None else device
    steps = depth if depth > 0 else 3
    op_count = len(OP_NAMES) if all_ops else PAPER_OP_COUNT
    chain_shape = (batch_size, width)
    step_shape = (batch_size, width, steps)

    dtype = _sampling_dtype(sample_device)
    floats = dict(dtype=dtype, device=sample_device)

    # torchvision's AugMix samples its Dirichlet and Beta weights the same way; the public
    # torch.distributions samplers accept no generator. Beta(a, a) is Dirichlet((a, a))[0].
    chain_weights = torch._sample_dirichlet(torch.full(chain_shape, float(alpha), **floats), generator=generator)
    blend = torch._sample_dirichlet(torch.full((batch_size, 2), float(alpha), **floats), generator=generator)[:, 0]
    if depth > 0:
        chain_depth = torch.full(chain_shape, depth, device=sample_device)
    else:  # the paper's np.random.randint(1, 4)
        chain_depth = torch.randint(1, 4, chain_shape, generator=generator, device=sample_device)
    op_index = torch.randint(0, op_count, step_shape, generator=generator, device=sample_device)
    # the paper's sample_level(severity): uniform in [0.1, severity)
    level = torch.rand(step_shape, generator=generator, **floats).mul_(severity - 0.1).add_(0.1)
    negate = torch.rand(step_shape, generator=generator, **floats) > 0.5

    op_argument = torch.zeros(step_shape, **floats)
    for index, name in enumerate(OP_NAMES[:op_count]):
        op = OPS[name]
        argument = op.level_to_argument(level, image_height, image_width)
        if op.signed:
            argument = torch.where(negate, -argument, argument)
        op_argument = torch.where(op_index == index, argument, op_argument)
    past_depth = torch.arange(steps, device=sample_device) >= chain_depth[..., None]
    op_index = op_index.masked_fill(past_depth, NO_OP)
    op_argument = op_argument.masked_fill(past_depth, 0.)
    return AugMixParams(chain_weights, blend, op_index, op_argument).to(device)


def check_value_range(x, name='x'):
    """Raise ValueError unless `x` looks like pixels in [0, 1] (normalized images do not)."""
    if x.numel() == 0:
        return
    low, high = torch.aminmax(x)
    low, high = low.item(), high.item()
    if not (low >= -0.01 and high <= 1.01):  # written so that NaN fails too
        raise ValueError(f"{name} must hold pixel values in [0, 1], got values in [{low:.3g}, {high:.3g}]; "
                         f"the images look normalized (or 0..255): decode them to [0, 1] first, e.g. "
                         f"with fastai's `Normalize.decode` or `/ 255`.")


def fill_colour(fill, channels, device, dtype):
    """`fill` (a number, or 1 or C values, as list, tuple or tensor) as a `[1, C, 1, 1]` tensor."""
    if isinstance(fill, Tensor):
        values = fill
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"fill must hold real numbers, got a tensor of dtype {values.dtype}.")
    elif isinstance(fill, numbers.Real) and not isinstance(fill, bool):
        values = torch.tensor([float(fill)])
    elif isinstance(fill, (list, tuple)) and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                 for v in fill):
        values = torch.tensor([float(v) for v in fill])
    else:
        raise TypeError(f"fill must be a number or a sequence of {channels} numbers (a colour in [0, 1] for "
                        f"the area rotate, shear and translate uncover), got {fill!r}.")
    if values.numel() not in (1, channels):
        raise ValueError(f"fill must hold 1 or C = {channels} values (one per channel), got {fill!r}.")
    return values.reshape(1, -1, 1, 1).to(device=device, dtype=dtype).expand(1, channels, 1, 1)


def check_params(params, batch_size):
    """Raise unless `params` is an AugMixParams for `batch_size` images with consistent shapes."""
    if not isinstance(params, AugMixParams):
        raise TypeError(f"params must be an AugMixParams (from sample_augmix), got {type(params).__name__}.")
    shape = tuple(params.op_index.shape)
    if len(shape) != 3 or shape[0] != batch_size or shape[1] < 1 or shape[2] < 1:
        raise ValueError(f"params.op_index must have shape [B, width, steps] with B = {batch_size} (the "
                         f"images' batch size) and width, steps >= 1, got {shape}.")
    expected = {'chain_weights': shape[:2], 'blend': shape[:1], 'op_argument': shape}
    for name, want in expected.items():
        got = tuple(getattr(params, name).shape)
        if got != want:
            raise ValueError(f"params.{name} must have shape {want} to match op_index {shape}, got {got}.")
    if params.op_index.is_floating_point() or params.op_index.dtype == torch.bool:
        raise TypeError(f"params.op_index must hold integers, got dtype {params.op_index.dtype}.")
    if params.op_index.numel() and not (
            (params.op_index >= NO_OP) & (params.op_index < len(OP_NAMES))).all():
        raise ValueError(f"params.op_index values must be {NO_OP} (no op) or in 0..{len(OP_NAMES) - 1} "
                         f"(indices into OP_NAMES).")


# Work is grouped by op: each pixel op is one group, all geometric ops form one group (one
# `warp_affine` per step, with each image's own matrix), and chains past their depth are done.
_PIXEL_OPS = tuple(i for i, name in enumerate(OP_NAMES) if not OPS[name].geometric)
_GEOMETRIC_GROUP = len(_PIXEL_OPS)
# A geometric op with argument 0 (rotate 0 degrees, translate 0 pixels: common at small sizes,
# where int(level * W / 30) is often 0) is the identity: its rows skip the warp.
_UNCHANGED_GROUP = _GEOMETRIC_GROUP + 1
_DONE_GROUP = _UNCHANGED_GROUP + 1
# Indexed by op index + 1, so that NO_OP (-1) maps to the done group.
_GROUP_OF_OP = (_DONE_GROUP,) + tuple(_PIXEL_OPS.index(i) if i in _PIXEL_OPS else _GEOMETRIC_GROUP
                                      for i in range(len(OP_NAMES)))
# glibc serves allocations above 32 MB (its largest mmap threshold) with fresh pages every
# time, and faulting them in costs several times the arithmetic of a pass over them. On CPU
# the batch therefore runs in blocks whose chain images stay well below that, so every
# buffer and kernel output is recycled from the heap; smaller blocks also stay in cache.
_CPU_BLOCK_BYTES = 12 * 2 ** 20


def _geometric_matrices(op_index, argument, height, width):
    """Each row's `[N, 3, 3]` PIL matrix for its geometric op (identity for rows with another op)."""
    matrix = None
    for index, name in enumerate(OP_NAMES):
        op = OPS[name]
        if not op.geometric:
            continue
        op_matrix = op.function(argument, height, width)
        if matrix is None:
            matrix = torch.eye(3, dtype=op_matrix.dtype, device=op_matrix.device).expand_as(op_matrix)
        matrix = torch.where((op_index == index)[:, None, None], op_matrix, matrix)
    return matrix


def _apply_op_group(block, group_id, op_index, argument, fill):
    """Run one group's op on its contiguous block of chain images (a new tensor, or the block if unchanged)."""
    height, width = block.shape[-2:]
    if group_id == _UNCHANGED_GROUP:
        return block
    if group_id == _GEOMETRIC_GROUP:
        return geometry.warp_affine(block, _geometric_matrices(op_index, argument, height, width), fill)
    return OPS[OP_NAMES[_PIXEL_OPS[group_id]]].function(block, argument)


def _apply_block(x, op_index, argument, mix_weight, fill, out):
    """Add sum_i mix_weight_i * chain_i(x) of the images `x` to `out` (mix_weight [rows] is m * w_i).

    The rows (image-major: row = image * width + chain) run as one batch. At each step they
    are sorted by op group, and within a group the chains that end at this step come last, so
    every kernel runs once on a contiguous block, its continuing rows are copied straight to
    their place in the next step's buffer and its finished rows to the finished chains.
    Two buffers take turns as a step's input and output; nothing else is allocated per step.
    """
    rows, steps = op_index.shape
    batch = x.shape[0]
    chains = rows // batch
    device = x.device
    group = torch.tensor(_GROUP_OF_OP, device=device)[op_index + 1]
    group = group.masked_fill_((group == _GEOMETRIC_GROUP) & (argument == 0), _UNCHANGED_GROUP)
    ending = torch.ones_like(group, dtype=torch.bool)
    ending[:, :-1] = group[:, 1:] == _DONE_GROUP
    key = group * 2 + ending.long()  # group g: 2g continues, 2g + 1 ends at this step; done chains last
    key_count = 2 * (_DONE_GROUP + 1)
    counts = torch.bincount((key + torch.arange(steps, device=device) * key_count).flatten(),
                            minlength=steps * key_count)
    counts = counts.view(steps, key_count).tolist()  # the one host sync
    alive = [rows - step_counts[-1] - step_counts[-2] for step_counts in counts]
    orders = [torch.argsort(key[:, step], stable=True)[:alive[step]] for step in range(steps)]

    finished = x.new_empty((rows,) + x.shape[1:])
    buffers = (torch.index_select(x, 0, orders[0] // chains), x.new_empty((max(alive[1:], default=0),) + x.shape[1:]))
    for step in range(steps):
        order = orders[step]
        if step + 1 < steps:
            position = torch.empty(rows, dtype=torch.long, device=device)
            position[orders[step + 1]] = torch.arange(alive[step + 1], device=device)
        step_op = op_index[order, step]
        step_argument = argument[order, step]
        start = 0
        for group_id in range(_DONE_GROUP):
            continuing, ends = counts[step][2 * group_id], counts[step][2 * group_id + 1]
            stop = start + continuing + ends
            if stop == start:
                continue
            result = _apply_op_group(buffers[step % 2][start:stop], group_id,
                                     step_op[start:stop], step_argument[start:stop], fill)
            chain_rows = order[start:stop]
            if continuing:
                buffers[(step + 1) % 2].index_copy_(0, position[chain_rows[:continuing]], result[:continuing])
            if ends:
                finished.index_copy_(0, chain_rows[continuing:], result[continuing:])
            start = stop
    # Unique destinations and a fixed summation order keep the result bitwise reproducible on
    # CUDA too (index_add_ would race); elementwise rather than bmm, which TF32 may round.
    finished = finished.view(batch, chains, *x.shape[1:])
    mix_weight = mix_weight.view(batch, chains, 1, 1, 1)
    for chain in range(chains):
        out.addcmul_(finished[:, chain], mix_weight[:, chain])
    return out


def _block_size(x, width):
    """Images per block: the whole batch, except on CPU (see _CPU_BLOCK_BYTES)."""
    if x.device.type != 'cpu':
        return x.shape[0]
    chain_bytes = width * x[0].numel() * x.element_size()
    return max(1, min(x.shape[0], _CPU_BLOCK_BYTES // max(chain_bytes, 1)))


def apply_augmix(x, params, fill=0.):
    """Apply one AugMix draw to `x` (float `[B, C, H, W]` in [0, 1]); a new tensor, `x` is untouched.

    mixed = (1 - m) * x + m * sum_i w_i * chain_i(x), the paper's mixing, with every image's
    own m, w, ops and arguments from `params`. The B * width chains run as one batch, grouped
    by op; on CPU in blocks of a few MB of images (see _CPU_BLOCK_BYTES), never image by image.
    """
    check_images(x)
    batch, channels, height, width = x.shape
    check_params(params, batch)
    fill = fill_colour(fill, channels, x.device, x.dtype)
    params = params.to(x.device)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    x = x.contiguous()
    blend = params.blend.to(x.dtype)
    torch.mul(x, (1 - blend).view(-1, 1, 1, 1), out=out)
    mix_weight = (params.chain_weights.to(x.dtype) * blend[:, None]).flatten()
    op_index = params.op_index.flatten(0, 1)
    argument = params.op_argument.flatten(0, 1)
    chains = params.width
    block = _block_size(x, chains)
    for first in range(0, batch, block):
        last = min(first + block, batch)
        _apply_block(x[first:last], op_index[first * chains:last * chains], argument[first * chains:last * chains],
                     mix_weight[first * chains:last * chains], fill, out[first:last])
    return out


def augmix(x, severity=3, width=3, depth=-1, alpha=1., all_ops=False, fill=0., generator=None):
    """AugMix (Hendrycks et al. 2020) of every image of `x` (float `[B, C, H, W]` in [0, 1]), independently.

    Every image draws its own chain weights, blend weight, chain depths, ops and magnitudes,
    unlike torchvision's batched AugMix, which gives the whole batch one op chain. Same
    `generator` seed, same output; with `generator=None` torch's global RNG is used, which
    fastai's `set_seed` seeds. Returns a new tensor of `x`'s shape, dtype and device.
    """
    check_images(x)
    check_augmix_args(severity, width, depth, alpha, all_ops)
    _check_generator(generator)
    fill = fill_colour(fill, x.shape[1], x.device, x.dtype)
    check_value_range(x)
    params = sample_augmix(x.shape[0], x.shape[2], x.shape[3], severity=severity, width=width, depth=depth,
                           alpha=alpha, all_ops=all_ops, generator=generator, device=x.device)
    return apply_augmix(x, params, fill)
