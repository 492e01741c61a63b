"""The fused Triton backend against the torch backend: the same params must give the same pixels.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 before Triton is imported), which is slow, so the images here are small;
the torch backend is itself checked against PIL in test_augmix.py and test_ops_*.py. Without a GPU,
what the compiled kernels would do is checked twice more: _compile_kernels.py compiles the launcher's
own launches for sm_70 to sm_120, and fake CUDA tensors show which copies, host syncs, launches and devices a
call asks for. The tests marked `cuda` (named so: `pytest -k cuda` selects them) run the compiled
kernels and need a GPU (skipped without one).
"""
import sys
import warnings

import pytest
import torch

from _images import photo_crops, to_grayscale, to_tensor
from _syncs import count_syncs, sync_debug
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


def test_kernels_compile_for_the_gpus_users_have_as_launched_within_their_register_budget():
    """CI has no GPU, and the interpreter runs kernels that would not compile: compile them for real GPUs here.

    tests/_compile_kernels.py runs the launcher and compiles what it would launch, specialised as Triton's launcher
    specialises (an int equal to 1 becomes a constant: 1-pixel rows and columns, one chain, one step), once for each
    GPU in its TARGETS, from a V100 and a T4 (Colab, Kaggle) to an H200 and an RTX 50. Every variant must compile on
    each within 128 registers (so at least 16 warps fit on an SM to hide memory latency; on the V100, whose compiler
    takes more, 168: 12 warps) with almost no spills, and without approximate division or exp2, which would round
    differently from the torch backend (see triton_apply._divide).
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
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{')]
    for report in reports:
        assert report['architecture'].startswith(f"sm_{report['capability']}"), report  # compiled for that GPU
        assert report['registers'] <= (168 if report['capability'] < 75 else 128), report
        assert report['spills'] <= 16, report
        assert report['approximate'] == [], report
    capabilities = {report['capability'] for report in reports}
    assert {70, 75, 80, 86, 89, 90} <= capabilities, capabilities

    def variants(capability, kernel, **arguments):
        return [r for r in reports if r['capability'] == capability and r['kernel'] == kernel
                and all(r['arguments'][name] == value for name, value in arguments.items())]
    for capability in capabilities:
        for kernel in ('_statistics_kernel', '_step_kernel'):
            assert variants(capability, kernel, H=1) and variants(capability, kernel, W=1), capability
            assert variants(capability, kernel, width=1) and variants(capability, kernel, C=1), capability
            assert variants(capability, kernel, C=3) and variants(capability, kernel, WIDE=True), capability
        assert variants(capability, '_step_kernel', LAST=True, steps=1), capability
        assert variants(capability, '_step_kernel', LAST=False), capability
        assert variants(capability, '_arguments_kernel', height=1), capability
        assert variants(capability, '_arguments_kernel', width=1), capability
        assert variants(capability, '_arguments_kernel', GEOMETRIC=False), capability


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


@pytest.fixture
def installed_triton(monkeypatch):
    """Sets the installed Triton's version string (the backend choice is made afresh, and may warn afresh)."""
    monkeypatch.setattr(backends, '_TRITON', [])
    monkeypatch.setattr(backends, '_WARNED', [])
    return lambda version: monkeypatch.setattr(sys.modules['triton'], '__version__', version)


def test_a_triton_without_masked_histograms_falls_back_to_torch_with_one_warning(installed_triton):
    """torch 2.0-2.7 ship Triton 2.0-3.3, whose tl.histogram has no mask: the statistics kernel would not compile."""
    installed_triton('3.3.1')
    with pytest.warns(UserWarning, match=r'Triton >= 3\.4 .*found Triton 3\.3') as caught:
        assert resolve_backend(None, 'cuda') == 'torch'
        assert resolve_backend(None, 'cuda:1') == 'torch'
    assert len(caught) == 1
    assert resolve_backend(None, 'cpu') == 'torch'
    with pytest.raises(ValueError, match=r"backend='triton' needs Triton >= 3\.4.*found Triton 3\.3"):
        resolve_backend('triton', 'cuda')
    with pytest.raises(ValueError, match=r'Triton >= 3\.4'):
        augmix(torch.rand(2, 3, 8, 8), backend='triton')


