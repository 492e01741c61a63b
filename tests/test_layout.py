"""The package's layers, checked on its sources: what may import what, and where public names live."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'fastai_jsd'


def imported_modules(path):
    """The modules a source file imports (absolute names; relative imports resolved against its package)."""
    tree = ast.parse(path.read_text())
    package = '.'.join(path.relative_to(PACKAGE.parent).with_suffix('').parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f'{base}.{alias.name}' for alias in node.names)
    return names


def sources(folder):
    return sorted((PACKAGE / folder).glob('*.py'))


@pytest.mark.parametrize('path', sources('augment'), ids=lambda p: p.name)
def test_the_augmentation_knows_nothing_of_fastai(path):
    """augment/ is AugMix on tensors: usable (and testable) without fastai, the callback or the loss."""
    for name in imported_modules(path):
        assert not (name == 'fastai' or name.startswith('fastai.')), f'{path.name} imports {name}'
        assert not name.startswith('fastai_jsd.') or name.startswith('fastai_jsd.augment'), f'{path.name} imports {name}'


@pytest.mark.parametrize('path', sources('robustness'), ids=lambda p: p.name)
def test_the_robustness_report_knows_nothing_of_the_callback_or_the_loss(path):
    for name in imported_modules(path):
        assert not name.startswith('fastai_jsd.callback') and not name.startswith('fastai_jsd.loss'), name


def test_the_callback_knows_nothing_of_how_an_op_is_computed():
    """callback.py uses AugMix through the public functions of fastai_jsd.augment, never its kernels."""
    inner = ('ops', 'geometry', 'torch_apply', 'triton_apply', 'sampling', 'backends', 'checks')
    for name in imported_modules(PACKAGE / 'callback.py'):
        assert not any(name.startswith(f'fastai_jsd.augment.{module}') for module in inner), name


def test_the_loss_knows_nothing_of_augmentation():
    for name in imported_modules(PACKAGE / 'loss.py'):
        assert not name.startswith('fastai_jsd.'), name


def test_public_names_stay_importable_where_they_were_first_published():
    import fastai_jsd
    from fastai_jsd import augment, ops
    from fastai_jsd.augment import ops as kernels
    from fastai_jsd.augmix import AugMixParams, apply_augmix, augmix, sample_augmix
    assert (augmix, apply_augmix, sample_augmix, AugMixParams) == (
        augment.augmix, augment.apply_augmix, augment.sample_augmix, augment.AugMixParams)
    assert fastai_jsd.augmix is augment.augmix
    for name in ('autocontrast', 'equalize', 'posterize', 'solarize', 'rotate', 'shear_x', 'shear_y', 'translate_x',
                 'translate_y', 'color', 'contrast', 'brightness', 'sharpness'):
        assert getattr(ops, name) is getattr(kernels, name)
    for name in fastai_jsd.__all__:
        assert hasattr(fastai_jsd, name), name
