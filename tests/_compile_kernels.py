"""Compile fastai_jsd's Triton kernels for the GPUs users have, without a GPU, as the launcher would, and report them.

The launcher itself is run: `triton_apply.apply_augmix` and `sample_arguments` are called on CPU tensors of the real
shapes, layouts and dtypes, while Triton's JIT compiles instead of launching (a stand-in driver that targets each
GPU in turn, and `JITFunction.run` forced to its warm-up path). So every argument is specialised exactly as Triton's
launcher specialises it: an int equal to 1 becomes a constant, multiples of 16 get a divisibility hint, ints of
2**31 and more become int64, pointers get their dtype. The shapes include 1-pixel rows and columns, one chain, one
step, channels-last and strided views, half-precision output.

Run with TRITON_INTERPRET unset (the interpreter would give interpreted functions, not kernels to compile), with the
compute capabilities to compile for as arguments (default: every one in TARGETS). Each output line is a JSON report
of one compiled variant: the target, kernel name, its specialisation, registers and spill store bytes from ptxas,
and the PTX instructions of approximate arithmetic it contains (`div.full.f32`, `div.approx`, `ex2.approx`,
`rcp.approx`...). test_triton.py checks them; CI has no GPU, so this is where a kernel that would not compile,
spill, or round differently from the torch backend shows up.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

from fastai_jsd.augment import sample_augmix, triton_apply

# Approximate PTX arithmetic: fast division (div.full, div.approx), reciprocal, exp2 and friends. The kernels'
# floors and comparisons need the correctly rounded results the torch backend computes (div.rn).
APPROXIMATE = re.compile(r'\b(div\.full\.f32|div\.approx\.\S+|rcp\.approx\.\S+|ex2\.approx\.\S+|lg2\.approx\.\S+|'
                         r'sin\.approx\.\S+|cos\.approx\.\S+|sqrt\.approx\.\S+)')
# Compute capabilities of the GPUs fastai users train on, from the oldest Triton supports: V100, T4 (Colab, Kaggle),
# A100, A10 and RTX 30, L4 and RTX 40, H100 and H200, B200, RTX 50. Triton compiles for each separately; a kernel
# can fail or spill on one only.
TARGETS = (70, 75, 80, 86, 89, 90, 100, 120)


class CompileOnlyDriver:
    """Triton's view of the current GPU, without one: a GPU of compute `capability`, the default stream.

    Its device number is the capability: Triton keeps compiled kernels per device, and on one device number a second
    target would be handed the first target's kernels.
    """

    def __init__(self, capability):
        self.capability = capability

    def get_current_target(self):
        return GPUTarget('cuda', self.capability, 32)

    def get_current_device(self):
        return self.capability

    def get_current_stream(self, device=None):
        return 0


def compile_launches(calls, capability):
    """The kernels Triton compiles for a GPU of `capability` for the launches `calls()` makes, as (JIT function,
    compiled kernel, grid)."""
    compiled = {}
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.setdefault(id(kernel), (self, kernel, grid))
        return kernel
    previous = driver.active if torch.cuda.is_available() else None  # None: Triton finds the driver on first use
    driver.set_active(CompileOnlyDriver(capability))
    JITFunction.run = compile_only
    try:
        calls()
    finally:
        JITFunction.run = run
        driver.set_active(previous)
    return list(compiled.values())


def architecture(ptx):
    """The GPU architecture the PTX was generated for: sm_75, sm_90a, ..."""
    return re.search(r'^\s*\.target\s+(\w+)', ptx, re.MULTILINE).group(1)


def ptxas_for(capability):
    """The ptxas Triton assembles with for a GPU of `capability` (from Triton 3.5, Blackwell's PTX has its own)."""
    try:
        return get_ptxas(capability).path
    except TypeError:  # Triton 3.4: one ptxas for every GPU
        return get_ptxas().path


def resources(name, ptx, capability):
    """(registers, spill store bytes) ptxas reports for the PTX of kernel `name`, assembled for the PTX's target."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'kernel.ptx')
        with open(path, 'w') as file:
            file.write(ptx)
        command = [ptxas_for(capability), '-v', '--gpu-name', architecture(ptx), path,
                   '-o', os.path.join(folder, 'kernel.o')]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    entry = report[report.index(f"Compiling entry function '{name}'"):]
    registers = int(entry.split('Used ')[1].split(' registers')[0])
    spills = int(entry.split(' bytes spill stores')[0].rsplit(', ', 1)[-1])
    return registers, spills


def images(batch, channels, height, width, layout='contiguous', dtype=torch.float32):
    """A batch of the shape in a memory layout the launcher must handle.

    'wide': a view whose channel stride passes 2**30, on the meta device (nothing is read when compiling), so
    its offsets need int64 arithmetic.
    """
    if layout == 'wide':
        strides = (channels * height * width, 2 ** 30 + 7, width, 1)
        return torch.empty_strided((batch, channels, height, width), strides, device='meta', dtype=dtype)
    x = torch.rand(batch, channels, height, width * (2 if layout == 'strided' else 1)).to(dtype)
    if layout == 'strided':
        return x[..., ::2]
    if layout == 'channels_last':
        return x.contiguous(memory_format=torch.channels_last)
    return x


# (batch, channels, height, width, layout, dtype, AugMix width, depth, all_ops): 1-pixel rows and columns, a single
# pixel, one chain and one step (ints equal to 1 become constants), sizes divisible by 16, views and half precision.
SHAPES = [
    (1, 3, 1, 1, 'channels_last', torch.float16, 1, 2, False),
    (2, 1, 5, 1, 'contiguous', torch.float32, 1, 1, True),
    (4, 3, 16, 16, 'strided', torch.float32, 3, 3, True),
    (3, 3, 13, 11, 'wide', torch.float32, 2, -1, True),
]


def launches():
    """Every launch of the launcher over SHAPES (fused apply and fused sampling, with and without geometric ops)."""
    generator = torch.Generator().manual_seed(0)
    for batch, channels, height, width, layout, dtype, chains, depth, all_ops in SHAPES:
        x = images(batch, channels, height, width, layout, dtype)
        params = sample_augmix(batch, height, width, width=chains, depth=depth, all_ops=all_ops, generator=generator)
        triton_apply.apply_augmix(x, params, torch.full((channels,), 0.5))
        draws = (params.op_index, params.op_argument, params.op_argument, params.op_index[..., 0])
        triton_apply.sample_arguments(*draws, height, width, geometric=all_ops)


def specialisation(function, kernel):
    """The compiled variant's arguments by name: the type of each, or the constant it was specialised to."""
    names = function.arg_names
    described = {name: kernel.src.signature[name] for name in names}
    for path, value in kernel.src.constants.items():
        described[names[path[0]]] = value
    return described


def report_compiled(capability, function, kernel):
    """Prints one compiled variant's JSON report: its target, specialisation, registers, spills, approximate PTX."""
    name = kernel.metadata.name
    ptx = kernel.asm['ptx']
    registers, spills = resources(name, ptx, capability)
    print(json.dumps(dict(capability=capability, architecture=architecture(ptx), kernel=function.__name__,
                          arguments=specialisation(function, kernel),
                          num_warps=kernel.metadata.num_warps, registers=registers, spills=spills,
                          approximate=sorted(set(APPROXIMATE.findall(ptx))))))


if __name__ == '__main__':
    for capability in [int(argument) for argument in sys.argv[1:]] or TARGETS:
        for function, kernel, grid in compile_launches(launches, capability):
            report_compiled(capability, function, kernel)
