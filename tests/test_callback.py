"""AugMixCallback with real fastai Learners on small real images (crops of scikit-learn's photos)."""
import pickle

import fastai.vision.all  # noqa: F401  (registers the Learner methods users get: lr_find, tta, to_fp16, ...)

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.training import GradientAccumulation
from fastai.data.transforms import Normalize
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.metrics import accuracy
from fastai.vision.augment import Resize
from fastai.vision.core import PILImage, PILImageBW, imagenet_stats
from fastai.vision.data import ImageDataLoaders
from fastai.vision.learner import vision_learner
from fastai.vision.models import resnet18
from PIL import Image
from torch import nn

from _images import photo_crops, to_grayscale
from fastai_jsd import AugMixCallback, JsdCrossEntropy
from fastai_jsd.callback import LossPartsRecorder, split_batchnorm
from fastai_jsd.pixels import find_normalize

BS = 8


def _write_folder(root, channels):
    """An ImageNet-style folder (train/valid, one folder per class): crops of the two sklearn photos."""
    for split, count in (('train', 16), ('valid', 8)):
        for label in (0, 1):
            crops = photo_crops(count * 2, 40, 48, seed=1 + label + (split == 'valid'))[label::2]
            if channels == 1:
                crops = to_grayscale(crops)
            folder = root / split / ('china' if label == 0 else 'flower')
            folder.mkdir(parents=True, exist_ok=True)
            for i, crop in enumerate(crops):
                Image.fromarray(crop).save(folder / f'{i}.png')
    return root


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp('photos_rgb'), channels=3)


@pytest.fixture(scope='module')
def gray_folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp('photos_gray'), channels=1)


def make_dls(folder, img_cls=PILImage, normalize=True, size=32):
    batch_tfms = [Normalize.from_stats(*imagenet_stats, cuda=False)] if normalize else None
    if img_cls is PILImageBW and normalize:
        batch_tfms = [Normalize.from_stats([0.45], [0.25], cuda=False)]
    return ImageDataLoaders.from_folder(folder, train='train', valid='valid', item_tfms=Resize(size),
                                        batch_tfms=batch_tfms, bs=BS, img_cls=img_cls, num_workers=0,
                                        device=torch.device('cpu'), seed=0)


@pytest.fixture(scope='module')
def dls(photo_folder):
    return make_dls(photo_folder)


def make_learner(dls, loss_func=None, cbs=None, arch=resnet18, **kwargs):
    return vision_learner(dls, arch, pretrained=False, loss_func=loss_func or JsdCrossEntropy(),
                          cbs=cbs if cbs is not None else AugMixCallback(), metrics=accuracy, **kwargs)


class Probe(Callback):
    """Records what the model, the loss and the later callbacks see during training."""
    order = AugMixCallback.order + 1  # after AugMix's before_batch and after_loss

    def before_fit(self):
        self.model_rows, self.loss_rows, self.after_loss_rows, self.first_blocks = [], [], [], []
        self.steps = 0

    def before_batch(self):
        if self.training:
            self.model_rows.append(self.xb[0].shape[0])
            self.first_blocks.append(self.xb[0].clone())

    def after_loss(self):
        if self.training:
            self.after_loss_rows.append((self.pred.shape[0], self.xb[0].shape[0], self.yb[0].shape[0]))

    def after_step(self):
        self.steps += 1


class RowsLoss:
    """A plain (non-split) loss that records how many prediction and target rows it gets."""
    y_int = True

    def __init__(self):
        self.rows, self.reduction = [], 'mean'
        self.inner = CrossEntropyLossFlat()

    def __call__(self, pred, target):
        self.rows.append((pred.shape[0], target.shape[0]))
        self.inner.reduction = self.reduction
        return self.inner(pred, target)

    def activation(self, x): return self.inner.activation(x)
    def decodes(self, x): return self.inner.decodes(x)


def test_reachable_and_ordered(dls):
    from fastai.callback.fp16 import MixedPrecision
    learn = make_learner(dls)
    assert isinstance(learn.aug_mix, AugMixCallback)
    assert MixUp.order < AugMixCallback.order < GradientAccumulation.order < MixedPrecision.order
    assert AugMixCallback.run_valid is False
    assert any(isinstance(cb, LossPartsRecorder) for cb in learn.cbs)
    learn.remove_cb(learn.aug_mix)
    assert not any(isinstance(cb, LossPartsRecorder) for cb in learn.cbs)


