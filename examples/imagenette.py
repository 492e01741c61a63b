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
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

import matplotlib
matplotlib.use('Agg')  # figures only go to files, so no display is needed
import matplotlib.pyplot as plt

from fastai.vision.all import *

from course import course_parser, find_model, finish_args, label_loss_curves, suggested_lr
from fastai_jsd import CORRUPTIONS, AugMixCallback, JsdCrossEntropy, evaluate_robustness, plot_corruption_errors

VALID_NAMES = ('valid', 'val')  # fastai's convention and Imagenette's


def parse_args(argv=None):
    parser = course_parser(__doc__.splitlines()[0], out='./imagenette_out', arch='resnet18', size=None, bs=None,
                           epochs=(5, 1), quick_help='a smoke test: 1 epoch at 32 px, 32 images evaluated',
                           arch_help='a fastai/torchvision model (resnet18, xresnet50) or a timm model name (resnet10t)')
    parser.add_argument('--path', type=Path, default=None,
                        help='an ImageNet-style folder (train/ and valid/ or val/, one sub-folder per class); '
                             'default: download --url')
    parser.add_argument('--url', default=URLs.IMAGENETTE_160,
                        help='the fastai data set to download when --path is not given (default Imagenette 160 px)')
    parser.add_argument('--eval-images', type=int, default=None,
                        help='validation images for the robustness report (default 1000, --quick 32)')
    parser.add_argument('--workers', type=int, default=None, help="DataLoader workers (default fastai's, --quick 0)")
    args = parser.parse_args(argv)
    defaults_for = dict(size=(128, 32), bs=(64, 16), eval_images=(1000, 32), workers=(defaults.cpus, 0))
    for name, (full, quick) in defaults_for.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return finish_args(parser, args, dict(epochs=1, size=16, bs=1, eval_images=1, workers=0))


def model_or_exit(name):
    "The fastai/torchvision model function called `name`, else the timm name; exits on unknown names."
    model = find_model(name)
    if model is None:
        sys.exit(f'imagenette.py: --arch {name!r} is neither a fastai/torchvision nor a timm model; '
                 f'try resnet18, xresnet50 or resnet10t.')
    return model


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


def save_figures(learn, result, out):
    "The AugMix batch grid, the training curves and the per-corruption errors; returns their paths."
    paths = [out / 'augmix_batch.png', out / 'training_curves.png', out / 'corruption_errors.png']
    learn.aug_mix.show(n=6).savefig(paths[0], bbox_inches='tight')
    fig, ax = plt.subplots(figsize=(6, 4))
    learn.recorder.plot_loss(ax=ax)
    label_loss_curves(ax, learn.loss_func)
    fig.savefig(paths[1], bbox_inches='tight')
    fig, ax = plt.subplots(figsize=(12, 4))
    plot_corruption_errors({'AugMix + JSD': result}, ax=ax)
    fig.savefig(paths[2], bbox_inches='tight')
    plt.close('all')
    return paths + [out / 'lr_find.png']


def main(argv=None):
    args = parse_args(argv)
    arch = model_or_exit(args.arch)
    path = args.path if args.path is not None else download(args.url)
    args.out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed, reproducible=True)
    dls = image_dls(path, args)
    print(f'{path}: {len(dls.train_ds)} training and {len(dls.valid_ds)} validation images, '
          f'{dls.c} classes; {args.arch} at {args.size} px on {dls.device}')

    # path=args.out: anything the Learner saves goes to --out, not into the image folder
    learn = vision_learner(dls, arch, pretrained=False, loss_func=JsdCrossEntropy(), cbs=AugMixCallback(),
                           metrics=[accuracy, error_rate], path=args.out)
    lr = suggested_lr(learn, 'AugMix + JSD', args.out / 'lr_find.png', args.quick)
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
