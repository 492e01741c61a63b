"""AugMix and the Jensen-Shannon consistency loss for fastai: batched, per-image, on the device."""
__version__ = "0.2.0"

# Through the fastai_jsd.augmix module (kept for code written against it) so that it is loaded first: the
# package attribute `augmix` is then the function, even after `import fastai_jsd.augmix`.
from fastai_jsd.augmix import AugMixParams, apply_augmix, augmix, sample_augmix
from fastai_jsd.callback import AugMixCallback, split_batchnorm
from fastai_jsd.loss import JsdCrossEntropy
from fastai_jsd.robustness import (BENCHMARKS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEGMENTATION_CORRUPTIONS,
                                   RobustnessResult, SegmentationRobustnessResult, calibration_error, corrupt,
                                   evaluate_robustness, plot_corruption_errors)

__all__ = ["AugMixCallback", "JsdCrossEntropy", "split_batchnorm", "augmix", "sample_augmix", "apply_augmix",
           "AugMixParams", "BENCHMARKS", "CORRUPTIONS", "EXTRA_CORRUPTIONS", "SEGMENTATION_CORRUPTIONS", "RobustnessResult",
           "SegmentationRobustnessResult", "corrupt", "calibration_error", "evaluate_robustness",
           "plot_corruption_errors", "__version__"]
