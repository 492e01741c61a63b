"""GPU checks of fastai_jsd.robustness (skipped without CUDA): no corruption waits for the GPU (but the JPEG
round trips: `jpeg_compression` and the published files' save of Tiny-ImageNet-C / ImageNet-C), the GPU gives
the CPU path's pixels for the same draws (the same distribution for its own draws), for every benchmark,
nvJPEG against PIL, and evaluate_robustness reads results back once per batch plus once at the end."""
import types

import numpy as np
import pytest
import torch
from torch import nn

from _images import photo_crops, to_grayscale, to_tensor
from _syncs import count_syncs, sync_debug
from fastai_jsd.robustness import (BENCHMARKS, CORRUPTIONS, EXTRA_CORRUPTIONS, SEGMENTATION_CORRUPTIONS, corrupt,
                                   evaluate_robustness)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

ALL = CORRUPTIONS + EXTRA_CORRUPTIONS
SYNC_FREE = tuple(name for name in ALL if name != 'jpeg_compression')  # nvJPEG decodes from host bytes
# the GPU draws its own Poisson numbers even from a CPU generator (see robustness.filters._poisson)
SAME_DRAWS = tuple(name for name in SYNC_FREE if name != 'shot_noise')
SHAPES = [(4, 3, 32, 32), (2, 1, 40, 40), (2, 3, 96, 80)]


def images(shape, seed=0):
    batch, channels, height, width = shape
    photos = photo_crops(batch, height, width, seed=seed)
    return to_tensor(photos if channels == 3 else to_grayscale(photos))


def generator(kind, seed=0):
    return None if kind is None else torch.Generator(kind).manual_seed(seed)


@pytest.mark.parametrize('benchmark', BENCHMARKS)
@pytest.mark.parametrize('kind', ['cuda', 'cpu', None])
@pytest.mark.parametrize('shape', SHAPES)
def test_no_corruption_waits_for_the_gpu(shape, kind, benchmark):
    x = images(shape).cuda()
    options = dict(benchmark=benchmark, published_jpeg=False)  # the published save is a JPEG round trip
    for name in SYNC_FREE:
        for severity in (1, 5):
            corrupt(x, name, severity, generator(kind), **options)  # warm-up: kernels, FFT plans, cuBLAS handles
            with sync_debug('error'):
                out = corrupt(x, name, severity, generator(kind), **options)
            assert out.is_cuda and out.shape == x.shape and out.dtype == x.dtype


def test_jpeg_waits_at_most_twice():
    x = images((8, 3, 32, 32)).cuda()
    corrupt(x, 'jpeg_compression', 3)
    assert count_syncs(lambda: corrupt(x, 'jpeg_compression', 3)) <= 2


@pytest.mark.parametrize('benchmark', ['tiny-imagenet-c', 'imagenet-c'])
def test_the_published_jpeg_save_waits_at_most_twice_per_round_trip(benchmark):
    x = images((8, 3, 64, 64)).cuda()
    for name, round_trips in (('contrast', 1), ('glass_blur', 1), ('jpeg_compression', 2)):
        corrupt(x, name, 3, generator('cuda'), benchmark=benchmark)
        assert count_syncs(lambda: corrupt(x, name, 3, generator('cuda'), benchmark=benchmark)) <= 2 * round_trips


@pytest.mark.parametrize('benchmark', BENCHMARKS)
@pytest.mark.parametrize('shape', SHAPES)
def test_gpu_gives_the_cpu_pixels_for_the_same_draws(shape, benchmark):
    x = images(shape, seed=3)
    options = dict(benchmark=benchmark, published_jpeg=False)  # nvJPEG is not PIL: compared below
    for name in SAME_DRAWS:
        for severity in (1, 3, 5):
            cpu = corrupt(x, name, severity, generator('cpu', severity), **options)
            gpu = corrupt(x.cuda(), name, severity, generator('cpu', severity), **options).cpu()
            difference = (gpu - cpu).abs()
            if name == 'spatter':  # a floored distance level can flip, and with it equalizeHist's table
                assert float(difference.mean()) < 5e-4, (name, severity)
            else:
                atol = 1e-3 if name == 'frost' else 1e-4  # frost: a square root of needles near 0
                assert float(difference.max()) < atol, (name, severity, float(difference.max()))


@pytest.mark.parametrize('benchmark', BENCHMARKS)
@pytest.mark.parametrize('name', SYNC_FREE)
def test_gpu_draws_give_the_cpu_distribution(name, benchmark):
    x = images((64, 3, 32, 32), seed=4)
    options = dict(benchmark=benchmark, published_jpeg=False)
    for severity in (2, 5):
        cpu = corrupt(x, name, severity, generator('cpu', 1), **options) - x
        gpu = corrupt(x.cuda(), name, severity, generator('cuda', 1), **options).cpu() - x
        assert float(gpu.abs().mean()) == pytest.approx(float(cpu.abs().mean()), rel=0.15, abs=1e-4)
        assert abs(float(gpu.mean()) - float(cpu.mean())) < 0.02
        assert float(gpu.std()) == pytest.approx(float(cpu.std()), rel=0.15, abs=1e-4)


