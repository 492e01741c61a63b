"""Segmentation: does AugMix + JSD make a U-Net more robust? Train a baseline and an AugMix + JSD model and measure.

    pip install -e .
    python examples/segmentation.py                  # garments on photos, no download: minutes on 2 CPU cores (README)
    python examples/segmentation.py --all-ops        # AugMix with its brightness/contrast/colour/sharpness ops too
    python examples/segmentation.py --quick          # a smoke test: a few hundred images, one epoch
    python examples/segmentation.py --task on-black  # the garments on their own black background
    python examples/segmentation.py --path ~/.fastai/data/camvid_tiny --size 96 --bs 8 --epochs 10

The default task (`--task scenes`, `fastai_jsd.data.fashion_scenes_dls`): Fashion-MNIST garments (the sample
bundled with fastai_jsd) painted in random colours at random places and sizes over crops of real photographs;
every pixel of a garment gets the garment's class (1-10), the rest is background 0. The labels come from the
garments' shape, not from brightness, so every corruption leaves them valid, and training and validation share
no garment and no background pixel. `--task on-black` is the earlier task: the Fashion-MNIST images themselves,
every pixel >= 8/255 labelled with its garment's class (`fashion_segmentation_dls`); there a corruption that
lifts the black background turns background into garment by definition. `--path` takes a CamVid-style folder
(images/, labels/ and codes.txt, as fastai's URLs.CAMVID_TINY); a 'Void' code is left out of the loss and the
pixel error (ignore_index; fastai's JaccardCoeffMulti in the training table still counts it).

Two `unet_learner`s of the same architecture, from the same initial weights (pretrained=False): a
baseline with `CrossEntropyLossFlat(axis=1)`, and one with `AugMixCallback()` + `JsdCrossEntropy`. The
callback sees mask targets and draws its views from the appearance ops only (no rotate, shear or
translate), so every pixel of a view keeps its label. Each model gets its own `lr_find` and
`fit_one_cycle`. Both are then scored on the same corrupted copies of the validation images with
`evaluate_robustness` (pixel error and mean IoU, clean and corrupted), printed side by side and written to
`--out` with the IoU of each class, a figure of each model's predictions and one of the AugMix views.
"""
import functools
import time
from pathlib import Path

import matplotlib
matplotlib.use('Agg')  # figures only go to files, so no display is needed
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from fastai.vision.all import *

from course import course_parser, finish_args, suggested_lr
from fastai_jsd import AugMixCallback, JsdCrossEntropy, evaluate_robustness
from fastai_jsd.data import fashion_scenes_dls, fashion_segmentation_dls
from fastai_jsd.pixels import decode, encode, normalize_stats
from fastai_jsd.robustness import SEGMENTATION_CORRUPTIONS, corrupt

MODELS = {'baseline': 'baseline (cross-entropy)', 'augmix_jsd': 'AugMix + JSD'}
# Per task: image size, batch size, epochs (default, --quick), validation images scored under the 65 corruption
# conditions (None: all), and the U-Net decoder's norm_type. The scenes take more steps to learn which garment
# is which than where garments are: batches of 16 and batch norm in the decoder get there in minutes on a CPU
# (fastai's default, no norm, trains the decoder visibly slower from scratch). on-black keeps the settings its
# README numbers were measured with.
TASKS = {'scenes': dict(size=32, bs=16, epochs=(6, 1), eval_images=200, norm_type=NormType.Batch),
         'on-black': dict(size=28, bs=64, epochs=(3, 1), eval_images=500, norm_type=None),
         'folder': dict(size=96, bs=64, epochs=(3, 1), eval_images=None, norm_type=None)}
TRAIN_SCENES = 2000
QUICK = dict(train=256, valid=64, eval=16)
FIGURE_ROWS = 6
FIGURE_SEVERITY = 3


