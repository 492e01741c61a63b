"""Fashion-MNIST for fastai: a class-balanced sample bundled with the package, or the full set from idx files.

`fashion_dls` is the classification task; `fashion_segmentation_dls` the segmentation task made from the same
images (every garment pixel labelled with its class, the background 0), so both need no download.

The sample (5000 training and 1000 validation images, 28x28 gray) lives in `fastai_jsd/_data/` with its
licence and provenance; `examples/make_fashion_sample.py` rebuilds it from the idx files.
"""
import gzip
import math
import random
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
from fastai.data.block import CategoryBlock, DataBlock, TransformBlock
from fastai.data.core import DataLoaders
from fastai.data.transforms import IndexSplitter, IntToFloatTensor, ItemGetter, Normalize
from fasttransform import ItemTransform
from fastai.vision.augment import Resize
from fastai.vision.core import PILImage, PILImageBW
from fastai.vision.data import MaskBlock
from PIL import Image
from torch import Tensor

# Label i of the idx files is FASHION_CLASSES[i] (Fashion-MNIST README); the vocab keeps this order.
FASHION_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                   'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
# Segmentation codes: mask value 0 is the background, value i + 1 a pixel of a garment of class i.
SEGMENTATION_CODES = ('background',) + FASHION_CLASSES
# A pixel belongs to the garment when its value is >= 8 (3% of full scale). The background is exactly 0 (half of
# all pixels of the sample); values 1..7 are the faint halo the dataset's downscaling left around the garments:
# their counts fall steeply from 1 to 8 (40000 pixels at 1, 4300 at 8 in the training sample) and stay flat
# above, where the garments' own pixels are. So 8 drops the halo and keeps the darkest parts of dark garments.
GARMENT_THRESHOLD = 8
DEBIAN_FASHION_DIR = Path('/usr/share/datasets/fashion-mnist')
SAMPLE_PATH = Path(__file__).parent / '_data' / 'fashion_mnist_sample.npz'
IDX_NAMES = {'train_images': 'train-images-idx3-ubyte', 'train_labels': 'train-labels-idx1-ubyte',
             'valid_images': 't10k-images-idx3-ubyte', 'valid_labels': 't10k-labels-idx1-ubyte'}
SAMPLE_KEYS = ('train_images', 'train_labels', 'valid_images', 'valid_labels', 'train_indices', 'valid_indices')

_GET_DATA_HINT = ("Get the full set with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, installs "
                  f"{DEBIAN_FASHION_DIR}), or download the four idx files from "
                  "https://github.com/zalandoresearch/fashion-mnist and pass path=<their folder>; "
                  "fashion_dls(full=False) uses the sample bundled with fastai_jsd instead.")


class FashionArrays(NamedTuple):
    """Fashion-MNIST as uint8 arrays: images [N, 28, 28] (0 = black background), labels [N] in 0..9."""
    train_images: np.ndarray
    train_labels: np.ndarray
    valid_images: np.ndarray
    valid_labels: np.ndarray


def read_idx(file) -> np.ndarray:
    """Read an idx file of unsigned bytes (gzipped or not) into a uint8 array of the shape its header gives."""
    file = Path(file)
    raw = file.read_bytes()
    if raw[:2] == b'\x1f\x8b':  # gzip magic: the Debian package and the upstream downloads are gzipped
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{file} is not a readable gzip file ({error}); the file is damaged. "
                             + _GET_DATA_HINT) from error
    # idx header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[:2] != b'\0\0' or raw[2] != 0x08 or raw[3] == 0:
        raise ValueError(f"{file} is not an idx file of unsigned bytes (header {raw[:4].hex() or 'empty'}, "
                         "expected 0000 08 <ndim>); the file is damaged or of another kind. " + _GET_DATA_HINT)
    ndim = raw[3]
    header_size = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype='>u4', count=ndim, offset=4)) \
        if len(raw) >= header_size else ()
    if not shape or len(raw) - header_size != math.prod(shape):
        raise ValueError(f"{file} is truncated or damaged: its header promises shape {shape or '?'} but it holds "
                         f"{max(len(raw) - header_size, 0)} bytes of data. " + _GET_DATA_HINT)
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_idx_file(folder: Path, name: str):
    """The gzipped or the plain idx file `name` in `folder`, or None."""
    for candidate in (folder / f'{name}.gz', folder / name):
        if candidate.is_file():
            return candidate
    return None


