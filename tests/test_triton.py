"""The fused Triton backend against the torch backend: the same params must give the same pixels.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before Triton is imported), which is slow, so the images here are small;
the torch backend is itself checked against PIL in test_augmix.py and test_ops_*.py. The tests
marked `cuda` run the compiled kernels and need a GPU (skipped without one).
"""
import sys
import warnings

import pytest
import torch

from _images import photo_crops, to_grayscale, to_tensor
from fastai_jsd import AugMixCallback
from fastai_jsd.augment import (NO_OP, OP_NAMES, AugMixParams, apply_augmix, augmix, backends, op_set, resolve_backend,
                                sample_augmix, sampling)

triton_apply = pytest.importorskip('fastai_jsd.augment.triton_apply', reason='Triton is not installed')
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
LEVEL = 1 / 255
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
pytestmark = pytest.mark.skipif(
    DEVICE == 'cpu' and not backends.triton_interprets(triton_apply),
    reason='Triton was imported before TRITON_INTERPRET=1 was set, so its kernels need a GPU')


def images(n, height, width, channels=3, seed=0):
    """`n` real photo crops in [0, 1] (multiples of 1/255) on the test device."""
    crops = photo_crops(n, height, width, seed=seed)
    return to_tensor(crops if channels == 3 else to_grayscale(crops)).to(DEVICE)


def both_backends(x, params, fill=0.):
    return (apply_augmix(x, params, fill, backend='torch'), apply_augmix(x, params, fill, backend='triton'))


def single_op_params(names_and_arguments):
    """Hand-made params: image i gets the one op and argument of `names_and_arguments[i]`."""
    count = len(names_and_arguments)
    index = torch.tensor([OP_NAMES.index(name) for name, _ in names_and_arguments])
    argument = torch.tensor([value for _, value in names_and_arguments], dtype=torch.float64)
    return AugMixParams(torch.ones(count, 1), torch.ones(count), index.view(count, 1, 1),
                        argument.view(count, 1, 1)).to(DEVICE)


def test_the_kernels_number_the_ops_as_the_sampler_does():
    assert triton_apply.OP_ORDER == OP_NAMES


# Three arguments per op: typical, extreme and hand-made values sample_augmix never draws
# (fractional translations, a rotation by a fraction of a degree, shifts beyond the image).
ARGUMENTS = {'autocontrast': [0., 0., 0.], 'equalize': [0., 0., 0.], 'posterize': [4., 1., 8.],
             'solarize': [1., 0.5, 200 / 255], 'rotate': [-9., 0.3, 181.5], 'shear_x': [0.3, -0.12, 0.9],
             'shear_y': [-0.3, 0.07, 2.5], 'translate_x': [-5., 2.5, 70.], 'translate_y': [3., -6.25, -40.],
             'color': [0.1, 1.0, 1.9], 'contrast': [0.3, 1.5, 1.9], 'brightness': [0.1, 0.8, 1.9],
             'sharpness': [0.1, 1.0, 1.9]}


@pytest.mark.parametrize('channels, fill', [(3, (0.2, 0.5, 0.8)), (1, 0.6)])
def test_every_op_alone_matches_the_torch_backend(channels, fill):
    draws = [(name, value) for name in OP_NAMES for value in ARGUMENTS[name]]
    x = images(3, 14, 11, channels, seed=1).repeat(len(OP_NAMES), 1, 1, 1)  # non-square: H, W cannot swap
    reference, fused = both_backends(x, single_op_params(draws), fill)
    difference = (reference - fused).abs().flatten(1).amax(dim=1)
    for (name, value), worst in zip(draws, difference.tolist()):
        # Measured: 0 for the point ops and whole-pixel translations, < 2e-4 levels for the interpolations.
        assert worst <= 1e-3 * LEVEL, f'{name}({value}): {worst * 255:.2g} levels apart'
    assert not torch.equal(fused, x)


@pytest.mark.parametrize('all_ops', [False, True])
@pytest.mark.parametrize('channels, fill', [(3, 0.3), (3, (0.1, 0.5, 0.9)), (1, 0.7)])
def test_random_draws_match_the_torch_backend(all_ops, channels, fill):
    x = images(8, 15, 12, channels, seed=2)
    params = sample_augmix(8, 15, 12, severity=8, width=3, all_ops=all_ops,
                           generator=torch.Generator().manual_seed(channels + all_ops)).to(DEVICE)
    reference, fused = both_backends(x, params, fill)
    assert (reference - fused).abs().max() <= LEVEL


