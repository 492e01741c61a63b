"""Segmentation: views whose pixels stay on their labels, the callback's choice from the targets, unet_learner."""
import fastai.vision.all  # noqa: F401  (registers the Learner methods users get: lr_find, show_results, ...)

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.layers import ConvLayer
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import TensorMask
from fastai.vision.core import TensorPoint
from fastai.vision.learner import unet_learner
from PIL import Image
from torch import nn

import fastai_jsd.callback as callback_module
import fastai_jsd.data as data_module
from _images import photo_crops, to_tensor
from fastai_jsd import AugMixCallback, JsdCrossEntropy
from fastai_jsd.augmix import NO_OP, OP_NAMES, OPS, AugMixParams, apply_augmix, sample_augmix
from fastai_jsd.callback import repeat_rows, views_geometric
from fastai_jsd.data import SEGMENTATION_CODES, FashionArrays, fashion_segmentation_dls, load_fashion_sample
from fastai_jsd.robustness import SEGMENTATION_CORRUPTIONS, corrupt

matplotlib.use('Agg')

GEOMETRIC = {OP_NAMES.index(name) for name in OP_NAMES if OPS[name].geometric}
FLIPS = {'horizontal': lambda t: t.flip(-1), 'vertical': lambda t: t.flip(-2)}


# --- views keep every pixel where it was -----------------------------------------------------------------
# An op that only changes values (per pixel or from the image's histogram) commutes with a flip;
# one that moves pixels (rotate, shear, translate) does not, for at least one of the two flips.

def one_op_params(name, batch_size, height, width, level=7.):  # 5 would be the enhance ops' identity (factor 1)
    "A draw of a single op at `level` for every image, mixed in fully (blend 1), as a hand-made AugMixParams."
    op = OPS[name]
    argument = op.level_to_argument(torch.full((batch_size, 1, 1), level, dtype=torch.float64), height, width)
    return AugMixParams(chain_weights=torch.ones(batch_size, 1, dtype=torch.float64),
                        blend=torch.ones(batch_size, dtype=torch.float64),
                        op_index=torch.full((batch_size, 1, 1), OP_NAMES.index(name)),
                        op_argument=argument)


def commutes_with(flip, x, params):
    "Whether flipping then augmenting gives the same pixels as augmenting then flipping (same draw)."
    return torch.allclose(apply_augmix(flip(x), params), flip(apply_augmix(x, params)), atol=1e-6, rtol=0)


@pytest.fixture(scope='module')
def photos():
    return to_tensor(photo_crops(6, 24, 30))


@pytest.mark.parametrize('name', OP_NAMES)
def test_each_op_commutes_with_flips_exactly_when_it_keeps_pixels_in_place(photos, name):
    params = one_op_params(name, len(photos), *photos.shape[2:])
    assert not torch.allclose(apply_augmix(photos, params), photos, atol=1e-3)  # the op does something
    commutes = [commutes_with(flip, photos, params) for flip in FLIPS.values()]
    if OPS[name].geometric:
        assert not all(commutes)
    else:
        assert all(commutes)


@pytest.mark.parametrize('all_ops', [False, True])
def test_appearance_draws_keep_every_pixel_in_place(photos, all_ops):
    generator = torch.Generator().manual_seed(3)
    params = sample_augmix(len(photos), 24, 30, severity=6, all_ops=all_ops, generator=generator, geometric=False)
    drawn = set(params.op_index.unique().tolist()) - {NO_OP}
    assert drawn and not drawn & GEOMETRIC
    assert not torch.allclose(apply_augmix(photos, params), photos, atol=1e-2)
    for flip in FLIPS.values():
        assert commutes_with(flip, photos, params)


def test_a_geometric_draw_fails_the_same_check(photos):
    generator = torch.Generator().manual_seed(3)
    params = sample_augmix(len(photos), 24, 30, severity=6, depth=3, generator=generator, geometric=True)
    moved = (params.op_argument != 0) & torch.isin(params.op_index, torch.tensor(sorted(GEOMETRIC)))
    assert moved.any()
    assert not all(commutes_with(flip, photos, params) for flip in FLIPS.values())


# --- which targets are masks -----------------------------------------------------------------------------

def images(batch=4, height=6, width=5):
    return torch.zeros(batch, 3, height, width)


