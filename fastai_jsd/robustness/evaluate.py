"""`evaluate_robustness`: a fastai Learner's error under every corruption and severity, its results and plot.

Batches are decoded to pixels with the DataLoaders' own `Normalize` (`fastai_jsd.pixels`), corrupted on the
model's device with `corrupt`, re-encoded with each model's own statistics and classified (or segmented).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from fastai_jsd._device import move
from fastai_jsd.pixels import decode, encode, normalize_stats
from fastai_jsd.robustness.benchmarks import (ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, benchmark_for_size,
                                              check_benchmark, get_benchmark)
from fastai_jsd.robustness.calibration import calibration_error
from fastai_jsd.robustness.corruptions import (_MOVES_PIXELS, CORRUPTIONS, SEGMENTATION_CORRUPTIONS,
                                               _check_corruption_name, _check_published_jpeg, _check_severity,
                                               corrupt)


# ---------------------------------------------------------------------------------------------------
# Results

@dataclass
class RobustnessResult:
    """What `evaluate_robustness` measured on a classifier; errors and calibration errors are fractions in [0, 1].

    - `table`: one row per corruption and severity with columns `corruption`, `severity`, `error`
      (top-1) and `rms_calibration_error`.
    - `clean_error`, `clean_calibration`: on the uncorrupted images.
    - `mean_corruption_error`, `corrupted_calibration`: the means over the table's rows (the AugMix
      paper's CIFAR-10-C "error" and RMS calibration error).
    - `mce`: with a baseline, mean over corruptions of sum_s error / sum_s baseline error (the
      ImageNet-C mCE, as a ratio: 1 means as good as the baseline).
    - `relative_mce`: mean over corruptions of sum_s (error - clean error) /
      sum_s (baseline error - baseline clean error): how much accuracy is lost to corruption,
      relative to the baseline (nan where the baseline loses none).
    - `baseline`: the baseline's own result, or None.
    - `benchmark`: whose corruptions ('cifar10-c', 'tiny-imagenet-c' or 'imagenet-c'), and
      `published_jpeg`: whether they included the published files' JPEG save.
    - `alexnet_mce`, `alexnet_relative_mce` ('imagenet-c' only, else None): the mCE and relative mCE
      of the ImageNet-C paper, in percent: per corruption, sum_s error / sum_s AlexNet's error (and
      sum_s (error - clean error) / sum_s (AlexNet's error - AlexNet's clean error)), averaged over
      the 15 `CORRUPTIONS` evaluated at all five severities (`ALEXNET_ERRORS`); the numbers ImageNet-C
      papers report (AugMix: ResNet-50 76.7 standard, 65.3 AugMix).
    """
    table: pd.DataFrame
    clean_error: float
    clean_calibration: float
    mean_corruption_error: float
    corrupted_calibration: float
    mce: float | None = None
    relative_mce: float | None = None
    baseline: RobustnessResult | None = None
    benchmark: str | None = None
    published_jpeg: bool | None = None
    alexnet_mce: float | None = None
    alexnet_relative_mce: float | None = None

    task: ClassVar[str] = 'classification'
    error_column: ClassVar[str] = 'error'
    error_label: ClassVar[str] = 'top-1 error'

    def per_corruption(self):
        """Error and RMS calibration error per corruption, averaged over severities (a DataFrame)."""
        return self.table.groupby('corruption', sort=False)[['error', 'rms_calibration_error']].mean()

    def summary(self):
        """The scalar results as a dict."""
        return dict(clean_error=self.clean_error, clean_calibration=self.clean_calibration,
                    mean_corruption_error=self.mean_corruption_error,
                    corrupted_calibration=self.corrupted_calibration,
                    mce=self.mce, relative_mce=self.relative_mce,
                    alexnet_mce=self.alexnet_mce, alexnet_relative_mce=self.alexnet_relative_mce)

    def __repr__(self):
        return _result_repr(self)


@dataclass
class SegmentationRobustnessResult:
    """What `evaluate_robustness` measured on a segmentation model; errors and IoUs are fractions in [0, 1].

    - `table`: one row per corruption and severity with columns `corruption`, `severity`,
      `pixel_error` (the fraction of wrongly classified pixels, `ignore_index` pixels left out) and
      `mean_iou` (intersection over union per class, averaged over the classes present in the
      target or the prediction of that condition; never over `ignore_index`, even when it is one of
      the model's classes, such as a 'Void' code).
    - `clean_error`, `clean_mean_iou`: pixel error and mean IoU on the uncorrupted images.
    - `mean_corruption_error`, `mean_corrupted_iou`: the means over the table's rows.
    - `mce`, `relative_mce`: against a baseline, as for classification, on pixel error.
    - `baseline`: the baseline's own result, or None.
    - `benchmark`, `published_jpeg`: whose corruptions, as for classification.
    """
    table: pd.DataFrame
    clean_error: float
    clean_mean_iou: float
    mean_corruption_error: float
    mean_corrupted_iou: float
    mce: float | None = None
    relative_mce: float | None = None
    baseline: SegmentationRobustnessResult | None = None
    benchmark: str | None = None
    published_jpeg: bool | None = None

    task: ClassVar[str] = 'segmentation'
    error_column: ClassVar[str] = 'pixel_error'
    error_label: ClassVar[str] = 'pixel error'

    def per_corruption(self):
        """Pixel error and mean IoU per corruption, averaged over severities (a DataFrame)."""
        return self.table.groupby('corruption', sort=False)[['pixel_error', 'mean_iou']].mean()

    def summary(self):
        """The scalar results as a dict."""
        return dict(clean_error=self.clean_error, clean_mean_iou=self.clean_mean_iou,
                    mean_corruption_error=self.mean_corruption_error, mean_corrupted_iou=self.mean_corrupted_iou,
                    mce=self.mce, relative_mce=self.relative_mce)

    def __repr__(self):
        return _result_repr(self)


_RESULT_TYPES = (RobustnessResult, SegmentationRobustnessResult)


def _result_repr(result):
    parts = [f"benchmark={_benchmark_label(result)}"] if result.benchmark is not None else []
    parts += [f"{key}={value:.4f}" for key, value in result.summary().items() if value is not None]
    return f"{type(result).__name__}({', '.join(parts)}, table: {len(result.table)} rows)"


def _benchmark_label(result):
    """'ImageNet-C (published JPEG)' and the like: the benchmark's title and how its images were saved."""
    chosen = get_benchmark(result.benchmark, 0, 0)
    if not chosen.saved_as_jpeg:
        return chosen.title
    return f"{chosen.title} ({'published JPEG' if result.published_jpeg else 'no JPEG save'})"


# ---------------------------------------------------------------------------------------------------
# Running the models and recording their outputs

def _loader(dls, index):
    """`dls[index]` of a fastai DataLoaders (1 = validation), or None where it has fewer loaders."""
    if dls is None:
        return None
    loaders = getattr(dls, 'loaders', None)
    if loaders is not None:  # dls.valid would raise an IndexError for a DataLoaders without one
        return loaders[index] if len(loaders) > index else None
    return getattr(dls, ('train', 'valid')[index], None)


class _ModelRunner:
    """One model with its input normalization; runs it on pixels and keeps its records."""

    def __init__(self, learn, fallback_dl):
        self.model = learn.model
        first = next(self.model.parameters(), None)
        self.device = first.device if first is not None else torch.device('cpu')
        self.dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        # Each model gets the normalization of its own DataLoaders: pixels are the common ground.
        dls = getattr(learn, 'dls', None)
        own_dl = _loader(dls, 1)
        if own_dl is None:
            own_dl = _loader(dls, 0)
        self.stats = normalize_stats(own_dl if own_dl is not None else fallback_dl, self.device)
        activation = getattr(learn.loss_func, 'activation', None)
        # Without an activation the outputs are taken as logits, as for any classifier.
        self.activation = activation if callable(activation) else (lambda out: F.softmax(out, -1))
        self.records = None

    def forward(self, pixels):
        out = self.model(encode(move(pixels, self.device), self.stats).to(self.dtype))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return torch.as_tensor(out).as_subclass(torch.Tensor)


class _ClassificationRecords:
    """Top-class confidence and hit of every image under every condition, kept on the device."""

    task = RobustnessResult.task

    def __init__(self, activation):
        self.activation = activation
        self.confidences, self.hits = {}, {}

    def check_output(self, out, targets):
        if out.ndim != 2 or out.shape[0] != len(targets):
            raise ValueError(f"the model returned shape {tuple(out.shape)} for {len(targets)} images; "
                             f"evaluate_robustness needs class scores [B, n_classes].")

    def add(self, key, out, targets):
        self.check_output(out, targets)
        confidence, predicted = self.activation(out.float()).as_subclass(torch.Tensor).max(-1)
        self.confidences.setdefault(key, []).append(confidence)
        self.hits.setdefault(key, []).append(predicted == targets)

    def result(self, conditions):
        keys = ['clean'] + conditions
        stacked = torch.stack([torch.stack([torch.cat(self.confidences[key]) for key in keys]),
                               torch.stack([torch.cat(self.hits[key]) for key in keys]).float()])
        confidences, hits = stacked.cpu().double().numpy()  # the one device-to-host copy of the evaluation

        errors = 1 - hits.mean(1)
        calibrations = [calibration_error(conf, hit, p=2) for conf, hit in zip(confidences, hits)]
        rows = [dict(corruption=name, severity=severity, error=float(error), rms_calibration_error=calibration)
                for (name, severity), error, calibration in zip(conditions, errors[1:], calibrations[1:])]
        clean_error, clean_calibration = float(errors[0]), calibrations[0]
        table = pd.DataFrame(rows, columns=['corruption', 'severity', 'error', 'rms_calibration_error'])
        return RobustnessResult(table=table, clean_error=clean_error, clean_calibration=clean_calibration,
                                mean_corruption_error=float(table.error.mean()),
                                corrupted_calibration=float(table.rms_calibration_error.mean()))


class _SegmentationRecords:
    """One confusion matrix (target x predicted class) per condition, accumulated on the device."""

    task = SegmentationRobustnessResult.task

    def __init__(self, ignore_index):
        self.ignore_index = ignore_index
        self.n_classes = None
        self.counts = {}

    def check_output(self, out, targets):
        if out.ndim != 4 or out.shape[0] != targets.shape[0] or out.shape[2:] != targets.shape[1:]:
            raise ValueError(f"the model returned shape {tuple(out.shape)} for masks of shape "
                             f"{tuple(targets.shape)}; evaluate_robustness needs class scores "
                             f"[B, n_classes, H, W] at the masks' size for segmentation.")
        if self.n_classes is not None and out.shape[1] != self.n_classes:
            raise ValueError(f"the model returned {out.shape[1]} classes after {self.n_classes} earlier.")

    def add(self, key, out, targets):
        self.check_output(out, targets)
        n = self.n_classes = out.shape[1]
        predicted = out.argmax(1)
        # Ignored pixels (and labels outside 0..n-1, which the per-batch check refuses) go to an extra
        # bin: a boolean mask would index with a data-dependent size, a host sync on a GPU.
        counted = (targets != self.ignore_index) & (targets >= 0) & (targets < n)
        index = torch.where(counted, targets * n + predicted, n * n).flatten()
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = torch.zeros(n * n + 1, dtype=torch.int64, device=index.device)
        counts.index_add_(0, index, torch.ones_like(index))

    def result(self, conditions):
        keys = ['clean'] + conditions
        counts = torch.stack([self.counts[key] for key in keys]).cpu().numpy()  # the one device-to-host copy
        n = self.n_classes
        scores = [_segmentation_scores(row[:n * n].reshape(n, n), self.ignore_index) for row in counts]
        rows = [dict(corruption=name, severity=severity, pixel_error=error, mean_iou=iou)
                for (name, severity), (error, iou) in zip(conditions, scores[1:])]
        table = pd.DataFrame(rows, columns=['corruption', 'severity', 'pixel_error', 'mean_iou'])
        return SegmentationRobustnessResult(table=table, clean_error=scores[0][0], clean_mean_iou=scores[0][1],
                                            mean_corruption_error=float(table.pixel_error.mean()),
                                            mean_corrupted_iou=float(table.mean_iou.mean()))


def _segmentation_scores(confusion, ignore_index=-100):
    """(pixel error, mean IoU) of a [target, predicted] confusion matrix; IoU over the classes that
    occur in the target or the prediction (a class absent from both has no IoU).

    The matrix holds only counted pixels (targets that are not `ignore_index`), but the model may still
    predict an `ignore_index` that is one of its classes (a 'Void' code): those pixels are errors of their
    true class, and the ignored label itself is never a class of the mean (its IoU would be 0).
    """
    total = confusion.sum()
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    if 0 <= ignore_index < len(present):
        present[ignore_index] = False
    error = 1 - intersection.sum() / total if total else float('nan')
    iou = float(np.mean(intersection[present] / union[present])) if present.any() else float('nan')
    return float(error), iou


def _compare(result, baseline):
    """Fill `result`'s mCE and relative mCE against the baseline's result (on its error column)."""
    column = result.error_column
    own = result.table.set_index(['corruption', 'severity'])[column]
    base = baseline.table.set_index(['corruption', 'severity'])[column]
    missing = own.index.difference(base.index)
    if len(missing):
        raise ValueError(f"baseline has no results for {list(missing)[:5]}...; evaluate it on the same "
                         f"corruptions and severities.")
    base = base.loc[own.index]
    names = result.table.corruption.unique()
    ce, relative = [], []
    for name in names:
        own_errors, base_errors = own.loc[name], base.loc[name]
        ce.append(own_errors.sum() / base_errors.sum() if base_errors.sum() > 0 else float('nan'))
        degradation = (base_errors - baseline.clean_error).sum()
        relative.append((own_errors - result.clean_error).sum() / degradation if degradation != 0
                        else float('nan'))
    result.mce = float(np.mean(ce))
    result.relative_mce = float(np.mean(relative))
    result.baseline = baseline
    return result


def _alexnet_scores(table, clean_error):
    """(mCE, relative mCE) in percent, normalised by AlexNet as in the ImageNet-C paper, over the 15
    CORRUPTIONS evaluated at all five severities of a classification `table`; (None, None) if none was.

    AlexNet's published numbers are means over severities 1-5, so sum_s AlexNet error = 5 x the mean.
    """
    ce, relative = [], []
    for name, rows in table.groupby('corruption', sort=False):
        if name not in ALEXNET_ERRORS or sorted(rows.severity) != [1, 2, 3, 4, 5]:
            continue
        alexnet = 5 * ALEXNET_ERRORS[name]
        ce.append(rows.error.sum() / alexnet)
        relative.append((rows.error.sum() - 5 * clean_error) / (alexnet - 5 * ALEXNET_CLEAN_ERROR))
    if not ce:
        return None, None
    return 100 * float(np.mean(ce)), 100 * float(np.mean(relative))


def _record_benchmark(result, options):
    """Put which benchmark made `result` on it, and for ImageNet-C classification the AlexNet-normalised mCE."""
    result.benchmark, result.published_jpeg = options['benchmark'], options['published_jpeg']
    if result.task == 'classification' and result.benchmark == 'imagenet-c':
        result.alexnet_mce, result.alexnet_relative_mce = _alexnet_scores(result.table, result.clean_error)
    return result


def _benchmark_options(benchmark, published_jpeg, images, baseline):
    """The `corrupt` options of this evaluation: the benchmark (chosen by the first batch's image size for
    None) and published_jpeg; a baseline result must come from the same ones."""
    options = dict(benchmark=benchmark if benchmark is not None else benchmark_for_size(*images.shape[-2:]),
                   published_jpeg=bool(published_jpeg))
    if isinstance(baseline, _RESULT_TYPES) and baseline.benchmark is not None:
        same_jpeg = (baseline.published_jpeg == options['published_jpeg']
                     or not get_benchmark(options['benchmark'], 0, 0).saved_as_jpeg)
        if baseline.benchmark != options['benchmark'] or not same_jpeg:
            raise ValueError(f"baseline was evaluated on {_benchmark_label(baseline)}, this evaluation uses "
                             f"benchmark={options['benchmark']!r}, published_jpeg={options['published_jpeg']}; "
                             f"errors are only comparable on the same corrupted images: pass the same benchmark "
                             f"and published_jpeg (or the baseline Learner).")
    return options


# ---------------------------------------------------------------------------------------------------
# evaluate_robustness

def _check_evaluation_args(corruptions, severities, baseline):
    if corruptions is not None:
        if isinstance(corruptions, str):
            raise ValueError(f"corruptions={corruptions!r} must be a sequence of names, e.g. ({corruptions!r},).")
        corruptions = tuple(corruptions)
        if not corruptions:
            raise ValueError("corruptions is empty; pass names from CORRUPTIONS or EXTRA_CORRUPTIONS.")
        for name in corruptions:
            _check_corruption_name(name, 'corruptions')
        _check_no_repeats(corruptions, 'corruptions')
    severities = (severities,) if isinstance(severities, (int, np.integer)) else tuple(severities)
    if not severities:
        raise ValueError("severities is empty; pass integers from 1 to 5.")
    for severity in severities:
        _check_severity(severity, 'severities')
    _check_no_repeats([int(s) for s in severities], 'severities')
    if baseline is not None and not isinstance(baseline, _RESULT_TYPES) and not hasattr(baseline, 'model'):
        raise ValueError(f"baseline must be a Learner, a RobustnessResult or None, got {type(baseline).__name__}.")
    if baseline is not None and not isinstance(baseline, _RESULT_TYPES):
        _check_learner(baseline, 'baseline')
    return corruptions, tuple(int(s) for s in severities)


def _check_no_repeats(values, argument):
    """ValueError when `values` names something twice: it would be evaluated, and weigh in the means, twice."""
    repeated = sorted({value for value in values if list(values).count(value) > 1}, key=str)
    if repeated:
        unique = tuple(dict.fromkeys(values))
        raise ValueError(f"{argument} lists {', '.join(map(repr, repeated))} more than once; each condition is "
                         f"evaluated once, so pass each once: {argument}={unique!r}.")


def _check_learner(learn, argument='learn'):
    """TypeError unless `learn` is a fastai Learner (a model, its DataLoaders and its loss function)."""
    missing = [name for name in ('model', 'dls', 'loss_func') if not hasattr(learn, name)]
    if missing:
        raise TypeError(f"{argument} must be a fastai Learner (it needs .model, .dls and .loss_func; this "
                        f"{type(learn).__name__} has no {', '.join('.' + m for m in missing)}). For a plain "
                        f"PyTorch model, wrap it with the DataLoaders it was trained on: "
                        f"Learner(dls, model, loss_func=CrossEntropyLossFlat()), then evaluate that.")


def _ignore_index(learn, ignore_index):
    """The label of unlabelled pixels: the argument, else the loss function's `ignore_index`, else -100."""
    if ignore_index is None:
        ignore_index = getattr(learn.loss_func, 'ignore_index', -100)
        return ignore_index if isinstance(ignore_index, (int, np.integer)) else -100
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise ValueError(f"ignore_index={ignore_index!r} must be an integer label (or None: the loss "
                         f"function's ignore_index, else -100).")
    return int(ignore_index)


def _evaluation_loader(learn, dl):
    if dl is None:
        dls = getattr(learn, 'dls', None)
        dl = _loader(dls, 1)
        if dl is None:
            raise ValueError("learn.dls has no validation DataLoader (evaluate_robustness uses the validation "
                             "set); build the DataLoaders with a validation split (e.g. valid_pct=0.2) or pass "
                             "dl=learn.dls.test_dl(items, with_labels=True).")
        where = "learn's validation set"
    else:
        where = "dl"
    size = getattr(dl, 'n', None)
    if size is None:
        size = len(dl.dataset) if hasattr(dl, 'dataset') else len(dl)
    if size == 0:
        raise ValueError(f"{where} is empty: nothing to evaluate; build the DataLoaders with a validation "
                         f"split (e.g. valid_pct=0.2) or pass dl=learn.dls.test_dl(items, with_labels=True).")
    if hasattr(dl, 'new') and (getattr(dl, 'shuffle', False) or getattr(dl, 'drop_last', False)):
        dl = dl.new(shuffle=False, drop_last=False)  # as Learner.get_preds: every image, once
    return dl


def _batch_tensors(batch, n_inputs):
    """(images [B, C, H, W], labels) of one batch as plain tensors; labels [B] or masks [B, H, W]."""
    if n_inputs != 1 or len(batch) < 2:
        raise ValueError(f"evaluate_robustness needs batches (images, labels), got {len(batch)} "
                         f"items with n_inp={n_inputs}.")
    images = torch.as_tensor(batch[0]).as_subclass(torch.Tensor)
    targets = torch.as_tensor(batch[1]).as_subclass(torch.Tensor)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"the DataLoader's inputs have shape {tuple(images.shape)}; "
                         f"expected images [B, C, H, W] with C = 1 or 3.")
    integer = not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool
    if integer and targets.ndim == 1:
        return images, targets.long(), 'classification'
    if integer and targets.ndim == 3 and targets.shape[1:] == images.shape[2:]:
        return images, targets.long(), 'segmentation'  # uint8 masks would overflow in target * n_classes
    raise ValueError(f"labels must be integer class indices [B] (classification) or integer masks [B, H, W] "
                     f"of the images' size (segmentation), got {targets.dtype} of shape {tuple(targets.shape)} "
                     f"for images of shape {tuple(images.shape)}.")


