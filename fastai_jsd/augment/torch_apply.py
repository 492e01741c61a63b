"""The grouped, cache-blocked AugMix apply: torch kernels on any device (the CPU path, a fallback elsewhere).

The B * width chains run as one batch, step by step. At each step the chains
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
from typing import NamedTuple

import torch
from torch import Tensor

from fastai_jsd.augment import geometry, ops
from fastai_jsd.augment.devices import move
from fastai_jsd.augment.sampling import NO_OP, OP_NAMES, OPS

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

# The kernel of every op, in OP_NAMES order (the op table itself is in sampling.py).
APPLY = {
    'autocontrast': _apply_autocontrast,
    'equalize': _apply_equalize,
    'posterize': _apply_posterize,
    'rotate': _apply_rotate,
    'solarize': _apply_solarize,
    'shear_x': _apply_shear_x,
    'shear_y': _apply_shear_y,
    'translate_x': _apply_translate_x,
    'translate_y': _apply_translate_y,
    'color': _apply_color,
    'contrast': _apply_contrast,
    'brightness': _apply_brightness,
    'sharpness': _apply_sharpness,
}


# Work is grouped by op: at each step the chains are sorted by group and every group's kernel runs
# once on all its chains. Translations by a fraction of a pixel (never drawn by sample_augmix, but
# valid in hand-made params) take the interpolating kernels; a geometric op with argument 0, and
# every step past a chain's depth, leaves the chain where it is: no work and no copy.
_FRACTIONAL_TRANSLATE_X = len(OP_NAMES)
_FRACTIONAL_TRANSLATE_Y = len(OP_NAMES) + 1
_UNCHANGED = len(OP_NAMES) + 2
_GROUP_COUNT = _UNCHANGED + 1
_APPLY_OF_GROUP = tuple(APPLY[name] for name in OP_NAMES) + (_apply_fractional_translate_x,
                                                                 _apply_fractional_translate_y)
# On CPU the batch runs in blocks whose chain images take at most this many bytes: a 32 px batch
# of 256 in one block (per-kernel overhead dominates there), a few 224 px images per block (the
# arena of a block stays in cache). Measured: 4 to 16 MB are within noise at 224 px.
_CPU_BLOCK_BYTES = 10 * 2 ** 20


def _op_groups(op_index, argument):
    """The group of every chain step: its op, a fractional translation, or `_UNCHANGED`."""
    device = op_index.device
    geometric = move(torch.tensor([OPS[name].geometric for name in OP_NAMES]), device)
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


def apply(x, params, fill):
    """AugMix of `x` with `params`: B * width chains as one batch, grouped by op (module docs).

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
    # ops.bin_counts: CUDA's bincount would read the largest key back to size its output, two more host syncs.
    counts = ops.bin_counts(block_step_key.flatten(), block_count * steps * key_count)
    counts = counts.view(block_count, steps, key_count).tolist()  # the one host sync: group sizes set the slices

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
