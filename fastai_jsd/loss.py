"""Cross-entropy plus the Jensen-Shannon consistency loss of AugMix, as a fastai loss.

Reference semantics: `timm.loss.JsdCrossEntropy` (checked in tests/test_loss.py), itself
the loss of the AugMix paper's `imagenet.py` (https://arxiv.org/abs/1912.02781). Dense
predictions (segmentation) are timm's loss applied to every pixel that counts.
"""
import numbers
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")

# timm and the AugMix code clamp the mixture before its log so a class that every split
# rules out cannot make KL(p_i || M) explode; the same bound keeps values and gradients equal.
MIXTURE_FLOOR = 1e-7


def _promoted(logits: Tensor) -> Tensor:
    "`logits` in at least float32: half-precision softmax over many classes loses the small probabilities."
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def smoothed_cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0., class_dim: int = -1) -> Tensor:
    """Per-row (per-pixel) label-smoothed cross-entropy of `logits` against class indices or soft targets.

    `logits` [B, C] with targets [B] or [B, C]; or [B, C, *spatial] with `class_dim=1` and class
    indices [B, *spatial]. timm's formula, `(1 - s) * CE(target) + s * mean_c(-log p_c)`, which is
    torch's `label_smoothing=s` too (the uniform part s / C on every class, the true one included).
    Used for soft targets as well, so a one-hot soft target gives the integer-target loss and the
    loss is linear in the target (what MixUp/CutMix rely on when they lerp two per-image losses).
    Integer targets must be valid class indices: mask ignored pixels out before calling.
    """
    log_probs = F.log_softmax(_promoted(logits), dim=class_dim)
    if target.is_floating_point():
        nll = -(target.to(log_probs.dtype) * log_probs).sum(dim=class_dim)
    else:
        nll = -log_probs.gather(dim=class_dim, index=target.long().unsqueeze(class_dim)).squeeze(class_dim)
    if smoothing == 0:
        return nll
    return (1. - smoothing) * nll - smoothing * log_probs.mean(dim=class_dim)


def jensen_shannon(split_logits: Tensor, class_dim: int = -1) -> Tensor:
    """Per-image (per-pixel) Jensen-Shannon divergence of the k softmax distributions in `split_logits`.

    `split_logits` is [k, B, C] -> [B], or [k, B, C, *spatial] with `class_dim=2` -> [B, *spatial].
    The generalised JSD of the paper, mean_i KL(p_i || M) with M the mixture clamped to
    [1e-7, 1] as timm does. Log-probabilities come from `log_softmax` rather than the log of a
    softmax, so saturated logits (|x| ~ 1e4) give p = 0 with a finite log p: finite loss and gradients.
    """
    log_probs = F.log_softmax(_promoted(split_logits), dim=class_dim)
    probs = log_probs.exp()
    log_mixture = probs.mean(dim=0).clamp(MIXTURE_FLOOR, 1.).log()
    # A class that a split rules out (logit -inf, a masked class) has p = 0 and log p = -inf: its term is
    # 0 log 0 = 0, as in F.kl_div (timm's JSD), not 0 * -inf = nan. Masked before the product, so the
    # gradient is finite too.
    log_ratio = (log_probs - log_mixture).masked_fill(torch.isneginf(log_probs), 0.)
    kl_per_split = (probs * log_ratio).sum(dim=class_dim)
    return kl_per_split.mean(dim=0)


def _shape(x: Tensor) -> tuple:
    return tuple(x.shape)


def _brief(value) -> str:
    "`value` for an error message: a tensor by its shape and dtype (never its values), anything else by a short repr."
    if isinstance(value, Tensor):
        return f"a tensor of shape {_shape(value)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_reduction(reduction) -> None:
    "Raise a ValueError unless `reduction` is one of 'mean', 'sum', 'none'."
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum' or 'none', got {_brief(reduction)}")


def _check_row_targets(pred: Tensor, target: Tensor) -> None:
    "Targets for predictions [rows, C]: class indices [B] or soft targets [B, C]."
    n_classes = pred.shape[1]
    if target.is_floating_point():
        if target.ndim != 2 or target.shape[1] != n_classes:
            raise ValueError(
                f"float targets are soft targets and need shape [B, {n_classes}] to match predictions "
                f"{_shape(pred)}, got {_shape(target)}; pass one distribution over the {n_classes} "
                f"classes per clean image, or integer class indices of shape [B].")
    elif target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"targets must be integer class indices [B] or float soft targets [B, C], "
                        f"got dtype {target.dtype} with shape {_shape(target)}")
    elif target.ndim != 1:
        raise ValueError(
            f"integer targets must be class indices of shape [B], got {_shape(target)} for predictions "
            f"{_shape(pred)}; pass target.view(-1), or float soft targets of shape [B, {n_classes}].")