def test_stacks_clean_first_and_restores_clean_rows(dls):
    probe = Probe()
    learn = make_learner(dls, cbs=[AugMixCallback(), probe])
    clean_batches = []

    class Clean(Callback):
        order = AugMixCallback.order - 1
        def before_batch(self):
            if self.training: clean_batches.append(self.xb[0].clone())

    learn.fit(1, 1e-3, cbs=Clean())
    assert set(probe.model_rows) == {3 * BS}
    assert set(probe.after_loss_rows) == {(BS, BS, BS)}
    for clean, stacked in zip(clean_batches, probe.first_blocks):
        torch.testing.assert_close(stacked[:BS], clean)
        assert not torch.allclose(stacked[BS:2 * BS], clean)
        assert not torch.allclose(stacked[BS:2 * BS], stacked[2 * BS:])


def test_augmented_views_are_real_augmix_views_in_pixel_space(dls):
    learn = make_learner(dls)
    cb = learn.aug_mix
    cb.read_normalize(dls.train)
    images = dls.train.one_batch()[0]
    views = cb.augmented_views(images, 2)
    pixels = cb.decode(views)
    assert views.shape == (2 * BS, 3, 32, 32)
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    clean = cb.decode(images)
    assert (pixels[:BS] - clean).abs().mean() > 1e-3


@pytest.mark.parametrize('num_splits', [1, 2, 3, 4])
def test_num_splits(dls, num_splits):
    probe = Probe()
    loss = JsdCrossEntropy(num_splits=num_splits)
    learn = make_learner(dls, loss_func=loss, cbs=[AugMixCallback(num_splits=num_splits), probe])
    learn.fit(1, 1e-3)
    assert set(probe.model_rows) == {num_splits * BS}
    assert set(probe.after_loss_rows) == {(BS, BS, BS)}
    assert np.isfinite(learn.recorder.values[-1]).all()


def test_plain_loss_gets_repeated_targets(dls):
    loss = RowsLoss()
    probe = Probe()
    learn = make_learner(dls, loss_func=loss, cbs=[AugMixCallback(), probe])
    learn.fit(1, 1e-3)
    train_rows = [r for r in loss.rows if r[0] == 3 * BS]
    assert train_rows and all(t == 3 * BS for _, t in train_rows)
    assert set(probe.after_loss_rows) == {(BS, BS, BS)}


def test_contradicting_num_splits_is_reported_at_before_fit(dls):
    learn = make_learner(dls, loss_func=JsdCrossEntropy(num_splits=2), cbs=AugMixCallback(num_splits=3))
    with pytest.raises(ValueError, match=r'num_splits=2.*num_splits=3'):
        learn.fit(1, 1e-3)
    assert learn.loss_func.num_splits == 2


def test_any_split_count_loss_accepts_the_callback(dls):
    learn = make_learner(dls, loss_func=JsdCrossEntropy(num_splits=None), cbs=AugMixCallback(num_splits=4))
    learn.fit(1, 1e-3)


def test_training_table_shows_loss_parts(dls):
    learn = make_learner(dls)
    learn.fit(2, 1e-3)
    names = list(learn.recorder.metric_names)
    assert names[:4] == ['epoch', 'train_loss', 'train_ce', 'train_jsd']
    assert 'valid_loss' in names and 'accuracy' in names
    for row in learn.recorder.values:
        assert len(row) == len(names) - 2  # no epoch, no time
        ce_part, jsd_part = row[1], row[2]
        assert ce_part > 0 and jsd_part >= 0
    # validation is plain cross-entropy: the loss parts do not leak into it
    assert learn.loss_func.last_consistency == 0


