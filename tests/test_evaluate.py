"""evaluate_robustness on tiny fastai Learners (classification and segmentation) and its plot."""
import math
import types

import matplotlib
import numpy as np
import pytest
import torch
from torch import nn

from _images import photo_crops, to_grayscale, to_tensor
from fastai_jsd.robustness import (CORRUPTIONS, EXTRA_CORRUPTIONS, SEGMENTATION_CORRUPTIONS, RobustnessResult,
                                   SegmentationRobustnessResult, calibration_error, corrupt, evaluate_robustness,
                                   plot_corruption_errors)

ALL = CORRUPTIONS + EXTRA_CORRUPTIONS


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------- evaluate_robustness

class TinyNet(nn.Module):
    """A small CNN that records whether it ran in training mode."""

    def __init__(self, channels=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(16, 2))
        self.modes = []

    def forward(self, x):
        self.modes.append(self.training)
        return self.body(x)


def make_dls(n_valid=24, normalize=True, size=32, n_train=8):
    from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, IndexSplitter, Normalize, PILImage,
                                   imagenet_stats)
    n = n_train + n_valid
    photos = photo_crops(n, size, size, seed=21)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock),
                      get_x=lambda i: PILImage.create(photos[i]),
                      get_y=lambda i: i % 2,  # which of the two photos the crop comes from
                      splitter=IndexSplitter(list(range(n_train, n))),
                      batch_tfms=[Normalize.from_stats(*imagenet_stats, cuda=False)] if normalize else None)
    return block.dataloaders(list(range(n)), bs=16, device='cpu')


def make_learner(dls, seed=0):
    from fastai.vision.all import CrossEntropyLossFlat, Learner
    torch.manual_seed(seed)
    return Learner(dls, TinyNet(), loss_func=CrossEntropyLossFlat())


@pytest.fixture(scope='module')
def dls():
    return make_dls()


def manual_errors(learn, corruptions, severities, seed):
    """The documented procedure by hand: decode, corrupt (batches outer), encode, classify."""
    mean, std = [torch.as_tensor(v).view(1, 3, 1, 1) for v in
                 (learn.dls.after_batch.fs[-1].mean, learn.dls.after_batch.fs[-1].std)]
    generator = seeded(seed)
    wrong = {}
    learn.model.eval()
    with torch.no_grad():
        for xb, yb in learn.dls.valid:
            pixels = (torch.as_tensor(xb).as_subclass(torch.Tensor) * std + mean).clamp(0, 1)
            for name in corruptions:
                for severity in severities:
                    images = corrupt(pixels, name, severity, generator)
                    logits = learn.model((images - mean) / std)
                    wrong.setdefault((name, severity), []).append(logits.argmax(-1) != yb.as_subclass(torch.Tensor))
    return {key: float(torch.cat(v).float().mean()) for key, v in wrong.items()}


def test_evaluate_robustness_matches_get_preds_and_manual_corruption(dls):
    learn = make_learner(dls)
    learn.model.train()
    corruptions, severities = ('gaussian_noise', 'contrast', 'pixelate'), (2, 5)
    result = evaluate_robustness(learn, corruptions=corruptions, severities=severities,
                                 generator=seeded(3), show_progress=False)
    assert isinstance(result, RobustnessResult)
    assert learn.model.training and learn.model.modes and not any(learn.model.modes)  # eval inside, restored
    assert all(p.grad is None for p in learn.model.parameters())
    probs, targets = learn.get_preds(dl=learn.dls.valid)
    assert result.clean_error == pytest.approx(float((probs.argmax(-1) != targets).float().mean()))
    assert result.clean_calibration == pytest.approx(
        calibration_error(probs.max(-1).values, probs.argmax(-1) == targets), abs=1e-6)
    table = result.table
    assert list(table.columns) == ['corruption', 'severity', 'error', 'rms_calibration_error']
    assert list(zip(table.corruption, table.severity)) == [(c, s) for c in corruptions for s in severities]
    expected = manual_errors(learn, corruptions, severities, seed=3)
    for row in table.itertuples():
        assert row.error == pytest.approx(expected[(row.corruption, row.severity)])
    assert result.mean_corruption_error == pytest.approx(table.error.mean())
    assert result.corrupted_calibration == pytest.approx(table.rms_calibration_error.mean())
    assert result.mce is None and result.relative_mce is None
    assert set(result.per_corruption().index) == set(corruptions)
    assert 'clean_error' in repr(result) and result.summary()['clean_error'] == result.clean_error