def _conditions(task, corruptions, severities):
    """The (corruption, severity) pairs to evaluate; pixel-moving corruptions are refused for segmentation."""
    if corruptions is None:
        corruptions = SEGMENTATION_CORRUPTIONS if task == 'segmentation' else CORRUPTIONS
    if task == 'segmentation':
        moving = [name for name in corruptions if name in _MOVES_PIXELS]
        if moving:
            reasons = '; '.join(f"{name} {_MOVES_PIXELS[name]}" for name in moving)
            raise ValueError(f"corruptions {moving} move pixels, so the masks would no longer match the "
                             f"images ({reasons}); leave them out (the default for segmentation is "
                             f"SEGMENTATION_CORRUPTIONS).")
    return [(name, severity) for name in corruptions for severity in severities]


# How far decoded pixels may stray from [0, 1]: float error of the decode, as `corrupt`'s own check allows.
_PIXEL_TOLERANCE = 1e-3


def _pixel_flags(pixels):
    """Whether decoded `pixels` hold NaN or values outside [0, 1], and their range, as one device tensor."""
    low, high = torch.aminmax(pixels)  # NaN propagates into both
    outside = (low < -_PIXEL_TOLERANCE) | (high > 1 + _PIXEL_TOLERANCE)
    return torch.stack([torch.isnan(low).float(), outside.float(), low.float(), high.float()])


