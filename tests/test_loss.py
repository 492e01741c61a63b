"""JsdCrossEntropy: timm's values and gradients, the seed notebook's numbers, fastai's loss protocol."""
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.loss import JsdCrossEntropy as TimmJsd
from timm.loss import LabelSmoothingCrossEntropy as TimmLabelSmoothing

from fastai_jsd import JsdCrossEntropy
from fastai_jsd.loss import jensen_shannon, smoothed_cross_entropy

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "jsd_loss_explained.py"

# Gradients of the one-split loss of a num_splits=3 JsdCrossEntropy look like training without splits, which
# warns (tested below, in "training on one split warns"); the tests of the one-split values do not need it.
ONE_SPLIT_GRADIENTS = pytest.mark.filterwarnings("ignore:JsdCrossEntropy.*one split:UserWarning")


def random_logits(rows, n_classes, seed=0, scale=3., dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n_classes, generator=generator, dtype=dtype) * scale


def random_targets(n_images, n_classes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_classes, (n_images,), generator=generator)


def value_and_grad(loss_func, logits, target):
    leaf = logits.clone().requires_grad_()
    value = loss_func(leaf, target)
    value.sum().backward()
    return value.detach(), leaf.grad


def assert_loss_close(ours, reference, **tolerances):
    """Our loss is float32 whatever the logits (fastai's loss dtype, issue 19 item 13): `reference`, computed in
    float64, rounded once. The gradients stay float64 and are compared at float64 precision."""
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference.float(), **(tolerances or dict(rtol=1e-6, atol=1e-7)))


def timm_clean_cross_entropy(logits, target, smoothing):
    "The cross-entropy half of timm's loss, on the clean block."
    clean = logits[:len(target)]
    if smoothing:
        return TimmLabelSmoothing(smoothing)(clean, target)
    return F.cross_entropy(clean, target)


def timm_per_image(logits, target, k, alpha, smoothing):
    "timm's loss for each clean image alone (its k rows and its target): what reduction='none' must give."
    n_images = len(target)
    loss = TimmJsd(num_splits=k, alpha=alpha, smoothing=smoothing)
    return torch.stack([loss(logits[i::n_images], target[i:i + 1]) for i in range(n_images)])


# --- timm reference: value and gradient --------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("n_classes", [2, 10, 1000])
@pytest.mark.parametrize("alpha", [0, 1, 12])
@pytest.mark.parametrize("smoothing", [0, 0.1])
def test_matches_timm_value_and_gradient(k, n_classes, alpha, smoothing):
    logits = random_logits(k * 6, n_classes, seed=k * n_classes + alpha)
    target = random_targets(6, n_classes)
    ours, our_grad = value_and_grad(JsdCrossEntropy(k, alpha, smoothing), logits, target)
    theirs, their_grad = value_and_grad(TimmJsd(k, alpha, smoothing), logits, target)
    assert_loss_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_matches_timm_in_float32_and_with_any_split_count(k):
    logits = random_logits(k * 8, 10, seed=k, dtype=torch.float32)
    target = random_targets(8, 10)
    theirs, their_grad = value_and_grad(TimmJsd(k), logits, target)
    for ours_func in (JsdCrossEntropy(k), JsdCrossEntropy(num_splits=None)):
        ours, our_grad = value_and_grad(ours_func, logits, target)
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(our_grad, their_grad)


@pytest.mark.parametrize("smoothing", [0, 0.1])
@ONE_SPLIT_GRADIENTS
def test_one_split_is_label_smoothed_cross_entropy(smoothing):
    logits = random_logits(12, 7)
    target = random_targets(12, 7)
    ours, our_grad = value_and_grad(JsdCrossEntropy(smoothing=smoothing), logits, target)
    reference = lambda x, y: F.cross_entropy(x, y, label_smoothing=smoothing)
    theirs, their_grad = value_and_grad(reference, logits, target)
    assert_loss_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    assert_loss_close(ours, timm_clean_cross_entropy(logits, target, smoothing))


def test_timm_smoothing_none_means_no_smoothing():
    logits = random_logits(9, 5)
    target = random_targets(3, 5)
    assert_loss_close(JsdCrossEntropy(smoothing=None)(logits, target), TimmJsd(smoothing=None)(logits, target))


# --- the seed notebook ------------------------------------------------------------------------

def test_notebook_clean_row_cross_entropy():
    outputs = F.one_hot(torch.tensor([0, 9, 0])).float()
    target = torch.tensor([0])
    loss = JsdCrossEntropy(smoothing=0, alpha=0)(outputs, target)
    torch.testing.assert_close(loss, F.cross_entropy(outputs[:1], target))
    torch.testing.assert_close(loss, TimmJsd(smoothing=0, alpha=0)(outputs, target))
    assert round(loss.item(), 4) == 1.4612  # the value the notebook printed


def test_notebook_two_splits_is_cross_entropy_of_the_clean_rows():
    outputs = F.one_hot(torch.tensor([0, 9, 1, 0])).float()
    target = torch.tensor([0, 9])
    loss = JsdCrossEntropy(num_splits=2, smoothing=0, alpha=0)(outputs, target)
    torch.testing.assert_close(loss, F.cross_entropy(outputs[:2], target))
    torch.testing.assert_close(loss, TimmJsd(num_splits=2, smoothing=0, alpha=0)(outputs, target))