@pytest.mark.parametrize('version', ['3.4.0', '3.10.0+git8b1c6e2', '4.0'])
def test_a_triton_with_masked_histograms_runs_cuda_batches(installed_triton, version):
    installed_triton(version)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_backend(None, 'cuda') == 'triton'
        assert resolve_backend('triton', 'cuda') == 'triton'


@pytest.fixture
def installed_gpu(monkeypatch, installed_triton):
    """Sets the GPU torch reports (name, compute capability, ROCm or not), with a Triton the kernels accept."""
    installed_triton('3.8.0')
    monkeypatch.setattr(backends, '_GPU_VERDICTS', {})

    def install(name, capability, hip=None):
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
        monkeypatch.setattr(torch.version, 'hip', hip)
    return install


@pytest.mark.parametrize('name, capability', [('Tesla P100-PCIE-16GB', (6, 0)), ('Tesla K80', (3, 7))])
def test_a_gpu_older_than_triton_supports_gets_the_torch_kernels_with_one_warning(installed_gpu, name, capability):
    """PyTorch's rule for Triton is compute capability >= 7.0: a P100 (Kaggle) is not a GPU Triton supports."""
    installed_gpu(name, capability)
    expected = rf'capability >= 7\.0, and {name} is {capability[0]}\.{capability[1]}'
    with pytest.warns(UserWarning, match=expected) as caught:
        assert resolve_backend(None, 'cuda') == 'torch'
        assert resolve_backend(None, 'cuda:0') == 'torch'
    assert len(caught) == 1
    with pytest.raises(ValueError, match=rf"backend='triton' cannot run on this GPU: .*{name}"):
        resolve_backend('triton', 'cuda')


@pytest.mark.parametrize('name, capability', [('Tesla V100-SXM2-16GB', (7, 0)), ('Tesla T4', (7, 5)),
                                              ('NVIDIA H200', (9, 0)), ('NVIDIA GeForce RTX 5090', (12, 0))])
def test_gpus_triton_supports_get_the_fused_kernels_silently(installed_gpu, name, capability):
    installed_gpu(name, capability)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert resolve_backend(None, 'cuda') == 'triton'
        assert resolve_backend('triton', 'cuda') == 'triton'
        assert resolve_backend(None, 'cpu') == 'torch'


def test_the_gpu_is_asked_once_per_device_not_every_batch(installed_gpu, monkeypatch):
    installed_gpu('Tesla T4', (7, 5))
    asked = []
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: asked.append(device) or (7, 5))
    for _ in range(3):
        assert resolve_backend(None, 'cuda:0') == 'triton' and resolve_backend('triton', 'cuda:0') == 'triton'
    assert resolve_backend(None, 'cuda:1') == 'triton'
    assert asked == [torch.device('cuda:0'), torch.device('cuda:1')]


def test_rocm_defaults_to_the_torch_kernels_but_may_ask_for_triton(installed_gpu):
    """The kernels compile for AMD GPUs, but no one has compared their pixels there: the default stays torch."""
    installed_gpu('AMD Instinct MI300X', (9, 4), hip='6.4.0')
    with pytest.warns(UserWarning, match=r'AMD GPUs \(ROCm\)') as caught:
        assert resolve_backend(None, 'cuda') == 'torch'
        assert resolve_backend(None, 'cuda') == 'torch'
    assert len(caught) == 1
    assert resolve_backend('triton', 'cuda') == 'triton'


# ---------------------------------------------------------------------------------------------
# What a call asks of a GPU, without one: fake CUDA tensors (torch's FakeTensorMode: shapes, dtypes and
# devices, no data) and recorded Triton launches. Each aten op on a CUDA tensor is a kernel (or copy) the
# device would run; an op that needs a value back on the host is a host sync, counted where torch's CUDA
# implementation makes one: reading a value, bincount (which reads its input's min and max), a device-to-host
# copy, and a host-to-device copy that is not non_blocking (a pageable copy waits for the stream).

from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402

aten = torch.ops.aten
# Allocations and views: no work on the device.
NO_DEVICE_WORK = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
                  aten.detach.default, aten.lift_fresh.default, aten._unsafe_view.default,
                  aten.set_.source_Storage_storage_offset}


