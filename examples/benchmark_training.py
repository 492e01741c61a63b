"""What AugMix + JSD costs per training step beyond the tripled batch it inherently trains on.

Both runs train the same model on the same images for the same number of steps, from batches that
are already on the device and already normalized, as fastai's DataLoader hands them to the callbacks:
plain cross-entropy at batch 3B against AugMix + JSD at batch B (the model sees 3B images either way).
So neither run pays for loading, and the ratio is exactly what the plugin adds: decoding, the AugMix
views, re-encoding, and the JSD term. (Feeding the plain run 3B images through fastai's item pipeline
would charge it loader work the AugMix run does not have, and hide the augmentation's cost.)

    python examples/benchmark_training.py                      # CPU: resnet18, 64 px, B = 32
    python examples/benchmark_training.py --device cuda --arch resnet50 --size 224 --bs 64 --bf16
    python examples/benchmark_training.py --device cuda --arch resnet18 --size 32 --bs 128 --bf16

Prints ms per step (median of alternating runs), the ratio, and the time of the views alone
(`AugMixCallback.before_batch`); on CUDA also the host syncs one `before_batch` makes.
"""
import argparse
import statistics
import time
import warnings

from fastai.vision.all import *

from fastai_jsd import AugMixCallback, JsdCrossEntropy
from fastai_jsd.data import fashion_dls


class PremadeBatches:
    "A training DataLoader stand-in replaying batches already on the device, with the real loader's `Normalize`."
    def __init__(self, batches, like):
        self.batches, self.after_batch, self.n_inp, self.device = batches, like.after_batch, like.n_inp, like.device
    def __iter__(self): return iter(self.batches)
    def __len__(self): return len(self.batches)


class SkipValidation(Callback):
    "An 'epoch' is the training batches only."
    order = 99
    def before_validate(self): raise CancelValidException()


def synchronize(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def ms_per_step(learn, device):
    "Wall time of one training epoch over the pre-made batches, per step."
    synchronize(device)
    start = time.perf_counter()
    with learn.no_logging(), learn.no_bar():
        learn.fit(1, 1e-3, cbs=SkipValidation())
    synchronize(device)
    return (time.perf_counter() - start) / len(learn.dls.train) * 1e3


def make_learner(dls, batches, arch, augmix, bf16, num_splits, backend, channels_last):
    loss = JsdCrossEntropy(num_splits=num_splits) if augmix else CrossEntropyLossFlat()
    cbs = [AugMixCallback(num_splits=num_splits, backend=backend)] if augmix else []
    learn = vision_learner(dls, arch, pretrained=False, loss_func=loss, cbs=cbs)
    learn.dls = DataLoaders(PremadeBatches(batches, dls.train), PremadeBatches(batches[:1], dls.train),
                            device=dls.device)
    if channels_last: learn.model = learn.model.to(memory_format=torch.channels_last)
    return learn.to_bf16() if bf16 else learn


def premade_batches(size, batch_size, n_batches, device, channels_last):
    "`n_batches` normalized batches of `batch_size` real images on `device`, and the DataLoaders they came from."
    dls = fashion_dls(size=size, bs=batch_size, device=device, seed=0)
    batches = []
    for xb, yb in dls.train:
        if channels_last: xb = xb.contiguous(memory_format=torch.channels_last)
        batches.append((xb, yb))
        if len(batches) == n_batches: break
    return dls, batches


def views_ms(learn, xb, device, repeats=20):
    "Median time of the AugMix views alone: decode, augment, re-encode (`AugMixCallback.augmented_views`)."
    callback = learn.aug_mix
    callback.before_fit()
    times = []
    for _ in range(repeats + 1):
        synchronize(device)
        start = time.perf_counter()
        callback.augmented_views(xb, callback.num_splits - 1)
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[1:])


def before_batch_syncs(learn, xb, yb):
    "Host syncs of one `AugMixCallback.before_batch` on CUDA, counted by torch's sync debug mode."
    callback = learn.aug_mix
    callback.before_fit()
    learn.training = True
    learn.xb, learn.yb = (xb,), (yb,)
    callback.before_batch()  # warm-up
    learn.xb, learn.yb = (xb,), (yb,)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try: callback.before_batch()
        finally: torch.cuda.set_sync_debug_mode('default')
    return sum('synchroniz' in str(w.message) for w in caught)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', default='resnet18', help='torchvision/fastai model name (resnet18, resnet50)')
    parser.add_argument('--size', type=int, default=64)
    parser.add_argument('--bs', type=int, default=32, help='B: clean images per AugMix batch')
    parser.add_argument('--num-splits', type=int, default=3)
    parser.add_argument('--batches', type=int, default=12, help='training steps per timed epoch')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--bf16', action='store_true', help='bfloat16 mixed precision (to_bf16)')
    parser.add_argument('--channels-last', action='store_true', help='model and batches in channels_last')
    parser.add_argument('--backend', default=None, help="AugMix kernels: torch, triton (default: by device)")
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: all cores)')
    parser.add_argument('--quick', action='store_true', help='a tiny run, for tests')
    args = parser.parse_args()
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda needs a CUDA GPU (torch.cuda.is_available() is False).')
    if args.quick:
        args.size, args.bs, args.batches, args.repeats = 32, 4, 2, 1
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    arch = globals()[args.arch] if args.arch in ('resnet18', 'resnet34', 'resnet50') else args.arch
    k = args.num_splits

    dls, plain_batches = premade_batches(args.size, k * args.bs, args.batches, device, args.channels_last)
    augmix_batches = [(xb[:args.bs], yb[:args.bs]) for xb, yb in plain_batches]  # the same images, B at a time
    augmix_learn = make_learner(dls, augmix_batches, arch, True, args.bf16, k, args.backend, args.channels_last)
    plain_learn = make_learner(dls, plain_batches, arch, False, args.bf16, k, args.backend, args.channels_last)
    for learn in (augmix_learn, plain_learn):  # warm-up: allocator, kernels, optimizer state
        ms_per_step(learn, device)

    plain_times, augmix_times, ratios = [], [], []
    for _ in range(args.repeats):
        plain = ms_per_step(plain_learn, device)
        augmixed = ms_per_step(augmix_learn, device)
        plain_times.append(plain); augmix_times.append(augmixed); ratios.append(augmixed / plain)
    views = views_ms(augmix_learn, *augmix_batches[0][:1], device)

    precision = 'bf16' if args.bf16 else 'fp32'
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f'{args.arch}, {args.size} px, B = {args.bs}, {precision}{", channels_last" if args.channels_last else ""}, '
          f'{where}, torch {torch.__version__}, {time.strftime("%Y-%m-%d")}; {args.batches} steps per epoch from '
          f'pre-made batches on the device, median of {args.repeats} alternating runs\n')
    print('| model | px | B | precision | plain ms/step (batch 3B) | AugMix + JSD ms/step | views ms | ratio |')
    print('|---|---:|---:|---|---:|---:|---:|---:|')
    print(f'| {args.arch} | {args.size} | {args.bs} | {precision} | {statistics.median(plain_times):.1f} | '
          f'{statistics.median(augmix_times):.1f} | {views:.1f} | {statistics.median(ratios):.3f} |')
    if device.type == 'cuda':
        print(f'\nhost syncs in one AugMixCallback.before_batch: {before_batch_syncs(augmix_learn, *augmix_batches[0])}')


if __name__ == '__main__':
    main()
