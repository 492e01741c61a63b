"""AugMix as fused Triton kernels: every chain step of the whole batch in two launches, no host sync.

The torch backend (torch_apply.py) sorts chains by op and runs one kernel per op group, which suits a CPU
cache and costs a GPU hundreds of launches and a host sync per call. Here every program reads its own
chain's op and argument from the `AugMixParams` tensors and branches on them (a branch that is uniform
across the program, so no divergence), and a step is:

- `_statistics_kernel`, one program per chain and channel: the statistics the step's op needs from the
  chain's current image (equalize's 256-level lookup table, autocontrast's low and span, contrast's
  channel mean), or the quotients of its argument that posterize, solarize and sharpness use (divisions
  kept out of the step kernel, where they would cost registers); programs whose op needs none return;
- `_step_kernel`, one program per image and pixel block (both on the grid's first axis, whose limit is
  2**31 - 1 rather than the 65535 of the others), looping over the image's chains: each output
  pixel applies the chain's op (a point op in place of the pixel, rotate/shear/translate as a bilinear
  gather with PIL's edge rule and the fill colour, sharpness as a 3x3 neighbourhood). The last step mixes
  instead of storing: (1 - m) * x + sum_i m * w_i * chain_i, so the chains' final images are never written.

A chain's images alternate between two buffers, by the count of its ops that changed the image so far
(steps past its depth and geometric ops with argument 0 change nothing and are skipped, as on the torch
path), so a gather never reads a buffer that the same step writes. The arithmetic follows the torch
kernels operation for operation (same formulas, same order, float32 pixels, float64 where they use it),
with floating-point contraction disabled and correctly rounded division (`_divide`), so the two backends
give the same pixels for the same params up to rounding (tests: within 1/255, almost always exactly).

Working memory: the two float32 images per chain and the statistics, `working_bytes_per_image` each; a batch
whose working memory would pass `WORKING_BYTES` (2 GiB) runs in chunks of images that stay within it (one
image at a time if one alone needs more), each chunk its own launch sequence. Smaller batches run in one,
so the launch count does not grow with the batch. Views of any strides work: offsets that can reach 2**31
are computed in int64 (`needs_wide_offsets`); an image itself must have fewer than 2**31 values.

Launches go to the images' GPU and its current stream (`devices.on_device`): Triton launches on the current
device, which need not be the tensors'.

`sample_arguments` turns the raw draws of `sample_augmix` into op indices and arguments in one launch,
with the same float64 arithmetic as the torch sampler.

Under `TRITON_INTERPRET=1` (set before Triton is imported) the same kernels run on CPU tensors; CI tests
them that way against the torch backend.
"""
import torch
import triton
import triton.language as tl

from fastai_jsd.augment.devices import on_device

# Op indices, as in sampling.OP_NAMES (tests/test_triton.py checks the order).
AUTOCONTRAST = tl.constexpr(0)
EQUALIZE = tl.constexpr(1)
POSTERIZE = tl.constexpr(2)
ROTATE = tl.constexpr(3)
SOLARIZE = tl.constexpr(4)
SHEAR_X = tl.constexpr(5)
SHEAR_Y = tl.constexpr(6)
TRANSLATE_X = tl.constexpr(7)
TRANSLATE_Y = tl.constexpr(8)
COLOR = tl.constexpr(9)
CONTRAST = tl.constexpr(10)
BRIGHTNESS = tl.constexpr(11)
SHARPNESS = tl.constexpr(12)
OP_ORDER = ('autocontrast', 'equalize', 'posterize', 'rotate', 'solarize', 'shear_x', 'shear_y', 'translate_x',
            'translate_y', 'color', 'contrast', 'brightness', 'sharpness')

