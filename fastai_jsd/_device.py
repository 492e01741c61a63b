"""Moving tensors between devices without waiting for the GPU (see `fastai_jsd.augment.devices.move`).

The implementation lives in augment/, which may import nothing from the rest of the package.
"""
from fastai_jsd.augment.devices import move

__all__ = ['move']