def test_evaluate_robustness_keeps_eval_mode_and_restores_after_an_error(dls):
    learn = make_learner(dls)
    learn.model.eval()
    evaluate_robustness(learn, corruptions=('fog',), severities=(1,), show_progress=False)
    assert not learn.model.training
    learn.model.train()
    original = learn.model.forward
    learn.model.forward = lambda x: original(x)[:, :1].expand(-1, 2)[:1]  # wrong batch size: an error
    with pytest.raises(ValueError, match='class scores'):
        evaluate_robustness(learn, corruptions=('fog',), severities=(1,), show_progress=False)
    assert learn.model.training


def test_evaluate_robustness_baseline_learner_and_result(dls):
    learn, other = make_learner(dls, seed=0), make_learner(dls, seed=1)
    kwargs = dict(corruptions=('gaussian_noise', 'zoom_blur'), severities=(3, 5), show_progress=False)
    itself = evaluate_robustness(learn, baseline=learn, generator=seeded(4), **kwargs)
    degradation = itself.table.groupby('corruption').error.sum() - 2 * itself.clean_error
    assert itself.mce == pytest.approx(1.0)
    if (degradation != 0).all():
        assert itself.relative_mce == pytest.approx(1.0)
    else:  # a corruption that costs the baseline nothing has no relative error
        assert math.isnan(itself.relative_mce)
    with_learner = evaluate_robustness(learn, baseline=other, generator=seeded(4), **kwargs)
    base = evaluate_robustness(other, generator=seeded(4), **kwargs)
    with_result = evaluate_robustness(learn, baseline=base, generator=seeded(4), **kwargs)
    assert with_learner.mce == pytest.approx(with_result.mce)
    assert with_learner.baseline.table.equals(base.table)
    own, theirs = with_result.table.set_index(['corruption', 'severity']).error, base.table.set_index(
        ['corruption', 'severity']).error
    expected_mce = np.mean([own[c].sum() / theirs[c].sum() for c in kwargs['corruptions']])
    assert with_result.mce == pytest.approx(expected_mce)
    with np.errstate(invalid='ignore', divide='ignore'):
        expected_rel = np.mean([(own[c] - with_result.clean_error).sum() / (theirs[c] - base.clean_error).sum()
                                for c in kwargs['corruptions']])
    assert with_result.relative_mce == pytest.approx(expected_rel, nan_ok=True)
    with pytest.raises(ValueError, match='baseline has no results'):
        evaluate_robustness(learn, baseline=base, corruptions=('fog',), severities=(1,), show_progress=False)


def test_evaluate_robustness_without_normalize_feeds_pixels():
    plain = make_dls(n_valid=12, normalize=False)
    learn = make_learner(plain)
    result = evaluate_robustness(learn, corruptions=('contrast',), severities=(5,), show_progress=False)
    with torch.no_grad():
        learn.model.eval()
        xb, yb = plain.valid.one_batch()
        pixels = xb.as_subclass(torch.Tensor)
        assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1
        wrong = learn.model(corrupt(pixels, 'contrast', 5)).argmax(-1) != yb.as_subclass(torch.Tensor)
    assert result.table.error[0] == pytest.approx(float(wrong.float().mean()))


def test_evaluate_robustness_on_one_channel_images():
    from fastai.vision.all import (CategoryBlock, CrossEntropyLossFlat, DataBlock, ImageBlock, IndexSplitter,
                                   Learner, Normalize, PILImageBW)
    photos = to_grayscale(photo_crops(20, 28, 28, seed=4))  # Fashion-MNIST-like: 28 px, 1 channel
    block = DataBlock(blocks=(ImageBlock(cls=PILImageBW), CategoryBlock),
                      get_x=lambda i: PILImageBW.create(photos[i]), get_y=lambda i: i % 2,
                      splitter=IndexSplitter(list(range(8, 20))),
                      batch_tfms=Normalize.from_stats([0.5], [0.25], cuda=False))
    gray_dls = block.dataloaders(list(range(20)), bs=8, device='cpu')
    torch.manual_seed(0)
    learn = Learner(gray_dls, TinyNet(channels=1), loss_func=CrossEntropyLossFlat())
    result = evaluate_robustness(learn, corruptions=ALL, severities=(5,), generator=seeded(), show_progress=False)
    assert len(result.table) == len(ALL) and result.table.error.between(0, 1).all()


