"""`AugMixCallback`: AugMix views of every training image, stacked on the device, for fastai.

One training batch, in the order fastai's events run (see DESIGN.md):
`before_batch` decodes the normalized batch to pixels with the DataLoaders' own `Normalize`,
builds `num_splits - 1` augmented views of every image, re-encodes them and sets
`learn.xb = (cat([clean, aug1, aug2]),)`. The model runs once on `num_splits * B` images.
The loss sees `num_splits * B` predictions and B targets (a loss that does not consume
splits gets its targets repeated instead). `after_loss` puts the clean block back, so
metrics, recorders and other callbacks see B rows. Nothing is swapped, so nothing needs
restoring after a cancelled or crashed fit.

One AugMixCallback belongs to one Learner, like fastai's MixUp or GradientAccumulation: adding it to a
second Learner that still holds it is a ValueError.
"""
import sys
import warnings

import torch
from fastai.callback.core import Callback
from fastai.callback.mixup import MixHandler
from fastai.callback.training import GradientAccumulation
from fastai.learner import Recorder
from fastai.torch_core import TensorMask, find_bs, num_distrib, rank_distrib, retain_type
from fastai.vision.core import TensorBBox, TensorPoint

from fastai_jsd._device import move
from fastai_jsd.augment import BACKENDS, augmix, check_augmix_args, check_fill as check_augmix_fill
from fastai_jsd.pixels import (check_image_batch, decode, encode, encode_, erases_with_noise, normalize_stats,
                               pixel_range_problem)

__all__ = ['AugMixCallback', 'LossPartsRecorder', 'split_batchnorm']


def check_fill(fill):
    """ValueError/TypeError unless `fill` is None or a colour AugMix can fill with, by AugMix's own rule.

    The rule is `fastai_jsd.augment`'s (a finite number in [0, 1], or one per channel, as a sequence or a
    tensor); the channel count is not known before the first batch, so 1 or 3 values are accepted here.
    """
    if fill is not None:
        check_augmix_fill(fill)


def check_augment_output(out, pixels, read_values=True):
    """What a custom `augment` returned, as a detached tensor of `pixels`' dtype; errors name what to change.

    Augmentation is not part of the model, so a result that requires grad is detached (the caller's tensor
    is never modified), and a float64 or float16 result is cast to the batch's dtype. A result on another
    device, of an integer dtype, or (when `read_values`: it reads two numbers back) with values outside
    [0, 1] or NaN is refused: a copy per batch, a 0..255 scale or NaN weights would hide a mistake.
    """
    if not isinstance(out, torch.Tensor) or out.shape != pixels.shape:
        raise ValueError(f"augment must return a tensor of the input's shape {tuple(pixels.shape)}; "
                         f"got {type(out).__name__}{tuple(getattr(out, 'shape', ()))}.")
    if out.device != pixels.device:
        raise ValueError(f"augment must return a tensor on the input's device ({pixels.device}); got one on "
                         f"{out.device}. Create new tensors with device=pixels.device (or torch.*_like(pixels)).")
    if not out.is_floating_point():
        raise TypeError(f"augment must return float pixels in [0, 1] like its input ({pixels.dtype}); got dtype "
                        f"{out.dtype}. Convert 8-bit images with `.float() / 255`.")
    problem = pixel_range_problem(out) if read_values else None
    if problem is not None:
        raise ValueError(f"augment must return pixels in [0, 1] like its input; it returned {problem}. Divide a "
                         f"0..255 scale by 255, clamp overshoots with `.clamp(0, 1)`, and find where NaN come from "
                         f"(a division by zero?): the model would learn from them.")
    return out.detach().to(pixels.dtype)


def clean_rows(pred, batch_size, num_splits):
    """The clean block (first `batch_size` rows) of predictions for `num_splits` stacked splits.

    A model may return several tensors (a tuple or list, e.g. main and auxiliary logits, or a dict): each
    tensor with `num_splits * batch_size` rows is cut; anything else is left as it is.
    """
    if isinstance(pred, torch.Tensor):
        return pred[:batch_size] if pred.ndim and pred.shape[0] == num_splits * batch_size else pred
    if isinstance(pred, dict):
        return type(pred)({key: clean_rows(value, batch_size, num_splits) for key, value in pred.items()})
    if isinstance(pred, (tuple, list)):
        rows = [clean_rows(value, batch_size, num_splits) for value in pred]
        return type(pred)(*rows) if hasattr(pred, '_fields') else type(pred)(rows)  # namedtuples take fields
    return pred