def notebook_moved_outputs(delta):
    outputs = F.one_hot(torch.tensor([0, 0, 0]), num_classes=10).float()
    outputs[2, 0] += delta
    return outputs


def timm_jsd_term(outputs, target):
    return (TimmJsd(smoothing=0, alpha=1)(outputs, target) - F.cross_entropy(outputs[:1], target)).item()


def test_notebook_jsd_is_zero_for_identical_rows_and_grows_as_one_split_moves():
    target = torch.tensor([0])
    loss = JsdCrossEntropy(smoothing=0, alpha=1)
    deltas = (torch.arange(-10, 11) / 10).tolist()
    divergences = []
    for delta in deltas:
        outputs = notebook_moved_outputs(delta)
        loss(outputs, target)
        divergences.append(loss.last_consistency.item())
        assert divergences[-1] == pytest.approx(timm_jsd_term(outputs, target), abs=1e-6)
    assert divergences[10] == pytest.approx(0, abs=1e-7)
    left, right = divergences[:11], divergences[10:]
    assert all(a > b for a, b in zip(left, left[1:]))
    assert all(a < b for a, b in zip(right, right[1:]))


@pytest.mark.slow  # a fresh interpreter importing fastai.vision.all: 5-20 s on 2 busy cores
def test_example_script_runs_and_prints_the_notebook_values(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLE), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    assert (tmp_path / "out" / "jsd_vs_output_change.png").stat().st_size > 1000
    assert str(tmp_path / "out" / "jsd_vs_output_change.png") in printed

    def number_after(label):
        return float(re.search(re.escape(label) + r"\s*:\s*(-?[0-9.]+)", printed).group(1))

    outputs = F.one_hot(torch.tensor([0, 9, 0])).float()
    assert number_after("clean-row cross-entropy") == 1.4612
    assert number_after("clean-row cross-entropy") == round(
        F.cross_entropy(outputs[:1], torch.tensor([0])).item(), 4)
    outputs2 = F.one_hot(torch.tensor([0, 9, 1, 0])).float()
    assert number_after("num_splits=2 loss") == round(
        F.cross_entropy(outputs2[:2], torch.tensor([0, 9])).item(), 4)
    assert number_after("JSD term, three identical rows") == 0
    assert "pass num_splits=2 or None" in printed
    plotted = {float(d): float(j) for d, j in re.findall(r"delta ([-+][0-9.]+): JSD ([0-9.]+)", printed)}
    assert len(plotted) == 21
    for delta, divergence in plotted.items():
        expected = timm_jsd_term(notebook_moved_outputs(delta), torch.tensor([0]))
        assert divergence == pytest.approx(expected, abs=2e-6)


# --- reductions, the last batch's parts --------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0, 0.1])
def test_reduction_none_gives_timm_loss_per_clean_image(smoothing):
    logits = random_logits(15, 6)
    target = random_targets(5, 6)
    loss = JsdCrossEntropy(alpha=12, smoothing=smoothing, reduction="none")
    per_image = loss(logits, target)
    assert per_image.shape == (5,)
    assert_loss_close(per_image, timm_per_image(logits, target, 3, 12, smoothing))
    loss.reduction = "mean"
    torch.testing.assert_close(loss(logits, target), per_image.mean())
    assert_loss_close(loss(logits, target), TimmJsd(3, 12, smoothing)(logits, target))
    loss.reduction = "sum"
    torch.testing.assert_close(loss(logits, target), per_image.sum())


def test_last_parts_add_up_to_the_mean_loss_and_match_timm():
    loss = JsdCrossEntropy(reduction="sum")
    assert loss.last_cross_entropy is None and loss.last_consistency is None
    logits = random_logits(12, 5, dtype=torch.float32).requires_grad_()
    target = random_targets(4, 5)
    loss(logits, target)
    for part in (loss.last_cross_entropy, loss.last_consistency):
        assert part.shape == () and part.dtype == torch.float32 and not part.requires_grad
    timm_value = TimmJsd()(logits, target)
    clean_cross_entropy = timm_clean_cross_entropy(logits, target, 0.1)
    torch.testing.assert_close(loss.last_cross_entropy, clean_cross_entropy.detach())
    torch.testing.assert_close(loss.last_consistency, (timm_value - clean_cross_entropy).detach())
    torch.testing.assert_close(loss.last_cross_entropy + loss.last_consistency, timm_value.detach())


def test_last_consistency_is_zero_for_one_split():
    loss = JsdCrossEntropy()
    logits = random_logits(4, 5)
    target = random_targets(4, 5)
    loss(logits, target)
    assert loss.last_consistency.item() == 0
    assert_loss_close(loss.last_cross_entropy, F.cross_entropy(logits, target, label_smoothing=0.1))


def test_does_not_modify_its_inputs():
    logits = random_logits(9, 4)
    target = random_targets(3, 4)
    soft = F.one_hot(target, 4).double()
    copies = [logits.clone(), target.clone(), soft.clone()]
    JsdCrossEntropy()(logits, target)
    JsdCrossEntropy(reduction="none")(logits, soft)
    for original, copy in zip((logits, target, soft), copies):
        assert torch.equal(original, copy)


# --- soft targets --------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("smoothing", [0, 0.1])
@ONE_SPLIT_GRADIENTS
def test_one_hot_soft_target_equals_integer_target(k, smoothing):
    logits = random_logits(k * 5, 6)
    target = random_targets(5, 6)
    loss = JsdCrossEntropy(smoothing=smoothing, reduction="none")
    soft_value, soft_grad = value_and_grad(loss, logits, F.one_hot(target, 6).double())
    int_value, int_grad = value_and_grad(loss, logits, target)
    torch.testing.assert_close(soft_value, int_value)
    torch.testing.assert_close(soft_grad, int_grad)