def test_loss_parts_sum_to_the_epoch_mean_loss_and_train_loss_is_the_smoothed_one(dls):
    """What the README and LossPartsRecorder say the columns are, checked against the losses of the batches."""
    class BatchLosses(Callback):
        order = AugMixCallback.order + 1
        def before_fit(self): self.losses, self.sizes = [], []
        def after_loss(self):
            if self.training:
                self.losses.append(self.learn.loss.item())
                self.sizes.append(self.yb[0].shape[0])
    record = BatchLosses()
    learn = tiny_learner(dls, cbs=[AugMixCallback(), record])
    quiet_fit(learn, 1, 1e-2)
    train_loss, train_ce, train_jsd = learn.recorder.values[-1][:3]
    epoch_mean = np.average(record.losses, weights=record.sizes)
    assert train_ce + train_jsd == pytest.approx(epoch_mean, rel=1e-5)
    # fastai's smoothed loss: beta 0.98, debiased, over this epoch's batches
    smoothed = 0.
    for loss in record.losses:
        smoothed = 0.98 * smoothed + 0.02 * loss
    assert train_loss == pytest.approx(smoothed / (1 - 0.98 ** len(record.losses)), rel=1e-5)
    assert abs(train_loss - epoch_mean) > 1e-6


def test_train_metrics_stay_aligned(dls):
    from fastai.learner import Recorder
    learn = make_learner(dls)
    learn.fit(1, 1e-3, cbs=None)
    learn.recorder.train_metrics = True
    learn.fit(1, 1e-3)
    names = list(learn.recorder.metric_names)
    assert names[1:4] == ['train_loss', 'train_ce', 'train_jsd']
    assert 'train_accuracy' in names and len(learn.recorder.values[-1]) == len(names) - 2
    assert Recorder.order < LossPartsRecorder.order


def test_non_image_batches_fail_at_the_first_batch():
    from fastai.data.core import DataLoaders
    from torch.utils.data import TensorDataset
    from fastai.data.load import DataLoader
    x, y = torch.randn(32, 10), torch.randint(0, 2, (32,))
    data = DataLoaders(DataLoader(TensorDataset(x, y), bs=8), DataLoader(TensorDataset(x, y), bs=8))
    learn = Learner(data, nn.Linear(10, 2), loss_func=JsdCrossEntropy(), cbs=AugMixCallback())
    with pytest.raises(ValueError, match=r'AugMixCallback needs image batches.*\(8, 10\)'):
        learn.fit(1, 1e-3)


def test_bad_arguments():
    with pytest.raises(ValueError, match='num_splits'):
        AugMixCallback(num_splits=0)
    with pytest.raises(ValueError, match='severity'):
        AugMixCallback(severity=0)
    with pytest.raises(ValueError, match='alpha'):
        AugMixCallback(alpha=0)
    with pytest.raises(ValueError, match='width'):
        AugMixCallback(width=0)
    with pytest.raises(ValueError, match='depth'):
        AugMixCallback(depth=0)
    with pytest.raises(TypeError, match='augment'):
        AugMixCallback(augment='randaugment')


def _state(learn):
    return ({k: v.clone() for k, v in learn.model.state_dict().items()},
            list(learn.dls.train.after_batch.fs), list(learn.dls.valid.after_batch.fs), learn.dls.train.bs)


def test_nothing_changes_permanently_after_fit_cancel_and_crash(dls):
    loss = JsdCrossEntropy()
    learn = make_learner(dls, loss_func=loss)
    model, data = learn.model, learn.dls
    _, train_tfms, valid_tfms, bs = _state(learn)

    def check():
        assert learn.loss_func is loss and learn.model is model and learn.dls is data
        assert list(data.train.after_batch.fs) == train_tfms and list(data.valid.after_batch.fs) == valid_tfms
        assert data.train.bs == bs and loss.reduction == 'mean' and loss.num_splits == 3

    learn.fit(1, 1e-3)
    check()

    class CancelAtSecondBatch(Callback):
        order = AugMixCallback.order + 1
        def before_batch(self):
            if self.training and self.iter == 1: raise CancelFitException()
    learn.fit(1, 1e-3, cbs=CancelAtSecondBatch())
    check()

    calls = []
    def crash(module, inputs):
        calls.append(1)
        if len(calls) == 2: raise RuntimeError('boom')
    handle = learn.model.register_forward_pre_hook(crash)
    with pytest.raises(RuntimeError, match='boom'):
        learn.fit(1, 1e-3)
    handle.remove()
    check()
    learn.fit(1, 1e-3)  # and it still trains afterwards
    check()


