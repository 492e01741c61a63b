"""Throughput of `fastai_jsd.robustness.corrupt` per corruption, and the time of a full robustness evaluation.

    python examples/benchmark_corruptions.py                 # corruptions, 32 px, one CPU thread
    python examples/benchmark_corruptions.py --evaluate      # + 15 x 5 evaluation of 1,000 images, resnet18

Prints markdown tables: images/s (median over repeats) per corruption and severity, the
resnet18 forward pass for comparison, and the wall time of `evaluate_robustness`.
"""
import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from fastai_jsd.robustness import CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt, evaluate_robustness


def photo_crops(n, size, seed=0):
    """`n` real-photo crops (scikit-learn's sample images) as float [n, 3, size, size] in [0, 1], labels = photo."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(size * 2, 400))
        top, left = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
        window = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        crops.append(np.asarray(window))
        labels.append(i % len(photos))
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    return images, torch.tensor(labels)


def images_per_second(fn, n_images, repeats):
    fn()  # warm-up: lazy kernels, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_images / statistics.median(times)


def benchmark_corruptions(args):
    images, _ = photo_crops(args.batch_size, args.size)
    if args.gray:
        images = images.mean(1, keepdim=True)
    generator = torch.Generator().manual_seed(0)
    names = CORRUPTIONS + (EXTRA_CORRUPTIONS if args.extra else ())
    print(f"\n`corrupt` throughput, images/s: {args.size} px, C={images.shape[1]}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} thread(s), median of {args.repeats}\n")
    print('| corruption | ' + ' | '.join(f'sev {s}' for s in range(1, 6)) + ' |')
    print('|---|' + '---:|' * 5)
    for name in names:
        rates = [images_per_second(lambda: corrupt(images, name, s, generator), len(images), args.repeats)
                 for s in range(1, 6)]
        print(f'| {name} | ' + ' | '.join(f'{r:,.0f}' for r in rates) + ' |')
    from torchvision.models import resnet18
    model = resnet18(num_classes=10).eval()
    with torch.no_grad():
        rate = images_per_second(lambda: model(images.expand(-1, 3, -1, -1)), len(images), args.repeats)
    print(f'| *resnet18 forward (torchvision, 10 classes)* | {rate:,.0f} | | | | |')


def benchmark_evaluation(args):
    from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, IndexSplitter, Normalize, PILImage,
                                   imagenet_stats, resnet18, vision_learner)
    n_train = 64  # fastai needs a training set; only the validation set is evaluated
    images, labels = photo_crops(n_train + args.eval_images, args.size, seed=1)
    pixels = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    items = list(range(len(pixels)))
    block = DataBlock(blocks=(ImageBlock, CategoryBlock),
                      get_x=lambda i: PILImage.create(pixels[i]), get_y=lambda i: int(labels[i]),
                      splitter=IndexSplitter(items[n_train:]),
                      batch_tfms=Normalize.from_stats(*imagenet_stats, cuda=False))
    dls = block.dataloaders(items, bs=args.eval_batch_size, device='cpu')
    learn = vision_learner(dls, resnet18, pretrained=False)
    start = time.perf_counter()
    result = evaluate_robustness(learn, generator=torch.Generator().manual_seed(0), show_progress=False)
    seconds = time.perf_counter() - start
    print(f"\n| evaluation | images | conditions | threads | seconds |\n|---|---:|---:|---:|---:|\n"
          f"| evaluate_robustness, fastai resnet18 (pretrained=False), {args.size} px | {dls.valid.n:,} | "
          f"{len(result.table)} + clean | {torch.get_num_threads()} | {seconds:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--gray', action='store_true', help='1-channel images (Fashion-MNIST style)')
    parser.add_argument('--extra', action='store_true', help='also the four EXTRA_CORRUPTIONS')
    parser.add_argument('--evaluate', action='store_true', help='time the 15 x 5 evaluation as well')
    parser.add_argument('--skip-corruptions', action='store_true')
    parser.add_argument('--eval-images', type=int, default=1000)
    parser.add_argument('--eval-batch-size', type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_corruptions:
        benchmark_corruptions(args)
    if args.evaluate:
        benchmark_evaluation(args)


if __name__ == '__main__':
    main()