def _check_batch(batch_index, pixel_flags, targets, task, n_classes, ignore_index):
    """Refuse NaN pixels, pixels outside [0, 1] (and, for segmentation, mask labels outside 0..n_classes-1
    that are not `ignore_index`) with one host sync for the batch; `pixel_flags` from `_pixel_flags`."""
    flags = pixel_flags
    if task == 'segmentation':
        bad_labels = ((targets < 0) | (targets >= n_classes)) & (targets != ignore_index)
        flags = torch.cat([flags, bad_labels.any().float().view(1).to(flags.device)])
    problems = flags.tolist()
    if problems[0]:
        raise ValueError(f"batch {batch_index} of the evaluation set has NaN pixels (after decoding with the "
                         f"DataLoaders' Normalize); corruptions need pixels in [0, 1]: check the images and "
                         f"the Normalize statistics (a zero std?).")
    if problems[1]:
        low, high = problems[2], problems[3]
        raise ValueError(f"batch {batch_index} of the evaluation set decodes to pixel values in [{low:.3g}, "
                         f"{high:.3g}], not [0, 1] (decoded with the DataLoaders' Normalize). Corruptions are "
                         f"defined on pixels, and clamping would change the images the model is scored on. "
                         f"Check that the Normalize statistics belong to these images, that no batch "
                         f"transform after Normalize (e.g. RandomErasing) runs on the validation set, and that "
                         f"images are scaled to [0, 1] (IntToFloatTensor) before Normalize.")
    if task == 'segmentation' and problems[4]:
        labels = torch.unique(targets).tolist()
        shown = ', '.join(map(str, labels[:10])) + (', ...' if len(labels) > 10 else '')
        raise ValueError(f"batch {batch_index} has mask labels {shown}, but the model predicts {n_classes} "
                         f"classes (0..{n_classes - 1}) and ignore_index is {ignore_index}; pass the label of "
                         f"unlabelled pixels as ignore_index=... (or fix the masks' codes).")