class DeviceWork(TorchDispatchMode):
    """Counts, per call under it, the device's kernels and copies, and the host syncs, of ops on (fake) CUDA tensors.

    Values read back are `readback` (the data is fake): 0, or 1 to make the torch backend's group counts non-zero
    so that every op kernel runs.
    """

    def __init__(self, readback=0):
        super().__init__()
        self.readback = readback
        self.kernels, self.syncs, self.copies = [], [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        devices = [t.device for t in tensors] + ([torch.device(kwargs['device'])] if kwargs.get('device') else [])
        on_cuda = any(device.type == 'cuda' for device in devices)
        if func in (aten._to_copy.default, aten.copy_.default):
            return self.copy(func, args, kwargs)
        if not on_cuda or func in NO_DEVICE_WORK or func.is_view or func.namespace == 'prim':
            return func(*args, **kwargs)
        self.kernels.append(func)
        if func is aten._local_scalar_dense.default:
            self.syncs.append(func)
            return {torch.bool: bool, torch.float32: float, torch.float64: float}.get(args[0].dtype, int)(self.readback)
        if func is aten.bincount.default:
            self.syncs += [func, func]
            return torch.full((kwargs.get('minlength', args[-1]),), self.readback, device=args[0].device)
        if func is aten._sample_dirichlet.default:  # no fake implementation: same shape as the concentrations
            return torch.empty_like(args[0])
        return func(*args, **kwargs)

    def copy(self, func, args, kwargs):
        if func is aten.copy_.default:
            target, source = args[:2]
        else:
            source = args[0]
            target = torch.empty(0, device=kwargs.get('device') or source.device)
        non_blocking = kwargs.get('non_blocking', False) if func is aten._to_copy.default else (
            args[2] if len(args) > 2 else kwargs.get('non_blocking', False))
        route = (source.device.type, target.device.type)
        if 'cuda' in route:
            self.kernels.append(func)
        if route == ('cpu', 'cuda'):
            self.copies.append(non_blocking)
            if not non_blocking:
                self.syncs.append(func)
        if route == ('cuda', 'cpu'):
            self.syncs.append(func)
            if func is aten._to_copy.default:  # a real tensor, so that the host can read it (tolist)
                with unset_fake_temporarily():
                    return torch.full(source.shape, self.readback, dtype=kwargs.get('dtype') or source.dtype)
        return func(*args, **kwargs)


class RecordedKernel:
    """Stands for a Triton kernel: records each launch's grid, arguments and current CUDA device instead."""

    def __init__(self, name, launches, current):
        self.name, self.launches, self.current = name, launches, current

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(dict(kernel=self.name, grid=grid, args=args, kwargs=kwargs,
                                      device=self.current[-1] if self.current else None))
        return launch


@pytest.fixture
def fake_gpu(monkeypatch):
    """Run `call` on fake CUDA tensors: returns (DeviceWork, Triton launches) of the call.

    `torch.cuda.device` is recorded rather than entered (no driver here), so each launch knows the current device.
    """
    current = []

    class CurrentDevice:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.pop()
    monkeypatch.setattr(torch.cuda, 'device', CurrentDevice)

    def run(call, readback=0, backend_kernels=True):
        launches = []
        if backend_kernels:
            for name in ('_statistics_kernel', '_step_kernel', '_arguments_kernel'):
                monkeypatch.setattr(triton_apply, name, RecordedKernel(name, launches, current))
        work = DeviceWork(readback)
        fake_tolist = FakeTensor.tolist

        def tolist(tensor):  # FakeTensor reads element by element; on CUDA it is one copy to the host
            if tensor.device.type != 'cuda':
                return fake_tolist(tensor)
            work.syncs.append('tolist')
            with unset_fake_temporarily():
                return torch.full(tensor.shape, readback, dtype=tensor.dtype).tolist()
        monkeypatch.setattr(FakeTensor, 'tolist', tolist)
        with FakeTensorMode(allow_non_fake_inputs=True), work:
            call()
        return work, launches
    return run


def fake_images(batch, height=8, width=8, device='cuda:0', channels=3):
    return torch.empty(batch, channels, height, width, device=device)


def test_augmix_with_triton_on_a_too_old_gpu_is_refused_with_the_reason(installed_gpu, fake_gpu):
    installed_gpu('Tesla P100-PCIE-16GB', (6, 0))
    with pytest.raises(ValueError, match=r'compute capability >= 7\.0'):
        fake_gpu(lambda: augmix(fake_images(4), backend='triton'))


def test_a_cpu_generator_costs_a_cuda_batch_no_host_sync(fake_gpu):
    """The draw is made on the CPU (the same draw whatever the device) and queued to the GPU: no waiting."""
    work, launches = fake_gpu(lambda: augmix(fake_images(16), generator=torch.Generator().manual_seed(0)))
    assert work.syncs == [] and work.copies and all(work.copies)
    assert {launch['kernel'] for launch in launches} == {'_statistics_kernel', '_step_kernel'}


def test_cpu_params_cost_a_cuda_batch_no_host_sync(fake_gpu):
    """sample_augmix draws on the CPU by default; apply_augmix queues the draw to the images' GPU."""
    params = sample_augmix(16, 8, 8, all_ops=True, generator=torch.Generator().manual_seed(1))
    work, _ = fake_gpu(lambda: apply_augmix(fake_images(16), params, 0.3))
    assert work.syncs == [] and work.copies and all(work.copies)


@pytest.mark.parametrize('fill', [torch.tensor([0.1, 0.2, 0.3]), torch.tensor(0.5), torch.tensor([[0.25]]), 0.3,
                                  (0.1, 0.2, 0.3)])
def test_a_cpu_fill_costs_a_cuda_batch_no_host_sync(fake_gpu, fill):
    work, _ = fake_gpu(lambda: augmix(fake_images(16), fill=fill))
    assert work.syncs == [] and all(work.copies)


def test_the_torch_backend_on_cuda_waits_for_the_gpu_once_per_call(fake_gpu):
    """Its op groups are sized on the host: one read-back of the counts (every op kernel runs here)."""
    params = sample_augmix(16, 8, 8, all_ops=True, generator=torch.Generator().manual_seed(2))
    work, _ = fake_gpu(lambda: apply_augmix(fake_images(16), params, (0.1, 0.2, 0.3), backend='torch'),
                       readback=1, backend_kernels=False)
    assert len(work.syncs) == 1 and all(work.copies)
    assert len(work.kernels) > 100  # the groups' kernels ran


def test_launches_go_to_the_images_gpu(fake_gpu):
    """Triton launches on the current device: augmix on cuda:1 while cuda:0 is current must make cuda:1 current."""
    for device in ('cuda:1', 'cuda:0'):
        work, launches = fake_gpu(lambda: augmix(fake_images(4, device=device), depth=2))
        assert [launch['kernel'] for launch in launches] == ['_arguments_kernel'] + [
            '_statistics_kernel', '_step_kernel'] * 2
        assert all(launch['device'] == torch.device(device) for launch in launches), launches


def test_the_grid_fits_cudas_limits_for_any_image_size(fake_gpu):
    """A grid's second and third axes stop at 65535: an image of 5000 x 5000 has 97,657 blocks of 256 pixels."""
    params = sample_augmix(2, 5000, 5000, generator=torch.Generator().manual_seed(3))
    _, launches = fake_gpu(lambda: apply_augmix(fake_images(2, 5000, 5000), params))
    assert launches
    for launch in launches:
        assert launch['grid'][0] < 2 ** 31 and all(size <= 65535 for size in launch['grid'][1:]), launch['grid']


def test_images_of_2_to_the_31_values_are_refused_before_any_work(fake_gpu):
    """Within an image the kernels count in int32: 3 x 26,755 x 26,755 values is one too many."""
    params = sample_augmix(1, 26755, 26755, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match=r"fewer than 2\*\*31 values.*backend='torch'"):
        fake_gpu(lambda: apply_augmix(fake_images(1, 26755, 26755), params))


@pytest.mark.parametrize('depth', [1, 3, 10])
def test_the_work_per_call_depends_on_the_depth_not_the_batch(fake_gpu, depth):
    """A launch sequence per call below the working-memory bound; params made contiguous once, not per step."""
    counts = []
    for batch in (4, 256):
        work, launches = fake_gpu(lambda: augmix(fake_images(batch, 32, 32), depth=depth))
        counts.append((len(launches), len(work.kernels)))
    assert counts[0] == counts[1]
    assert counts[0][0] == 1 + 2 * depth
    reference, _ = fake_gpu(lambda: augmix(fake_images(4, 32, 32), depth=1))
    assert counts[0][1] == len(reference.kernels)


def test_large_batches_run_in_chunks_within_the_working_memory_bound(fake_gpu):
    """The ping-pong buffers of 4096 images of 224 px would take 14.8 GB; chunks keep them within WORKING_BYTES."""
    params = sample_augmix(4096, 224, 224, depth=3, generator=torch.Generator().manual_seed(4))
    allocated = []

    def call():
        with MemoryRecorder(allocated):
            apply_augmix(fake_images(4096, 224, 224), params)
    _, launches = fake_gpu(call)
    per_image = triton_apply.working_bytes_per_image(params, 3, 224, 224)
    chunk = triton_apply.WORKING_BYTES // per_image
    assert len(launches) == 2 * 3 * -(-4096 // chunk)
    step_launches = [launch for launch in launches if launch['kernel'] == '_step_kernel']
    assert sum(launch['args'][4].shape[0] for launch in step_launches) == 3 * 4096  # every image, every step
    assert max(launch['args'][4].shape[0] for launch in step_launches) == chunk
    working = sum(nbytes for nbytes in allocated) - 2 * 4096 * 3 * 224 * 224 * 4  # less the output
    assert working <= triton_apply.WORKING_BYTES


class MemoryRecorder(TorchDispatchMode):
    """Records the bytes of every CUDA tensor allocated under it."""

    def __init__(self, allocated):
        super().__init__()
        self.allocated = allocated

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func in (aten.empty.memory_format, aten.empty_strided.default) and result.device.type == 'cuda':
            self.allocated.append(result.numel() * result.element_size())
        return result


class CountedKernel:
    """Wraps a Triton kernel: counts its launches and launches it."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(grid)
        return self.kernel[grid]


def test_chunked_batches_give_the_pixels_of_one_launch_sequence(monkeypatch):
    x = images(5, 6, 5, seed=16)
    params = sample_augmix(5, 6, 5, all_ops=True, depth=2, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    launches = []
    for name in ('_statistics_kernel', '_step_kernel'):
        monkeypatch.setattr(triton_apply, name, CountedKernel(getattr(triton_apply, name), launches))
    whole = apply_augmix(x, params, (0.2, 0.4, 0.6), backend='triton')
    assert len(launches) == 4
    monkeypatch.setattr(triton_apply, 'WORKING_BYTES', 2 * triton_apply.working_bytes_per_image(params, 3, 6, 5) + 5)
    chunked = apply_augmix(x, params, (0.2, 0.4, 0.6), backend='triton')
    assert len(launches) == 4 + 3 * 4  # chunks of 2, 2 and 1 images
    assert torch.equal(chunked, whole) and not torch.equal(chunked, x)


def test_views_whose_offsets_pass_int32_read_the_right_pixels(tmp_path):
    """A view whose channel stride passes 2**30: its channel 2 lies 2**31 values past channel 0.

    int32 offsets would wrap there. The view starts 2**31 values into its storage, so a wrapped offset
    still lands inside it (wrong pixels, not a crash). On the CPU the storage is a sparse file: 16 GiB of
    addresses, a few pages of memory.
    """
    height, width = 5, 6
    channel_stride = 2 ** 30 + 64
    start = 2 ** 31 + 4096
    size = start + 2 * channel_stride + height * width
    if DEVICE == 'cuda':
        if torch.cuda.mem_get_info()[0] < size * 4 + 2 ** 30:
            pytest.skip('needs 17 GB of free GPU memory')
        storage = torch.empty(size, device=DEVICE)
    else:
        storage = torch.from_file(str(tmp_path / 'sparse'), shared=True, size=size, dtype=torch.float32)
    x = storage.as_strided((1, 3, height, width), (3 * height * width, channel_stride, width, 1), start)
    x.copy_(images(1, height, width, seed=17))
    assert triton_apply.needs_wide_offsets(x) and not triton_apply.needs_wide_offsets(x.contiguous())
    params = sample_augmix(1, height, width, all_ops=True, depth=3, generator=torch.Generator().manual_seed(17))
    params = params.to(DEVICE)
    fused = apply_augmix(x, params, 0.5, backend='triton')
    assert torch.equal(fused, apply_augmix(x.contiguous(), params, 0.5, backend='triton'))
    del x, storage


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


def host_syncs(function):
    """Times one call of `function` makes the host wait for the GPU (torch's sync debug mode), after a warm-up call."""
    function()
    return count_syncs(function)


@cuda
@pytest.mark.parametrize('size, batch', [(32, 512), (224, 16)])
def test_cuda_backends_agree(size, batch):
    x = images(batch, size, size, seed=13)
    params = sample_augmix(batch, size, size, all_ops=True, device=DEVICE)
    reference, fused = both_backends(x, params, 0.4)
    assert (reference - fused).abs().max() <= LEVEL


@cuda
def test_cuda_gives_the_torch_backends_pixels_where_levels_are_rounded():
    """Compiled, every division that is floored or compared is correctly rounded (triton_apply._divide): chains of
    autocontrast, equalize, posterize and solarize on real photos, with their exact rounding ties, match exactly."""
    names = [['autocontrast', 'posterize', 'solarize'], ['equalize', 'posterize', 'autocontrast'],
             ['autocontrast', 'equalize', 'solarize'], ['posterize', 'autocontrast', 'posterize']]
    batch = 64
    index = torch.tensor([[OP_NAMES.index(name) for name in chain] for chain in names]).repeat(batch // 4, 1)
    argument = torch.tensor([[0., 3., 0.5], [0., 2., 0.], [0., 0., 100 / 255], [5., 0., 1.]],
                            dtype=torch.float64).repeat(batch // 4, 1)
    # One chain per image and m = 1: the output is the chain's image, with no mixing arithmetic to round.
    params = AugMixParams(torch.ones(batch, 1), torch.ones(batch), index[:, None], argument[:, None]).to(DEVICE)
    x = images(batch, 224, 224, seed=18)
    reference, fused = both_backends(x, params)
    assert torch.equal(reference, fused)


@cuda
def test_augmix_on_cuda_never_waits_for_the_gpu():
    x = images(64, 32, 32, seed=14)
    params_on_cpu = sample_augmix(64, 32, 32, generator=torch.Generator().manual_seed(1))
    calls = [lambda: augmix(x, all_ops=True, fill=(0.1, 0.2, 0.3)),
             lambda: augmix(x, generator=torch.Generator('cuda').manual_seed(0)),
             lambda: augmix(x, generator=torch.Generator().manual_seed(0)),  # drawn on the CPU
             lambda: augmix(x, fill=torch.tensor([0.1, 0.2, 0.3])),  # a CPU colour
             lambda: apply_augmix(x, params_on_cpu)]
    assert [host_syncs(call) for call in calls] == [0] * len(calls)


@cuda
def test_the_torch_backend_on_cuda_waits_once_per_call():
    x = images(64, 32, 32, seed=14)
    assert host_syncs(lambda: augmix(x, all_ops=True, backend='torch')) == 1


@cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason='needs two CUDA GPUs')
def test_augmix_on_the_second_cuda_gpu_while_the_first_is_current():
    x = images(8, 24, 24, seed=19)
    params = sample_augmix(8, 24, 24, all_ops=True, generator=torch.Generator().manual_seed(19))
    expected = apply_augmix(x.to('cuda:0'), params.to('cuda:0'), backend='triton')
    with torch.cuda.device(0):
        out = apply_augmix(x.to('cuda:1'), params.to('cuda:1'), backend='triton')
        drawn = augmix(x.to('cuda:1'), generator=torch.Generator('cuda:1').manual_seed(0))
    assert torch.equal(out.cpu(), expected.cpu())
    assert drawn.device == torch.device('cuda:1')


@cuda
def test_augmix_launches_at_most_40_cuda_kernels_whatever_the_batch():
    for batch in (16, 1024):
        x = images(batch, 32, 32, seed=15)
        assert launches_per_call(lambda: augmix(x)) <= 40


@cuda
def test_callback_before_batch_never_waits_for_the_cuda_gpu():
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
        with sync_debug(mode):
            callback.before_batch()
    assert learn.xb[0].shape[0] == 3 * xb.shape[0]