def test_evaluate_robustness_bad_input(dls):
    learn = make_learner(dls)
    with pytest.raises(ValueError, match='not a known corruption'):
        evaluate_robustness(learn, corruptions=('haze',), show_progress=False)
    with pytest.raises(ValueError, match='sequence of names'):
        evaluate_robustness(learn, corruptions='fog', show_progress=False)
    with pytest.raises(ValueError, match='severities'):
        evaluate_robustness(learn, corruptions=('fog',), severities=(0,), show_progress=False)
    with pytest.raises(ValueError, match='baseline'):
        evaluate_robustness(learn, corruptions=('fog',), baseline='resnet', show_progress=False)
    empty = make_learner(make_dls(n_valid=0))
    with pytest.raises(ValueError, match='validation set is empty'):
        evaluate_robustness(empty, show_progress=False)


def test_evaluate_robustness_without_a_validation_loader_says_so(dls):
    from fastai.vision.all import CrossEntropyLossFlat, DataLoaders, Learner
    learn = Learner(DataLoaders(dls.train), TinyNet(), loss_func=CrossEntropyLossFlat())
    with pytest.raises(ValueError, match='no validation DataLoader.*valid_pct'):
        evaluate_robustness(learn, corruptions=('fog',), show_progress=False)
    result = evaluate_robustness(learn, dl=dls.valid, corruptions=('fog',), severities=(1,), show_progress=False)
    assert len(result.table) == 1  # with dl=..., the training loader's Normalize decodes


def test_evaluate_robustness_refuses_nan_batches():
    broken = make_dls(n_valid=12)
    broken.valid.after_batch.fs[-1].std = torch.zeros(1, 3, 1, 1)  # a zero std: encoded inf, decoded NaN
    with pytest.raises(ValueError, match='batch 0 .* NaN pixels'):
        evaluate_robustness(make_learner(broken), corruptions=('fog',), severities=(1,), show_progress=False)


def test_evaluate_robustness_refuses_pixels_outside_the_unit_range_instead_of_clamping():
    """A batch transform after Normalize that leaves the pixel range (here +2 in normalized space) made
    the evaluation clamp silently and score other images than `validate` does."""
    from fastai.vision.all import TensorImage, Transform

    class Shift(Transform):
        order = 99  # after Normalize, on every split (as a RandomErasing meant for training would be)

        def encodes(self, x: TensorImage):
            return x + 2

    shifted = make_dls(n_valid=12)
    shifted.valid.after_batch.add(Shift())
    learn = make_learner(shifted)
    with pytest.raises(ValueError, match=r'batch 0 .* pixel values in \[.*\], not \[0, 1\].*after Normalize'):
        evaluate_robustness(learn, corruptions=('fog',), severities=(1,), show_progress=False)


def test_evaluate_robustness_refuses_repeated_corruptions_and_severities_before_any_work(dls):
    learn = make_learner(dls)
    learn.model.modes.clear()
    with pytest.raises(ValueError, match=r"corruptions lists 'fog' more than once.*\('fog', 'contrast'\)"):
        evaluate_robustness(learn, corruptions=('fog', 'contrast', 'fog'), show_progress=False)
    with pytest.raises(ValueError, match=r"severities lists 2 more than once.*\(2, 3\)"):
        evaluate_robustness(learn, corruptions=('fog',), severities=(2, 3, 2), show_progress=False)
    assert learn.model.modes == []  # refused before the model ran


def test_evaluate_robustness_needs_a_learner_and_says_how_to_wrap_a_model(dls):
    model = TinyNet()
    with pytest.raises(TypeError, match=r'fastai Learner.*TinyNet has no \.model, \.dls, \.loss_func.*Learner\(dls, model'):
        evaluate_robustness(model, dl=dls.valid, corruptions=('fog',), show_progress=False)
    with pytest.raises(TypeError, match=r'baseline must be a fastai Learner'):
        evaluate_robustness(make_learner(dls), corruptions=('fog',), show_progress=False,
                            baseline=types.SimpleNamespace(model=model))
    assert model.modes == []


