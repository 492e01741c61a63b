"""Cross-entropy plus the Jensen-Shannon consistency loss of AugMix, as a fastai loss.

Reference semantics: `timm.loss.JsdCrossEntropy` (checked in tests/test_loss.py), itself
the loss of the AugMix paper's `imagenet.py` (https://arxiv.org/abs/1912.02781).
"""
import numbers

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


def smoothed_cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.) -> Tensor:
    """Per-row label-smoothed cross-entropy of `logits` [B, C] against class indices [B] or soft targets [B, C].

    timm's formula, `(1 - s) * CE(target) + s * mean_c(-log p_c)`, used for soft targets too,
    so a one-hot soft target gives the integer-target loss and the loss is linear in the target
    (what MixUp/CutMix rely on when they lerp two per-image losses).
    """
    log_probs = F.log_softmax(_promoted(logits), dim=-1)
    if target.is_floating_point():
        nll = -(target.to(log_probs.dtype) * log_probs).sum(dim=-1)
    else:
        nll = -log_probs.gather(dim=-1, index=target.long().unsqueeze(1)).squeeze(1)
    if smoothing == 0:
        return nll
    return (1. - smoothing) * nll - smoothing * log_probs.mean(dim=-1)


def jensen_shannon(split_logits: Tensor) -> Tensor:
    """Per-image Jensen-Shannon divergence of the k softmax distributions in `split_logits` [k, B, C] -> [B].

    The generalised JSD of the paper, mean_i KL(p_i || M) with M the mixture clamped to
    [1e-7, 1] as timm does. Log-probabilities come from `log_softmax` rather than the log of a
    softmax, so saturated logits (|x| ~ 1e4) give p = 0 with a finite log p: finite loss and gradients.
    """
    log_probs = F.log_softmax(_promoted(split_logits), dim=-1)
    probs = log_probs.exp()
    log_mixture = probs.mean(dim=0).clamp(MIXTURE_FLOOR, 1.).log()
    kl_per_split = (probs * (log_probs - log_mixture)).sum(dim=-1)
    return kl_per_split.mean(dim=0)


def _shape(x: Tensor) -> tuple:
    return tuple(x.shape)


def check_reduction(reduction) -> None:
    "Raise a ValueError unless `reduction` is one of 'mean', 'sum', 'none'."
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'mean', 'sum' or 'none', got {reduction!r}")


def split_count(pred: Tensor, target: Tensor, num_splits: int | None) -> int:
    """Number of splits k = prediction rows / target rows, after checking both layouts; raises ValueError.

    Everything is checked on shapes and dtypes only, so nothing waits for the GPU.
    """
    if pred.ndim != 2:
        raise ValueError(
            f"JsdCrossEntropy expects predictions of shape [rows, classes], got {_shape(pred)}; "
            f"flatten the extra dimensions (pred.view(-1, n_classes)) or use a per-pixel loss.")
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


# An nn.Module with `forward` rather than a plain class with `__call__` (both satisfy fastai's
# loss protocol): timm's training scripts do `loss_fn = loss_fn.to(device)` and fastai's
# TrainEvalCallback calls `.to(device)` on nn.Module losses, so being a Module keeps the loss a
# drop-in for timm's; `forward` (not an overridden `__call__`) keeps PyTorch's hooks working.
class JsdCrossEntropy(nn.Module):
    """Label-smoothed cross-entropy on the clean split + `alpha` x Jensen-Shannon divergence between splits.

    Predictions hold k blocks of B rows (clean images first, then k - 1 augmented views);
    targets describe the B clean images (class indices [B] or soft targets [B, C]). With
    k == 1 (validation, inference) the loss is plain label-smoothed cross-entropy, so one
    object serves the whole Learner. Same constructor, defaults and values as timm's loss.
    """
    y_int = True  # MixUp/CutMix lerp the losses of two integer targets instead of the targets
    consumes_splits = True  # AugMixCallback: pass k*B predictions with B targets, do not repeat targets

    def __init__(self, num_splits: int | None = 3, alpha: float = 12, smoothing: float | None = 0.1,
                 reduction: str = "mean"):
        super().__init__()
        if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral)
                                       or num_splits < 1):
            raise ValueError(f"num_splits must be an integer >= 1 (clean split included) or None for any "
                             f"split count, got {num_splits!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha < float("inf"):
            raise ValueError(f"alpha (weight of the JSD term) must be a finite number >= 0, got {alpha!r}; "
                             f"the paper uses 12, 0 switches the consistency term off")
        # timm treats smoothing=None as no smoothing; accepted so timm configs work unchanged.
        if smoothing is None:
            smoothing = 0.
        if isinstance(smoothing, bool) or not isinstance(smoothing, numbers.Real) or not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be a number in [0, 1), got {smoothing!r}; 0.1 is timm's default, "
                             f"0 the paper's exact setting")
        check_reduction(reduction)
        self.num_splits = num_splits
        self.alpha = alpha
        self.smoothing = smoothing
        # A plain attribute: fastai's NoneReduce and Learner.loss_not_reduced set it to 'none' and back.
        self.reduction = reduction
        self.last_cross_entropy: Tensor | None = None
        self.last_consistency: Tensor | None = None

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        "The loss of `pred` [k*B, C] logits against `target` [B] or [B, C], reduced by `self.reduction`."
        check_reduction(self.reduction)
        k = split_count(pred, target, self.num_splits)
        n_images = target.shape[0]
        cross_entropy = smoothed_cross_entropy(pred[:n_images], target, self.smoothing)
        if k == 1 or self.alpha == 0:
            per_image = cross_entropy
            consistency = cross_entropy.new_zeros(())
        else:
            # reshape, not split + stack: the k blocks are contiguous, so this is a view
            weighted_jsd = self.alpha * jensen_shannon(pred.reshape(k, n_images, pred.shape[1]))
            per_image = cross_entropy + weighted_jsd
            consistency = weighted_jsd.detach().mean()
        # Kept as tensors: reading them with .item() every batch would sync the GPU.
        self.last_cross_entropy = cross_entropy.detach().mean()
        self.last_consistency = consistency
        if self.reduction == "mean":
            return per_image.mean()
        if self.reduction == "sum":
            return per_image.sum()
        return per_image

    def activation(self, x: Tensor) -> Tensor:
        "Probabilities from logits, what `get_preds` returns."
        return F.softmax(x, dim=-1)

    def decodes(self, x: Tensor) -> Tensor:
        "Predicted class indices."
        return x.argmax(dim=-1)

    def extra_repr(self) -> str:
        return (f"num_splits={self.num_splits}, alpha={self.alpha}, smoothing={self.smoothing}, "
                f"reduction={self.reduction!r}")

    def __getstate__(self) -> dict:
        # The last batch's tensors may live on the GPU; an exported Learner should not carry them.
        state = super().__getstate__()
        state["last_cross_entropy"] = None
        state["last_consistency"] = None
        return state
