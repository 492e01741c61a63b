"""Segmentation: does AugMix + JSD make a U-Net more robust? Train a baseline and an AugMix + JSD model and measure.

    pip install -e .
    python examples/segmentation.py                  # Fashion-MNIST segmentation, no download: ~7 min on 2 CPU cores
    python examples/segmentation.py --quick          # a smoke test: a few hundred images, one epoch, ~25 s
    python examples/segmentation.py --path ~/.fastai/data/camvid_tiny --size 96 --bs 8 --epochs 10

The task: every pixel of a Fashion-MNIST garment gets the garment's class (1-10), the background 0
(`fastai_jsd.data.fashion_segmentation_dls`, built from the sample bundled with fastai_jsd). `--path`
takes a CamVid-style folder instead (images/, labels/ and codes.txt, as fastai's URLs.CAMVID_TINY);
a 'Void' code is left out of the loss and the pixel error (ignore_index; fastai's
JaccardCoeffMulti in the training table still counts it).

Two `unet_learner`s of the same architecture, from the same initial weights (pretrained=False): a
baseline with `CrossEntropyLossFlat(axis=1)`, and one with `AugMixCallback()` + `JsdCrossEntropy`. The
callback sees mask targets and draws its views from the appearance ops only (no rotate, shear or
translate), so every pixel of a view keeps its label. Each model gets its own `lr_find` and
`fit_one_cycle`. Both are then scored on the same corrupted copies of the validation images with
`evaluate_robustness` (pixel error and mean IoU, clean and corrupted), printed side by side and
written to `--out` with a figure of predictions and one of the AugMix views.
"""
import functools
import time
from pathlib import Path

import matplotlib
matplotlib.use('Agg')  # figures only go to files, so no display is needed
import matplotlib.pyplot as plt

from fastai.vision.all import *

from course import course_parser, finish_args, suggested_lr
from fastai_jsd import AugMixCallback, JsdCrossEntropy, evaluate_robustness
from fastai_jsd.data import fashion_segmentation_dls

MODELS = {'baseline': 'baseline (cross-entropy)', 'augmix_jsd': 'AugMix + JSD'}
QUICK = dict(train=256, valid=64)


def small_encoder(pretrained=False, n_in=3, widths=(8, 16, 32, 64)):
    """Four conv-BN-ReLU stages, stride 2 after the first, and a pooled head that `unet_learner` cuts off.

    About 0.3M parameters as a U-Net: the first stage keeps the full resolution (an ImageNet stem would take
    28 px images down to 7 px at once), and it trains in minutes on a CPU.
    """
    layers = [ConvLayer(n_in, widths[0])] + [ConvLayer(ni, nf, stride=2) for ni, nf in zip(widths, widths[1:])]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(widths[-1], 10))


ARCHS = {'small': small_encoder, 'resnet18': resnet18, 'resnet34': resnet34}


def parse_args(argv=None):
    parser = course_parser(__doc__.splitlines()[0], out='./segmentation_out', arch='small', size=None, bs=64,
                           epochs=(3, 1), arch_help=f"the U-Net's encoder: {', '.join(sorted(ARCHS))} (small is this "
                                                     f"script's; the resnets are trained from scratch)",
                           quick_help=f"a smoke test: {QUICK['train']} training and {QUICK['valid']} validation "
                                      f"images, one epoch")
    parser.add_argument('--path', type=Path, default=None,
                        help='a CamVid-style folder (images/, labels/, codes.txt) instead of Fashion-MNIST')
    parser.add_argument('--eval-images', type=int, default=500,
                        help='validation images scored under every corruption (default 500; all with --path)')
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 96 if args.path else 28
    args = finish_args(parser, args, dict(epochs=1, bs=1, size=16, eval_images=1))
    if args.arch not in ARCHS:
        parser.error(f"--arch must be one of {', '.join(sorted(ARCHS))}, got {args.arch!r}")
    if args.path is not None:
        missing = [name for name in ('images', 'labels', 'codes.txt') if not (args.path / name).exists()]
        if missing:
            parser.error(f"--path {args.path} is not a CamVid-style folder: it lacks {', '.join(missing)} "
                         f"(expected images/, labels/ with <name>_P.png or <name>.png per image, and codes.txt)")
    return args


# ----- data -----