def _check_dense_targets(pred: Tensor, target: Tensor) -> None:
    "Targets for dense predictions [k*B, C, *spatial]: class indices [B, *spatial], one per pixel."
    spatial = ", ".join(str(size) for size in pred.shape[2:])
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            f"dense predictions {_shape(pred)} ([k*B, C, *spatial], class axis 1) need integer class indices "
            f"[B, {spatial}] as targets, got dtype {target.dtype} with shape {_shape(target)}; per-pixel soft "
            f"targets are not supported: pass target.argmax(1) for one class per pixel.")
    if target.ndim != pred.ndim - 1 or target.shape[1:] != pred.shape[2:]:
        raise ValueError(
            f"JsdCrossEntropy got {_shape(pred)} predictions for targets {_shape(target)}: predictions with axes "
            f"beyond [rows, classes] are dense ([k*B, C, *spatial], class axis 1) and need integer targets "
            f"[B, {spatial}], one class index per pixel. Pass masks of that shape; or, for one label per image, "
            f"predictions [rows, classes] (pool the extra axes, or pred.view(len(pred), -1) if they have size 1).")


def split_count(pred: Tensor, target: Tensor, num_splits: int | None) -> int:
    """Number of splits k = prediction rows / target rows, after checking both layouts; raises ValueError.

    Everything is checked on shapes and dtypes only, so nothing waits for the GPU.
    """
    if pred.ndim < 2:
        raise ValueError(
            f"JsdCrossEntropy expects predictions of shape [rows, classes], got {_shape(pred)}; "
            f"flatten the extra dimensions (pred.view(-1, n_classes)) or use a per-pixel loss.")
    if pred.ndim == 2:
        _check_row_targets(pred, target)
    else:
        _check_dense_targets(pred, target)
    n_targets = target.shape[0]
    if n_targets == 0 or pred.shape[0] % n_targets != 0:
        raise ValueError(
            f"prediction rows ({pred.shape[0]}, predictions {_shape(pred)}) must be a multiple k of the "
            f"target rows ({n_targets}, target {_shape(target)}); pass one target per clean image and "
            f"the predictions of k splits stacked in blocks of B rows, clean block first.")
    k = pred.shape[0] // n_targets
    if k > 1 and num_splits is not None and k != num_splits:
        raise ValueError(
            f"predictions {_shape(pred)} for targets {_shape(target)} hold k={k} splits but the loss "
            f"was built with num_splits={num_splits}; pass num_splits={k} or None to accept any k.")
    return k


def counted_targets(target: Tensor, ignore_index: int) -> Tensor | None:
    """Where integer `target` is not `ignore_index`; None (all count) when no value of its dtype can equal it.

    Compared against the dtype's range first, not in the dtype: in uint8, -100 would wrap to 156 and 300 to 44,
    and those classes would silently stop counting.
    """
    limits = torch.iinfo(target.dtype)
    if not limits.min <= ignore_index <= limits.max:
        return None
    return target != ignore_index


def _masked(values: Tensor, counted: Tensor | None) -> Tensor:
    "`values` with the entries that do not count set to 0 (and so given no gradient)."
    return values if counted is None else torch.where(counted, values, 0.)


def _counted_mean(masked_values: Tensor, counted: Tensor | None) -> Tensor:
    "Mean over the counted entries of `masked_values` (0 where they do not count); 0, not nan, when none counts."
    if counted is None:
        return masked_values.mean()
    # A tensor division, not `if counted.any()`: no host sync. An all-ignored batch gives 0 and zero gradients
    # where torch's F.cross_entropy gives nan, so one crop that is all 'Void' cannot poison the weights.
    return masked_values.sum() / counted.sum().clamp(min=1)


def _per_image(masked_values: Tensor, counted: Tensor | None) -> Tensor:
    "One value per clean image: the row itself, or the mean over that image's counted pixels."
    if masked_values.ndim == 1:
        return masked_values
    if counted is None:
        return masked_values.flatten(1).mean(dim=1)
    return masked_values.flatten(1).sum(dim=1) / counted.flatten(1).sum(dim=1).clamp(min=1)


