"""Common corruptions (CIFAR-10-C), calibration error and a robustness report for fastai Learners
(classification and segmentation).

`corruptions` holds the corruption kernels and `corrupt`, built on the filters of `filters`;
`calibration` the calibration error; `evaluate` runs a Learner under every corruption and reports.
"""
from fastai_jsd.robustness.calibration import calibration_error
from fastai_jsd.robustness.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, SEGMENTATION_CORRUPTIONS, corrupt
from fastai_jsd.robustness.evaluate import (RobustnessResult, SegmentationRobustnessResult, evaluate_robustness,
                                            plot_corruption_errors)

__all__ = ['CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'SEGMENTATION_CORRUPTIONS', 'corrupt', 'calibration_error',
           'evaluate_robustness', 'RobustnessResult', 'SegmentationRobustnessResult', 'plot_corruption_errors']