@pytest.mark.parametrize("smoothing", [0, 0.1])
def test_mixed_soft_target_mixes_the_per_image_losses(smoothing):
    logits = random_logits(15, 6)
    target_a = random_targets(5, 6, seed=1)
    target_b = random_targets(5, 6, seed=2)
    lam = torch.tensor([0., 0.2, 0.5, 0.7, 1.], dtype=torch.float64)
    mixed = lam[:, None] * F.one_hot(target_a, 6) + (1 - lam[:, None]) * F.one_hot(target_b, 6)
    loss = JsdCrossEntropy(smoothing=smoothing, reduction="none")
    expected = lam * loss(logits, target_a).double() + (1 - lam) * loss(logits, target_b).double()
    assert_loss_close(loss(logits, mixed), expected)


@pytest.mark.parametrize("smoothing", [0, 0.1])
def test_soft_target_smoothing_matches_torch(smoothing):
    "torch's label smoothing of probability targets is timm's formula: (1-s)*CE(target) + s*mean(-log p)."
    logits = random_logits(6, 8)
    soft = torch.distributions.Dirichlet(torch.ones(8, dtype=torch.float64)).sample((6,))
    expected = F.cross_entropy(logits, soft, label_smoothing=smoothing, reduction="none")
    torch.testing.assert_close(smoothed_cross_entropy(logits, soft, smoothing), expected)
    assert_loss_close(JsdCrossEntropy(smoothing=smoothing, reduction="none")(logits, soft), expected)


# --- numerics beyond timm ------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", [0, 0.1])
def test_huge_logits_give_finite_loss_and_gradients(smoothing):
    logits = random_logits(12, 10, dtype=torch.float32, scale=1e4)
    target = random_targets(4, 10)
    value, grad = value_and_grad(JsdCrossEntropy(smoothing=smoothing), logits, target)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert value > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_give_a_float32_loss(dtype):
    half_logits = random_logits(12, 10, dtype=torch.float32).to(dtype)
    target = random_targets(4, 10)
    loss = JsdCrossEntropy()
    leaf = half_logits.clone().requires_grad_()
    value = loss(leaf, target)
    value.backward()
    assert value.dtype == torch.float32
    assert loss.last_cross_entropy.dtype == loss.last_consistency.dtype == torch.float32
    assert leaf.grad.dtype == dtype and torch.isfinite(leaf.grad.float()).all()
    torch.testing.assert_close(value, TimmJsd()(half_logits.float(), target))


def test_helpers_are_per_sample():
    logits = random_logits(12, 5)
    target = random_targets(4, 5)
    assert smoothed_cross_entropy(logits[:4], target, 0.1).shape == (4,)
    divergence = jensen_shannon(logits.view(3, 4, 5))
    assert divergence.shape == (4,) and (divergence >= 0).all()
    assert jensen_shannon(logits[:4].expand(3, 4, 5)).abs().max() < 1e-12


# --- fastai protocol ----------------------------------------------------------------------------

def test_activation_decodes_and_y_int():
    loss = JsdCrossEntropy()
    logits = random_logits(6, 4)
    torch.testing.assert_close(loss.activation(logits), torch.softmax(logits, dim=-1))
    assert torch.equal(loss.decodes(logits), logits.argmax(dim=-1))
    assert JsdCrossEntropy.y_int is True


def test_none_reduce_sets_and_restores_reduction():
    from fastai.layers import NoneReduce
    loss = JsdCrossEntropy(reduction="sum")
    logits = random_logits(9, 4)
    target = random_targets(3, 4)
    with NoneReduce(loss) as unreduced:
        per_image = unreduced(logits, target)
    assert per_image.shape == (3,)
    assert loss.reduction == "sum"
    torch.testing.assert_close(loss(logits, target), per_image.sum())


@pytest.mark.parametrize("k", [1, 3])
def test_fastai_mixup_loss_wrapper(k):
    "fastai's MixHandler.lf: the loss under NoneReduce for two integer targets, lerped with a per-image lam."
    from fastai.callback.mixup import MixHandler
    logits = random_logits(k * 5, 6)
    target = random_targets(5, 6, seed=1)
    shuffled_target = random_targets(5, 6, seed=2)
    lam = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9])  # float32, as fastai's MixUp draws it
    loss = JsdCrossEntropy(num_splits=3)
    handler = SimpleNamespace(training=True, old_lf=loss, yb1=(shuffled_target,), lam=lam)
    mixed = MixHandler.lf(handler, logits, target)
    if k == 1:
        per_image = lambda y: F.cross_entropy(logits, y, label_smoothing=0.1, reduction="none")
    else:
        per_image = lambda y: timm_per_image(logits, y, k, 12, 0.1)
    expected = torch.lerp(per_image(shuffled_target), per_image(target), lam.double()).mean()
    assert_loss_close(mixed, expected)
    assert loss.reduction == "mean"


