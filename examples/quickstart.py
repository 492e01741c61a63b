"""Quickstart: does AugMix + JSD make a Fashion-MNIST classifier more robust? Train both and measure.

    pip install -e .
    python examples/quickstart.py               # a few minutes on a CPU (measured: README.md, Results)
    python examples/quickstart.py --quick       # a smoke test in under a minute
    python examples/quickstart.py --arch resnet18 --size 32 --epochs 4

Trains two models of the same architecture from the same initial weights on the Fashion-MNIST sample
bundled with fastai_jsd (5000 training, 1000 validation images; `--full` uses the whole data set if it
is installed): a baseline with plain cross-entropy, and one with `AugMixCallback` + `JsdCrossEntropy`.
Each gets its own `lr_find` and `fit_one_cycle`. Both are then evaluated on the same corrupted copies of
the validation set (15 CIFAR-10-C corruptions x 5 severities), and the script prints a table of clean
error, mean corruption error and RMS calibration error, and writes it, the per-corruption errors and
the figures to `--out`. Nothing is downloaded: `pretrained=False` throughout.
"""
import argparse
import math
import tempfile
import time
from pathlib import Path

import matplotlib
matplotlib.use('Agg')  # figures only go to files, so no display is needed
import matplotlib.pyplot as plt

from fastai.vision.all import *

from fastai_jsd import CORRUPTIONS, AugMixCallback, JsdCrossEntropy, evaluate_robustness, plot_corruption_errors
from fastai_jsd.data import fashion_dls

# On this data, 'valley' moves between 6e-4 and 1.5e-2 with the seed alone (measured), and an unlucky 6e-4
# leaves a model under-trained after a few epochs, which would decide the comparison. Adam + one-cycle
# trains a from-scratch CNN with batch norm well anywhere in LR_RANGE, so the suggestion is kept inside it.
LR_RANGE = (1e-3, 1e-2)
FALLBACK_LR = 3e-3  # when lr_find gives nothing usable (loss nan from the start)
MODELS = {'baseline': 'baseline (cross-entropy)', 'augmix_jsd': 'AugMix + JSD'}


def small_cnn(n_in=1, n_out=10, widths=(32, 64, 128, 256)):
    """Plain conv-BN-ReLU stages, stride 2 after the first: 28 px -> 4 px, about 0.4M parameters.

    Keeps full resolution in the first layer, unlike an ImageNet stem that drops 28 px images to 7 px,
    and costs little enough on a CPU to train both models for several epochs.
    """
    layers = [ConvLayer(n_in, widths[0])]
    layers += [ConvLayer(ni, nf, stride=2) for ni, nf in zip(widths, widths[1:])]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(widths[-1], n_out))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=Path, default=Path('./augmix_out'), help='folder for the table and figures')
    parser.add_argument('--quick', action='store_true',
                        help='a smoke test: 640 training and 200 validation images, one epoch')
    parser.add_argument('--epochs', type=int, default=None, help='epochs per model (default 6, --quick 1)')
    parser.add_argument('--size', type=int, default=28, help='image size in pixels (Fashion-MNIST is 28)')
    parser.add_argument('--arch', default='small_cnn',
                        help="small_cnn (this script's), a fastai/torchvision model (resnet18, xresnet18) "
                             "or a timm model name (resnet10t)")
    parser.add_argument('--bs', type=int, default=64, help='clean images per batch (AugMix + JSD sees 3x)')
    parser.add_argument('--seed', type=int, default=42)
    parser.add_argument('--full', action='store_true',
                        help='the full Fashion-MNIST (60000/10000) from /usr/share/datasets/fashion-mnist '
                             '(apt-get install dataset-fashion-mnist): about 12x longer')
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 1 if args.quick else 6
    for name, least in dict(epochs=1, bs=1, size=8).items():
        if getattr(args, name) < least:
            parser.error(f'--{name} must be at least {least}, got {getattr(args, name)}')
    if find_model(args.arch) is None:
        parser.error(f"--arch {args.arch!r} is neither small_cnn, a fastai/torchvision model nor a timm model; "
                     f"try small_cnn, resnet18, xresnet18 or resnet10t")
    return args


