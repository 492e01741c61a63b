"""fastai_jsd.pixels against fastai's own Normalize.encodes/decodes on real fastai DataLoaders."""
import pytest
import torch
from fastai.data.transforms import IntToFloatTensor, Normalize
from fastai.torch_core import TensorImage

from fastai_jsd.data import fashion_dls
from fastai_jsd.pixels import (channel_stats, decode, encode, encode_, erases_with_noise, find_normalize,
                               normalize_stats, pixel_range_problem)


@pytest.fixture(scope='module')
def dl():
    """The validation loader of the bundled Fashion-MNIST sample: IntToFloatTensor, then one Normalize."""
    return fashion_dls(size=16, bs=4).valid


def test_one_normalize_round_trip_is_fastais_exactly(dl):
    norm = find_normalize(dl)
    assert norm is dl.after_batch.fs[-1] and isinstance(norm, Normalize)
    stats = normalize_stats(dl, 'cpu')
    assert [(mean.shape, std.shape) for mean, std in stats] == [((1, 3, 1, 1), (1, 3, 1, 1))]
    assert all(stat.dtype == torch.float32 and type(stat) is torch.Tensor for pair in stats for stat in pair)
    xb, _ = dl.one_batch()
    before = xb.clone()
    pixels = decode(xb, stats)
    assert type(pixels) is torch.Tensor and pixels.data_ptr() != xb.data_ptr()
    assert torch.equal(pixels, norm.decodes(xb).as_subclass(torch.Tensor))
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    encoded = encode(pixels, stats)
    assert torch.equal(encoded, norm.encodes(TensorImage(pixels)).as_subclass(torch.Tensor))
    assert torch.allclose(encoded, xb.as_subclass(torch.Tensor), atol=1e-6)
    owned = pixels.clone()
    assert encode_(owned, stats) is owned and torch.equal(owned, encoded)
    assert torch.equal(xb, before)


def test_several_normalize_run_in_order(dl):
    first = Normalize.from_stats([0.2] * 3, [0.5] * 3, cuda=False)
    second = Normalize(torch.tensor(0.1), torch.tensor(2.0))  # 0-d statistics broadcast as [1, 1, 1, 1]
    two = dl.new(after_batch=[IntToFloatTensor(), first, second])
    assert find_normalize(two) is second
    stats = normalize_stats(two, 'cpu', torch.float64)
    assert [stat.shape for pair in stats for stat in pair] == [(1, 3, 1, 1)] * 2 + [(1, 1, 1, 1)] * 2
    assert all(stat.dtype == torch.float64 for pair in stats for stat in pair)
    xb, _ = two.one_batch()
    stats = normalize_stats(two, 'cpu')
    pixels = decode(xb, stats)
    assert torch.equal(pixels, first.decodes(second.decodes(xb)).as_subclass(torch.Tensor))
    expected = second.encodes(first.encodes(TensorImage(pixels))).as_subclass(torch.Tensor)
    assert torch.equal(encode(pixels, stats), expected)
    assert torch.equal(encode_(pixels.clone(), stats), expected)


def test_without_normalize_the_batch_is_pixels(dl):
    plain = dl.new(after_batch=[IntToFloatTensor()])
    assert find_normalize(plain) is None and normalize_stats(plain, 'cpu') == []
    for loader in (None, [1, 2], torch.utils.data.DataLoader(range(4))):  # no fastai after_batch at all
        assert find_normalize(loader) is None and normalize_stats(loader, 'cpu') == []
    xb, _ = plain.one_batch()
    pixels = decode(xb, [])
    assert type(pixels) is torch.Tensor and pixels.data_ptr() != xb.data_ptr()  # a copy the caller may edit
    assert torch.equal(pixels, xb.as_subclass(torch.Tensor))
    assert torch.equal(decode(xb.mul(255).byte(), []), (xb * 255).byte().float())  # always float
    assert encode(pixels, []) is pixels and encode_(pixels, []) is pixels


def test_normalize_without_statistics_is_refused(dl):
    unset = Normalize()  # mean and std come from `setups`, which only building the DataLoaders runs
    loader = dl.new(after_batch=[IntToFloatTensor(), unset])
    assert find_normalize(loader) is unset and unset.mean is None
    with pytest.raises(ValueError, match='Normalize has no statistics yet; build the DataLoaders'):
        normalize_stats(loader, 'cpu')
    with pytest.raises(ValueError, match='no statistics'):
        channel_stats(Normalize(), 'cpu')


def test_pixel_range_problem_names_what_is_not_a_pixel_in_0_1():
    pixels = torch.rand(2, 3, 4, 4)
    assert pixel_range_problem(pixels) is None
    assert pixel_range_problem(pixels * 1.005) is None  # interpolation overshoot, as AugMix's own input check
    assert pixel_range_problem(torch.empty(0, 3, 4, 4)) is None
    assert pixel_range_problem(pixels * 255).startswith('values in [')
    assert pixel_range_problem(pixels - 0.5).startswith('values in [-0.')
    assert pixel_range_problem(pixels.index_fill(0, torch.tensor([1]), float('inf'))) == 'values in [' + \
        f"{float(pixels[0].min()):.3g}, inf]"
    with_nan = pixels.clone()
    with_nan[1, 2, 3, 3] = float('nan')
    assert pixel_range_problem(with_nan) == 'NaN values'
    assert pixel_range_problem(pixels.requires_grad_()) is None  # no autograd needed to read values


def test_random_erasing_is_found_in_the_batch_transforms(dl):
    from fastai.vision.augment import RandomErasing
    assert not erases_with_noise(dl) and not erases_with_noise(None)
    erasing = dl.new(after_batch=list(dl.after_batch.fs) + [RandomErasing()])
    assert erases_with_noise(erasing)
