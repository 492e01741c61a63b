"""Throughput of `fastai_jsd.robustness.corrupt` per corruption, and the cost of a full robustness evaluation.

    python examples/benchmark_corruptions.py                      # CPU, every benchmark at its native size, sev 1-5:
                                                                  # CIFAR-10-C 32 px batch 256, Tiny-ImageNet-C 64 px
                                                                  # batch 64, ImageNet-C 224 px batch 16; one thread
    python examples/benchmark_corruptions.py --benchmark cifar10-c   # one of them (--size, --batch-size to change)
    python examples/benchmark_corruptions.py --evaluate           # + evaluate_robustness vs 76 forwards, resnet18
    python examples/benchmark_corruptions.py --device cuda        # GPU: 32 px x 4096, 64 px x 1024, 224 px x 256
    python examples/benchmark_corruptions.py --device cuda --evaluate --skip-corruptions
                                                                  # resnet50 bf16, 224 px (ImageNet-C), 2,048 images

Prints markdown tables. CPU: images/s (median over repeats) per corruption and severity, next to a
resnet18 forward pass on the same images. GPU: images/s and host syncs per call (counted with
`torch.cuda.set_sync_debug_mode('warn')`) per corruption at one severity, for each benchmark at its
native size, next to a resnet50 bf16 forward pass on the same images, and the ratio. Tiny-ImageNet-C and
ImageNet-C include the published files' JPEG save (`published_jpeg=True`, the default; a JPEG round trip
per call, with its host syncs on a GPU) unless --no-published-jpeg. `--evaluate`: the wall time of
`evaluate_robustness` (15 corruptions x 5 severities + clean = 76 conditions) over the wall time of
76 plain forward passes of the same model over the same batches (median of repeats); batches are
made on the device beforehand, so neither side pays for data loading.
"""
import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from fastai_jsd.robustness import BENCHMARKS, CORRUPTIONS, EXTRA_CORRUPTIONS, corrupt, evaluate_robustness
from fastai_jsd.robustness.benchmarks import benchmark_for_size

# Each benchmark at its native size, with the batch timed on the CPU and on a GPU.
NATIVE = {'cifar10-c': (32, 256, 4096), 'tiny-imagenet-c': (64, 64, 1024), 'imagenet-c': (224, 16, 256)}
TITLES = dict(zip(BENCHMARKS, ('CIFAR-10-C', 'Tiny-ImageNet-C', 'ImageNet-C')))


