"""The bundled Fashion-MNIST sample, its rebuild script, and `fashion_dls` as an ordinary fastai DataLoaders."""
import gzip
import importlib.util
import zipfile
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from fastai.data.transforms import Normalize
from fastai.interpret import ClassificationInterpretation
from fastai.learner import load_learner
from fastai.callback.training import ShortEpochCallback
from fastai.torch_core import TensorImage, TensorImageBW
from fastai.vision.core import PILImage, PILImageBW
from fastai.vision.learner import vision_learner
from PIL import Image
from torchvision.models import resnet18

from _images import photo_crops
from fastai_jsd.data import (DEBIAN_FASHION_DIR, FASHION_CLASSES, GARMENT_THRESHOLD, SAMPLE_PATH, SCENE_CROP_SIDES,
                             SCENE_LABEL_ALPHA, SCENE_MIN_SHADING, SCENE_PHOTO_SHAPE, SEGMENTATION_CODES,
                             BackgroundCrop, PlacedGarment, SceneRecipe, as_gray_image, as_rgb_image, draw_scene,
                             fashion_dls, fashion_scenes_dls, fashion_segmentation_dls, garment_alpha, garment_shading,
                             garment_tile, load_fashion_mnist, load_fashion_sample, load_scene_photos,
                             make_fashion_scenes, pixel_stats, read_idx, render_scene, scene_tiles)

matplotlib.use('Agg')

