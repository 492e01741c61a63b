"""The three published corruption benchmarks: their severity tables, native sizes and how their files were saved.

Facts read from the generator scripts of hendrycks/robustness (`ImageNet-C/create_c/`): `make_cifar_c.py`
(CIFAR-10-C, CIFAR-100-C: the same tables), `make_tinyimagenet_c.py` (Tiny-ImageNet-C) and
`make_imagenet_c.py` (ImageNet-C). Every table lists the five severities in order; a setting is what the
script's `c = [...][severity - 1]` holds, lengths in pixels at the benchmark's native size.

How the published files were stored: the CIFAR script keeps `np.uint8(corrupted)` in `.npy` arrays (no
compression); the Tiny-ImageNet and ImageNet scripts save `Image.fromarray(np.uint8(corrupted))` to the
original `.JPEG` file names with `quality=85, optimize=True` (`optimize` only re-codes the Huffman tables:
the same pixels), so every published Tiny-ImageNet-C / ImageNet-C image went through a JPEG round trip at
quality 85 after its corruption.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

BENCHMARKS = ('cifar10-c', 'tiny-imagenet-c', 'imagenet-c')

# AlexNet's top-1 error on ImageNet-C per corruption, the mean over severities 1-5 (fractions): the
# normaliser of the mCE in Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
# Corruptions and Perturbations" (ICLR 2019). Taken from `ALEXNET_ERR` in google-research/augmix's
# imagenet.py ("Raw AlexNet errors taken from https://github.com/hendrycks/robustness"), the values
# the AugMix paper's ImageNet mCE (76.7 standard, 65.3 AugMix for ResNet-50) is computed with.
ALEXNET_ERRORS = MappingProxyType({
    'gaussian_noise': 0.886428, 'shot_noise': 0.894468, 'impulse_noise': 0.922640,
    'defocus_blur': 0.819880, 'glass_blur': 0.826268, 'motion_blur': 0.785948, 'zoom_blur': 0.798360,
    'snow': 0.866816, 'frost': 0.826572, 'fog': 0.819324, 'brightness': 0.564592,
    'contrast': 0.853204, 'elastic_transform': 0.646056, 'pixelate': 0.717840, 'jpeg_compression': 0.606500,
})
# AlexNet's clean top-1 error, for the relative mCE: the paper reports 43.5 %; the weights its test.py loads
# (torchvision's `alexnet-owt`, IMAGENET1K_V1) are documented at 56.522 % top-1 accuracy.
ALEXNET_CLEAN_ERROR = 1 - 0.56522


def _scaled(size, rows):
    """The elastic table as the scripts write it: fractions times the image size constant."""
    return tuple(tuple(size * value for value in row) for row in rows)


_CIFAR10_C = {  # make_cifar_c.py
    'gaussian_noise': (0.04, 0.06, 0.08, 0.09, 0.10),
    'shot_noise': (500, 250, 100, 75, 50),
    'impulse_noise': (0.01, 0.02, 0.03, 0.05, 0.07),
    'defocus_blur': ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    'glass_blur': ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    'motion_blur': ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    'zoom_blur': ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
    'snow': ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    'frost': ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    'fog': ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    'brightness': (0.05, 0.1, 0.15, 0.2, 0.3),
    'contrast': (0.75, 0.5, 0.4, 0.3, 0.15),
    'elastic_transform': _scaled(32, ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                                      (0.1, 0.03, 0.03))),
    'pixelate': (0.95, 0.9, 0.85, 0.75, 0.65),
    'jpeg_compression': (80, 65, 58, 50, 40),
    'speckle_noise': (0.06, 0.1, 0.12, 0.16, 0.2),
    'gaussian_blur': (0.4, 0.6, 0.7, 0.8, 1),
    'spatter': ((0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)),
    'saturate': ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}

_TINY_IMAGENET_C = {  # make_tinyimagenet_c.py
    'gaussian_noise': (0.04, 0.08, 0.12, 0.15, 0.18),
    'shot_noise': (250, 100, 50, 30, 15),
    'impulse_noise': (0.01, 0.02, 0.05, 0.08, 0.14),
    'defocus_blur': ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)),
    'glass_blur': ((0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)),
    'motion_blur': ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
    'zoom_blur': ((1.06, 0.01), (1.11, 0.01), (1.16, 0.01), (1.21, 0.01), (1.26, 0.01)),
    'snow': ((0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)),
    'frost': ((1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)),
    'fog': ((0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
    'brightness': (0.1, 0.2, 0.3, 0.4, 0.5),
    'contrast': (0.4, 0.3, 0.2, 0.1, 0.05),
    'elastic_transform': _scaled(64, ((0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06), (0.1, 0.03, 0.03),
                                      (0.16, 0.03, 0.02))),
    'pixelate': (0.9, 0.8, 0.7, 0.6, 0.5),
    'jpeg_compression': (65, 58, 50, 40, 25),
    'speckle_noise': (0.15, 0.2, 0.25, 0.3, 0.35),
    'gaussian_blur': (0.5, 0.75, 1, 1.25, 1.5),
    'spatter': ((0.62, 0.1, 0.7, 0.7, 0.6, 0), (0.65, 0.1, 0.8, 0.7, 0.6, 0), (0.65, 0.3, 1, 0.69, 0.6, 0),
                (0.65, 0.1, 0.7, 0.68, 0.6, 1), (0.65, 0.1, 0.5, 0.67, 0.6, 1)),
    'saturate': ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)),
}

_IMAGENET_C = {  # make_imagenet_c.py
    'gaussian_noise': (0.08, 0.12, 0.18, 0.26, 0.38),
    'shot_noise': (60, 25, 12, 5, 3),
    'impulse_noise': (0.03, 0.06, 0.09, 0.17, 0.27),
    'defocus_blur': ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    'glass_blur': ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)),
    'motion_blur': ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    'zoom_blur': ((1.11, 0.01), (1.16, 0.01), (1.21, 0.02), (1.26, 0.02), (1.31, 0.03)),
    'snow': ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
             (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
    'frost': ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)),
    'fog': ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)),
    'brightness': (0.1, 0.2, 0.3, 0.4, 0.5),
    'contrast': (0.4, 0.3, 0.2, 0.1, 0.05),
    # 244, not 224: the script's own comment says "244 should have been 224, but ultimately nothing is incorrect"
    'elastic_transform': _scaled(244, ((2, 0.7, 0.1), (2, 0.08, 0.2), (0.05, 0.01, 0.02), (0.07, 0.01, 0.02),
                                       (0.12, 0.01, 0.02))),
    'pixelate': (0.6, 0.5, 0.4, 0.3, 0.25),
    'jpeg_compression': (25, 18, 15, 10, 7),
    'speckle_noise': (0.15, 0.2, 0.35, 0.45, 0.6),
    'gaussian_blur': (1, 2, 3, 4, 6),
    'spatter': ((0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
                (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1)),
    'saturate': ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)),
}


@dataclass(frozen=True)
class Benchmark:
    """One published benchmark: its tables, the image size they are for and how its files were saved."""
    name: str
    title: str
    native_size: int
    script: str
    saved_as_jpeg: bool
    tables: Mapping[str, tuple]

    def setting(self, corruption, severity):
        """The script's `c` for `corruption` at `severity` (1-5)."""
        return self.tables[corruption][severity - 1]


