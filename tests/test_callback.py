"""AugMixCallback with real fastai Learners on small real images (crops of scikit-learn's photos)."""
import pickle
import re
import warnings

import fastai.vision.all  # noqa: F401  (registers the Learner methods users get: lr_find, tta, to_fp16, ...)

import numpy as np
import pytest
import torch
import torch.nn.functional as F
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
    consumes_splits = False  # says that it means to train on every split (else AugMixCallback warns)

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
    # at the end of the row (issue 19, item 6): fastai's own columns keep their places
    assert names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'train_ce', 'train_jsd', 'time']
    for row in learn.recorder.values:
        assert len(row) == len(names) - 2  # no epoch, no time
        ce_part, jsd_part = row[3], row[4]
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
    (train_loss, *_), (train_ce, train_jsd) = learn.recorder.values[-1], learn.recorder.values[-1][-2:]
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
    assert names == ['epoch', 'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy', 'train_ce', 'train_jsd',
                     'time']
    assert len(learn.recorder.values[-1]) == len(names) - 2
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


@pytest.mark.filterwarnings('ignore:JsdCrossEntropy.*one split:UserWarning')  # a Learner trains without it
def test_one_callback_belongs_to_one_learner(dls):
    """Adding an AugMixCallback that another live Learner holds is refused at once (issue 19: shared, it leaked one
    Learner into the other's export); after remove_cb it may go elsewhere, and fit(cbs=...) lends it for one fit."""
    shared = AugMixCallback()
    probes = [Probe(), Probe()]
    first = tiny_learner(dls, cbs=[shared, probes[0]])
    with pytest.raises(ValueError, match=r'give each Learner its own AugMixCallback\(\)'):
        tiny_learner(dls, cbs=[shared, probes[1]])
    second = tiny_learner(dls, cbs=[probes[1]])
    kinds = sorted(type(cb).__name__ for cb in second.cbs)
    for add in (lambda: second.add_cb(shared), lambda: quiet_fit(second, 1, 1e-3, cbs=shared)):
        with pytest.raises(ValueError, match='give each Learner its own'):
            add()
        assert shared.learn is first and first.aug_mix is shared
        assert sorted(type(cb).__name__ for cb in second.cbs) == kinds  # nothing half-added
    quiet_fit(first, 1, 1e-3)  # the owner trains as before
    assert set(probes[0].model_rows) == {3 * BS} and list(first.recorder.metric_names)[-3:-1] == ['train_ce',
                                                                                                   'train_jsd']
    first.remove_cb(shared)
    assert shared.learn is None and not any(isinstance(cb, LossPartsRecorder) for cb in first.cbs)
    second.add_cb(shared)  # removed, it can move
    for learn, probe, rows in ((second, probes[1], 3 * BS), (first, probes[0], BS)):
        quiet_fit(learn, 1, 1e-3)
        assert set(probe.model_rows) == {rows}
        assert ('train_ce' in learn.recorder.metric_names) == (rows == 3 * BS)
    second.remove_cb(shared)
    for learn in (first, second):  # lent for one fit at a time, to either
        quiet_fit(learn, 1, 1e-3, cbs=shared)
        assert shared.learn is None and 'train_ce' in learn.recorder.metric_names
        assert not any(isinstance(cb, (AugMixCallback, LossPartsRecorder)) for cb in learn.cbs)


def test_a_refused_learner_is_neither_exported_nor_kept_alive_by_the_owners_callback(dls, tmp_path):
    """What sharing did (issue 19, item 1): the owner's export carried the other Learner, whose model stayed alive."""
    import gc
    import weakref
    cb = AugMixCallback()
    owner = tiny_learner(dls, cbs=[cb], path=tmp_path)
    big_model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 64, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(64, 2))  # 150 KB of weights
    with pytest.raises(ValueError, match='give each Learner its own'):
        Learner(dls, big_model, loss_func=JsdCrossEntropy(), cbs=cb)
    big_model = weakref.ref(big_model)
    gc.collect()
    assert big_model() is None and cb.learn is owner
    owner.export('owner.pkl')
    tiny_learner(dls, path=tmp_path).export('fresh.pkl')
    assert abs((tmp_path / 'owner.pkl').stat().st_size - (tmp_path / 'fresh.pkl').stat().st_size) < 10_000


def test_a_learner_exported_with_0_2_0s_follower_still_loads_and_trains(dls, tmp_path):
    """fastai_jsd 0.2.0 gave every Learner a FollowFittingLearner(augmix_cb); the name is kept for load_learner."""
    from fastai_jsd.callback import FollowFittingLearner
    learn = tiny_learner(dls, path=tmp_path)
    old = FollowFittingLearner.__new__(FollowFittingLearner)
    old.__dict__['augmix_cb'] = learn.aug_mix  # its 0.2.0 state
    learn.add_cb(old)
    learn.export('old.pkl')
    loaded = load_learner(tmp_path / 'old.pkl')
    loaded.dls = dls  # export keeps no data
    probe = Probe()
    quiet_fit(loaded, 1, 1e-3, cbs=probe)
    assert set(probe.model_rows) == {3 * BS}


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
    loss.consumes_splits = loss_kind == 'jsd'  # a plain loss trained on every split on purpose
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