@pytest.mark.parametrize('target', [
    TensorMask(torch.zeros(4, 6, 5, dtype=torch.long)),   # fastai's masks
    torch.zeros(4, 6, 5, dtype=torch.long),                # integer masks of the images' size
    torch.zeros(4, 6, 5, dtype=torch.uint8),
    torch.zeros(4, 2, 6, 5),                               # soft masks, depth maps: also tied to pixels
    TensorPoint(torch.zeros(4, 3, 2)),                     # key points move with the image too
], ids=['TensorMask', 'int64', 'uint8', 'float-maps', 'points'])
def test_pixel_tied_targets_turn_geometric_ops_off(target):
    assert views_geometric(None, images(), (target,)) is False
    assert views_geometric(False, images(), (target,)) is False
    with pytest.raises(ValueError, match=r'geometric=True.*no\s+longer match.*geometric=None.*geometric=False'):
        views_geometric(True, images(), (target,))


@pytest.mark.parametrize('target', [
    torch.zeros(4, dtype=torch.long),                      # class indices
    torch.zeros(6, 5),                                     # soft targets [B, C] whose shape happens to be (H, W)
    torch.zeros(4, 7, 5, dtype=torch.long),                # not the images' size
    torch.zeros(3, 6, 5, dtype=torch.long),                # not one per image
], ids=['classes', 'soft-targets-shaped-like-HxW', 'other-size', 'other-batch'])
def test_other_targets_keep_geometric_ops(target):
    batch = images(batch=6) if target.ndim == 2 else images()
    assert views_geometric(None, batch, (target,)) is True
    assert views_geometric(True, batch, (target,)) is True
    assert views_geometric(False, batch, (target,)) is False


def test_geometric_must_be_none_or_a_bool():
    with pytest.raises(TypeError, match=r"geometric must be None.*got 'auto'"):
        AugMixCallback(geometric='auto')


# --- the callback on a segmentation Learner --------------------------------------------------------------

@pytest.fixture(scope='module')
def seg_dls():
    "Fashion-MNIST segmentation at 32 px: 64 training and 32 validation images of the sample, batches of 16."
    # A smaller sample rather than loaders with n=64: get_preds and show_results make new loaders of the whole set.
    sample = load_fashion_sample()
    small = FashionArrays(sample.train_images[:64], sample.train_labels[:64], sample.valid_images[:32],
                          sample.valid_labels[:32])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_module, 'load_fashion_sample', lambda: small)
        return fashion_segmentation_dls(size=32, bs=16, seed=0, device=torch.device('cpu'))


def tiny_encoder(pretrained=False, n_in=3, widths=(8, 16, 32)):
    "A 3-stage conv encoder with a pooled head: fastai's create_body cuts it before the pool."
    layers = [ConvLayer(n_in, widths[0])] + [ConvLayer(a, b, stride=2) for a, b in zip(widths, widths[1:])]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10))


def pixel_model(n_classes=11):
    torch.manual_seed(0)
    return nn.Sequential(ConvLayer(3, 8), nn.Conv2d(8, n_classes, 1))


class RecordingLoss:
    "CrossEntropyLossFlat(axis=1) that keeps the shapes and targets it was given (a loss without splits)."
    consumes_splits = False  # says it means to train on every split (else AugMixCallback warns)

    def __init__(self):
        self.inner, self.calls = CrossEntropyLossFlat(axis=1), []

    def __call__(self, pred, target):
        self.calls.append((tuple(pred.shape), target.clone()))
        return self.inner(pred, target)

    def activation(self, x): return self.inner.activation(x)
    def decodes(self, x): return self.inner.decodes(x)


class SeenTargets(Callback):
    "The targets the batch had before AugMixCallback and after its after_loss."
    order = AugMixCallback.order - 1
    run_valid = False

    def before_fit(self): self.before, self.after = [], []
    def before_batch(self): self.before.append(self.y.clone())
    def after_batch(self): self.after.append(self.y.clone())


@pytest.fixture
def recorded_augmix(monkeypatch):
    "The `geometric` of every AugMix call the callback makes."
    calls = []
    real = callback_module.augmix

    def spy(*args, **kwargs):
        calls.append(kwargs.get('geometric'))
        return real(*args, **kwargs)
    monkeypatch.setattr(callback_module, 'augmix', spy)
    return calls


