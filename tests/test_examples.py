"""Every example runs as a user runs it: a fresh `python examples/X.py --quick` process, offline.

The quick modes train for seconds, so these tests check that the scripts work end to end and write
what they promise (tables, figures, one-line errors), not what accuracy they reach.
"""
import importlib.util
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fastai_jsd.data import load_fashion_sample
from fastai_jsd.robustness import CORRUPTIONS

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
QUICKSTART_FIGURES = ('augmix_batch.png', 'training_curves.png', 'corruption_errors.png',
                      'lr_find_baseline.png', 'lr_find_augmix_jsd.png')
MODEL_NAMES = ('baseline (cross-entropy)', 'AugMix + JSD')


def run_example(script, *args, cwd, timeout=300):
    """Run examples/`script` with the test's interpreter in `cwd`; fastai's data folder is kept inside `cwd`."""
    # FASTAI_HOME: no Imagenette the developer downloaded earlier can be found, and no config is written to ~.
    # fastai's own import emits torch's FutureWarning about torch.jit.script; the scripts' messages are the subject.
    # One torch thread unless the caller chose: the quick runs are too small to gain from two, and two threads
    # that wait for each other stall whenever the other core is busy (quickstart --quick: 30 s -> 150 s).
    env = {'OMP_NUM_THREADS': '1', **os.environ, 'MPLBACKEND': 'Agg', 'FASTAI_HOME': str(cwd / 'fastai_home'),
           'PYTHONWARNINGS': 'ignore::FutureWarning'}
    return subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check_png(path):
    """`path` is a readable PNG of a real figure (not an empty canvas)."""
    assert path.is_file(), f'{path} was not written'
    with Image.open(path) as image:
        assert image.format == 'PNG'
        pixels = np.asarray(image.convert('L'))
    assert min(pixels.shape) > 100 and pixels.std() > 5, f'{path} looks empty'


def check_one_line_exit(result, *phrases):
    """A non-zero exit with a single line on stderr, no traceback, that contains every phrase."""
    assert result.returncode != 0, result.stdout
    message = result.stderr.strip()
    assert 'Traceback' not in result.stderr, result.stderr
    assert len(message.splitlines()) == 1, message
    for phrase in phrases:
        assert phrase in message, message


def write_image_folder(root, n_classes=4, n_train=16, n_valid=6):
    """An ImageNet-style folder of real Fashion-MNIST PNGs: root/{train,valid}/<class>/<i>.png."""
    arrays = load_fashion_sample()
    for split, images, labels, count in (('train', arrays.train_images, arrays.train_labels, n_train),
                                         ('valid', arrays.valid_images, arrays.valid_labels, n_valid)):
        for label in range(n_classes):
            folder = root / split / f'class_{label}'
            folder.mkdir(parents=True)
            for i, image in enumerate(images[labels == label][:count]):
                Image.fromarray(image).save(folder / f'{i}.png')
    return root


def host_reachable(host, port=443, timeout=3.0):
    """Whether `host` accepts a connection within `timeout` seconds; the thread also bounds the name lookup."""
    connected = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                connected.append(True)
        except OSError:
            pass
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return bool(connected)