# ----- issue 19: the results table, MixUp's loss parts, custom augment values, RandomErasing, tuple outputs -----

def test_loss_parts_keep_fastais_columns_for_its_plots_trackers_and_printed_table(dls, tmp_path, capsys, monkeypatch):
    """ShowGraphCallback plots column 1 of recorder.values as the validation loss, SaveModelCallback finds its
    column by name, ProgressCallback prints names and rows side by side: all must keep meaning what they mean."""
    from fastai.callback.progress import CSVLogger, ShowGraphCallback
    from fastai.callback.tracker import SaveModelCallback
    from fastprogress.fastprogress import ConsoleMasterBar
    drawn = []
    monkeypatch.setattr(ConsoleMasterBar, 'update_graph',
                        lambda self, graphs, x_bounds=None, y_bounds=None: drawn.append(graphs))
    learn = tiny_learner(dls, path=tmp_path)
    # at_end: they track the best epoch by their column but do not load it back, so validate() sees the last model
    by_accuracy = SaveModelCallback(monitor='accuracy', fname='acc', at_end=True)
    by_jsd = SaveModelCallback(monitor='train_jsd', comp=np.less, fname='jsd', at_end=True)
    capsys.readouterr()
    learn.fit(3, 1e-2, cbs=[ShowGraphCallback(), CSVLogger(), by_accuracy, by_jsd])
    printed = capsys.readouterr().out.splitlines()
    names = list(learn.recorder.metric_names)
    assert names == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'train_ce', 'train_jsd', 'time']
    column = {name: i for i, name in enumerate(names[1:-1])}
    values = np.array(learn.recorder.values)
    # ShowGraphCallback's validation curve is the validation loss: the last point is what validate() gives now
    plotted_valid = drawn[-1][1][1]
    assert plotted_valid == list(values[:, column['valid_loss']])
    with learn.no_bar(), learn.no_logging():
        assert plotted_valid[-1] == pytest.approx(learn.validate()[0], rel=1e-5)
    assert learn.final_record == learn.recorder.values[-1]
    assert by_accuracy.best == values[:, column['accuracy']].max()
    assert by_jsd.best == values[:, column['train_jsd']].min()
    header = next(line for line in printed if line.startswith('epoch'))
    rows = [line for line in printed if line[:1].isdigit()]
    assert header.split() == names and len(rows) == 3
    assert all(len(row.split()) == len(names) for row in rows)
    logged = learn.csv_logger.read_log() if hasattr(learn, 'csv_logger') else None
    csv = (tmp_path / 'history.csv').read_text().splitlines()
    assert csv[0].split(',') == names and all(len(line.split(',')) == len(names) for line in csv[1:])
    assert logged is None or list(logged.columns) == names


@pytest.mark.parametrize('mix', [MixUp, CutMix])
def test_under_mixup_the_loss_parts_add_up_to_the_loss_trained_on(dls, mix):
    """MixUp/CutMix lerp two losses image by image; train_ce is that lerp of the two cross-entropies (issue 19,
    item 7: it was the cross-entropy of one target set, so the parts did not add up to the loss)."""
    class Reference(Callback):
        order = AugMixCallback.order - 1  # after MixUp's before_batch, before AugMix puts the clean rows back
        run_valid = False
        def before_fit(self): self.losses, self.cross_entropies, self.sizes = [], [], []
        def after_loss(self):
            handler = next(cb for cb in self.learn.cbs if isinstance(cb, mix))
            clean = self.pred[:BS].float()
            per_image = [F.cross_entropy(clean, y, label_smoothing=0.1, reduction='none')
                         for y in (handler.yb1[0], self.yb[0])]
            self.cross_entropies.append(torch.lerp(*per_image, handler.lam).mean().item())
            self.losses.append(self.learn.loss.item())
            self.sizes.append(self.yb[0].shape[0])
    reference = Reference()
    learn = tiny_learner(dls, cbs=[mix(), AugMixCallback(), reference])
    quiet_fit(learn, 1, 1e-2)
    train_ce, train_jsd = learn.recorder.values[-1][-2:]
    assert train_ce + train_jsd == pytest.approx(np.average(reference.losses, weights=reference.sizes), rel=1e-5)
    assert train_ce == pytest.approx(np.average(reference.cross_entropies, weights=reference.sizes), rel=1e-5)
    assert train_jsd > 0