ROOT = Path(__file__).resolve().parents[1]
IDX_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')
HAVE_FULL_SET = all((DEBIAN_FASHION_DIR / f'{name}.gz').is_file() for name in IDX_FILES)
needs_full_set = pytest.mark.skipif(not HAVE_FULL_SET, reason=f"Fashion-MNIST idx files not in {DEBIAN_FASHION_DIR} "
                                    "(apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope='module')
def sample():
    return load_fashion_sample()


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of unsigned bytes written from the format's definition, independently of `read_idx`."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_full_set(folder: Path, n=20):
    """Four small valid idx files (gzipped) of random images and labels 0..9, in `folder`."""
    rng = np.random.default_rng(0)
    for split, count in (('train', n), ('t10k', n // 2)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = np.arange(count, dtype=np.uint8) % 10
        (folder / f'{split}-images-idx3-ubyte.gz').write_bytes(gzip.compress(idx_bytes(images)))
        (folder / f'{split}-labels-idx1-ubyte.gz').write_bytes(gzip.compress(idx_bytes(labels)))


# --- the bundled sample ---------------------------------------------------------------------------------

def test_sample_shapes_dtypes_and_balance(sample):
    assert sample.train_images.shape == (5000, 28, 28) and sample.valid_images.shape == (1000, 28, 28)
    for array in sample:
        assert array.dtype == np.uint8
    assert sample.train_labels.shape == (5000,) and sample.valid_labels.shape == (1000,)
    assert np.bincount(sample.train_labels, minlength=10).tolist() == [500] * 10
    assert np.bincount(sample.valid_labels, minlength=10).tolist() == [100] * 10
    assert sample.train_labels.max() < len(FASHION_CLASSES)
    # Real photos, not blanks: black background, bright articles, every image has content.
    assert sample.train_images.max(axis=(1, 2)).min() > 100
    assert 0.2 < sample.train_images.mean() / 255 < 0.4


def test_sample_file_is_small_and_loads_without_pickle():
    assert SAMPLE_PATH.stat().st_size < 4e6
    with np.load(SAMPLE_PATH, allow_pickle=False) as archive:
        assert set(archive.files) == {'train_images', 'train_labels', 'valid_images', 'valid_labels',
                                      'train_indices', 'valid_indices'}
        indices = archive['train_indices']
    assert np.all(np.diff(indices.astype(np.int64)) > 0), "rows are sorted and distinct"
    assert (SAMPLE_PATH.parent / 'README.md').read_text().count('MIT') >= 2


@needs_full_set
def test_sample_rows_are_the_full_sets_rows(sample):
    full = load_fashion_mnist()
    with np.load(SAMPLE_PATH, allow_pickle=False) as archive:
        train_rows, valid_rows = archive['train_indices'], archive['valid_indices']
    np.testing.assert_array_equal(full.train_images[train_rows], sample.train_images)
    np.testing.assert_array_equal(full.train_labels[train_rows], sample.train_labels)
    np.testing.assert_array_equal(full.valid_images[valid_rows], sample.valid_images)
    np.testing.assert_array_equal(full.valid_labels[valid_rows], sample.valid_labels)


@needs_full_set
def test_rebuild_script_reproduces_the_bundled_npz(tmp_path):
    spec = importlib.util.spec_from_file_location('make_fashion_sample', ROOT / 'examples' / 'make_fashion_sample.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / 'rebuilt.npz'
    script.main(['--source', str(DEBIAN_FASHION_DIR), '--out', str(out)])
    with zipfile.ZipFile(SAMPLE_PATH) as bundled, zipfile.ZipFile(out) as rebuilt:
        assert bundled.namelist() == rebuilt.namelist()
        for name in bundled.namelist():
            # The .npy payloads, not the compressed bytes: another zlib may compress differently.
            assert bundled.read(name) == rebuilt.read(name), f"{name} differs from the bundled sample"


# --- idx files ------------------------------------------------------------------------------------------

def test_read_idx_plain_and_gzipped(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    (tmp_path / 'plain').write_bytes(idx_bytes(images))
    (tmp_path / 'zipped.gz').write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(tmp_path / 'plain'), images)
    np.testing.assert_array_equal(read_idx(tmp_path / 'zipped.gz'), images)


@pytest.mark.parametrize('content', [b'garbage' * 100, b'\x1f\x8bnot really gzip', b'',
                                     idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-10]],
                         ids=['garbage', 'bad-gzip', 'empty', 'truncated'])
def test_read_idx_rejects_damaged_files(tmp_path, content):
    file = tmp_path / 'train-images-idx3-ubyte.gz'
    file.write_bytes(content)
    with pytest.raises(ValueError, match='train-images-idx3-ubyte.gz'):
        read_idx(file)


def test_full_set_missing_says_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        fashion_dls(full=True, path=tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and 'train-images-idx3-ubyte' in message
    assert 'apt-get install dataset-fashion-mnist' in message and 'path=' in message


def test_full_set_corrupt_file_is_named(tmp_path):
    write_fake_full_set(tmp_path)
    (tmp_path / 't10k-labels-idx1-ubyte.gz').write_bytes(b'\x1f\x8b' + b'garbage' * 50)
    with pytest.raises(ValueError, match='t10k-labels-idx1-ubyte.gz'):
        fashion_dls(full=True, path=tmp_path)


def test_full_set_from_any_folder_of_idx_files(tmp_path):
    write_fake_full_set(tmp_path, n=40)
    dls = fashion_dls(full=True, path=tmp_path, bs=8)
    assert len(dls.train_ds) == 40 and len(dls.valid_ds) == 20
    assert dls.one_batch()[0].shape == (8, 3, 32, 32)


def test_damaged_sample_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.npz'):
        load_fashion_sample(tmp_path / 'missing.npz')
    (tmp_path / 'garbage.npz').write_bytes(b'PK\x03\x04' + b'garbage' * 100)
    with pytest.raises(ValueError, match='garbage.npz'):
        load_fashion_sample(tmp_path / 'garbage.npz')
    np.savez(tmp_path / 'partial.npz', train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(ValueError, match='valid_images'):
        load_fashion_sample(tmp_path / 'partial.npz')


@needs_full_set
def test_full_set_loads():
    dls = fashion_dls(full=True, path=DEBIAN_FASHION_DIR, bs=32, size=28)
    assert len(dls.train_ds) == 60000 and len(dls.valid_ds) == 10000
    xb, yb = dls.one_batch()
    assert xb.shape == (32, 3, 28, 28) and yb.shape == (32,)


# --- arguments ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs,name', [
    (dict(size=7), 'size'), (dict(size=32.0), 'size'), (dict(bs=0), 'bs'), (dict(channels=2), 'channels'),
    (dict(channels=True), 'channels'), (dict(channels=3.0), 'channels'), (dict(num_workers=-1), 'num_workers'),
    (dict(seed='a'), 'seed'), (dict(full='yes'), 'full'), (dict(path='/tmp'), 'path'),
    # argument errors come before any file is looked at
    (dict(full=True, path='/nonexistent', size=4), 'size')])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf'^{name}\b|{name}='):
        fashion_dls(**kwargs)


# --- DataLoaders ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('channels,image_type', [(3, TensorImage), (1, TensorImageBW)])
def test_batch_shapes_and_vocab(channels, image_type):
    dls = fashion_dls(size=40, bs=16, channels=channels)
    xb, yb = dls.one_batch()
    assert type(xb) is image_type and xb.shape == (16, channels, 40, 40) and xb.dtype == torch.float32
    assert yb.shape == (16,) and yb.dtype == torch.int64 and 0 <= yb.min() and yb.max() < 10
    assert list(dls.vocab) == list(FASHION_CLASSES) and dls.c == 10
    assert len(dls.train_ds) == 5000 and len(dls.valid_ds) == 1000


@pytest.mark.parametrize('channels', [1, 3])
def test_valid_loader_gives_the_sample_images_and_labels(sample, channels):
    """At size 28 the pipeline only converts and normalizes: decoding a batch gives back the raw pixels."""
    dls = fashion_dls(size=28, bs=50, channels=channels)
    xb, yb = dls.valid.one_batch()
    pixels = dls.valid.decode((xb, yb))[0]  # Normalize and IntToFloatTensor undone: 0..255
    expected = torch.from_numpy(sample.valid_images[:50]).unsqueeze(1).expand(-1, channels, -1, -1)
    assert (pixels.cpu().long() - expected.long()).abs().max() <= 1
    np.testing.assert_array_equal(yb.cpu().numpy(), sample.valid_labels[:50])


def test_normalization_uses_the_training_statistics(sample):
    dls = fashion_dls(size=28, bs=250)
    normalize = next(t for t in dls.after_batch.fs if isinstance(t, Normalize))
    reference_mean = sample.train_images.mean() / 255
    reference_std = sample.train_images.std() / 255
    assert torch.allclose(normalize.mean.cpu().flatten(), torch.full((3,), reference_mean), atol=1e-6)
    assert torch.allclose(normalize.std.cpu().flatten(), torch.full((3,), reference_std), atol=1e-6)
    assert pixel_stats(sample.train_images) == pytest.approx((reference_mean, reference_std), abs=1e-9)
    batches = torch.cat([xb.cpu() for xb, _ in dls.valid])
    assert abs(batches.mean().item()) < 0.05 and abs(batches.std().item() - 1) < 0.05


def test_seed_fixes_the_shuffle_order():
    first = fashion_dls(bs=32, seed=1).train.one_batch()[1]
    again = fashion_dls(bs=32, seed=1).train.one_batch()[1]
    other = fashion_dls(bs=32, seed=2).train.one_batch()[1]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_image_conversions_match_pil(sample):
    photo = photo_crops(1, 40, 30)[0]
    gray = np.asarray(Image.fromarray(photo).convert('L'))  # PIL's own luma conversion is the reference
    rgb = as_rgb_image(photo)
    assert isinstance(rgb, PILImage) and rgb.mode == 'RGB' and rgb.size == (30, 40)
    assert all(np.array_equal(np.asarray(rgb)[..., c], gray) for c in range(3))
    bw = as_gray_image(torch.from_numpy(photo).permute(2, 0, 1))
    assert isinstance(bw, PILImageBW) and bw.mode == 'L'
    np.testing.assert_array_equal(np.asarray(bw), gray)
    np.testing.assert_array_equal(np.asarray(as_gray_image(sample.valid_images[0])), sample.valid_images[0])
    with pytest.raises(TypeError, match='uint8'):
        as_gray_image(sample.valid_images[0] / 255)


def test_image_from_file(tmp_path):
    photo = photo_crops(1, 20, 24)[0]
    Image.fromarray(photo).save(tmp_path / 'photo.png')
    for file in (tmp_path / 'photo.png', str(tmp_path / 'photo.png')):
        np.testing.assert_array_equal(np.asarray(as_gray_image(file)), np.asarray(Image.fromarray(photo).convert('L')))


@pytest.mark.parametrize('channels', [1, 3])
def test_show_batch(channels):
    import matplotlib.pyplot as plt
    fashion_dls(bs=8, channels=channels).show_batch(max_n=4)
    assert len(plt.gcf().axes) >= 4
    plt.close('all')


@pytest.mark.parametrize('channels', [3, 1])
def test_train_predict_interpret_export_round_trip(sample, tmp_path, channels):
    dls = fashion_dls(size=32, bs=16, channels=channels)
    learn = vision_learner(dls, resnet18, pretrained=False, n_in=channels, path=tmp_path)
    with learn.no_bar(), learn.no_logging():  # a couple of training and validation batches
        learn.fit(1, 1e-3, cbs=ShortEpochCallback(pct=0.001, short_valid=True))
    assert learn.recorder.losses and all(torch.isfinite(loss) for loss in learn.recorder.losses)

    # test_dl on raw arrays skips no conversion: same inputs as the validation loader.
    raw = list(sample.valid_images[:8])
    valid_x = dls.valid.one_batch()[0][:8]
    assert torch.equal(dls.test_dl(raw).one_batch()[0], valid_x)
    labelled = dls.test_dl([(image, FASHION_CLASSES[label]) for image, label
                            in zip(sample.valid_images[:8], sample.valid_labels[:8])], with_labels=True)
    probs = learn.get_preds(dl=labelled)[0]

    name, index, item_probs = learn.predict(sample.valid_images[0])
    assert name == FASHION_CLASSES[int(index)] and torch.allclose(item_probs, probs[0], atol=1e-5)
    pil_probs = learn.predict(Image.fromarray(sample.valid_images[0]))[2]
    assert torch.allclose(pil_probs, item_probs, atol=1e-5)
    photo_input, photo_name, _, _ = learn.predict(photo_crops(1, 60, 45)[0], with_input=True)
    assert photo_name in FASHION_CLASSES and photo_input.shape == (channels, 32, 32)
    if channels == 3:  # a colour photo is seen as the gray the model was trained on
        assert torch.equal(photo_input[0], photo_input[1]) and torch.equal(photo_input[0], photo_input[2])

    interp = ClassificationInterpretation.from_learner(learn, dl=labelled)
    assert interp.confusion_matrix().sum() == 8

    learn.export('fashion.pkl')
    loaded = load_learner(tmp_path / 'fashion.pkl')
    assert list(loaded.dls.vocab) == list(FASHION_CLASSES)
    loaded_name, _, loaded_probs = loaded.predict(sample.valid_images[0])
    assert loaded_name == name and torch.allclose(loaded_probs, item_probs, atol=1e-5)


# --- the segmentation task: garment pixels labelled with their class ------------------------------------

def reference_masks(images, labels):
    "Masks written from the definition: label + 1 where the pixel is at least the threshold, 0 elsewhere."
    masks = np.zeros(images.shape, np.int64)
    for mask, image, label in zip(masks, images, labels):
        mask[image >= GARMENT_THRESHOLD] = int(label) + 1
    return masks


@pytest.mark.parametrize('channels,image_type', [(3, TensorImage), (1, TensorImageBW)])
def test_segmentation_batches_are_images_and_their_garment_masks(sample, channels, image_type):
    from fastai.torch_core import TensorMask
    dls = fashion_segmentation_dls(size=28, bs=50, channels=channels)
    xb, yb = dls.valid.one_batch()
    assert type(xb) is image_type and xb.shape == (50, channels, 28, 28)
    assert type(yb) is TensorMask and yb.shape == (50, 28, 28) and yb.dtype == torch.int64
    np.testing.assert_array_equal(yb.cpu().numpy(), reference_masks(sample.valid_images[:50], sample.valid_labels[:50]))
    pixels = dls.valid.decode((xb, yb))[0]  # the images are fashion_dls's images
    assert (pixels[:, 0].cpu().long() - torch.from_numpy(sample.valid_images[:50]).long()).abs().max() <= 1
    assert list(dls.vocab) == list(SEGMENTATION_CODES) == ['background', *FASHION_CLASSES]
    assert dls.train.after_item.c == 11 and len(dls.train_ds) == 5000 and len(dls.valid_ds) == 1000


def test_segmentation_masks_resize_with_their_images(sample):
    dls = fashion_segmentation_dls(size=40, bs=20, seed=0)
    _, yb = dls.valid.one_batch()
    assert yb.shape == (20, 40, 40)
    # nearest neighbour: only the background and the image's own class appear, never an interpolated value
    for mask, label in zip(yb.cpu(), sample.valid_labels[:20]):
        assert set(mask.unique().tolist()) <= {0, int(label) + 1}
        assert (mask == int(label) + 1).float().mean() > 0.1


def test_segmentation_threshold_drops_the_halo_and_keeps_the_garment(sample):
    "Below the threshold the pixel counts fall steeply (halo), above it they are flat (garment): see data.py."
    counts = np.bincount(sample.train_images.reshape(-1), minlength=256)
    assert counts[1] > 5 * counts[GARMENT_THRESHOLD]
    flat = counts[GARMENT_THRESHOLD:64]
    assert flat.max() < 1.5 * flat.min()
    garment = (sample.train_images >= GARMENT_THRESHOLD).mean()
    assert 0.4 < garment < (sample.train_images > 0).mean()


@pytest.mark.parametrize('kwargs,name', [(dict(size=4), 'size'), (dict(bs=0), 'bs'), (dict(channels=2), 'channels'),
                                         (dict(path='/tmp'), 'path'), (dict(seed=-1), 'seed')])
def test_segmentation_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf'^{name}\b|{name}='):
        fashion_segmentation_dls(**kwargs)


def test_segmentation_show_batch_uses_the_codes():
    import matplotlib.pyplot as plt
    fashion_segmentation_dls(bs=8).show_batch(max_n=4)
    assert len(plt.gcf().axes) >= 4
    plt.close('all')


# --- the scenes task: garments on crops of real photographs --------------------------------------------------

@pytest.fixture(scope='module')
def photos():
    return load_scene_photos()


@pytest.fixture(scope='module')
def valid_scenes(sample, photos):
    "Ten validation scenes at the default 64 px."
    return make_fashion_scenes(sample.valid_images, sample.valid_labels, 10, 64, 'valid', seed=3, photos=photos)


def one_garment_scene(garment_row, side, flip=False, colour=(0.5, 0.5, 0.5), brightness=1.0, top=10, left=12):
    "A hand-made recipe: one validation garment at (top, left), `side` px, over a fixed window of the first photo."
    background = BackgroundCrop(photo=0, top=0, left=0, side=80, flip_horizontal=False, flip_vertical=False,
                                brightness=brightness, contrast=1.0, saturation=1.0)
    garment = PlacedGarment(row=garment_row, label=7, top=top, left=left, side=side, flip=flip, colour=colour)
    return SceneRecipe(background, (garment,))


def test_scene_batches_shapes_dtypes_and_codes():
    from fastai.torch_core import TensorMask
    dls = fashion_scenes_dls(size=48, bs=8, n_train=16, n_valid=8, seed=0)
    xb, yb = dls.one_batch()
    assert type(xb) is TensorImage and xb.shape == (8, 3, 48, 48) and xb.dtype == torch.float32
    assert type(yb) is TensorMask and yb.shape == (8, 48, 48) and yb.dtype == torch.int64
    assert 0 <= yb.min() and yb.max() <= 10 and (yb > 0).any() and (yb == 0).any()
    assert list(dls.vocab) == list(SEGMENTATION_CODES) and dls.train.after_item.c == 11
    assert len(dls.train_ds) == 16 and len(dls.valid_ds) == 8


def test_scene_valid_loader_gives_the_rendered_scenes(sample):
    """The loader only converts and normalizes (no resize, no shuffle of the validation set): decoding gives back
    the scenes `make_fashion_scenes` renders, and the masks exactly."""
    dls = fashion_scenes_dls(size=48, bs=6, n_train=12, n_valid=6)
    scenes = make_fashion_scenes(sample.valid_images, sample.valid_labels, 6, 48, 'valid', seed=0)
    xb, yb = dls.valid.one_batch()
    pixels = dls.valid.decode((xb, yb))[0].permute(0, 2, 3, 1).cpu().long()
    assert (pixels - torch.from_numpy(scenes.images).long()).abs().max() <= 1
    np.testing.assert_array_equal(yb.cpu().numpy(), scenes.masks)
    gray_dls = fashion_scenes_dls(size=48, bs=6, n_train=12, n_valid=6, channels=1)
    gray = gray_dls.valid.one_batch()[0]
    assert type(gray) is TensorImageBW and gray.shape == (6, 1, 48, 48)
    reference = np.stack([np.asarray(Image.fromarray(image).convert('L')) for image in scenes.images])
    decoded = gray_dls.valid.decode((gray, yb))[0][:, 0].cpu().long()
    assert (decoded - torch.from_numpy(reference).long()).abs().max() <= 1


def test_scene_normalization_uses_the_training_scenes_statistics(sample):
    dls = fashion_scenes_dls(size=32, bs=20, n_train=20, n_valid=4)
    scenes = make_fashion_scenes(sample.train_images, sample.train_labels, 20, 32, 'train', seed=0)
    normalize = next(t for t in dls.after_batch.fs if isinstance(t, Normalize))
    pixels = scenes.images.reshape(-1, 3) / 255
    assert torch.allclose(normalize.mean.cpu().flatten(), torch.tensor(pixels.mean(0), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(normalize.std.cpu().flatten(), torch.tensor(pixels.std(0), dtype=torch.float32), atol=1e-6)


def test_scenes_are_deterministic_given_the_seed(sample, photos):
    def scenes(n, seed):
        return make_fashion_scenes(sample.train_images, sample.train_labels, n, 32, 'train', seed, photos=photos)
    first, again, longer, other = scenes(6, 1), scenes(6, 1), scenes(9, 1), scenes(6, 2)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.masks, again.masks)
    assert first.recipes == again.recipes
    # scene i has its own generator: asking for more scenes does not change the first ones
    np.testing.assert_array_equal(longer.images[:6], first.images)
    assert longer.recipes[:6] == first.recipes
    assert not np.array_equal(other.images, first.images) and other.recipes != first.recipes
    # the shuffle order is `seed`'s, as in fashion_dls
    batches = [fashion_scenes_dls(size=32, bs=8, n_train=32, n_valid=4, seed=s).train.one_batch()[1] for s in (1, 1, 2)]
    assert torch.equal(batches[0], batches[1]) and not torch.equal(batches[0], batches[2])


def test_train_and_valid_share_no_garment_and_no_background_pixel(sample):
    recipes = {split: [draw_scene(np.random.default_rng(i), split, images, labels, 64, max_garments=3)
                       for i in range(400)]
               for split, images, labels in (('train', sample.train_images, sample.train_labels),
                                             ('valid', sample.valid_images, sample.valid_labels))}
    # garments: the training scenes draw only training images, the validation scenes only validation images,
    # and no validation image equals a training one
    used = {split: [(images[g.row], g.label) for r in recipes[split] for g in r.garments]
            for split, images in (('train', sample.train_images), ('valid', sample.valid_images))}
    for split, labels in (('train', sample.train_labels), ('valid', sample.valid_labels)):
        rows = [g.row for r in recipes[split] for g in r.garments]
        assert all(labels[g.row] == g.label for r in recipes[split] for g in r.garments)
        assert len(set(rows)) > 200  # many different garments, not a few repeated
    train_garments = {image.tobytes() for image, _ in used['train']}
    assert not any(image.tobytes() in train_garments for image, _ in used['valid'])
    # backgrounds: paint every window onto a map of each photo; no photo pixel is in windows of both splits
    covered = {split: np.zeros((2, *SCENE_PHOTO_SHAPE[:2]), bool) for split in recipes}
    for split in recipes:
        for recipe in recipes[split]:
            crop = recipe.background
            covered[split][crop.photo, crop.top:crop.top + crop.side, crop.left:crop.left + crop.side] = True
    assert not (covered['train'] & covered['valid']).any()
    for split in recipes:  # both photos, both splits, and validation sees a fair share of each photo
        assert all(covered[split][photo].mean() > 0.1 for photo in range(2))
    assert 0.12 < covered['valid'].mean() < 0.25 < covered['train'].mean()


def test_scene_tiles_partition_the_photos():
    area = np.zeros(SCENE_PHOTO_SHAPE[:2], int)
    for split in ('train', 'valid'):
        for top, left, bottom, right in scene_tiles(split):
            assert bottom - top >= SCENE_CROP_SIDES[1] and right - left >= SCENE_CROP_SIDES[1]
            area[top:bottom, left:right] += 1
    assert (area == 1).all()
    assert len(scene_tiles('valid')) == 4 and len(scene_tiles('train')) == 16


@pytest.mark.parametrize('flip', [False, True])
def test_a_garment_at_its_own_size_is_labelled_exactly_as_the_fashion_segmentation_task(sample, photos, flip):
    """At 28 px nothing is resized, so the scene's labels must be `fashion_segmentation_dls`'s definition:
    class + 1 where the Fashion-MNIST pixel is >= GARMENT_THRESHOLD, whatever the composite looks like."""
    for row in (0, 1, 2, 3):
        image = sample.valid_images[row][:, ::-1] if flip else sample.valid_images[row]
        _, mask = render_scene(one_garment_scene(row, 28, flip), photos, sample.valid_images, 64)
        expected = np.zeros((64, 64), np.int64)
        expected[10:38, 12:40] = reference_masks(image[None], [7])[0]
        np.testing.assert_array_equal(mask, expected)


def test_scene_labels_follow_the_garment_shape_not_the_brightness(sample, photos):
    row = 5
    looks = [dict(colour=(0.0, 0.0, 0.0), brightness=0.3), dict(colour=(1.0, 1.0, 1.0), brightness=1.25),
             dict(colour=(0.9, 0.1, 0.2), brightness=0.8)]
    rendered = [render_scene(one_garment_scene(row, 37, **look), photos, sample.valid_images, 64) for look in looks]
    for image, mask in rendered[1:]:
        np.testing.assert_array_equal(mask, rendered[0][1])  # same shape, same labels
        assert np.abs(image.astype(int) - rendered[0][0]).mean() > 20  # though the images differ a lot
    # scaled to 37 px, the labels are the garment's own mask scaled (nearest neighbour) up to its edge pixels
    reference = reference_masks(sample.valid_images[row][None], [7])[0]
    scaled = np.asarray(Image.fromarray(reference.astype(np.uint8)).resize((37, 37), Image.NEAREST))
    agreement = (rendered[0][1][10:47, 12:49] == scaled).mean()
    assert agreement > 0.93, agreement
    # brightening or darkening a rendered scene cannot change its labels: they were never computed from it
    scenes = make_fashion_scenes(sample.valid_images, sample.valid_labels, 4, 64, 'valid', photos=photos)
    darker = [render_scene(r._replace(background=r.background._replace(brightness=0.5),
                                      garments=tuple(g._replace(colour=(0.2, 0.2, 0.2)) for g in r.garments)),
                           photos, sample.valid_images, 64) for r in scenes.recipes]
    np.testing.assert_array_equal(np.stack([mask for _, mask in darker]), scenes.masks)


def test_scene_masks_are_the_garments_alphas_painted_in_order(sample, valid_scenes):
    "Recomputing the labels from the generator's alphas (top garment last) gives the mask, and every class is real."
    for recipe, mask in zip(valid_scenes.recipes, valid_scenes.masks):
        expected = np.zeros_like(mask)
        for garment in recipe.garments:
            alpha, _ = garment_tile(sample.valid_images[garment.row], garment.side, garment.flip)
            window = expected[garment.top:garment.top + garment.side, garment.left:garment.left + garment.side]
            window[alpha >= SCENE_LABEL_ALPHA] = garment.label + 1
        np.testing.assert_array_equal(mask, expected)
        assert 1 <= len(recipe.garments) <= 3
        assert set(np.unique(mask)) - {0} == {g.label + 1 for g in recipe.garments}  # none hidden entirely
    assert 0.6 < (valid_scenes.masks == 0).mean() < 0.9  # mostly background, garments are not specks


def test_garment_edges_blend_in_the_garments_own_colour(sample, photos):
    """Fashion-MNIST's edge pixels are the garment faded to black; painted as they are, every garment would get
    a dark outline that marks it whatever its shape. The half-transparent edge carries its neighbours' shade."""
    image = sample.valid_images[0]
    shading = garment_shading(image)
    alpha = garment_alpha(image)
    edge = (alpha > 0) & (alpha < 1)
    opaque = alpha >= 1
    assert edge.any() and shading[edge].mean() > 0.5 * shading[opaque].mean()
    # opaque pixels keep their own texture: the intensity, mapped linearly onto SCENE_MIN_SHADING..1
    assert np.allclose(shading[opaque], SCENE_MIN_SHADING + (1 - SCENE_MIN_SHADING) * image[opaque] / 255)
    assert (shading >= SCENE_MIN_SHADING - 1e-6).all() and shading.max() <= 1
    # a white garment on a white background leaves no dark ring
    recipe = one_garment_scene(0, 28, colour=(1.0, 1.0, 1.0))
    recipe = recipe._replace(background=recipe.background._replace(brightness=10.0))  # clipped to white
    rendered, _ = render_scene(recipe, photos, sample.valid_images, 64)
    ring = np.zeros((64, 64), bool)
    ring[10:38, 12:40] = edge
    assert rendered[ring].min() > 0.5 * 255 * shading[opaque].mean()


@pytest.mark.parametrize('kwargs,name', [
    (dict(size=16), 'size'), (dict(size=64.0), 'size'), (dict(bs=0), 'bs'), (dict(n_train=0), 'n_train'),
    (dict(n_valid=2.5), 'n_valid'), (dict(max_garments=0), 'max_garments'), (dict(channels=2), 'channels'),
    (dict(scene_seed=-1), 'scene_seed'), (dict(seed='a'), 'seed'), (dict(path='/tmp'), 'path'),
    (dict(num_workers=-1), 'num_workers')])
def test_scene_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf'^{name}\b|{name}='):
        fashion_scenes_dls(**kwargs)


def test_make_fashion_scenes_bad_arguments(sample):
    with pytest.raises(ValueError, match="split should be 'train' or 'valid'"):
        make_fashion_scenes(sample.valid_images, sample.valid_labels, 2, split='test')
    with pytest.raises(ValueError, match='equal length'):
        make_fashion_scenes(sample.valid_images, sample.valid_labels[:5], 2)
    with pytest.raises(ValueError, match='^n '):
        make_fashion_scenes(sample.valid_images, sample.valid_labels, 0)


def test_scene_show_batch_uses_the_codes():
    import matplotlib.pyplot as plt
    fashion_scenes_dls(size=32, bs=4, n_train=8, n_valid=4).show_batch(max_n=4)
    assert len(plt.gcf().axes) >= 4
    plt.close('all')
