"""Moving tensors between devices without waiting for the GPU."""


def move(tensor, device, dtype=None):
    """`tensor` on `device` (and `dtype`); a host-to-device copy is queued, not waited for.

    A blocking copy from pageable memory synchronizes with the GPU; a non-blocking one from the host
    is safe (CUDA stages the source before returning), so host-made constants and CPU-generator draws
    cost no sync. Device-to-host copies stay blocking: the host reads them next.
    """
    return tensor.to(device=device, dtype=dtype, non_blocking=tensor.device.type == 'cpu')