def photo_crops(n, size, seed=0, unique=256):
    """`n` real-photo crops (scikit-learn's sample images) as float [n, 3, size, size] in [0, 1], labels =
    photo; at most `unique` distinct crops, repeated (making thousands of crops with PIL takes a while)."""
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops, labels = [], []
    for i in range(min(n, unique)):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(size * 2, 300), 400))
        top, left = int(rng.integers(0, photo.shape[0] - side)), int(rng.integers(0, photo.shape[1] - side))
        window = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
        crops.append(np.asarray(window))
        labels.append(i % len(photos))
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    repeats = -(-n // len(crops))
    return images.repeat(repeats, 1, 1, 1)[:n].contiguous(), torch.tensor(labels).repeat(repeats)[:n]


def seconds(fn, device, repeats):
    """Median wall time of `fn` over `repeats` runs after one warm-up run (kernels, caches, FFT plans)."""
    def timed():
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start
    timed()
    return statistics.median(timed() for _ in range(repeats))


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def count_syncs(fn):
    """Host syncs torch reports during one call of `fn` (set_sync_debug_mode('warn') warns at each)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum('synchroniz' in str(warning.message) for warning in caught)


def forward_model(arch, device):
    """A torchvision `arch` (1,000 classes, random weights) in eval mode: bf16 and channels-last on a GPU."""
    import torchvision.models
    model = getattr(torchvision.models, arch)(num_classes=1000).eval().to(device)
    if device.type == 'cuda':
        model = model.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    return model


def model_dtype(model):
    return next(model.parameters()).dtype


def configurations(args, gpu):
    """(benchmark, size, batch) to time: each benchmark at its native size, or the one asked for."""
    chosen = BENCHMARKS if args.benchmark == 'all' else (args.benchmark,)
    return [(name, args.size or NATIVE[name][0], args.batch_size or NATIVE[name][2 if gpu else 1])
            for name in chosen]


def benchmark_corruptions_cpu(args):
    generator = torch.Generator().manual_seed(0)
    cpu = torch.device('cpu')
    names = CORRUPTIONS + (EXTRA_CORRUPTIONS if args.extra else ())
    model = forward_model('resnet18', cpu)
    for benchmark, size, batch in configurations(args, gpu=False):
        images, _ = photo_crops(batch, size)
        if args.gray:
            images = images.mean(1, keepdim=True)
        options = dict(benchmark=benchmark, published_jpeg=not args.no_published_jpeg)
        print(f"\n`corrupt` throughput, images/s, {TITLES[benchmark]}"
              f"{' (published JPEG save)' if options['published_jpeg'] and benchmark != 'cifar10-c' else ''}: "
              f"{size} px, C={images.shape[1]}, batch {batch}, {torch.get_num_threads()} thread(s), median of "
              f"{args.repeats}\n")
        print('| corruption | ' + ' | '.join(f'sev {s}' for s in range(1, 6)) + ' |')
        print('|---|' + '---:|' * 5)
        for name in names:
            rates = [len(images) / seconds(lambda: corrupt(images, name, s, generator, **options), cpu, args.repeats)
                     for s in range(1, 6)]
            print(f'| {name} | ' + ' | '.join(f'{r:,.0f}' for r in rates) + ' |')
        with torch.no_grad():
            rate = len(images) / seconds(lambda: model(images.expand(-1, 3, -1, -1)), cpu, args.repeats)
        print(f'| *resnet18 forward (torchvision, 1,000 classes)* | {rate:,.0f} | | | | |')


def benchmark_corruptions_gpu(args):
    device = torch.device(args.device)
    names = CORRUPTIONS + (EXTRA_CORRUPTIONS if args.extra else ())
    generator = torch.Generator(device).manual_seed(0)
    model = forward_model(args.arch or 'resnet50', device)
    columns = {}
    for benchmark, size, batch in configurations(args, gpu=True):
        images = photo_crops(batch, size)[0].to(device)
        options = dict(benchmark=benchmark, published_jpeg=not args.no_published_jpeg)
        with torch.no_grad():
            forward = batch / seconds(lambda: model(images.to(model_dtype(model))), device, args.repeats)
        rows = {}
        for name in names:
            def call():
                corrupt(images, name, args.severity, generator, **options)
            rate = batch / seconds(call, device, args.repeats)
            rows[name] = (rate, count_syncs(call), rate / forward)
        columns[(benchmark, size, batch)] = (forward, rows)
    print(f"\n`corrupt(x, name, {args.severity})` on {torch.cuda.get_device_name(device)}: images/s (median of "
          f"{args.repeats}), host syncs per call, and throughput over a {args.arch or 'resnet50'} "
          f"{model_dtype(model)} forward pass on the same images (x model); Tiny-ImageNet-C and ImageNet-C "
          f"{'without' if args.no_published_jpeg else 'with'} the published JPEG save\n")
    header = ' | '.join(f'{TITLES[benchmark]} {size} px, batch {batch:,} | syncs | x model'
                        for benchmark, size, batch in columns)
    print(f'| corruption | {header} |')
    print('|---|' + '---:|---:|---:|' * len(columns))
    for name in names:
        cells = ' | '.join(f'{rows[name][0]:,.0f} | {rows[name][1]} | {rows[name][2]:.2f}'
                           for _, rows in columns.values())
        print(f'| {name} | {cells} |')
    cells = ' | '.join(f'{forward:,.0f} | | 1.00' for forward, _ in columns.values())
    print(f'| *{args.arch or "resnet50"} forward, {model_dtype(model)}* | {cells} |')
    print(f"\nJPEG codec on the GPU: {jpeg_codec_name()}")


def jpeg_codec_name():
    from fastai_jsd.robustness import corruptions
    own_stream = corruptions._cuda_jpeg_codec()[2]  # only torchvision's encoder works on its own stream
    return 'torchvision (nvJPEG)' if own_stream else 'TorchCodec (nvJPEG)'


class DeviceBatches:
    """Ready-made batches (normalized images, labels) on the device, read like a fastai DataLoader:
    iteration, len, `after_batch` holding the `Normalize` that evaluate_robustness decodes with."""

    def __init__(self, pixels, labels, batch_size, device):
        from fastai.vision.all import Normalize, Pipeline, imagenet_stats
        self.normalize = Normalize.from_stats(*imagenet_stats, cuda=False)
        self.after_batch = Pipeline([self.normalize])
        mean, std = (torch.as_tensor(v).view(1, 3, 1, 1).to(device) for v in imagenet_stats)
        self.batches = [(((pixels[i:i + batch_size].to(device)) - mean) / std, labels[i:i + batch_size].to(device))
                        for i in range(0, len(pixels), batch_size)]
        self.n = len(pixels)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def benchmark_evaluation(args):
    from fastai.vision.all import CrossEntropyLossFlat, DataLoaders, Learner
    device = torch.device(args.device)
    gpu = device.type == 'cuda'
    size = args.size or (224 if gpu else 32)
    n_images = args.eval_images or (2048 if gpu else 256)
    batch_size = args.eval_batch_size or (256 if gpu else 128)
    arch = args.arch or ('resnet50' if gpu else 'resnet18')
    repeats = args.eval_repeats or (3 if gpu else 1)
    pixels, labels = photo_crops(n_images, size, seed=1)
    batches = DeviceBatches(pixels, labels, batch_size, device)
    model = forward_model(arch, device)
    learn = Learner(DataLoaders(batches, batches), model, loss_func=CrossEntropyLossFlat())
    conditions = len(CORRUPTIONS) * 5 + 1
    generator = torch.Generator(device).manual_seed(0)

    def plain_forwards():
        with torch.no_grad():
            for xb, _ in batches:
                for _ in range(conditions):
                    model(xb.to(model_dtype(model)))

    benchmark = None if args.benchmark == 'all' else args.benchmark  # None: by size

    def evaluation():
        evaluate_robustness(learn, dl=batches, generator=generator, show_progress=False, benchmark=benchmark,
                            published_jpeg=not args.no_published_jpeg)

    reference = seconds(plain_forwards, device, repeats)
    evaluated = seconds(evaluation, device, repeats)
    syncs = count_syncs(evaluation) if gpu else None
    where = torch.cuda.get_device_name(device) if gpu else f'CPU, {torch.get_num_threads()} thread(s)'
    chosen = TITLES[benchmark or benchmark_for_size(size, size)]
    print(f"\n`evaluate_robustness` ({chosen}: 15 corruptions x 5 severities + clean = {conditions} conditions) "
          f"against "
          f"{conditions} plain forward passes over the same batches: {arch} ({model_dtype(model)}, random "
          f"weights), {n_images:,} images of {size} px, batch {batch_size}, {where}, median of {repeats}\n")
    print('| run | seconds | images x conditions / s |\n|---|---:|---:|')
    for label, value in ((f'{conditions} forward passes', reference), ('evaluate_robustness', evaluated)):
        print(f'| {label} | {value:.2f} | {n_images * conditions / value:,.0f} |')
    print(f'| **ratio** | **{evaluated / reference:.2f}** | |')
    if syncs is not None:
        print(f'\nhost syncs in one evaluate_robustness call: {syncs} ({len(batches)} batches)')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (or 'cuda:1', ...)")
    parser.add_argument('--benchmark', default='all', choices=BENCHMARKS + ('all',),
                        help="whose corruptions to time (default all three, each at its native size); "
                             "--evaluate: 'all' chooses by image size")
    parser.add_argument('--no-published-jpeg', action='store_true',
                        help='leave out the JPEG save of the published Tiny-ImageNet-C / ImageNet-C files')
    parser.add_argument('--size', type=int, default=None,
                        help="image size (default the benchmark's native size: 32, 64, 224 px; --evaluate: "
                             "224 on a GPU, 32 on the CPU)")
    parser.add_argument('--batch-size', type=int, default=None,
                        help='corruption batch (CPU default 256 / 64 / 16 at 32 / 64 / 224 px; GPU 4096 / 1024 / 256)')
    parser.add_argument('--severity', type=int, default=3, help='GPU table: the severity timed')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=1, help='CPU threads')
    parser.add_argument('--arch', default=None, help='torchvision model (default resnet18 on CPU, resnet50 on GPU)')
    parser.add_argument('--gray', action='store_true', help='CPU table: 1-channel images (Fashion-MNIST style)')
    parser.add_argument('--extra', action='store_true', help='also the four EXTRA_CORRUPTIONS')
    parser.add_argument('--evaluate', action='store_true', help='time evaluate_robustness against plain forwards')
    parser.add_argument('--skip-corruptions', action='store_true')
    parser.add_argument('--eval-images', type=int, default=None, help='default 2,048 on GPU, 256 on CPU')
    parser.add_argument('--eval-batch-size', type=int, default=None, help='default 256 on GPU, 128 on CPU')
    parser.add_argument('--eval-repeats', type=int, default=None, help='default 3 on GPU, 1 on CPU')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda needs a CUDA GPU (torch.cuda.is_available() is False).')
    if not args.skip_corruptions:
        if torch.device(args.device).type == 'cuda':
            benchmark_corruptions_gpu(args)
        else:
            benchmark_corruptions_cpu(args)
    if args.evaluate:
        benchmark_evaluation(args)


if __name__ == '__main__':
    main()