def label_file(labels, image_file):
    "The mask of `image_file` in the folder `labels`: CamVid's <name>_P<suffix>, else the same file name."
    camvid = labels / f'{image_file.stem}_P{image_file.suffix}'
    return camvid if camvid.exists() else labels / image_file.name


def folder_dls(path, size, bs, seed):
    "A CamVid-style folder as segmentation DataLoaders: valid.txt's images for validation if present, else 20%."
    codes = list(np.loadtxt(path / 'codes.txt', dtype=str, ndmin=1))
    valid_list = path / 'valid.txt'
    splitter = (FileSplitter(valid_list) if valid_list.exists() else RandomSplitter(0.2, seed=seed))
    block = DataBlock(blocks=(ImageBlock, MaskBlock(codes)), get_items=get_image_files,
                      get_y=functools.partial(label_file, path / 'labels'), splitter=splitter,
                      item_tfms=Resize(size), batch_tfms=Normalize.from_stats(*imagenet_stats))
    dls = block.dataloaders(path / 'images', bs=bs, num_workers=0)
    dls.vocab = codes
    return dls


def load_data(args):
    "Fashion-MNIST segmentation (one channel) or the --path folder; --quick keeps a few hundred images."
    if args.path is not None:
        dls = folder_dls(args.path, args.size, args.bs, args.seed)
    else:
        dls = fashion_segmentation_dls(size=args.size, bs=args.bs, channels=1, seed=args.seed)
    if args.quick:
        vocab = dls.vocab
        dls = DataLoaders(dls.train.new(n=min(QUICK['train'], dls.train.n)),
                          dls.valid.new(n=min(QUICK['valid'], dls.valid.n)))
        dls.vocab = vocab
    return dls


def void_index(dls):
    "The index of a 'Void' code (fastai's CamVid lesson leaves it out of the scores), else torch's -100."
    names = [str(code).lower() for code in dls.vocab]
    return names.index('void') if 'void' in names else -100


# ----- training -----

def pixel_error_metric(ignore_index):
    "Fraction of wrongly classified pixels, not counting `ignore_index`: error_rate over pixels."
    def pixel_error(pred, targ):
        counted = targ != ignore_index
        return (pred.argmax(dim=1)[counted] != targ[counted]).float().mean()
    return pixel_error


def make_learner(dls, args, augmix, ignore_index):
    "A U-Net with plain cross-entropy, or with AugMix views and the JSD consistency loss."
    # smoothing=0: the paper's loss, so AugMix + JSD is the only difference from the baseline (as in quickstart.py).
    loss_func = (JsdCrossEntropy(smoothing=0, ignore_index=ignore_index) if augmix
                 else CrossEntropyLossFlat(axis=1, ignore_index=ignore_index))
    cbs = [AugMixCallback()] if augmix else []
    n_in = dls.one_batch()[0].shape[1]
    # path=out: anything the Learner saves goes to --out, not to the current folder
    return unet_learner(dls, ARCHS[args.arch], pretrained=False, n_in=n_in, loss_func=loss_func, cbs=cbs,
                        metrics=[pixel_error_metric(ignore_index), JaccardCoeffMulti()], path=args.out)


def train(args, name, ignore_index):
    "Build, lr_find and fit one model; returns the Learner and its seconds."
    # The same seed before each model: same initial weights and batch order, so AugMix + JSD is the difference.
    set_seed(args.seed, reproducible=True)
    learn = make_learner(load_data(args), args, augmix=name == 'augmix_jsd', ignore_index=ignore_index)
    start = time.perf_counter()
    # lr_find's `minimum` (the lowest loss's rate / 10, the course's rule of thumb), not `valley`: the loss of
    # these small U-Nets keeps falling from 1e-3 to 1e-1, and `valley` (about 7e-4) trains them slowly.
    lr = suggested_lr(learn, MODELS[name], args.out / f'lr_find_{name}.png', args.quick, suggest=minimum)
    print(f'\n{MODELS[name]}: fit_one_cycle({args.epochs}, {lr:.2g})')
    learn.fit_one_cycle(args.epochs, lr)
    return learn, time.perf_counter() - start


# ----- evaluation -----

def evaluation_loader(learn, args):
    "The first --eval-images validation images (all with --path), in order."
    dl = learn.dls.valid
    n = dl.n if args.path is not None else min(args.eval_images, dl.n)
    return dl.new(n=n, bs=min(100, n), shuffle=False, drop_last=False)