def evaluate_robustness(learn, dl=None, corruptions=None, severities=(1, 2, 3, 4, 5), baseline=None,
                        *, generator=None, show_progress=True, ignore_index=None, benchmark=None,
                        published_jpeg=True):
    """Error of `learn`'s model on its validation set (or `dl`), clean and under every corruption x
    severity: a `RobustnessResult` for classification, a `SegmentationRobustnessResult` for segmentation.

    Batches are decoded to pixels with the DataLoaders' `Normalize` (none: the batch already is
    pixels in [0, 1]), moved to the model's device, corrupted there with `corrupt`, re-encoded and
    run through the model in eval mode without gradients; the model's train/eval mode is restored
    afterwards. `baseline` (another Learner, evaluated on the very same corrupted images, or its
    result) adds `mce` and `relative_mce`. `generator` seeds the corruptions (None: torch's global
    RNG; on a GPU pass a generator on the GPU, so that the draws are made there).

    `benchmark`: whose corruptions, 'cifar10-c', 'tiny-imagenet-c' or 'imagenet-c' (the tables and code of
    each generator script; lengths scale with min(H, W) / its native 32, 64 or 224 px); None chooses by
    the first batch's smaller image side (up to 48 px CIFAR-10-C, up to 128 px Tiny-ImageNet-C, else
    ImageNet-C). `published_jpeg` adds the quality-85 JPEG save every published Tiny-ImageNet-C and
    ImageNet-C file went through (see `corrupt`). The result says which (`result.benchmark`); with
    'imagenet-c' it also carries the AlexNet-normalised `alexnet_mce` that ImageNet-C papers report.

    The task follows the labels. Class indices [B]: top-1 error and RMS calibration error
    (`corruptions` default `CORRUPTIONS`). Masks [B, H, W] with a model returning [B, n_classes, H, W]
    (e.g. `unet_learner` on `SegmentationDataLoaders`): pixel error and mean IoU, pixels labelled
    `ignore_index` left out (default: the loss function's `ignore_index`, else -100). Segmentation uses
    only corruptions that keep image content in place, `SEGMENTATION_CORRUPTIONS` by default: the 15
    corruptions but `elastic_transform` (a warp) and `zoom_blur` (zooms about the centre, moving
    content outwards by up to 12.5% of the image size, 15% for ImageNet-C); passing either is a
    ValueError. `glass_blur` stays: its local pixel copies (the scripts' loop copies from up and left)
    shift content by 0.5-0.9 px per sweep on average, 1-3 sweeps, at the benchmark's size: about as far as
    the Gaussian blurs around them spread it; `motion_blur` stays: the sharpest copy is the unmoved one, the others
    trail in one direction as any blur kernel spreads content (pixel-moving corruptions are what
    segmentation robustness benchmarks such as Cityscapes-C leave out).

    Results stay on the model's device until the end (one device-to-host copy); each batch is read
    back once, to refuse NaN pixels, pixels outside [0, 1] (never clamped: the model would be scored on
    other images than `validate` sees) and unknown mask labels, where fastai's DataLoader has just
    waited for the GPU anyway to copy the batch. `learn` must be a fastai Learner (a TypeError says how to
    wrap a plain model); a corruption or severity listed twice is a ValueError.
    """
    _check_learner(learn)
    corruptions, severities = _check_evaluation_args(corruptions, severities, baseline)
    check_benchmark(benchmark)
    _check_published_jpeg(published_jpeg)
    ignore_index = _ignore_index(learn, ignore_index)
    dl = _evaluation_loader(learn, dl)
    runners = [_ModelRunner(learn, dl)]
    if baseline is not None and not isinstance(baseline, _RESULT_TYPES):
        runners.append(_ModelRunner(baseline, dl))
    modes = [runner.model.training for runner in runners]
    task, conditions, stats, bar, options = None, None, None, None, None
    try:
        for runner in runners:
            runner.model.eval()
        with torch.no_grad():
            for batch_index, batch in enumerate(dl):
                images, targets, batch_task = _batch_tensors(batch, getattr(dl, 'n_inp', 1))
                if task is None:  # the first batch decides the task, before any work
                    task, conditions = batch_task, _conditions(batch_task, corruptions, severities)
                    options = _benchmark_options(benchmark, published_jpeg, images, baseline)
                    _prepare_records(runners, task, baseline, ignore_index)
                    stats = normalize_stats(dl, images.device)
                    bar = _progress_bar(len(dl) * len(conditions)) if show_progress else None
                elif batch_task != task:
                    raise ValueError(f"batch {batch_index} has {batch_task} labels after {task} ones.")
                pixels = move(decode(images, stats), runners[0].device)
                targets = move(targets, runners[0].device)
                _evaluate_batch(batch_index, runners, pixels, targets, conditions, generator, ignore_index, bar,
                                options)
    finally:
        for runner, training in zip(runners, modes):
            runner.model.train(training)
        if bar is not None and bar.last_v != bar.total:
            bar.on_iter_end()
    result = _record_benchmark(runners[0].records.result(conditions), options)
    if baseline is None:
        return result
    if isinstance(baseline, _RESULT_TYPES):
        base_result = baseline
    else:
        base_result = _record_benchmark(runners[1].records.result(conditions), options)
    return _compare(result, base_result)


