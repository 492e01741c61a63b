"""AugMix sampling and application, checked against a per-image PIL copy of the paper's code."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision.transforms import v2

from _images import photo_crops, to_grayscale, to_tensor
from fastai_jsd.augment import geometry, ops, torch_apply
from fastai_jsd.augment import (NO_OP, OP_NAMES, OPS, PAPER_OP_COUNT, AugMixParams, apply_augmix, augmix,
                               sample_augmix)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """One intra-op thread, as in a DataLoader worker: small kernels gain nothing from more,
    and on a busy 2-core machine spinning OpenMP threads cost more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The paper's code (google-research/augmix augmentations.py and augment_and_mix.py), per image on
# PIL, with a seeded numpy RandomState instead of the global np.random and IMAGE_SIZE = the image
# size. Chains run on PIL images as in the paper's training script (augmix.py `aug`); its float
# round trip between ops (augment_and_mix.py `apply_op`) is lossless on 8-bit images.

def paper_ops(rng, image_size):
    """The paper's 13 ops in `augmentations_all` order, drawing from `rng`."""
    def int_parameter(level, maxval): return int(level * maxval / 10)
    def float_parameter(level, maxval): return float(level) * maxval / 10.
    def sample_level(n): return rng.uniform(low=0.1, high=n)

    def autocontrast(pil_img, _): return ImageOps.autocontrast(pil_img)
    def equalize(pil_img, _): return ImageOps.equalize(pil_img)

    def posterize(pil_img, level):
        level = int_parameter(sample_level(level), 4)
        return ImageOps.posterize(pil_img, 4 - level)

    def rotate(pil_img, level):
        degrees = int_parameter(sample_level(level), 30)
        if rng.uniform() > 0.5:
            degrees = -degrees
        return pil_img.rotate(degrees, resample=Image.BILINEAR)

    def solarize(pil_img, level):
        level = int_parameter(sample_level(level), 256)
        return ImageOps.solarize(pil_img, 256 - level)

    def shear_x(pil_img, level):
        level = float_parameter(sample_level(level), 0.3)
        if rng.uniform() > 0.5:
            level = -level
        return pil_img.transform(image_size, Image.AFFINE, (1, level, 0, 0, 1, 0), resample=Image.BILINEAR)

    def shear_y(pil_img, level):
        level = float_parameter(sample_level(level), 0.3)
        if rng.uniform() > 0.5:
            level = -level
        return pil_img.transform(image_size, Image.AFFINE, (1, 0, 0, level, 1, 0), resample=Image.BILINEAR)

    def translate_x(pil_img, level):
        level = int_parameter(sample_level(level), image_size[0] / 3)
        if rng.random() > 0.5:
            level = -level
        return pil_img.transform(image_size, Image.AFFINE, (1, 0, level, 0, 1, 0), resample=Image.BILINEAR)

    def translate_y(pil_img, level):
        level = int_parameter(sample_level(level), image_size[1] / 3)
        if rng.random() > 0.5:
            level = -level
        return pil_img.transform(image_size, Image.AFFINE, (1, 0, 0, 0, 1, level), resample=Image.BILINEAR)

    def color(pil_img, level):
        level = float_parameter(sample_level(level), 1.8) + 0.1
        return ImageEnhance.Color(pil_img).enhance(level)

    def contrast(pil_img, level):
        level = float_parameter(sample_level(level), 1.8) + 0.1
        return ImageEnhance.Contrast(pil_img).enhance(level)

    def brightness(pil_img, level):
        level = float_parameter(sample_level(level), 1.8) + 0.1
        return ImageEnhance.Brightness(pil_img).enhance(level)

    def sharpness(pil_img, level):
        level = float_parameter(sample_level(level), 1.8) + 0.1
        return ImageEnhance.Sharpness(pil_img).enhance(level)

    return [autocontrast, equalize, posterize, rotate, solarize, shear_x, shear_y,
            translate_x, translate_y, color, contrast, brightness, sharpness]