def robustness(learn, baseline, dl, seed):
    "`evaluate_robustness` of both models on the same corrupted images: pixel error and mean IoU."
    set_seed(seed)  # the corruptions' random draws
    return evaluate_robustness(learn, dl=dl, baseline=baseline)


def summary_table(learners, result, seconds):
    "One row per model: clean and mean corrupted pixel error and mIoU, mCE, seconds (fractions, not percent)."
    rows = {}
    for name, learn in learners.items():
        own = result if name == 'augmix_jsd' else result.baseline
        rows[MODELS[name]] = dict(clean_pixel_error=own.clean_error, clean_mean_iou=own.clean_mean_iou,
                                  corrupted_pixel_error=own.mean_corruption_error,
                                  corrupted_mean_iou=own.mean_corrupted_iou,
                                  mce_vs_baseline=1.0 if own.mce is None else own.mce, train_seconds=seconds[name])
    return pd.DataFrame.from_dict(rows, orient='index').rename_axis('model')


COLUMNS = {'clean_pixel_error': 'clean pixel error', 'clean_mean_iou': 'clean mIoU',
           'corrupted_pixel_error': 'corrupted pixel error', 'corrupted_mean_iou': 'corrupted mIoU',
           'mce_vs_baseline': 'mCE (baseline = 100)', 'train_seconds': 'lr_find + fit'}


def formatted(column, value):
    if column == 'mce_vs_baseline':
        return f'{value * 100:.1f}'
    return f'{value:.0f} s' if column == 'train_seconds' else f'{value:.1%}'


def print_table(table):
    "The summary as a markdown table, errors and IoU in percent."
    columns = [column for column in COLUMNS if column in table]
    print('\n| model | ' + ' | '.join(COLUMNS[column] for column in columns) + ' |')
    print('|---' * (len(columns) + 1) + '|')
    for model, row in table.iterrows():
        print(f'| {model} | ' + ' | '.join(formatted(column, row[column]) for column in columns) + ' |')


def save_figures(learners, args):
    "Predictions of both models on the same validation images, and the AugMix views; returns their paths."
    paths = []
    for name, learn in learners.items():
        learn.show_results(max_n=6, ncols=3, shuffle=False)  # pairs of target | prediction, same images for both
        plt.gcf().suptitle(f'{MODELS[name]}: mask colour = class, target left, prediction right', y=1.02)
        paths.append(args.out / f'predictions_{name}.png')
        plt.gcf().savefig(paths[-1], bbox_inches='tight')
        plt.close('all')
    fig = learners['augmix_jsd'].aug_mix.show(n=6)
    fig.suptitle('AugMix views for masks: appearance ops only, every pixel keeps its label', y=1.02)
    paths.append(args.out / 'augmix_views.png')
    fig.savefig(paths[-1], bbox_inches='tight')
    plt.close('all')
    return paths


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = str(args.path) if args.path else 'Fashion-MNIST segmentation (bundled sample)'
    print(f'U-Net ({args.arch} encoder) at {args.size} px on {data}{" (quick subset)" if args.quick else ""}, '
          f'{args.epochs} epoch(s) per model, on {default_device()}')
    ignore_index = void_index(load_data(args))
    learners, seconds = {}, {}
    for name in MODELS:
        learners[name], seconds[name] = train(args, name, ignore_index)

    eval_dl = evaluation_loader(learners['augmix_jsd'], args)
    print(f'\nScoring both models on {eval_dl.n} validation images, clean and corrupted...')
    result = robustness(learners['augmix_jsd'], learners['baseline'], eval_dl, args.seed)
    table = summary_table(learners, result, seconds)
    table.to_csv(args.out / 'results.csv', float_format='%.6g')
    print_table(table)
    per_condition = pd.concat([result.baseline.table.assign(model=MODELS['baseline']),
                               result.table.assign(model=MODELS['augmix_jsd'])])
    per_condition.to_csv(args.out / 'corruption_scores.csv', index=False, float_format='%.6g')
    if args.quick:
        print(f"(--quick trains on {QUICK['train']} images for one epoch: a smoke test, not a comparison)")
    figures = save_figures(learners, args)
    print(f'\nTable: {args.out / "results.csv"}')
    print('Figures: ' + ', '.join(str(path) for path in figures + [args.out / f'lr_find_{n}.png' for n in MODELS]))
    print(f'Total time: {time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    main()
