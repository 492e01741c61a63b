"""What the course-style examples share: their common arguments, the model lookup, and lr_find with its figure.

Imported by quickstart.py, imagenette.py and segmentation.py (`python examples/<script>.py` puts this
folder on the path).
"""
import argparse
import math
import tempfile
from pathlib import Path

import matplotlib
matplotlib.use('Agg')  # figures only go to files, so no display is needed
import matplotlib.pyplot as plt

from fastai.vision.all import *

# 'valley' moves with the seed alone (on Fashion-MNIST between 6e-4 and 1.5e-2, measured), and an unlucky
# low rate leaves a model under-trained after a few epochs, which would decide a comparison. Adam + one-cycle
# trains a from-scratch CNN with batch norm well anywhere in LR_RANGE, so the suggestion is kept inside it.
LR_RANGE = (1e-3, 1e-2)
FALLBACK_LR = 3e-3  # when lr_find gives nothing usable (loss nan from the start)


def course_parser(description, out, arch, arch_help, size, bs, quick_help, epochs=(6, 1)):
    "An argument parser with the options every example has: --out --quick --epochs --size --arch --bs --seed."
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--out', type=Path, default=Path(out), help='folder for the tables and figures')
    parser.add_argument('--quick', action='store_true', help=quick_help)
    parser.add_argument('--epochs', type=int, default=None, help=f'epochs per model (default {epochs[0]}, '
                                                                 f'--quick {epochs[1]})')
    parser.add_argument('--size', type=int, default=size, help='image size in pixels')
    parser.add_argument('--arch', default=arch, help=arch_help)
    parser.add_argument('--bs', type=int, default=bs, help='clean images per batch (AugMix + JSD sees 3x)')
    parser.add_argument('--seed', type=int, default=42)
    parser.set_defaults(default_epochs=epochs)
    return parser


def finish_args(parser, args, minima):
    "Fill --epochs from --quick, and exit with the parser's message when an option is below its minimum."
    if args.epochs is None:
        args.epochs = args.default_epochs[1] if args.quick else args.default_epochs[0]
    for name, least in minima.items():
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    return args


def find_model(name):
    "The fastai/torchvision model function called `name`, the timm model name itself, or None."
    candidate = globals().get(name)  # what `from fastai.vision.all import *` brought in
    if callable(candidate) and candidate.__module__.startswith(('torchvision.models', 'fastai.vision.models')):
        return candidate
    import timm
    return name if name in timm.list_models() else None


def lr_find_leaving_no_files(learn, **kwargs):
    "`learn.lr_find(**kwargs)` with its temporary weights in a temporary folder, so no empty models/ stays behind."
    # fastai saves them under path/model_dir and deletes them, but not the model_dir it created for them
    with tempfile.TemporaryDirectory() as scratch:
        model_dir, learn.model_dir = learn.model_dir, scratch  # absolute, so path/model_dir is scratch
        try:
            return learn.lr_find(**kwargs)
        finally:
            learn.model_dir = model_dir


def loss_name(loss_func):
    "What the training loss of `loss_func` is, in words, for a figure."
    alpha = getattr(loss_func, 'alpha', None)
    return 'cross-entropy' if alpha is None else f'cross-entropy + {alpha:g} x Jensen-Shannon consistency'


def label_loss_curves(ax, loss_func):
    "Name what `Recorder.plot_loss`'s curves measure: validation has one split, so no consistency term."
    ax.set_xlabel('training batches')
    training = loss_name(loss_func)
    ax.set_ylabel(f'loss\ntrain: {training}\nvalid: cross-entropy' if training != 'cross-entropy'
                  else 'loss: cross-entropy (train and valid)')
    return ax


def loss_at(curve, lr):
    "The smoothed loss of lr_find's `curve` (a matplotlib line) at `lr`, interpolated on the log scale it is drawn on."
    rates, losses = np.asarray(curve.get_xdata(), float), np.asarray(curve.get_ydata(), float)
    return float(np.interp(np.log(lr), np.log(rates), losses))


def label_lr_find(fig, model_name, loss, suggested, used, suggestion='valley'):
    "Title lr_find's figure with the model and its loss, and mark the suggestion and the learning rate fit used."
    ax = fig.axes[0]
    curve, *markers = ax.get_lines()  # plot_lr_find draws the loss curve, then one marker per suggestion
    for line in markers:
        if line.get_label() == suggestion:
            # fastai's `minimum` marks the lowest loss but suggests a tenth of its rate, so its marker sat 10x to
            # the right of the value in the legend: every marker goes on the curve at the rate it suggests.
            line.set_data([suggested], [loss_at(curve, suggested)])
            line.set_label(f"lr_find's {suggestion} suggestion: {suggested:.2g}")
    ax.axvline(used, color='tab:red', linestyle='--', label=f'used by fit_one_cycle: {used:.2g}')
    ax.set_title(f'lr_find: {model_name}')
    ax.set_ylabel(f'training loss, smoothed\n({loss})')
    ax.set_xlabel('learning rate (log scale)')
    ax.legend(loc='best')
    return fig


def suggested_lr(learn, model_name, figure_path, quick, suggest=valley):
    """lr_find's suggestion (`valley`, or another of fastai's suggestion functions), kept within LR_RANGE.

    Its figure, naming the model and marking the rate used, is saved to `figure_path`.
    """
    suggestion = lr_find_leaving_no_files(learn, num_it=20 if quick else 100, suggest_funcs=(suggest,))
    lr = float(getattr(suggestion, suggest.__name__))
    low, high = LR_RANGE
    used = FALLBACK_LR if math.isnan(lr) else min(max(lr, low), high)
    if used != lr:
        print(f'{model_name}: lr_find suggested {lr:.2g}, using {used:.2g}')
    label_lr_find(plt.gcf(), model_name, loss_name(learn.loss_func), lr, used, suggest.__name__)
    plt.gcf().savefig(figure_path, bbox_inches='tight')
    plt.close('all')
    return used