@pytest.mark.slow  # ~1.5 s on a quiet machine, but 600 resnet18 forwards: slow under load
def test_evaluate_robustness_every_corruption_with_vision_learner_and_progress_bar(capsys):
    from fastai.vision.all import resnet18, vision_learner
    small = make_dls(n_valid=8, n_train=4)
    learn = vision_learner(small, resnet18, pretrained=False)
    result = evaluate_robustness(learn, generator=seeded())
    assert len(result.table) == 75 and result.table.error.between(0, 1).all()
    assert result.table.rms_calibration_error.between(0, 1).all()
    assert '100.00%' in capsys.readouterr().out  # fastprogress' console bar ran to the end


def test_plot_corruption_errors_in_percent_with_a_title(dls):
    matplotlib.use('Agg')
    learn = make_learner(dls)
    kwargs = dict(corruptions=('fog', 'contrast', 'pixelate'), severities=(1, 3), show_progress=False)
    first, second = evaluate_robustness(learn, **kwargs), evaluate_robustness(make_learner(dls, 2), **kwargs)
    ax = plot_corruption_errors({'plain': first, 'other': second})
    assert len(ax.patches) == 2 * 4
    assert [t.get_text() for t in ax.get_xticklabels()] == ['clean', 'fog', 'contrast', 'pixelate']
    heights = [p.get_height() for p in ax.patches[:4]]
    assert heights == pytest.approx([100 * first.clean_error] + list(100 * first.per_corruption().error))
    assert '%' in ax.get_ylabel() and 'error' in ax.get_ylabel()
    assert 'Top-1 error (%)' in ax.get_title() and 'severities 1, 3' in ax.get_title()
    assert plot_corruption_errors(first).get_legend() is not None
    assert plot_corruption_errors(first, title='Fashion-MNIST').get_title() == 'Fashion-MNIST'
    with pytest.raises(ValueError, match='RobustnessResult'):
        plot_corruption_errors({})


# ------------------------------------------------------------------------------------ segmentation

CODES = ['dark', 'mid', 'bright']


def make_segmentation_dls(n_valid=12, n_train=4, size=32, ignore_label=None):
    """Photo crops with 3-class masks (brightness terciles); `ignore_label` marks the left 4 columns."""
    from fastai.vision.all import (DataBlock, ImageBlock, IndexSplitter, MaskBlock, Normalize, PILImage, PILMask,
                                   imagenet_stats)
    n = n_train + n_valid
    photos = photo_crops(n, size, size, seed=31)
    gray = to_grayscale(photos)
    masks = np.digitize(gray, np.quantile(gray, [1 / 3, 2 / 3])).astype(np.uint8)
    if ignore_label is not None:
        masks[:, :, :4] = ignore_label
    block = DataBlock(blocks=(ImageBlock, MaskBlock(CODES)),
                      get_x=lambda i: PILImage.create(photos[i]), get_y=lambda i: PILMask.create(masks[i]),
                      splitter=IndexSplitter(list(range(n_train, n))),
                      batch_tfms=[Normalize.from_stats(*imagenet_stats, cuda=False)])
    return block.dataloaders(list(range(n)), bs=8, device='cpu')


class TinySegNet(nn.Module):
    """Per-pixel class scores [B, 3, H, W] from a 3 x 3 convolution."""

    def __init__(self, n_classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, n_classes, 1))

    def forward(self, x):
        return self.body(x)


def make_segmentation_learner(dls, seed=0, **loss_kwargs):
    from fastai.vision.all import CrossEntropyLossFlat, Learner
    torch.manual_seed(seed)
    return Learner(dls, TinySegNet(), loss_func=CrossEntropyLossFlat(axis=1, **loss_kwargs))


@pytest.fixture(scope='module')
def seg_dls():
    return make_segmentation_dls()


def manual_segmentation_scores(learn, conditions, seed, ignore_index=-100):
    """Pixel error and mean IoU per condition by hand: numpy confusion matrices of the decoded,
    corrupted (batches outer, conditions in order), re-encoded and segmented images."""
    norm = learn.dls.after_batch.fs[-1]
    mean, std = (torch.as_tensor(v).view(1, 3, 1, 1) for v in (norm.mean, norm.std))
    generator = seeded(seed)
    matrices = {}
    learn.model.eval()
    with torch.no_grad():
        for xb, yb in learn.dls.valid:
            pixels = (xb.as_subclass(torch.Tensor) * std + mean).clamp(0, 1)
            masks = yb.as_subclass(torch.Tensor).numpy()
            for key in ['clean'] + conditions:
                images = pixels if key == 'clean' else corrupt(pixels, *key, generator)
                predicted = learn.model((images - mean) / std).argmax(1).numpy()
                keep = masks != ignore_index
                counts = np.bincount(masks[keep] * 3 + predicted[keep], minlength=9).reshape(3, 3)
                matrices[key] = matrices.get(key, 0) + counts
    scores = {}
    for key, matrix in matrices.items():
        intersection = np.diag(matrix)
        union = matrix.sum(0) + matrix.sum(1) - intersection
        scores[key] = (1 - intersection.sum() / matrix.sum(), np.mean(intersection[union > 0] / union[union > 0]))
    return scores