@pytest.mark.parametrize('depth, width', [(1, 1), (5, 2)])
def test_chain_lengths(depth, width):
    x = images(5, 12, 13, seed=3)
    params = sample_augmix(5, 12, 13, severity=10, width=width, depth=depth, all_ops=True,
                           generator=torch.Generator().manual_seed(depth)).to(DEVICE)
    reference, fused = both_backends(x, params, 0.5)
    assert (reference - fused).abs().max() <= LEVEL


def test_steps_that_change_nothing_anywhere_in_a_chain():
    """Hand-made chains may skip a step in the middle (NO_OP) or move by 0: the image stays where it was."""
    names = [['rotate', 'shear_x', 'equalize', 'translate_y'],
             ['posterize', 'translate_x', 'sharpness', 'rotate'],
             ['equalize', 'autocontrast', 'rotate', 'shear_y']]
    index = torch.tensor([[OP_NAMES.index(name) for name in chain] for chain in names])
    index[0, 0] = NO_OP
    index[2, 1] = NO_OP
    argument = torch.tensor([[0., 0.2, 0., 3.], [2., 0., 1.7, -30.], [0., 0., 0., 0.]], dtype=torch.float64)
    params = AugMixParams(torch.tensor([[0.5, 0.25, 0.25]]).expand(2, 3).contiguous(), torch.tensor([0.8, 0.4]),
                          index.expand(2, 3, 4).contiguous(), argument.expand(2, 3, 4).contiguous()).to(DEVICE)
    reference, fused = both_backends(images(2, 16, 16, seed=4), params, 0.25)
    assert (reference - fused).abs().max() <= 1e-3 * LEVEL


