"""Test session setup: without a GPU, Triton's kernels run on CPU tensors in its interpreter.

TRITON_INTERPRET must be set before Triton is imported (fastai_jsd imports it lazily, on first use),
so it is set here, before any test module loads. With CUDA the real kernels are tested instead.
"""
import os

import torch

if 'TRITON_INTERPRET' not in os.environ and not torch.cuda.is_available():
    os.environ['TRITON_INTERPRET'] = '1'
