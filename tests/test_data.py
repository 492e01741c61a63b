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
from fastai_jsd.data import (DEBIAN_FASHION_DIR, FASHION_CLASSES, GARMENT_THRESHOLD, SAMPLE_PATH, SEGMENTATION_CODES,
                             as_gray_image, as_rgb_image, fashion_dls, fashion_segmentation_dls, load_fashion_mnist,
                             load_fashion_sample, pixel_stats, read_idx)

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