@pytest.mark.slow
def test_quickstart_quick_writes_table_csv_and_figures(tmp_path):
    out = tmp_path / 'out'
    result = run_example('quickstart.py', '--quick', '--out', out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    table = pd.read_csv(out / 'results.csv', index_col='model')
    assert list(table.index) == list(MODEL_NAMES)
    fractions = table[['clean_error', 'mean_corruption_error', 'rms_calibration_clean', 'rms_calibration_corrupted']]
    assert ((fractions >= 0) & (fractions <= 1)).all().all()
    assert table.loc['baseline (cross-entropy)', 'mce_vs_baseline'] == 1.0

    per_condition = pd.read_csv(out / 'corruption_errors.csv')
    assert len(per_condition) == 2 * len(CORRUPTIONS) * 5
    assert set(per_condition.corruption) == set(CORRUPTIONS)
    # The summary's mean corruption error is the mean of the 75 per-condition errors, model by model.
    means = per_condition.groupby('model').error.mean()
    for model in MODEL_NAMES:
        assert means[model] == pytest.approx(table.loc[model, 'mean_corruption_error'])

    for name in QUICKSTART_FIGURES:
        check_png(out / name)
    assert '| model | clean error | mean corruption error |' in result.stdout
    import fastai
    assert f'torch {torch.__version__}' in result.stdout and f'fastai {fastai.__version__}' in result.stdout
    for model in MODEL_NAMES:
        row = next(line for line in result.stdout.splitlines() if line.startswith(f'| {model} |'))
        assert f"{table.loc[model, 'clean_error']:.1%}" in row
    figures_line = next(line for line in result.stdout.splitlines() if line.startswith('Figures: '))
    assert str(out / 'augmix_batch.png') in figures_line
    assert not (tmp_path / 'models').exists(), 'lr_find left files outside --out'
    assert not (out / 'models').exists(), 'lr_find left its (empty) models/ folder in --out'


def load_example(name):
    """examples/`name`.py imported as a module (its main() is not run), to test its functions."""
    if str(EXAMPLES) not in sys.path:  # as `python examples/X.py` has it: the scripts import examples/course.py
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f'example_{name}', EXAMPLES / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def course():
    return load_example('course')


def tiny_fashion_learner(loss_func, path):
    """A linear model on 256 images of the bundled Fashion-MNIST sample: lr_find takes a second."""
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from torch import nn
    from fastai_jsd.data import fashion_dls
    dls = fashion_dls(size=28, bs=32, channels=1, seed=0)
    dls = DataLoaders(dls.train.new(n=256), dls.valid.new(n=64))
    return Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)), loss_func=loss_func, path=path)


def test_lr_find_leaves_no_models_folder(course, tmp_path):
    from fastai.losses import CrossEntropyLossFlat
    learn = tiny_fashion_learner(CrossEntropyLossFlat(), tmp_path)
    with learn.no_bar():
        suggestion = course.lr_find_leaving_no_files(learn, num_it=10, show_plot=False)
    assert suggestion.valley > 0
    assert list(tmp_path.iterdir()) == [], 'lr_find left files in the Learner\'s path'
    assert learn.model_dir == 'models'


def test_lr_find_figure_names_the_model_and_marks_the_rate_used(course, tmp_path):
    import matplotlib.pyplot as plt
    from fastai_jsd import AugMixCallback, JsdCrossEntropy
    learn = tiny_fashion_learner(JsdCrossEntropy(smoothing=0), tmp_path)
    learn.add_cb(AugMixCallback())
    with learn.no_bar():
        used = course.suggested_lr(learn, 'AugMix + JSD', tmp_path / 'lr_find_augmix_jsd.png', quick=True)
    check_png(tmp_path / 'lr_find_augmix_jsd.png')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['lr_find_augmix_jsd.png']
    # the figure itself, as suggested_lr labels it
    with learn.no_bar():
        course.lr_find_leaving_no_files(learn, num_it=10, suggest_funcs=(course.valley,))
    fig = course.label_lr_find(plt.gcf(), 'AugMix + JSD', course.loss_name(learn.loss_func), 5e-2, used)
    ax = fig.axes[0]
    assert ax.get_title() == 'lr_find: AugMix + JSD'
    assert '12 x Jensen-Shannon' in ax.get_ylabel()
    marks = [line for line in ax.get_lines() if line.get_label().startswith('used by fit_one_cycle')]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [used, used]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert f'used by fit_one_cycle: {used:.2g}' in legend and "lr_find's valley suggestion: 0.05" in legend
    plt.close('all')


