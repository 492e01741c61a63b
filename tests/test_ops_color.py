"""The non-geometric AugMix kernels of fastai_jsd.ops against the PIL calls of the original AugMix code."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from _images import from_pil, photo_crops, to_grayscale, to_pil, to_tensor
from fastai_jsd.augment import ops

LEVEL = 1 / 255
POINT_TOLERANCE = LEVEL + 1e-6    # autocontrast, equalize, posterize, solarize
ENHANCE_TOLERANCE = 2 * LEVEL + 1e-6    # PIL truncates blends; its degenerate images are rounded
FACTORS = (0.1, 0.5, 1.0, 1.5, 1.9)    # AugMix's all_ops factors span 0.1..1.9
THRESHOLDS = (0, 1, 64, 128, 200, 255, 256)    # PIL's integer T; the kernel gets T / 255
ENHANCERS = {'color': ImageEnhance.Color, 'contrast': ImageEnhance.Contrast,
             'brightness': ImageEnhance.Brightness, 'sharpness': ImageEnhance.Sharpness}


@pytest.fixture(scope='module')
def photos():
    """Real photo crops as float batches: RGB and PIL-grayscale, two non-square sizes, several images each."""
    batches = {}
    for height, width in ((37, 53), (64, 48)):
        crops = photo_crops(4, height, width, seed=height)
        batches[f'rgb{height}x{width}'] = to_tensor(crops)
        batches[f'gray{height}x{width}'] = to_tensor(to_grayscale(crops))
    return batches


def degenerate_images():
    """Images where PIL takes its special paths: flat channels, two values, tiny sizes, equalize's clipped LUT."""
    images = {
        'constant': torch.full((2, 3, 9, 11), 128 / 255),
        'black': torch.zeros(1, 3, 5, 5),
        'white': torch.ones(1, 1, 5, 5),
        '1x1': torch.tensor([[[[77 / 255]], [[3 / 255]], [[250 / 255]]]]),
        '2x5': torch.arange(30, dtype=torch.float32).mul(8).div(255).view(1, 3, 2, 5),
    }
    checker = (torch.arange(12).view(12, 1) + torch.arange(10)) % 2
    images['two_valued'] = torch.where(checker.bool(), 200 / 255, 10 / 255).expand(2, 3, 12, 10).clone()
    # 300 pixels at 10 and 100 at 200: step = 300 // 255 = 1, so PIL's LUT gives 300 for level 200, clipped to 255.
    skewed = torch.full((20 * 20,), 10 / 255)
    skewed[:100] = 200 / 255
    images['skewed'] = skewed.view(1, 1, 20, 20)
    # One pixel differs from a flat channel: a two-valued channel whose equalize step is 0.
    lone = torch.full((1, 3, 6, 7), 40 / 255)
    lone[0, 1, 2, 3] = 90 / 255
    images['lone_pixel'] = lone
    return images


def pil_reference(x, pil_op):
    """Apply `pil_op` to every image of the batch through PIL and stack the results as floats."""
    return torch.stack([from_pil(pil_op(to_pil(image))) for image in x])


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_matches_pil(actual, x, pil_op, tolerance):
    expected = pil_reference(x, pil_op)
    assert actual.shape == x.shape and actual.dtype == x.dtype
    error = max_error(actual, expected)
    assert error <= tolerance, f"max |kernel - PIL| = {error * 255:.3f}/255 > {tolerance * 255:.3f}/255"


def all_test_images(photos):
    return {**photos, **degenerate_images()}


# --- reference behaviour: every op against PIL on real photos and degenerate images --------------------------------


def test_autocontrast_matches_pil(photos):
    for name, x in all_test_images(photos).items():
        assert_matches_pil(ops.autocontrast(x), x, ImageOps.autocontrast, POINT_TOLERANCE)


def test_autocontrast_stretches_a_low_contrast_photo(photos):
    """A photo squeezed into [0.3, 0.6] comes back spanning [0, 1] per channel, like PIL."""
    x = (photos['rgb37x53'] * 77 + 77).round() / 255
    out = ops.autocontrast(x)
    assert torch.equal(out.amin(dim=(-2, -1)), torch.zeros(4, 3))
    assert torch.equal(out.amax(dim=(-2, -1)), torch.ones(4, 3))
    assert_matches_pil(out, x, ImageOps.autocontrast, POINT_TOLERANCE)