def small_encoder(pretrained=False, n_in=3, widths=(8, 16, 32, 64)):
    """Four conv-BN-ReLU stages, stride 2 after the first, and a pooled head that `unet_learner` cuts off.

    About 0.3M parameters as a U-Net: the first stage keeps the full resolution (an ImageNet stem would take
    28 px images down to 7 px at once), and it trains in minutes on a CPU.
    """
    layers = [ConvLayer(n_in, widths[0])] + [ConvLayer(ni, nf, stride=2) for ni, nf in zip(widths, widths[1:])]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(widths[-1], 10))


ARCHS = {'small': small_encoder, 'resnet18': resnet18, 'resnet34': resnet34}


def parse_args(argv=None):
    parser = course_parser(__doc__.splitlines()[0], out='./segmentation_out', arch='small', size=None, bs=None,
                           epochs=TASKS['scenes']['epochs'],
                           arch_help=f"the U-Net's encoder: {', '.join(sorted(ARCHS))} (small is this script's; the "
                                     f"resnets are trained from scratch)",
                           quick_help=f"a smoke test: {QUICK['train']} training and {QUICK['valid']} validation "
                                      f"images, one epoch, {QUICK['eval']} images scored")
    parser.add_argument('--task', choices=('scenes', 'on-black'), default='scenes',
                        help='scenes (default): garments on photo crops, 32 px, batches of 16, 6 epochs; on-black: '
                             'the Fashion-MNIST images themselves, pixels >= 8/255 labelled, 28 px, 64, 3 epochs')
    parser.add_argument('--path', type=Path, default=None,
                        help='a CamVid-style folder (images/, labels/, codes.txt) instead of either task')
    parser.add_argument('--train-scenes', type=int, default=TRAIN_SCENES,
                        help=f'training scenes of --task scenes (default {TRAIN_SCENES}; 500 validation scenes)')
    parser.add_argument('--all-ops', action='store_true',
                        help="AugMixCallback(all_ops=True): also AugMix's colour, contrast, brightness and "
                             "sharpness ops (they overlap the brightness and contrast corruptions)")
    parser.add_argument('--eval-images', type=int, default=None,
                        help='validation images scored under every corruption (default: scenes 200, '
                             'on-black 500, --path all)')
    args = parser.parse_args(argv)
    args.task = 'folder' if args.path is not None else args.task
    defaults = TASKS[args.task]
    if args.size is None:
        args.size = defaults['size']
    if args.bs is None:
        args.bs = defaults['bs']
    if args.eval_images is None:
        args.eval_images = QUICK['eval'] if args.quick else defaults['eval_images']
    args.default_epochs = defaults['epochs']
    minima = dict(epochs=1, bs=1, size=16, train_scenes=1)
    args = finish_args(parser, args, minima if args.eval_images is None else dict(minima, eval_images=1))
    if args.task == 'scenes' and args.size < 32:
        parser.error(f"--size must be at least 32 for --task scenes (smaller garments are specks), got {args.size}")
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


def subset(dls, train, valid):
    "The first `train` training and `valid` validation items of `dls` (--quick), keeping its vocab."
    vocab = dls.vocab
    dls = DataLoaders(dls.train.new(n=min(train, dls.train.n)), dls.valid.new(n=min(valid, dls.valid.n)))
    dls.vocab = vocab
    return dls


def load_data(args):
    "The scenes (RGB), the garments on black (one channel) or the --path folder; --quick keeps a few hundred images."
    if args.task == 'scenes':
        # the scenes are rendered once per process and then shared: each model gets the same data and batch order
        n_train, n_valid = (QUICK['train'], QUICK['valid']) if args.quick else (args.train_scenes, 500)
        return fashion_scenes_dls(size=args.size, bs=args.bs, n_train=n_train, n_valid=n_valid, seed=args.seed)
    if args.task == 'on-black':
        dls = fashion_segmentation_dls(size=args.size, bs=args.bs, channels=1, seed=args.seed)
    else:
        dls = folder_dls(args.path, args.size, args.bs, args.seed)
    return subset(dls, QUICK['train'], QUICK['valid']) if args.quick else dls


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
    cbs = [AugMixCallback(all_ops=args.all_ops)] if augmix else []
    n_in = dls.one_batch()[0].shape[1]
    # path=out: anything the Learner saves goes to --out, not to the current folder
    return unet_learner(dls, ARCHS[args.arch], pretrained=False, n_in=n_in, loss_func=loss_func, cbs=cbs,
                        metrics=[pixel_error_metric(ignore_index), JaccardCoeffMulti()], path=args.out,
                        norm_type=TASKS[args.task]['norm_type'])


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
    n = dl.n if args.eval_images is None else min(args.eval_images, dl.n)
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


