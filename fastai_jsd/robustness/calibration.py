"""The calibration error of the AugMix paper (hendrycks' `calib_err`, every bin counted)."""
import numpy as np
import torch


def _as_array(values):
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def calibration_error(confidence, correct, p=2, beta=100):
    """Adaptive-binning calibration error of the AugMix paper: RMS for `p=2`, mean absolute for `p=1`.

    `confidence`: the predicted probability of each example's top class, in [0, 1]; `correct`: 1 (or
    True) where that prediction was right, 0 (False) where not. Examples are sorted by confidence and
    cut into bins of `beta` (the last bin takes the remainder, as in hendrycks' `calib_err`); each bin
    adds (bin size / n) * |mean confidence - accuracy| ** p, and the result is the p-th root. Unlike
    `calib_err`, whose loop skips its last bin, every bin counts, and fewer than `beta` examples make
    one bin instead of an error. Ties in confidence keep their input order (stable sort).
    """
    if p not in (1, 2) or isinstance(p, bool):
        raise ValueError(f"p={p!r} must be 2 (RMS calibration error) or 1 (mean absolute calibration error).")
    if isinstance(beta, bool) or not isinstance(beta, (int, np.integer)) or beta < 1:
        raise ValueError(f"beta={beta!r} must be a positive integer: the number of examples per bin.")
    conf, hits = _as_array(confidence), _as_array(correct)
    if conf.ndim != 1 or hits.ndim != 1 or len(conf) != len(hits):
        raise ValueError(f"confidence and correct must be 1-D and of the same length, got shapes "
                         f"{conf.shape} and {hits.shape}.")
    if len(conf) == 0:
        raise ValueError("confidence and correct are empty: calibration needs at least one example.")
    if np.isnan(conf).any():
        raise ValueError(f"confidence contains NaN in {int(np.isnan(conf).sum())} of {len(conf)} values; "
                         f"it must hold probabilities in [0, 1].")
    if not np.all(np.isfinite(conf)) or conf.min() < 0 or conf.max() > 1:
        raise ValueError(f"confidence must be probabilities in [0, 1], got values in "
                         f"[{conf.min():.3g}, {conf.max():.3g}].")
    if np.isnan(hits).any():
        raise ValueError(f"correct contains NaN in {int(np.isnan(hits).sum())} of {len(hits)} values; it must "
                         f"be 1 / True where the prediction was right and 0 / False where not.")
    bad = np.unique(hits[(hits != 0) & (hits != 1)])
    if len(bad):
        shown = ', '.join(f'{value:g}' for value in bad[:5]) + (', ...' if len(bad) > 5 else '')
        raise ValueError(f"correct must be 0 / 1 (or bool): 1 where the prediction was right, got {shown}; "
                         f"pass (predictions == targets), not the labels or a count.")
    order = np.argsort(conf, kind='stable')
    conf, hits = conf[order], hits[order]
    n_bins = max(len(conf) // beta, 1)
    bin_of = np.minimum(np.arange(len(conf)) // beta, n_bins - 1)
    sizes = np.bincount(bin_of, minlength=n_bins)
    gaps = np.abs(np.bincount(bin_of, conf, n_bins) - np.bincount(bin_of, hits, n_bins)) / sizes
    weighted = np.sum(sizes / len(conf) * gaps ** p)
    return float(np.sqrt(weighted) if p == 2 else weighted)