def fit_quietly(learn, epochs=1):
    with learn.no_bar(), learn.no_logging():
        learn.fit(epochs, 1e-3)


@pytest.mark.parametrize('geometric', [None, False])
def test_masks_get_appearance_only_views(seg_dls, recorded_augmix, geometric):
    learn = Learner(seg_dls, pixel_model(), loss_func=JsdCrossEntropy(), cbs=AugMixCallback(geometric=geometric))
    fit_quietly(learn)
    assert recorded_augmix == [False] * len(seg_dls.train)


def test_class_targets_keep_geometric_views(recorded_augmix):
    class_targets = [(torch.rand(3, 32, 32), i % 2) for i in range(32)]
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    dls = Datasets(class_targets, tfms=[[ItemGetter(0)], [ItemGetter(1)]],
                   splits=[list(range(24)), list(range(24, 32))]).dataloaders(bs=8, device='cpu')
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    learn = Learner(dls, model, loss_func=JsdCrossEntropy(), cbs=AugMixCallback())
    fit_quietly(learn)
    assert recorded_augmix == [True] * 3


def test_geometric_true_with_masks_is_refused_before_any_step(seg_dls):
    learn = Learner(seg_dls, pixel_model(), loss_func=JsdCrossEntropy(), cbs=AugMixCallback(geometric=True))
    weights = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError) as error:
        fit_quietly(learn)
    message = str(error.value)
    assert 'TensorMask(16, 32, 32)' in message
    assert 'would no longer match' in message and 'geometric=None' in message and 'geometric=False' in message
    assert all(torch.equal(w, p) for w, p in zip(weights, learn.model.parameters()))


def test_plain_loss_gets_its_masks_repeated_per_split(seg_dls, recorded_augmix):
    "Issue 11 item 3: CrossEntropyLossFlat(axis=1) trains on views that still match the repeated masks."
    loss = RecordingLoss()
    seen = SeenTargets()
    learn = Learner(seg_dls, pixel_model(), loss_func=loss, cbs=[AugMixCallback(), seen])
    fit_quietly(learn)
    training_calls = loss.calls[:len(seg_dls.train)]
    for (pred_shape, target), clean in zip(training_calls, seen.before):
        assert pred_shape == (48, 11, 32, 32) and target.shape == (48, 32, 32)
        assert torch.equal(target, torch.cat([clean] * 3))
    assert all(torch.equal(a, b) for a, b in zip(seen.before, seen.after))  # B masks again after the loss
    assert recorded_augmix == [False] * len(seg_dls.train)
    mask = TensorMask(torch.arange(2 * 3 * 4).view(2, 3, 4))
    assert torch.equal(repeat_rows(mask, 3, 2), torch.cat([mask, mask, mask]))


# --- a whole unet_learner session ------------------------------------------------------------------------

@pytest.mark.slow  # about 15 s on 2 busy cores
def test_unet_learner_session(seg_dls, tmp_path):
    sample = load_fashion_sample()
    learn = unet_learner(seg_dls, tiny_encoder, pretrained=False, loss_func=JsdCrossEntropy(),
                         cbs=AugMixCallback(), path=tmp_path)
    with learn.no_bar(), learn.no_logging():
        suggestion = learn.lr_find(num_it=8, show_plot=False)
        learn.fit_one_cycle(1, 3e-3)
    assert np.isfinite(suggestion.valley) and all(np.isfinite(learn.recorder.losses))
    names = list(learn.recorder.metric_names)
    assert names[-3:] == ['train_ce', 'train_jsd', 'time']  # at the end of the row (issue 19, item 6)

    learn.show_results(max_n=2)
    matplotlib.pyplot.close('all')

    with learn.no_bar():
        probs, targets, losses = learn.get_preds(with_loss=True)
    assert probs.shape == (32, 11, 32, 32) and targets.shape == (32, 32, 32) and losses.shape == (32,)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(32, 32, 32))
    # the loss of each image: label-smoothed cross-entropy over its pixels (k = 1 at inference)
    expected = F.cross_entropy(probs.log(), targets, label_smoothing=0.1, reduction='none').flatten(1).mean(1)
    torch.testing.assert_close(losses, expected, rtol=1e-4, atol=1e-4)

    image = sample.valid_images[0]
    mask, decoded, item_probs = learn.predict(image)
    assert isinstance(mask, TensorMask) and mask.shape == (32, 32) and item_probs.shape == (11, 32, 32)
    assert torch.equal(decoded, item_probs.argmax(dim=0)) and torch.equal(mask, decoded)
    assert set(mask.unique().tolist()) <= set(range(len(SEGMENTATION_CODES)))

    learn.export('seg.pkl')
    loaded = load_learner(tmp_path / 'seg.pkl')
    assert isinstance(loaded.loss_func, JsdCrossEntropy)
    loaded_mask, _, loaded_probs = loaded.predict(image)
    assert torch.equal(loaded_mask, mask) and torch.allclose(loaded_probs, item_probs, atol=1e-5)


