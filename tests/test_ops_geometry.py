"""The geometric kernels against PIL, the library the original AugMix code calls, on real photos."""
from functools import lru_cache

import numpy as np
import pytest
import torch
from PIL import Image

from _images import from_pil, photo_crops, to_grayscale, to_pil, to_tensor
from fastai_jsd.augment.geometry import (rotate, rotation_matrix, shear_x, shear_x_matrix, shear_y, shear_y_matrix,
                                 translate_x, translate_x_matrix, translate_y, translate_y_matrix,
                                 warp_affine)

BILINEAR = Image.Resampling.BILINEAR
AFFINE = Image.Transform.AFFINE
SIZES = [(37, 53), (64, 48), (32, 32)]  # (H, W): taller than wide, wider than tall, square
FILL_RGB = (124, 116, 104)              # a dataset-mean-like colour, PIL's fillcolor


def pil_affine(data_of):
    """PIL's `transform(size, AFFINE, data_of(value), BILINEAR, fillcolor=...)` as AugMix calls it."""
    def transform(im, value, fillcolor):
        return im.transform(im.size, AFFINE, data_of(value), BILINEAR, fillcolor=fillcolor)
    return transform


def pil_rotate(im, value, fillcolor):
    """PIL's `rotate(value, resample=BILINEAR, fillcolor=...)` as AugMix calls it."""
    return im.rotate(value, resample=BILINEAR, fillcolor=fillcolor)


TRANSLATIONS = [1, -1, 3, -3, 10, -10, 2.5, -0.25]
# op name -> (our kernel, PIL call of the original AugMix code, parameter values of both signs)
OPS = {
    'rotate': (rotate, pil_rotate, [1, -1, 7, -7, 30, -30, 90, 12.5]),
    'shear_x': (shear_x, pil_affine(lambda v: (1, v, 0, 0, 1, 0)), [0.05, -0.05, 0.3, -0.3]),
    'shear_y': (shear_y, pil_affine(lambda v: (1, 0, 0, v, 1, 0)), [0.05, -0.05, 0.3, -0.3]),
    'translate_x': (translate_x, pil_affine(lambda v: (1, 0, v, 0, 1, 0)), TRANSLATIONS),
    'translate_y': (translate_y, pil_affine(lambda v: (1, 0, 0, 0, 1, v)), TRANSLATIONS),
}


def photos(height, width, grayscale=False, n=3):
    """`n` real photo crops as float [n, C, H, W] (multiples of 1/255), a fresh tensor every call."""
    return _photos(height, width, grayscale, n).clone()


@lru_cache(maxsize=None)
def _photos(height, width, grayscale, n):
    # Decoding the sample JPEGs dominates the run time otherwise.
    crops = photo_crops(n, height, width, seed=height * 1000 + width)
    return to_tensor(to_grayscale(crops) if grayscale else crops)


def pil_apply(x, pil_op, value, fillcolor):
    """Apply a PIL call to every image of `x` through 8-bit PIL images, back to float [N, C, H, W]."""
    return torch.stack([from_pil(pil_op(to_pil(image), value, fillcolor)) for image in x])


def pil_float_apply(x, pil_op, value, fill):
    """Apply a PIL call channel by channel on mode 'F' images (0..255 floats), which PIL does not truncate."""
    out = torch.empty_like(x)
    for n, image in enumerate(x):
        for c, channel in enumerate(image):
            pil_image = Image.fromarray((channel * 255).numpy().astype(np.float32), 'F')
            out[n, c] = torch.from_numpy(np.array(pil_op(pil_image, value, float(fill[c] * 255)))) / 255
    return out


def as_pil_stores(x):
    """What PIL's 8-bit bilinear filter stores for exact value `x`: truncation, `(UINT8)v1` in Geometry.c."""
    return torch.floor(x * 255 + 1e-3) / 255


def fill_pair(channels, nonzero):
    """(our fill in [0, 1], PIL's fillcolor) for a zero or a per-channel non-zero fill."""
    if not nonzero:
        return 0., 0
    colour = FILL_RGB if channels == 3 else FILL_RGB[:1]
    return tuple(v / 255 for v in colour), (colour if channels == 3 else colour[0])