@pytest.mark.parametrize('make_view, words', [
    (lambda pixels: pixels.flip(-1) * 255, ['values in [', '255']),
    (lambda pixels: pixels.flip(-1) / pixels.flip(-1).sub(pixels.flip(-1)), ['NaN']),
    (lambda pixels: pixels.flip(-1) * 2 - 0.5, ['values in [-0.5', 'clamp']),
], ids=['0..255', 'nan', 'overshoot'])
def test_custom_augment_values_outside_0_1_are_refused_like_uint8(dls, make_view, words):
    learn = tiny_learner(dls, cbs=AugMixCallback(augment=make_view))
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match='augment must return pixels in') as info:
        quiet_fit(learn, 1, 1e-3)
    for word in words:
        assert word in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))  # refused before a step


def test_custom_augment_values_are_read_every_batch_on_the_cpu_and_once_a_fit_elsewhere():
    cb = AugMixCallback(augment=lambda pixels: pixels)
    cb._values_checked = False  # as before_fit leaves it
    assert [cb._read_values(torch.device('cpu')) for _ in range(3)] == [True] * 3
    cb._values_checked = False
    assert [cb._read_values(torch.device('meta')) for _ in range(3)] == [True, False, False]


def test_fastais_random_erasing_trains_with_views_of_the_erased_images(photo_folder):
    """RandomErasing writes N(0, 1) noise after Normalize: decoded, some pixels leave [0, 1] and AugMix refused
    the batch (issue 19, item 10). The views start from the erased images clipped to [0, 1]; the clean block
    is fastai's erased batch, untouched."""
    from fastai.vision.augment import RandomErasing
    data = ImageDataLoaders.from_folder(photo_folder, train='train', valid='valid', item_tfms=Resize(32), bs=BS,
                                        batch_tfms=[Normalize.from_stats(*imagenet_stats, cuda=False),
                                                    RandomErasing(p=1., sh=0.5)],
                                        num_workers=0, device=torch.device('cpu'), seed=0)
    erased = []

    class Erased(Callback):
        order = AugMixCallback.order - 1
        def before_batch(self):
            if self.training: erased.append(self.xb[0].clone())
    probe = Probe()
    learn = tiny_learner(data, cbs=[AugMixCallback(), probe, Erased()])
    quiet_fit(learn, 1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()
    stats = [(torch.tensor(v).view(1, 3, 1, 1)) for v in imagenet_stats]
    decoded = erased[0] * stats[1] + stats[0]
    assert decoded.min() < -0.05 or decoded.max() > 1.05  # the case: erased pixels outside [0, 1]
    stacked = probe.first_blocks[0]
    torch.testing.assert_close(stacked[:BS], erased[0])
    views = stacked[BS:] * stats[1] + stats[0]
    assert views.min() > -1e-4 and views.max() < 1 + 1e-4


def test_models_returning_several_tensors_get_each_cut_to_the_clean_rows(dls):
    """A model returning (main, auxiliary) logits: after_loss cuts each tensor, not the tuple (issue 19, item 11)."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.main, self.aux = nn.Linear(4, 2), nn.Linear(4, 2)
        def forward(self, x):
            features = self.body(x)
            return self.main(features), self.aux(features)
    main_loss, aux_loss = JsdCrossEntropy(), JsdCrossEntropy()

    def two_head_loss(pred, target):
        return main_loss(pred[0], target) + 0.4 * aux_loss(pred[1], target)
    two_head_loss.consumes_splits = True

    def main_accuracy(pred, target):
        return accuracy(pred[0], target)
    class Seen(Callback):
        order = AugMixCallback.order + 1
        run_valid = False
        def before_fit(self): self.model_rows, self.pred_rows, self.consistency = set(), set(), []
        def before_batch(self): self.model_rows.add(self.xb[0].shape[0])
        def after_loss(self):
            self.pred_rows.add(tuple(p.shape[0] for p in self.pred))
            self.consistency.append(float(main_loss.last_consistency) * float(aux_loss.last_consistency))
    seen = Seen()
    learn = Learner(dls, TwoHeads(), loss_func=two_head_loss, metrics=main_accuracy, cbs=[AugMixCallback(), seen])
    learn.recorder.train_metrics = True
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)  # a declared wrapper: nothing to warn about
        quiet_fit(learn, 1, 1e-3)
    assert seen.model_rows == {3 * BS} and seen.pred_rows == {(BS, BS)}
    assert all(c > 0 for c in seen.consistency)  # both heads trained with their JSD term
    names = list(learn.recorder.metric_names)
    assert 'train_main_accuracy' in names and np.isfinite(learn.recorder.values[-1]).all()


def test_a_float64_model_trains_with_the_callback():
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from torch.utils.data import TensorDataset
    images = torch.rand(32, 3, 8, 8, dtype=torch.float64)
    data = TensorDataset(images, (images.mean((1, 2, 3)) > 0.5).long())
    dls = DataLoaders(DataLoader(data, bs=8, shuffle=True), DataLoader(data, bs=8), device='cpu')
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).double()
    probe = Probe()
    learn = Learner(dls, model, loss_func=JsdCrossEntropy(), metrics=accuracy, cbs=[AugMixCallback(), probe])
    quiet_fit(learn, 1, 1e-3)
    assert set(probe.model_rows) == {3 * 8} and np.isfinite(learn.recorder.values[-1]).all()


@pytest.mark.parametrize('fill, error', [
    (5, ValueError), (-0.1, ValueError), (float('nan'), ValueError), ('red', TypeError), ([0.1, 0.2], ValueError),
    ([0.5, 2., 0.5], ValueError), (torch.tensor([0.1, 0.2]), ValueError), (torch.tensor([300.]), ValueError),
    (True, TypeError),
])
def test_a_bad_fill_is_refused_by_the_constructor(fill, error):
    with pytest.raises(error, match='fill'):
        AugMixCallback(fill=fill)


@pytest.mark.parametrize('fill', [None, 0, 0.5, 1., [0.1, 0.2, 0.3], (0.4,), torch.tensor([0.5, 0.5, 0.5])])
def test_good_fills_construct(fill):
    AugMixCallback(fill=fill)


# ----- issue 21, item 1: a loss that never sees the splits is said so, once -----

REPEATED_WARNING = r'AugMixCallback: the loss \((?P<name>.*)\) does not say.*consumes_splits'


def test_a_plain_loss_is_warned_about_once_at_its_first_training_and_can_say_it_means_it(dls):
    loss = CrossEntropyLossFlat()
    learn = tiny_learner(dls, loss_func=loss)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        with learn.no_bar(), learn.no_logging():
            learn.validate()  # validation only: nothing trains
            learn.get_preds()
    with pytest.warns(UserWarning, match=REPEATED_WARNING.replace('(?P<name>.*)', 'CrossEntropyLossFlat')) as record:
        quiet_fit(learn, 1, 1e-3)
        quiet_fit(learn, 1, 1e-3)
    assert sum('AugMixCallback: the loss' in str(w.message) for w in record) == 1
    meant = CrossEntropyLossFlat()
    meant.consumes_splits = False  # the documented way to say: train on every split
    probe = Probe()
    for learn in (tiny_learner(dls, loss_func=meant, cbs=[AugMixCallback(), probe]),
                  tiny_learner(dls, loss_func=CrossEntropyLossFlat(), cbs=AugMixCallback(num_splits=1))):
        with warnings.catch_warnings():
            warnings.simplefilter('error', UserWarning)
            quiet_fit(learn, 1, 1e-3)
    assert set(probe.model_rows) == {3 * BS}


def test_a_wrapped_jsd_loss_that_does_not_say_so_is_warned_about_and_one_that_does_trains_with_jsd(dls):
    """Issue 19, item 5: a function around JsdCrossEntropy got repeated targets, so its JSD term was exactly 0."""
    import fastai.callback.schedule  # noqa: F401  (lr_find)
    jsd = JsdCrossEntropy()
    weights = []

    class TrainingJsd(Callback):
        run_valid = False
        def before_fit(self): self.terms = []
        def after_loss(self): self.terms.append(float(jsd.last_consistency))
    undeclared = lambda pred, target: jsd(pred, target) + 1e-4 * sum(w.pow(2).sum() for w in weights)
    terms = TrainingJsd()
    learn = tiny_learner(dls, loss_func=undeclared, cbs=[AugMixCallback(), terms])
    weights[:] = list(learn.model.parameters())
    with pytest.warns(UserWarning) as record, learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=8, show_plot=False)  # lr_find is a fit
        learn.fit(1, 1e-3)
    messages = [str(w.message) for w in record]
    assert sum(bool(re.search(REPEATED_WARNING.replace('(?P<name>.*)', '<lambda>'), m)) for m in messages) == 1
    assert sum('JsdCrossEntropy(num_splits=3) is training on one split' in m for m in messages) == 1
    assert terms.terms and all(term == 0 for term in terms.terms)  # what the warnings are about

    declared = lambda pred, target: jsd(pred, target) + 1e-4 * sum(w.pow(2).sum() for w in weights)
    declared.consumes_splits = True
    probe = Probe()
    learn = tiny_learner(dls, loss_func=declared, cbs=[AugMixCallback(), probe, terms])
    weights[:] = list(learn.model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)
        quiet_fit(learn, 1, 1e-3)
    assert set(probe.model_rows) == {3 * BS} and all(term > 0 for term in terms.terms)
