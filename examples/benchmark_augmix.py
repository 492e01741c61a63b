"""How fast is fastai_jsd's batched AugMix? Images per second against timm and torchvision.

    python examples/benchmark_augmix.py                  # CPU: 32 px (batch 256), 224 px (batch 64)
    python examples/benchmark_augmix.py --device cuda    # GPU: 32 px (batch 4096), 224 px (batch 256, 1024)

Everything runs on one CPU thread (`torch.set_num_threads(1)`): a DataLoader worker gets one
core, so per-core throughput is the fair comparison with timm's per-image AugMix, which is
what a worker runs. timm uses the paper's 9 ops on PIL images; torchvision's `v2.AugMix`
runs on a uint8 batch as it is meant to (one op chain for the whole batch, so it does less
work than per-image AugMix). Every method gets its input ready before the clock starts:
timm its PIL images, torchvision its uint8 batch, fastai_jsd its float batch in [0, 1]; each
figure times only the augmentation (for fastai_jsd the whole public `augmix` call: input
checks, sampling and application). Each figure is the median of `--repeats` timed runs after
one warm-up run; the runs of the three methods are interleaved, so load changes hit all alike.

On a GPU (`--device cuda`) the comparison is on the device: torchvision's `v2.AugMix` on a uint8
batch, fastai_jsd's `augmix` with each backend ('triton': fused kernels; 'torch': the grouped torch
kernels), and a plain copy of the float batch as the unit of memory traffic; each with the kernel
launches (torch.profiler) and host syncs (torch.cuda.set_sync_debug_mode) of one call.
"""
import argparse
import statistics
import time

import torch
from PIL import Image
from timm.data.auto_augment import AugMixAugment, augmix_ops
from torchvision.transforms import v2

from benchmark_corruptions import count_syncs  # torch's sync debug mode, counted the same way for both
from fastai_jsd import augmix

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
            lambda: augmix(float_batch, generator=generator, backend='torch'))


def benchmark(settings, repeats):
    """Rows (name, size, batch, device, images/s, ms/batch, ratio to timm) for each (size, batch, device)."""
    rows = []
    for size, batch_size, device in settings:
        images = random_images(batch_size, size)
        # timm's time is per image, so a subset of a large batch suffices at 224 px
        timm_count = min(batch_size, 64 if size > 64 else 256)
        timm_seconds, torchvision_seconds, ours_seconds = median_seconds(
            runners(images, timm_count, device), repeats)
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


# --- On a GPU: both backends against torchvision and a plain copy, with launches and host syncs ---------------------

def gpu_launches(function):
    """Kernels, copies and memsets one call of `function` puts on the GPU (torch.profiler), after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile
    function()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        function()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def host_syncs(function):
    """Times one call of `function` makes the host wait for the GPU, after a warm-up call."""
    function()
    return count_syncs(function)


def gpu_runners(images, device):
    """(name, callable) pairs on one batch on the GPU: torchvision, fastai_jsd's two backends, a copy."""
    uint8_batch = images.to(device)
    float_batch = uint8_batch.float().div_(255)
    torchvision_transform = v2.AugMix(severity=3, mixture_width=3, chain_depth=-1, alpha=1., all_ops=False)
    return [('torchvision v2.AugMix (uint8 batch, one chain for the batch)', lambda: torchvision_transform(uint8_batch)),
            ("fastai_jsd augmix, backend='triton' (every image its own chains)",
             lambda: augmix(float_batch, backend='triton')),
            ("fastai_jsd augmix, backend='torch'", lambda: augmix(float_batch, backend='torch')),
            ('a copy of the float batch (clone)', lambda: float_batch.clone())]


def gpu_benchmark(settings, repeats):
    """Rows (name, size, batch, images/s, ms, x copy, launches, syncs, x torchvision) per (size, batch)."""
    rows = []
    for size, batch_size, device in settings:
        named = gpu_runners(random_images(batch_size, size), device)
        seconds = median_seconds([run for _, run in named], repeats, torch.cuda.synchronize)
        copy_seconds = seconds[-1]
        torchvision_rate = batch_size / seconds[0]
        for (name, run), elapsed in zip(named, seconds):
            rows.append((name, size, batch_size, batch_size / elapsed, elapsed * 1e3, elapsed / copy_seconds,
                         gpu_launches(run), host_syncs(run), batch_size / elapsed / torchvision_rate))
    return rows


def gpu_markdown_table(rows):
    """The GPU rows as a markdown table."""
    lines = ['| method | size | batch | images/s | ms/call | x batch copy | launches/call | host syncs/call '
             '| x torchvision |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
    for name, size, batch, rate, ms, copies, launches, syncs, ratio in rows:
        lines.append(f'| {name} | {size} | {batch} | {rate:,.0f} | {ms:.2f} | {copies:.1f} | {launches} | {syncs} '
                     f'| {ratio:.2f} |')
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
    if args.device.startswith('cuda'):
        settings = [(16, 8, args.device)] if args.quick else [
            (32, 4096, args.device), (224, 256, args.device), (224, 1024, args.device)]
        repeats = 1 if args.quick else args.repeats
        import triton
        print(f'torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name(args.device)}, '
              f'{time.strftime("%Y-%m-%d")}, median of {repeats} runs\n')
        print(gpu_markdown_table(gpu_benchmark(settings, repeats)))
        return
    settings, repeats = ([(16, 8, 'cpu')], 1) if args.quick else ([(32, 256, 'cpu'), (224, 64, 'cpu')], args.repeats)
    print(f'torch {torch.__version__}, one CPU thread, median of {repeats} runs\n')
    print(markdown_table(benchmark(settings, repeats)))


if __name__ == '__main__':
    main()