def test_pickles_without_the_last_batch():
    loss = JsdCrossEntropy(num_splits=2, alpha=3, smoothing=0.05, reduction="sum")
    logits = random_logits(8, 5)
    target = random_targets(4, 5)
    value = loss(logits, target)
    restored = pickle.loads(pickle.dumps(loss))
    assert restored.last_cross_entropy is None and restored.last_consistency is None
    assert loss.last_cross_entropy is not None  # the original keeps its own
    assert (restored.num_splits, restored.alpha, restored.smoothing, restored.reduction) == (2, 3, 0.05, "sum")
    torch.testing.assert_close(restored(logits, target), value)


def tiny_learner(loss_func, tmp_path, cbs=None):
    "A real fastai Learner on the CPU: 3-class synthetic 1x2x2 'images' (CutMix needs [B, C, H, W]), an MLP."
    from fastai.data.core import Datasets
    from fastai.data.transforms import ItemGetter
    from fastai.learner import Learner
    import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(96, 1, 2, 2, generator=generator)
    labels = (images[:, 0, 0, 0] > 0).long() + (images[:, 0, 0, 1] > 0.5).long()
    items = list(zip(images, labels))
    dsets = Datasets(items, tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(64)), list(range(64, 96))])
    dls = dsets.dataloaders(bs=16, device="cpu", shuffle=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return Learner(dls, model, loss_func=loss_func, cbs=cbs, path=tmp_path)


def test_fastai_learner_fit_get_preds_with_loss_and_export(tmp_path):
    from fastai.learner import load_learner
    loss = JsdCrossEntropy(num_splits=1)  # trained without splits on purpose: the fastai protocol is the point
    learn = tiny_learner(loss, tmp_path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
        probs, targets, decoded, losses = learn.get_preds(with_loss=True, with_decoded=True)
    assert loss.reduction == "mean"
    valid_x = torch.stack([x for x, _ in learn.dls.valid_ds])
    with torch.no_grad():
        logits = learn.model(valid_x)
    torch.testing.assert_close(probs, torch.softmax(logits, dim=-1))
    assert torch.equal(decoded, logits.argmax(dim=-1))
    torch.testing.assert_close(losses, F.cross_entropy(logits, targets, label_smoothing=0.1, reduction="none"))
    with learn.no_bar(), learn.no_logging():
        valid_loss = learn.validate()[0]
    assert valid_loss == pytest.approx(losses.mean().item(), rel=1e-5)

    learn.export(tmp_path / "export.pkl")
    loaded = load_learner(tmp_path / "export.pkl")
    assert isinstance(loaded.loss_func, JsdCrossEntropy)
    assert loaded.loss_func.last_cross_entropy is None and loaded.loss_func.last_consistency is None
    assert loss.last_cross_entropy is not None


def stack_splits_callback():
    "A stand-in for AugMixCallback: the clean batch plus two noisy views, stacked clean first (k = 3)."
    from fastai.callback.core import Callback

    class StackSplits(Callback):
        order = 1  # after MixUp/CutMix (order 0), which mix the clean images
        run_valid = False

        def before_batch(self):
            generator = torch.Generator().manual_seed(self.iter)
            noise = torch.randn(self.x.shape, generator=generator) * 0.1
            self.learn.xb = (torch.cat([self.x, self.x + noise, self.x - noise]),)

    return StackSplits()


@pytest.mark.parametrize("mix", ["MixUp", "CutMix"])
@pytest.mark.parametrize("k", [1, 3])
def test_fastai_learner_trains_with_mixup_and_cutmix(tmp_path, mix, k):
    import fastai.callback.mixup as mixup
    loss = JsdCrossEntropy(num_splits=k)
    cbs = [getattr(mixup, mix)()] + ([stack_splits_callback()] if k == 3 else [])
    learn = tiny_learner(loss, tmp_path, cbs=cbs)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    assert learn.loss_func is loss and loss.reduction == "mean"
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
    assert len(learn.recorder.losses) == 4


# --- bad input: ValueError before any work, naming the shapes and the fix ----------------------

@pytest.mark.parametrize("kwargs, named", [
    (dict(num_splits=0), "num_splits"), (dict(num_splits=-2), "num_splits"), (dict(num_splits=2.5), "num_splits"),
    (dict(num_splits=True), "num_splits"), (dict(alpha=-1), "alpha"), (dict(alpha=float("inf")), "alpha"),
    (dict(alpha="12"), "alpha"), (dict(smoothing=-0.1), "smoothing"), (dict(smoothing=1), "smoothing"),
    (dict(smoothing=1.5), "smoothing"), (dict(reduction="batchmean"), "reduction"), (dict(reduction=None), "reduction"),
])
def test_bad_constructor_arguments_raise(kwargs, named):
    with pytest.raises(ValueError, match=named) as error:
        JsdCrossEntropy(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(error.value)


def test_bad_reduction_set_later_raises_at_call_time():
    loss = JsdCrossEntropy()
    loss.reduction = "avg"
    with pytest.raises(ValueError, match=r"reduction must be one of 'mean', 'sum' or 'none', got 'avg'"):
        loss(random_logits(3, 4), random_targets(1, 4))
    assert loss.last_cross_entropy is None  # nothing computed


def test_rows_not_a_multiple_of_targets_raises():
    with pytest.raises(ValueError, match=r"\(10, 4\).*\(3,\).*one target per clean image"):
        JsdCrossEntropy()(random_logits(10, 4), random_targets(3, 4))
    with pytest.raises(ValueError, match=r"\(0, 4\).*\(0,\)"):
        JsdCrossEntropy()(random_logits(0, 4), random_targets(0, 4))


@pytest.mark.parametrize("k", [2, 4])
def test_split_count_contradicting_num_splits_raises(k):
    with pytest.raises(ValueError, match=rf"\({k * 3}, 5\).*\(3,\).*pass num_splits={k} or None") as error:
        JsdCrossEntropy(num_splits=3)(random_logits(k * 3, 5), random_targets(3, 5))
    assert f"k={k}" in str(error.value) and "num_splits=3" in str(error.value)


def test_num_splits_none_accepts_any_split_count():
    loss = JsdCrossEntropy(num_splits=None)
    for k in (1, 2, 5):
        logits = random_logits(k * 3, 4)
        target = random_targets(3, 4)
        expected = TimmJsd(k)(logits, target) if k > 1 else F.cross_entropy(logits, target, label_smoothing=0.1)
        assert_loss_close(loss(logits, target), expected)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4), (2, 3, 2, 2)])