def _prepare_records(runners, task, baseline, ignore_index):
    if isinstance(baseline, _RESULT_TYPES) and baseline.task != task:
        raise ValueError(f"baseline is a {type(baseline).__name__}, but learn's labels make this a {task} "
                         f"evaluation; pass the baseline's result for the same task.")
    for runner in runners:
        runner.records = (_SegmentationRecords(ignore_index) if task == 'segmentation'
                          else _ClassificationRecords(runner.activation))


def _progress_bar(total):
    from fastprogress.fastprogress import progress_bar
    bar = progress_bar(range(total), leave=False)
    bar.update(0)
    return bar


def _evaluate_batch(batch_index, runners, pixels, targets, conditions, generator, ignore_index, bar, options):
    """Record every runner's outputs on the clean and on every corrupted version of one batch."""
    pixel_flags = _pixel_flags(pixels)
    pixels.clamp_(0, 1)  # only the decode's float error, within _PIXEL_TOLERANCE: more is refused below
    clean = [runner.forward(pixels) for runner in runners]
    for runner, out in zip(runners, clean):
        runner.records.check_output(out, targets)
    _check_batch(batch_index, pixel_flags, targets, runners[0].records.task, clean[0].shape[1], ignore_index)
    for runner, out in zip(runners, clean):
        runner.records.add('clean', out, move(targets, out.device))
    for done, (name, severity) in enumerate(conditions, batch_index * len(conditions) + 1):
        corrupted = corrupt(pixels, name, severity, generator, **options)
        for runner in runners:
            out = runner.forward(corrupted)
            runner.records.add((name, severity), out, move(targets, out.device))
        if bar is not None:
            bar.update(done)


