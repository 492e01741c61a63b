"""AugMix on a batch: every image draws its own chains, ops, magnitudes and mixing weights.

Sampling is separate from application (kornia's split): `sample_augmix` draws an
`AugMixParams` of per-image tensors, `apply_augmix` replays it, and `augmix` does
validate -> sample -> apply. Ops and magnitudes follow the paper's code
(google-research/augmix `augmentations.py`, `augment_and_mix.py`).

The apply path: the B * width chains run as one batch, step by step. At each step the chains
are sorted by op, and every op's kernel runs once on all the chains that draw it (no loop
over images): pixel ops copy those chains' images into place and work there in place, the
geometric ops read them where they are (geometry.py: shears and translations are row copies,
only rotate resamples in 2-D). The images live in one buffer per call, the arena: fill colour,
the clean images, then one region per step for that step's results. A chain's latest image
stays where it was written, so a skipped step (past the chain's depth, or a geometric op with
argument 0) costs nothing. On CPU a chain is mixed into the output right after its last op,
while its image is still in cache, and the batch runs in blocks of a few MB of images that
reuse one arena and one set of work buffers (glibc hands out fresh pages for every large
allocation, and faulting them in costs more than the arithmetic).
"""
import math
import numbers
from dataclasses import dataclass, field
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
    # True for sample_augmix's draws, whose values are valid by construction: apply_augmix checks the
    # values of any other params (hand-made ones), which costs a host sync on a GPU.
    sampled: bool = field(default=False, repr=False)

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
        return AugMixParams(*(move(t) for t in (self.chain_weights, self.blend, self.op_index, self.op_argument)),
                            sampled=self.sampled)


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


# Application: `apply(source, positions, argument, fill, out, workspace)` writes the op applied to
# the images `source.images[positions]` (a geometry.PaddedImages) into `out`, with `argument` the
# `[N]` arguments of those images. Pixel ops copy their images into `out` and work there in place;
# the geometric ops read the source directly (see geometry.py: shifts along one axis are row
# copies, only rotate resamples in 2-D).

def _gather(source, positions, out):
    """Copy the images `source.images[positions]` into `out`."""
    return torch.index_select(source.images, 0, positions, out=out)


def _per_image(argument, out):
    """The `[N]` arguments as `[N, 1, 1, 1]` in the images' dtype, to broadcast over them."""
    return argument.to(out.dtype).view(-1, 1, 1, 1)


def _apply_autocontrast(source, positions, argument, fill, out, workspace):
    return ops.autocontrast_into(_gather(source, positions, out), out)


def _apply_equalize(source, positions, argument, fill, out, workspace):
    levels = workspace.empty('levels', out.shape, torch.int32)
    return ops.equalize_into(_gather(source, positions, out), out, levels)


def _apply_posterize(source, positions, bits, fill, out, workspace):
    return ops.posterize_into(_gather(source, positions, out), ops.posterize_step(_per_image(bits, out)), out)


def _apply_solarize(source, positions, threshold, fill, out, workspace):
    threshold = ops.solarize_pixel_threshold(_per_image(threshold, out), out.dtype)
    inverted = workspace.empty('inverted', out.shape, out.dtype)
    return ops.solarize_into(_gather(source, positions, out), threshold, out, inverted)


def _apply_rotate(source, positions, degrees, fill, out, workspace):
    matrix = geometry.rotation_matrix(degrees, out.shape[2], out.shape[3])
    return geometry.warp_images(source, positions, matrix, fill, out, workspace)


def _apply_shear_x(source, positions, factor, fill, out, workspace):
    shift = factor[:, None] * workspace.arange(out.shape[2], factor.dtype, offset=0.5)
    return geometry.shift_rows(source, positions, shift, fill, out, workspace)


def _apply_shear_y(source, positions, factor, fill, out, workspace):
    shift = factor[:, None] * workspace.arange(out.shape[3], factor.dtype, offset=0.5)
    return geometry.shift_columns(source, positions, shift, fill, out, workspace)


def _apply_translate_x(source, positions, pixels, fill, out, workspace):
    """Whole pixels, as sample_augmix draws them (`_op_groups` sends other values to the fractional kernel)."""
    return geometry.translate_whole_columns(source, positions, pixels, fill, out, workspace)


def _apply_translate_y(source, positions, pixels, fill, out, workspace):
    """Whole pixels, as sample_augmix draws them (`_op_groups` sends other values to the fractional kernel)."""
    return geometry.translate_whole_rows(source, positions, pixels, fill, out, workspace)