def test_predictions_that_are_not_2d_raise(shape):
    with pytest.raises(ValueError, match=re.escape(f"got {shape}") + ".*pred.view"):
        JsdCrossEntropy()(torch.zeros(shape), torch.zeros(shape[0], dtype=torch.long))


def test_soft_targets_with_the_wrong_class_count_raise():
    with pytest.raises(ValueError, match=r"\[B, 5\].*\(6, 5\).*got \(2, 4\)"):
        JsdCrossEntropy()(random_logits(6, 5), torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match=r"\[B, 5\].*got \(6,\)"):
        JsdCrossEntropy()(random_logits(6, 5), torch.zeros(6))


@pytest.mark.parametrize("shape", [(3, 1), (3, 2, 2), ()])
def test_integer_targets_that_are_not_1d_raise(shape):
    with pytest.raises(ValueError, match=re.escape(f"got {shape}") + r".*\(6, 5\).*target.view\(-1\)"):
        JsdCrossEntropy()(random_logits(6, 5), torch.zeros(shape, dtype=torch.long))


def test_boolean_targets_raise_type_error():
    with pytest.raises(TypeError, match=r"torch.bool.*\(3,\)"):
        JsdCrossEntropy()(random_logits(3, 5), torch.zeros(3, dtype=torch.bool))


# --- dense predictions (segmentation): class axis 1, targets [B, *spatial] -----------------------------

def dense_case(k, n_images, n_classes, spatial, ignored_fraction=0.2, seed=0):
    "Float64 logits [k*B, C, *spatial] and class-index masks [B, *spatial] with some pixels set to -100."
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(k * n_images, n_classes, *spatial, generator=generator, dtype=torch.float64) * 3
    target = torch.randint(0, n_classes, (n_images, *spatial), generator=generator)
    ignored = torch.rand(target.shape, generator=generator) < ignored_fraction
    return logits, target.masked_fill(ignored, -100)


def per_pixel_reference(logits, target, k, alpha, smoothing, ignore_index=-100):
    "The loss of every pixel from torch's own functions: F.cross_entropy on the clean block + alpha x JSD via F.kl_div."
    n_images = target.shape[0]
    cross_entropy = F.cross_entropy(logits[:n_images], target, label_smoothing=smoothing, ignore_index=ignore_index,
                                    reduction="none")
    if k == 1:
        return cross_entropy
    probs = [F.softmax(split, dim=1) for split in logits.split(n_images)]
    log_mixture = torch.stack(probs).mean(dim=0).clamp(1e-7, 1).log()
    divergence = sum(F.kl_div(log_mixture, p, reduction="none").sum(dim=1) for p in probs) / k
    return cross_entropy + alpha * divergence * (target != ignore_index)


def timm_on_flattened_pixels(logits, target, k, alpha, smoothing, ignore_index=-100):
    "timm's loss with every counted pixel as one row: k blocks of the counted pixels, clean block first."
    n_classes = logits.shape[1]
    rows = logits.movedim(1, -1).reshape(k, -1, n_classes)
    counted = target.reshape(-1) != ignore_index
    pixels = rows[:, counted].reshape(-1, n_classes)
    return TimmJsd(k, alpha, smoothing)(pixels, target.reshape(-1)[counted])