@pytest.mark.parametrize('op', list(OPS))
@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('grayscale', [False, True], ids=['rgb', 'gray'])
@pytest.mark.parametrize('nonzero_fill', [False, True], ids=['fill0', 'fillmean'])
def test_matches_pil_8bit(op, size, grayscale, nonzero_fill):
    kernel, pil_op, values = OPS[op]
    x = photos(*size, grayscale=grayscale)
    fill, fillcolor = fill_pair(x.shape[1], nonzero_fill)
    for value in values:
        ours = kernel(x, value, fill)
        expected = pil_apply(x, pil_op, value, fillcolor)
        stored_diff = (as_pil_stores(ours) - expected).abs()
        raw_diff = (ours - expected).abs()
        where = f'{op}({value}) on {tuple(x.shape)}, fill {fill}'
        assert stored_diff.mean() < 0.05 / 255, where
        assert (stored_diff > 2 / 255).float().mean() < 0.002, where
        # Unquantised, only PIL's truncation separates the two: half a level on average, never more than one.
        assert raw_diff.mean() < 0.6 / 255, where
        assert raw_diff.max() < 1.01 / 255, where
        if op.startswith('translate') and value == int(value):
            assert raw_diff.max() < 1e-5, where


@pytest.mark.parametrize('op', list(OPS))
@pytest.mark.parametrize('size', [(37, 53), (48, 37)])
def test_matches_pil_float_exactly(op, size):
    """On PIL's float images (no 8-bit rounding) the two agree to float32 precision, fill borders included."""
    kernel, pil_op, values = OPS[op]
    x = photos(*size, n=2)
    fill = (0.5, 0.25, 0.75)
    for value in values:
        diff = (kernel(x, value, fill) - pil_float_apply(x, pil_op, value, fill)).abs()
        assert diff.max() < 0.01 / 255, f'{op}({value}) on {tuple(x.shape)}'


def test_rotate_multiples_of_90_are_exact():
    # 32x32 takes PIL's transpose fast path; with W + H odd (37x48) the samples fall halfway between
    # pixel centres and the first or last column lands exactly on the image edge, inside or outside.
    for size in [(32, 32), (37, 53), (37, 48), (48, 37)]:
        x = photos(*size)
        for degrees in [90, -90, 180, 270, 360]:
            expected = pil_apply(x, OPS['rotate'][1], degrees, (9, 99, 199))
            ours = rotate(x, degrees, (9 / 255, 99 / 255, 199 / 255))
            assert (as_pil_stores(ours) - expected).abs().max() < 1e-5, f'{degrees} on {size}'


def test_rotation_matrix_is_pils():
    """The matrix `Image.rotate` hands to `Image.transform`, for both signs and non-square images."""
    recorded = []
    original = Image.Image.transform

    def record(self, size, method, data=None, *args, **kwargs):
        recorded.append(data)
        return original(self, size, method, data, *args, **kwargs)

    image = Image.new('L', (53, 37))
    degrees = [1., -7., 30., -30., 90., 400.]
    Image.Image.transform = record
    try:
        for d in degrees:
            image.rotate(d, resample=BILINEAR)
    finally:
        Image.Image.transform = original
    ours = rotation_matrix(torch.tensor(degrees), 37, 53)
    assert ours.shape == (len(degrees), 3, 3) and ours.dtype == torch.float64
    expected = torch.tensor(recorded, dtype=torch.float64)
    torch.testing.assert_close(ours[:, :2].reshape(len(degrees), 6), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours[:, 2], torch.tensor([[0., 0., 1.]] * len(degrees), dtype=torch.float64))


def test_matrix_builders_are_pil_data():
    cases = [(shear_x_matrix(0.3), (1, .3, 0, 0, 1, 0)), (shear_y_matrix(-0.3), (1, 0, 0, -.3, 1, 0)),
             (translate_x_matrix(4), (1, 0, 4, 0, 1, 0)), (translate_y_matrix(-2), (1, 0, 0, 0, 1, -2))]
    for matrix, data in cases:
        assert matrix.shape == (1, 3, 3)
        torch.testing.assert_close(matrix[0].flatten(), torch.tensor(data + (0, 0, 1), dtype=torch.float64))
    assert translate_y_matrix(torch.tensor([1., 2., 3.])).shape == (3, 3, 3)


