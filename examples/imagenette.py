"""The fastai course's Imagenette script with AugMix + JSD, then a robustness report.

    python examples/imagenette.py                          # downloads Imagenette 160 px (needs network)
    python examples/imagenette.py --path ~/data/my_images  # any folder with train/ and valid/ (or val/)
    python examples/imagenette.py --path DIR --quick       # a smoke test: 1 epoch at 32 px, 32 images evaluated

An ImageNet-style folder has one sub-folder per class under `train/` and under `valid/` (or `val/`, as
Imagenette names it). The model is trained from scratch (`pretrained=False`: no weights are downloaded),
so `fit_one_cycle` rather than `fine_tune`. After training, `evaluate_robustness` measures the error and
RMS calibration error on `--eval-images` validation images, clean and under the 15 CIFAR-10-C corruptions
at 5 severities. Without network and without `--path` the script says so and exits.
"""
import argparse
import math
import socket
import tempfile
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import matplotlib
matplotlib.use('Agg')  # figures only go to files, so no display is needed
import matplotlib.pyplot as plt

from fastai.vision.all import *

from fastai_jsd import CORRUPTIONS, AugMixCallback, JsdCrossEntropy, evaluate_robustness, plot_corruption_errors

# 'valley' is noisy from one run to the next; Adam + one-cycle trains a from-scratch CNN with batch norm
# well anywhere in LR_RANGE, so the suggestion is kept inside it (as in quickstart.py).
LR_RANGE = (1e-3, 1e-2)
FALLBACK_LR = 3e-3  # when lr_find gives nothing usable (loss nan from the start)
VALID_NAMES = ('valid', 'val')  # fastai's convention and Imagenette's


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--path', type=Path, default=None,
                        help='an ImageNet-style folder (train/ and valid/ or val/, one sub-folder per class); '
                             'default: download --url')
    parser.add_argument('--url', default=URLs.IMAGENETTE_160,
                        help='the fastai data set to download when --path is not given (default Imagenette 160 px)')
    parser.add_argument('--out', type=Path, default=Path('./imagenette_out'), help='folder for figures and tables')
    parser.add_argument('--quick', action='store_true', help='a smoke test: 1 epoch at 32 px, 32 images evaluated')
    parser.add_argument('--epochs', type=int, default=None, help='default 5, --quick 1')
    parser.add_argument('--size', type=int, default=None, help='training image size (default 128, --quick 32)')
    parser.add_argument('--arch', default='resnet18',
                        help='a fastai/torchvision model (resnet18, xresnet50) or a timm model name (resnet10t)')
    parser.add_argument('--bs', type=int, default=None,
                        help='clean images per batch, the model sees 3x (default 64, --quick 16)')
    parser.add_argument('--eval-images', type=int, default=None,
                        help='validation images for the robustness report (default 1000, --quick 32)')
    parser.add_argument('--workers', type=int, default=None, help="DataLoader workers (default fastai's, --quick 0)")
    parser.add_argument('--seed', type=int, default=42)
    args = parser.parse_args(argv)
    defaults_for = dict(epochs=(5, 1), size=(128, 32), bs=(64, 16), eval_images=(1000, 32), workers=(defaults.cpus, 0))
    for name, (full, quick) in defaults_for.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name, least in dict(epochs=1, size=16, bs=1, eval_images=1, workers=0).items():
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    return args


def find_model(name):
    "The fastai/torchvision model function called `name`, else `name` itself for timm; exits on unknown names."
    candidate = globals().get(name)  # what `from fastai.vision.all import *` brought in
    if callable(candidate) and candidate.__module__.startswith(('torchvision.models', 'fastai.vision.models')):
        return candidate
    import timm
    if name in timm.list_models():
        return name
    sys.exit(f'imagenette.py: --arch {name!r} is neither a fastai/torchvision nor a timm model; '
             f'try resnet18, xresnet50 or resnet10t.')


def reachable(url, timeout=3.0):
    "Whether `url`'s host accepts a connection within `timeout` seconds, name lookup included."
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == 'https' else 80)
    connected = []

    def connect():
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout):
                connected.append(True)
        except OSError:
            pass
    # A name lookup ignores socket timeouts and can hang on a broken resolver, so the thread is the timer.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(connected)


def download(url):
    "`untar_data(url)` when the data is already extracted or the host answers; otherwise exit with one line."
    extracted = fastai_path('data') / Path(urlparse(url).path).name.split('.')[0]
    if not extracted.exists() and not reachable(url):
        sys.exit(f'imagenette.py: cannot reach {urlparse(url).hostname} to download {url} (no network?); '
                 f'pass --path to a local ImageNet-style folder (train/ and valid/, one folder per class).')
    try:
        return untar_data(url)
    except Exception as error:  # any failure of the download or the extraction: say it in one line
        sys.exit(f'imagenette.py: downloading {url} failed ({type(error).__name__}: {error}); '
                 f'pass --path to a local ImageNet-style folder instead.')


def valid_folder(path):
    "The name of `path`'s validation folder ('valid' or 'val'); exits with one line when the layout is wrong."
    if not path.is_dir():
        sys.exit(f'imagenette.py: --path {path} is not a folder; pass a folder with train/ and valid/ inside.')
    found = [name for name in VALID_NAMES if (path / name).is_dir()]
    if not (path / 'train').is_dir() or not found:
        sys.exit(f'imagenette.py: --path {path} needs train/ and valid/ (or val/) sub-folders with one folder '
                 f'per class; it has {sorted(p.name for p in path.iterdir() if p.is_dir()) or "no folders"}.')
    return found[0]