@pytest.mark.parametrize("spatial", [(7,), (3, 5), (2, 3, 4)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("smoothing", [0, 0.1])
@pytest.mark.parametrize("ignored_fraction", [0, 0.3])
def test_dense_matches_per_pixel_reference_and_timm_on_flattened_pixels(spatial, k, smoothing, ignored_fraction):
    logits, target = dense_case(k, 3, 5, spatial, ignored_fraction, seed=k)
    loss = JsdCrossEntropy(num_splits=k, alpha=12, smoothing=smoothing)
    ours, our_grad = value_and_grad(loss, logits, target)
    counted = (target != -100).sum()

    def pixel_mean(x, y):
        return per_pixel_reference(x, y, k, 12, smoothing).sum() / counted
    reference, reference_grad = value_and_grad(pixel_mean, logits, target)
    assert_loss_close(ours, reference)
    torch.testing.assert_close(our_grad, reference_grad, rtol=1e-8, atol=1e-12)
    flattened = lambda x, y: timm_on_flattened_pixels(x, y, k, 12, smoothing) if k > 1 else \
        F.cross_entropy(x, y, label_smoothing=smoothing)
    timm_value, timm_grad = value_and_grad(flattened, logits, target)
    assert_loss_close(ours, timm_value)
    torch.testing.assert_close(our_grad, timm_grad, rtol=1e-8, atol=1e-12)
    # the parts are the per-pixel means of the two terms
    clean_cross_entropy = F.cross_entropy(logits[:3], target, label_smoothing=smoothing)
    assert_loss_close(loss.last_cross_entropy, clean_cross_entropy)
    torch.testing.assert_close(loss.last_cross_entropy + loss.last_consistency, ours)


@pytest.mark.parametrize("smoothing", [0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 0, 4])
@ONE_SPLIT_GRADIENTS
def test_dense_one_split_is_torch_cross_entropy(smoothing, ignore_index):
    "k = 1 is F.cross_entropy with the same label_smoothing and ignore_index, for every reduction."
    logits, target = dense_case(1, 4, 5, (6, 7), ignored_fraction=0.25)
    target = target.masked_fill(target == -100, ignore_index)
    loss = JsdCrossEntropy(smoothing=smoothing, ignore_index=ignore_index)
    for reduction in ("mean", "sum"):
        loss.reduction = reduction
        ours, our_grad = value_and_grad(loss, logits, target)
        reference = lambda x, y: F.cross_entropy(x, y, label_smoothing=smoothing, ignore_index=ignore_index,
                                                 reduction=reduction)
        theirs, their_grad = value_and_grad(reference, logits, target)
        assert_loss_close(ours, theirs)
        torch.testing.assert_close(our_grad, their_grad)
    loss.reduction = "none"
    per_pixel = F.cross_entropy(logits, target, label_smoothing=smoothing, ignore_index=ignore_index,
                                reduction="none")
    counted = (target != ignore_index).flatten(1).sum(1)
    assert_loss_close(loss(logits, target), per_pixel.flatten(1).sum(1) / counted)


def test_smoothing_spreads_s_over_all_classes_as_torch_not_over_the_wrong_ones():
    """timm's (1 - s) CE + s mean_c(-log p_c) is cross-entropy against (1 - s) one_hot + s / C (torch's
    label_smoothing: the true class gets its share of s too), not against s / (C - 1) on the other classes."""
    n_classes, s = 5, 0.2
    logits, target = dense_case(1, 2, n_classes, (3, 4), ignored_fraction=0)
    one_hot = F.one_hot(target, n_classes).movedim(-1, 1).double()
    torch_spread = (1 - s) * one_hot + s / n_classes
    other_spread = (1 - s) * one_hot + s / (n_classes - 1) * (1 - one_hot)
    ours = JsdCrossEntropy(smoothing=s, reduction="none")(logits, target)
    against = lambda soft: F.cross_entropy(logits, soft, reduction="none").flatten(1).mean(1)
    assert_loss_close(ours, against(torch_spread))
    assert (ours - against(other_spread)).abs().min() > 1e-3


def test_dense_reduction_none_is_timm_per_image_and_sum_is_over_counted_pixels():
    logits, target = dense_case(3, 4, 6, (5, 5), ignored_fraction=0.3)
    loss = JsdCrossEntropy(reduction="none")
    per_image = loss(logits, target)
    assert per_image.shape == (4,)
    expected = torch.stack([timm_on_flattened_pixels(logits[i::4], target[i:i + 1], 3, 12, 0.1) for i in range(4)])
    assert_loss_close(per_image, expected)
    loss.reduction = "sum"
    assert_loss_close(loss(logits, target), per_pixel_reference(logits, target, 3, 12, 0.1).sum())


def test_dense_ignored_pixels_get_no_gradient_and_an_all_ignored_batch_gives_zero():
    logits, target = dense_case(3, 2, 4, (4, 4), ignored_fraction=0.5)
    _, grad = value_and_grad(JsdCrossEntropy(), logits, target)
    ignored = (target == -100).repeat(3, 1, 1).unsqueeze(1).expand_as(grad)
    assert (grad[ignored] == 0).all() and (grad[~ignored] != 0).any()
    all_ignored = torch.full_like(target, -100)
    value, grad = value_and_grad(JsdCrossEntropy(), logits, all_ignored)
    assert value == 0 and (grad == 0).all()  # torch's F.cross_entropy gives nan here
    assert torch.isnan(F.cross_entropy(logits[:2], all_ignored))


@ONE_SPLIT_GRADIENTS
def test_ignore_index_applies_to_class_rows_as_in_torch():
    logits = random_logits(6, 4)
    target = random_targets(6, 4).index_fill(0, torch.tensor([1, 4]), -100)
    ours, our_grad = value_and_grad(JsdCrossEntropy(), logits, target)
    theirs, their_grad = value_and_grad(lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1), logits, target)
    assert_loss_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_dense_targets_of_any_integer_dtype(dtype):
    logits, target = dense_case(3, 2, 4, (3, 3), ignored_fraction=0)
    torch.testing.assert_close(JsdCrossEntropy()(logits, target.to(dtype)), JsdCrossEntropy()(logits, target))


def test_dense_activation_and_decodes_are_fastais_axis_1():
    from fastai.losses import CrossEntropyLossFlat
    logits, _ = dense_case(1, 2, 5, (3, 4))
    loss, flat = JsdCrossEntropy(), CrossEntropyLossFlat(axis=1)
    torch.testing.assert_close(loss.activation(logits), torch.softmax(logits, dim=1))
    torch.testing.assert_close(loss.activation(logits), flat.activation(logits))
    assert torch.equal(loss.decodes(logits), logits.argmax(dim=1))
    assert torch.equal(loss.decodes(logits), flat.decodes(logits))


def test_timm_style_repeated_targets_read_as_one_split():
    "k*B targets (timm's collate repeats them) make k = 1: plain cross-entropy on every row, no consistency term."
    logits = random_logits(12, 5)
    target = random_targets(4, 5)
    loss = JsdCrossEntropy()
    repeated = loss(logits, target.repeat(3))
    assert_loss_close(repeated, F.cross_entropy(logits, target.repeat(3), label_smoothing=0.1))
    assert loss.last_consistency == 0
    assert not torch.allclose(repeated, loss(logits, target))


@pytest.mark.parametrize("target_shape", [(2,), (2, 3), (2, 3, 5), (2, 4, 4), (2, 4, 3, 1)])
def test_dense_targets_of_the_wrong_shape_raise(target_shape):
    pred = torch.zeros(6, 5, 4, 3)
    with pytest.raises(ValueError) as error:
        JsdCrossEntropy()(pred, torch.zeros(target_shape, dtype=torch.long))
    message = str(error.value)
    assert "(6, 5, 4, 3)" in message and str(target_shape) in message and "[B, 4, 3]" in message


def test_dense_float_targets_raise_type_error():
    with pytest.raises(TypeError, match=r"integer class indices \[B, 4, 3\].*torch.float32.*argmax"):
        JsdCrossEntropy()(torch.zeros(6, 5, 4, 3), torch.zeros(2, 4, 3))


@pytest.mark.parametrize("value", [1.5, True, "void", None])
def test_bad_ignore_index_raises(value):
    with pytest.raises(ValueError, match=r"ignore_index must be an integer.*got " + re.escape(repr(value))):
        JsdCrossEntropy(ignore_index=value)


def test_ignore_index_survives_pickling():
    loss = pickle.loads(pickle.dumps(JsdCrossEntropy(ignore_index=11)))
    assert loss.ignore_index == 11
    state = JsdCrossEntropy().__getstate__()
    del state["ignore_index"]  # a loss pickled before ignore_index existed
    old = JsdCrossEntropy.__new__(JsdCrossEntropy)
    old.__setstate__(state)
    logits, target = dense_case(1, 2, 4, (3, 3), ignored_fraction=0.3)
    torch.testing.assert_close(old(logits, target), JsdCrossEntropy()(logits, target))


# --- the class passed where an instance is needed (issue 11, item 12) ---------------------------------

def test_class_instead_of_instance_says_so_without_printing_tensors(tmp_path):
    learn = tiny_learner(JsdCrossEntropy, tmp_path)
    with pytest.raises(TypeError) as error, learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    message = str(error.value)
    assert "loss_func=JsdCrossEntropy()" in message and "instance" in message
    assert "tensor(" not in message and len(message) < 400


def test_messages_show_tensors_by_shape_only():
    big = torch.randn(64, 10)
    for kwargs in (dict(num_splits=big), dict(alpha=big), dict(smoothing=big), dict(ignore_index=big),
                   dict(reduction=big)):
        with pytest.raises(ValueError) as error:
            JsdCrossEntropy(**kwargs)
        message = str(error.value)
        assert "tensor(" not in message and "(64, 10)" in message and len(message) < 300


# --- issue 19: integer targets in any dtype, masked classes, float64 models ------------------------------------

@pytest.mark.parametrize("ignore_index, class_that_must_count", [(-100, 156), (300, 44)])
def test_uint8_targets_compare_with_ignore_index_without_wrapping(ignore_index, class_that_must_count):
    """In uint8, -100 is 156 and 300 is 44: compared in the targets' dtype, those classes would be ignored."""
    n_classes = 200
    logits = random_logits(3 * 4, n_classes, seed=3)
    target = torch.tensor([class_that_must_count, 7, class_that_must_count, 199])
    loss = JsdCrossEntropy(ignore_index=ignore_index)
    for reduction in ("mean", "sum", "none"):
        loss.reduction = reduction
        ours, our_grad = value_and_grad(loss, logits, target.to(torch.uint8))
        theirs, their_grad = value_and_grad(loss, logits, target)  # int64: nothing wraps
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(our_grad, their_grad)
        assert our_grad[0].abs().sum() > 0  # the row of that class counts
    reference = TimmJsd(3, 12, 0.1)(logits, target)  # timm has no ignore_index: every row counts
    loss.reduction = "mean"
    assert_loss_close(loss(logits, target.to(torch.uint8)), reference)


def test_uint8_dense_targets_keep_every_class_when_ignore_index_is_out_of_their_range():
    logits, target = dense_case(3, 2, 160, (3, 3), ignored_fraction=0, seed=5)
    target[0, 0, 0] = 156
    loss = JsdCrossEntropy()
    ours, our_grad = value_and_grad(loss, logits, target.to(torch.uint8))
    theirs, their_grad = value_and_grad(loss, logits, target)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)
    loss.reduction = "none"
    torch.testing.assert_close(loss(logits, target.to(torch.uint8)), loss(logits, target))