@pytest.mark.parametrize('shape', [(3, 3, 1, 1), (3, 1, 2, 3), (2, 3, 3, 2), (2, 1, 1, 9)])
def test_tiny_images(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    params = sample_augmix(shape[0], shape[2], shape[3], severity=10, width=3, depth=4, all_ops=True,
                           generator=torch.Generator().manual_seed(6)).to(DEVICE)
    reference, fused = both_backends(x, params, 0.7)
    assert (reference - fused).abs().max() <= LEVEL


@pytest.mark.parametrize('dtype, tolerance', [(torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7),
                                              (torch.float64, 1e-3 * LEVEL)])
def test_other_float_dtypes(dtype, tolerance):
    """Half precision is augmented in float32 on both paths; float64 in float32 here (in float64 by torch)."""
    x = images(6, 13, 16, seed=7).to(dtype)
    params = sample_augmix(6, 13, 16, all_ops=True, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    reference, fused = both_backends(x, params, 0.5)
    assert fused.dtype == dtype and fused.shape == x.shape
    assert (reference.double() - fused.double()).abs().max() <= tolerance


def test_memory_layouts_give_the_same_pixels():
    x = images(4, 12, 18, seed=8)
    params = sample_augmix(4, 12, 9, all_ops=True, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    strided = x[:, :, :, ::2]  # a view with a column stride of 2
    contiguous = apply_augmix(strided.contiguous(), params, backend='triton')
    assert torch.equal(apply_augmix(strided, params, backend='triton'), contiguous)
    channels_last = strided.contiguous(memory_format=torch.channels_last)
    assert torch.equal(apply_augmix(channels_last, params, backend='triton'), contiguous)


def test_nan_pixels_cannot_index_outside_the_tables():
    """apply_augmix rejects NaN on CPU; the kernels themselves must still not read out of bounds."""
    x = images(2, 10, 10, seed=9)
    x[0, :, 2:5, 3] = float('nan')
    draws = [('equalize', 0.), ('autocontrast', 0.)]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)  # the interpreter's numpy casts NaN to int
        out = triton_apply.apply_augmix(x, single_op_params(draws), torch.zeros(3, device=DEVICE))
    assert out.shape == x.shape
    assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize('geometric', [True, False])
@pytest.mark.parametrize('all_ops', [False, True])
def test_fused_sampler_equals_the_torch_sampler(geometric, all_ops):
    """sample_augmix turns its draws into ops and arguments in one kernel on CUDA: the same float64 values."""
    generator = torch.Generator().manual_seed(10)
    allowed = op_set(all_ops, geometric)
    shape = (300, 3, 4)
    slot = torch.randint(0, len(allowed), shape, generator=generator).to(DEVICE)
    level = torch.rand(shape, generator=generator, dtype=torch.float64).mul_(10 - 0.1).add_(0.1).to(DEVICE)
    sign_draw = torch.rand(shape, generator=generator, dtype=torch.float64).to(DEVICE)
    depth = torch.randint(1, 5, shape[:2], generator=generator).to(DEVICE)
    expected = sampling._arguments(slot, level, sign_draw > 0.5, depth, allowed, 37, 224)
    fused = triton_apply.sample_arguments(slot, level, sign_draw, depth, 37, 224, geometric)
    assert torch.equal(fused[0], expected[0])
    assert torch.equal(fused[1], expected[1])


def test_augmix_with_the_triton_backend_replays_its_draw():
    x = images(4, 12, 12, seed=11)
    out = augmix(x, all_ops=True, generator=torch.Generator(DEVICE).manual_seed(3), backend='triton')
    params = sample_augmix(4, 12, 12, all_ops=True, generator=torch.Generator(DEVICE).manual_seed(3),
                           device=DEVICE)
    assert torch.equal(out, apply_augmix(x, params, backend='triton'))
    assert not torch.equal(out, x)


def test_callback_backends_give_the_same_views():
    from fastai.torch_core import set_seed
    pixels = images(4, 12, 10, seed=12)
    views = {}
    for backend in ('torch', 'triton'):
        set_seed(0)
        views[backend] = AugMixCallback(backend=backend).augment_pixels(pixels)
    assert (views['torch'] - views['triton']).abs().max() <= LEVEL


def test_kernels_compile_for_a_gpu_within_their_register_budget():
    """CI has no GPU, and the interpreter runs kernels that would not compile: compile them for sm_90 here.

    At most 128 registers (so at least 16 warps fit on an SM to hide memory latency) and almost no
    spills, for every variant the launcher uses (see triton_apply.STEP_PIXELS).
    """
    import json
    import os
    import subprocess
    from pathlib import Path
    ptxas = Path(triton_apply.triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas'
    if not ptxas.exists():
        pytest.skip("this Triton install has no NVIDIA ptxas")
    script = Path(__file__).with_name('_compile_kernels.py')
    environment = dict(os.environ, TRITON_INTERPRET='0', PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    assert len(reports) == 8
    for report in reports:
        assert report['registers'] <= 128 and report['spills'] <= 16, report


# ---------------------------------------------------------------------------------------------
# Choosing the backend.

def test_default_backend_is_torch_on_cpu():
    assert resolve_backend(None, 'cpu') == 'torch'


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend must be 'torch'"):
        augmix(torch.rand(2, 3, 8, 8), backend='cuda')
    with pytest.raises(ValueError, match='backend must be one of'):
        AugMixCallback(backend='Triton')


def test_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(backends, 'triton_interprets', lambda kernels: False)
    with pytest.raises(ValueError, match='TRITON_INTERPRET=1'):
        augmix(torch.rand(2, 3, 8, 8), backend='triton')


def test_without_triton_cuda_falls_back_to_torch_and_triton_is_refused(monkeypatch):
    monkeypatch.setattr(backends, '_TRITON', [ImportError('No module named triton')])
    assert resolve_backend(None, 'cuda') == 'torch'
    with pytest.raises(ValueError, match='did not import'):
        resolve_backend('triton', 'cpu')


# ---------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels, their launches and host syncs.

def launches_per_call(function):
    """GPU kernels, copies and memsets one call of `function` starts (torch.profiler), after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile
    function()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


@cuda
@pytest.mark.parametrize('size, batch', [(32, 512), (224, 16)])
def test_gpu_backends_agree(size, batch):
    x = images(batch, size, size, seed=13)
    params = sample_augmix(batch, size, size, all_ops=True, device=DEVICE)
    reference, fused = both_backends(x, params, 0.4)
    assert (reference - fused).abs().max() <= LEVEL


@cuda
def test_augmix_on_gpu_never_waits_for_the_gpu():
    x = images(64, 32, 32, seed=14)
    augmix(x)  # compile and warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        augmix(x, all_ops=True, fill=(0.1, 0.2, 0.3))
        augmix(x, generator=torch.Generator('cuda').manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode('default')


@cuda
def test_augmix_launches_at_most_40_kernels_whatever_the_batch():
    for batch in (16, 1024):
        x = images(batch, 32, 32, seed=15)
        assert launches_per_call(lambda: augmix(x)) <= 40


@cuda
def test_callback_before_batch_never_waits_for_the_gpu():
    from fastai.vision.all import vision_learner, resnet18
    from fastai_jsd import JsdCrossEntropy
    from fastai_jsd.data import fashion_dls
    dls = fashion_dls(size=32, bs=16, device='cuda')
    learn = vision_learner(dls, resnet18, pretrained=False, loss_func=JsdCrossEntropy(), cbs=AugMixCallback())
    callback = learn.aug_mix
    xb, yb = dls.one_batch()
    learn.training = True
    callback.before_fit()
    for mode in ('default', 'error'):  # the first call compiles the kernels
        learn.xb, learn.yb = (xb,), (yb,)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode(mode)
        try:
            callback.before_batch()
        finally:
            torch.cuda.set_sync_debug_mode('default')
    assert learn.xb[0].shape[0] == 3 * xb.shape[0]