def paper_augment_and_mix(image, rng, severity=3, width=3, depth=-1, alpha=1., all_ops=False):
    """augment_and_mix of the paper on one uint8 [H, W, C] image -> float [H, W, C] in [0, 1]."""
    pil_img = Image.fromarray(image)
    augmentations = paper_ops(rng, pil_img.size)
    augmentations = augmentations if all_ops else augmentations[:9]
    ws = np.float32(rng.dirichlet([alpha] * width))
    m = np.float32(rng.beta(alpha, alpha))
    mix = np.zeros(image.shape, np.float32)
    for i in range(width):
        image_aug = pil_img.copy()
        d = depth if depth > 0 else rng.randint(1, 4)
        for _ in range(d):
            op = augmentations[rng.randint(len(augmentations))]
            image_aug = op(image_aug, severity)
        mix += ws[i] * (np.asarray(image_aug, np.float32) / 255)
    return (1 - m) * (image.astype(np.float32) / 255) + m * mix


def mean_change(augmented, images):
    """Mean absolute change per image of a float batch against the uint8 originals."""
    return (augmented - images).abs().flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# Strength: the same distribution of changes as the paper's code on real photos.

@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('all_ops', [False, True])
def test_mean_change_matches_paper_augment_and_mix(size, all_ops):
    crops = photo_crops(200, size, size, seed=size)
    draws = 10  # 2000 augmentations a side: the mean change varies a lot from draw to draw
    rng = np.random.RandomState(0)
    paper = np.mean([np.abs(paper_augment_and_mix(image, rng, all_ops=all_ops) - image / 255).mean()
                     for _ in range(draws) for image in crops])
    x = to_tensor(crops).repeat(draws, 1, 1, 1)
    ours = mean_change(augmix(x, all_ops=all_ops, generator=torch.Generator().manual_seed(0)), x).mean().item()
    assert ours == pytest.approx(paper, rel=0.1)


# ---------------------------------------------------------------------------------------------
# Sampling: per-image draws with the paper's distributions.

def paper_arguments(name, size, level):
    """Unsigned arguments of op `name` for the levels `level` by the paper's formulas (augmentations.py)."""
    formula = {'posterize': lambda: 4 - (level * 4 / 10).astype(int),
               'rotate': lambda: (level * 30 / 10).astype(int),
               'solarize': lambda: (256 - (level * 256 / 10).astype(int)) / 255,
               'shear_x': lambda: level * 0.3 / 10,
               'shear_y': lambda: level * 0.3 / 10,
               'translate_x': lambda: (level * (size / 3) / 10).astype(int),
               'translate_y': lambda: (level * (size / 3) / 10).astype(int),
               'color': lambda: level * 1.8 / 10 + 0.1,
               'contrast': lambda: level * 1.8 / 10 + 0.1,
               'brightness': lambda: level * 1.8 / 10 + 0.1,
               'sharpness': lambda: level * 1.8 / 10 + 0.1}[name]
    return np.float64(formula())


def largest_cdf_gap(sample, reference):
    """Kolmogorov-Smirnov distance between two samples (works for discrete ones too)."""
    values = np.union1d(sample, reference)
    cdf = lambda s: np.searchsorted(np.sort(s), values, side='right') / len(s)
    return np.abs(cdf(sample) - cdf(reference)).max()


