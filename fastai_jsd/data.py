"""Fashion-MNIST for fastai: a class-balanced sample bundled with the package, or the full set from idx files.

`fashion_dls` is the classification task; `fashion_segmentation_dls` the segmentation task made from the same
images (every garment pixel labelled with its class, the background 0); `fashion_scenes_dls` a segmentation
task of the same garments placed on crops of real photographs, labelled by the garments' shape. None needs a
download.

The sample (5000 training and 1000 validation images, 28x28 gray) lives in `fastai_jsd/_data/` with its
licence and provenance; `examples/make_fashion_sample.py` rebuilds it from the idx files.
"""
import colorsys
import functools
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
from fastai.vision.data import ImageBlock, MaskBlock
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


# --- Fashion scenes: the garments on crops of real photographs ------------------------------------------------
# A garment pixel's opacity (alpha) is its Fashion-MNIST intensity over SCENE_OPAQUE_INTENSITY, at most 1, and the
# pixel is labelled where alpha >= SCENE_LABEL_ALPHA. So a garment drawn at its native 28 px has exactly
# `garment_mask`'s pixels (v >= GARMENT_THRESHOLD), the faint halo blends in half-transparent as anti-aliasing
# without being labelled, and no label depends on how bright the composite image is.
SCENE_OPAQUE_INTENSITY = 2 * GARMENT_THRESHOLD
SCENE_LABEL_ALPHA = 0.5
# Backgrounds: square windows of scikit-learn's two sample photos (427 x 640), each cut into a grid of 4 x 5 tiles
# (106-107 x 128 px). Tile (row, column) is a validation tile when (column - row) % 5 == 0, a diagonal of 4 tiles
# that crosses every kind of texture (the temple, foliage, sky, water; the flower's petals, blurred leaves); the
# 16 others are training tiles. A window lies inside one tile, so no validation background pixel is ever seen in
# training, and both splits draw their windows the same way.
SCENE_PHOTO_SHAPE = (427, 640, 3)
SCENE_TILE_GRID = (4, 5)
SCENE_CROP_SIDES = (48, 106)  # window side in photo pixels (at most a tile's), resized to the scene's size
SCENE_GARMENT_SIDES = (0.4, 0.7)  # a garment's 28 px tile, as a fraction of the scene's side
SCENE_MIN_SHADING = 0.4  # a garment's darkest opaque pixel, as a fraction of its colour (see garment_shading)
SCENE_MAX_OVERLAP = 0.25  # of the smaller garment box's area (see draw_scene)
SCENE_PLACEMENT_TRIES = 20
SCENE_MIN_SIZE = 32  # below it the smallest garment tile would be under 12 px
_SPLIT_CODES = {'train': 0, 'valid': 1}
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, PIL's 'L' conversion


class BackgroundCrop(NamedTuple):
    """Where a scene's background comes from in the photos, and its flips and colour jitter (factors, 1 = none)."""
    photo: int  # 0 china.jpg, 1 flower.jpg: the order of scikit-learn's `load_sample_images()`
    top: int
    left: int
    side: int
    flip_horizontal: bool
    flip_vertical: bool
    brightness: float
    contrast: float
    saturation: float


class PlacedGarment(NamedTuple):
    """One garment of a scene: row `row` of its split's images, its 28 px tile drawn at `side` x `side` at
    (`top`, `left`), mirrored when `flip`, in `colour` (RGB in [0, 1]) shaded by its own intensity."""
    row: int
    label: int  # class 0..9; its pixels get label + 1 in the mask
    top: int
    left: int
    side: int
    flip: bool
    colour: tuple


class SceneRecipe(NamedTuple):
    """Everything random about one scene: its background and its garments in paint order (later on top)."""
    background: BackgroundCrop
    garments: tuple


class FashionScenes(NamedTuple):
    """Rendered scenes: RGB images uint8 [N, size, size, 3], masks uint8 [N, size, size] (0 background, class
    + 1 on garments) and the recipe of each scene."""
    images: np.ndarray
    masks: np.ndarray
    recipes: tuple