@pytest.mark.parametrize('op', list(OPS))
def test_batched_parameters_equal_per_image_calls(op):
    kernel = OPS[op][0]
    x = photos(37, 53, n=4)
    values = torch.tensor(OPS[op][2][:4], dtype=torch.float32)
    fill = (0.1, 0.5, 0.9)
    batched = kernel(x, values, fill)
    single = torch.cat([kernel(x[i:i + 1], values[i].item(), fill) for i in range(len(x))])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6)
    # A [B] tensor whose values are all equal matches the plain number.
    same_value = values[1].item()
    torch.testing.assert_close(kernel(x, torch.full((4,), same_value), fill), kernel(x, same_value, fill),
                               rtol=0, atol=1e-6)


SHIFT_KERNELS = {  # the one-axis kernels and their PIL matrices, which warp_affine resamples in 2-D
    'shear_x': (shear_x, shear_x_matrix, [0.3, -0.3, 0.05, -0.07, 1.7, -2.0]),
    'shear_y': (shear_y, shear_y_matrix, [0.3, -0.3, 0.05, -0.07, 1.7, -2.0]),
    'translate_x': (translate_x, translate_x_matrix, [1, -1, 7, -12, 2.5, -0.25, 60, -60, 1000.5]),
    'translate_y': (translate_y, translate_y_matrix, [1, -1, 7, -12, 2.5, -0.25, 60, -60, 1000.5]),
}


@pytest.mark.parametrize('op', list(SHIFT_KERNELS))
@pytest.mark.parametrize('size', [(37, 53), (48, 37), (1, 7), (6, 1), (2, 2)])
@pytest.mark.parametrize('grayscale', [False, True], ids=['rgb', 'gray'])
def test_row_and_column_kernels_equal_the_general_warp(op, size, grayscale):
    """Shears and translations copy shifted rows (or columns) instead of resampling in 2-D: same result, any size."""
    kernel, matrix, values = SHIFT_KERNELS[op]
    x = photos(*size, grayscale=grayscale) if min(size) > 2 else torch.rand(3, 1 if grayscale else 3, *size)
    fill = (0.2, 0.5, 0.8)[:x.shape[1]]
    for value in values:
        torch.testing.assert_close(kernel(x, value, fill), warp_affine(x, matrix(value), fill), rtol=0, atol=1e-5,
                                   msg=lambda m: f'{op}({value}) on {tuple(x.shape)}: {m}')
    # One batch with whole and fractional values of both signs, each image its own.
    mixed = torch.tensor(values[:3], dtype=torch.float64)
    torch.testing.assert_close(kernel(x, mixed, fill), warp_affine(x, matrix(mixed), fill), rtol=0, atol=1e-5)


def test_whole_pixel_translations_are_exact_copies():
    x = photos(37, 53)
    fill = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1)
    shifted = translate_x(x, torch.tensor([3., -5., 0.]), fill)
    assert torch.equal(shifted[0, :, :, :-3], x[0, :, :, 3:]) and (shifted[0, :, :, -3:] == fill[0]).all()
    assert torch.equal(shifted[1, :, :, 5:], x[1, :, :, :-5]) and (shifted[1, :, :, :5] == fill[0]).all()
    assert torch.equal(shifted[2], x[2])
    shifted = translate_y(x, torch.tensor([-4., 36., 37.]), fill)
    assert torch.equal(shifted[0, :, 4:], x[0, :, :-4]) and (shifted[0, :, :4] == fill[0]).all()
    assert torch.equal(shifted[1, :, :1], x[1, :, 36:]) and (shifted[1, :, 1:] == fill[0]).all()
    assert (shifted[2] == fill[0]).all()


def test_composition_order_first_op_on_the_left():
    """shear_x then translate_y is ONE warp with shear @ translate, as PIL applying the two in turn."""
    x = photos(37, 53)
    height = x.shape[2]
    factor, pixels = 0.3, 3
    fillcolor = (26, 128, 230)
    fill = tuple(v / 255 for v in fillcolor)
    sheared = pil_apply(x, OPS['shear_x'][1], factor, fillcolor)
    in_turn = pil_apply(sheared, OPS['translate_y'][1], pixels, fillcolor)
    composed = warp_affine(x, shear_x_matrix(factor) @ translate_y_matrix(pixels), fill)
    reversed_order = warp_affine(x, translate_y_matrix(pixels) @ shear_x_matrix(factor), fill)
    # The last `pixels` rows came from rows PIL's first step had already filled; one warp keeps image
    # there (see the module docs), so compare the rest.
    kept = slice(0, height - pixels)
    diff = (as_pil_stores(composed) - in_turn)[:, :, kept].abs()
    assert diff.mean() < 0.05 / 255
    assert (diff > 2 / 255).float().mean() < 0.002
    assert (as_pil_stores(reversed_order) - in_turn)[:, :, kept].abs().mean() > 5 / 255


