"""AugMix's first public address: `fastai_jsd.augmix.augmix` and friends now live in `fastai_jsd.augment`.

Kept so that code written against it keeps working; new code imports from `fastai_jsd` or `fastai_jsd.augment`.
"""
from fastai_jsd.augment import (BACKENDS, NO_OP, OP_NAMES, OPS, PAPER_OP_COUNT, AugMixParams, apply_augmix, augmix,
                                check_augmix_args, check_value_range, op_set, resolve_backend, sample_augmix)

__all__ = ['augmix', 'apply_augmix', 'sample_augmix', 'AugMixParams', 'BACKENDS', 'resolve_backend', 'op_set',
           'check_augmix_args', 'check_value_range', 'OP_NAMES', 'OPS', 'NO_OP', 'PAPER_OP_COUNT']
