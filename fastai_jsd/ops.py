"""The AugMix op kernels' first public address: they now live in `fastai_jsd.augment.ops`.

Kept so that `from fastai_jsd import ops; ops.rotate(...)` keeps working.
"""
from fastai_jsd.augment.ops import (autocontrast, brightness, color, contrast, equalize, posterize, rotate, sharpness,
                                    shear_x, shear_y, solarize, translate_x, translate_y)

__all__ = ['autocontrast', 'equalize', 'posterize', 'solarize', 'rotate', 'shear_x', 'shear_y', 'translate_x',
           'translate_y', 'color', 'contrast', 'brightness', 'sharpness']