def is_pixel_aligned(y, images):
    """Whether target `y` is tied to the pixel positions of `images` [B, C, H, W], so views must not move pixels.

    A fastai mask, points or boxes; or any tensor [B, ..., H, W] (a map per image: class masks, soft masks,
    depth). Decided from type and shape only, so it costs nothing per batch and never syncs a GPU.
    """
    if isinstance(y, (TensorMask, TensorPoint, TensorBBox)):
        return True
    return (isinstance(y, torch.Tensor) and y.ndim >= 3 and y.shape[0] == images.shape[0]
            and y.shape[-2:] == images.shape[-2:])


def views_geometric(geometric, images, targets):
    """Whether AugMix may rotate, shear and translate: `geometric`, or for None, only when no target is a mask.

    ValueError for `geometric=True` with mask-like targets: the views would no longer match their masks.
    """
    aligned = [y for y in targets if is_pixel_aligned(y, images)]
    if not aligned:
        return geometric is not False
    if geometric:
        described = ", ".join(f"{type(y).__name__}{tuple(y.shape)}" for y in aligned)
        raise ValueError(
            f"AugMixCallback(geometric=True) rotates, shears and translates the training images, but the targets "
            f"({described}) are masks, points or boxes of those images: the augmented views would no "
            f"longer match them. Use geometric=None (the default: appearance ops only when the targets are "
            f"masks) or geometric=False.")
    return False


def repeat_rows(t, times, batch_size):
    """`t` stacked `times` times along the first dim, as contiguous blocks matching the image splits.

    Only per-image tensors (first dim `batch_size`) are repeated: CutMix's `lam` is one number for the batch.
    """
    if not isinstance(t, torch.Tensor) or t.ndim == 0 or t.shape[0] != batch_size or times == 1:
        return t
    return torch.cat([t] * times)


def underlying_loss(loss_func):
    """The user's loss behind fastai's MixUp/CutMix wrapper (a bound `MixHandler.lf`), else `loss_func` itself."""
    handler = getattr(loss_func, '__self__', None)
    if isinstance(handler, MixHandler) and hasattr(handler, 'old_lf'):
        return handler.old_lf
    return loss_func


def describe_loss(loss_func):
    """A loss by its name (a function's own, else its class's), for messages."""
    name = getattr(loss_func, '__name__', None)
    return name if isinstance(name, str) else type(loss_func).__name__


def warn_targets_repeated(loss_func, num_splits):
    """Warn that a loss which does not declare `consumes_splits` trains on repeated targets, without consistency."""
    warnings.warn(
        f"AugMixCallback: the loss ({describe_loss(loss_func)}) does not say whether it takes the stacked splits (it "
        f"has no `consumes_splits` attribute), so its targets are repeated: it trains on the clean and augmented "
        f"images alike ({num_splits} x the batch) with no consistency term. For AugMix + Jensen-Shannon "
        f"consistency use loss_func=JsdCrossEntropy(); a function that wraps JsdCrossEntropy (adding a "
        f"regulariser, say) gets the stacked predictions with the clean targets once it says so: "
        f"`my_loss.consumes_splits = True`. If training this loss on every split is what you want, set "
        f"`consumes_splits = False` on it, which silences this warning.", stacklevel=2)


def split_batchnorm(learn, num_splits=3):
    """Give every BatchNorm2d of `learn.model` one auxiliary BN per augmented split (timm's `--split-bn`).

    The clean block goes through the original BN (same parameter names, so it is what inference and
    `export` use); split i through `aux_bn[i-1]`. Each layer is converted in place with timm's
    `convert_splitbn_model`; the optimizer is dropped so the next `fit` creates one that trains the new
    parameters. BatchNorm1d layers (fastai's head) stay shared, since timm's split layer is 2-D only.
    `export` keeps the `SplitBatchNorm2d` modules; in eval mode they behave as plain BN.
    """
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 2:
        raise ValueError(f"split_batchnorm needs num_splits >= 2 (one main and at least one auxiliary BN); "
                         f"got num_splits={num_splits!r}. Use the AugMixCallback's num_splits.")
    _split_batchnorm2d_(learn.model, num_splits)
    learn.opt = None
    return learn