def masked_class_logits(masked_value):
    "Logits of 3 splits x 4 images where some splits rule classes out (logit `masked_value`), never the target."
    logits = random_logits(12, 5, seed=11)
    for row, column in ((1, 4), (4, 4), (9, 2), (10, 0), (2, 0)):
        logits[row, column] = masked_value
    return logits, torch.tensor([0, 1, 2, 3])


def test_minus_infinity_logits_give_the_finite_loss_of_timm_and_torch():
    """A masked class (logit -inf) with smoothing=0: timm's loss and F.cross_entropy are finite, and so is ours.

    timm's gradient is nan there (its F.kl_div differentiates log 0); with -700 instead of -inf (p ~ 1e-305, the
    smallest float64 magnitudes) timm's value is the same and its gradient finite: the reference for ours."""
    logits, target = masked_class_logits(float("-inf"))
    ours, our_grad = value_and_grad(JsdCrossEntropy(smoothing=0), logits, target)
    assert torch.isfinite(ours) and torch.isfinite(our_grad).all()
    timm_value = TimmJsd(smoothing=0)(logits, target)
    assert torch.isfinite(timm_value)
    assert_loss_close(ours, timm_value)
    finite_logits, _ = masked_class_logits(-700.)
    reference, reference_grad = value_and_grad(TimmJsd(smoothing=0), finite_logits, target)
    assert_loss_close(ours, reference)
    torch.testing.assert_close(our_grad, reference_grad, rtol=1e-8, atol=1e-12)
    # one split is F.cross_entropy, value and gradient
    clean = logits[:4]
    ours, our_grad = value_and_grad(JsdCrossEntropy(num_splits=1, smoothing=0), clean, target)
    theirs, their_grad = value_and_grad(F.cross_entropy, clean, target)
    assert torch.isfinite(theirs) and torch.isfinite(their_grad).all()
    assert_loss_close(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad)