def test_composed_chain_approximates_pil_in_turn():
    """rotate, shear_y, translate_x: one interpolation instead of three, so close but not equal."""
    x = photos(64, 48)
    height, width = x.shape[2:]
    steps = [('rotate', 10., rotation_matrix(10., height, width)), ('shear_y', -0.1, shear_y_matrix(-0.1)),
             ('translate_x', 2, translate_x_matrix(2))]
    in_turn = x
    ours_in_turn = x
    for name, value, _ in steps:
        in_turn = pil_apply(in_turn, OPS[name][1], value, 0)
        ours_in_turn = OPS[name][0](ours_in_turn, value)
    one_warp = warp_affine(x, steps[0][2] @ steps[1][2] @ steps[2][2])
    wrong_order = warp_affine(x, steps[2][2] @ steps[1][2] @ steps[0][2])
    # Away from the borders, where the filling differs, only the blur of repeated interpolation
    # (and PIL's truncation at every step) separates them: measured 1.6/255 and 1.2/255.
    centre = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    error = (one_warp - in_turn)[centre].abs().mean()
    assert error < 2.5 / 255
    assert (one_warp - ours_in_turn)[centre].abs().mean() < 2 / 255
    # The other order misses by about 5/255.
    assert (wrong_order - in_turn)[centre].abs().mean() > error + 2 / 255


def test_shared_matrix_broadcasts_and_2x3_is_accepted():
    x = photos(32, 32)
    matrix = shear_x_matrix(0.2) @ translate_x_matrix(-3)
    expected = warp_affine(x, matrix.expand(3, 3, 3))
    torch.testing.assert_close(warp_affine(x, matrix), expected, rtol=0, atol=0)
    torch.testing.assert_close(warp_affine(x, matrix[:, :2]), expected, rtol=0, atol=0)


@pytest.mark.parametrize('fill', [0.3, (0.3,), [0.3, 0.3, 0.3], torch.tensor([0.3, 0.3, 0.3])])
def test_fill_forms(fill):
    x = photos(32, 32)
    out = translate_x(x, 40, fill)  # entirely outside: every pixel is fill
    torch.testing.assert_close(out, torch.full_like(x, 0.3))