def load_scene_photos() -> np.ndarray:
    """scikit-learn's two sample photos (china.jpg, flower.jpg; CC BY 2.0) as uint8 [2, 427, 640, 3], offline."""
    # scikit-learn ships them inside its package and fastai depends on scikit-learn, so they are always there.
    from sklearn.datasets import load_sample_images
    photos = np.stack(load_sample_images().images)
    if photos.shape[1:] != SCENE_PHOTO_SHAPE:
        raise ValueError(f"scikit-learn's sample photos are {list(photos.shape)}, expected 2 x "
                         f"{list(SCENE_PHOTO_SHAPE)}: this scikit-learn ships other photos, and the train/valid "
                         "split of their tiles (SCENE_TILE_GRID) would not hold")
    return photos


def scene_tiles(split: str) -> list:
    """The photo tiles (top, left, bottom, right) that `split`'s background windows are drawn from."""
    _check_split(split)
    row_edges = np.linspace(0, SCENE_PHOTO_SHAPE[0], SCENE_TILE_GRID[0] + 1).round().astype(int)
    column_edges = np.linspace(0, SCENE_PHOTO_SHAPE[1], SCENE_TILE_GRID[1] + 1).round().astype(int)
    return [(int(row_edges[r]), int(column_edges[c]), int(row_edges[r + 1]), int(column_edges[c + 1]))
            for r in range(SCENE_TILE_GRID[0]) for c in range(SCENE_TILE_GRID[1])
            if ((c - r) % SCENE_TILE_GRID[1] == 0) == (split == 'valid')]


def garment_box(image: np.ndarray) -> tuple:
    """(top, left, bottom, right) of the labelled pixels of a 28x28 uint8 garment, in its own pixels."""
    rows, columns = np.nonzero(garment_alpha(image) >= SCENE_LABEL_ALPHA)
    if len(rows) == 0:  # no labelled pixel: the whole tile, so that placement still keeps garments apart
        return 0, 0, 28, 28
    return int(rows.min()), int(columns.min()), int(rows.max()) + 1, int(columns.max()) + 1


def _placed_box(box: tuple, top: int, left: int, side: int, flip: bool) -> tuple:
    """`box` (in 28 px tile pixels) of a garment drawn at `side` x `side` at (`top`, `left`), mirrored if `flip`."""
    box_top, box_left, box_bottom, box_right = box
    if flip:
        box_left, box_right = 28 - box_right, 28 - box_left
    scale = side / 28
    return top + box_top * scale, left + box_left * scale, top + box_bottom * scale, left + box_right * scale


def _box_overlap(a: tuple, b: tuple) -> float:
    """Area shared by two (top, left, bottom, right) boxes, over the smaller box's area."""
    rows = min(a[2], b[2]) - max(a[0], b[0])
    columns = min(a[3], b[3]) - max(a[1], b[1])
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return max(rows, 0) * max(columns, 0) / smaller