def test_evaluate_robustness_segmentation_pixel_error_and_mean_iou(seg_dls):
    learn = make_segmentation_learner(seg_dls)
    corruptions, severities = ('gaussian_noise', 'fog', 'glass_blur'), (2, 5)
    result = evaluate_robustness(learn, corruptions=corruptions, severities=severities, generator=seeded(5),
                                 show_progress=False)
    assert isinstance(result, SegmentationRobustnessResult)
    table = result.table
    assert list(table.columns) == ['corruption', 'severity', 'pixel_error', 'mean_iou']
    conditions = [(c, s) for c in corruptions for s in severities]
    assert list(zip(table.corruption, table.severity)) == conditions
    expected = manual_segmentation_scores(learn, conditions, seed=5)
    assert (result.clean_error, result.clean_mean_iou) == pytest.approx(expected['clean'])
    for row in table.itertuples():
        assert (row.pixel_error, row.mean_iou) == pytest.approx(expected[(row.corruption, row.severity)])
    assert result.mean_corruption_error == pytest.approx(table.pixel_error.mean())
    assert result.mean_corrupted_iou == pytest.approx(table.mean_iou.mean())
    assert result.mce is None
    assert set(result.summary()) == {'clean_error', 'clean_mean_iou', 'mean_corruption_error', 'mean_corrupted_iou',
                                     'mce', 'relative_mce'}
    assert 'clean_mean_iou=' in repr(result) and 'mean_corrupted_iou=' in repr(result)
    assert list(result.per_corruption().columns) == ['pixel_error', 'mean_iou']


def test_evaluate_robustness_segmentation_ignore_index():
    dls = make_segmentation_dls(n_valid=8, ignore_label=255)
    conditions = [('contrast', 4)]
    from_loss = evaluate_robustness(make_segmentation_learner(dls, ignore_index=255), corruptions=('contrast',),
                                    severities=(4,), show_progress=False)
    expected = manual_segmentation_scores(make_segmentation_learner(dls), conditions, seed=0, ignore_index=255)
    assert from_loss.clean_error == pytest.approx(expected['clean'][0])
    assert from_loss.table.mean_iou[0] == pytest.approx(expected[('contrast', 4)][1])
    explicit = evaluate_robustness(make_segmentation_learner(dls), corruptions=('contrast',), severities=(4,),
                                   show_progress=False, ignore_index=255)
    assert explicit.table.equals(from_loss.table)
    with pytest.raises(ValueError, match=r'mask labels 0, 1, 2, 255.*3 classes.*ignore_index is -100'):
        evaluate_robustness(make_segmentation_learner(dls), corruptions=('contrast',), show_progress=False)
    with pytest.raises(ValueError, match='ignore_index=2.5'):
        evaluate_robustness(make_segmentation_learner(dls), show_progress=False, ignore_index=2.5)


class VoidInLastColumn(nn.Module):
    """TinySegNet's scores for classes 0-2 plus a 'Void' class 3 that wins in the last column of every image."""

    def __init__(self):
        super().__init__()
        self.body = TinySegNet().body

    def forward(self, x):
        scores = self.body(x)
        void = torch.full_like(scores[:, :1], -1e4)
        void[..., -1] = 1e4
        return torch.cat([scores, void], 1)