def test_equalize_matches_pil(photos):
    for name, x in all_test_images(photos).items():
        assert_matches_pil(ops.equalize(x), x, ImageOps.equalize, POINT_TOLERANCE)


def test_equalize_is_exact_on_8bit_images(photos):
    """Equalize works on PIL's own 256 levels, so on 8-bit images it reproduces PIL's output exactly."""
    for name, x in all_test_images(photos).items():
        error = max_error(ops.equalize(x), pil_reference(x, ImageOps.equalize))
        assert error < 1e-6, name


def test_equalize_rounds_float_noise_to_the_nearest_level(photos):
    """Values a hair below or above a level equalize like the level itself (round, not floor)."""
    x = photos['rgb64x48']
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) - 0.5) * 0.8 * LEVEL
    noisy = (x + noise).clamp(0, 1)
    assert max_error(ops.equalize(noisy), pil_reference(x, ImageOps.equalize)) < 1e-6


@pytest.mark.parametrize('bits', range(1, 9))
def test_posterize_matches_pil(photos, bits):
    for name, x in all_test_images(photos).items():
        assert_matches_pil(ops.posterize(x, bits), x, lambda im: ImageOps.posterize(im, bits), POINT_TOLERANCE)


def test_posterize_rounds_float_noise_to_the_nearest_level(photos):
    x = photos['gray37x53']
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.8 * LEVEL
    noisy = (x + noise).clamp(0, 1)
    for bits in (1, 4, 8):
        expected = pil_reference(x, lambda im: ImageOps.posterize(im, bits))
        assert max_error(ops.posterize(noisy, bits), expected) < 1e-6


@pytest.mark.parametrize('threshold', THRESHOLDS)
def test_solarize_matches_pil(photos, threshold):
    for name, x in all_test_images(photos).items():
        out = ops.solarize(x, threshold / 255)
        assert_matches_pil(out, x, lambda im: ImageOps.solarize(im, threshold), POINT_TOLERANCE)


def test_solarize_compares_levels_so_float_noise_cannot_flip_a_pixel(photos):
    x = photos['rgb64x48']
    noise = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) - 0.5) * 0.8 * LEVEL
    noisy = (x + noise).clamp(0, 1)
    for threshold in (1, 128, 255):
        expected = pil_reference(x, lambda im: ImageOps.solarize(im, threshold))
        assert max_error(ops.solarize(noisy, threshold / 255), expected) <= 0.4 * LEVEL + 1e-6


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.float16])
def test_solarize_inverts_exactly_the_levels_at_or_above_the_threshold(dtype):
    """Every level against every PIL threshold T, with T / 255 computed like the images (no off-by-one level)."""
    levels = torch.arange(256, dtype=dtype).div(255).view(1, 1, 1, 256).expand(257, 1, 1, 256)
    thresholds = torch.arange(257, dtype=dtype).div(255)
    out = ops.solarize(levels, thresholds)
    inverted = torch.arange(256).view(1, 256) >= torch.arange(257).view(257, 1)
    expected = torch.where(inverted, 255 - torch.arange(256), torch.arange(256)).to(dtype) / 255
    tolerance = 1e-3 if dtype == torch.float16 else 1e-6
    assert torch.allclose(out.view(257, 256), expected, rtol=0, atol=tolerance)
    # The same with the thresholds as Python numbers T / 255, as the AugMix sampler may pass them.
    for threshold in (0, 1, 127, 128, 255, 256):
        single = ops.solarize(levels[:1], threshold / 255)
        assert torch.allclose(single.view(256), expected[threshold], rtol=0, atol=tolerance)


@pytest.mark.parametrize('op_name', list(ENHANCERS))
@pytest.mark.parametrize('factor', FACTORS)
def test_enhance_matches_pil(photos, op_name, factor):
    kernel = getattr(ops, op_name)
    for name, x in all_test_images(photos).items():
        pil_op = lambda im: ENHANCERS[op_name](im).enhance(factor)
        assert_matches_pil(kernel(x, factor), x, pil_op, ENHANCE_TOLERANCE)


