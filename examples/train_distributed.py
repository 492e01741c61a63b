"""AugMix + JSD on several GPUs (or CPU processes) with fastai's own distributed training.

    accelerate launch --num_processes 2 examples/train_distributed.py
    torchrun --nproc_per_node 2 examples/train_distributed.py
    torchrun --nproc_per_node 2 examples/train_distributed.py --cpu --quick   # CPU check, under a minute
    python examples/train_distributed.py --lr-find                            # one process: pick --lr

An AugMix + JSD resnet18 on the bundled Fashion-MNIST sample, trained under `learn.distrib_ctx()`:
fastai's DistributedTrainer (Accelerate + PyTorch DistributedDataParallel) gives every process its own
shard of each epoch and keeps the weights in sync; rank 0 prints the table and saves. AugMixCallback
augments each process's shard on its own device with that process's own random draws, and
JsdCrossEntropy needs nothing: both work unchanged. Without a launcher it trains in one process.
"""
import argparse
import os

from fastai.vision.all import *
from fastai.distributed import *

from fastai_jsd import AugMixCallback, JsdCrossEntropy, split_batchnorm
from fastai_jsd.data import fashion_dls


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--epochs', type=int, default=5)
    parser.add_argument('--lr', type=float, default=3e-3)
    parser.add_argument('--bs', type=int, default=64, help='clean images per batch and process (the model sees 3x)')
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--seed', type=int, default=42, help="fastai's set_seed, the same in every process")
    parser.add_argument('--split-bn', action='store_true', help='one BatchNorm per split (timm --split-bn)')
    parser.add_argument('--cpu', action='store_true', help='CPU processes (gloo) instead of GPUs (nccl)')
    parser.add_argument('--quick', action='store_true', help='one epoch of 4 batches, to check the setup')
    parser.add_argument('--lr-find', action='store_true', help='run lr_find in this single process and stop')
    parser.add_argument('--export', default=None, help='file for learn.export() of the trained Learner')
    args = parser.parse_args(argv)
    for name, least in dict(epochs=1, bs=1, size=8).items():
        if getattr(args, name) < least:
            parser.error(f'--{name} must be at least {least}, got {getattr(args, name)}')
    return args


def broadcast_on_cpu(self, t, rank):
    "fastai's `DistributedDL._broadcast` without its move to CUDA, for CPU processes."
    t = LongTensor(t)
    torch.distributed.broadcast(t, rank)
    return t.tolist()


def use_cpu_processes():
    "Let fastai's DistributedDL share the epoch's shuffled order between CPU processes."
    # fastai moves the index list to CUDA before broadcasting it, because nccl only sends CUDA tensors;
    # CPU processes talk through gloo, which sends CPU tensors, and without a GPU `.cuda()` raises
    # "Found no NVIDIA driver". This stays in the example: the library changes nothing in fastai.
    DistributedDL._broadcast = broadcast_on_cpu


def process_device(cpu):
    "This process's device: its own GPU (LOCAL_RANK, set by accelerate launch and torchrun) or the CPU."
    if cpu or not torch.cuda.is_available(): return torch.device('cpu')
    return torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))


def first_items(dls, n):
    "The same DataLoaders on the first `n` items of each set (the bundled sample is stored in random order)."
    return DataLoaders(dls.train.new(n=n), dls.valid.new(n=n), path=dls.path, device=dls.device)


def make_learner(args):
    "The AugMix + JSD Learner; `bs` is per process, so N processes train on N * bs clean images."
    dls = fashion_dls(size=args.size, bs=args.bs, device=process_device(args.cpu))
    if args.quick: dls = first_items(dls, 4 * args.bs * max(num_distrib(), 1))  # 4 batches per process
    learn = vision_learner(dls, resnet18, pretrained=False, loss_func=JsdCrossEntropy(), cbs=AugMixCallback(),
                           metrics=accuracy)
    if args.split_bn: split_batchnorm(learn, 3)
    return learn


def main(argv=None, cbs=None):
    "Train and return the Learner; `cbs` are extra callbacks for the fit (the tests add probes)."
    args = parse_args(argv)
    if args.lr_find and num_distrib() > 1:
        # fastai's LRFinder saves its checkpoint on rank 0 only, so only rank 0 waits to load it back:
        # the processes deadlock or crash (fastai issues 3132, 3688). One process finds the rate.
        raise SystemExit('--lr-find runs in one process: python examples/train_distributed.py --lr-find')
    if args.cpu: use_cpu_processes()
    set_seed(args.seed)  # the same model init everywhere; AugMixCallback still draws per process (seed + rank)
    learn = make_learner(args)
    if args.lr_find:
        suggestion = learn.lr_find(show_plot=False)
        print(f"\nlr_find suggests --lr {suggestion.valley:.1e}")
        return learn
    if args.quick: args.epochs = 1
    # SyncBatchNorm (fastai's default) has no CPU kernel, and it would run all splits through one BN, so
    # AugMixCallback refuses it on a split-BN model; split BN normalizes each process's own blocks instead.
    sync_bn = not (args.cpu or args.split_bn)
    with learn.distrib_ctx(sync_bn=sync_bn, cpu=args.cpu):
        learn.fit_one_cycle(args.epochs, args.lr, cbs=cbs)
    if args.export: learn.export(args.export)  # rank 0 writes it
    return learn


if __name__ == '__main__':
    main()