def test_segmentation_mean_iou_leaves_out_an_ignore_index_among_the_classes():
    """'Void' = 3 is ignored in the targets (left 4 columns) but predicted in the last column: those pixels are
    errors of their true classes, and class 3 (IoU 0) is not one of the classes the mean IoU averages."""
    from fastai.vision.all import CrossEntropyLossFlat, Learner
    dls = make_segmentation_dls(n_valid=8, ignore_label=3)
    torch.manual_seed(0)
    learn = Learner(dls, VoidInLastColumn(), loss_func=CrossEntropyLossFlat(axis=1, ignore_index=3))
    result = evaluate_robustness(learn, corruptions=('contrast',), severities=(1,), show_progress=False)
    confusion = np.zeros((4, 4), dtype=np.int64)
    learn.model.eval()
    with torch.no_grad():
        for xb, yb in dls.valid:
            masks = yb.as_subclass(torch.Tensor).numpy()
            predicted = learn.model(xb.as_subclass(torch.Tensor)).argmax(1).numpy()
            keep = masks != 3
            confusion += np.bincount(masks[keep] * 4 + predicted[keep], minlength=16).reshape(4, 4)
    assert confusion[:, 3].sum() > 0  # the model does predict 'Void' on counted pixels
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    assert result.clean_mean_iou == pytest.approx(np.mean(intersection[:3] / union[:3]))
    assert result.clean_mean_iou != pytest.approx(np.mean(intersection / union))  # what counting 'Void' gave
    assert result.clean_error == pytest.approx(1 - intersection.sum() / confusion.sum())


def test_segmentation_uses_only_corruptions_that_keep_pixels_in_place(seg_dls):
    assert SEGMENTATION_CORRUPTIONS == tuple(c for c in CORRUPTIONS if c not in ('zoom_blur', 'elastic_transform'))
    small = make_segmentation_dls(n_valid=4)
    result = evaluate_robustness(make_segmentation_learner(small), severities=(1,), generator=seeded(),
                                 show_progress=False)
    assert tuple(result.table.corruption) == SEGMENTATION_CORRUPTIONS
    assert result.table.pixel_error.between(0, 1).all() and result.table.mean_iou.between(0, 1).all()
    for name in ('elastic_transform', 'zoom_blur'):
        with pytest.raises(ValueError, match=f"{name}.*move pixels"):
            evaluate_robustness(make_segmentation_learner(seg_dls), corruptions=('fog', name), show_progress=False)


def test_evaluate_robustness_segmentation_baseline_mce(seg_dls):
    learn, other = make_segmentation_learner(seg_dls, seed=0), make_segmentation_learner(seg_dls, seed=1)
    kwargs = dict(corruptions=('shot_noise', 'pixelate'), severities=(3, 5), show_progress=False)
    compared = evaluate_robustness(learn, baseline=other, generator=seeded(2), **kwargs)
    base = evaluate_robustness(other, generator=seeded(2), **kwargs)
    own = evaluate_robustness(learn, generator=seeded(2), **kwargs)
    assert compared.baseline.table.equals(base.table)
    expected = np.mean([own.table.pixel_error[own.table.corruption == c].sum()
                        / base.table.pixel_error[base.table.corruption == c].sum() for c in kwargs['corruptions']])
    assert compared.mce == pytest.approx(expected)
    assert evaluate_robustness(learn, baseline=base, generator=seeded(2), **kwargs).mce == pytest.approx(expected)
    classification = RobustnessResult(own.table, 0.1, 0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match='baseline is a RobustnessResult.*segmentation'):
        evaluate_robustness(learn, baseline=classification, **kwargs)
    matplotlib.use('Agg')
    ax = plot_corruption_errors({'model': compared, 'baseline': base})
    assert ax.patches[0].get_height() == pytest.approx(100 * compared.clean_error)
    assert 'Pixel error (%)' in ax.get_title() and '%' in ax.get_ylabel()
    with pytest.raises(ValueError, match='mix'):
        plot_corruption_errors({'a': compared, 'b': classification})


def test_evaluate_robustness_segmentation_bad_model_output(seg_dls):
    learn = make_segmentation_learner(seg_dls)
    learn.model.body.append(nn.AvgPool2d(2))  # half-size scores
    with pytest.raises(ValueError, match=r'\[B, n_classes, H, W\] at the masks'):
        evaluate_robustness(learn, corruptions=('fog',), show_progress=False)


@pytest.mark.slow  # about 10 s: a resnet18 U-Net on the CPU
def test_evaluate_robustness_with_a_fastai_unet_learner():
    from fastai.vision.all import CrossEntropyLossFlat, resnet18, unet_learner
    dls = make_segmentation_dls(n_valid=4, n_train=8)  # unet_learner reads one training batch
    learn = unet_learner(dls, resnet18, pretrained=False, n_out=3, loss_func=CrossEntropyLossFlat(axis=1))
    result = evaluate_robustness(learn, corruptions=('snow', 'jpeg_compression'), severities=(3,),
                                 generator=seeded(), show_progress=False)
    assert isinstance(result, SegmentationRobustnessResult) and len(result.table) == 2
    assert 0 <= result.clean_error <= 1 and 0 <= result.clean_mean_iou <= 1