def _split_batchnorm2d_(module, num_splits):
    """Replace, in place, each plain BatchNorm2d under `module` by timm's SplitBatchNorm2d on the same device."""
    from timm.layers import SplitBatchNorm2d, convert_splitbn_model
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            device = child.running_mean.device if child.running_mean is not None else None
            setattr(module, name, convert_splitbn_model(child, num_splits=num_splits).to(device))
        else:
            _split_batchnorm2d_(child, num_splits)


def _split_bn_counts(model):
    """The distinct `num_splits` of the SplitBatchNorm2d layers in `model`."""
    from timm.layers import SplitBatchNorm2d
    return {m.num_splits for m in model.modules() if isinstance(m, SplitBatchNorm2d)}


# ----- distributed training: fastai's DistributedTrainer (learn.distrib_ctx(), Accelerate + DDP) -----

def rank_seed():
    """A seed for this process's own augmentation draws when several processes train, else None.

    fastai's `set_seed` gives every rank the same global RNG state, so drawing views from it would
    give every rank the same augmentations. Seed + rank is how timm (`random_seed(seed, rank)`) and
    Accelerate (`set_seed(seed, device_specific=True)`) make ranks differ; the base comes from the
    global RNG, so `set_seed` still makes the run reproducible and a second fit draws new views.
    """
    if num_distrib() <= 1:
        return None
    return int(torch.randint(0, 2 ** 62, ())) + rank_distrib()


def _has_split_bn(model):
    """Whether `model` has split BatchNorm: timm's SplitBatchNorm2d, or what a sync-BN conversion made of one."""
    # convert_sync_batchnorm turns a SplitBatchNorm2d into one SyncBatchNorm and keeps its `aux_bn` as a child
    from timm.layers import SplitBatchNorm2d
    return any(isinstance(m, SplitBatchNorm2d) or (isinstance(m, torch.nn.SyncBatchNorm) and hasattr(m, 'aux_bn'))
               for m in model.modules())


def _sync_bn_conflict(learn):
    """Why `learn` would train with SyncBatchNorm and how to avoid it, or None when it would not."""
    # Looked up, not imported: fastai.distributed needs Accelerate, which is an optional dependency.
    trainer_class = getattr(sys.modules.get('fastai.distributed'), 'DistributedTrainer', None)
    if trainer_class is not None and any(isinstance(cb, trainer_class) and cb.sync_bn for cb in learn.cbs):
        return ("fastai's DistributedTrainer(sync_bn=True) (the default of learn.distrib_ctx() and to_distributed()) "
                "would convert the model's BatchNorm layers. Train with learn.distrib_ctx(sync_bn=False): each "
                "rank's split BN then normalizes its own clean and augmented blocks. Or keep SyncBatchNorm and "
                "rebuild the model without split_batchnorm.")
    if any(isinstance(m, torch.nn.SyncBatchNorm) for m in learn.model.modules()):
        return ("The model already has SyncBatchNorm layers (converted by hand, or by an earlier fit under "
                "distrib_ctx(sync_bn=True), which fastai does not undo). Rebuild it, call split_batchnorm on the "
                "new model and train with learn.distrib_ctx(sync_bn=False); or keep SyncBatchNorm without "
                "split_batchnorm.")
    return None


def check_split_bn_without_sync_bn(learn):
    """ValueError when a split-BN model would train with SyncBatchNorm, which silently undoes the split."""
    conflict = _sync_bn_conflict(learn) if _has_split_bn(learn.model) else None
    if conflict is None:
        return
    raise ValueError(
        "Split BatchNorm (split_batchnorm) cannot train with SyncBatchNorm: nn.SyncBatchNorm.convert_sync_batchnorm "
        "turns each SplitBatchNorm2d into one SyncBatchNorm that normalizes all splits together and never runs the "
        "auxiliary BNs (timm's train.py refuses --split-bn with --sync-bn for the same reason). " + conflict)


def holds(learner, cb):
    """Whether `learner` lists `cb` itself among its callbacks (identity, not equality)."""
    return any(c is cb for c in getattr(learner, 'cbs', ()))


