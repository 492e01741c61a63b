"""AugMix + JSD under fastai's distributed training (`learn.distrib_ctx()`: Accelerate + DDP).

The slow test launches 2 CPU processes with torchrun (gloo) on examples/train_distributed.py; this
file is also what those processes run (`python tests/test_distributed.py --child OUT_DIR`): each
trains and writes what it saw and drew to OUT_DIR/rank<r>.json for the test to compare.
"""
import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fastai.vision.all  # noqa: F401  (registers the Learner methods users get: fit_one_cycle, distrib_ctx, ...)

import pytest
import torch
from fastai.callback.core import Callback
from fastai.torch_core import num_distrib, rank_distrib
from fastai.vision.learner import vision_learner
from fastai.vision.models import resnet18
from timm.layers import SplitBatchNorm2d
from torch import nn

from _images import photo_crops, to_tensor
from fastai_jsd.augment import augmix
from fastai_jsd.callback import AugMixCallback, check_split_bn_without_sync_bn, rank_seed, split_batchnorm
from fastai_jsd.data import fashion_dls
from fastai_jsd.loss import JsdCrossEntropy

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
LAUNCH_TIMEOUT = 300  # seconds; about 20 s on 2 busy cores, so only a hang gets near it
STOP_GRACE = 60  # seconds torchrun gets to stop its processes after SIGTERM (it waits 30 s before SIGKILL)
NUM_SPLITS = 3


def tensor_digest(t):
    """SHA-256 of a tensor's values."""
    return hashlib.sha256(t.detach().as_subclass(torch.Tensor).cpu().contiguous().numpy().tobytes()).hexdigest()


def weights_digest(model):
    """SHA-256 over every parameter and buffer of `model` (DDP's wrapper included or not), with their names."""
    state = getattr(model, 'module', model).state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(tensor_digest(state[name]).encode())
    return digest.hexdigest()


class RankProbe(Callback):
    """Records what this process trained on and drew: its shard, its views, its AugMix draws on shared images."""
    # After AugMixCallback has stacked the batch; before DistributedTrainer (11) wraps the DataLoaders.
    order = AugMixCallback.order + 1
    run_valid = False

    def before_fit(self):
        # The validation set is not shuffled: these 8 images are the same in every process.
        self.shared_images = self.dls.valid.one_batch()[0][:8]
        self.seen = {'initial_weights': weights_digest(self.learn.model), 'train_batches': 0}

    def before_batch(self):
        if self.seen['train_batches'] == 0:
            stacked = self.xb[0]
            batch_size = stacked.shape[0] // NUM_SPLITS
            self.seen['clean'] = tensor_digest(stacked[:batch_size])
            self.seen['views'] = tensor_digest(stacked[batch_size:])
            views = self.learn.aug_mix.augmented_views(self.shared_images, NUM_SPLITS - 1)
            self.seen['shared_image_views'] = tensor_digest(views)
        self.seen['train_batches'] += 1


def run_child(out_dir):
    """One process of the launched run: the example's CPU quick run plus the probe, then its record."""
    # torchrun starts each process in its own session, so nothing reaches it if torchrun itself is killed:
    # the process ends itself after the test has given up on it.
    signal.alarm(LAUNCH_TIMEOUT + STOP_GRACE + 30)
    sys.path.insert(0, str(EXAMPLES))
    import train_distributed
    probe = RankProbe()
    learn = train_distributed.main(['--cpu', '--quick', '--bs', '16'], cbs=[probe])
    record = {**probe.seen, 'rank': rank_distrib(), 'world_size': num_distrib(),
              'final_weights': weights_digest(learn.model)}
    Path(out_dir, f'rank{rank_distrib()}.json').write_text(json.dumps(record))


def launch(nproc, out_dir, timeout=LAUNCH_TIMEOUT):
    """Run this file as `nproc` torchrun processes; (exit code, output). Fails the test, not hangs, on a hang."""
    # --standalone: a local rendezvous on a port the OS picks, so parallel runs never collide.
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
               __file__, '--child', str(out_dir)]
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}  # one thread per process: the processes share the cores
    process = subprocess.Popen(command, cwd=out_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"torchrun with {nproc} processes did not finish in {timeout} s:\n{stop(process)[-4000:]}")
    return process.returncode, output


def stop(process):
    """End a torchrun that hangs, and the processes it started; what they printed, if it can still be read."""
    process.terminate()  # torchrun sends SIGTERM on to its processes, SIGKILL 30 s later, then exits
    try:
        return process.communicate(timeout=STOP_GRACE)[0]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun's own session; its processes end at their alarm
        process.wait()
        return '(torchrun did not stop on SIGTERM; killed)'


