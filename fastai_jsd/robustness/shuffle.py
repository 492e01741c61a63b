"""Glass blur's pixel shuffle: the generator scripts' sequential loop, computed exactly by pointer jumping.

The scripts shuffle an H x W x 3 uint8 array with a Python loop (one sweep per iteration):

    for h in range(H - d, d, -1):
        for w in range(W - d, d, -1):
            dx, dy = np.random.randint(-d, d, size=(2,))
            x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]

On a 3-channel array `x[h, w]` is a view, so this "swap" copies: x[h, w] takes the current value of
x[h + dy, w + dx], and that pixel keeps it (its second assignment writes its own, already copied value back).
So only the visited pixel changes at each step, and it takes either the original value of its target (a pixel
not visited yet, or not visited at all: the border) or the final value of a pixel visited before it, which
itself took ... a chain that always goes back in the loop's order. With one pointer per pixel, pointer jumping
resolves every chain in log2(chain length) batched gathers: the loop's result exactly, for the same offsets
(`tests/test_corruptions.py` runs the loop), with no data-dependent shapes (a fixed number of rounds on a GPU).

(For d = 1 no target was visited before, so every pixel takes the original value of one of its four
upper-left neighbours, itself included; larger d also reach pixels below and to the right, visited before.)
"""
import math

import torch


def shuffle_sources(offset_y, offset_x, height, width, max_delta):
    """Flat source index [B, height * width] of every pixel after one sweep of the scripts' loop.

    `offset_y`, `offset_x`: the loop's dy, dx (in -max_delta .. max_delta - 1), long tensors
    [B, H - 2 max_delta, W - 2 max_delta] in the loop's order: [b, i, j] is the step at row
    h = H - max_delta - i, column w = W - max_delta - j. The swept image is
    `image.flatten(-2).gather(-1, sources)`.
    """
    batch, passes, steps = offset_y.shape
    device = offset_y.device
    target = torch.arange(height * width, device=device).repeat(batch, 1)
    if passes <= 0 or steps <= 0 or batch == 0:
        return target
    rows = height - max_delta - torch.arange(passes, device=device)  # h of each row pass
    cols = width - max_delta - torch.arange(steps, device=device)  # w of each step
    source_row, source_col = rows[:, None] + offset_y, cols[None, :] + offset_x  # [B, passes, steps]
    # Where the source stands in the loop's order: visited before the pixel itself, or not (yet) at all.
    source_pass, source_step = height - max_delta - source_row, width - max_delta - source_col
    visited = (source_pass >= 0) & (source_pass < passes) & (source_step >= 0) & (source_step < steps)
    order = torch.arange(passes * steps, device=device).view(passes, steps)
    earlier = visited & (source_pass * steps + source_step < order)
    # Pointer p -> target[p]: p's final value is the original at target[p] where `final` holds, else the
    # final value at target[p].
    own = (rows[:, None] * width + cols[None, :]).view(-1)
    target[:, own] = (source_row * width + source_col).view(batch, -1)
    final = torch.ones(batch, height * width, dtype=torch.bool, device=device)
    final[:, own] = ~earlier.view(batch, -1)
    # A chain steps back in the loop's order, so it is shorter than the number of steps.
    for _ in range(math.ceil(math.log2(passes * steps + 1))):
        if device.type == 'cpu' and bool(final.all()):  # free on the host; on a GPU it would wait
            break
        target, final = torch.where(final, target, target.gather(1, target)), final | final.gather(1, target)
    return target