def draw_scene(rng: np.random.Generator, split: str, garment_images: np.ndarray, garment_labels: np.ndarray,
               size: int, max_garments: int = 3) -> SceneRecipe:
    """A random scene: a background window inside one of `split`'s photo tiles, then 1..`max_garments` garments
    drawn from the rows of `garment_images`/`garment_labels` (the split's own) at random places, sizes and colours.

    A garment goes where the box around its labelled pixels overlaps no earlier garment's box by more than
    SCENE_MAX_OVERLAP of the smaller box; when none of SCENE_PLACEMENT_TRIES places does, it is left out, so
    every garment keeps most of its shape in view.
    """
    tiles = scene_tiles(split)
    tile_top, tile_left, tile_bottom, tile_right = tiles[rng.integers(len(tiles))]
    side = int(rng.integers(SCENE_CROP_SIDES[0], SCENE_CROP_SIDES[1] + 1))
    background = BackgroundCrop(
        photo=int(rng.integers(2)), top=int(rng.integers(tile_top, tile_bottom - side + 1)),
        left=int(rng.integers(tile_left, tile_right - side + 1)), side=side,
        flip_horizontal=bool(rng.random() < 0.5), flip_vertical=bool(rng.random() < 0.5),
        brightness=float(rng.uniform(0.75, 1.25)), contrast=float(rng.uniform(0.75, 1.25)),
        saturation=float(rng.uniform(0.5, 1.5)))
    garments, boxes = [], []
    for _ in range(int(rng.integers(1, max_garments + 1))):
        row = int(rng.integers(len(garment_labels)))
        tile = int(round(rng.uniform(*SCENE_GARMENT_SIDES) * size))
        flip = bool(rng.random() < 0.5)
        for _ in range(SCENE_PLACEMENT_TRIES):
            top, left = (int(v) for v in rng.integers(0, size - tile + 1, size=2))
            box = _placed_box(garment_box(garment_images[row]), top, left, tile, flip)
            if all(_box_overlap(box, other) <= SCENE_MAX_OVERLAP for other in boxes):
                break
        else:
            continue
        # Any hue, gray to fully saturated, never near black: the garment's own shading darkens it further.
        colour = tuple(float(c) for c in colorsys.hsv_to_rgb(rng.random(), rng.random(), rng.uniform(0.35, 1)))
        garments.append(PlacedGarment(row=row, label=int(garment_labels[row]), top=top, left=left, side=tile,
                                      flip=flip, colour=colour))
        boxes.append(box)
    return SceneRecipe(background, tuple(garments))


def _resized(plane: np.ndarray, side: int) -> np.ndarray:
    """A float32 [H, W] plane resized to `side` x `side` by PIL's bilinear filter (antialiased when shrinking)."""
    return np.asarray(Image.fromarray(plane.astype(np.float32)).resize((side, side), Image.BILINEAR))


def garment_alpha(image: np.ndarray) -> np.ndarray:
    """Opacity of each pixel of a 28x28 uint8 garment: intensity / SCENE_OPAQUE_INTENSITY, at most 1."""
    return np.minimum(np.asarray(image, dtype=np.float32) / SCENE_OPAQUE_INTENSITY, 1)


def _window_sums(plane: np.ndarray, radius: int = 2) -> np.ndarray:
    """Sum of each pixel's (2 * radius + 1)^2 neighbourhood (zeros outside), as two separable passes."""
    width = 2 * radius + 1
    padded = np.pad(plane, radius)
    rows = sum(padded[i:i + plane.shape[0]] for i in range(width))
    return sum(rows[:, j:j + plane.shape[1]] for j in range(width))


def garment_shading(image: np.ndarray) -> np.ndarray:
    """Brightness of each pixel of a 28x28 uint8 garment's own colour, SCENE_MIN_SHADING..1: the pixel's
    intensity mapped onto that range where it is opaque, elsewhere the mean of the opaque pixels within 2 px
    (its own if there are none).

    Fashion-MNIST's edge pixels are the garment faded into black; painted with their own intensity, every
    garment would get a dark outline, a cue that has nothing to do with its shape. With its neighbours'
    shading, the half-transparent edge blends the garment's own colour into the background instead. The floor
    keeps the garment's texture but not its near-black parts: a black pullover would be a hole in any dark
    photo, while its colour (see `draw_scene`) can still make it dark.
    """
    intensity = np.asarray(image, dtype=np.float32) / 255
    shading = SCENE_MIN_SHADING + (1 - SCENE_MIN_SHADING) * intensity
    opaque = (garment_alpha(image) >= 1).astype(np.float32)
    counts = _window_sums(opaque)
    nearby = _window_sums(shading * opaque) / np.maximum(counts, 1)
    return np.where((opaque == 1) | (counts == 0), shading, nearby).astype(np.float32)


def garment_tile(image: np.ndarray, side: int, flip: bool) -> tuple:
    """The alpha and the shading of a 28x28 garment, resized to `side` and mirrored if `flip`."""
    image = np.asarray(image)[:, ::-1] if flip else np.asarray(image)
    return _resized(garment_alpha(image), side), _resized(garment_shading(image), side)


