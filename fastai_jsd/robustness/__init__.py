"""Common corruptions (CIFAR-10-C, Tiny-ImageNet-C, ImageNet-C), calibration error and a robustness report for
fastai Learners (classification and segmentation).

`benchmarks` holds the three benchmarks' severity tables, `corruptions` the corruption kernels and `corrupt`,
built on the filters of `filters` and the glass-blur shuffle of `shuffle`; `calibration` the calibration
error; `evaluate` runs a Learner under every corruption and reports.
"""
from fastai_jsd.robustness.benchmarks import ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, BENCHMARKS
from fastai_jsd.robustness.calibration import calibration_error
from fastai_jsd.robustness.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS, SEGMENTATION_CORRUPTIONS, corrupt
from fastai_jsd.robustness.evaluate import (RobustnessResult, SegmentationRobustnessResult, evaluate_robustness,
                                            plot_corruption_errors)

__all__ = ['BENCHMARKS', 'CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'SEGMENTATION_CORRUPTIONS', 'corrupt',
           'calibration_error', 'evaluate_robustness', 'RobustnessResult', 'SegmentationRobustnessResult',
           'plot_corruption_errors', 'ALEXNET_ERRORS', 'ALEXNET_CLEAN_ERROR']