def _apply_fractional_translate_x(source, positions, pixels, fill, out, workspace):
    return geometry.shift_rows(source, positions, pixels[:, None].expand(-1, out.shape[2]), fill, out, workspace)


def _apply_fractional_translate_y(source, positions, pixels, fill, out, workspace):
    return geometry.shift_columns(source, positions, pixels[:, None].expand(-1, out.shape[3]), fill, out, workspace)


def _apply_color(source, positions, factor, fill, out, workspace):
    return ops.color_into(_gather(source, positions, out), _per_image(factor, out), out)


def _apply_contrast(source, positions, factor, fill, out, workspace):
    return ops.contrast_into(_gather(source, positions, out), _per_image(factor, out), out)


def _apply_brightness(source, positions, factor, fill, out, workspace):
    return ops.brightness_into(_gather(source, positions, out), _per_image(factor, out), out)


def _apply_sharpness(source, positions, factor, fill, out, workspace):
    # The smoothing reads neighbours, so the images go to a separate buffer first.
    gathered = _gather(source, positions, workspace.empty('gathered', out.shape, out.dtype))
    return ops.sharpness_into(gathered, _per_image(factor, out), out)


class AugMixOp(NamedTuple):
    """One row of the op table: how to apply the op and how its argument follows from the level.

    `apply(source, positions, argument, fill, out, workspace)` is described above. Geometric ops
    are the identity for an argument of 0 (rotate 0 degrees, translate 0 pixels), which skips them.
    """
    apply: Callable
    level_to_argument: Callable
    geometric: bool = False
    signed: bool = False


