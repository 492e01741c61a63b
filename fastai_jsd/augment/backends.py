"""Which kernels apply AugMix: the grouped torch kernels (any device) or the fused Triton kernels (CUDA).

Triton is optional (it ships with PyTorch's Linux CUDA wheels): it is imported on first use, and a
failed import only rules out `backend='triton'`.
"""
import torch

BACKENDS = ('torch', 'triton')
_TRITON = []  # the imported triton_apply module, or the exception importing it raised


def triton_kernels():
    """The triton_apply module, or the exception that importing it raised (Triton is optional)."""
    if not _TRITON:
        try:
            from fastai_jsd.augment import triton_apply
            _TRITON.append(triton_apply)
        except Exception as error:  # ImportError, or a broken install failing at import
            _TRITON.append(error)
    return _TRITON[0]


def triton_interprets(kernels):
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1 when Triton was imported), so CPU tensors work."""
    return type(kernels._step_kernel).__name__ == 'InterpretedFunction'


def resolve_backend(backend, device):
    """The backend that runs images on `device`: 'triton' or 'torch'; ValueError for an impossible choice."""
    if backend is None:
        kernels = triton_kernels() if torch.device(device).type == 'cuda' else None
        return 'triton' if kernels is not None and not isinstance(kernels, Exception) else 'torch'
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be 'torch' (any device), 'triton' (fused CUDA kernels) or None (Triton for "
                         f"CUDA tensors when it imports, else torch), got {backend!r}.")
    if backend == 'triton':
        kernels = triton_kernels()
        if isinstance(kernels, Exception):
            raise ValueError(f"backend='triton' needs Triton, which did not import ({kernels!r}); install it (it "
                             f"ships with PyTorch's Linux CUDA wheels) or use backend='torch'.")
        if torch.device(device).type != 'cuda' and not triton_interprets(kernels):
            raise ValueError(f"backend='triton' runs on CUDA tensors, but the images are on {device}. Use "
                             f"backend='torch' (or None to choose by device), or set the environment variable "
                             f"TRITON_INTERPRET=1 before Triton is imported to run the kernels on the CPU with "
                             f"Triton's interpreter (slow; meant for tests).")
    return backend