def predicted_masks(learn, images, stats):
    "The model's class map [B, H, W] for pixel images [B, C, H, W] in [0, 1]."
    model, training = learn.model, learn.model.training
    try:
        with torch.no_grad():
            return model.eval()(encode(images, stats)).argmax(dim=1)
    finally:
        model.train(training)


def class_iou(learners, dl, vocab, ignore_index, seed):
    """Each class's IoU for each model, clean and under every corruption at severity FIGURE_SEVERITY (mean over
    the corruptions): which classes a model gets right, and which it loses when the images are corrupted."""
    stats = normalize_stats(dl, default_device())
    n_codes = len(vocab)
    counts = {(name, condition): torch.zeros(3, n_codes) for name in learners for condition in ('clean', 'corrupted')}
    generator = torch.Generator(default_device()).manual_seed(seed)
    for xb, yb in dl:
        pixels = decode(xb, stats).clamp_(0, 1)
        versions = [('clean', pixels)] + [('corrupted', corrupt(pixels, name, FIGURE_SEVERITY, generator=generator))
                                          for name in SEGMENTATION_CORRUPTIONS]
        for condition, images in versions:
            for name, learn in learners.items():
                predicted = predicted_masks(learn, images, stats).flatten().cpu()
                target = TensorBase(yb).flatten().cpu()
                counted = target != ignore_index
                predicted, target = predicted[counted], target[counted]
                for code in range(n_codes):  # intersection, prediction, target pixel counts of each class
                    counts[name, condition][:, code] += torch.stack([((predicted == code) & (target == code)).sum(),
                                                                     (predicted == code).sum(), (target == code).sum()])
    rows = {}
    for (name, condition), (intersection, predicted, target) in counts.items():
        rows[f'{MODELS[name]}, {condition}'] = (intersection / (predicted + target - intersection)).numpy()
    return pd.DataFrame(rows, index=[str(code) for code in vocab]).rename_axis('class')


def code_colours(n_codes):
    "A colour per code: black for the background (code 0), then tab10 and tab20's others."
    return ListedColormap(['black'] + list(plt.cm.tab10.colors + plt.cm.tab20.colors[1::2])[:n_codes - 1])


def prediction_figure(learn, title, pixels, targets, corruption, seed, vocab):
    """`learn`'s predictions on `pixels` (images in [0, 1]) beside `targets`, in five labelled columns: the image,
    its target, the prediction, the image under `corruption` at severity FIGURE_SEVERITY and the prediction on
    it; one row per image, and a legend of the class colours."""
    stats = normalize_stats(learn.dls.valid, pixels.device)
    corrupted = corrupt(pixels, corruption, FIGURE_SEVERITY,
                        generator=torch.Generator(pixels.device).manual_seed(seed))
    panels = [pixels, targets, predicted_masks(learn, pixels, stats), corrupted,
              predicted_masks(learn, corrupted, stats)]
    titles = ['image', 'target', 'prediction', f'{corruption.replace("_", " ")} {FIGURE_SEVERITY}',
              'prediction on it']
    colours = code_colours(len(vocab))
    rows = len(pixels)
    fig, axes = plt.subplots(rows, len(panels), figsize=(2 * len(panels), 2 * rows + 0.9), squeeze=False)
    for row in range(rows):
        for column, (panel, column_title) in enumerate(zip(panels, titles)):
            ax = axes[row, column]
            shown = panel[row].cpu()
            if shown.ndim == 3:  # an image: channels last, gray as gray
                ax.imshow(shown.permute(1, 2, 0).squeeze(-1).numpy(), cmap='gray', vmin=0, vmax=1)
            else:
                ax.imshow(shown.numpy(), cmap=colours, vmin=0, vmax=len(vocab) - 1, interpolation='nearest')
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(column_title, fontsize=10)
    fig.legend(handles=[Patch(color=colours(code), label=str(label)) for code, label in enumerate(vocab)],
               loc='lower center', ncol=min(len(vocab), 6), fontsize=8, frameon=False)
    fig.suptitle(f'{title}: validation images, mask colour = class', y=0.995)
    fig.tight_layout(rect=(0, 0.9 / (2 * rows + 0.9) + 0.02, 1, 0.98))
    return fig


