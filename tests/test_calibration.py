"""calibration_error against hendrycks' calib_err."""
import math

import numpy as np
import pytest
import torch

from fastai_jsd.robustness import calibration_error


def calib_err_reference(confidence, correct, p='2', beta=100, every_bin=True):
    """hendrycks' calib_err (outlier-exposure utils/calibration_tools.py; the AugMix paper's RMS error).
    Its loop runs over range(len(bins) - 1) and so skips the last bin: `every_bin=False` keeps that."""
    idxs = np.argsort(confidence, kind='stable')
    confidence = confidence[idxs]
    correct = correct[idxs]
    bins = [[i * beta, (i + 1) * beta] for i in range(len(confidence) // beta)]
    bins[-1] = [bins[-1][0], len(confidence)]
    cerr = 0
    total_examples = len(confidence)
    for i in range(len(bins) if every_bin else len(bins) - 1):
        bin_confidence = confidence[bins[i][0]:bins[i][1]]
        bin_correct = correct[bins[i][0]:bins[i][1]]
        num_examples_in_bin = len(bin_confidence)
        if num_examples_in_bin > 0:
            difference = np.abs(np.nanmean(bin_confidence) - np.nanmean(bin_correct))
            if p == '2':
                cerr += num_examples_in_bin / total_examples * np.square(difference)
            elif p == '1':
                cerr += num_examples_in_bin / total_examples * difference
    if p == '2':
        cerr = np.sqrt(cerr)
    return cerr


@pytest.mark.parametrize('n, beta', [(1000, 100), (1234, 100), (257, 50), (300, 7)])
def test_calibration_error_matches_calib_err(n, beta):
    rng = np.random.default_rng(n)
    confidence = rng.uniform(0.1, 1, n)
    correct = (rng.uniform(0, 1, n) < confidence ** 1.5).astype(np.float64)
    for p in (1, 2):
        expected = calib_err_reference(confidence, correct, str(p), beta)
        assert calibration_error(confidence, correct, p=p, beta=beta) == pytest.approx(expected, rel=1e-12)
        got = calibration_error(torch.tensor(confidence), torch.tensor(correct).bool(), p=p, beta=beta)
        assert got == pytest.approx(expected, rel=1e-6)


def test_calibration_error_counts_the_bin_calib_err_skips():
    rng = np.random.default_rng(0)
    confidence = np.sort(rng.uniform(0.5, 1, 1000))
    correct = (rng.uniform(0, 1, 1000) < 0.6).astype(np.float64)
    correct[900:] = 0
    correct[900:900 + round(confidence[900:].sum())] = 1  # last bin: accuracy = mean confidence to 1/100
    skipped = calib_err_reference(confidence, correct, '2', 100, every_bin=False)
    gap = abs(confidence[900:].mean() - correct[900:].mean())
    assert calibration_error(confidence, correct) == pytest.approx(math.sqrt(skipped ** 2 + 0.1 * gap ** 2))
    correct[900:] = 0  # an overconfident last bin: calib_err does not see it
    assert calibration_error(confidence, correct) > calib_err_reference(confidence, correct, '2', 100,
                                                                         every_bin=False) + 0.15


def test_calibration_error_closed_forms():
    # perfectly calibrated bins: 100 at 0.7 with 70 right, 100 at 0.9 with 90 right
    confidence = np.r_[np.full(100, 0.7), np.full(100, 0.9)]
    correct = np.r_[np.arange(100) < 70, np.arange(100) < 90].astype(float)
    assert calibration_error(confidence, correct) == pytest.approx(0, abs=1e-12)
    assert calibration_error(confidence, correct, p=1) == pytest.approx(0, abs=1e-12)
    # always confident, always wrong
    assert calibration_error(np.ones(250), np.zeros(250)) == pytest.approx(1)
    assert calibration_error(np.ones(250), np.zeros(250), p=1) == pytest.approx(1)
    # fewer than beta examples: one bin
    assert calibration_error([0.9, 0.8, 0.7], [1, 0, 0]) == pytest.approx(0.8 - 1 / 3)
    # two bins, gaps 0.2 and 0.4: RMS sqrt((0.04 + 0.16) / 2), L1 (0.2 + 0.4) / 2
    confidence = np.r_[np.full(100, 0.6), np.full(100, 0.9)]
    correct = np.r_[np.arange(100) < 80, np.arange(100) < 50].astype(float)
    assert calibration_error(confidence, correct) == pytest.approx(math.sqrt(0.1))
    assert calibration_error(confidence, correct, p=1) == pytest.approx(0.3)


def test_bad_calibration_arguments_raise_value_error():
    with pytest.raises(ValueError, match='p=3'):
        calibration_error([0.5], [1], p=3)
    with pytest.raises(ValueError, match='beta=0'):
        calibration_error([0.5], [1], beta=0)
    with pytest.raises(ValueError, match='same length'):
        calibration_error([0.5, 0.6], [1])
    with pytest.raises(ValueError, match='empty'):
        calibration_error([], [])
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        calibration_error([1.5, 0.2], [1, 0])


def test_calibration_error_refuses_correct_that_is_not_0_1_and_says_nan():
    with pytest.raises(ValueError, match=r'0 / 1 \(or bool\).*got 2'):
        calibration_error([0.9, 0.6], [1, 2])
    with pytest.raises(ValueError, match=r'got -1, 0\.5'):
        calibration_error([0.9, 0.6, 0.7], [-1, 0.5, 1])
    with pytest.raises(ValueError, match='correct contains NaN in 1 of 2'):
        calibration_error([0.9, 0.6], [1, float('nan')])
    with pytest.raises(ValueError, match='confidence contains NaN in 1 of 2') as error:
        calibration_error([0.5, float('nan')], [1, 0])
    assert 'values in' not in str(error.value)
    assert calibration_error([0.9, 0.6], torch.tensor([True, False])) == pytest.approx(0.25)
