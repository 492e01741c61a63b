"""Compile fastai_jsd's Triton kernels for an H100/H200 (sm_90) without a GPU and print ptxas's resource report.

Run with TRITON_INTERPRET unset (the interpreter would give interpreted functions, not kernels to compile).
Each output line: kernel name, its constexprs, registers, spill store bytes. test_triton.py checks them; CI
has no GPU, so this is where a kernel that would not compile, or would spill, shows up.
"""
import json
import os
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastai_jsd.augment import triton_apply

PTXAS = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
TYPES = {'op_ptr': '*i64', 'argument_ptr': '*fp64', 'weight_ptr': '*fp64', 'blend_ptr': '*fp64', 'buffer_ptr': '*fp32',
         'statistics_ptr': '*fp32', 'fill_ptr': '*fp32', 'x_ptr': '*fp32', 'out_ptr': '*fp16', 'slot_ptr': '*i64',
         'level_ptr': '*fp64', 'sign_draw_ptr': '*fp64', 'depth_ptr': '*i64'}


def resources(kernel, constexprs, warps):
    """(registers, spill store bytes) ptxas reports for `kernel` compiled for sm_90a."""
    signature = {name: TYPES.get(name, 'i32') for name in kernel.arg_names}
    signature.update({name: 'constexpr' for name in constexprs})
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget('cuda', 90, 32), options={'enable_fp_fusion': False, 'num_warps': warps})
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, 'kernel.ptx')
        with open(ptx, 'w') as file:
            file.write(compiled.asm['ptx'])
        report = subprocess.run([PTXAS, '-v', '--gpu-name', 'sm_90a', ptx, '-o', os.path.join(folder, 'kernel.o')],
                                capture_output=True, text=True, check=True).stderr
    entry = report[report.index(f"Compiling entry function '{kernel.__name__}'"):]
    registers = int(entry.split('Used ')[1].split(' registers')[0])
    spills = int(entry.split(' bytes spill stores')[0].rsplit(', ', 1)[-1])
    return registers, spills


if __name__ == '__main__':
    variants = [(triton_apply._arguments_kernel, dict(GEOMETRIC=geometric, BLOCK=256), 4) for geometric in (True, False)]
    for channels in (1, 3):
        variants.append((triton_apply._statistics_kernel, dict(C=channels, BLOCK=triton_apply.STATISTICS_PIXELS),
                         triton_apply.STATISTICS_WARPS))
        variants += [(triton_apply._step_kernel, dict(C=channels, LAST=last, BLOCK=triton_apply.STEP_PIXELS),
                      triton_apply.STEP_WARPS) for last in (False, True)]
    for kernel, constexprs, warps in variants:
        registers, spills = resources(kernel, constexprs, warps)
        print(json.dumps(dict(kernel=kernel.__name__, constexprs=constexprs, registers=registers, spills=spills)))