# PIL's 'L' weights in its 16-bit fixed point, exact in float32 (ops._LUMA_WEIGHTS).
LUMA_RED = tl.constexpr(19595 / 65536)
LUMA_GREEN = tl.constexpr(38470 / 65536)
LUMA_BLUE = tl.constexpr(7471 / 65536)
# torch.deg2rad's factor; passed through tl.full to stay a float64 constant.
PI_OVER_180 = tl.constexpr(0.017453292519943295)
# Per chain and channel: 256 values (equalize's table; autocontrast, contrast, posterize, solarize and sharpness
# use the first three at most).
STATISTICS_SIZE = tl.constexpr(256)
# Launch shapes, chosen by registers and spills in ptxas's report (tests/_compile_kernels.py, sm_70 to sm_120: the
# step kernel holds every op's code, and 256 pixels over 4 warps keep it within 128 registers without spills, 168
# on a V100); the statistics kernel scans a whole image per program, so it takes wider blocks.
STEP_PIXELS, STEP_WARPS = 256, 4
STATISTICS_PIXELS, STATISTICS_WARPS = 2048, 8
# The most bytes of ping-pong images and statistics one launch sequence may use (see the module docs): a few
# per cent of a datacentre GPU, and the batch sizes augmentation sees in one sequence (224 px, width 3: 592).
WORKING_BYTES = 2 * 2 ** 30


@triton.jit
def _divide(dividend, divisor):
    """dividend / divisor in float32, correctly rounded as torch divides.

    Compiled, `/` on float32 is a fast division up to 2 ulp off (the interpreter's numpy is exact); results
    that are floored or compared (autocontrast followed by posterize, posterize's and contrast's levels,
    solarize's threshold, equalize's table, sharpness's weight) hit exact ties on real photos, where 2 ulp
    move a pixel by whole levels. float64 `/` is correctly rounded already.
    """
    return tl.math.div_rn(dividend, divisor)


@triton.jit
def _is_geometric(op):
    return (op == ROTATE) | (op == SHEAR_X) | (op == SHEAR_Y) | (op == TRANSLATE_X) | (op == TRANSLATE_Y)


@triton.jit
def _changes_image(op, argument):
    """Whether a chain step changes the image: not past the chain's depth, and not a geometric op by 0."""
    return (op >= 0) & ~(_is_geometric(op) & (argument == 0))


@triton.jit
def _ops_done(op_ptr, argument_ptr, chain, step, steps):
    """How many of the chain's steps before `step` changed its image: which buffer holds its current image."""
    done = 0
    for earlier in range(0, step):
        op = tl.load(op_ptr + chain * steps + earlier)
        argument = tl.load(argument_ptr + chain * steps + earlier)
        done += _changes_image(op, argument).to(tl.int32)
    return done


@triton.jit
def _current_image(x_ptr, buffer_ptr, done, image, chain, chains, x_stride_b, x_stride_c, x_stride_h, x_stride_w,
                   H, W, C: tl.constexpr):
    """Pointer and (channel, row, column) strides of the chain's current image.

    The clean image until an op changed it, then the buffer its last op wrote: one load path for both,
    which keeps the kernels' registers few (x is float32 here, see `apply_augmix`).
    """
    plane = tl.cast(C * H, tl.int64) * W
    written = buffer_ptr + ((done + 1) % 2).to(tl.int64) * chains * plane + chain.to(tl.int64) * plane
    clean = x_ptr + image.to(tl.int64) * x_stride_b
    from_x = done == 0
    return (tl.where(from_x, clean, written), tl.where(from_x, x_stride_c, H * W),
            tl.where(from_x, x_stride_h, W), tl.where(from_x, x_stride_w, 1))


@triton.jit
def _load_pixels(source, stride_c, stride_h, stride_w, channel, row, col, mask):
    """float32 pixels of one channel of the image at `source` at (row, col), in the strides' integer type."""
    return tl.load(source + channel * stride_c + row * stride_h + col * stride_w, mask=mask, other=0.)


@triton.jit
def _as_int64(stride_b, stride_c, stride_h, stride_w):
    """x's strides as int64, so that every offset computed from them is int64 (kernels with WIDE, `needs_wide_offsets`).

    Triton passes ints below 2**31 as int32, and int32 products wrap: in a view whose channel stride
    passes 2**30, channel 2 would read elsewhere. int64 offsets cost registers, so only such views pay.
    """
    return tl.cast(stride_b, tl.int64), tl.cast(stride_c, tl.int64), tl.cast(stride_h, tl.int64), tl.cast(
        stride_w, tl.int64)


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp's formula (exact at weight 0 and 1)."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