# --- the scenes task keeps its labels under every segmentation corruption -------------------------------------
# The garments' signal in a corrupted scene is corrupt(scene, white garments) - corrupt(scene, black garments) with
# the same random draws (both images share a white pixel, so corruptions that scale by the image's maximum, as fog
# does, scale both alike). If a corruption moved content, that signal would line up best with the clean masks
# shifted; it must line up best with the masks where they are.

SHIFT_REACH = 4
# Blurs spread content around where it was: a symmetric kernel by up to a pixel either way at 64 px; motion
# blur drags fading copies one way (the sharpest copy stays in place, as in Cityscapes-C, which keeps it):
# measured 1-3 px at 64 px (up to 5% of the side at severity 5). Glass blur is Tiny-ImageNet-C's at 64 px: the
# script's shuffle swaps pixels up to 2 px apart at severities 4-5 (max_delta in benchmarks.py), so garments
# blur by up to 2 px there. Everything else moves no pixel at all.
ALLOWED_SHIFT = {'defocus_blur': 1, 'glass_blur': 2, 'motion_blur': 3}


@pytest.fixture(scope='module')
def scene_pairs():
    "Four 64 px validation scenes with their garments painted white and black over the same backgrounds."
    sample, photos = load_fashion_sample(), data_module.load_scene_photos()
    scenes = data_module.make_fashion_scenes(sample.valid_images, sample.valid_labels, 4, 64, 'valid', seed=0,
                                             photos=photos)
    def painted(colour):
        images = []
        for recipe in scenes.recipes:
            recipe = recipe._replace(background=recipe.background._replace(brightness=0.5),
                                     garments=tuple(g._replace(colour=colour) for g in recipe.garments))
            image, mask = data_module.render_scene(recipe, photos, sample.valid_images, 64)
            assert np.array_equal(mask, scenes.masks[len(images)])  # the labels do not depend on the colours
            images.append(image)
        images = np.stack(images)
        images[:, 0, 0] = 255  # never a garment pixel: Fashion-MNIST's corners are empty
        return to_tensor(images)
    return painted((1.0, 1.0, 1.0)), painted((0.0, 0.0, 0.0)), torch.from_numpy(scenes.masks > 0).float()


def misalignment(signal, masks):
    "For each image, how far (in pixels, the larger axis) the mask shift that best lines up with |signal| is."
    strength = signal.abs().sum(1)
    shifts = [(dy, dx) for dy in range(-SHIFT_REACH, SHIFT_REACH + 1) for dx in range(-SHIFT_REACH, SHIFT_REACH + 1)]
    scores = torch.stack([(strength * torch.roll(masks, shift, (1, 2))).sum((1, 2)) for shift in shifts], 1)
    return [max(abs(v) for v in shifts[i]) for i in scores.argmax(1).tolist()]


def corrupted_signal(pairs, corruption):
    "The garments' signal after `corruption` (a function of images and a generator), the same draws for both."
    white, black, _ = pairs
    return corruption(white, torch.Generator().manual_seed(5)) - corruption(black, torch.Generator().manual_seed(5))


