"""How close `fastai_jsd.robustness.corrupt` comes to the published benchmarks' own generator scripts.

    python examples/benchmark_fidelity.py --reference /path/to/robustness     # a checkout of hendrycks/robustness
    python examples/benchmark_fidelity.py --reference ... --benchmarks imagenet-c --corruptions glass_blur frost

For each benchmark (CIFAR-10-C at 32 px, Tiny-ImageNet-C at 64 px, ImageNet-C at 224 px), corruption and
severity, both implementations corrupt the same real-photo crops (scikit-learn's two sample photos, no
download) and each output is stored as the published files were: `np.uint8` (truncation) for CIFAR-10-C,
`np.uint8` then a JPEG save at quality 85 for the other two (the reference scripts' `DistortImageFolder`;
ours with `published_jpeg=True`, whose CPU path is PIL's). Per cell it prints the mean absolute change
against the clean crops, ours / reference, and the PSNR difference (ours - reference, dB). Random
corruptions run several seeds on both sides; "seed spread" is the reference's own range over seeds.
Not a test dependency: it needs the reference scripts' packages.

The reference scripts are the generator scripts as published (`ImageNet-C/create_c/make_*_c.py`), run
unedited: their module code executes in a namespace until its dataset-writing tail fails on the authors'
paths (in an empty working directory, so nothing is read or written), with compatibility shims for the
names that today's numpy / scikit-image / scipy removed, installed before (`np.float_`, binary
`np.fromstring`, `gaussian(multichannel=...)`). Their dependencies, next to this package's:

    apt-get install -y libmagickwand-dev                       # ImageMagick, for motion blur and snow
    pip install Wand scikit-image opencv-python-headless scipy
"""
import argparse
import contextlib
import io
import math
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastai_jsd.robustness import BENCHMARKS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt

SCRIPTS = {'cifar10-c': 'make_cifar_c.py', 'tiny-imagenet-c': 'make_tinyimagenet_c.py',
           'imagenet-c': 'make_imagenet_c.py'}
SIZES = {'cifar10-c': 32, 'tiny-imagenet-c': 64, 'imagenet-c': 224}
SAVED_AS_JPEG = {'cifar10-c': False, 'tiny-imagenet-c': True, 'imagenet-c': True}
DETERMINISTIC = {'defocus_blur', 'zoom_blur', 'brightness', 'contrast', 'pixelate', 'jpeg_compression',
                 'gaussian_blur', 'saturate'}
# Corruptions whose strength varies much from image to image (which frost photograph, how far the affine
# moves, how the plasma's range falls on the image): 4x the seeds, so that the two sides' means are comparable
# (with 3 seeds and 14 crops, fog's mean moves by about 5 % from run to run on either side).
HIGH_VARIANCE = {'frost': 4, 'elastic_transform': 4, 'fog': 4}
# The reference's glass blur is a Python loop over every pixel, about 10 s per 224 px image: ImageNet-C's
# uses the first 4 crops and 2 seeds (its strength varies little between images).
SLOW_REFERENCE = {('imagenet-c', 'glass_blur'): (4, 2)}


# --------------------------------------------------------------------------------------------- the reference

def install_shims():
    """Restore the names the scripts use that numpy 2, scikit-image >= 0.21 and scipy removed or renamed."""
    if not hasattr(np, 'float_'):
        np.float_ = np.float64
    original_fromstring = np.fromstring

    def fromstring(data, dtype=float, count=-1, *, sep='', **kwargs):
        if sep == '':  # binary mode, removed in numpy 2: the scripts decode ImageMagick's blobs with it
            return np.frombuffer(data, dtype=dtype, count=count).copy()
        return original_fromstring(data, dtype=dtype, count=count, sep=sep, **kwargs)
    np.fromstring = fromstring

    import skimage.filters
    original_gaussian = skimage.filters.gaussian
    if getattr(original_gaussian, '__name__', '') != 'gaussian_multichannel':
        def gaussian_multichannel(image, sigma=1, *args, multichannel=None, **kwargs):
            if multichannel:
                kwargs.setdefault('channel_axis', -1)
            kwargs.setdefault('preserve_range', False)
            return original_gaussian(image, sigma, *args, **kwargs)
        skimage.filters.gaussian = gaussian_multichannel
    try:
        import scipy.ndimage.interpolation  # noqa: F401  (deprecated; the scripts import map_coordinates from it)
    except ImportError:
        import scipy.ndimage
        sys.modules['scipy.ndimage.interpolation'] = scipy.ndimage