@triton.jit
def _bilinear(source, stride_c, stride_h, stride_w, channel, x0, fx, y0, fy, inside, fill, mask, H, W):
    """PIL's bilinear filter at columns x0, x0 + 1 (weight fx) and rows y0, y0 + 1 (weight fy).

    Neighbours beyond the image take the edge pixel (XCLIP/YCLIP); positions outside get `fill`.
    """
    left = tl.minimum(tl.maximum(x0, 0), W - 1)
    right = tl.minimum(tl.maximum(x0 + 1, 0), W - 1)
    top = tl.minimum(tl.maximum(y0, 0), H - 1)
    bottom = tl.minimum(tl.maximum(y0 + 1, 0), H - 1)
    top_left = _load_pixels(source, stride_c, stride_h, stride_w, channel, top, left, mask)
    top_right = _load_pixels(source, stride_c, stride_h, stride_w, channel, top, right, mask)
    bottom_left = _load_pixels(source, stride_c, stride_h, stride_w, channel, bottom, left, mask)
    bottom_right = _load_pixels(source, stride_c, stride_h, stride_w, channel, bottom, right, mask)
    sampled = _lerp(_lerp(top_left, top_right, fx), _lerp(bottom_left, bottom_right, fx), fy)
    sampled = tl.minimum(tl.maximum(sampled, 0.), 1.)
    return tl.where(inside, sampled, fill)


@triton.jit
def _sharpen(source, stride_c, stride_h, stride_w, channel, row, col, centre, neighbour_weight, mask, H, W):
    """ImageEnhance.Sharpness: (1 - 8a) x + a * (sum of the 8 neighbours), border pixels unchanged (ops.sharpness_into)."""
    interior = (row >= 1) & (row < H - 1) & (col >= 1) & (col < W - 1)
    near = mask & interior
    result = centre * (1.0 - 8.0 * neighbour_weight)
    for dy in tl.static_range(3):
        for dx in tl.static_range(3):
            if dy != 1 or dx != 1:
                neighbour = _load_pixels(source, stride_c, stride_h, stride_w, channel, row + dy - 1, col + dx - 1, near)
                result = result + neighbour * neighbour_weight
    result = tl.minimum(tl.maximum(result, 0.), 1.)
    return tl.where(interior, result, centre)


@triton.jit
def _point_op(op, argument, value, gray, channel_statistics, contrast_mean):
    """One channel of a point op (autocontrast, equalize, posterize, solarize, color, contrast, brightness)."""
    result = value
    if op == AUTOCONTRAST:
        low = tl.load(channel_statistics)
        span = tl.load(channel_statistics + 1)
        result = _divide(value - low, span)
    elif op == EQUALIZE:
        scaled = tl.minimum(tl.maximum(value * 255.0 + 0.5, 0.), 255.)
        level = tl.minimum(tl.maximum(scaled.to(tl.int32), 0), 255)  # NaN cannot index outside the table
        result = tl.load(channel_statistics + level)
    elif op == POSTERIZE:
        # ops.posterize_into, with 255 / step, 0.5 / step and step / 255 from `_argument_quotients`
        result = (tl.floor(value * tl.load(channel_statistics) + tl.load(channel_statistics + 1))
                  * tl.load(channel_statistics + 2))
    elif op == SOLARIZE:
        result = tl.abs((value >= tl.load(channel_statistics)).to(tl.float32) - value)
    elif op == COLOR:
        result = tl.minimum(tl.maximum(_lerp(gray, value, argument.to(tl.float32)), 0.), 1.)
    elif op == CONTRAST:
        result = tl.minimum(tl.maximum(_lerp(contrast_mean, value, argument.to(tl.float32)), 0.), 1.)
    elif op == BRIGHTNESS:
        result = tl.minimum(tl.maximum(value * argument.to(tl.float32), 0.), 1.)
    return result


@triton.jit
def _shift_position(shift, index, length):
    """Whole and fractional part of index + shift along one axis, and whether PIL samples the image there.

    As geometry._sample_rows and _interval_mask: in float64, inside when ceil(-0.5 - shift) <= index < that + length.
    """
    whole = tl.floor(shift)
    fraction = (shift - whole).to(tl.float32)
    first = tl.ceil(-0.5 - shift)
    inside = (index >= first) & (index < first + length)
    whole = tl.minimum(tl.maximum(whole, -2.0 * length - 2), 2.0 * length + 2)  # NaN-free and int32-safe
    return index + whole.to(tl.int32), fraction, inside


