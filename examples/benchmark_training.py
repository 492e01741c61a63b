"""What AugMix + JSD costs per epoch beyond the tripled batch it inherently trains on.

Epoch time of AugMix + JSD at batch B (the model sees 3B images) divided by plain cross-entropy at
batch 3B, same model, same images, alternating runs, median ratio. The ratio is the overhead of
decoding, augmenting and re-encoding on the device, plus the JSD term.

    python examples/benchmark_training.py                      # CPU: resnet18, 64 px, B = 32
    python examples/benchmark_training.py --device cuda --arch resnet50 --size 224 --bs 64 --bf16
"""
import argparse
import statistics
import time

from fastai.vision.all import *

from fastai_jsd import AugMixCallback, JsdCrossEntropy
from fastai_jsd.data import fashion_dls


class StopAfter(Callback):
    "End the training phase after `n_batches` and skip validation, so an 'epoch' is a fixed amount of work."
    order = 99

    def __init__(self, n_batches): self.n_batches = n_batches
    def after_batch(self):
        if self.training and self.iter + 1 >= self.n_batches: raise CancelTrainException()
    def before_validate(self): raise CancelValidException()


def synchronize(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def epoch_seconds(learn, n_batches, device):
    "Wall time of one training 'epoch' of `n_batches`."
    synchronize(device)
    start = time.perf_counter()
    with learn.no_logging(), learn.no_bar():
        learn.fit(1, 1e-3, cbs=StopAfter(n_batches))
    synchronize(device)
    return time.perf_counter() - start


def make_learner(dls, arch, augmix, bf16, num_splits):
    loss = JsdCrossEntropy(num_splits=num_splits) if augmix else CrossEntropyLossFlat()
    cbs = [AugMixCallback(num_splits=num_splits)] if augmix else []
    learn = vision_learner(dls, arch, pretrained=False, loss_func=loss, cbs=cbs)
    return learn.to_bf16() if bf16 else learn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='resnet18', help='torchvision/fastai model name (resnet18, resnet50)')
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--bs', type=int, default=32, help='B: clean images per AugMix batch')
    parser.add_argument('--num-splits', type=int, default=3)
    parser.add_argument('--batches', type=int, default=12, help='training batches per timed epoch')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--bf16', action='store_true', help='bfloat16 mixed precision (to_bf16)')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--quick', action='store_true', help='a tiny run, for tests')
    args = parser.parse_args()
    if args.quick:
        args.size, args.bs, args.batches, args.repeats = 32, 4, 2, 1
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    arch = globals()[args.arch] if args.arch in ('resnet18', 'resnet34', 'resnet50') else args.arch
    k = args.num_splits

    augmix_dls = fashion_dls(size=args.size, bs=args.bs, device=device, seed=0)
    plain_dls = fashion_dls(size=args.size, bs=k * args.bs, device=device, seed=0)
    augmix_learn = make_learner(augmix_dls, arch, True, args.bf16, k)
    plain_learn = make_learner(plain_dls, arch, False, args.bf16, k)
    for learn in (augmix_learn, plain_learn):  # warm-up: allocator, kernels, optimizer state
        epoch_seconds(learn, 2, device)

    plain_times, augmix_times, ratios = [], [], []
    for _ in range(args.repeats):
        plain = epoch_seconds(plain_learn, args.batches, device)
        augmixed = epoch_seconds(augmix_learn, args.batches, device)
        plain_times.append(plain); augmix_times.append(augmixed); ratios.append(augmixed / plain)

    precision = 'bf16' if args.bf16 else 'fp32'
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'{args.arch}, {args.size} px, {precision}, {where}; {args.batches} batches per epoch, '
          f'median of {args.repeats} alternating runs\n')
    print('| run | images through the model per step | seconds per epoch (median) |')
    print('|---|---|---|')
    print(f'| plain cross-entropy, batch {k * args.bs} | {k * args.bs} | {statistics.median(plain_times):.3f} |')
    print(f'| AugMix + JSD, batch {args.bs} ({k} splits) | {k * args.bs} | {statistics.median(augmix_times):.3f} |')
    print(f'\nratio AugMix + JSD / plain (median of per-run ratios): {statistics.median(ratios):.3f}')


if __name__ == '__main__':
    main()