@pytest.mark.parametrize('op_name', list(ENHANCERS))
def test_enhance_factor_one_is_identity(photos, op_name):
    for name, x in all_test_images(photos).items():
        assert torch.equal(getattr(ops, op_name)(x, 1.0), x), name


def test_color_and_contrast_degenerate_images_follow_pil(photos):
    """Factor 0 gives PIL's degenerate image itself: the 'L' conversion, the rounded mean luma."""
    x = photos['rgb64x48']
    gray = to_tensor(to_grayscale((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()))
    assert max_error(ops.color(x, 0.0), gray.expand_as(x)) <= LEVEL / 2 + 1e-6
    mean_levels = [np.asarray(to_pil(image).convert('L'), dtype=np.float64).mean() for image in x]
    expected = torch.tensor([int(m + 0.5) / 255 for m in mean_levels]).view(-1, 1, 1, 1)
    assert max_error(ops.contrast(x, 0.0), expected.expand_as(x)) <= 1e-6
    assert torch.equal(ops.color(photos['gray64x48'], 0.3), photos['gray64x48'])    # 'L' images are gray already


def test_sharpness_leaves_the_border_and_tiny_images_alone(photos):
    x = photos['rgb37x53']
    for factor in (0.1, 1.9):
        out = ops.sharpness(x, factor)
        for border in ((..., 0, slice(None)), (..., -1, slice(None)), (..., slice(None), 0), (..., slice(None), -1)):
            assert torch.equal(out[border], x[border])
        assert not torch.equal(out[..., 1:-1, 1:-1], x[..., 1:-1, 1:-1])
    tiny = x[:, :, :2, :9]
    assert torch.equal(ops.sharpness(tiny, 0.1), tiny)


# --- batching: per-image parameters ---------------------------------------------------------------------------------

BATCHED_PARAMS = {
    'posterize': [1, 3, 5, 8],
    'solarize': [0.0, 64 / 255, 128 / 255, 256 / 255],
    'color': [0.1, 0.7, 1.0, 1.9],
    'contrast': [0.1, 0.7, 1.0, 1.9],
    'brightness': [0.1, 0.7, 1.0, 1.9],
    'sharpness': [0.1, 0.7, 1.0, 1.9],
}


@pytest.mark.parametrize('op_name', list(BATCHED_PARAMS))
@pytest.mark.parametrize('image_kind', ['rgb', 'gray'])
def test_per_image_tensor_parameters_equal_per_image_calls(photos, op_name, image_kind):
    kernel = getattr(ops, op_name)
    x = photos[f'{image_kind}64x48']
    values = BATCHED_PARAMS[op_name]
    batched = kernel(x, torch.tensor(values))
    singles = torch.cat([kernel(x[i:i + 1], value) for i, value in enumerate(values)])
    torch.testing.assert_close(batched, singles, rtol=0, atol=1e-6)
    # ... and each image matches PIL with its own parameter.
    for i, value in enumerate(values):
        if op_name == 'posterize':
            pil_op, tolerance = (lambda im: ImageOps.posterize(im, value)), POINT_TOLERANCE
        elif op_name == 'solarize':
            pil_op, tolerance = (lambda im: ImageOps.solarize(im, round(value * 255))), POINT_TOLERANCE
        else:
            pil_op, tolerance = (lambda im: ENHANCERS[op_name](im).enhance(value)), ENHANCE_TOLERANCE
        assert_matches_pil(batched[i:i + 1], x[i:i + 1], pil_op, tolerance)


def test_histogram_ops_keep_images_of_a_batch_apart(photos):
    """autocontrast and equalize use each image's own statistics: batched equals one at a time."""
    photo = photos['rgb37x53']
    x = torch.cat([photo, torch.full((1, 3, 37, 53), 128 / 255), (photo[:1] * 128).round() / 255])
    for kernel in (ops.autocontrast, ops.equalize):
        batched = kernel(x)
        singles = torch.cat([kernel(x[i:i + 1]) for i in range(len(x))])
        assert torch.equal(batched, singles)


# --- contract: purity, dtype, device, range, memory layout ----------------------------------------------------------

CALLS = {
    'autocontrast': lambda x: ops.autocontrast(x),
    'equalize': lambda x: ops.equalize(x),
    'posterize': lambda x: ops.posterize(x, 3),
    'solarize': lambda x: ops.solarize(x, 100 / 255),
    'color': lambda x: ops.color(x, 1.9),
    'contrast': lambda x: ops.contrast(x, 1.9),
    'brightness': lambda x: ops.brightness(x, 1.9),
    'sharpness': lambda x: ops.sharpness(x, 1.9),
}


@pytest.mark.parametrize('op_name', list(CALLS))
def test_input_is_not_modified(photos, op_name):
    for x in (photos['rgb37x53'], photos['gray64x48']):
        before = x.clone()
        out = CALLS[op_name](x)
        assert torch.equal(x, before)
        assert out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize('op_name', list(CALLS))
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_dtype_kept_and_output_in_range(photos, op_name, dtype):
    x = photos['rgb37x53'].to(dtype)
    out = CALLS[op_name](x)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    assert out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out.float(), CALLS[op_name](photos['rgb37x53']), rtol=0, atol=1e-5)


