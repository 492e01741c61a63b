"""AugMix's draws: the paper's op table, its levels -> arguments, and `sample_augmix`.

Sampling is separate from application (kornia's split): `sample_augmix` draws an `AugMixParams` of
per-image tensors, which either backend (torch_apply.py, triton_apply.py) replays. Ops and magnitudes
follow the paper's code (google-research/augmix `augmentations.py`, `augment_and_mix.py`).
"""
import numbers
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fastai_jsd.augment.devices import move
from fastai_jsd.augment.backends import resolve_backend, triton_kernels

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
        """The same draw with every tensor on `device` (float64 becomes float32 on MPS, which lacks it).

        Copies from the CPU are queued without waiting for the GPU (`devices.move`), so a draw made on
        the CPU (a CPU generator, `sample_augmix`'s default device) costs a CUDA batch no host sync.
        """
        device = torch.device(device)

        def moved(t):
            dtype = torch.float32 if device.type == 'mps' and t.dtype == torch.float64 else None
            return move(t, device, dtype)
        return AugMixParams(*(moved(t) for t in (self.chain_weights, self.blend, self.op_index, self.op_argument)),
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


class AugMixOp(NamedTuple):
    """One row of the op table: how the op's argument follows from the level, and how it is drawn.

    Geometric ops move pixels (so `geometric=False` leaves them out), are the identity for an argument
    of 0 (rotate 0 degrees, translate 0 pixels), which both backends skip, and get a random sign.
    """
    level_to_argument: Callable
    geometric: bool = False
    signed: bool = False


# Order of the paper's `augmentations_all`; its first 9 are `augmentations`.
OPS = {
    'autocontrast': AugMixOp(_no_argument),
    'equalize': AugMixOp(_no_argument),
    'posterize': AugMixOp(_posterize_bits),
    'rotate': AugMixOp(_rotate_degrees, geometric=True, signed=True),
    'solarize': AugMixOp(_solarize_threshold),
    'shear_x': AugMixOp(_shear_factor, geometric=True, signed=True),
    'shear_y': AugMixOp(_shear_factor, geometric=True, signed=True),
    'translate_x': AugMixOp(_translate_x_pixels, geometric=True, signed=True),
    'translate_y': AugMixOp(_translate_y_pixels, geometric=True, signed=True),
    'color': AugMixOp(_enhance_factor),
    'contrast': AugMixOp(_enhance_factor),
    'brightness': AugMixOp(_enhance_factor),
    'sharpness': AugMixOp(_enhance_factor),
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
    fastai's `set_seed` seeds; the result is queued to `device` (from the CPU without waiting for
    the GPU). `geometric=False` draws from the appearance ops only (no rotate, shear or
    translate), so every pixel stays in place.
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
    if resolve_backend(None, sample_device) == 'triton':  # one launch instead of ~60 small ones
        op_index, op_argument = triton_kernels().sample_arguments(op_index, level, sign_draw, chain_depth, image_height,
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