# An nn.Module with `forward` rather than a plain class with `__call__` (both satisfy fastai's
# loss protocol): timm's training scripts do `loss_fn = loss_fn.to(device)` and fastai's
# TrainEvalCallback calls `.to(device)` on nn.Module losses, so being a Module keeps the loss a
# drop-in for timm's; `forward` (not an overridden `__call__`) keeps PyTorch's hooks working.
class JsdCrossEntropy(nn.Module):
    """Label-smoothed cross-entropy on the clean split + `alpha` x Jensen-Shannon divergence between splits.

    Predictions hold k blocks of B rows (clean images first, then k - 1 augmented views);
    targets describe the B clean images only: class indices [B] or soft targets [B, C]. With
    k == 1 (validation, inference) the loss is plain label-smoothed cross-entropy, so one
    object serves the whole Learner. Same constructor, defaults and values as timm's loss.
    k is read from the shapes (prediction rows / target rows), so targets repeated to k*B rows,
    as timm's AugMix collate makes them, read as k = 1: plain cross-entropy on all k*B rows and
    no consistency term. Pass the B clean targets. Training on one split (the predictions require
    grad) with `num_splits` > 1 warns once per loss object; `num_splits=1` says one split is meant.

    Dense predictions (segmentation) [k*B, C, *spatial], class axis 1 as in `F.cross_entropy`, take
    class indices [B, *spatial]: the same loss for every pixel, i.e. timm's loss applied to the
    flattened pixels. Pixels (or rows) whose target is `ignore_index` count in neither term.
    `smoothing` is timm's, which equals torch's `label_smoothing` (s / C on every class, the true one
    included), so k == 1 is `F.cross_entropy(pred, target, label_smoothing=s, ignore_index=i)`.
    Reductions: 'mean' averages over the counted pixels of the batch (as `F.cross_entropy`), 'sum'
    sums over them, 'none' gives one value per clean image (the mean over its counted pixels, what
    fastai's `get_preds(with_loss=True)` and MixUp expect). A batch with no counted pixel gives 0.
    The loss is float32 whatever the logits' dtype (computed in float64 for float64 logits), as fastai's
    losses are; a logit of -inf (a masked class) adds nothing to the JSD, as in timm.
    """
    y_int = True  # MixUp/CutMix lerp the losses of two integer targets instead of the targets
    # The protocol AugMixCallback reads: True = give me k*B predictions with the B clean targets. A function
    # that wraps this loss (adding a regulariser, say) sets it too; without it the callback repeats the targets.
    consumes_splits = True

    def __init__(self, num_splits: int | None = 3, alpha: float = 12, smoothing: float | None = 0.1,
                 reduction: str = "mean", ignore_index: int = -100):
        super().__init__()
        if isinstance(num_splits, Tensor) and isinstance(alpha, Tensor):
            raise TypeError(
                f"JsdCrossEntropy was called with predictions {_shape(num_splits)} and targets {_shape(alpha)} as "
                f"its settings: the class was passed where a loss object is needed. Pass an instance, "
                f"loss_func=JsdCrossEntropy() (not loss_func=JsdCrossEntropy).")
        if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral)
                                       or num_splits < 1):
            raise ValueError(f"num_splits must be an integer >= 1 (clean split included) or None for any "
                             f"split count, got {_brief(num_splits)}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha < float("inf"):
            raise ValueError(f"alpha (weight of the JSD term) must be a finite number >= 0, got {_brief(alpha)}; "
                             f"the paper uses 12, 0 switches the consistency term off")
        # timm treats smoothing=None as no smoothing; accepted so timm configs work unchanged.
        if smoothing is None:
            smoothing = 0.
        if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be a number in [0, 1), got {_brief(smoothing)}; 0.1 is timm's "
                             f"default, 0 the paper's exact setting")
        check_reduction(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise ValueError(f"ignore_index must be an integer (the target value of pixels that do not count, "
                             f"-100 as in torch), got {_brief(ignore_index)}")
        self.num_splits = num_splits
        self.alpha = alpha
        self.smoothing = smoothing
        self.ignore_index = int(ignore_index)
        # A plain attribute: fastai's NoneReduce and Learner.loss_not_reduced set it to 'none' and back.
        self.reduction = reduction
        self.last_cross_entropy: Tensor | None = None
        self.last_consistency: Tensor | None = None
        self._warned_one_split = False

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        "The loss of `pred` [k*B, C, *spatial] logits against `target` [B, *spatial] or [B, C], reduced by `self.reduction`."
        check_reduction(self.reduction)
        k = split_count(pred, target, self.num_splits)
        if k == 1 and pred.requires_grad and torch.is_grad_enabled():
            self._warn_one_split_in_training()
        n_images = target.shape[0]
        counted = None
        if not target.is_floating_point():
            counted = counted_targets(target, self.ignore_index)
            # any valid class where the target is ignored: those entries are masked below
            target = target.long() if counted is None else torch.where(counted, target.long(), 0)
        # class axis 1 for rows [B, C] and dense [B, C, *spatial] alike
        cross_entropy = _masked(smoothed_cross_entropy(pred[:n_images], target, self.smoothing, class_dim=1), counted)
        per_pixel = cross_entropy
        consistency = cross_entropy.new_zeros(())
        if k > 1 and self.alpha != 0:
            # reshape, not split + stack: the k blocks are contiguous, so this is a view
            splits = pred.reshape(k, n_images, *pred.shape[1:])
            weighted_jsd = _masked(self.alpha * jensen_shannon(splits, class_dim=2), counted)
            per_pixel = cross_entropy + weighted_jsd
            consistency = _counted_mean(weighted_jsd.detach(), counted)
        # Kept as tensors: reading them with .item() every batch would sync the GPU.
        self.last_cross_entropy = _counted_mean(cross_entropy.detach(), counted).float()
        self.last_consistency = consistency.float()
        if self.reduction == "mean":
            loss = _counted_mean(per_pixel, counted)
        elif self.reduction == "sum":
            loss = per_pixel.sum()
        else:
            loss = _per_image(per_pixel, counted)
        # float32 whatever the logits, like fastai's losses (its BaseLoss casts float64 predictions; its Recorder
        # needs float32). Cast last, so float64 logits still get float64 gradients (the cast's gradient is exact).
        return loss.float()

    def _warn_one_split_in_training(self) -> None:
        """Warn once per loss object when it trains on one split although it was built for `num_splits` > 1.

        One split while training (autograd records the predictions) is label-smoothed cross-entropy without the
        consistency term: the splits were never stacked, or were stacked with targets repeated to match.
        Validation and inference run without grad, so they never warn.
        """
        if self.num_splits in (None, 1) or getattr(self, "_warned_one_split", False):
            return
        self._warned_one_split = True
        warnings.warn(
            f"JsdCrossEntropy(num_splits={self.num_splits}) is training on one split (as many predictions as "
            f"targets), so it is label-smoothed cross-entropy alone, with no Jensen-Shannon consistency term. The "
            f"term needs the predictions of the clean images and of their augmented views stacked, with the clean "
            f"targets only: in fastai add cbs=AugMixCallback() to the Learner, and if the loss is wrapped in another "
            f"function, set `consumes_splits = True` on the wrapper (else the callback repeats the targets). If one "
            f"split is what you mean, pass num_splits=1. (Shown once per loss object.)", stacklevel=2)

    @staticmethod
    def _class_dim(x: Tensor) -> int:
        # dense logits [B, C, *spatial] have their classes on axis 1, as fastai's CrossEntropyLossFlat(axis=1)
        return 1 if x.ndim > 2 else -1

    def activation(self, x: Tensor) -> Tensor:
        "Probabilities from logits (over axis 1 for dense logits), what `get_preds` returns."
        return F.softmax(x, dim=self._class_dim(x))

    def decodes(self, x: Tensor) -> Tensor:
        "Predicted class indices (per pixel for dense logits)."
        return x.argmax(dim=self._class_dim(x))

    def extra_repr(self) -> str:
        return (f"num_splits={self.num_splits}, alpha={self.alpha}, smoothing={self.smoothing}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")

    def __getstate__(self) -> dict:
        # The last batch's tensors may live on the GPU; an exported Learner should not carry them.
        state = super().__getstate__()
        state["last_cross_entropy"] = None
        state["last_consistency"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        # Learners exported before ignore_index (or the one-split warning) existed unpickle with the defaults.
        state.setdefault("ignore_index", -100)
        state.setdefault("_warned_one_split", False)
        super().__setstate__(state)