def find_model(name):
    "The fastai/torchvision model function called `name`, the timm name itself, or None."
    if name == 'small_cnn':
        return small_cnn
    candidate = globals().get(name)  # what `from fastai.vision.all import *` brought in
    if callable(candidate) and candidate.__module__.startswith(('torchvision.models', 'fastai.vision.models')):
        return candidate
    import timm
    return name if name in timm.list_models() else None


def make_learner(dls, arch, augmix, out):
    "A Learner of `arch` for one-channel images: plain cross-entropy, or AugMix views + the JSD consistency loss."
    # smoothing=0 is the paper's loss (timm's default adds label smoothing 0.1): AugMix + JSD is then the only
    # difference from the baseline, and smoothing would make the model less confident, muddling calibration.
    loss_func = JsdCrossEntropy(smoothing=0) if augmix else CrossEntropyLossFlat()
    cbs = [AugMixCallback()] if augmix else []
    model = find_model(arch)
    # path=out: anything the Learner saves goes to --out, not to the current folder
    if model is small_cnn:
        return Learner(dls, small_cnn(n_in=1, n_out=dls.c), loss_func=loss_func, cbs=cbs, metrics=error_rate,
                       path=out)
    return vision_learner(dls, model, pretrained=False, n_in=1, loss_func=loss_func, cbs=cbs, metrics=error_rate,
                          path=out)


def suggested_lr(learn, name, out, quick):
    "lr_find's 'valley' suggestion, kept within LR_RANGE; its figure (model, rate used) is saved to `out`."
    suggestion = lr_find_leaving_no_files(learn, num_it=20 if quick else 100, suggest_funcs=(valley,))
    lr = float(suggestion.valley)
    low, high = LR_RANGE
    used = FALLBACK_LR if math.isnan(lr) else min(max(lr, low), high)
    if used != lr:
        print(f'{MODELS[name]}: lr_find suggested {lr:.2g}, using {used:.2g}')
    label_lr_find(plt.gcf(), MODELS[name], loss_name(learn.loss_func), lr, used)
    plt.gcf().savefig(out / f'lr_find_{name}.png', bbox_inches='tight')
    plt.close('all')
    return used


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


def label_lr_find(fig, model_name, loss, suggested, used):
    "Title lr_find's figure with the model and its loss, and mark the suggestion and the learning rate fit used."
    ax = fig.axes[0]
    for line in ax.get_lines():
        if line.get_label() == 'valley':
            line.set_label(f"lr_find's valley suggestion: {suggested:.2g}")
    ax.axvline(used, color='tab:red', linestyle='--', label=f'used by fit_one_cycle: {used:.2g}')
    ax.set_title(f'lr_find: {model_name}')
    ax.set_ylabel(f'training loss, smoothed\n({loss})')
    ax.set_xlabel('learning rate (log scale)')
    ax.legend(loc='best')
    return fig


def train(args, name):
    "Build, lr_find and fit one model; returns the Learner and its seconds."
    # The same seed before each model: same initial weights, same batch order, so AugMix + JSD is the difference.
    set_seed(args.seed, reproducible=True)
    learn = make_learner(load_data(args), args.arch, augmix=name == 'augmix_jsd', out=args.out)
    start = time.perf_counter()
    lr = suggested_lr(learn, name, args.out, args.quick)
    print(f'\n{MODELS[name]}: fit_one_cycle({args.epochs}, {lr:.2g})')
    learn.fit_one_cycle(args.epochs, lr)
    return learn, time.perf_counter() - start


def load_data(args):
    "Fashion-MNIST as one-channel DataLoaders; --quick keeps the first 640 training and 200 validation images."
    dls = fashion_dls(size=args.size, bs=args.bs, full=args.full, channels=1, seed=args.seed)
    if args.quick:
        dls = DataLoaders(dls.train.new(n=640), dls.valid.new(n=200))
    return dls


