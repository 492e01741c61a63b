"""Counting the times the host waits for the GPU, with torch's sync debug mode (GPU tests only)."""
import contextlib
import warnings

import torch


@contextlib.contextmanager
def sync_debug(mode):
    "torch.cuda's sync debug `mode` ('warn', 'error') inside the block, the previous mode after it."
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def count_syncs(fn):
    """Host syncs torch reports while `fn` runs (set_sync_debug_mode('warn') warns at each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with sync_debug('warn'):
            fn()
    return sum('synchroniz' in str(warning.message) for warning in caught)