# Order of the paper's `augmentations_all`; its first 9 are `augmentations`.
OPS = {
    'autocontrast': AugMixOp(_apply_autocontrast, _no_argument),
    'equalize': AugMixOp(_apply_equalize, _no_argument),
    'posterize': AugMixOp(_apply_posterize, _posterize_bits),
    'rotate': AugMixOp(_apply_rotate, _rotate_degrees, geometric=True, signed=True),
    'solarize': AugMixOp(_apply_solarize, _solarize_threshold),
    'shear_x': AugMixOp(_apply_shear_x, _shear_factor, geometric=True, signed=True),
    'shear_y': AugMixOp(_apply_shear_y, _shear_factor, geometric=True, signed=True),
    'translate_x': AugMixOp(_apply_translate_x, _translate_x_pixels, geometric=True, signed=True),
    'translate_y': AugMixOp(_apply_translate_y, _translate_y_pixels, geometric=True, signed=True),
    'color': AugMixOp(_apply_color, _enhance_factor),
    'contrast': AugMixOp(_apply_contrast, _enhance_factor),
    'brightness': AugMixOp(_apply_brightness, _enhance_factor),
    'sharpness': AugMixOp(_apply_sharpness, _enhance_factor),
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


def check_augmix_args(severity, width, depth, alpha, all_ops=False, geometric=True):
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
    if not isinstance(geometric, bool):
        raise TypeError(f"geometric must be True (rotate, shear and translate included) or False (appearance "
                        f"ops only, every pixel stays in place), got {geometric!r}.")


def _check_generator(generator):
    """Raise TypeError unless `generator` is a torch.Generator or None."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None (torch's global RNG), "
                        f"got {generator!r} of type {type(generator).__name__}.")


def _check_size(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")


def _sampling_dtype(device):
    """float64, as the paper's numpy levels are, except on MPS, which has no float64."""
    return torch.float32 if device.type == 'mps' else torch.float64


def op_set(all_ops=False, geometric=True):
    """Indices into OP_NAMES of the ops chains draw from: the paper's 9 (or all 13), without rotate/shear/translate
    when `geometric=False` (views whose pixels stay where they were, for segmentation masks)."""
    names = OP_NAMES if all_ops else OP_NAMES[:PAPER_OP_COUNT]
    return tuple(OP_NAMES.index(name) for name in names if geometric or not OPS[name].geometric)


def sample_augmix(batch_size, image_height, image_width, severity=3, width=3, depth=-1, alpha=1.,
                  all_ops=False, generator=None, device=None, geometric=True):
    """Draw one AugMix configuration per image: chain weights, blend, chain depths, ops, magnitudes.

    Sampling runs on `generator`'s device when one is given (so a CPU generator gives the same
    draw whatever the images' device), else on `device` with torch's global RNG, which
    fastai's `set_seed` seeds; the result is moved to `device`. `geometric=False` draws from
    the appearance ops only (no rotate, shear or translate), so every pixel stays in place.
    """
    _check_size(batch_size, 'batch_size')
    _check_size(image_height, 'image_height')
    _check_size(image_width, 'image_width')
    check_augmix_args(severity, width, depth, alpha, all_ops, geometric)
    _check_generator(generator)
    device = torch.device('cpu') if device is None else torch.device(device)
    sample_device = generator.device if generator is not None else device
    steps = depth if depth > 0 else 3
    allowed = op_set(all_ops, geometric)
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
    op_index = torch.randint(0, len(allowed), step_shape, generator=generator, device=sample_device)
    # the paper's sample_level(severity): uniform in [0.1, severity)
    level = torch.rand(step_shape, generator=generator, **floats).mul_(severity - 0.1).add_(0.1)
    sign_draw = torch.rand(step_shape, generator=generator, **floats)
    kernels = _triton_kernels() if sample_device.type == 'cuda' else None
    if kernels is not None and not isinstance(kernels, Exception):  # one launch instead of ~60 small ones
        op_index, op_argument = kernels.sample_arguments(op_index, level, sign_draw, chain_depth, image_height,
                                                         image_width, geometric)
    else:
        op_index, op_argument = _arguments(op_index, level, sign_draw > 0.5, chain_depth, allowed, image_height,
                                           image_width)
    return AugMixParams(chain_weights, blend, op_index, op_argument, sampled=True).to(device)


def _arguments(slot, level, negate, chain_depth, allowed, image_height, image_width):
    """Op index and argument of every chain step from its drawn slot in `allowed`, level, sign and chain depth."""
    op_index = slot
    op_argument = torch.zeros_like(level)
    for position, index in enumerate(allowed):
        op = OPS[OP_NAMES[index]]
        argument = op.level_to_argument(level, image_height, image_width)
        if op.signed:
            argument = torch.where(negate, -argument, argument)
        op_argument = torch.where(slot == position, argument, op_argument)
        if position != index:
            op_index = torch.where(slot == position, index, op_index)
    past_depth = torch.arange(slot.shape[-1], device=slot.device) >= chain_depth[..., None]
    return op_index.masked_fill(past_depth, NO_OP), op_argument.masked_fill(past_depth, 0.)


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


def check_params(params, batch_size):
    """Raise unless `params` is an AugMixParams for `batch_size` images with consistent shapes and dtypes (no sync)."""
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
    if params.op_index.is_floating_point() or params.op_index.dtype == torch.bool or params.op_index.is_complex():
        raise TypeError(f"params.op_index must hold integers, got dtype {params.op_index.dtype}.")
    for name in ('chain_weights', 'blend', 'op_argument'):
        dtype = getattr(params, name).dtype
        if not getattr(params, name).is_floating_point():
            raise TypeError(f"params.{name} must be a float tensor, got dtype {dtype}.")
    devices = {t.device for t in (params.chain_weights, params.blend, params.op_index, params.op_argument)}
    if len(devices) > 1:
        raise ValueError(f"params' tensors must be on one device, got {sorted(map(str, devices))}; "
                         f"use params.to(device).")


def _value_problems(params):
    """What is wrong with the values of `params`, as (failed, message) pairs of device booleans and texts."""
    op = params.op_index
    argument = params.op_argument.double() if params.op_argument.device.type != 'mps' else params.op_argument
    weights = params.chain_weights
    blend = params.blend
    active = op != NO_OP

    def of(name):
        return op == OP_NAMES.index(name)

    posterize_bad = of('posterize') & ~((argument >= 1) & (argument <= 8) & (argument == torch.floor(argument)))
    solarize_bad = of('solarize') & ~((argument >= 0) & (argument <= 256 / 255))
    names = ', '.join(f'{index} = {name}' for index, name in enumerate(OP_NAMES))
    return [
        (~((op >= NO_OP) & (op < len(OP_NAMES)))).any(),
        f"params.op_index values must be {NO_OP} (no op) or in 0..{len(OP_NAMES) - 1} ({names}).",
        (active & ~torch.isfinite(argument)).any(),
        "params.op_argument must be finite for every op (NaN or inf found).",
        posterize_bad.any(),
        "params.op_argument of posterize must be whole numbers of bits in 1..8 (PIL's ImageOps.posterize range).",
        solarize_bad.any(),
        "params.op_argument of solarize must be a threshold in [0, 256/255] (PIL's T / 255; 256 inverts nothing).",
        (~torch.isfinite(weights) | (weights < 0)).any() | ((weights.sum(dim=1) - 1).abs() > 1e-3).any(),
        "params.chain_weights must be non-negative and sum to 1 per image (Dirichlet draws), else the mix "
        "leaves [0, 1].",
        (~((blend >= 0) & (blend <= 1))).any(),
        "params.blend must be in [0, 1] (the weight m of the mix against the clean image; NaN is not).",
    ]


def check_param_values(params):
    """Raise ValueError naming the first invalid value in hand-made `params` (one host sync on a GPU)."""
    problems = _value_problems(params)
    failed = torch.stack([flag.reshape(()) for flag in problems[0::2]]).tolist()
    for bad, message in zip(failed, problems[1::2]):
        if bad:
            raise ValueError(message)


# Backends: the grouped torch kernels below (any device), or the fused Triton kernels (triton_apply.py).
BACKENDS = ('torch', 'triton')
_TRITON = []  # the imported triton_apply module, or the exception importing it raised


def _triton_kernels():
    """The triton_apply module, or the exception that importing it raised (Triton is optional)."""
    if not _TRITON:
        try:
            from fastai_jsd import triton_apply
            _TRITON.append(triton_apply)
        except Exception as error:  # ImportError, or a broken install failing at import
            _TRITON.append(error)
    return _TRITON[0]


def _triton_interprets(kernels):
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1 when Triton was imported), so CPU tensors work."""
    return type(kernels._step_kernel).__name__ == 'InterpretedFunction'


def resolve_backend(backend, device):
    """The backend that runs images on `device`: 'triton' or 'torch'; ValueError for an impossible choice."""
    if backend is None:
        kernels = _triton_kernels() if torch.device(device).type == 'cuda' else None
        return 'triton' if kernels is not None and not isinstance(kernels, Exception) else 'torch'
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be 'torch' (any device), 'triton' (fused CUDA kernels) or None (Triton for "
                         f"CUDA tensors when it imports, else torch), got {backend!r}.")
    if backend == 'triton':
        kernels = _triton_kernels()
        if isinstance(kernels, Exception):
            raise ValueError(f"backend='triton' needs Triton, which did not import ({kernels!r}); install it (it "
                             f"ships with PyTorch's Linux CUDA wheels) or use backend='torch'.")
        if torch.device(device).type != 'cuda' and not _triton_interprets(kernels):
            raise ValueError(f"backend='triton' runs on CUDA tensors, but the images are on {device}. Use "
                             f"backend='torch' (or None to choose by device), or set the environment variable "
                             f"TRITON_INTERPRET=1 before Triton is imported to run the kernels on the CPU with "
                             f"Triton's interpreter (slow; meant for tests).")
    return backend


# Work is grouped by op: at each step the chains are sorted by group and every group's kernel runs
# once on all its chains. Translations by a fraction of a pixel (never drawn by sample_augmix, but
# valid in hand-made params) take the interpolating kernels; a geometric op with argument 0, and
# every step past a chain's depth, leaves the chain where it is: no work and no copy.
_FRACTIONAL_TRANSLATE_X = len(OP_NAMES)
_FRACTIONAL_TRANSLATE_Y = len(OP_NAMES) + 1
_UNCHANGED = len(OP_NAMES) + 2
_GROUP_COUNT = _UNCHANGED + 1
_APPLY_OF_GROUP = tuple(OPS[name].apply for name in OP_NAMES) + (_apply_fractional_translate_x,
                                                                 _apply_fractional_translate_y)
# On CPU the batch runs in blocks whose chain images take at most this many bytes: a 32 px batch
# of 256 in one block (per-kernel overhead dominates there), a few 224 px images per block (the
# arena of a block stays in cache). Measured: 4 to 16 MB are within noise at 224 px.
_CPU_BLOCK_BYTES = 10 * 2 ** 20


def _op_groups(op_index, argument):
    """The group of every chain step: its op, a fractional translation, or `_UNCHANGED`."""
    device = op_index.device
    geometric = torch.tensor([OPS[name].geometric for name in OP_NAMES], device=device)
    known = op_index.clamp(min=0)
    unchanged = (op_index == NO_OP) | (geometric[known] & (argument == 0))
    fractional = argument != torch.floor(argument)
    group = torch.where((op_index == OP_NAMES.index('translate_x')) & fractional, _FRACTIONAL_TRANSLATE_X, op_index)
    group = torch.where((op_index == OP_NAMES.index('translate_y')) & fractional, _FRACTIONAL_TRANSLATE_Y, group)
    return group.masked_fill_(unchanged, _UNCHANGED)


def _mixes_early(device):
    """Whether chains are mixed in at their last op (CPU) rather than after all steps.

    On CPU the image is then still in cache, and index_add_ is sequential, so the sum is the
    same for any block size. Elsewhere the chains are mixed at the end, chain after chain:
    index_add_ with repeated indices is not deterministic on CUDA.
    """
    return device.type == 'cpu'


def _step_keys(group):
    """Sort keys of the chain steps `[..., steps]`: 2 * group, plus 1 at a chain's last op."""
    steps = group.shape[-1]
    active = group != _UNCHANGED
    step = torch.arange(steps, device=group.device)
    last = torch.where(active, step, -1).amax(dim=-1, keepdim=True)
    return 2 * group + (step == last).long()