@pytest.mark.parametrize('name', SEGMENTATION_CORRUPTIONS)
def test_scene_masks_stay_on_their_garments_under_every_segmentation_corruption(scene_pairs, name):
    masks = scene_pairs[2]
    assert misalignment(scene_pairs[0] - scene_pairs[1], masks) == [0] * len(masks)  # clean: exactly on them
    for severity in range(1, 6):
        signal = corrupted_signal(scene_pairs, lambda x, g: corrupt(x, name, severity, generator=g))
        shifts = misalignment(signal, masks)
        assert max(shifts) <= ALLOWED_SHIFT.get(name, 0), f'{name} severity {severity} moves garments by {shifts} px'


@pytest.mark.parametrize('name', ['elastic_transform', 'translate'])
def test_the_alignment_check_catches_corruptions_that_move_content(scene_pairs, name):
    moves = {'elastic_transform': lambda x, g: corrupt(x, 'elastic_transform', 3, generator=g),
             'translate': lambda x, g: torch.roll(x, 2, -1)}[name]
    assert max(misalignment(corrupted_signal(scene_pairs, moves), scene_pairs[2])) > 1


# --- examples/segmentation.py ----------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / 'examples' / 'segmentation.py'
TABLE_ROW = re.compile(r'^\| (baseline \(cross-entropy\)|AugMix \+ JSD) \| ([0-9.]+)% \| ([0-9.]+)% \|', re.M)


def load_example():
    if str(EXAMPLE.parent) not in sys.path:  # as `python examples/segmentation.py` has it: it imports course.py
        sys.path.insert(0, str(EXAMPLE.parent))
    spec = importlib.util.spec_from_file_location('segmentation_example', EXAMPLE)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def check_png(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert('L'))
    assert image.format == 'PNG' and min(pixels.shape) > 100 and pixels.std() > 5, f'{path} looks empty'


def check_outputs(out, printed):
    rows = TABLE_ROW.findall(printed)
    assert [row[0] for row in rows] == ['baseline (cross-entropy)', 'AugMix + JSD'], printed
    assert all(0 <= float(error) <= 100 and 0 <= float(iou) <= 100 for _, error, iou in rows)
    table = pd.read_csv(out / 'results.csv', index_col='model')
    assert list(table.index) == ['baseline (cross-entropy)', 'AugMix + JSD']
    assert {'clean_pixel_error', 'clean_mean_iou', 'corrupted_pixel_error', 'corrupted_mean_iou',
            'mce_vs_baseline', 'train_seconds'} <= set(table.columns)
    scores = pd.read_csv(out / 'corruption_scores.csv')
    assert set(scores.model) == set(table.index) and {'pixel_error', 'mean_iou'} <= set(scores.columns)
    ious = pd.read_csv(out / 'class_iou.csv', index_col='class')
    conditions = ('clean', 'corrupted')
    assert list(ious.columns) == [f'{model}, {condition}' for model in table.index for condition in conditions]
    assert ((ious.fillna(0) >= 0) & (ious.fillna(0) <= 1)).all().all()
    for name in ('predictions_baseline', 'predictions_augmix_jsd', 'augmix_views', 'lr_find_baseline',
                 'lr_find_augmix_jsd'):
        check_png(out / f'{name}.png')
    assert not (out / 'models').exists()  # lr_find's temporary folder is not left behind