def test_evaluate_robustness_segmentation_with_uint8_masks_and_many_classes():
    """uint8 masks: target * n_classes must not wrap around at 256."""
    x = to_tensor(photo_crops(4, 24, 24, seed=7))
    masks = (x.mean(1) * 19.99).to(torch.uint8)  # labels 0..19
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 20, 3, padding=1)).eval()
    learn = types.SimpleNamespace(model=model, dls=None, loss_func=None)
    kwargs = dict(corruptions=('contrast',), severities=(2,), show_progress=False)
    small = evaluate_robustness(learn, dl=[(x, masks)], **kwargs)
    large = evaluate_robustness(learn, dl=[(x, masks.long())], **kwargs)
    assert small.table.equals(large.table) and small.clean_mean_iou == large.clean_mean_iou
    with torch.no_grad():
        predicted = model(x).argmax(1)
    assert small.clean_error == pytest.approx(float((predicted != masks.long()).float().mean()))


# ------------------------------------------------------------------------------ benchmarks and AlexNet mCE

# AlexNet's mean top-1 error over severities 1-5 per ImageNet-C corruption, as the ImageNet-C paper (Hendrycks &
# Dietterich, ICLR 2019) published them; google-research/augmix's imagenet.py carries them as ALEXNET_ERR.
PAPER_ALEXNET_ERRORS = dict(zip(
    CORRUPTIONS, [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572,
                  0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500]))


def test_alexnet_constants_are_the_papers():
    from fastai_jsd.robustness import ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS
    assert dict(ALEXNET_ERRORS) == PAPER_ALEXNET_ERRORS
    assert round(100 * ALEXNET_CLEAN_ERROR, 1) == 43.5  # the paper's AlexNet clean error


def hand_made_table(errors):
    """A classification table from {corruption: [error at severity 1..5]}."""
    import pandas as pd
    rows = [dict(corruption=name, severity=severity, error=error, rms_calibration_error=0.1)
            for name, values in errors.items() for severity, error in enumerate(values, 1)]
    return pd.DataFrame(rows)


def test_alexnet_mce_arithmetic_on_a_hand_made_table():
    from fastai_jsd.robustness import evaluate
    # AlexNet's own errors at every severity: mCE 100 %, relative mCE 100 % with AlexNet's clean error.
    alexnet = hand_made_table({name: [error] * 5 for name, error in PAPER_ALEXNET_ERRORS.items()})
    mce, relative = evaluate._alexnet_scores(alexnet, 1 - 0.56522)
    assert mce == pytest.approx(100) and relative == pytest.approx(100)
    # Two corruptions by hand: sum_s E / (5 x AlexNet's mean), and the degradation ratio.
    errors = {'gaussian_noise': [0.2, 0.3, 0.4, 0.5, 0.6], 'fog': [0.1, 0.1, 0.2, 0.2, 0.3]}
    table = hand_made_table(errors)
    mce, relative = evaluate._alexnet_scores(table, 0.05)
    noise_ce, fog_ce = 2.0 / (5 * 0.886428), 0.9 / (5 * 0.819324)
    assert mce == pytest.approx(100 * (noise_ce + fog_ce) / 2)
    noise_rel = (2.0 - 5 * 0.05) / (5 * 0.886428 - 5 * 0.43478)
    fog_rel = (0.9 - 5 * 0.05) / (5 * 0.819324 - 5 * 0.43478)
    assert relative == pytest.approx(100 * (noise_rel + fog_rel) / 2)
    # A corruption without all five severities, or an extra one, has no AlexNet number: left out.
    partial = hand_made_table({**errors, 'contrast': [0.5, 0.5, 0.5, 0.5], 'spatter': [0.9] * 5})
    assert evaluate._alexnet_scores(partial, 0.05) == pytest.approx((mce, relative))
    assert evaluate._alexnet_scores(hand_made_table({'spatter': [0.9] * 5}), 0.05) == (None, None)


