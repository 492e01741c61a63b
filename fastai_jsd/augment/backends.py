"""Which kernels apply AugMix: the grouped torch kernels (any device) or the fused Triton kernels (CUDA).

Triton is optional (it ships with PyTorch's Linux CUDA wheels): it is imported on first use, and a
failed import, or a Triton older than the kernels need, only rules out `backend='triton'`. The default
also keeps the torch kernels on GPUs the fused kernels are not made for: NVIDIA GPUs older than Triton
supports, and AMD GPUs (ROCm), where they compile but no one has checked their pixels against the torch
kernels' (`backend='triton'` still runs them there).
"""
import re
import warnings

import torch

BACKENDS = ('torch', 'triton')
# tl.histogram(..., mask=), which equalize's statistics use, arrived in Triton 3.4 (triton-lang/triton#6695),
# the version PyTorch 2.8 ships; older ones fail to compile the statistics kernel at the first batch.
TRITON_NEEDED = (3, 4)
TRITON_NEEDED_TEXT = "Triton >= 3.4 (it ships with PyTorch >= 2.8)"
# PyTorch's own rule for Triton (torch._inductor's GPUTooOldForTriton): CUDA compute capability 7.0 or newer, so no
# Pascal (P100, Kaggle's other GPU) or older.
TRITON_CAPABILITY = (7, 0)
_TRITON = []  # the imported triton_apply module, or the exception that rules it out
_WARNED = []  # whether the default backend has said once why CUDA batches use the torch kernels
_GPU_VERDICTS = {}  # torch.device -> gpu_unsupported's answer, asked once per device rather than every batch


class TritonTooOld(ImportError):
    """The installed Triton lacks what the fused kernels use."""


def triton_version():
    """The installed Triton's (major, minor) version, from `triton.__version__`."""
    import triton
    return tuple(int(part) for part in re.findall(r'\d+', triton.__version__)[:2])


def triton_kernels():
    """The triton_apply module, or the exception that rules it out (Triton is optional, or may be too old)."""
    if not _TRITON:
        try:
            version = triton_version()
            if version < TRITON_NEEDED:
                raise TritonTooOld(f"the fused AugMix kernels need {TRITON_NEEDED_TEXT}, found Triton "
                                   f"{'.'.join(map(str, version))}")
            from fastai_jsd.augment import triton_apply
            _TRITON.append(triton_apply)
        except Exception as error:  # ImportError, or a broken install failing at import
            _TRITON.append(error)
    return _TRITON[0]


def triton_interprets(kernels):
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1 when Triton was imported), so CPU tensors work."""
    return kernels.INTERPRETED


def gpu_unsupported(device):
    """Why the fused kernels are not the default on CUDA `device` (None when they are): ROCm, or too old a GPU."""
    device = torch.device(device)
    if device not in _GPU_VERDICTS:
        _GPU_VERDICTS[device] = _ask_gpu(device)
    return _GPU_VERDICTS[device]


def _ask_gpu(device):
    """gpu_unsupported's answer, from the driver.

    Only asks a GPU that is there: without CUDA (fake CUDA tensors in tests) nothing can launch anyway.
    """
    if not torch.cuda.is_available():
        return None
    if torch.version.hip:
        return ("on AMD GPUs (ROCm) the fused kernels compile but their pixels have not been checked against the "
                "torch kernels'")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < TRITON_CAPABILITY:
        return (f"Triton supports CUDA compute capability >= {'.'.join(map(str, TRITON_CAPABILITY))}, and "
                f"{torch.cuda.get_device_name(device)} is {major}.{minor}")
    return None


def _default_backend(device):
    """'triton' for CUDA tensors where the fused kernels run, else 'torch' (saying once why, if Triton is there)."""
    if torch.device(device).type != 'cuda':
        return 'torch'
    kernels = triton_kernels()
    if isinstance(kernels, TritonTooOld):
        _warn_once(f"{kernels}. Upgrade PyTorch (or Triton) for the fused kernels")
    elif isinstance(kernels, Exception):  # no Triton: the torch kernels are simply what there is
        return 'torch'
    elif (why := gpu_unsupported(device)) is not None:
        _warn_once(why)
    else:
        return 'triton'
    return 'torch'


def _warn_once(reason):
    """Says once per process why CUDA batches use the torch kernels (every batch would repeat it)."""
    if not _WARNED:
        _WARNED.append(True)
        warnings.warn(f"AugMix runs on CUDA with its torch kernels (same pixels, more launches and one host sync per "
                      f"call): {reason}; backend='torch' silences this warning.", stacklevel=4)


def resolve_backend(backend, device):
    """The backend that runs images on `device`: 'triton' or 'torch'; ValueError for an impossible choice."""
    if backend is None:
        return _default_backend(device)
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be 'torch' (any device), 'triton' (fused CUDA kernels) or None (Triton for "
                         f"CUDA tensors where it runs, else torch), got {backend!r}.")
    if backend == 'triton':
        kernels = triton_kernels()
        if isinstance(kernels, TritonTooOld):
            raise ValueError(f"backend='triton' needs {TRITON_NEEDED_TEXT}: {kernels}. Upgrade PyTorch (or "
                             f"Triton), or use backend='torch' (same pixels) or None (torch kernels when Triton "
                             f"is too old).")
        if isinstance(kernels, Exception):
            raise ValueError(f"backend='triton' needs Triton, which did not import ({kernels!r}); install it (it "
                             f"ships with PyTorch's Linux CUDA wheels) or use backend='torch'.")
        why = gpu_unsupported(device) if torch.device(device).type == 'cuda' else None
        if why is not None and not torch.version.hip:
            raise ValueError(f"backend='triton' cannot run on this GPU: {why}. Use backend='torch' (same pixels) or "
                             f"None (the torch kernels on such GPUs).")
        if torch.device(device).type != 'cuda' and not triton_interprets(kernels):
            raise ValueError(f"backend='triton' runs on CUDA tensors, but the images are on {device}. Use "
                             f"backend='torch' (or None to choose by device), or set the environment variable "
                             f"TRITON_INTERPRET=1 before Triton is imported to run the kernels on the CPU with "
                             f"Triton's interpreter (slow; meant for tests).")
    return backend