@triton.jit
def _source_position(op, argument, row, col, mask, H, W):
    """Where the op reads output pixel (row, col): columns x0, x0 + 1 (weight fx), rows y0, y0 + 1 (weight fy).

    Also whether PIL samples the image there (else the fill colour). Identity for non-geometric ops.
    """
    x0 = col
    y0 = row
    fx = tl.zeros(col.shape, tl.float32)
    fy = tl.zeros(col.shape, tl.float32)
    inside = mask
    if op == ROTATE:
        # geometry.rotation_matrix in float64, applied in float32 as geometry._warp_into does
        degrees = argument.to(tl.float64)
        angle = -((degrees - tl.floor(degrees / 360.0) * 360.0) * tl.full([], PI_OVER_180, tl.float64))
        decimals = tl.full([], 1e15, tl.float64)
        cos = tl.floor(tl.cos(angle) * decimals + 0.5) / decimals
        sin = tl.floor(tl.sin(angle) * decimals + 0.5) / decimals
        centre_x = tl.cast(W, tl.float64) * 0.5  # a cast, not .to: Triton passes an int 1 as a constant
        centre_y = tl.cast(H, tl.float64) * 0.5
        a = cos.to(tl.float32)
        b = sin.to(tl.float32)
        c = (centre_x - cos * centre_x - sin * centre_y).to(tl.float32)
        d = (-sin).to(tl.float32)
        f = (centre_y + sin * centre_x - cos * centre_y).to(tl.float32)
        column_centre = col.to(tl.float32) + 0.5
        row_centre = row.to(tl.float32) + 0.5
        source_x = a * column_centre + (c + b * row_centre)
        source_y = d * column_centre + (f + a * row_centre)
        inside = mask & (source_x >= 0) & (source_x < W) & (source_y >= 0) & (source_y < H)
        u = tl.where(inside, source_x - 0.5, 0.)  # grid positions; outside ones are filled anyway
        v = tl.where(inside, source_y - 0.5, 0.)
        x0 = tl.floor(u).to(tl.int32)
        y0 = tl.floor(v).to(tl.int32)
        fx = u - tl.floor(u)
        fy = v - tl.floor(v)
    elif (op == SHEAR_X) | (op == TRANSLATE_X):
        shift = argument.to(tl.float64) + tl.zeros(col.shape, tl.float64)
        if op == SHEAR_X:  # shift = factor * (row + 0.5)
            shift = argument.to(tl.float64) * (row.to(tl.float64) + 0.5)
        x0, fx, inside = _shift_position(shift, col, W)
        inside = inside & mask
    elif (op == SHEAR_Y) | (op == TRANSLATE_Y):
        shift = argument.to(tl.float64) + tl.zeros(col.shape, tl.float64)
        if op == SHEAR_Y:  # shift = factor * (col + 0.5)
            shift = argument.to(tl.float64) * (col.to(tl.float64) + 0.5)
        y0, fy, inside = _shift_position(shift, row, H)
        inside = inside & mask
    return x0, fx, y0, fy, inside


@triton.jit
def _channel_step(op, argument, channel, source, stride_c, stride_h, stride_w, statistics_ptr, fill_ptr,
                  row, col, mask, x0, fx, y0, fy, inside, H, W, C: tl.constexpr):
    """One channel of the chain step's output at the block's pixels (one channel at a time keeps registers few)."""
    if _is_geometric(op):
        value = _bilinear(source, stride_c, stride_h, stride_w, channel, x0, fx, y0, fy, inside,
                          tl.load(fill_ptr + channel), mask, H, W)
    else:
        value = _load_pixels(source, stride_c, stride_h, stride_w, channel, row, col, mask)
        if op == SHARPNESS:
            neighbour_weight = tl.load(statistics_ptr + channel * STATISTICS_SIZE)  # `_argument_quotients`
            value = _sharpen(source, stride_c, stride_h, stride_w, channel, row, col, value, neighbour_weight, mask, H, W)
        else:
            gray = value  # a gray image is its own grayscale: color leaves it unchanged (a lerp of equal ends)
            if op == COLOR:
                if C == 3:
                    gray = (_load_pixels(source, stride_c, stride_h, stride_w, 0, row, col, mask) * LUMA_RED
                            + _load_pixels(source, stride_c, stride_h, stride_w, 1, row, col, mask) * LUMA_GREEN
                            + _load_pixels(source, stride_c, stride_h, stride_w, 2, row, col, mask) * LUMA_BLUE)
            contrast_mean = tl.zeros([], tl.float32)
            if op == CONTRAST:
                # ops.contrast_into: the mean luma of the channel means, rounded to a level
                contrast_mean = tl.load(statistics_ptr)
                if C == 3:
                    contrast_mean = (tl.load(statistics_ptr) * LUMA_RED
                                     + tl.load(statistics_ptr + STATISTICS_SIZE) * LUMA_GREEN
                                     + tl.load(statistics_ptr + 2 * STATISTICS_SIZE) * LUMA_BLUE)
                contrast_mean = _divide(tl.floor(contrast_mean * 255 + 0.5), 255.0)
            value = _point_op(op, argument, value, gray, statistics_ptr + channel * STATISTICS_SIZE, contrast_mean)
    return value


