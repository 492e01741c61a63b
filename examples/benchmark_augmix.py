"""How fast is fastai_jsd's batched AugMix? Images per second against timm and torchvision.

    python examples/benchmark_augmix.py                  # CPU: 32 px (batch 256), 224 px (batch 64)
    python examples/benchmark_augmix.py --device cuda    # also fastai_jsd and torchvision on the GPU

Everything runs on one CPU thread (`torch.set_num_threads(1)`): a DataLoader worker gets one
core, so per-core throughput is the fair comparison with timm's per-image AugMix, which is
what a worker runs. timm uses the paper's 9 ops on PIL images; torchvision's `v2.AugMix`
runs on a uint8 batch as it is meant to (one op chain for the whole batch, so it does less
work than per-image AugMix). Every method gets its input ready before the clock starts:
timm its PIL images, torchvision its uint8 batch, fastai_jsd its float batch in [0, 1]; each
figure times only the augmentation (for fastai_jsd the whole public `augmix` call: input
checks, sampling and application). Each figure is the median of `--repeats` timed runs after
one warm-up run; the runs of the three methods are interleaved, so load changes hit all alike.
"""
import argparse
import statistics
import time

import torch
from PIL import Image
from timm.data.auto_augment import AugMixAugment, augmix_ops
from torchvision.transforms import v2

from fastai_jsd.augmix import augmix

# timm's names of the paper's 9 ops (its default list adds Color, Contrast, Brightness, Sharpness).
PAPER_OPS_TIMM = ['AutoContrast', 'Equalize', 'PosterizeIncreasing', 'Rotate', 'SolarizeIncreasing',
                  'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']


def random_images(batch_size, size, seed=0):
    """A uint8 [B, 3, size, size] batch of smooth random images (blurred noise, so histograms are not flat)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, 3, max(size // 8, 2), max(size // 8, 2), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode='bilinear', align_corners=False)
    noise = 0.1 * torch.rand(batch_size, 3, size, size, generator=generator)
    return ((smooth * 0.9 + noise) * 255).round().clamp(0, 255).to(torch.uint8)


def median_seconds(runners, repeats, synchronize=None):
    """Median wall time of each runner over `repeats` rounds, after one warm-up call each.

    Rounds interleave the runners, so a change in machine load hits them all alike.
    """
    for run in runners:
        run()
    times = [[] for _ in runners]
    for _ in range(repeats):
        for run, runner_times in zip(runners, times):
            if synchronize:
                synchronize()
            start = time.perf_counter()
            run()
            if synchronize:
                synchronize()
            runner_times.append(time.perf_counter() - start)
    return [statistics.median(runner_times) for runner_times in times]


def timm_augmix():
    """timm's AugMixAugment with the paper's 9 ops and settings (severity 3, width 3, depth 1..3)."""
    # magnitude_std=inf: uniform level in [0, magnitude], as timm's own 'augmix-m3-w3-d-1' config.
    hparams = dict(translate_const=250, img_mean=(128, 128, 128), magnitude_std=float('inf'))
    ops = augmix_ops(magnitude=3, hparams=hparams, transforms=PAPER_OPS_TIMM)
    return AugMixAugment(ops, alpha=1., width=3, depth=-1)


def runners(images, timm_count, device):
    """Callables: timm on the first `timm_count` images one by one (PIL), torchvision and fastai_jsd on the batch."""
    timm_transform = timm_augmix()
    pil_images = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images[:timm_count]]
    torchvision_transform = v2.AugMix(severity=3, mixture_width=3, chain_depth=-1, alpha=1., all_ops=False)
    uint8_batch = images.to(device)
    float_batch = uint8_batch.float().div_(255)
    generator = torch.Generator(device=float_batch.device).manual_seed(0)
    return (lambda: [timm_transform(im) for im in pil_images],
            lambda: torchvision_transform(uint8_batch),
            lambda: augmix(float_batch, generator=generator))


def benchmark(settings, repeats):
    """Rows (name, size, batch, device, images/s, ms/batch, ratio to timm) for each (size, batch, device)."""
    rows = []
    for size, batch_size, device in settings:
        images = random_images(batch_size, size)
        # timm's time is per image, so a subset of a large batch suffices at 224 px
        timm_count = min(batch_size, 64 if size > 64 else 256)
        synchronize = torch.cuda.synchronize if torch.device(device).type == 'cuda' else None
        timm_seconds, torchvision_seconds, ours_seconds = median_seconds(
            runners(images, timm_count, device), repeats, synchronize)
        timm_rate = timm_count / timm_seconds
        rows.append(('timm AugMixAugment (per image, PIL)', size, 1, 'cpu', timm_rate, 1e3 / timm_rate, 1.))
        for name, seconds in (('torchvision v2.AugMix (uint8 batch, one chain)', torchvision_seconds),
                              ('fastai_jsd augmix (float batch)', ours_seconds)):
            rate = batch_size / seconds
            rows.append((name, size, batch_size, device, rate, seconds * 1e3, rate / timm_rate))
    return rows


def markdown_table(rows):
    """The rows as a markdown table."""
    lines = ['| method | size | batch | device | images/s | ms/batch | x timm |',
             '|---|---:|---:|---|---:|---:|---:|']
    for name, size, batch, device, rate, ms, ratio in rows:
        lines.append(f'| {name} | {size} | {batch} | {device} | {rate:,.0f} | {ms:.1f} | {ratio:.1f} |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu', help="where fastai_jsd and torchvision run: cpu or cuda")
    parser.add_argument('--repeats', type=int, default=5, help="timed runs per figure (median reported)")
    parser.add_argument('--quick', action='store_true', help="a tiny run that only checks everything works")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; none is available")
    torch.set_num_threads(1)
    if args.quick:
        settings, repeats = [(16, 8, args.device)], 1
    elif args.device.startswith('cuda'):
        settings, repeats = [(32, 256, args.device), (224, 256, args.device)], args.repeats
    else:
        settings, repeats = [(32, 256, 'cpu'), (224, 64, 'cpu')], args.repeats
    print(f'torch {torch.__version__}, one CPU thread, median of {repeats} runs\n')
    print(markdown_table(benchmark(settings, repeats)))


if __name__ == '__main__':
    main()