def check_single_augmix(learn):
    """ValueError when `learn` holds more than one AugMixCallback: the second would stack views of the first's views."""
    found = [cb for cb in learn.cbs if isinstance(cb, AugMixCallback)]
    if len(found) > 1:
        raise ValueError(f"The Learner has {len(found)} AugMixCallbacks; it needs one. fastai's add_cb and "
                         f"fit(cbs=...) add a callback, they do not replace one: remove the extra one first "
                         f"(learn.remove_cb(learn.aug_mix)) or pass num_splits etc. to a single AugMixCallback.")


class AugMixCallback(Callback):
    """Train on AugMix views of every image: clean first, then `num_splits - 1` independent augmented splits.

    Use with `loss_func=JsdCrossEntropy()` for AugMix + Jensen-Shannon consistency. The callback reads the
    loss's `consumes_splits`: True (JsdCrossEntropy, or a wrapper that says so) gets the k*B stacked
    predictions with the B clean targets; False gets the targets repeated, so it trains on all splits; a
    loss without the attribute is treated as False and warned about once (it has no consistency term).
    `num_splits=1` replaces each image by its AugMix view (the paper's "AugMix without JSD"). `augment`
    replaces AugMix by any callable that maps a pixel batch in [0, 1] to an augmented batch of the same shape.
    `fill=None` fills uncovered areas of rotate/shear/translate with the dataset mean colour (zero after
    normalization, as timm). `geometric=None` leaves rotate, shear and translate out when the targets are
    masks (segmentation: `TensorMask`, or targets [B, ..., H, W]), so every pixel of a view stays where its
    label is; `False` always leaves them out; `True` always uses them and refuses mask targets.
    `backend` picks the AugMix kernels: None = Triton's fused kernels for CUDA batches (no host sync),
    torch's otherwise; 'torch' or 'triton' to choose (see `fastai_jsd.augment.apply_augmix`).
    One AugMixCallback belongs to one Learner: give each Learner its own.
    """
    # After MixUp/CutMix (order 0) so they mix first; before GradientAccumulation (6), which counts
    # `yb` rows in `after_loss`, and before MixedPrecision (10), so AugMix runs outside autocast in float32.
    order = GradientAccumulation.order - 1
    run_valid = False
    # Per-fit and per-batch state stays out of the pickle, so an exported Learner carries no batch even when
    # a fit ended between before_batch and after_loss (an exception skips after_fit).
    _stateattrs = ('_rank_generator', '_rank_seed', 'pixel_stats', 'mean_colour', 'split_loss', 'loss_takes_splits',
                   'clean_xb', 'clean_yb', 'mix_saved', 'erased_with_noise', '_values_checked', '_warned_loss')

    def __init__(self, num_splits=3, severity=3, width=3, depth=-1, alpha=1., all_ops=False, fill=None,
                 augment=None, geometric=None, backend=None):
        if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1:
            raise ValueError(f"num_splits must be an int >= 1 (1 = train on the AugMix view only, "
                             f"3 = clean + 2 views as in the paper); got num_splits={num_splits!r}.")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable mapping a pixel batch [B, C, H, W] in [0, 1] to an "
                            f"augmented batch of the same shape, or None for AugMix; got {type(augment).__name__}.")
        if geometric is not None and not isinstance(geometric, bool):
            raise TypeError(f"geometric must be None (decide from the targets: no rotate, shear or translate for "
                            f"masks), True or False, got {geometric!r}.")
        if augment is None:
            check_augmix_args(severity=severity, width=width, depth=depth, alpha=alpha, all_ops=all_ops)
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None (Triton's fused kernels for CUDA "
                             f"batches, else torch), got {backend!r}.")
        check_fill(fill)
        self.backend = backend
        self.num_splits, self.severity, self.width, self.depth = num_splits, severity, width, depth
        self.alpha, self.all_ops, self.fill, self.augment = alpha, all_ops, fill, augment
        self.geometric = geometric
        self.parts_recorder = LossPartsRecorder()

    # fastai sets `cb.learn` whenever a callback is added (Learner(cbs=...), add_cb, fit(cbs=...)) and clears it
    # on removal. That is where a second Learner is refused, and where the loss-parts recorder (which must run
    # after fastai's Recorder, so it is a callback of its own) joins and leaves the Learner with this one.
    @property
    def learn(self):
        return self.__dict__.get('_learner')

    @learn.setter
    def learn(self, learner):
        previous = self.__dict__.get('_learner')
        if learner is not None and previous is not None and previous is not learner and holds(previous, self):
            raise ValueError(
                "This AugMixCallback already belongs to another Learner, which still has it among its callbacks. "
                "One AugMixCallback belongs to one Learner (as fastai's MixUp or GradientAccumulation): give each "
                "Learner its own AugMixCallback(). To move this one, remove it from the other Learner first "
                "(other_learn.remove_cb(other_learn.aug_mix)).")
        self.__dict__['_learner'] = learner
        recorder = self.__dict__.get('parts_recorder')
        if recorder is None:
            return
        if learner is not None and not holds(learner, recorder):
            learner.add_cb(recorder)
        elif learner is None and previous is not None and holds(previous, recorder):
            previous.remove_cb(recorder)

    # ----- fit-level checks -----
    def before_fit(self):
        """Find the Normalize to decode with and check that loss and model agree with `num_splits`.

        fastai also runs `before_fit` for `validate` and `get_preds`; everything here is cheap and silent.
        """
        self.clean_xb = self.clean_yb = self.mix_saved = None  # a batch left by a crashed fit
        self._values_checked = False
        check_single_augmix(self.learn)
        self.read_normalize(self.dls.train)
        self.split_loss = underlying_loss(self.learn.loss_func)
        self.loss_takes_splits = bool(getattr(self.split_loss, 'consumes_splits', False))
        loss_splits = getattr(self.split_loss, 'num_splits', None) if self.loss_takes_splits else None
        if loss_splits is not None and loss_splits != self.num_splits:
            raise ValueError(f"The loss expects num_splits={loss_splits} but AugMixCallback makes num_splits="
                             f"{self.num_splits}. Pass the same number to both, or JsdCrossEntropy(num_splits=None).")
        bn_splits = _split_bn_counts(self.learn.model)
        if bn_splits and bn_splits != {self.num_splits}:
            raise ValueError(f"The model has split BatchNorm for num_splits={sorted(bn_splits)} but AugMixCallback "
                             f"makes num_splits={self.num_splits}. Call split_batchnorm(learn, {self.num_splits}).")
        check_split_bn_without_sync_bn(self.learn)
        self._rank_seed, self._rank_generator = rank_seed(), None

    def before_train(self):
        """Warn, once per loss, when this fit trains a loss that never said whether it takes the splits.

        Here rather than in `before_fit`, which `validate` and `get_preds` run too; `lr_find` trains, so it counts.
        """
        undeclared = getattr(self.split_loss, 'consumes_splits', None) is None
        if self.num_splits > 1 and undeclared and getattr(self, '_warned_loss', None) is not self.split_loss:
            self._warned_loss = self.split_loss
            warn_targets_repeated(self.split_loss, self.num_splits)

    def after_fit(self):
        """Drop the per-rank generator (`show()` uses the global RNG again) and a batch a cancelled fit left."""
        self._rank_seed = self._rank_generator = None
        self.clean_xb = self.clean_yb = self.mix_saved = None

    def rank_generator(self, device):
        """This rank's AugMix generator on `device` when several processes train; None (global RNG) otherwise."""
        seed = getattr(self, '_rank_seed', None)
        if seed is None:
            return None
        generator = getattr(self, '_rank_generator', None)
        if generator is None or generator.device != device:
            # on the images' device, so sampling adds no host-to-device copy (a stream sync) per batch
            generator = self._rank_generator = torch.Generator(device=device).manual_seed(seed)
        return generator

    # ----- one training batch -----
    def before_batch(self):
        """Stack the clean batch and its augmented views: `learn.xb = (cat([clean, aug1, ...]),)`."""
        images = check_image_batch(self.xb)
        geometric = views_geometric(self.geometric, images, self.yb)
        self.clean_xb, self.clean_yb = self.xb, self.yb
        views = self.augmented_views(images, max(self.num_splits - 1, 1), geometric)
        stacked = views if self.num_splits == 1 else torch.cat([images, views])
        self.learn.xb = (retain_type(stacked, old=images),)
        if self.num_splits > 1 and not self.loss_takes_splits:
            self._repeat_targets()

    def after_loss(self):
        """Hand metrics and later callbacks the clean B rows again (each tensor of a tuple of predictions)."""
        if not self.training or getattr(self, 'clean_xb', None) is None:
            return
        batch_size = self.clean_xb[0].shape[0]
        if self.num_splits > 1:
            self.learn.pred = clean_rows(self.pred, batch_size, self.num_splits)
        self.learn.xb, self.learn.yb = self.clean_xb, self.clean_yb
        self._restore_mix_targets()
        self.clean_xb = self.clean_yb = None

    def augmented_views(self, images, num_views, geometric=True):
        """`num_views` augmented copies of normalized `images`, as contiguous blocks, normalized again."""
        pixels = self.pixels_of(images)
        if num_views > 1:
            pixels = pixels.repeat(num_views, 1, 1, 1)
        views = self.augment_pixels(pixels, geometric)
        # AugMix's output is a new tensor of ours; a custom `augment` may return a tensor it keeps (a cache).
        return self.encode_(views) if self.augment is None else self.encode(views)

    def augment_pixels(self, pixels, geometric=True):
        """The augmentation itself, on pixels in [0, 1]: AugMix (with rotate, shear, translate if `geometric`)
        unless `augment` was given."""
        if self.augment is not None:
            with torch.no_grad():  # augmentation is not part of what the model learns
                out = self.augment(pixels)
            return check_augment_output(out, pixels, read_values=self._read_values(pixels.device))
        return augmix(pixels, severity=self.severity, width=self.width, depth=self.depth, alpha=self.alpha,
                      all_ops=self.all_ops, fill=self.fill_value(pixels),
                      generator=self.rank_generator(pixels.device), geometric=geometric,
                      backend=getattr(self, 'backend', None))

    def _read_values(self, device):
        """Whether to read back the range of a custom augment's result: every batch on the CPU (no cost to
        speak of), else the first batch of each fit only, so that a GPU does not wait for the host every batch."""
        if device.type == 'cpu' or not getattr(self, '_values_checked', False):
            self._values_checked = True
            return True
        return False

    def fill_value(self, pixels):
        """`fill`, or the colour that normalizes to zero (the dataset mean, as timm fills) for normalized data."""
        if self.fill is not None:
            return self.fill
        colour = getattr(self, 'mean_colour', None)
        return 0. if colour is None else move(colour, pixels.device)

    def read_normalize(self, dl):
        """Take the Normalize statistics of `dl` (on its device, as its batches), and the colour that encodes to zero.

        Once per fit (or `show`), so that no batch pays for them. Also notes whether fastai's RandomErasing
        writes noise that decodes outside [0, 1] (see `pixels_of`).
        """
        self.pixel_stats = normalize_stats(dl, device=None)
        self.erased_with_noise = erases_with_noise(dl)
        self.mean_colour = None
        if self.pixel_stats:
            zero = torch.zeros_like(self.pixel_stats[-1][0])
            self.mean_colour = decode(zero, self.pixel_stats).flatten()

    def pixels_of(self, images):
        """The pixels AugMix starts from: `images` decoded, and clipped to [0, 1] after fastai's RandomErasing.

        RandomErasing fills rectangles with N(0, 1) noise after Normalize, so some of their decoded pixels
        leave [0, 1], which AugMix's ops (posterize, solarize, equalize) are not defined for. Only the views
        start from the clipped pixels: the clean split is fastai's erased batch as it is.
        """
        pixels = self.decode(images)
        return pixels.clamp_(0., 1.) if getattr(self, 'erased_with_noise', False) else pixels

    def decode(self, images):
        """Pixels in [0, 1] from a normalized batch, as a new plain float tensor, with the DataLoaders' Normalize."""
        return decode(images, self._stats_like(images))

    def encode_(self, pixels):
        """Normalize `pixels` in place (a tensor this callback owns) with the DataLoaders' statistics."""
        return encode_(pixels, self._stats_like(pixels))

    def encode(self, pixels):
        """`pixels` normalized with the DataLoaders' statistics into a new tensor; `pixels` is left as it is."""
        return encode(pixels, self._stats_like(pixels))

    def _stats_like(self, like):
        """The DataLoaders' Normalize statistics on `like`'s device, as float32 (no copy when they are there)."""
        stats = getattr(self, 'pixel_stats', None) or ()
        return [(move(mean, like.device), move(std, like.device)) for mean, std in stats]

    def _mix_handler(self):
        """fastai's MixUp/CutMix callback when it wraps the loss this batch (it then holds second targets)."""
        for cb in self.learn.cbs:
            if isinstance(cb, MixHandler) and getattr(cb, 'stack_y', False) and hasattr(cb, 'yb1'):
                return cb
        return None

    def _repeat_targets(self):
        """Repeat targets (and MixUp/CutMix's second targets and weights) for a loss that does not take splits."""
        batch_size = self.clean_xb[0].shape[0]
        self.learn.yb = tuple(repeat_rows(y, self.num_splits, batch_size) for y in self.yb)
        handler = self._mix_handler()
        self.mix_saved = None
        if handler is not None:
            self.mix_saved = (handler, handler.yb1, handler.lam)
            handler.yb1 = tuple(repeat_rows(y, self.num_splits, batch_size) for y in handler.yb1)
            handler.lam = repeat_rows(handler.lam, self.num_splits, batch_size)

    def _restore_mix_targets(self):
        """Put MixUp/CutMix's second targets and weights back to B rows."""
        saved = getattr(self, 'mix_saved', None)
        if saved is not None:
            handler, handler.yb1, handler.lam = saved
            self.mix_saved = None

    # ----- looking at it -----
    def show(self, n=8, dl=None, figsize=None, labels=None):
        """A figure of `n` training images: one row each, columns clean, aug1, aug2, ... in pixel space.

        `labels=None` writes each row's class name (the DataLoaders' vocab) when the targets are class indices,
        `True` requires that, `False` leaves rows unlabelled.
        """
        import matplotlib.pyplot as plt
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int (number of images to show); got n={n!r}.")
        if labels not in (None, True, False):
            raise TypeError(f"labels must be None (class names when the data has them), True or False; "
                            f"got {labels!r}.")
        loader = dl if dl is not None else self.dls.train
        self.read_normalize(loader)
        batch = loader.one_batch()
        n_inp = getattr(loader, 'n_inp', 1 if len(batch) == 1 else len(batch) - 1)  # as fastai's Learner splits
        images = check_image_batch(batch[:n_inp])
        geometric = views_geometric(self.geometric, images, batch[n_inp:])
        images = images[:n]
        names = class_names(loader, batch[n_inp:], images.shape[0]) if labels is not False else None
        if labels and names is None:
            raise ValueError("labels=True needs single-label class targets and a vocab (fastai's CategoryBlock); "
                             "these DataLoaders have none. Use labels=None or False.")
        num_views = max(self.num_splits - 1, 1)
        with torch.no_grad():
            pixels = self.pixels_of(images)
            views = self.augment_pixels(pixels.repeat(num_views, 1, 1, 1), geometric)
        columns = [pixels] + list(views.split(images.shape[0]))
        titles = ['clean'] + [f'aug{i + 1}' for i in range(num_views)]
        rows = images.shape[0]
        fig, axes = plt.subplots(rows, len(columns), figsize=figsize or (1.6 * len(columns), 1.6 * rows + 0.4),
                                 squeeze=False)
        for col, (block, title) in enumerate(zip(columns, titles)):
            for row in range(rows):
                _imshow(axes[row, col], block[row])
            axes[0, col].set_title(title)
        for row, name in enumerate(names or []):
            _row_label(axes[row, 0], name)
        what = 'AugMix' if self.augment is None else 'augmented'
        fig.suptitle(f'Training images (clean) and\nthe {what} views the model also sees')
        fig.tight_layout()
        return fig