@pytest.mark.parametrize('severity', [1, 3, 10])
def test_sampled_parameters_follow_the_paper(severity):
    batch, width, size = 4000, 3, 96
    params = sample_augmix(batch, size, size, severity=severity, width=width, all_ops=True,
                           generator=torch.Generator().manual_seed(severity))
    assert params.chain_weights.shape == (batch, width) and params.blend.shape == (batch,)
    assert params.op_index.shape == params.op_argument.shape == (batch, width, 3)
    assert params.chain_weights.dtype == params.blend.dtype == params.op_argument.dtype == torch.float64
    assert torch.allclose(params.chain_weights.sum(1), torch.ones(batch, dtype=torch.float64))
    assert (params.chain_weights >= 0).all() and ((params.blend >= 0) & (params.blend <= 1)).all()
    # Dirichlet(1, 1, 1) and Beta(1, 1): every weight uniform-ish with mean 1/width and 1/2.
    assert params.chain_weights.mean().item() == pytest.approx(1 / width, abs=0.01)
    assert params.blend.mean().item() == pytest.approx(0.5, abs=0.02)
    # Depth 1..3, uniform, and no op only after a chain's last op.
    active = params.op_index != NO_OP
    depth = active.sum(-1)
    assert active[..., 0].all() and (active[..., :-1] >= active[..., 1:]).all()
    for d in (1, 2, 3):
        assert (depth == d).float().mean().item() == pytest.approx(1 / 3, abs=0.02)
    assert (params.op_argument[~active] == 0).all()
    ops_drawn = params.op_index[active]
    frequency = torch.bincount(ops_drawn, minlength=len(OP_NAMES)).float() / len(ops_drawn)
    assert torch.allclose(frequency, torch.full((13,), 1 / 13), atol=0.01)
    for index, name in enumerate(OP_NAMES):
        argument = params.op_argument[params.op_index == index]
        if name in ('autocontrast', 'equalize'):
            assert (argument == 0).all()
            continue
        # the paper's sample_level(severity): uniform in [0.1, severity)
        paper = paper_arguments(name, size, np.random.RandomState(1).uniform(0.1, severity, 20000))
        bounds = np.sort(paper_arguments(name, size, np.array([0.1, severity])))
        drawn = argument.abs().numpy()
        if name in ('posterize', 'solarize', 'rotate', 'translate_x', 'translate_y'):
            np.testing.assert_array_equal(np.unique(drawn), np.unique(paper))
        assert bounds[0] - 1e-6 <= drawn.min() and drawn.max() <= bounds[1] + 1e-6, name
        assert largest_cdf_gap(drawn, paper) < 0.05, name
        if OPS[name].signed:  # a random sign, p = 0.5 (a zero argument has none)
            assert (argument[argument != 0] < 0).float().mean().item() == pytest.approx(0.5, abs=0.05), name
        else:
            assert (argument >= 0).all(), name


def test_paper_op_set_and_fixed_depth():
    params = sample_augmix(3000, 32, 32, width=2, depth=2, generator=torch.Generator().manual_seed(0))
    assert params.op_index.shape == (3000, 2, 2)
    assert (params.op_index >= 0).all() and (params.op_index < PAPER_OP_COUNT).all()
    assert len(params.op_index.unique()) == PAPER_OP_COUNT
    assert OP_NAMES[:PAPER_OP_COUNT] == ('autocontrast', 'equalize', 'posterize', 'rotate', 'solarize',
                                         'shear_x', 'shear_y', 'translate_x', 'translate_y')


def test_translate_uses_width_and_height():
    params = sample_augmix(4000, 30, 90, severity=10, all_ops=True, generator=torch.Generator().manual_seed(0))
    shift_x = params.op_argument[params.op_index == OP_NAMES.index('translate_x')].abs()
    shift_y = params.op_argument[params.op_index == OP_NAMES.index('translate_y')].abs()
    assert shift_x.max() == 29 and shift_y.max() == 9  # int(level * (W / 3) / 10), int(level * (H / 3) / 10)


# ---------------------------------------------------------------------------------------------
# Application: a draw replays exactly what the kernels do.

KERNELS = {
    'autocontrast': lambda x, a, fill: ops.autocontrast(x),
    'equalize': lambda x, a, fill: ops.equalize(x),
    'posterize': lambda x, a, fill: ops.posterize(x, a),
    'solarize': lambda x, a, fill: ops.solarize(x, a),
    'rotate': lambda x, a, fill: geometry.rotate(x, a, fill),
    'shear_x': lambda x, a, fill: geometry.shear_x(x, a, fill),
    'shear_y': lambda x, a, fill: geometry.shear_y(x, a, fill),
    'translate_x': lambda x, a, fill: geometry.translate_x(x, a, fill),
    'translate_y': lambda x, a, fill: geometry.translate_y(x, a, fill),
    'color': lambda x, a, fill: ops.color(x, a),
    'contrast': lambda x, a, fill: ops.contrast(x, a),
    'brightness': lambda x, a, fill: ops.brightness(x, a),
    'sharpness': lambda x, a, fill: ops.sharpness(x, a),
}
ARGUMENTS = {'autocontrast': [0., 0., 0.], 'equalize': [0., 0., 0.], 'posterize': [4., 3., 2.],
             'solarize': [1., 0.5, 200 / 255], 'rotate': [-9., 0., 21.], 'shear_x': [0.3, -0.12, 0.05],
             'shear_y': [-0.3, 0.07, 0.2], 'translate_x': [-5., 2., 7.], 'translate_y': [3., -6., 0.],
             'color': [0.1, 1.0, 1.9], 'contrast': [0.3, 1.5, 1.9], 'brightness': [0.1, 0.8, 1.9],
             'sharpness': [0.1, 1.0, 1.9]}