def render_background(crop: BackgroundCrop, photos: np.ndarray, size: int) -> np.ndarray:
    """The background of a scene: float32 RGB [size, size, 3] in [0, 1]."""
    window = photos[crop.photo, crop.top:crop.top + crop.side, crop.left:crop.left + crop.side]
    if crop.flip_horizontal:
        window = window[:, ::-1]
    if crop.flip_vertical:
        window = window[::-1]
    resized = Image.fromarray(np.ascontiguousarray(window)).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32) / 255
    gray = pixels @ _LUMA
    pixels = gray[..., None] + crop.saturation * (pixels - gray[..., None])
    pixels = gray.mean() + crop.contrast * (pixels - gray.mean())
    return np.clip(pixels * crop.brightness, 0, 1)


def render_scene(recipe: SceneRecipe, photos: np.ndarray, garment_images: np.ndarray, size: int) -> tuple:
    """The image (uint8 RGB [size, size, 3]) and mask (uint8 [size, size]) of `recipe`.

    Each garment is painted over what is there, composite = alpha * colour * shading + (1 - alpha) * below, and
    its pixels with alpha >= SCENE_LABEL_ALPHA take its label + 1 (a garment on top hides the labels below).
    The mask is computed from the alphas alone, never from the image.
    """
    canvas = render_background(recipe.background, photos, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    for garment in recipe.garments:
        alpha, shading = garment_tile(garment_images[garment.row], garment.side, garment.flip)
        window = (slice(garment.top, garment.top + garment.side), slice(garment.left, garment.left + garment.side))
        paint = shading[..., None] * np.asarray(garment.colour, dtype=np.float32)
        canvas[window] = alpha[..., None] * paint + (1 - alpha[..., None]) * canvas[window]
        mask[window][alpha >= SCENE_LABEL_ALPHA] = garment.label + 1
    return (canvas * 255).round().astype(np.uint8), mask


def _check_split(split):
    if split not in _SPLIT_CODES:
        raise ValueError(f"split should be 'train' or 'valid' (which photo tiles and which seed stream the "
                         f"scenes use), got {split!r}")


def make_fashion_scenes(garment_images: np.ndarray, garment_labels: np.ndarray, n: int, size: int = 64,
                        split: str = 'train', seed: int = 0, max_garments: int = 3, photos=None) -> FashionScenes:
    """`n` scenes of `split`: garments from `garment_images`/`garment_labels` (uint8 [N, 28, 28], [N]) on
    background windows of that split's photo tiles.

    Scene i is drawn from its own generator, `np.random.default_rng([seed, split code, i])`, so it is the same
    whatever `n` is, and the training and validation streams never share a draw.
    """
    _check_split(split)
    _check_int('n', n, 1)
    _check_int('size', size, SCENE_MIN_SIZE)
    _check_int('seed', seed, 0)
    _check_int('max_garments', max_garments, 1)
    if len(garment_images) != len(garment_labels) or len(garment_images) == 0:
        raise ValueError(f"garment_images and garment_labels should be non-empty and of equal length, got "
                         f"{len(garment_images)} and {len(garment_labels)}")
    photos = load_scene_photos() if photos is None else photos
    recipes = tuple(draw_scene(np.random.default_rng([seed, _SPLIT_CODES[split], index]), split, garment_images,
                               garment_labels, size, max_garments) for index in range(n))
    rendered = [render_scene(recipe, photos, garment_images, size) for recipe in recipes]
    return FashionScenes(images=np.stack([image for image, _ in rendered]),
                         masks=np.stack([mask for _, mask in rendered]), recipes=recipes)


def scene_items(scenes: tuple) -> list:
    """(image, mask) pairs of the training then the validation `FashionScenes`: the items of `fashion_scenes_dls`."""
    return [pair for split in scenes for pair in zip(split.images, split.masks)]


def _channel_stats(images: np.ndarray) -> tuple:
    """Per-channel mean and standard deviation on the 0..1 scale of uint8 images [N, H, W, C] (or [N, H, W])."""
    planes = [images] if images.ndim == 3 else [images[..., c] for c in range(images.shape[-1])]
    stats = [pixel_stats(plane) for plane in planes]
    return [mean for mean, _ in stats], [std for _, std in stats]


def _gray_images(images: np.ndarray) -> np.ndarray:
    """uint8 RGB [N, H, W, 3] to uint8 gray [N, H, W] by PIL's own 'L' conversion."""
    return np.stack([np.asarray(Image.fromarray(image).convert('L')) for image in images])


@functools.lru_cache(maxsize=2)
def _rendered_scenes(size, n_train, n_valid, max_garments, full, path, channels, scene_seed) -> tuple:
    """The training and validation `FashionScenes` of `fashion_scenes_dls` (read-only) and the training images'
    per-channel statistics, rendered once per process for each setting: a script that builds the same
    DataLoaders for several models pays for the rendering once."""
    arrays = load_fashion_mnist(path) if full else load_fashion_sample()
    photos = load_scene_photos()
    scenes = (make_fashion_scenes(arrays.train_images, arrays.train_labels, n_train, size, 'train', scene_seed,
                                  max_garments, photos),
              make_fashion_scenes(arrays.valid_images, arrays.valid_labels, n_valid, size, 'valid', scene_seed,
                                  max_garments, photos))
    if channels == 1:
        scenes = tuple(split._replace(images=_gray_images(split.images)) for split in scenes)
    for split in scenes:
        split.images.flags.writeable = False
        split.masks.flags.writeable = False
    return scenes, _channel_stats(scenes[0].images)


def fashion_scenes_dls(size=64, bs=64, n_train=4000, n_valid=500, max_garments=3, full=False, path=None,
                       channels=3, num_workers=0, seed=None, scene_seed=0, device=None) -> DataLoaders:
    """fastai segmentation `DataLoaders` of Fashion-MNIST garments on crops of real photographs, `codes` =
    SEGMENTATION_CODES (0 background, class + 1 on a garment's pixels); for `unet_learner`, no download needed.

    Each `size` x `size` scene is a window of one of scikit-learn's two sample photos (random place and side
    48-106 px, flips, brightness/contrast/saturation jitter) with 1..`max_garments` garments painted over it at
    random places, sizes (40-70% of the side) and colours, shaded by their own Fashion-MNIST intensity. Labels
    come from each garment's shape (its alpha, from the original 28 px intensity: see SCENE_OPAQUE_INTENSITY),
    not from the composite's brightness, so every corruption in SEGMENTATION_CORRUPTIONS leaves them valid.

    Training and validation share nothing: validation garments are the sample's validation images (the t10k
    file's, `full=True`: all of them), training garments its training images; each photo is cut into 4 x 5 tiles,
    and validation backgrounds are windows of a diagonal of 4 of them, training ones of the 16 others
    (SCENE_TILE_GRID, `scene_tiles`). The `n_train` and `n_valid` scenes are rendered once per process (about
    2 ms each) and fixed by `scene_seed` (the same data set for everyone by default); `seed` is the training
    loader's shuffle order, as in `fashion_dls`. Images are normalized with the training scenes' per-channel
    statistics; `channels=1` turns the scenes gray.
    """
    _check_int('size', size, SCENE_MIN_SIZE)
    _check_dls_args(size, bs, full, path, channels, num_workers, seed)
    _check_int('n_train', n_train, 1)
    _check_int('n_valid', n_valid, 1)
    _check_int('max_garments', max_garments, 1)
    _check_int('scene_seed', scene_seed, 0)
    scenes, (mean, std) = _rendered_scenes(size, n_train, n_valid, max_garments, full, path, channels, scene_seed)
    block = DataBlock(blocks=(ImageBlock(PILImageBW if channels == 1 else PILImage),
                              MaskBlock(codes=list(SEGMENTATION_CODES))),
                      get_items=scene_items, get_x=ItemGetter(0), get_y=ItemGetter(1),
                      splitter=IndexSplitter(range(n_train, n_train + n_valid)),
                      batch_tfms=Normalize.from_stats(mean, std))
    dls = _dataloaders(block, scenes, bs, num_workers, device, seed)
    dls.vocab = list(SEGMENTATION_CODES)  # as fastai's segmentation tutorial does; MaskBlock only sets `c`
    return dls