def save_prediction_figures(learners, dl, vocab, corruption, args):
    "`prediction_figure` of each model on the same FIGURE_ROWS validation images; returns the files' paths."
    xb, yb = dl.one_batch()
    pixels = decode(xb[:FIGURE_ROWS], normalize_stats(dl, xb.device)).clamp_(0, 1)
    paths = []
    for name, learn in learners.items():
        fig = prediction_figure(learn, MODELS[name], pixels, yb[:FIGURE_ROWS], corruption, args.seed, vocab)
        paths.append(args.out / f'predictions_{name}.png')
        fig.savefig(paths[-1], bbox_inches='tight')
        plt.close(fig)
    return paths


def save_views_figure(learn, args):
    "The AugMix views of a few training images; returns its path."
    fig = learn.aug_mix.show(n=6)
    ops = 'all ops' if args.all_ops else 'appearance ops'
    fig.suptitle(f'AugMix views for masks ({ops} only, no geometric ones): every pixel keeps its label', y=1.02)
    path = args.out / 'augmix_views.png'
    fig.savefig(path, bbox_inches='tight')
    plt.close(fig)
    return path


def worst_corruption(result):
    "The corruption with the baseline's highest pixel error (mean over severities): the figures show it."
    return result.baseline.per_corruption()['pixel_error'].idxmax()


DATA_NAMES = {'scenes': 'Fashion-MNIST garments on photo crops (fashion_scenes_dls)',
              'on-black': 'Fashion-MNIST garments on black (fashion_segmentation_dls)'}


def main(argv=None):
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = str(args.path) if args.path else DATA_NAMES[args.task]
    augmix = f'AugMixCallback(all_ops={args.all_ops})'
    print(f'U-Net ({args.arch} encoder) at {args.size} px on {data}{" (quick subset)" if args.quick else ""}, '
          f'{args.epochs} epoch(s) per model, baseline vs {augmix} + JSD, on {default_device()}')
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
    per_corruption = pd.concat({MODELS[name]: own.per_corruption()['pixel_error']
                                for name, own in (('baseline', result.baseline), ('augmix_jsd', result))}, axis=1)
    print('\nPixel error per corruption (mean over severities):')
    print((per_corruption * 100).to_string(float_format='{:.1f}'.format))
    vocab = learners['baseline'].dls.vocab
    ious = class_iou(learners, eval_dl, vocab, ignore_index, args.seed)
    ious.to_csv(args.out / 'class_iou.csv', float_format='%.6g')
    print(f'\nIoU per class (%), clean and under the {len(SEGMENTATION_CORRUPTIONS)} corruptions at severity '
          f'{FIGURE_SEVERITY}:')
    print((ious * 100).to_string(float_format='{:.1f}'.format))
    if args.quick:
        print(f"(--quick trains on {QUICK['train']} images for one epoch: a smoke test, not a comparison)")
    figures = save_prediction_figures(learners, eval_dl, vocab, worst_corruption(result), args)
    figures.append(save_views_figure(learners['augmix_jsd'], args))
    print(f'\nTables: {args.out / "results.csv"}, {args.out / "corruption_scores.csv"}, {args.out / "class_iou.csv"}')
    print('Figures: ' + ', '.join(str(path) for path in figures + [args.out / f'lr_find_{n}.png' for n in MODELS]))
    print(f'Total time: {time.perf_counter() - started:.0f} s')


if __name__ == '__main__':
    main()