def load_reference(create_c, script):
    """Run one generator script's module code and return its namespace (the corruption functions).

    The script's tail starts writing the dataset (reading ImageNet from the authors' paths); it runs in an
    empty temporary directory, fails at its first file access, and the functions defined before stay.
    """
    source = (create_c / script).read_text()
    module = types.ModuleType(script[:-3])
    module.__file__ = str(create_c / script)
    with tempfile.TemporaryDirectory() as empty, working_directory(empty), \
            contextlib.redirect_stdout(io.StringIO()):
        try:
            exec(compile(source, str(create_c / script), 'exec'), module.__dict__)
        except (FileNotFoundError, RuntimeError, OSError):
            pass  # the dataset-writing tail, as expected
    missing = [name for name in CORRUPTIONS + EXTRA_CORRUPTIONS if name not in module.__dict__]
    if missing:
        raise RuntimeError(f"{script} did not define {missing}: is this hendrycks/robustness?")
    return module


@contextlib.contextmanager
def working_directory(path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def reference_outputs(module, create_c, name, severity, crops, seed, jpeg):
    """The script's `name` at `severity` on every crop (uint8 [N, H, W, 3]), stored as published: uint8 [N, H, W, 3]."""
    np.random.seed(seed)
    outputs = []
    with working_directory(create_c):  # frost reads ./frost*.png
        for crop in crops:
            out = np.uint8(module.__dict__[name](Image.fromarray(crop), severity))
            if jpeg:
                buffer = io.BytesIO()
                Image.fromarray(out).save(buffer, 'JPEG', quality=85, optimize=True)
                out = np.asarray(Image.open(buffer).convert('RGB'))
            outputs.append(out)
    return np.stack(outputs)


# ------------------------------------------------------------------------------------------------ ours

def our_outputs(benchmark, name, severity, crops, seed, jpeg):
    """`corrupt` on the crops, stored as published: uint8 [N, H, W, 3]."""
    images = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    generator = torch.Generator().manual_seed(seed)
    out = corrupt(images, name, severity, generator, benchmark=benchmark, published_jpeg=jpeg)
    # np.uint8 of the script's floats (JPEG outputs are whole levels already)
    pixels = (out * 255 + 1e-3).floor().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------ measuring

def photo_crops(n, size, seed=0):
    """`n` real-photo crops uint8 [n, size, size, 3]: random square windows of scikit-learn's two sample photos
    (at least twice the size where the photos allow), resized with PIL's bilinear filter."""
    from sklearn.datasets import load_sample_images
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(2 * size, 300), min(photo.shape[:2])))
        top = int(rng.integers(0, photo.shape[0] - side + 1))
        left = int(rng.integers(0, photo.shape[1] - side + 1))
        window = Image.fromarray(photo[top:top + side, left:left + side])
        crops.append(np.asarray(window.resize((size, size), Image.BILINEAR)))
    return np.stack(crops)


def change(outputs, crops):
    """(mean absolute change in levels of 255, PSNR in dB) of the outputs against the clean crops, pooled."""
    difference = outputs.astype(np.float64) - crops.astype(np.float64)
    mse = np.mean(difference ** 2)
    return np.mean(np.abs(difference)), 10 * math.log10(255 ** 2 / max(mse, 1e-12))


def measure(benchmark, module, create_c, names, all_crops, seeds, jpeg):
    """One row per corruption and severity: both sides' change per seed."""
    rows = []
    for name in names:
        crops, cell_seeds = all_crops, seeds
        if name in DETERMINISTIC:
            cell_seeds = seeds[:1]
        elif name in HIGH_VARIANCE:
            cell_seeds = list(range(len(seeds) * HIGH_VARIANCE[name]))
        if (benchmark, name) in SLOW_REFERENCE:
            count, seed_count = SLOW_REFERENCE[benchmark, name]
            crops, cell_seeds = all_crops[:count], seeds[:seed_count]
        for severity in range(1, 6):
            ours, reference = [], []
            for seed in cell_seeds:
                ours.append(change(our_outputs(benchmark, name, severity, crops, seed, jpeg), crops))
                saved_as_jpeg = jpeg and SAVED_AS_JPEG[benchmark]
                reference.append(change(reference_outputs(module, create_c, name, severity, crops, seed,
                                                          saved_as_jpeg), crops))
            rows.append(dict(benchmark=benchmark, corruption=name, severity=severity,
                             ours_mac=[m for m, _ in ours], reference_mac=[m for m, _ in reference],
                             ours_psnr=[p for _, p in ours], reference_psnr=[p for _, p in reference]))
    return rows


def summarise(rows):
    """Ratio of mean absolute changes (ours / reference), PSNR difference and the reference's seed spread."""
    for row in rows:
        reference = np.mean(row['reference_mac'])
        row['ratio'] = np.mean(row['ours_mac']) / reference
        row['psnr_difference'] = np.mean(row['ours_psnr']) - np.mean(row['reference_psnr'])
        row['spread'] = (min(row['reference_mac']) / reference, max(row['reference_mac']) / reference)
    return rows