def _check_arrays(arrays: dict, source) -> FashionArrays:
    """Validate shapes, dtypes and labels of one train/valid split; ValueError naming `source` otherwise."""
    for split in ('train', 'valid'):
        images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise ValueError(f"{source}: {split} images should be uint8 [N, 28, 28], got {images.dtype} "
                             f"{list(images.shape)}. " + _GET_DATA_HINT)
        if labels.dtype != np.uint8 or labels.shape != (len(images),):
            raise ValueError(f"{source}: {split} labels should be uint8 [{len(images)}] to match the images, "
                             f"got {labels.dtype} {list(labels.shape)}. " + _GET_DATA_HINT)
        if len(labels) and labels.max() >= len(FASHION_CLASSES):
            raise ValueError(f"{source}: {split} label {int(labels.max())} is out of range 0..9. " + _GET_DATA_HINT)
    return FashionArrays(*(arrays[key] for key in FashionArrays._fields))


def load_fashion_mnist(path=None) -> FashionArrays:
    """The full Fashion-MNIST (60000 train, 10000 t10k as valid) from the idx files in `path` (default: Debian's)."""
    folder = DEBIAN_FASHION_DIR if path is None else Path(path)
    files = {key: _find_idx_file(folder, name) for key, name in IDX_NAMES.items()}
    missing = [f'{IDX_NAMES[key]}(.gz)' for key, file in files.items() if file is None]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST idx files not found in {folder}: missing {', '.join(missing)}. "
                                + _GET_DATA_HINT)
    return _check_arrays({key: read_idx(file) for key, file in files.items()}, folder)


def load_fashion_sample(path=None) -> FashionArrays:
    """The bundled class-balanced sample: 500 training and 100 validation images per class, as uint8 arrays."""
    file = SAMPLE_PATH if path is None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"Fashion-MNIST sample not found at {file}. The bundled file ships with fastai_jsd "
                                "(reinstall it), and examples/make_fashion_sample.py rebuilds it from the idx files. "
                                + _GET_DATA_HINT)
    try:
        with np.load(file, allow_pickle=False) as archive:
            missing = [key for key in SAMPLE_KEYS if key not in archive.files]
            if missing:
                raise ValueError(f"{file} lacks the arrays {missing}; it is not a Fashion-MNIST sample made by "
                                 "examples/make_fashion_sample.py. " + _GET_DATA_HINT)
            arrays = {key: archive[key] for key in SAMPLE_KEYS}
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{file} is not a readable .npz archive ({error}); the file is damaged. Rebuild it with "
                         "examples/make_fashion_sample.py or reinstall fastai_jsd. " + _GET_DATA_HINT) from error
    return _check_arrays(arrays, file)


def pixel_stats(images: np.ndarray) -> tuple:
    """Mean and standard deviation of uint8 pixels on the 0..1 scale that `IntToFloatTensor` produces."""
    # A histogram gives exact statistics without a float copy of the 47M pixels of the full set; bincount
    # casts to int64, so counting 1000 images at a time keeps that copy small and in cache (14x faster).
    counts = np.zeros(256, dtype=np.float64)
    for start in range(0, len(images), 1000):
        counts += np.bincount(images[start:start + 1000].reshape(-1), minlength=256)
    levels = np.arange(256) / 255
    mean = counts @ levels / counts.sum()
    variance = counts @ (levels - mean) ** 2 / counts.sum()
    return float(mean), float(math.sqrt(variance))