@pytest.mark.slow
def test_two_cpu_processes_train_in_sync_on_their_own_augmentations(tmp_path):
    returncode, output = launch(2, tmp_path)
    assert returncode == 0, output[-4000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert [r['rank'] for r in ranks] == [0, 1] and {r['world_size'] for r in ranks} == {2}
    first, second = ranks
    # Both processes trained all 4 batches of the quick run, and gradients were averaged: same final weights.
    assert first['train_batches'] == second['train_batches'] == 4
    assert first['final_weights'] == second['final_weights']
    assert first['final_weights'] != first['initial_weights']
    # Each process augmented its own shard of the epoch ...
    assert first['clean'] != second['clean']
    assert first['views'] != second['views']
    # ... with its own draws: set_seed gave both processes the same global RNG, yet the same images get
    # different AugMix views in each (with draws from the shared global RNG these digests are equal).
    assert first['shared_image_views'] != second['shared_image_views']
    # Only rank 0 prints fastai's results table.
    assert output.count('train_jsd') == 1, output[-4000:]


# ----- in one process: the per-rank seed and the split BN / SyncBatchNorm refusal -----

@pytest.fixture(scope='module')
def dls():
    return fashion_dls(size=16, bs=4, device='cpu')


def make_learner(dls):
    return vision_learner(dls, resnet18, pretrained=False, loss_func=JsdCrossEntropy(), cbs=AugMixCallback())


@pytest.fixture
def accelerator_state():
    """Forget Accelerate's process-wide state afterwards, as Accelerate's own test cases do in tearDown."""
    yield
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_each_process_draws_its_own_views_from_the_shared_seed(dls, monkeypatch):
    pixels = to_tensor(photo_crops(4, 16, 16, seed=0))
    learn = make_learner(dls)
    monkeypatch.setenv('WORLD_SIZE', '2')
    views = {}
    for rank in (0, 1, 1):
        monkeypatch.setenv('RANK', str(rank))
        torch.manual_seed(0)  # what fastai's set_seed does in every process
        learn.aug_mix.before_fit()
        views.setdefault(rank, []).append(learn.aug_mix.augment_pixels(pixels))
    assert not torch.equal(views[0][0], views[1][0])
    assert torch.equal(views[1][0], views[1][1])  # and set_seed still makes each process reproducible
    learn.aug_mix.after_fit()
    monkeypatch.delenv('WORLD_SIZE')
    assert rank_seed() is None  # one process: the global RNG, as without distributed training
    torch.manual_seed(0)
    expected = learn.aug_mix.augment_pixels(pixels)
    torch.manual_seed(0)
    assert torch.equal(expected, augmix(pixels, fill=learn.aug_mix.fill_value(pixels)))


def test_split_bn_with_sync_bn_from_distrib_ctx_is_refused_at_before_fit(dls, accelerator_state):
    from fastai.distributed import DistributedTrainer
    learn = make_learner(dls)
    split_batchnorm(learn, NUM_SPLITS)
    # What learn.distrib_ctx() (sync_bn=True by default) adds in a launched process.
    learn.add_cb(DistributedTrainer(sync_bn=True, cpu=True))
    with pytest.raises(ValueError, match=r'DistributedTrainer\(sync_bn=True\).*distrib_ctx\(sync_bn=False\)'):
        learn.fit(1)
    # Refused before DistributedTrainer converted anything: the split layers are intact.
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in learn.model.modules())
    assert any(isinstance(m, SplitBatchNorm2d) for m in learn.model.modules())
    learn.remove_cb(DistributedTrainer)
    learn.add_cb(DistributedTrainer(sync_bn=False, cpu=True))
    check_split_bn_without_sync_bn(learn)  # sync_bn=False: accepted


def test_split_bn_already_converted_to_sync_bn_is_refused(dls):
    learn = make_learner(dls)
    split_batchnorm(learn, NUM_SPLITS)
    learn.model = nn.SyncBatchNorm.convert_sync_batchnorm(learn.model)
    # The conversion leaves no SplitBatchNorm2d: the auxiliary BNs hang on as children nothing calls.
    assert not any(isinstance(m, SplitBatchNorm2d) for m in learn.model.modules())
    with pytest.raises(ValueError, match='already has SyncBatchNorm'):
        learn.fit(1)


def test_sync_bn_alone_and_split_bn_alone_are_accepted(dls):
    plain = make_learner(dls)
    plain.model = nn.SyncBatchNorm.convert_sync_batchnorm(plain.model)
    check_split_bn_without_sync_bn(plain)
    split = make_learner(dls)
    split_batchnorm(split, NUM_SPLITS)
    check_split_bn_without_sync_bn(split)


def test_per_process_generator_stays_out_of_the_pickle(dls, monkeypatch):
    learn = make_learner(dls)
    monkeypatch.setenv('WORLD_SIZE', '2')
    learn.aug_mix.before_fit()
    assert learn.aug_mix.rank_generator(torch.device('cpu')) is not None
    # What pickle (and so learn.export) stores of the callback: a GPU generator would not load on a CPU.
    assert '_rank_generator' not in learn.aug_mix.__getstate__()


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='One process of test_distributed.py\'s launched run.')
    parser.add_argument('--child', required=True, help='folder for this rank\'s record')
    run_child(parser.parse_args().child)