@pytest.fixture(scope='module')
def crops():
    """Three real 24 x 20 crops (non-square, so height and width cannot be swapped unnoticed)."""
    return to_tensor(photo_crops(3, 24, 20, seed=3))


@pytest.mark.parametrize('name', OP_NAMES)
def test_single_op_draw_equals_the_kernel(name, crops):
    fill = (0.2, 0.5, 0.8)
    argument = torch.tensor(ARGUMENTS[name])
    params = AugMixParams(chain_weights=torch.ones(3, 1), blend=torch.ones(3),
                          op_index=torch.full((3, 1, 1), OP_NAMES.index(name)), op_argument=argument.view(3, 1, 1))
    expected = KERNELS[name](crops, argument, fill)
    torch.testing.assert_close(apply_augmix(crops, params, fill=fill), expected, atol=1e-6, rtol=0)


def replay_per_image(x, params, fill):
    """The paper's loop, one image and one chain at a time, on our kernels: the meaning of a draw."""
    mixed = []
    for b in range(len(x)):
        image = x[b:b + 1]
        mix = torch.zeros_like(image)
        for chain in range(params.width):
            augmented = image
            for step in range(params.steps):
                index = int(params.op_index[b, chain, step])
                if index != NO_OP:
                    argument = params.op_argument[b, chain, step].view(1)
                    augmented = KERNELS[OP_NAMES[index]](augmented, argument, fill)
            mix += params.chain_weights[b, chain] * augmented
        mixed.append((1 - params.blend[b]) * image + params.blend[b] * mix)
    return torch.cat(mixed)


@pytest.mark.parametrize('depth', [-1, 4])
def test_apply_equals_per_image_replay(depth):
    x = to_tensor(photo_crops(24, 16, 12, seed=4))
    params = sample_augmix(24, 16, 12, severity=6, width=4, depth=depth, all_ops=True,
                           generator=torch.Generator().manual_seed(1))
    fill = 0.3
    torch.testing.assert_close(apply_augmix(x, params, fill), replay_per_image(x, params, fill),
                               atol=1e-5, rtol=0)


def test_grayscale_images(crops):
    x = to_tensor(to_grayscale(photo_crops(10, 16, 16, seed=5)))
    params = sample_augmix(10, 16, 16, all_ops=True, generator=torch.Generator().manual_seed(2))
    out = apply_augmix(x, params, fill=[0.5])
    assert out.shape == x.shape
    torch.testing.assert_close(out, replay_per_image(x, params, [0.5]), atol=1e-5, rtol=0)


def test_blocks_do_not_change_the_result(monkeypatch):
    """On CPU the batch runs in memory-sized blocks; any block size gives the same images."""
    x = to_tensor(photo_crops(13, 20, 20, seed=6))
    params = sample_augmix(13, 20, 20, generator=torch.Generator().manual_seed(3))
    whole = apply_augmix(x, params)
    monkeypatch.setattr(torch_apply, '_CPU_BLOCK_BYTES', 3 * 3 * 20 * 20 * 4 * 2)  # 2 images per block
    torch.testing.assert_close(apply_augmix(x, params), whole, atol=0, rtol=0)


def test_fractional_translations_in_params_are_interpolated(crops):
    """sample_augmix draws whole pixels, but hand-made params may not: they take the interpolating kernels."""
    for name, values in (('translate_x', [0.5, -2.25, 3.]), ('translate_y', [-0.75, 1.5, -4.])):
        argument = torch.tensor(values, dtype=torch.float64)
        params = AugMixParams(chain_weights=torch.ones(3, 1), blend=torch.ones(3),
                              op_index=torch.full((3, 1, 1), OP_NAMES.index(name)), op_argument=argument.view(3, 1, 1))
        expected = KERNELS[name](crops, argument, 0.4)
        torch.testing.assert_close(apply_augmix(crops, params, fill=0.4), expected, atol=1e-6, rtol=0)


def test_mixing_at_the_end_equals_mixing_each_chain_after_its_last_op(monkeypatch):
    """CPU mixes a chain in right after its last op; other devices after all steps (the CUDA path, run on CPU)."""
    x = to_tensor(photo_crops(20, 18, 26, seed=13))
    params = sample_augmix(20, 18, 26, severity=8, width=4, all_ops=True, generator=torch.Generator().manual_seed(4))
    early = apply_augmix(x, params, 0.3)
    monkeypatch.setattr(torch_apply, '_mixes_early', lambda device: False)
    torch.testing.assert_close(apply_augmix(x, params, 0.3), early, atol=1e-6, rtol=0)


