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
import time

import matplotlib
matplotlib.use('Agg')  # figures only go to files, so no display is needed
import matplotlib.pyplot as plt

from fastai.vision.all import *

from course import course_parser, find_model, finish_args, label_loss_curves, suggested_lr
from fastai_jsd import CORRUPTIONS, AugMixCallback, JsdCrossEntropy, evaluate_robustness, plot_corruption_errors
from fastai_jsd.data import fashion_dls

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
    parser = course_parser(__doc__.splitlines()[0], out='./augmix_out', arch='small_cnn', size=28, bs=64,
                           arch_help="small_cnn (this script's), a fastai/torchvision model (resnet18, xresnet18) "
                                     "or a timm model name (resnet10t)",
                           quick_help='a smoke test: 640 training and 200 validation images, one epoch')
    parser.add_argument('--full', action='store_true',
                        help='the full Fashion-MNIST (60000/10000) from /usr/share/datasets/fashion-mnist '
                             '(apt-get install dataset-fashion-mnist): about 12x longer')
    args = finish_args(parser, parser.parse_args(argv), dict(epochs=1, bs=1, size=8))
    if model_of(args.arch) is None:
        parser.error(f"--arch {args.arch!r} is neither small_cnn, a fastai/torchvision model nor a timm model; "
                     f"try small_cnn, resnet18, xresnet18 or resnet10t")
    return args


def model_of(arch):
    "This script's small_cnn, a fastai/torchvision model function, a timm model name, or None."
    return small_cnn if arch == 'small_cnn' else find_model(arch)


def make_learner(dls, arch, augmix, out):
    "A Learner of `arch` for one-channel images: plain cross-entropy, or AugMix views + the JSD consistency loss."
    # smoothing=0 is the paper's loss (timm's default adds label smoothing 0.1): AugMix + JSD is then the only
    # difference from the baseline, and smoothing would make the model less confident, muddling calibration.
    loss_func = JsdCrossEntropy(smoothing=0) if augmix else CrossEntropyLossFlat()
    cbs = [AugMixCallback()] if augmix else []
    model = model_of(arch)
    # path=out: anything the Learner saves goes to --out, not to the current folder
    if model is small_cnn:
        return Learner(dls, small_cnn(n_in=1, n_out=dls.c), loss_func=loss_func, cbs=cbs, metrics=error_rate,
                       path=out)
    return vision_learner(dls, model, pretrained=False, n_in=1, loss_func=loss_func, cbs=cbs, metrics=error_rate,
                          path=out)


def train(args, name):
    "Build, lr_find and fit one model; returns the Learner and its seconds."
    # The same seed before each model: same initial weights, same batch order, so AugMix + JSD is the difference.
    set_seed(args.seed, reproducible=True)
    learn = make_learner(load_data(args), args.arch, augmix=name == 'augmix_jsd', out=args.out)
    start = time.perf_counter()
    lr = suggested_lr(learn, MODELS[name], args.out / f'lr_find_{name}.png', args.quick)
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
        label_loss_curves(ax, learn.loss_func)
    fig.savefig(paths[1], bbox_inches='tight')
    fig, ax = plt.subplots(figsize=(12, 4))
    plot_corruption_errors({MODELS[name]: result for name, result in results.items()}, ax=ax)
    fig.savefig(paths[2], bbox_inches='tight')
    plt.close('all')
    return paths + [out / f'lr_find_{name}.png' for name in MODELS]


def versions():
    "The versions the numbers depend on: the same seed gives other numbers with other kernels and defaults."
    import platform
    import fastai, timm, torchvision
    return (f'python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, '
            f'fastai {fastai.__version__}, timm {timm.__version__}, numpy {np.__version__}')


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = 'the full Fashion-MNIST' if args.full else 'the Fashion-MNIST sample'
    print(f'{args.arch} at {args.size} px on {data}{" (quick subset)" if args.quick else ""}, '
          f'{args.epochs} epoch(s) per model, on {default_device()}')
    print(versions())
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