def plot_corruption_errors(results, ax=None, title=None):
    """Bar chart of the error in percent per corruption (mean over severities, clean first) for one or
    more models: top-1 error for classifiers, pixel error for segmentation.

    `results`: a `RobustnessResult` / `SegmentationRobustnessResult` or a dict {model name: result}, all
    of one kind. The default title names the benchmark the corruptions came from (e.g. "ImageNet-C
    (published JPEG)"); `title` replaces it. Drawn on `ax`, or on a new 12 x 4 inch figure.

    Returns the matplotlib `Axes` drawn on: one group of bars per condition ('clean', then the
    corruptions in the order evaluated), one bar per model, a legend with the model names, the y axis
    in percent. Save it with `ax.figure.savefig(path)`.
    """
    import matplotlib.pyplot as plt
    if isinstance(results, _RESULT_TYPES):
        results = {'model': results}
    if not isinstance(results, Mapping) or not results or not all(
            isinstance(r, _RESULT_TYPES) for r in results.values()):
        raise ValueError("results must be a RobustnessResult (or SegmentationRobustnessResult) or a non-empty "
                         "dict {name: result}.")
    kinds = {type(r) for r in results.values()}
    if len(kinds) > 1:
        raise ValueError(f"results mix {sorted(k.__name__ for k in kinds)}; plot classification and "
                         f"segmentation results separately.")
    kind = kinds.pop()
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 4))
    names = ['clean'] + list(dict.fromkeys(n for r in results.values() for n in r.table.corruption))
    width = 0.8 / len(results)
    for i, (label, result) in enumerate(results.items()):
        errors = result.per_corruption()[kind.error_column]
        heights = [result.clean_error] + [errors.get(name, float('nan')) for name in names[1:]]
        positions = np.arange(len(names)) + (i - (len(results) - 1) / 2) * width
        ax.bar(positions, 100 * np.asarray(heights, dtype=np.float64), width=width, label=label)
    ax.set_xticks(np.arange(len(names)))
    ax.set_xticklabels([name.replace('_', ' ') for name in names], rotation=45, ha='right')
    severities = sorted({int(s) for r in results.values() for s in r.table.severity})
    ax.set_ylabel(f'{kind.error_label} (%)')
    benchmarks = list(dict.fromkeys(_benchmark_label(r) for r in results.values() if r.benchmark is not None))
    source = f" ({', '.join(benchmarks)})" if benchmarks else ''
    ax.set_title(title if title is not None else
                 f'{kind.error_label.capitalize()} (%) per corruption{source}, clean and mean over severities '
                 f'{_severity_span(severities)} (lower is better)')
    ax.legend()
    return ax


def _severity_span(severities):
    consecutive = severities == list(range(severities[0], severities[-1] + 1))
    if len(severities) > 1 and consecutive:
        return f'{severities[0]}-{severities[-1]}'
    return ', '.join(map(str, severities))