def _block_size(x, width):
    """Images per block: the whole batch, except on CPU (see _CPU_BLOCK_BYTES)."""
    if x.device.type != 'cpu':
        return x.shape[0]
    chain_bytes = width * x[0].numel() * x.element_size()
    return max(1, min(x.shape[0], _CPU_BLOCK_BYTES // max(chain_bytes, 1)))


class _Arena(NamedTuple):
    """Where one block's chain images live: see `_arena_slots`."""
    images: Tensor  # [slots, C, H, W]
    pad: int        # fill slots at the start, and gap slots after every region


def _arena_slots(block_images, step_counts, pad):
    """Image slots a block needs: fill, its images, then each step's results, every region followed by a gap.

    Slot 0 (to `pad`) holds the fill colour, the source of the rows translate_y uncovers. The
    gaps give the row windows of the shift kernels finite padding to overhang into, and keep
    every step's output out of the storage its kernels read.
    """
    active = [sum(counts[:2 * _UNCHANGED]) for counts in step_counts]
    return pad + block_images + pad + sum(count + pad for count in active if count)


def _clear_gap(arena, slot):
    """Make the ends of the gap after `slot` finite: a row window overhangs an image by at most width + 1 elements."""
    flat = arena.images.view(arena.images.shape[0], -1)[slot:slot + arena.pad].view(-1)
    edge = min(flat.numel(), arena.images.shape[-1] + 2)
    flat[:edge] = 0
    flat[-edge:] = 0


def _apply_block(x, key, argument, mix_weight, blend, step_counts, fill, arena, workspace, out):
    """Write the AugMix of the images `x` (a block) into `out`: chains run step by step, grouped by op.

    `key` and `argument` are `[rows, steps]` (row = image * width + chain; key = 2 * group + 1
    at a chain's last op, see `_step_keys`), `mix_weight` is `[images, width]` (m * w_i) and
    `step_counts[s][k]` counts the rows of key k at step s. Every chain row keeps the arena slot
    of its latest image; a step writes its results to a new region of the arena.
    """
    batch = x.shape[0]
    rows, steps = key.shape
    width = rows // batch
    pad = arena.pad
    images = arena.images
    device = x.device
    images[pad:pad + batch] = x
    _clear_gap(arena, pad + batch)
    position = torch.arange(pad, pad + batch, device=device).repeat_interleave(width)
    mix_early = _mixes_early(device)
    weight_of_row = mix_weight.reshape(-1)
    image_of_row = torch.arange(batch, device=device).repeat_interleave(width)
    keep_clean = 1 - blend
    if mix_early:  # chains that no op changes mix in the clean image
        untouched = (key == 2 * _UNCHANGED).all(dim=1).view(batch, width)
        keep_clean = keep_clean + (mix_weight * untouched).sum(dim=1)
    torch.mul(images[pad:pad + batch], keep_clean.view(-1, 1, 1, 1), out=out)
    region = pad + batch + pad
    # _UNCHANGED is the largest group, so every step's active rows come first, sorted by group,
    # and within a group the chains that end there come last.
    orders = torch.argsort(key, dim=0, stable=True)
    for step in range(steps):
        counts = step_counts[step][:2 * _UNCHANGED]
        active = sum(counts)
        if not active:
            continue
        order = orders[:active, step]
        source = geometry.PaddedImages(images[:region])
        source_position = position[order]
        step_argument = argument[order, step]
        if mix_early:
            step_weight = weight_of_row[order].view(-1, 1, 1, 1)
            step_image = image_of_row[order]
        start = 0
        for group_id in range(_UNCHANGED):
            continuing, ending = counts[2 * group_id], counts[2 * group_id + 1]
            stop = start + continuing + ending
            if stop == start:
                continue
            result = images[region + start:region + stop]
            _APPLY_OF_GROUP[group_id](source, source_position[start:stop], step_argument[start:stop], fill, result,
                                      workspace)
            if mix_early and ending:
                ending_rows = slice(start + continuing, stop)
                finished = result[continuing:].mul_(step_weight[ending_rows])
                out.index_add_(0, step_image[ending_rows], finished)
            start = stop
        position[order] = torch.arange(region, region + active, device=device)
        region += active
        _clear_gap(arena, region)
        region += pad
    if not mix_early:
        # The paper's mix, chain after chain in a fixed order; elementwise rather than bmm, which TF32 may round.
        chain_image = workspace.empty('chain_image', x.shape, images.dtype)
        position = position.view(batch, width)
        for chain in range(width):
            torch.index_select(images, 0, position[:, chain], out=chain_image)
            out.addcmul_(chain_image, mix_weight[:, chain].view(-1, 1, 1, 1))
    return out


def apply_augmix(x, params, fill=0., backend=None):
    """Apply one AugMix draw to `x` (float `[B, C, H, W]` in [0, 1]); a new tensor, `x` is untouched.

    mixed = (1 - m) * x + m * sum_i w_i * chain_i(x), the paper's mixing, with every image's
    own m, w, ops and arguments from `params`. `backend`: 'torch' (the grouped kernels of this
    module, any device), 'triton' (fused CUDA kernels, triton_apply.py) or None ('triton' for CUDA
    tensors when Triton imports, else 'torch'); both give the same pixels to within 1/255.
    Half-precision images are augmented in float32. Augmentation is not differentiable: it runs
    without autograd, and the result never requires grad. The values of params that
    `sample_augmix` did not draw are checked first (one host sync on a GPU).
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
        return _triton_kernels().apply_augmix(x, params, fill.reshape(-1).contiguous())
    return _apply_torch(x, params, fill)


def _apply_torch(x, params, fill):
    """The grouped, cache-blocked apply: B * width chains as one batch, grouped by op (module docs).

    On CPU in blocks of a few MB of images (see _CPU_BLOCK_BYTES), never image by image.
    """
    batch, channels, height, width = x.shape
    dtype = fill.dtype
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    chains = params.width
    steps = params.steps
    blend = params.blend.to(dtype)
    mix_weight = params.chain_weights.to(dtype) * blend[:, None]
    key = _step_keys(_op_groups(params.op_index, params.op_argument)).flatten(0, 1)
    argument = params.op_argument.flatten(0, 1)
    block = _block_size(x, chains)
    block_of_row = torch.arange(key.shape[0], device=x.device) // (block * chains)
    key_count = 2 * _GROUP_COUNT
    block_step_key = (block_of_row[:, None] * steps + torch.arange(steps, device=x.device)) * key_count + key
    block_count = -(-batch // block)
    counts = torch.bincount(block_step_key.flatten(), minlength=block_count * steps * key_count)
    counts = counts.view(block_count, steps, key_count).tolist()  # the one host sync

    pad = geometry.padding_slots(channels, height, width)
    slots = max(_arena_slots(min(block, batch - first), counts[index], pad)
                for index, first in enumerate(range(0, batch, block)))
    workspace = geometry.Workspace(x.device)
    arena = _Arena(workspace.empty('arena', (slots, channels, height, width), dtype), pad)
    arena.images[:pad] = fill
    mixed = out if out.dtype == dtype else workspace.empty('mixed', out.shape, dtype)
    for index, first in enumerate(range(0, batch, block)):
        last = min(first + block, batch)
        rows = slice(first * chains, last * chains)
        _apply_block(x[first:last], key[rows], argument[rows], mix_weight[first:last], blend[first:last],
                     counts[index], fill, arena, workspace, mixed[first:last])
    return out if mixed is out else out.copy_(mixed)


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