@pytest.mark.parametrize('shape', [(5, 3, 1, 1), (5, 1, 1, 9), (5, 3, 7, 1), (5, 1, 2, 3)])
def test_tiny_images_equal_per_image_replay(shape):
    """Images smaller than a row window's overhang: the padding between them must still keep them apart."""
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    params = sample_augmix(shape[0], shape[2], shape[3], severity=10, width=3, depth=4, all_ops=True,
                           generator=torch.Generator().manual_seed(6))
    fill = [0.7] * shape[1]
    torch.testing.assert_close(apply_augmix(x, params, fill), replay_per_image(x, params, fill), atol=1e-5, rtol=0)


def test_half_precision_is_augmented_in_float32():
    x = to_tensor(photo_crops(6, 24, 24, seed=14))
    params = sample_augmix(6, 24, 24, all_ops=True, generator=torch.Generator().manual_seed(7))
    half = x.half()
    out = apply_augmix(half, params, 0.5)
    assert out.dtype == torch.float16 and torch.equal(half, x.half())
    # The same float32 computation on the same values: only the final rounding to float16 differs.
    assert (out.float() - apply_augmix(half.float(), params, 0.5)).abs().max() <= 2 ** -11


# ---------------------------------------------------------------------------------------------
# Per-image randomness: a batch never shares an op chain.

def test_identical_images_get_different_augmentations():
    image = to_tensor(photo_crops(1, 32, 32, seed=7))
    x = image.expand(16, -1, -1, -1)
    out = augmix(x, generator=torch.Generator().manual_seed(0))
    distances = torch.cdist(out.flatten(1), out.flatten(1))
    assert (distances + torch.eye(16) > 1e-3).all()


def test_ops_differ_per_image_where_torchvision_shares_one_chain(monkeypatch):
    """With the mixing weights made equal for every image, only the op chains can differ."""
    batch = 16
    image = photo_crops(1, 32, 32, seed=8)
    # torchvision's AugMix draws one op chain per call for the whole batch.
    uniform_weights = lambda self, params: params / params.sum(-1, keepdim=True)
    monkeypatch.setattr(v2.AugMix, '_sample_dirichlet', uniform_weights)
    torch.manual_seed(0)
    batch_uint8 = torch.from_numpy(image).permute(0, 3, 1, 2).expand(batch, -1, -1, -1).contiguous()
    theirs = v2.AugMix(all_ops=False)(batch_uint8)
    assert (theirs == theirs[:1]).all()
    assert not (theirs == batch_uint8).all()
    # Ours, replayed with the same shared weights: every image its own chain.
    x = to_tensor(image).expand(batch, -1, -1, -1)
    params = sample_augmix(batch, 32, 32, generator=torch.Generator().manual_seed(0))
    shared = AugMixParams(torch.full((batch, 3), 1 / 3), torch.full((batch,), 0.5), params.op_index,
                          params.op_argument)
    ours = apply_augmix(x, shared)
    distances = torch.cdist(ours.flatten(1), ours.flatten(1))
    assert (distances + torch.eye(batch) > 1e-3).all()


# ---------------------------------------------------------------------------------------------
# Reproducibility and tensor hygiene.