@triton.jit
def _argument_quotients(op, argument, out):
    """Store at `out` the quotients of the argument that posterize, solarize or sharpness use, as torch divides."""
    if op == POSTERIZE:
        # ops.posterize_into's 255 / step, 0.5 / step and step / 255, with step = 2 ** (8 - bits) exact from the
        # integer bits (tl.exp2 is approximate when compiled)
        step = (1 << (8 - argument.to(tl.int32))).to(tl.float32)
        tl.store(out, _divide(255.0, step))
        tl.store(out + 1, _divide(0.5, step))
        tl.store(out + 2, _divide(step, 255.0))
    elif op == SOLARIZE:
        # ops.solarize_pixel_threshold: the pixel value from which a level reaches PIL's threshold
        tl.store(out, _divide(tl.floor(argument.to(tl.float32) * 255 + 0.5) - 0.5, 255.0))
    else:
        # ops.sharpness_into: the weight of each of the 8 neighbours
        tl.store(out, _divide(1.0 - argument.to(tl.float32), 13.0))


@triton.jit(do_not_specialize=['step'])  # one compiled kernel for every step, not one for step 1 and one for 0
def _statistics_kernel(op_ptr, argument_ptr, x_ptr, buffer_ptr, statistics_ptr, step, steps, width, chains,
                       x_stride_b, x_stride_c, x_stride_h, x_stride_w, H, W,
                       C: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Per chain and channel, what this step's op needs from the chain's current image, or from its argument."""
    if WIDE:
        x_stride_b, x_stride_c, x_stride_h, x_stride_w = _as_int64(x_stride_b, x_stride_c, x_stride_h, x_stride_w)
    chain = tl.program_id(0)
    channel = tl.program_id(1)
    op = tl.load(op_ptr + chain * steps + step)
    if (op == POSTERIZE) | (op == SOLARIZE) | (op == SHARPNESS):
        argument = tl.load(argument_ptr + chain * steps + step)
        _argument_quotients(op, argument, statistics_ptr + (chain * C + channel).to(tl.int64) * STATISTICS_SIZE)
    if (op == AUTOCONTRAST) | (op == EQUALIZE) | (op == CONTRAST):
        done = _ops_done(op_ptr, argument_ptr, chain, step, steps)
        source, stride_c, stride_h, stride_w = _current_image(x_ptr, buffer_ptr, done, chain // width, chain, chains,
                                                              x_stride_b, x_stride_c, x_stride_h, x_stride_w, H, W, C)
        pixels = H * W
        counts = tl.zeros([256], tl.int32)
        low = tl.full([BLOCK], float('inf'), tl.float32)
        high = tl.full([BLOCK], float('-inf'), tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, pixels, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < pixels
            value = _load_pixels(source, stride_c, stride_h, stride_w, channel, offsets // W, offsets % W, mask)
            if op == EQUALIZE:
                # ops.equalize_into: PIL's level floor(255 v + 0.5), clamped so NaN cannot leave the table
                scaled = tl.minimum(tl.maximum(value * 255.0 + 0.5, 0.), 255.)
                level = tl.minimum(tl.maximum(scaled.to(tl.int32), 0), 255)
                counts += tl.histogram(level, 256, mask=mask)
            elif op == AUTOCONTRAST:
                low = tl.minimum(low, tl.where(mask, value, float('inf')))
                high = tl.maximum(high, tl.where(mask, value, float('-inf')))
            else:
                total += tl.where(mask, value, 0.)
        out = statistics_ptr + (chain * C + channel).to(tl.int64) * STATISTICS_SIZE
        if op == EQUALIZE:
            # ops._pil_equalize_lut: PIL's ImageOps.equalize table, in exact integer arithmetic
            levels = tl.arange(0, 256)
            below = tl.cumsum(counts, 0) - counts
            top = tl.max(tl.where(counts > 0, levels, 0))
            at_top = tl.sum(tl.where(levels == top, counts, 0))
            step_size = (pixels - at_top) // 255
            table = tl.minimum((step_size // 2 + below) // tl.maximum(step_size, 1), 255)
            table = tl.where(step_size > 0, table, levels)
            tl.store(out + levels, _divide(table.to(tl.float32), 255.0))
        elif op == AUTOCONTRAST:
            # ops.autocontrast_into: a flat channel keeps its values (low 0, span 1)
            lowest = tl.min(low)
            highest = tl.max(high)
            flat = highest <= lowest
            tl.store(out, tl.where(flat, 0., lowest))
            tl.store(out + 1, tl.where(flat, 1., highest - lowest))
        else:
            tl.store(out, _divide(tl.sum(total), tl.cast(pixels, tl.float32)))


@triton.jit(do_not_specialize=['step'])
def _step_kernel(op_ptr, argument_ptr, weight_ptr, blend_ptr, x_ptr, buffer_ptr, statistics_ptr, fill_ptr, out_ptr,
                 step, steps, width, chains, x_stride_b, x_stride_c, x_stride_h, x_stride_w,
                 out_stride_b, out_stride_c, out_stride_h, out_stride_w, H, W, pixel_blocks,
                 C: tl.constexpr, LAST: tl.constexpr, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """One chain step for every chain of one image at a block of pixels; the last step mixes into `out`.

    Program `image * pixel_blocks + block`: one grid axis, so images of more than 65535 blocks launch too.
    """
    if WIDE:
        x_stride_b, x_stride_c, x_stride_h, x_stride_w = _as_int64(x_stride_b, x_stride_c, x_stride_h, x_stride_w)
    image = tl.program_id(0) // pixel_blocks
    offsets = (tl.program_id(0) % pixel_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < H * W
    row = offsets // W
    col = offsets % W
    plane = tl.cast(C * H, tl.int64) * W
    mixed_red = tl.zeros([BLOCK], tl.float32)
    mixed_green = tl.zeros([BLOCK], tl.float32)
    mixed_blue = tl.zeros([BLOCK], tl.float32)
    blend = tl.zeros([], tl.float32)
    if LAST:
        # the torch path's mix (torch_apply._apply_block): x (1 - m), then + m w_i chain_i, chain after chain
        blend = tl.load(blend_ptr + image).to(tl.float32)
        clean = x_ptr + image.to(tl.int64) * x_stride_b
        mixed_red = _load_pixels(clean, x_stride_c, x_stride_h, x_stride_w, 0, row, col, mask) * (1 - blend)
        if C == 3:
            mixed_green = _load_pixels(clean, x_stride_c, x_stride_h, x_stride_w, 1, row, col, mask) * (1 - blend)
            mixed_blue = _load_pixels(clean, x_stride_c, x_stride_h, x_stride_w, 2, row, col, mask) * (1 - blend)
    for link in range(0, width):
        chain = image * width + link
        op = tl.load(op_ptr + chain * steps + step)
        argument = tl.load(argument_ptr + chain * steps + step)
        done = _ops_done(op_ptr, argument_ptr, chain, step, steps)
        source, stride_c, stride_h, stride_w = _current_image(x_ptr, buffer_ptr, done, image, chain, chains,
                                                              x_stride_b, x_stride_c, x_stride_h, x_stride_w, H, W, C)
        statistics = statistics_ptr + chain.to(tl.int64) * C * STATISTICS_SIZE
        changes = _changes_image(op, argument)
        x0, fx, y0, fy, inside = _source_position(op, argument, row, col, mask, H, W)
        for channel in tl.static_range(C):
            if LAST:
                if changes:
                    value = _channel_step(op, argument, channel, source, stride_c, stride_h, stride_w, statistics,
                                          fill_ptr, row, col, mask, x0, fx, y0, fy, inside, H, W, C)
                else:  # the chain's image is where its last op left it
                    value = _load_pixels(source, stride_c, stride_h, stride_w, channel, row, col, mask)
                weighted = value * (tl.load(weight_ptr + chain).to(tl.float32) * blend)
                if channel == 0:
                    mixed_red = mixed_red + weighted
                elif channel == 1:
                    mixed_green = mixed_green + weighted
                else:
                    mixed_blue = mixed_blue + weighted
            elif changes:
                value = _channel_step(op, argument, channel, source, stride_c, stride_h, stride_w, statistics,
                                      fill_ptr, row, col, mask, x0, fx, y0, fy, inside, H, W, C)
                target = (buffer_ptr + (done % 2).to(tl.int64) * chains * plane + chain.to(tl.int64) * plane
                          + channel * H * W)
                tl.store(target + offsets, value, mask=mask)
    if LAST:
        out = out_ptr + image.to(tl.int64) * out_stride_b + row * out_stride_h + col * out_stride_w
        tl.store(out, mixed_red.to(out_ptr.dtype.element_ty), mask=mask)
        if C == 3:
            tl.store(out + out_stride_c, mixed_green.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out + 2 * out_stride_c, mixed_blue.to(out_ptr.dtype.element_ty), mask=mask)


# Whether Triton's interpreter runs these kernels (TRITON_INTERPRET=1 when Triton was imported): then on CPU tensors.
INTERPRETED = type(_step_kernel).__name__ == 'InterpretedFunction'


def _pixel_block(pixels, most):
    """Pixels per program: a power of two, at most `most`, no more than the image needs."""
    return min(most, triton.next_power_of_2(pixels))


def needs_wide_offsets(x):
    """Whether an offset within an image of `x` can reach 2**31 (a view of huge strides): int64 arithmetic then.

    The buffers and the output are contiguous images of fewer than 2**31 values: int32 offsets suffice there.
    """
    return sum((size - 1) * abs(stride) for size, stride in zip(x.shape[1:], x.stride()[1:])) >= 2 ** 31


def working_bytes_per_image(params, channels, height, width):
    """Kernel working memory per image, in bytes: its chains' two float32 images (with 2 steps or more), statistics."""
    images = 2 if params.steps > 1 else 0
    return params.width * channels * (images * height * width + STATISTICS_SIZE.value) * 4


def images_per_launch(params, channels, height, width):
    """Images per launch sequence: as many as keep the working memory within WORKING_BYTES, at least one."""
    return max(1, WORKING_BYTES // working_bytes_per_image(params, channels, height, width))


def apply_augmix(x, params, fill):
    """AugMix of `x` (float `[B, C, H, W]`) with `params` and the `[C]` float32 fill colour, in 2 launches per step.

    Inputs are checked by `fastai_jsd.augment.apply_augmix`; `params` must be on x's device. Batches whose
    working memory would pass WORKING_BYTES run in chunks of `images_per_launch` images (module docs).
    """
    batch, channels, height, width = x.shape
    if channels * height * width >= 2 ** 31:
        raise ValueError(f"backend='triton' takes images of fewer than 2**31 values, got {channels} x {height} x "
                         f"{width}; use backend='torch'.")
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    # Made contiguous once, outside the step loop: blend is a column of the Beta draw, a copy per step otherwise.
    op_index = params.op_index.contiguous()
    op_argument = params.op_argument.contiguous()
    chain_weights = params.chain_weights.contiguous()
    blend = params.blend.contiguous()
    # The kernels read the clean image and the buffers through one float32 load path (fewer registers);
    # other dtypes pay one conversion.
    x = x if x.dtype == torch.float32 else x.float()
    chunk = min(batch, images_per_launch(params, channels, height, width))
    chains = chunk * params.width
    # Two images per chain (ping-pong); a one-step draw writes none, but a kernel argument must point somewhere.
    # Chunks reuse them: their launches queue on one stream, one after the other.
    buffer_shape = (2, chains, channels, height, width) if params.steps > 1 else (1,)
    buffers = torch.empty(buffer_shape, device=x.device, dtype=torch.float32)
    statistics = torch.empty((chains, channels, STATISTICS_SIZE.value), device=x.device, dtype=torch.float32)
    with on_device(x.device):
        for first in range(0, batch, chunk):
            images = slice(first, min(first + chunk, batch))
            _launch_steps(x[images], op_index[images], op_argument[images], chain_weights[images], blend[images],
                          fill, buffers, statistics, out[images])
    return out


def _launch_steps(x, op_index, op_argument, chain_weights, blend, fill, buffers, statistics, out):
    """The launch sequence of one chunk of images: a statistics and a step kernel per chain step."""
    batch, channels, height, width = x.shape
    chains_per_image, steps = op_index.shape[1:]
    chains = batch * chains_per_image
    step_block = _pixel_block(height * width, STEP_PIXELS)
    pixel_blocks = triton.cdiv(height * width, step_block)
    statistics_block = _pixel_block(height * width, STATISTICS_PIXELS)
    wide = needs_wide_offsets(x)
    for step in range(steps):
        _statistics_kernel[(chains, channels)](
            op_index, op_argument, x, buffers, statistics, step, steps, chains_per_image, chains,
            *x.stride(), height, width, C=channels, BLOCK=statistics_block, WIDE=wide, num_warps=STATISTICS_WARPS,
            enable_fp_fusion=False)
        _step_kernel[(batch * pixel_blocks,)](
            op_index, op_argument, chain_weights, blend, x, buffers, statistics, fill, out, step, steps,
            chains_per_image, chains, *x.stride(), *out.stride(), height, width, pixel_blocks,
            C=channels, LAST=step == steps - 1, BLOCK=step_block, WIDE=wide, num_warps=STEP_WARPS,
            enable_fp_fusion=False)


@triton.jit
def _arguments_kernel(slot_ptr, level_ptr, sign_draw_ptr, depth_ptr, op_ptr, argument_ptr, count, steps,
                      height, width, GEOMETRIC: tl.constexpr, BLOCK: tl.constexpr):
    """Op index and argument of every chain step from its drawn op slot, level, sign draw and chain depth."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    slot = tl.load(slot_ptr + offsets, mask=mask, other=0)
    level = tl.load(level_ptr + offsets, mask=mask, other=1.)
    negate = tl.load(sign_draw_ptr + offsets, mask=mask, other=0.) > 0.5
    depth = tl.load(depth_ptr + offsets // steps, mask=mask, other=0)
    op = slot
    if not GEOMETRIC:  # slots 0..7 of sampling.op_set(geometric=False): ops 0, 1, 2, 4, 9, 10, 11, 12
        op = slot + (slot >= 3).to(slot.dtype) + 4 * (slot >= 4).to(slot.dtype)
    # sampling's level_to_argument functions, operation for operation in float64; 0.3, 1.8, 0.1 as
    # correctly rounded quotients, which are the float64 values of those literals.
    ten = tl.full([], 10, tl.float64)
    argument = tl.zeros_like(level)
    argument = tl.where(op == POSTERIZE, 4 - tl.floor(level * 4 / ten), argument)
    argument = tl.where(op == ROTATE, tl.floor(level * 30 / ten), argument)
    argument = tl.where(op == SOLARIZE, (256 - tl.floor(level * 256 / ten)) / 255, argument)
    shear = level * (tl.full([], 3, tl.float64) / ten) / ten
    argument = tl.where((op == SHEAR_X) | (op == SHEAR_Y), shear, argument)
    third_width = tl.cast(width, tl.float64) / 3  # a cast, not .to: Triton passes an int 1 as a constant
    third_height = tl.cast(height, tl.float64) / 3
    argument = tl.where(op == TRANSLATE_X, tl.floor(level * third_width / ten), argument)
    argument = tl.where(op == TRANSLATE_Y, tl.floor(level * third_height / ten), argument)
    enhance = level * (tl.full([], 18, tl.float64) / ten) / ten + tl.full([], 1, tl.float64) / ten
    argument = tl.where(op >= COLOR, enhance, argument)
    argument = tl.where(_is_geometric(op) & negate, -argument, argument)
    past_depth = offsets % steps >= depth
    tl.store(op_ptr + offsets, tl.where(past_depth, -1, op), mask=mask)
    tl.store(argument_ptr + offsets, tl.where(past_depth, 0., argument), mask=mask)


def sample_arguments(slot, level, sign_draw, chain_depth, image_height, image_width, geometric):
    """`(op_index, op_argument)` of `sample_augmix` from its raw draws, in one launch (no host sync)."""
    op_index = torch.empty_like(slot)
    op_argument = torch.empty_like(level)
    count = slot.numel()
    if count:
        block = 256
        with on_device(slot.device):
            _arguments_kernel[(triton.cdiv(count, block),)](
                slot, level, sign_draw, chain_depth, op_index, op_argument, count, slot.shape[-1],
                image_height, image_width, GEOMETRIC=geometric, BLOCK=block, enable_fp_fusion=False)
    return op_index, op_argument