def evaluation_loader(dls):
    "The validation images in batches of 250: each corruption call then has more images to work on at once."
    return dls.valid.new(bs=250, n=dls.valid.n, shuffle=False, drop_last=False)


def summary_table(results, seconds):
    "One row per model: the numbers the AugMix paper reports, as fractions."
    rows = {}
    for name, result in results.items():
        rows[MODELS[name]] = dict(clean_error=result.clean_error,
                                  mean_corruption_error=result.mean_corruption_error,
                                  mce_vs_baseline=1.0 if result.mce is None else result.mce,
                                  rms_calibration_clean=result.clean_calibration,
                                  rms_calibration_corrupted=result.corrupted_calibration,
                                  train_seconds=seconds[name])
    return pd.DataFrame.from_dict(rows, orient='index').rename_axis('model')


def print_table(table):
    "The summary as a markdown table, errors in percent."
    print('\n| model | clean error | mean corruption error | mCE (baseline = 100) | RMS calib. clean '
          '| RMS calib. corrupted | train + lr_find |')
    print('|---|---|---|---|---|---|---|')
    for model, row in table.iterrows():
        print(f'| {model} | {row.clean_error:.1%} | {row.mean_corruption_error:.1%} | '
              f'{row.mce_vs_baseline * 100:.1f} | {row.rms_calibration_clean:.1%} | '
              f'{row.rms_calibration_corrupted:.1%} | {row.train_seconds:.0f} s |')


def save_figures(learners, results, out):
    "The AugMix batch grid, both training curves and the per-corruption errors; returns all figures' paths."
    paths = [out / 'augmix_batch.png', out / 'training_curves.png', out / 'corruption_errors.png']
    learners['augmix_jsd'].aug_mix.show(n=8).savefig(paths[0], bbox_inches='tight')
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, learn) in zip(axes, learners.items()):
        learn.recorder.plot_loss(ax=ax)
        ax.set_title(MODELS[name])
    fig.savefig(paths[1], bbox_inches='tight')
    fig, ax = plt.subplots(figsize=(12, 4))
    plot_corruption_errors({MODELS[name]: result for name, result in results.items()}, ax=ax)
    fig.savefig(paths[2], bbox_inches='tight')
    plt.close('all')
    return paths + [out / f'lr_find_{name}.png' for name in MODELS]


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = 'the full Fashion-MNIST' if args.full else 'the Fashion-MNIST sample'
    print(f'{args.arch} at {args.size} px on {data}{" (quick subset)" if args.quick else ""}, '
          f'{args.epochs} epoch(s) per model, on {default_device()}')
    learners, seconds = {}, {}
    for name in MODELS:
        learners[name], seconds[name] = train(args, name)
    eval_dl = evaluation_loader(learners['augmix_jsd'].dls)
    print(f'\nEvaluating both models on {eval_dl.n} validation images, clean and under '
          f'{len(CORRUPTIONS)} corruptions x 5 severities...')
    set_seed(args.seed)  # the corruptions' random draws
    augmix_result = evaluate_robustness(learners['augmix_jsd'], dl=eval_dl, baseline=learners['baseline'])
    results = {'baseline': augmix_result.baseline, 'augmix_jsd': augmix_result}

    table = summary_table(results, seconds)
    table.to_csv(args.out / 'results.csv', float_format='%.6g')
    per_condition = pd.concat([result.table.assign(model=MODELS[name]) for name, result in results.items()])
    per_condition.to_csv(args.out / 'corruption_errors.csv', index=False, float_format='%.6g')
    print_table(table)
    if args.quick:
        print('(--quick trains on 640 images for one epoch: a smoke test, not a comparison)')
    figures = save_figures(learners, results, args.out)
    print(f'\nTable: {args.out / "results.csv"} (errors per corruption and severity: '
          f'{args.out / "corruption_errors.csv"})')
    print('Figures: ' + ', '.join(str(path) for path in figures))
    print(f'Total time: {time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    main()
