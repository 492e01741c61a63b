"""Rebuild fastai_jsd/_data/fashion_mnist_sample.npz from the Fashion-MNIST idx files, deterministically.

    python examples/make_fashion_sample.py                      # reads Debian's dataset-fashion-mnist
    python examples/make_fashion_sample.py --source DIR --out sample.npz

Draws 500 training images per class from train-images-idx3-ubyte and 100 validation images per class
from t10k-images-idx3-ubyte with numpy's PCG64 generator seeded with --seed, keeps them in file order,
and writes a zip with fixed timestamps so the same inputs give the same bytes.
"""
import argparse
import io
import zipfile
from pathlib import Path

import numpy as np

from fastai_jsd.data import DEBIAN_FASHION_DIR, FASHION_CLASSES, SAMPLE_PATH, load_fashion_mnist


def balanced_indices(labels, per_class, rng) -> np.ndarray:
    """Sorted indices of `per_class` images of every class, each class drawn without replacement."""
    chosen = [rng.choice(np.flatnonzero(labels == label), size=per_class, replace=False)
              for label in range(len(FASHION_CLASSES))]
    return np.sort(np.concatenate(chosen))


def write_npz(file, arrays: dict):
    """`np.savez_compressed` with a fixed timestamp per member, so a rebuild gives identical bytes."""
    with zipfile.ZipFile(file, 'w') as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            member = zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(member, buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def make_sample(source, train_per_class=500, valid_per_class=100, seed=0) -> dict:
    """The sample's arrays: images, labels and their indices in the source idx files."""
    full = load_fashion_mnist(source)
    rng = np.random.default_rng(seed)
    train_indices = balanced_indices(full.train_labels, train_per_class, rng)
    valid_indices = balanced_indices(full.valid_labels, valid_per_class, rng)
    # Indices fit uint16 (< 65536) and make the sample auditable without rerunning the draw.
    return {'train_images': full.train_images[train_indices], 'train_labels': full.train_labels[train_indices],
            'valid_images': full.valid_images[valid_indices], 'valid_labels': full.valid_labels[valid_indices],
            'train_indices': train_indices.astype(np.uint16), 'valid_indices': valid_indices.astype(np.uint16)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--source', type=Path, default=DEBIAN_FASHION_DIR,
                        help='folder with the four (gzipped) idx files (default: %(default)s)')
    parser.add_argument('--out', type=Path, default=SAMPLE_PATH, help='the .npz to write (default: %(default)s)')
    parser.add_argument('--train-per-class', type=int, default=500)
    parser.add_argument('--valid-per-class', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    arrays = make_sample(args.source, args.train_per_class, args.valid_per_class, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_npz(args.out, arrays)
    print(f"wrote {args.out}: {len(arrays['train_labels'])} train + {len(arrays['valid_labels'])} valid images, "
          f"{args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == '__main__':
    main()