def image_dls(path, args):
    "The course's Imagenette pipeline: random resized crops and flips, ImageNet statistics."
    valid_name = valid_folder(path)
    dls = ImageDataLoaders.from_folder(path, train='train', valid=valid_name, bs=args.bs, seed=args.seed,
                                       num_workers=args.workers,
                                       item_tfms=RandomResizedCrop(args.size, min_scale=0.35),
                                       batch_tfms=[Flip(), Normalize.from_stats(*imagenet_stats)])
    if len(dls.train_ds) == 0 or len(dls.valid_ds) == 0:
        sys.exit(f'imagenette.py: found {len(dls.train_ds)} training and {len(dls.valid_ds)} validation images '
                 f'in {path}; put images in train/<class>/ and {valid_name}/<class>/.')
    return dls


def evaluation_loader(dls, n_images, seed):
    "`n_images` validation images picked at random (all classes), resized and centre-cropped as for validation."
    items = dls.valid_ds.items
    picked = np.random.default_rng(seed).permutation(len(items))[:n_images]
    return dls.test_dl([items[i] for i in sorted(picked)], with_labels=True, bs=min(dls.bs, 64))


def suggested_lr(learn, out, quick):
    "lr_find's 'valley' suggestion, kept within LR_RANGE; its figure, marking the rate used, is saved to `out`."
    # lr_find's temporary weights go to a temporary folder, so no empty models/ stays behind in --out
    with tempfile.TemporaryDirectory() as scratch:
        model_dir, learn.model_dir = learn.model_dir, scratch  # absolute, so path/model_dir is scratch
        try:
            suggestion = learn.lr_find(num_it=20 if quick else 100, suggest_funcs=(valley,))
        finally:
            learn.model_dir = model_dir
    lr = float(suggestion.valley)
    low, high = LR_RANGE
    used = FALLBACK_LR if math.isnan(lr) else min(max(lr, low), high)
    if used != lr:
        print(f'lr_find suggested {lr:.2g}, using {used:.2g}')
    ax = plt.gcf().axes[0]
    ax.axvline(used, color='tab:red', linestyle='--', label=f'used by fit_one_cycle: {used:.2g}')
    ax.set_title(f'lr_find: AugMix + JSD (loss: cross-entropy + {learn.loss_func.alpha:g} x JSD)')
    ax.legend(loc='best')
    plt.gcf().savefig(out / 'lr_find.png', bbox_inches='tight')
    plt.close('all')
    return used


def save_figures(learn, result, out):
    "The AugMix batch grid, the training curves and the per-corruption errors; returns their paths."
    paths = [out / 'augmix_batch.png', out / 'training_curves.png', out / 'corruption_errors.png']
    learn.aug_mix.show(n=6).savefig(paths[0], bbox_inches='tight')
    fig, ax = plt.subplots(figsize=(6, 4))
    learn.recorder.plot_loss(ax=ax)
    fig.savefig(paths[1], bbox_inches='tight')
    fig, ax = plt.subplots(figsize=(12, 4))
    plot_corruption_errors({'AugMix + JSD': result}, ax=ax)
    fig.savefig(paths[2], bbox_inches='tight')
    plt.close('all')
    return paths + [out / 'lr_find.png']


def main(argv=None):
    args = parse_args(argv)
    arch = find_model(args.arch)
    path = args.path if args.path is not None else download(args.url)
    args.out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed, reproducible=True)
    dls = image_dls(path, args)
    print(f'{path}: {len(dls.train_ds)} training and {len(dls.valid_ds)} validation images, '
          f'{dls.c} classes; {args.arch} at {args.size} px on {dls.device}')

    # path=args.out: anything the Learner saves goes to --out, not into the image folder
    learn = vision_learner(dls, arch, pretrained=False, loss_func=JsdCrossEntropy(), cbs=AugMixCallback(),
                           metrics=[accuracy, error_rate], path=args.out)
    lr = suggested_lr(learn, args.out, args.quick)
    print(f'fit_one_cycle({args.epochs}, {lr:.2g})')
    learn.fit_one_cycle(args.epochs, lr)

    eval_dl = evaluation_loader(dls, args.eval_images, args.seed)
    print(f'Robustness on {eval_dl.n} validation images, {len(CORRUPTIONS)} corruptions x 5 severities:')
    set_seed(args.seed)  # the corruptions' random draws
    result = evaluate_robustness(learn, dl=eval_dl)
    result.table.to_csv(args.out / 'corruption_errors.csv', index=False, float_format='%.6g')
    print(f'  clean error {result.clean_error:.1%}, mean corruption error {result.mean_corruption_error:.1%}, '
          f'RMS calibration error {result.clean_calibration:.1%} clean, {result.corrupted_calibration:.1%} corrupted')
    print(result.per_corruption().to_string(float_format=lambda v: f'{v:.1%}'))
    figures = save_figures(learn, result, args.out)
    print(f'Table: {args.out / "corruption_errors.csv"}')
    print('Figures: ' + ', '.join(str(p) for p in figures))


if __name__ == '__main__':
    main()