def print_table(benchmark, rows, jpeg, crops, seeds):
    title = dict(zip(BENCHMARKS, ('CIFAR-10-C', 'Tiny-ImageNet-C', 'ImageNet-C')))[benchmark]
    saved = 'uint8 + JPEG q85' if jpeg and SAVED_AS_JPEG[benchmark] else 'uint8'
    print(f"\n### {title}: {SIZES[benchmark]} px, {crops} crops, {len(seeds)} seeds for random corruptions "
          f"({', '.join(f'{name} {factor * len(seeds)}' for name, factor in HIGH_VARIANCE.items())}), "
          f"saved as {saved}\n")
    print('mean absolute change, ours / reference (PSNR ours - reference, dB)\n')
    print('| corruption | ' + ' | '.join(f'sev {s}' for s in range(1, 6)) + ' |')
    print('|---|' + '---:|' * 5)
    for name in dict.fromkeys(row['corruption'] for row in rows):
        cells = [row for row in rows if row['corruption'] == name]
        print(f'| {name} | ' + ' | '.join(f"{row['ratio']:.2f} ({row['psnr_difference']:+.1f})" for row in cells)
              + ' |')
    ratios = np.array([row['ratio'] for row in rows])
    inside = np.mean((ratios >= 0.9) & (ratios <= 1.1))
    print(f"\n{inside:.0%} of {len(rows)} cells within 0.9-1.1x; geometric mean {np.exp(np.log(ratios).mean()):.3f}; "
          f"range {ratios.min():.2f}-{ratios.max():.2f}")
    worst = sorted(rows, key=lambda row: -abs(math.log(row['ratio'])))[:5]
    print('worst cells: ' + '; '.join(f"{row['corruption']} {row['severity']}: {row['ratio']:.2f} "
                                      f"(reference seed spread {row['spread'][0]:.2f}-{row['spread'][1]:.2f})"
                                      for row in worst))


def print_summary(rows):
    """One line per corruption: the range of ours / reference over the five severities, per benchmark."""
    benchmarks = list(dict.fromkeys(row['benchmark'] for row in rows))
    titles = dict(zip(BENCHMARKS, ('CIFAR-10-C', 'Tiny-ImageNet-C', 'ImageNet-C')))
    print('\n### Summary: mean absolute change, ours / reference, lowest-highest over severities 1-5\n')
    print('| corruption | ' + ' | '.join(titles[b] for b in benchmarks) + ' |')
    print('|---|' + '---:|' * len(benchmarks))
    for name in dict.fromkeys(row['corruption'] for row in rows):
        cells = []
        for benchmark in benchmarks:
            ratios = [row['ratio'] for row in rows if row['corruption'] == name and row['benchmark'] == benchmark]
            cells.append(f'{min(ratios):.2f}-{max(ratios):.2f}' if ratios else '')
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
    cells = []
    for benchmark in benchmarks:
        ratios = np.array([row['ratio'] for row in rows if row['benchmark'] == benchmark])
        cells.append(f"{np.mean((ratios >= 0.9) & (ratios <= 1.1)) * len(ratios):.0f} of {len(ratios)} cells in "
                     f"0.9-1.1, geometric mean {np.exp(np.log(ratios).mean()):.3f}")
    print('| **all** | ' + ' | '.join(cells) + ' |')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--reference', type=Path, required=True, help='a checkout of hendrycks/robustness')
    parser.add_argument('--benchmarks', nargs='+', default=list(BENCHMARKS), choices=BENCHMARKS)
    parser.add_argument('--corruptions', nargs='+', default=None, help='default: the 15 (and --extra)')
    parser.add_argument('--extra', action='store_true', help='also the 4 extra corruptions')
    parser.add_argument('--crops', type=int, default=14)
    parser.add_argument('--seeds', type=int, default=3, help='seeds per random corruption (frost, elastic: 4x)')
    parser.add_argument('--no-jpeg', action='store_true',
                        help='compare without the JPEG save of the published Tiny-ImageNet-C / ImageNet-C files')
    parser.add_argument('--csv', type=Path, default=None, help='write every cell here')
    args = parser.parse_args()
    torch.set_num_threads(1)
    create_c = args.reference / 'ImageNet-C' / 'create_c'
    install_shims()
    names = args.corruptions or list(CORRUPTIONS + (EXTRA_CORRUPTIONS if args.extra else ()))
    seeds = list(range(args.seeds))
    jpeg = not args.no_jpeg
    all_rows = []
    print(f'python {" ".join(sys.argv)}')
    for benchmark in args.benchmarks:
        start = time.perf_counter()
        module = load_reference(create_c, SCRIPTS[benchmark])
        crops = photo_crops(args.crops, SIZES[benchmark], seed=1)
        rows = summarise(measure(benchmark, module, create_c, names, crops, seeds, jpeg))
        print_table(benchmark, rows, jpeg, args.crops, seeds)
        print(f'({time.perf_counter() - start:.0f} s)')
        all_rows += rows
    print_summary(all_rows)
    if args.csv is not None:
        import pandas as pd
        table = pd.DataFrame(all_rows)
        for column in ('ours_mac', 'reference_mac', 'ours_psnr', 'reference_psnr'):
            table[column] = table[column].map(lambda values: ' '.join(f'{v:.4f}' for v in values))
        table.to_csv(args.csv, index=False)


if __name__ == '__main__':
    main()