def class_names(loader, yb, n):
    """The class names of the first `n` targets, or None unless they are class indices and `loader` has a vocab."""
    vocab = getattr(loader, 'vocab', None)
    target = yb[0] if len(yb) == 1 else None
    if vocab is None or not isinstance(target, torch.Tensor) or target.ndim != 1 or target.is_floating_point():
        return None
    return [str(vocab[i]) for i in target[:n].tolist()]


def _row_label(ax, text):
    """Write `text` left of the image in `ax`, as a y-axis label (kept by tight_layout and bbox_inches='tight')."""
    ax.axis('on')
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_ylabel(text, rotation=0, ha='right', va='center')


def _imshow(ax, image):
    """Draw one [C, H, W] pixel image in [0, 1] on `ax` without ticks."""
    picture = image.detach().float().clamp(0, 1).cpu()
    if picture.shape[0] == 1:
        ax.imshow(picture[0].numpy(), cmap='gray', vmin=0, vmax=1)
    else:
        ax.imshow(picture.permute(1, 2, 0).numpy())
    ax.axis('off')


class FollowFittingLearner(Callback):
    """Does nothing. fastai_jsd 0.2.0 let Learners share an AugMixCallback through one of these per Learner;
    Learners exported then hold one, so the name stays for `load_learner`."""