@pytest.mark.parametrize('suggestion', ['minimum', 'valley'])
def test_lr_find_marker_sits_at_the_suggested_rate(course, tmp_path, suggestion):
    """fastai's `minimum` suggests a tenth of the lowest loss's rate but marks the lowest loss itself: the
    segmentation example's figure showed its marker 10x away from the value in its legend."""
    import matplotlib.pyplot as plt
    from fastai.losses import CrossEntropyLossFlat
    learn = tiny_fashion_learner(CrossEntropyLossFlat(), tmp_path)
    with learn.no_bar():
        found = course.lr_find_leaving_no_files(learn, num_it=30, suggest_funcs=(getattr(course, suggestion),))
    suggested = float(getattr(found, suggestion))
    fig = course.label_lr_find(plt.gcf(), 'baseline', 'cross-entropy', suggested, 3e-3, suggestion)
    ax = fig.axes[0]
    curve = ax.get_lines()[0]
    marker, = [line for line in ax.get_lines() if line.get_label().startswith(f"lr_find's {suggestion}")]
    assert marker.get_label() == f"lr_find's {suggestion} suggestion: {suggested:.2g}"
    assert list(marker.get_xdata()) == [suggested]
    rates, losses = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
    nearest = np.abs(np.log(rates) - np.log(suggested)).argmin()  # on the curve, not at its minimum
    assert marker.get_ydata()[0] == pytest.approx(losses[nearest], rel=0.05)
    plt.close('all')


def test_quickstart_rejects_unknown_arch_before_training(tmp_path):
    result = run_example('quickstart.py', '--arch', 'no_such_net', '--out', tmp_path / 'out', cwd=tmp_path)
    assert result.returncode == 2
    assert "--arch 'no_such_net'" in result.stderr and 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_training_curves_say_the_augmix_training_loss_includes_the_consistency_term(course):
    import matplotlib.pyplot as plt
    from fastai.vision.all import CrossEntropyLossFlat
    from fastai_jsd import JsdCrossEntropy
    _, (jsd_ax, plain_ax) = plt.subplots(1, 2)
    course.label_loss_curves(jsd_ax, JsdCrossEntropy(alpha=12))
    course.label_loss_curves(plain_ax, CrossEntropyLossFlat())
    assert 'train: cross-entropy + 12 x Jensen-Shannon' in jsd_ax.get_ylabel()
    assert 'valid: cross-entropy' in jsd_ax.get_ylabel()
    assert 'Jensen-Shannon' not in plain_ax.get_ylabel() and 'cross-entropy' in plain_ax.get_ylabel()
    plt.close('all')