def test_validation_and_inference_ignore_the_plugin(dls):
    learn = make_learner(dls)
    learn.model.eval()
    plain = make_learner(dls, loss_func=JsdCrossEntropy(), cbs=[])
    plain.model.load_state_dict(learn.model.state_dict())
    preds, targs, losses = learn.get_preds(with_loss=True)
    preds_plain, _, losses_plain = plain.get_preds(with_loss=True)
    assert preds.shape == (len(dls.valid_ds), 2) and losses.shape == (len(dls.valid_ds),)
    torch.testing.assert_close(preds, preds_plain)
    torch.testing.assert_close(losses, losses_plain)


def test_show_draws_clean_and_views(dls):
    import matplotlib
    matplotlib.use('Agg')
    learn = make_learner(dls)
    fig = learn.aug_mix.show(n=4)
    assert len(fig.axes) == 4 * 3
    assert [ax.get_title() for ax in fig.axes[:3]] == ['clean', 'aug1', 'aug2']
    with pytest.raises(ValueError, match='n must be'):
        learn.aug_mix.show(n=0)


def test_show_labels_each_row_with_its_class(dls, photo_folder):
    import matplotlib
    matplotlib.use('Agg')
    learn = make_learner(dls)
    fig = learn.aug_mix.show(n=4, dl=dls.valid)  # not shuffled: the first four validation targets
    targets = dls.valid.one_batch()[1][:4]
    assert [fig.axes[3 * row].get_ylabel() for row in range(4)] == [dls.vocab[int(t)] for t in targets]
    assert all(ax.get_ylabel() == '' for i, ax in enumerate(fig.axes) if i % 3)
    assert 'AugMix' in fig._suptitle.get_text()
    unlabelled = learn.aug_mix.show(n=2, labels=False)
    assert all(ax.get_ylabel() == '' for ax in unlabelled.axes)
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from torch.utils.data import TensorDataset
    regression = DataLoaders(*[DataLoader(TensorDataset(torch.rand(16, 3, 8, 8), torch.rand(16)), bs=8)] * 2)
    cb = AugMixCallback()
    cb.learn = None
    assert all(ax.get_ylabel() == '' for ax in cb.show(n=2, dl=regression.train).axes)
    with pytest.raises(ValueError, match='labels=True'):
        cb.show(n=2, dl=regression.train, labels=True)
    with pytest.raises(TypeError, match='labels'):
        cb.show(n=2, labels='yes')


def test_fill_none_is_the_dataset_mean(dls):
    cb = AugMixCallback()
    cb.read_normalize(dls.train)
    fill = cb.fill_value(torch.zeros(1, 3, 4, 4))
    torch.testing.assert_close(fill, torch.tensor(imagenet_stats[0]))
    assert AugMixCallback(fill=0.5).fill_value(torch.zeros(1, 3, 4, 4)) == 0.5
    cb.read_normalize(None)  # DataLoaders without Normalize
    assert cb.fill_value(torch.zeros(1, 3, 4, 4)) == 0.