@pytest.mark.parametrize('op_name', list(CALLS))
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_runs_and_stays_in_range(photos, op_name, dtype):
    x = photos['rgb37x53'].to(dtype)
    out = CALLS[op_name](x)
    assert out.dtype == dtype and out.shape == x.shape
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if dtype == torch.float16:    # float16 holds all 256 levels apart; bfloat16 does not
        reference = CALLS[op_name](x.float())
        assert max_error(out, reference) <= 2 * LEVEL


@pytest.mark.parametrize('op_name', list(CALLS))
def test_channels_last_and_strided_input(photos, op_name):
    x = photos['rgb64x48']
    expected = CALLS[op_name](x)
    assert torch.equal(CALLS[op_name](x.to(memory_format=torch.channels_last)), expected)
    assert torch.equal(CALLS[op_name](x.transpose(-1, -2)), CALLS[op_name](x.transpose(-1, -2).contiguous()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('op_name', list(CALLS))
def test_cuda_matches_cpu(photos, op_name):
    x = photos['rgb64x48']
    out = CALLS[op_name](x.cuda())
    assert out.device.type == 'cuda'
    torch.testing.assert_close(out.cpu(), CALLS[op_name](x), rtol=0, atol=1e-5)


# --- bad input: clear errors naming the argument ---------------------------------------------------------------------


@pytest.mark.parametrize('op_name', list(CALLS))
@pytest.mark.parametrize('bad, error, words', [
    (np.zeros((1, 3, 8, 8), dtype=np.float32), TypeError, ['x', 'ndarray']),
    (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), TypeError, ['x', 'uint8', 'float']),
    (torch.zeros(3, 8, 8), ValueError, ['x', '(3, 8, 8)']),
    (torch.zeros(1, 1, 3, 8, 8), ValueError, ['x', '(1, 1, 3, 8, 8)']),
    (torch.zeros(1, 4, 8, 8), ValueError, ['x', '(1, 4, 8, 8)', 'channels']),
    (torch.zeros(1, 8, 8, 3), ValueError, ['x', '(1, 8, 8, 3)', 'permute']),
    (torch.zeros(1, 3, 0, 8), ValueError, ['x', '(1, 3, 0, 8)']),
])
def test_bad_images_are_refused(op_name, bad, error, words):
    with pytest.raises(error) as info:
        CALLS[op_name](bad)
    for word in words:
        assert word in str(info.value)


PARAMETRIZED = {'posterize': ops.posterize, 'solarize': ops.solarize, 'color': ops.color,
                'contrast': ops.contrast, 'brightness': ops.brightness, 'sharpness': ops.sharpness}
PARAMETER_NAMES = {'posterize': 'bits', 'solarize': 'threshold'}


@pytest.mark.parametrize('op_name', list(PARAMETRIZED))
@pytest.mark.parametrize('bad, error, words', [
    (torch.tensor([2, 3, 4]), ValueError, ['(3,)', '[4]']),
    (torch.ones(4, 1), ValueError, ['(4, 1)']),
    (torch.ones(4, dtype=torch.bool), TypeError, ['bool']),
    (True, TypeError, ['True']),
    ('0.5', TypeError, ["'0.5'", 'str']),
    (None, TypeError, ['None']),
    (float('nan'), ValueError, ['nan']),
])
def test_bad_parameters_are_refused(op_name, bad, error, words):
    x = torch.zeros(4, 3, 8, 8)
    with pytest.raises(error) as info:
        PARAMETRIZED[op_name](x, bad)
    message = str(info.value)
    assert PARAMETER_NAMES.get(op_name, 'factor') in message
    for word in words:
        assert word in message


@pytest.mark.parametrize('bits', [0, 9, -1, 2.5, torch.tensor([4, 0]), torch.tensor([4.0, 3.5]), torch.tensor([9, 1])])
def test_posterize_bits_outside_pil_range_are_refused(bits):
    with pytest.raises(ValueError, match='bits'):
        ops.posterize(torch.zeros(2, 3, 8, 8), bits)


def test_posterize_accepts_integral_floats_and_integer_tensors(photos):
    x = photos['rgb37x53']
    expected = ops.posterize(x, 4)
    assert torch.equal(ops.posterize(x, 4.0), expected)
    assert torch.equal(ops.posterize(x, np.int64(4)), expected)
    assert torch.equal(ops.posterize(x, torch.full((4,), 4)), expected)


# --- the shared validation helpers ----------------------------------------------------------------------------------


def test_per_image_shapes_device_and_dtype():
    x = torch.zeros(5, 3, 4, 4, dtype=torch.float64)
    scalar = ops.per_image(0.25, x, 'factor')
    assert scalar.shape == (5, 1, 1, 1) and scalar.dtype == torch.float64 and torch.all(scalar == 0.25)
    vector = ops.per_image(torch.arange(5), x, 'factor')
    assert vector.shape == (5, 1, 1, 1) and vector.dtype == torch.float64
    assert torch.equal(vector.view(-1), torch.arange(5, dtype=torch.float64))
    assert ops.per_image(torch.tensor(2.0), x, 'factor').shape == (5, 1, 1, 1)
    assert ops.per_image(3, x, 'pixels', dtype=torch.float32).dtype == torch.float32


def test_check_images_names_the_argument():
    ops.check_images(torch.zeros(2, 1, 3, 3))
    with pytest.raises(ValueError, match='images'):
        ops.check_images(torch.zeros(2, 2, 3, 3), name='images')


# --- not differentiable: the public ops run without autograd ---------------------------------------------------------


@pytest.mark.parametrize('op_name', list(CALLS))
def test_input_that_requires_grad_is_accepted_and_the_output_does_not(photos, op_name):
    x = photos['rgb37x53']
    leaf = x.clone().requires_grad_()
    out = CALLS[op_name](leaf)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(out, CALLS[op_name](x))
    kernel = getattr(ops, op_name)
    assert 'not differentiable' in kernel.__doc__.lower() and 'no_grad' in kernel.__doc__


def test_ops_inside_a_graph_do_not_join_it(photos):
    """A non-leaf input (the output of a layer) gives an output with no grad_fn, so backward cannot reach it."""
    weight = torch.ones(1, requires_grad=True)
    x = photos['rgb37x53'] * weight
    for op_name, call in CALLS.items():
        assert call(x).grad_fn is None, op_name


# --- NaN pixels: equalize counts levels, and NaN has none -----------------------------------------------------------


def test_equalize_refuses_nan_pixels_with_a_clear_message(photos):
    x = photos['rgb37x53'].clone()
    x[1, 2, 5, 7] = float('nan')
    x[2, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError) as info:
        ops.equalize(x)
    message = str(info.value)
    assert 'NaN' in message and '2 NaN' in message and 'nan_to_num' in message
    assert 'tensor(' not in message


def test_equalize_into_keeps_nan_inside_the_histogram(photos):
    """The AugMix apply path does not check (no host sync): NaN must land in a valid bin, not crash or spill over."""
    x = photos['rgb37x53'].clone()
    x[1, 2, 5, 7] = float('nan')
    x[1, 2, 6, 7] = float('nan')
    out = ops.equalize_into(x, torch.empty_like(x))
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    # Every other image and channel is equalized exactly as without the NaN: nothing spilled into their bins.
    clean = ops.equalize(photos['rgb37x53'])
    assert torch.equal(out[[0, 2, 3]], clean[[0, 2, 3]])
    assert torch.equal(out[1, :2], clean[1, :2])