def test_shot_noise_on_the_gpu_is_poisson():
    level = torch.full((16, 3, 64, 64), 0.4, device='cuda')
    for kind in ('cuda', 'cpu'):
        counts = corrupt(level, 'shot_noise', 3, generator(kind)) * 100
        assert torch.allclose(counts, counts.round(), atol=1e-3)
        assert float(counts.mean()) == pytest.approx(40, rel=0.01)
        assert float(counts.var()) == pytest.approx(40, rel=0.05)


@pytest.mark.parametrize('size', [32, 224])
def test_nvjpeg_round_trip_against_pil(size):
    """nvJPEG encodes with 4:4:4 chroma, PIL with 4:2:0: the GPU's images differ from PIL's by less than
    6/255 on average and lose 60-110% of what PIL's lose (PIL's own 4:4:4 loses 73-86% on CPU)."""
    import io
    from PIL import Image
    source = photo_crops(16, min(size, 150), min(size, 150), seed=5)
    if size > 150:
        source = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in source])
    x = to_tensor(source)
    for severity, quality in enumerate((80, 65, 58, 50, 40), 1):
        gpu = corrupt(x.cuda(), 'jpeg_compression', severity).cpu().permute(0, 2, 3, 1).double().numpy() * 255
        pil = []
        for photo in source:
            buffer = io.BytesIO()
            Image.fromarray(photo).save(buffer, 'JPEG', quality=quality)
            pil.append(np.asarray(Image.open(buffer), dtype=np.float64))
        pil = np.stack(pil)
        assert np.abs(gpu - pil).mean() < 6, severity
        ratio = np.abs(gpu - source).mean() / np.abs(pil - source).mean()
        assert 0.6 < ratio < 1.1, (severity, ratio)
    gray = to_tensor(to_grayscale(source))
    out = corrupt(gray.cuda(), 'jpeg_compression', 3).cpu()
    assert out.shape == gray.shape and float((out - corrupt(gray, 'jpeg_compression', 3)).abs().mean()) < 2 / 255


class TinyNet(nn.Module):
    def __init__(self, out_channels=2, dense=False):
        super().__init__()
        layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, out_channels, 1)]
        if not dense:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


def learner(model):
    """What evaluate_robustness reads of a Learner, without DataLoaders (pixels go in as they are)."""
    from fastai.vision.all import CrossEntropyLossFlat
    return types.SimpleNamespace(model=model, dls=None, loss_func=CrossEntropyLossFlat(axis=1))


@pytest.mark.parametrize('task', ['classification', 'segmentation'])
def test_evaluate_robustness_reads_back_once_per_batch_and_matches_the_cpu(task):
    x = images((24, 3, 32, 32), seed=6)
    if task == 'classification':
        labels = torch.arange(24) % 2
    else:
        labels = (x.mean(1) * 3).long().clamp(max=2)
    torch.manual_seed(0)
    model = TinyNet(out_channels=2 if task == 'classification' else 3, dense=task == 'segmentation').eval()
    corruptions = tuple(name for name in SEGMENTATION_CORRUPTIONS if name in SAME_DRAWS)
    kwargs = dict(corruptions=corruptions, severities=(1, 5), show_progress=False)
    cpu_batches = [(x[i:i + 8], labels[i:i + 8]) for i in range(0, 24, 8)]
    gpu_batches = [(xb.cuda(), yb.cuda()) for xb, yb in cpu_batches]
    cpu = evaluate_robustness(learner(model), dl=cpu_batches, generator=generator('cpu'), **kwargs)
    gpu_learner = learner(model.cuda())
    evaluate_robustness(gpu_learner, dl=gpu_batches, generator=generator('cuda'), **kwargs)  # warm-up
    syncs = count_syncs(lambda: evaluate_robustness(gpu_learner, dl=gpu_batches, generator=generator('cuda'),
                                                    **kwargs))
    assert syncs <= len(gpu_batches) + 2  # one check per batch, one copy of the results, not one per condition
    gpu = evaluate_robustness(gpu_learner, dl=gpu_batches, generator=generator('cpu'), **kwargs)
    column = 'error' if task == 'classification' else 'pixel_error'
    assert gpu.clean_error == pytest.approx(cpu.clean_error)
    # pixels agree to 1e-4, so a prediction flips only where two class scores nearly tie
    difference = np.abs(gpu.table[column] - cpu.table[column])
    assert difference.max() <= 1 / 24 + 1e-9 and difference.mean() < 0.01