def test_imagenette_trains_on_a_local_image_folder(tmp_path):
    folder = write_image_folder(tmp_path / 'images')
    out = tmp_path / 'out'
    result = run_example('imagenette.py', '--path', folder, '--quick', '--out', out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '64 training and 24 validation images, 4 classes' in result.stdout
    table = pd.read_csv(out / 'corruption_errors.csv')
    assert len(table) == len(CORRUPTIONS) * 5
    assert table.error.between(0, 1).all()
    for name in ('augmix_batch.png', 'training_curves.png', 'corruption_errors.png', 'lr_find.png'):
        check_png(out / name)
    assert 'mean corruption error' in result.stdout
    assert not (folder / 'models').exists(), 'lr_find wrote into the image folder'
    assert not (out / 'models').exists(), 'lr_find left its (empty) models/ folder in --out'


def test_imagenette_unreachable_download_exits_with_one_line(tmp_path):
    # '.invalid' never resolves (RFC 2606), so this is the no-network path even on a machine that is online.
    result = run_example('imagenette.py', '--url', 'https://fastai-jsd.invalid/imagenette2-160.tgz', '--quick',
                         cwd=tmp_path, timeout=120)
    check_one_line_exit(result, 'fastai-jsd.invalid', '--path')


def test_imagenette_without_path_offline_exits_with_one_line(tmp_path):
    if host_reachable('s3.amazonaws.com'):
        pytest.skip('online: the literal command would download Imagenette (the .invalid test covers this path)')
    result = run_example('imagenette.py', '--quick', cwd=tmp_path, timeout=120)
    check_one_line_exit(result, 's3.amazonaws.com', '--path')


def test_imagenette_path_without_train_and_valid_exits_with_one_line(tmp_path):
    (tmp_path / 'photos' / 'cats').mkdir(parents=True)
    result = run_example('imagenette.py', '--path', tmp_path / 'photos', '--quick', cwd=tmp_path, timeout=120)
    check_one_line_exit(result, 'train/', 'valid/', "['cats']")


@pytest.mark.slow
def test_benchmark_training_quick(tmp_path):
    result = run_example('benchmark_training.py', '--quick', cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    row = [line for line in result.stdout.splitlines() if line.startswith('| resnet18 |')]
    assert len(row) == 1
    ratio = float(row[0].rstrip(' |').split('|')[-1])
    assert ratio > 0.5  # AugMix + JSD cannot cost much less than the plain run on the same 3B images


# --- the READMEs: what a newcomer reads first -------------------------------------------------------------------------

ROOT = EXAMPLES.parent


def markdown_section(path, heading):
    """The text of the markdown section `heading` (e.g. '## Usage') of `path`, up to the next heading of its level."""
    text = path.read_text()
    level = heading.split()[0]
    start = text.index(f'\n{heading}\n') + 1
    following = [i for i in (text.find(f'\n{level} ', start + 1),) if i != -1]
    return text[start:min(following)] if following else text[start:]


def python_blocks(markdown):
    return re.findall(r'```python\n(.*?)```', markdown, re.S)


def test_readme_usage_says_the_snippet_downloads_weights_and_gives_one_that_runs_offline():
    usage = markdown_section(ROOT / 'README.md', '## Usage')
    blocks = python_blocks(usage)
    downloading = [b for b in blocks if 'vision_learner(' in b and 'pretrained=False' not in b]
    offline = [b for b in blocks if 'vision_learner(' in b and 'pretrained=False' in b]
    prose = re.sub(r'```.*?```', '', usage, flags=re.S)
    if downloading:
        assert 'ImageNet weights' in prose and 'download' in prose and 'pretrained=False' in prose
    assert offline, 'the Usage section needs a snippet that runs without network'
    # The offline snippet is complete: it makes its own DataLoaders from data shipped with the package.
    snippet = offline[0]
    compile(snippet, 'README Usage', 'exec')
    assert 'fashion_dls(' in snippet and 'dls =' in snippet and 'import' in snippet


DURATION = re.compile(r'\b\d+(?:\.\d+)?\s?(?:s|sec|seconds|min|minutes)\b')
RATIO = re.compile(r'\b(?:\d+(?:\.\d+)?\s?x|twice|three times|\w+ times) (?:as long|the baseline)', re.I)


def test_the_quickstart_run_time_and_time_ratio_are_stated_in_one_place():
    results = markdown_section(ROOT / 'README.md', '## Results')
    assert len(RATIO.findall(results)) == 1, RATIO.findall(results)
    assert re.search(r'\d+ min \d+ s in all', results) and re.search(r'Measured\s+20\d\d-\d\d-\d\d', results)
    # examples/README.md refers to it instead of stating figures of its own (other configurations' tables aside).
    quickstart_doc = markdown_section(EXAMPLES / 'README.md', '## quickstart.py')
    prose = '\n'.join(line for line in quickstart_doc.splitlines() if not line.startswith('| `--arch'))
    assert DURATION.findall(prose) == [] and RATIO.findall(prose) == []
    assert '../README.md#results' in quickstart_doc
    listing = (EXAMPLES / 'README.md').read_text().split('## quickstart.py')[0]
    assert DURATION.findall(listing) == []
    docstring = (EXAMPLES / 'quickstart.py').read_text().split('"""')[1]
    assert DURATION.findall(docstring) == [] and 'README' in docstring


def test_readme_says_what_the_training_table_columns_are():
    features = markdown_section(ROOT / 'README.md', '## What each fastai feature does with the plugin')
    row = next(line for line in features.splitlines() if line.startswith('| training table'))
    for phrase in ('`train_ce`', '`train_jsd`', 'mean', 'smoothed', 'not `train_ce + train_jsd`'):
        assert phrase in row, phrase
    from fastai_jsd.callback import LossPartsRecorder
    assert 'smoothed' in LossPartsRecorder.__doc__ and 'train_ce + train_jsd' in LossPartsRecorder.__doc__