@pytest.mark.slow  # a fresh interpreter importing fastai, two tiny trainings: 30-50 s on 2 busy cores
def test_example_quick_run_as_a_user_runs_it(tmp_path):
    # PYTHONPATH: this checkout's fastai_jsd, whatever copy the environment has installed
    env = {'OMP_NUM_THREADS': '1', **os.environ, 'MPLBACKEND': 'Agg', 'FASTAI_HOME': str(tmp_path / 'fastai_home'),
           'PYTHONWARNINGS': 'ignore::FutureWarning',
           'PYTHONPATH': os.pathsep.join(filter(None, [str(EXAMPLE.parents[1]), os.environ.get('PYTHONPATH')]))}
    result = subprocess.run([sys.executable, str(EXAMPLE), '--quick', '--out', 'out'], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    check_outputs(tmp_path / 'out', result.stdout)


def write_camvid_style_folder(root, n=24, size=40):
    """images/, labels/<name>_P.png and codes.txt, as URLs.CAMVID_TINY: Fashion-MNIST garments on a background,
    the faint halo around them labelled 'Void' (code 2)."""
    sample = load_fashion_sample()
    (root / 'images').mkdir(parents=True)
    (root / 'labels').mkdir()
    for i, image in enumerate(sample.train_images[:n]):
        Image.fromarray(image).convert('RGB').resize((size, size)).save(root / 'images' / f'frame{i:03d}.png')
        mask = np.where(image >= 8, 1, np.where(image > 0, 2, 0)).astype(np.uint8)
        Image.fromarray(mask).resize((size, size), Image.NEAREST).save(root / 'labels' / f'frame{i:03d}_P.png')
    (root / 'codes.txt').write_text('Background\nGarment\nVoid\n')
    return root


@pytest.mark.slow  # two tiny trainings in this process: 10-20 s
def test_example_trains_on_a_camvid_style_folder(tmp_path):
    folder = write_camvid_style_folder(tmp_path / 'camvid_like')
    script = load_example()
    dls = script.folder_dls(folder, size=32, bs=4, seed=0)
    assert list(dls.vocab) == ['Background', 'Garment', 'Void'] and script.void_index(dls) == 2
    image_file = dls.train_ds.items[0]
    mask = np.asarray(dls.train_ds[0][1])  # before Resize: the file label_file paired with the image
    np.testing.assert_array_equal(mask, np.asarray(Image.open(folder / 'labels' / f'{image_file.stem}_P.png')))
    assert set(np.unique(mask)) == {0, 1, 2}
    out = tmp_path / 'out'
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        script.main(['--quick', '--path', str(folder), '--size', '32', '--bs', '4', '--out', str(out)])
    check_outputs(out, printed.getvalue())


def test_example_defaults_per_task():
    script = load_example()
    scenes, on_black = script.parse_args([]), script.parse_args(['--task', 'on-black'])
    assert (scenes.task, scenes.size, scenes.bs, scenes.epochs, scenes.eval_images) == ('scenes', 32, 16, 6, 200)
    # the earlier task keeps the settings its README numbers were measured with
    assert (on_black.size, on_black.bs, on_black.epochs, on_black.eval_images) == (28, 64, 3, 500)
    assert script.parse_args(['--size', '48', '--bs', '8', '--epochs', '2']).size == 48
    assert script.parse_args(['--quick']).epochs == 1 and script.parse_args(['--all-ops']).all_ops


def test_example_refuses_scenes_below_32_px(capsys):
    with pytest.raises(SystemExit):
        load_example().parse_args(['--size', '24'])
    assert '--size must be at least 32 for --task scenes' in capsys.readouterr().err


def test_prediction_figure_labels_its_columns_and_its_colours():
    """The figure stands alone: which column is the image, the target and the prediction, and which colour is
    which class (issue: a predictions figure without either)."""
    import matplotlib.pyplot as plt
    script = load_example()
    dls = data_module.fashion_scenes_dls(size=32, bs=4, n_train=8, n_valid=4, seed=0)
    learn = unet_learner(dls, script.small_encoder, pretrained=False, n_in=3, norm_type=None)
    xb, yb = dls.valid.one_batch()
    pixels = script.decode(xb, script.normalize_stats(dls.valid, xb.device)).clamp(0, 1)
    fig = script.prediction_figure(learn, 'AugMix + JSD', pixels, yb, 'gaussian_noise', 0, dls.vocab)
    titles = [ax.get_title() for ax in fig.axes[:5]]
    assert titles == ['image', 'target', 'prediction', 'gaussian noise 3', 'prediction on it']
    assert len(fig.axes) == 5 * len(pixels)
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    assert legend == list(SEGMENTATION_CODES)
    assert 'AugMix + JSD' in fig._suptitle.get_text()
    # masks are drawn with one fixed colour per code, whatever the codes present in these images
    target_image = fig.axes[1].get_images()[0]
    assert target_image.get_clim() == (0, len(SEGMENTATION_CODES) - 1)
    assert learn.model.training  # the predictions leave the model's mode as they found it
    plt.close(fig)


def test_example_refuses_a_folder_that_is_not_camvid_style(tmp_path, capsys):
    (tmp_path / 'images').mkdir()
    with pytest.raises(SystemExit) as exit_info:
        load_example().parse_args(['--path', str(tmp_path)])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'lacks labels, codes.txt' in message and 'CamVid-style' in message