def test_same_seed_same_output():
    x = to_tensor(photo_crops(8, 24, 24, seed=9))
    first = augmix(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, augmix(x, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augmix(x, generator=torch.Generator().manual_seed(6)))


def test_fastai_set_seed_makes_it_reproducible():
    from fastai.torch_core import set_seed
    x = to_tensor(photo_crops(8, 24, 24, seed=10))
    set_seed(42)
    first = augmix(x, all_ops=True)
    set_seed(42)
    assert torch.equal(first, augmix(x, all_ops=True))


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_keeps_shape_dtype_and_input(dtype):
    x = to_tensor(photo_crops(6, 20, 28, seed=11)).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    original = x.clone()
    out = augmix(x, severity=10, width=2, depth=3, alpha=0.5, all_ops=True, fill=(0.1, 0.2, 0.3),
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.equal(x, original)
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_empty_batch():
    x = torch.rand(0, 3, 8, 8)
    assert augmix(x).shape == (0, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_matches_cpu_with_a_cpu_generator():
    x = to_tensor(photo_crops(32, 32, 32, seed=12))
    on_cpu = augmix(x, all_ops=True, fill=0.5, generator=torch.Generator().manual_seed(0))
    on_gpu = augmix(x.cuda(), all_ops=True, fill=0.5, generator=torch.Generator().manual_seed(0))
    assert on_gpu.device.type == 'cuda'
    # Same draw: equal up to float rounding, except where a rounding flips a posterize, solarize or
    # equalize level of a pixel that a previous op left exactly on the boundary.
    difference = (on_gpu.cpu() - on_cpu).abs()
    assert difference.mean() < 1e-4 and (difference > 1e-4).float().mean() < 1e-3
    cuda_generator = torch.Generator(device='cuda')
    first = augmix(x.cuda(), generator=cuda_generator.manual_seed(1))
    assert torch.equal(first, augmix(x.cuda(), generator=cuda_generator.manual_seed(1)))


# ---------------------------------------------------------------------------------------------
# Bad input: a ValueError or TypeError naming the argument and its value, before any work.

BAD_ARGUMENTS = [
    (dict(severity=0), ValueError, 'severity'), (dict(severity=11), ValueError, 'severity'),
    (dict(width=0), ValueError, 'width'), (dict(width=1.5), ValueError, 'width'),
    (dict(depth=0), ValueError, 'depth'), (dict(depth=11), ValueError, 'depth'),
    (dict(depth=-2), ValueError, 'depth'), (dict(alpha=0.), ValueError, 'alpha'),
    (dict(alpha=-1.), ValueError, 'alpha'), (dict(all_ops='yes'), TypeError, 'all_ops'),
    (dict(fill=(0.1, 0.2)), ValueError, 'fill'), (dict(fill='black'), TypeError, 'fill'),
    (dict(generator=0), TypeError, 'generator'),
]


@pytest.mark.parametrize('kwargs, error, name', BAD_ARGUMENTS)
def test_bad_arguments_raise_before_any_work(kwargs, error, name):
    x = torch.rand(2, 3, 8, 8)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    kwargs.setdefault('generator', generator)
    with pytest.raises(error, match=name) as info:
        augmix(x, **kwargs)
    value = next(iter(v for k, v in kwargs.items() if k != 'generator' or name == 'generator'))
    assert repr(value) in str(info.value) or type(value).__name__ in str(info.value)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize('x, error, words', [
    (np.zeros((2, 3, 8, 8), np.float32), TypeError, 'Tensor'),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, 'float'),
    (torch.zeros(3, 8, 8), ValueError, 'B, C, H, W'),
    (torch.zeros(2, 2, 8, 8), ValueError, 'channels'),
    (torch.zeros(2, 8, 8, 3), ValueError, 'channels'),
    (torch.full((2, 3, 8, 8), -1.5), ValueError, 'normalized'),
    (torch.full((2, 3, 8, 8), 255.), ValueError, 'normalized'),
])
def test_bad_images_raise(x, error, words):
    with pytest.raises(error, match=words):
        augmix(x)


def test_slightly_out_of_range_values_are_accepted():
    x = torch.rand(2, 3, 8, 8) * 1.01 - 0.005
    assert augmix(x).shape == x.shape


def test_bad_params_raise():
    x = torch.rand(2, 3, 8, 8)
    params = sample_augmix(2, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match='B = 3'):
        apply_augmix(torch.rand(3, 3, 8, 8), params)
    with pytest.raises(ValueError, match='op_index'):
        apply_augmix(x, AugMixParams(params.chain_weights, params.blend, params.op_index + 20, params.op_argument))
    with pytest.raises(ValueError, match='chain_weights'):
        apply_augmix(x, AugMixParams(params.chain_weights[:, :2], params.blend, params.op_index, params.op_argument))
    with pytest.raises(TypeError, match='AugMixParams'):
        apply_augmix(x, {'blend': params.blend})
    with pytest.raises(ValueError, match='batch_size'):
        sample_augmix(-1, 8, 8)


def one_op_params(name, argument, batch=2, **overrides):
    """Hand-made params: every image gets the single op `name` with `argument`."""
    fields = dict(chain_weights=torch.ones(batch, 1), blend=torch.full((batch,), 0.5),
                  op_index=torch.full((batch, 1, 1), OP_NAMES.index(name)),
                  op_argument=torch.full((batch, 1, 1), float(argument), dtype=torch.float64))
    fields.update(overrides)
    return AugMixParams(**fields)


@pytest.mark.parametrize('params, words', [
    (one_op_params('posterize', 0), 'posterize'),
    (one_op_params('posterize', 2.5), 'posterize'),
    (one_op_params('solarize', 1.5), 'solarize'),
    (one_op_params('rotate', float('nan')), 'finite'),
    (one_op_params('translate_x', float('nan')), 'finite'),
    (one_op_params('shear_y', float('inf')), 'finite'),
    (one_op_params('color', float('nan')), 'finite'),
    (one_op_params('brightness', 1., chain_weights=torch.full((2, 1), 5.)), 'chain_weights'),
    (one_op_params('brightness', 1., chain_weights=torch.tensor([[0.5], [float('nan')]])), 'chain_weights'),
    (one_op_params('brightness', 1., blend=torch.tensor([0.5, float('nan')])), 'blend'),
    (one_op_params('brightness', 1., blend=torch.tensor([0.5, 1.5])), 'blend'),
    (one_op_params('brightness', 1., op_argument=torch.ones(2, 1, 1, dtype=torch.int64)), 'float'),
])
def test_hand_made_param_values_are_checked(params, words):
    """Values sample_augmix never draws would give black, all-fill, NaN or out-of-range images."""
    with pytest.raises((ValueError, TypeError), match=words):
        apply_augmix(torch.rand(2, 3, 8, 8), params)


def test_valid_hand_made_params_pass_the_checks():
    out = apply_augmix(torch.rand(2, 3, 8, 8), one_op_params('posterize', 1))
    assert out.shape == (2, 3, 8, 8)


def test_sampled_params_skip_the_value_checks(monkeypatch):
    """The checks cost a host sync on a GPU: params drawn by sample_augmix are valid by construction."""
    augment = sys.modules[apply_augmix.__module__]  # fastai_jsd.augment, where apply_augmix looks the check up

    def refuse(params):
        raise AssertionError('sampled params were checked')
    monkeypatch.setattr(augment, 'check_param_values', refuse)
    x = torch.rand(3, 3, 8, 8)
    augmix(x)
    apply_augmix(x, sample_augmix(3, 8, 8).to('cpu'))
    with pytest.raises(AssertionError):
        apply_augmix(x, one_op_params('rotate', 3., batch=3))


@pytest.mark.parametrize('fill', [5.0, -0.5, float('nan'), float('inf'), (0.1, 2.0, 0.3), torch.tensor([1.5])])
def test_fill_must_be_a_colour_in_the_unit_range(fill):
    with pytest.raises(ValueError, match='fill'):
        augmix(torch.rand(2, 3, 8, 8), fill=fill)
    with pytest.raises(ValueError, match='fill'):
        ops.rotate(torch.rand(2, 3, 8, 8), 30., fill=fill)


def test_nan_pixels_raise_in_apply_augmix_too():
    x = torch.rand(2, 3, 8, 8)
    x[0, 1, 2, 2] = float('nan')
    with pytest.raises(ValueError, match='NaN'):
        apply_augmix(x, one_op_params('equalize', 0.))


def test_inputs_that_require_grad_are_augmented_without_autograd():
    """Augmentation is not differentiable: the result is a plain tensor, and x is left as it was."""
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    for out in (augmix(x, all_ops=True), apply_augmix(x, sample_augmix(2, 8, 8, all_ops=True))):
        assert out.shape == x.shape and not out.requires_grad
    assert x.grad is None


# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_benchmark_runs_quick():
    result = subprocess.run([sys.executable, str(REPO / 'examples' / 'benchmark_augmix.py'), '--quick'],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    table = [line for line in result.stdout.splitlines() if line.startswith('|')]
    assert len(table) == 2 + 3
    assert 'timm' in table[2] and 'torchvision' in table[3] and 'fastai_jsd' in table[4]


def test_nan_images_raise():
    x = torch.rand(2, 3, 8, 8)
    x[1, 0, 3, 3] = float('nan')
    with pytest.raises(ValueError, match='nan'):
        augmix(x)