def test_minus_infinity_dense_logits_give_a_finite_loss():
    logits, target = dense_case(3, 2, 4, (3, 3), ignored_fraction=0, seed=2)
    other_class = (target + 1) % 4
    logits[2:4].scatter_(1, other_class.unsqueeze(1), float("-inf"))  # the first augmented split rules a class out
    ours, our_grad = value_and_grad(JsdCrossEntropy(smoothing=0), logits, target)
    assert torch.isfinite(ours) and torch.isfinite(our_grad).all()
    finite = logits.clamp(min=-700.)
    assert_loss_close(ours, timm_on_flattened_pixels(finite, target, 3, 12, 0))


def float64_learner(loss_func):
    "A fastai Learner whose model, inputs and predictions are float64."
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.metrics import accuracy
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(32, 1, 2, 2, generator=generator, dtype=torch.float64)
    labels = (images[:, 0, 0, 0] > 0.5).long()
    data = torch.utils.data.TensorDataset(images, labels)
    dls = DataLoaders(DataLoader(data, bs=8, shuffle=True), DataLoader(data, bs=8), device="cpu")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)).double()
    return Learner(dls, model, loss_func=loss_func, metrics=accuracy)


def test_a_float64_model_trains_as_with_fastais_cross_entropy():
    """fastai's losses cast float64 predictions to float32 and its Recorder needs float32 losses; ours computes in
    float64 and returns float32, so a float64 model trains (the crash was "expected dtype double")."""
    from fastai.losses import CrossEntropyLossFlat
    for loss in (CrossEntropyLossFlat(), JsdCrossEntropy(num_splits=1)):
        learn = float64_learner(loss)
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 1e-2)
            probs, targets, losses = learn.get_preds(with_loss=True)
        assert all(np.isfinite(v) for v in learn.recorder.values[-1])
        assert losses.dtype == torch.float32 and losses.shape == (32,)
    logits = random_logits(6, 3)
    value, grad = value_and_grad(JsdCrossEntropy(num_splits=2), logits, random_targets(3, 3))
    assert value.dtype == torch.float32 and grad.dtype == torch.float64


# --- issue 21, item 1: JsdCrossEntropy trained without splits says so -----------------------------------------

ONE_SPLIT_WARNING = r"JsdCrossEntropy\(num_splits=3\) is training on one split.*AugMixCallback.*num_splits=1"


def test_training_on_one_split_warns_once_per_loss():
    logits = random_logits(4, 5).requires_grad_()
    target = random_targets(4, 5)
    loss = JsdCrossEntropy()
    with pytest.warns(UserWarning, match=ONE_SPLIT_WARNING):
        loss(logits, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(logits, target)  # once per loss object
        loss(random_logits(12, 5).requires_grad_(), target)  # three splits: nothing to say
        JsdCrossEntropy()(logits.detach(), target)  # no grad: validation, get_preds, predict
        with torch.no_grad():
            JsdCrossEntropy()(logits, target)
        JsdCrossEntropy(num_splits=1)(logits, target)  # one split meant
        JsdCrossEntropy(num_splits=None)(logits, target)  # any split count, one included
    with pytest.warns(UserWarning, match=ONE_SPLIT_WARNING):  # timm-style repeated targets are one split too
        JsdCrossEntropy()(random_logits(12, 5).requires_grad_(), target.repeat(3))


def test_a_learner_without_augmix_warns_at_its_first_training_batch_and_not_in_validation(tmp_path):
    import fastai.callback.schedule  # noqa: F401  (adds Learner.lr_find)
    loss = JsdCrossEntropy()
    learn = tiny_learner(loss, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with learn.no_bar(), learn.no_logging():
            learn.validate()
            learn.get_preds(with_loss=True)
    with pytest.warns(UserWarning, match=ONE_SPLIT_WARNING) as record, learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=8, show_plot=False)  # lr_find is a fit
        learn.fit(1, 1e-2)
        learn.fit(1, 1e-2)
    assert sum("one split" in str(w.message) for w in record) == 1
