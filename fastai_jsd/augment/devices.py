"""Where work goes: tensors moved between devices without waiting for the GPU, launches on the tensors' GPU.

Here rather than in fastai_jsd/_device.py (which re-exports `move`) because augment/ imports nothing
from the rest of the package (tests/test_layout.py).
"""
import contextlib

import torch


def move(tensor, device, dtype=None):
    """`tensor` on `device` (and `dtype`); a host-to-device copy is queued, not waited for.

    A blocking copy from pageable memory synchronizes with the GPU; a non-blocking one from the host
    is safe (CUDA stages the source before returning), so host-made constants and CPU-generator draws
    cost no sync. Device-to-host copies stay blocking: the host reads them next.
    """
    return tensor.to(device=device, dtype=dtype, non_blocking=tensor.device.type == 'cpu')


def on_device(device):
    """A context in which CUDA work (Triton launches included) goes to `device` and its current stream.

    Triton launches on the current CUDA device and that device's current torch stream, not on its
    arguments' device: without this, tensors on cuda:1 while cuda:0 is current would be read on the
    wrong GPU. Nothing to do elsewhere (the CPU, Triton's interpreter).
    """
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()