def test_grayscale_fill_and_identity():
    x = photos(37, 53, grayscale=True)
    assert torch.equal(translate_y(x, -100, (0.5,)), torch.full_like(x, 0.5))
    for kernel in (rotate, shear_x, shear_y, translate_x, translate_y):
        torch.testing.assert_close(kernel(x, 0), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_pure_keeps_dtype_and_range(dtype):
    x = photos(37, 53).to(dtype)
    before = x.clone()
    for kernel, value in ((rotate, torch.tensor([30., -7., 90.])), (shear_x, 0.3), (shear_y, -0.3),
                          (translate_x, 2.5), (translate_y, torch.tensor([-10, 3, 1]))):
        out = kernel(x, value, (0.2, 0.4, 0.6))
        assert out.dtype == dtype and out.shape == x.shape and out.device == x.device
        assert out.min() >= 0 and out.max() <= 1
        assert torch.equal(x, before)
    expected = rotate(x.double(), 30.)
    assert (rotate(x, 30.).double() - expected).abs().mean() < 0.01


def test_overshoot_is_clamped():
    x = torch.ones(2, 3, 29, 31)
    out = rotate(x, torch.tensor([13.7, -41.3]), 1.)
    assert out.max() <= 1 and out.min() > 1 - 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
def test_cuda_matches_cpu():
    x = photos(37, 53, n=4)
    degrees = torch.tensor([1., -7., 30., 90.])
    fill = (0.1, 0.5, 0.9)
    for kernel, value in ((rotate, degrees), (shear_x, degrees / 100), (translate_y, degrees.round())):
        on_gpu = kernel(x.cuda(), value.cuda(), fill)
        assert on_gpu.device.type == 'cuda'
        torch.testing.assert_close(on_gpu.cpu(), kernel(x, value, fill), rtol=0, atol=1e-4)
    assert rotate(x.cuda().half(), 30.).dtype == torch.float16


def test_bad_images_are_refused():
    with pytest.raises(TypeError, match='x'):
        rotate((photos(8, 8) * 255).to(torch.uint8), 10)
    with pytest.raises(ValueError, match='x'):
        shear_x(photos(8, 8)[0], 0.1)
    with pytest.raises(ValueError, match='x'):
        translate_x(torch.rand(2, 4, 8, 8), 1)
    with pytest.raises(TypeError, match='x'):
        warp_affine(np.zeros((1, 3, 8, 8), np.float32), translate_x_matrix(1))


def test_bad_parameters_are_refused():
    x = photos(8, 8)
    with pytest.raises(ValueError, match=r'degrees.*\[3\].*\(2,\)'):
        rotate(x, torch.tensor([1., 2.]))
    with pytest.raises(ValueError, match='factor'):
        shear_y(x, torch.zeros(3, 1))
    with pytest.raises(TypeError, match='pixels'):
        translate_y(x, '3')
    with pytest.raises(ValueError, match='pixels'):
        translate_x(x, float('nan'))
    with pytest.raises(ValueError, match='height'):
        rotation_matrix(10, 0, 5)
    with pytest.raises(ValueError, match='factor'):
        shear_x_matrix(torch.zeros(2, 2))


def test_bad_fill_is_refused():
    x = photos(8, 8)
    with pytest.raises(ValueError, match=r'fill.*C = 3'):
        rotate(x, 10, (0.1, 0.2))
    with pytest.raises(ValueError, match='fill'):
        rotate(x[:, :1], 10, (0.1, 0.2, 0.3))
    with pytest.raises(TypeError, match='fill'):
        shear_x(x, 0.1, 'grey')
    with pytest.raises(TypeError, match='fill'):
        warp_affine(x, shear_x_matrix(0.1), None)


def test_bad_matrix_is_refused():
    x = photos(8, 8)
    with pytest.raises(ValueError, match=r'matrix.*\(2, 3, 3\)'):
        warp_affine(x, torch.eye(3).expand(2, 3, 3))
    with pytest.raises(ValueError, match=r'matrix.*\(3, 3\)'):
        warp_affine(x, torch.eye(3))
    with pytest.raises(ValueError, match='matrix'):
        warp_affine(x, torch.zeros(3, 3, 2))
    with pytest.raises(TypeError, match='matrix'):
        warp_affine(x, torch.eye(3, dtype=torch.int64)[None])
    with pytest.raises(TypeError, match='matrix'):
        warp_affine(x, [[1, 0, 0], [0, 1, 0]])


GEOMETRIC_CALLS = {
    'rotate': lambda x: rotate(x, 17.),
    'shear_x': lambda x: shear_x(x, 0.21),
    'shear_y': lambda x: shear_y(x, -0.13),
    'translate_x': lambda x: translate_x(x, 3),
    'translate_x_fractional': lambda x: translate_x(x, 2.5),
    'translate_y': lambda x: translate_y(x, -4),
    'translate_y_fractional': lambda x: translate_y(x, -1.5),
    'warp_affine': lambda x: warp_affine(x, shear_x_matrix(0.1) @ translate_y_matrix(2)),
}


@pytest.mark.parametrize('name', list(GEOMETRIC_CALLS))
def test_input_that_requires_grad_is_accepted_and_the_output_does_not(name):
    x = photos(37, 53)
    for source in (x.clone().requires_grad_(), x * torch.ones(1, requires_grad=True)):  # a leaf, a graph node
        out = GEOMETRIC_CALLS[name](source)
        assert not out.requires_grad and out.grad_fn is None
        torch.testing.assert_close(out, GEOMETRIC_CALLS[name](x), rtol=0, atol=0)


def test_geometric_docstrings_say_they_run_without_autograd():
    for kernel in (rotate, shear_x, shear_y, translate_x, translate_y, warp_affine):
        assert 'autograd' in kernel.__doc__ or 'no_grad' in kernel.__doc__, kernel.__name__