def _gray_pil(image) -> Image.Image:
    """A mode 'L' PIL image from a PIL image, a uint8 array/tensor ([H, W], [H, W, C] or [C, H, W]) or a file."""
    if isinstance(image, (str, Path)):
        image = Image.open(image)
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)  # channels first, as torch and fastai store images
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"image array should be uint8 (0..255, like Fashion-MNIST's idx files), got {image.dtype};"
                            " convert it with (array * 255).round().astype(np.uint8) if it holds 0..1 floats")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(f"image array should be [H, W], [H, W, 1|3|4] or [1|3|4, H, W], got {list(image.shape)}")
        image = Image.fromarray(np.ascontiguousarray(image))
    return image.convert('L')


def as_gray_image(image: np.ndarray | Image.Image | Tensor | str | Path) -> PILImageBW:
    """One-channel fastai image from a Fashion-MNIST array or any PIL image, array or file (colour goes to gray)."""
    return PILImageBW.create(_gray_pil(image))


def as_rgb_image(image: np.ndarray | Image.Image | Tensor | str | Path) -> PILImage:
    """Three-channel fastai image with the gray value in every channel, for models built for RGB input."""
    # Colour inputs go through gray first: the model only ever saw replicated gray, so `predict` on a
    # colour photo must see the same kind of image, not a colour one it was never trained on.
    return PILImage.create(_gray_pil(image).convert('RGB'))


def labelled_items(arrays: FashionArrays) -> list:
    """(28x28 uint8 image, class name) pairs, training images first: the items of `fashion_dls`."""
    images = [*arrays.train_images, *arrays.valid_images]
    labels = np.concatenate([arrays.train_labels, arrays.valid_labels])
    return [(image, FASHION_CLASSES[label]) for image, label in zip(images, labels)]


def _check_int(name: str, value, minimum: int):
    """ValueError naming `name` unless `value` is an int >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} should be an int >= {minimum}, got {value!r}")


def _check_dls_args(size, bs, full, path, channels, num_workers, seed):
    """All argument errors of `fashion_dls`, raised before any file is read."""
    _check_int('size', size, 8)
    _check_int('bs', bs, 1)
    _check_int('num_workers', num_workers, 0)
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels not in (1, 3):
        raise ValueError(f"channels should be 1 (gray, use vision_learner(..., n_in=1)) or 3 (gray replicated to "
                         f"RGB, for any ImageNet architecture), got {channels!r}")
    if not isinstance(full, bool):
        raise ValueError(f"full should be True (the 60000/10000 idx files) or False (the bundled sample), got {full!r}")
    if path is not None and not full:
        raise ValueError(f"path={str(path)!r} names a folder of idx files, which only the full set reads: pass "
                         "full=True with it, or drop path to use the bundled sample")
    if seed is not None:
        _check_int('seed', seed, 0)


def class_items(arrays: FashionArrays) -> list:
    """(28x28 uint8 image, label 0..9) pairs, training images first: the items of `fashion_segmentation_dls`."""
    images = [*arrays.train_images, *arrays.valid_images]
    labels = np.concatenate([arrays.train_labels, arrays.valid_labels])
    return list(zip(images, labels.tolist()))


def garment_mask(image: np.ndarray, label: int) -> np.ndarray:
    """The segmentation mask of one Fashion-MNIST image: `label + 1` where the pixel is >= GARMENT_THRESHOLD, else 0."""
    return np.where(np.asarray(image) >= GARMENT_THRESHOLD, label + 1, 0).astype(np.uint8)


class GarmentMask(ItemTransform):
    """`get_y` of `fashion_segmentation_dls`: the `garment_mask` of an (image, label) item.

    An `ItemTransform`, as `ItemGetter` is: a plain function would be mapped over the tuple's elements.
    """
    def encodes(self, item):  # no annotation: fasttransform would dispatch on it and pass tuples through
        return garment_mask(item[0], item[1])


def _fashion_block(arrays: FashionArrays, size, channels, target_block, get_items, get_y) -> DataBlock:
    """The DataBlock of both Fashion-MNIST tasks: gray or RGB images resized to `size`, normalized with the
    training images' own statistics, the official validation images as the validation set, and `target_block`."""
    mean, std = pixel_stats(arrays.train_images)
    n_train, n_valid = len(arrays.train_images), len(arrays.valid_images)
    return DataBlock(
        blocks=(TransformBlock(type_tfms=as_rgb_image if channels == 3 else as_gray_image,
                               batch_tfms=IntToFloatTensor), target_block),
        get_items=get_items, get_x=ItemGetter(0), get_y=get_y,
        splitter=IndexSplitter(range(n_train, n_train + n_valid)),
        item_tfms=Resize(size),
        batch_tfms=Normalize.from_stats([mean] * channels, [std] * channels))