def test_evaluate_robustness_uses_the_benchmark_and_reports_alexnet_mce(dls):
    learn = make_learner(dls)
    kwargs = dict(corruptions=('contrast', 'gaussian_noise'), show_progress=False)
    result = evaluate_robustness(learn, benchmark='imagenet-c', generator=seeded(5), **kwargs)
    assert result.benchmark == 'imagenet-c' and result.published_jpeg is True
    mce = np.mean([result.table.error[result.table.corruption == c].sum() / (5 * PAPER_ALEXNET_ERRORS[c])
                   for c in kwargs['corruptions']])
    assert result.alexnet_mce == pytest.approx(100 * mce)
    assert result.summary()['alexnet_mce'] == result.alexnet_mce and result.alexnet_relative_mce is not None
    assert "benchmark=ImageNet-C (published JPEG)" in repr(result) and 'alexnet_mce=' in repr(result)
    # the corruptions were ImageNet-C's (lengths scaled to 32 px) with the published JPEG save
    norm = dls.after_batch.fs[-1]
    mean, std = (torch.as_tensor(v).view(1, 3, 1, 1) for v in (norm.mean, norm.std))
    learn.model.eval()
    wrong = []
    with torch.no_grad():
        for xb, yb in dls.valid:
            pixels = (xb.as_subclass(torch.Tensor) * std + mean).clamp(0, 1)
            images = corrupt(pixels, 'contrast', 5, benchmark='imagenet-c')
            wrong.append(learn.model((images - mean) / std).argmax(-1) != yb.as_subclass(torch.Tensor))
    row = result.table[(result.table.corruption == 'contrast') & (result.table.severity == 5)]
    assert float(row.error.iloc[0]) == pytest.approx(float(torch.cat(wrong).float().mean()))
    # without the JPEG save: other images; by size (32 px): CIFAR-10-C, no AlexNet numbers
    plain = evaluate_robustness(learn, benchmark='imagenet-c', published_jpeg=False, generator=seeded(5), **kwargs)
    assert plain.published_jpeg is False and 'no JPEG save' in repr(plain)
    by_size = evaluate_robustness(learn, generator=seeded(5), severities=(1, 2, 3, 4, 5), **kwargs)
    assert by_size.benchmark == 'cifar10-c' and by_size.alexnet_mce is None and 'CIFAR-10-C' in repr(by_size)
    partial = evaluate_robustness(learn, benchmark='imagenet-c', severities=(1, 3), generator=seeded(5), **kwargs)
    assert partial.alexnet_mce is None  # AlexNet's numbers average all five severities


def test_evaluate_robustness_refuses_an_unknown_benchmark_before_any_work(dls):
    learn = make_learner(dls)
    with pytest.raises(ValueError, match="'cifar10-c', 'tiny-imagenet-c', 'imagenet-c'"):
        evaluate_robustness(learn, benchmark='cifar100-c', show_progress=False)
    with pytest.raises(ValueError, match='published_jpeg'):
        evaluate_robustness(learn, published_jpeg=None, show_progress=False)
    assert learn.model.modes == []  # the model never ran
    cifar = evaluate_robustness(learn, corruptions=('fog',), severities=(1,), show_progress=False)
    with pytest.raises(ValueError, match='baseline was evaluated on CIFAR-10-C'):
        evaluate_robustness(learn, baseline=cifar, benchmark='tiny-imagenet-c', corruptions=('fog',),
                            severities=(1,), show_progress=False)


def test_plot_names_the_benchmark(dls, seg_dls):
    matplotlib.use('Agg')
    learn = make_learner(dls)
    kwargs = dict(corruptions=('fog',), severities=(1,), show_progress=False)
    ax = plot_corruption_errors(evaluate_robustness(learn, benchmark='imagenet-c', **kwargs))
    assert 'ImageNet-C (published JPEG)' in ax.get_title()
    ax = plot_corruption_errors({'a': evaluate_robustness(learn, **kwargs),
                                 'b': evaluate_robustness(learn, benchmark='tiny-imagenet-c', **kwargs)})
    assert 'CIFAR-10-C' in ax.get_title() and 'Tiny-ImageNet-C' in ax.get_title()
    segmentation = evaluate_robustness(make_segmentation_learner(seg_dls), benchmark='tiny-imagenet-c', **kwargs)
    assert segmentation.benchmark == 'tiny-imagenet-c' and 'Tiny-ImageNet-C' in repr(segmentation)