def test_custom_augment_replaces_augmix(dls):
    def flip(pixels):
        return pixels.flip(-1)
    probe = Probe()
    clean = []

    class Clean(Callback):
        order = AugMixCallback.order - 1
        def before_batch(self):
            if self.training: clean.append(self.xb[0].clone())
    learn = make_learner(dls, cbs=[AugMixCallback(augment=flip), probe, Clean()])
    learn.fit(1, 1e-3)
    stacked = probe.first_blocks[0]
    torch.testing.assert_close(stacked[BS:2 * BS], clean[0].flip(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stacked[2 * BS:], clean[0].flip(-1), atol=1e-5, rtol=1e-5)
    bad = make_learner(dls, cbs=AugMixCallback(augment=lambda p: p[:, :1]))
    with pytest.raises(ValueError, match='augment must return'):
        bad.fit(1, 1e-3)


def tiny_learner(dls, cbs=None, loss_func=None, **kwargs):
    """A Learner with a four-filter CNN: fits in a fraction of a second, exports in a few KB."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return Learner(dls, model, loss_func=loss_func or JsdCrossEntropy(), metrics=accuracy,
                   cbs=cbs if cbs is not None else AugMixCallback(), **kwargs)


def quiet_fit(learn, *args, **kwargs):
    with learn.no_bar(), learn.no_logging():
        learn.fit(*args, **kwargs)


def test_custom_augment_output_that_the_caller_keeps_is_never_modified(dls):
    kept = {}

    def constant_grey(pixels):  # returns the same tensor every batch, as a cache or a constant would
        return kept.setdefault(pixels.shape, torch.full_like(pixels, 0.5))
    probe = Probe()
    learn = tiny_learner(dls, cbs=[AugMixCallback(augment=constant_grey), probe])
    quiet_fit(learn, 1, 1e-3)
    assert kept and all(torch.all(image == 0.5) for image in kept.values())
    # ... and the model still got the grey views normalized like the clean images
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in imagenet_stats)
    torch.testing.assert_close(probe.first_blocks[0][BS:], ((0.5 - mean) / std).expand(2 * BS, 3, 32, 32))


@pytest.mark.parametrize('make_view', [
    lambda pixels: pixels.flip(-1).double(),                     # float64
    lambda pixels: pixels.flip(-1).half(),                       # float16
    lambda pixels: pixels.flip(-1).clone().requires_grad_(),     # a tensor that requires grad
    lambda pixels: nn.Parameter(pixels.flip(-1).clone()),        # a parameter the augment keeps
], ids=['float64', 'float16', 'requires_grad', 'parameter'])
def test_custom_augment_output_dtype_and_grad_are_made_the_batchs(dls, make_view):
    probe = Probe()
    clean = []

    class Clean(Callback):
        order = AugMixCallback.order - 1
        def before_batch(self):
            if self.training: clean.append(self.xb[0].clone())
    learn = tiny_learner(dls, cbs=[AugMixCallback(augment=make_view), probe, Clean()])
    quiet_fit(learn, 1, 1e-3)
    stacked = probe.first_blocks[0]
    assert stacked.dtype == torch.float32 and not stacked.requires_grad
    torch.testing.assert_close(stacked[BS:2 * BS], clean[0].flip(-1), atol=1e-2, rtol=0)


@pytest.mark.parametrize('make_view, error, words', [
    (lambda pixels: torch.empty_like(pixels, device='meta'), ValueError, ['device', 'meta', 'cpu']),
    (lambda pixels: (pixels * 255).to(torch.uint8), TypeError, ['uint8', '/ 255']),
], ids=['other_device', 'uint8'])
def test_custom_augment_output_on_another_device_or_integer_is_refused(dls, make_view, error, words):
    learn = tiny_learner(dls, cbs=AugMixCallback(augment=make_view))
    with pytest.raises(error) as info:
        quiet_fit(learn, 1, 1e-3)
    for word in words:
        assert word in str(info.value)


def _tensors_in(state):
    """The names of the entries of a pickled state that hold tensors (directly or in a tuple)."""
    return [name for name, value in state.items()
            if isinstance(value, torch.Tensor) or (isinstance(value, tuple) and any(isinstance(v, torch.Tensor)
                                                                                    for v in value))]


@pytest.mark.parametrize('fault', [CancelFitException, RuntimeError, KeyboardInterrupt])
def test_a_fit_ended_before_after_loss_exports_no_batch(dls, tmp_path, fault):
    class Fault(Callback):
        def after_pred(self):
            if self.training: raise fault('injected fault')
    fresh = tiny_learner(dls, path=tmp_path)
    fresh.export('fresh.pkl')
    learn = tiny_learner(dls, path=tmp_path)
    if fault is CancelFitException:
        quiet_fit(learn, 1, 1e-3, cbs=Fault())
        assert learn.aug_mix.clean_xb is None and learn.aug_mix.clean_yb is None
    else:
        with pytest.raises(fault):
            quiet_fit(learn, 1, 1e-3, cbs=Fault())
    assert _tensors_in(learn.aug_mix.__getstate__()) == []
    assert _tensors_in(learn.loss_parts_recorder.__getstate__()) == []
    learn.export('ended.pkl')
    batch_bytes = BS * 3 * 32 * 32 * 4
    # A few hundred bytes of fastai's own bookkeeping (epoch, iter, recorder) differ; a batch would be 100 KB.
    assert (tmp_path / 'ended.pkl').stat().st_size - (tmp_path / 'fresh.pkl').stat().st_size < batch_bytes / 20
    loaded = load_learner(tmp_path / 'ended.pkl')
    assert getattr(loaded.aug_mix, 'clean_xb', None) is None and getattr(loaded.aug_mix, 'clean_yb', None) is None
    quiet_fit(learn, 1, 1e-3)  # and the callback trains normally again
    assert np.isfinite(learn.recorder.values[-1]).all()


def test_one_callback_shared_by_two_learners_trains_each_learner_it_fits(dls):
    shared = AugMixCallback()
    probes = [Probe(), Probe()]
    first = tiny_learner(dls, cbs=[shared, probes[0]])
    second = tiny_learner(dls, cbs=[shared, probes[1]])  # both built before either fits
    for learn, probe in ((first, probes[0]), (second, probes[1]), (first, probes[0])):
        quiet_fit(learn, 1, 1e-3)
        assert shared.learn is learn
        assert set(probe.model_rows) == {3 * BS} and set(probe.after_loss_rows) == {(BS, BS, BS)}
        names = list(learn.recorder.metric_names)
        assert names[1:4] == ['train_loss', 'train_ce', 'train_jsd']
        assert len(learn.recorder.values[-1]) == len(names) - 2
    assert list(second.recorder.metric_names)[1:4] == ['train_loss', 'train_ce', 'train_jsd']
    first.remove_cb(shared)
    quiet_fit(first, 1, 1e-3)  # no AugMix any more: plain rows, no loss-parts columns
    assert set(probes[0].model_rows) == {BS} and 'train_ce' not in first.recorder.metric_names
    assert not any(isinstance(cb, LossPartsRecorder) for cb in first.cbs)
    quiet_fit(second, 1, 1e-3)  # the other Learner keeps it
    assert set(probes[1].model_rows) == {3 * BS} and 'train_ce' in second.recorder.metric_names


def test_fit_cbs_adds_and_removes_the_callback_with_its_companions(dls):
    learn = tiny_learner(dls, cbs=[])
    kinds = sorted(type(cb).__name__ for cb in learn.cbs)
    probe = Probe()
    learn.add_cb(probe)
    quiet_fit(learn, 1, 1e-3, cbs=AugMixCallback())
    assert set(probe.model_rows) == {3 * BS}
    learn.remove_cb(probe)
    assert sorted(type(cb).__name__ for cb in learn.cbs) == kinds


def test_two_augmix_callbacks_on_one_learner_are_refused(dls):
    learn = tiny_learner(dls, cbs=[AugMixCallback(), AugMixCallback(num_splits=2)])
    with pytest.raises(ValueError, match=r'2 AugMixCallbacks.*remove'):
        quiet_fit(learn, 1, 1e-3)
    learn = tiny_learner(dls)
    with pytest.raises(ValueError, match='AugMixCallbacks'):
        quiet_fit(learn, 1, 1e-3, cbs=AugMixCallback())


def test_without_normalize_the_batch_is_already_pixels(photo_folder):
    data = make_dls(photo_folder, normalize=False)
    learn = make_learner(data)
    assert find_normalize(data.train) is None
    learn.fit(1, 1e-3)


def test_one_channel_images(gray_folder):
    data = make_dls(gray_folder, img_cls=PILImageBW)
    assert data.one_batch()[0].shape[1] == 1
    probe = Probe()
    learn = make_learner(data, cbs=[AugMixCallback(), probe], n_in=1)
    learn.fit(1, 1e-3)
    assert set(probe.model_rows) == {3 * BS}


@pytest.mark.parametrize('mix', [MixUp, CutMix])
@pytest.mark.parametrize('loss_kind', ['jsd', 'plain'])
def test_mixup_and_cutmix(dls, mix, loss_kind):
    loss = JsdCrossEntropy() if loss_kind == 'jsd' else CrossEntropyLossFlat()
    probe = Probe()
    learn = make_learner(dls, loss_func=loss, cbs=[mix(), AugMixCallback(), probe])
    learn.fit(1, 1e-3)
    assert learn.loss_func is loss
    assert set(probe.model_rows) == {3 * BS}
    assert np.isfinite(learn.recorder.values[-1]).all()


def test_gradient_accumulation_counts_clean_images(dls):
    probe = Probe()
    learn = make_learner(dls, cbs=[AugMixCallback(), probe, GradientAccumulation(n_acc=2 * BS)])
    learn.fit(1, 1e-3)
    n_batches = len(dls.train)
    assert probe.steps == n_batches // 2


def test_split_batchnorm_trains_aux_layers_and_infers_with_main(dls):
    from timm.layers import SplitBatchNorm2d
    learn = make_learner(dls)
    split_batchnorm(learn, 3)
    split_layers = [m for m in learn.model.modules() if isinstance(m, SplitBatchNorm2d)]
    assert split_layers and all(len(m.aux_bn) == 2 for m in split_layers)
    aux_before = split_layers[0].aux_bn[0].weight.detach().clone()
    learn.fit(1, 1e-2)
    opt_params = {id(p) for group in learn.opt.param_groups for p in group['params']}
    assert id(split_layers[0].aux_bn[0].weight) in opt_params
    assert not torch.equal(aux_before, split_layers[0].aux_bn[0].weight.detach())
    # inference uses the main BN only: changing the auxiliary layers changes nothing in eval mode
    xb = dls.valid.one_batch()[0]
    learn.model.eval()
    with torch.no_grad():
        before = learn.model(xb)
        for m in split_layers:
            for aux in m.aux_bn:
                aux.weight.add_(1.)
        after = learn.model(xb)
    torch.testing.assert_close(before, after)
    learn.remove_cb(learn.aug_mix)
    learn.add_cb(AugMixCallback(num_splits=2))
    learn.loss_func = JsdCrossEntropy(num_splits=None)
    with pytest.raises(ValueError, match=r'split BatchNorm for num_splits=\[3\].*num_splits=2'):
        learn.fit(1, 1e-3)
    with pytest.raises(ValueError, match='num_splits >= 2'):
        split_batchnorm(learn, 1)


@pytest.mark.slow
def test_fastai_features_keep_working(dls, tmp_path):
    import matplotlib
    matplotlib.use('Agg')
    learn = make_learner(dls, path=tmp_path)
    learn.lr_find(num_it=8, show_plot=False)
    learn.fit_one_cycle(1, 1e-3)
    learn.fine_tune(1, 1e-3, freeze_epochs=1)
    preds, targs, losses = learn.get_preds(with_loss=True)
    assert losses.shape == (len(dls.valid_ds),)
    item = dls.valid_ds.items[0]
    label, label_idx, probs = learn.predict(item)
    assert probs.shape == (2,) and str(label) in dls.vocab
    learn.show_results(max_n=2)
    interp = ClassificationInterpretation.from_learner(learn)
    interp.plot_top_losses(2)
    tta_preds, _ = learn.tta(n=1)
    assert tta_preds.shape == preds.shape
    learn.export(tmp_path / 'export.pkl')
    loaded = load_learner(tmp_path / 'export.pkl')
    assert isinstance(loaded.loss_func, JsdCrossEntropy)
    _, _, probs_loaded = loaded.predict(item)
    torch.testing.assert_close(probs_loaded, probs)
    pickle.dumps(learn.aug_mix)


@pytest.mark.slow
@pytest.mark.parametrize('precision', ['fp16', 'bf16'])
def test_mixed_precision(dls, precision):
    learn = make_learner(dls)
    learn = learn.to_fp16() if precision == 'fp16' else learn.to_bf16()
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()


@pytest.mark.slow
def test_timm_architecture_by_name(dls):
    learn = vision_learner(dls, 'resnet18', pretrained=False, loss_func=JsdCrossEntropy(),
                           cbs=AugMixCallback(), metrics=accuracy)
    learn.fit_one_cycle(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()
