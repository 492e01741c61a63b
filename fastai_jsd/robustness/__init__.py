"""Common corruptions (CIFAR-10-C), calibration error and a robustness report for fastai Learners
(classification and segmentation)."""
from fastai_jsd.robustness.corruptions import (CORRUPTIONS, EXTRA_CORRUPTIONS, SEGMENTATION_CORRUPTIONS,
                                               RobustnessResult, SegmentationRobustnessResult, calibration_error,
                                               corrupt, evaluate_robustness, plot_corruption_errors)

__all__ = ['CORRUPTIONS', 'EXTRA_CORRUPTIONS', 'SEGMENTATION_CORRUPTIONS', 'corrupt', 'calibration_error',
           'evaluate_robustness', 'RobustnessResult', 'SegmentationRobustnessResult', 'plot_corruption_errors']