def _dataloaders(block: DataBlock, arrays: FashionArrays, bs, num_workers, device, seed) -> DataLoaders:
    """`block`'s DataLoaders over `arrays`, with the training loader's own shuffle RNG when `seed` is given."""
    # The arrays, not a list of 6000 items, are the source: DataBlock formats its source into a
    # log message even when not verbose, and numpy summarises a big array but not a list of small ones.
    dls = block.dataloaders(arrays, bs=bs, num_workers=num_workers, device=device)
    if seed is not None:
        # fastai's DataLoader shuffles with its own `random.Random`, reseeded from itself every epoch.
        dls.train.rng = random.Random(seed)
    return dls


def fashion_dls(size=32, bs=64, full=False, path=None, channels=3, num_workers=0, seed=None,
                device=None) -> DataLoaders:
    """fastai `DataLoaders` of Fashion-MNIST: the bundled sample, or with `full=True` the 60000/10000 idx files.

    Images are resized to `size` and normalized with the training set's own pixel statistics; the vocab
    is `FASHION_CLASSES` in label order. `channels=3` replicates gray into RGB so `vision_learner(dls,
    resnet18)` works unchanged; `channels=1` is for `vision_learner(..., n_in=1)`. `seed=None` shuffles
    with fastai's usual RNG (seeded by `set_seed`); an int gives the training loader its own RNG.
    `num_workers=0` because items are in-memory arrays: worker processes cost more than they save.
    """
    _check_dls_args(size, bs, full, path, channels, num_workers, seed)
    arrays = load_fashion_mnist(path) if full else load_fashion_sample()
    block = _fashion_block(arrays, size, channels, CategoryBlock(vocab=list(FASHION_CLASSES), sort=False),
                           get_items=labelled_items, get_y=ItemGetter(1))
    return _dataloaders(block, arrays, bs, num_workers, device, seed)


def fashion_segmentation_dls(size=32, bs=64, full=False, path=None, channels=3, num_workers=0, seed=None,
                             device=None) -> DataLoaders:
    """fastai segmentation `DataLoaders` of Fashion-MNIST: every garment pixel labelled with its class (1..10),
    the background 0, with `codes` = SEGMENTATION_CODES; for `unet_learner`, no download needed.

    The mask comes from the 28x28 image itself: pixels >= GARMENT_THRESHOLD (8 of 255) are the garment (see
    GARMENT_THRESHOLD for why 8). Images and masks are resized together to `size` (the masks by nearest
    neighbour, as fastai does for `TensorMask`); 32, the default, suits a U-Net that halves the size 5 times.
    The other arguments are `fashion_dls`'s: the bundled sample or `full=True` idx files, `channels=3` gray
    replicated to RGB, normalization with the training set's pixel statistics, `seed` for the shuffle order.
    """
    _check_dls_args(size, bs, full, path, channels, num_workers, seed)
    arrays = load_fashion_mnist(path) if full else load_fashion_sample()
    block = _fashion_block(arrays, size, channels, MaskBlock(codes=list(SEGMENTATION_CODES)),
                           get_items=class_items, get_y=GarmentMask())
    dls = _dataloaders(block, arrays, bs, num_workers, device, seed)
    dls.vocab = list(SEGMENTATION_CODES)  # as fastai's segmentation tutorial does; MaskBlock only sets `c`
    return dls