def reports_parts(loss_func):
    """Whether the loss keeps its last batch's two parts (`last_cross_entropy`, `last_consistency`)."""
    return hasattr(loss_func, 'last_cross_entropy') and hasattr(loss_func, 'last_consistency')


class LossPartsRecorder(Callback):
    """Adds the training epochs' cross-entropy and consistency parts to fastai's results table.

    `train_ce` and `train_jsd` are means over the epoch's training images of the loss's two parts (the
    cross-entropy of the clean images, and alpha x the Jensen-Shannon divergence), so their sum is the
    epoch's mean loss, the loss the model was trained on. Under MixUp/CutMix, which lerp the losses of two
    target sets image by image, `train_ce` is that lerp of the two cross-entropies: the loss minus the
    consistency part, which does not depend on the targets. fastai's `train_loss` is not that mean: it is
    `Recorder`'s smoothed loss (an exponential moving average over batches, beta 0.98) at the end of the
    epoch, so it weighs the last batches most and differs from `train_ce + train_jsd`, most in the first epochs.

    The two columns go at the end of the row, before `time`: fastai's own readers of the table keep their
    columns (`ShowGraphCallback` plots column 1 of `recorder.values` as the validation loss). Added and removed
    together with `AugMixCallback`. It runs after `Recorder`, which builds the column names in `before_fit`
    and the row in `after_train`/`after_validate`, and before `ProgressCallback`, `CSVLogger` and
    `SaveModelCallback` read the names, so names and values stay aligned for `final_record`, `recorder.values`
    and `SaveModelCallback(monitor=...)`.
    """
    order = Recorder.order + 1
    run_valid = False
    part_names = ('train_ce', 'train_jsd')
    _stateattrs = ('totals',)  # the running sums, possibly on a GPU: not part of an exported Learner

    def __init__(self):
        self.totals, self.count, self.showing, self.epoch_trained = None, 0, False, False

    def before_fit(self):
        """Add the part columns at the end of the row, before 'time', when the loss reports its parts."""
        self.showing = reports_parts(underlying_loss(self.learn.loss_func)) and hasattr(self.learn, 'recorder')
        self.epoch_trained = False
        if not self.showing:
            return
        names = list(self.recorder.metric_names)
        at = len(names) - 1 if names[-1:] == ['time'] else len(names)
        self.recorder.metric_names = type(self.recorder.metric_names)(names[:at] + list(self.part_names) + names[at:])

    def before_train(self):
        # Only fits train: `validate` and `get_preds` run before_fit and after_validate, but never this.
        self.totals, self.count, self.epoch_trained = None, 0, True

    def after_loss(self):
        """Add one training batch's parts, weighted by its clean images; tensors stay on the device (no sync)."""
        loss_func = underlying_loss(self.learn.loss_func)
        if not self.showing or getattr(loss_func, 'last_consistency', None) is None:
            return
        consistency = torch.as_tensor(loss_func.last_consistency).float()
        if loss_func is not self.learn.loss_func:
            # MixUp/CutMix called the loss twice and lerped the results; only the last call's parts are kept.
            cross_entropy = self.learn.loss.detach().float() - consistency.to(self.learn.loss.device)
        else:
            cross_entropy = torch.as_tensor(loss_func.last_cross_entropy).float()
        batch_size = find_bs(self.learn.yb)
        batch = torch.stack([cross_entropy, consistency.to(cross_entropy.device)]) * batch_size
        self.totals = batch if self.totals is None else self.totals + batch.to(self.totals.device)
        self.count += batch_size

    def after_validate(self):
        """Append the epoch means of the parts to the row Recorder is building (Recorder adds 'time' after)."""
        if not (self.showing and self.epoch_trained):
            return
        self.epoch_trained = False
        if getattr(self.recorder, 'cancel_train', False) or getattr(self.recorder, 'cancel_valid', False):
            return  # fastai leaves the cancelled part's columns out of the row: ours would land under their names
        values = (self.totals / self.count).tolist() if self.count else [float('nan')] * len(self.part_names)
        self.recorder.log = type(self.recorder.log)(list(self.recorder.log) + values)