_BENCHMARKS = {
    'cifar10-c': Benchmark('cifar10-c', 'CIFAR-10-C', 32, 'make_cifar_c.py', False,
                           MappingProxyType(_CIFAR10_C)),
    'tiny-imagenet-c': Benchmark('tiny-imagenet-c', 'Tiny-ImageNet-C', 64, 'make_tinyimagenet_c.py', True,
                                 MappingProxyType(_TINY_IMAGENET_C)),
    'imagenet-c': Benchmark('imagenet-c', 'ImageNet-C', 224, 'make_imagenet_c.py', True,
                            MappingProxyType(_IMAGENET_C)),
}

# benchmark=None: the smaller image side decides (at most 48 px: CIFAR-10-C, at most 128 px: Tiny-ImageNet-C).
_BY_SIZE = ((48, 'cifar10-c'), (128, 'tiny-imagenet-c'))


def check_benchmark(benchmark, argument='benchmark'):
    """ValueError unless `benchmark` is None or one of BENCHMARKS."""
    if benchmark is not None and (not isinstance(benchmark, str) or benchmark not in _BENCHMARKS):
        raise ValueError(f"{argument}={benchmark!r} is not a known benchmark; use one of "
                         f"{', '.join(map(repr, BENCHMARKS))} (or None: chosen by image size).")


def benchmark_for_size(height, width):
    """The benchmark `benchmark=None` picks for images of `height` x `width`: by the smaller side."""
    side = min(height, width)
    for limit, name in _BY_SIZE:
        if side <= limit:
            return name
    return 'imagenet-c'


def get_benchmark(benchmark, height, width):
    """The `Benchmark` named `benchmark`, or the one chosen by size for None."""
    check_benchmark(benchmark)
    return _BENCHMARKS[benchmark if benchmark is not None else benchmark_for_size(height, width)]
