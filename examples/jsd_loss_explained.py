"""The Jensen-Shannon consistency loss of AugMix, explained on hand-made model outputs.

Run:  python examples/jsd_loss_explained.py --out ./augmix_out

AugMix feeds every training image through the model k times: once clean, k - 1 times as
differently augmented views. The model sees one batch of k*B images, stacked in blocks
(clean block first), and the loss gets k*B rows of predictions for B targets:

    loss = cross-entropy(clean block, targets) + alpha * JSD(p_clean, p_aug1, p_aug2)

The cross-entropy teaches the classes; the Jensen-Shannon divergence (the mean of the
KL divergences from each split's softmax to their mixture) is 0 when all views get the
same prediction and grows as they disagree, so the model learns to be consistent.
"""
import argparse
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # headless: the figure is only written to a file
import matplotlib.pyplot as plt

from fastai.vision.all import *

from fastai_jsd import JsdCrossEntropy


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("./augmix_out"), help="folder for the plot")
    return parser.parse_args()


def main():
    args = parse_args()

    # Hand-made "model outputs": one-hot logits over 10 classes. Three rows and one
    # target means one image seen as three splits (num_splits=3, the default).
    outputs = F.one_hot(tensor([0, 9, 0])).float()
    targets = tensor([0])
    print("outputs (3 splits of 1 image, 10 classes):")
    print(outputs)

    # alpha=0 switches the consistency term off and smoothing=0 the label smoothing:
    # what is left is the cross-entropy of the clean (first) row only.
    plain = JsdCrossEntropy(smoothing=0, alpha=0)
    print(f"clean-row cross-entropy         : {plain(outputs, targets).item():.4f}")
    print(f"F.cross_entropy of the clean row: {F.cross_entropy(outputs[:1], targets).item():.4f}")

    # The number of splits is rows / targets. With 4 rows and 2 targets there are 2 splits:
    # rows 0-1 are the clean block (one per image), rows 2-3 the augmented block.
    two_splits = JsdCrossEntropy(num_splits=2, smoothing=0, alpha=0)
    outputs2 = F.one_hot(tensor([0, 9, 1, 0])).float()
    targets2 = tensor([0, 9])
    print(f"num_splits=2 loss               : {two_splits(outputs2, targets2).item():.4f}")
    print(f"F.cross_entropy of rows 0 and 1 : {F.cross_entropy(outputs2[:2], targets2).item():.4f}")
    print("A num_splits that contradicts rows / targets is an error, not a silent reshuffle:")
    try:
        JsdCrossEntropy(num_splits=3)(outputs2, targets2)
    except ValueError as error:
        print(f"  ValueError: {error}")
    print("num_splits=None accepts any number of splits; one split (validation, inference)")
    print("is plain label-smoothed cross-entropy, so one loss object serves the whole Learner.")

    # The consistency term alone: alpha=1, and the loss object keeps the last batch's parts.
    jsd_only = JsdCrossEntropy(smoothing=0, alpha=1)
    identical = F.one_hot(tensor([0, 0, 0]), num_classes=10).float()
    jsd_only(identical, targets)
    print(f"JSD term, three identical rows  : {jsd_only.last_consistency.item():.4f}")

    # Move one split's output away from the others: add delta to the class-0 logit of
    # the third split. The divergence is 0 at delta = 0 and grows in both directions.
    deltas = torch.arange(-10, 11) / 10  # exact 0.0 in the middle, unlike linspace
    divergences = []
    for delta in deltas:
        moved = identical.clone()
        moved[2, 0] += delta
        jsd_only(moved, targets)
        divergences.append(jsd_only.last_consistency.item())
    for delta, divergence in zip(deltas.tolist(), divergences):
        print(f"  delta {delta:+.1f}: JSD {divergence:.6f}")

    args.out.mkdir(parents=True, exist_ok=True)
    plot_path = args.out / "jsd_vs_output_change.png"
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(deltas.tolist(), divergences, marker="o")
    ax.set_xlabel("change in the class-0 logit of one split (delta)")
    ax.set_ylabel("Jensen-Shannon divergence (alpha=1)")
    ax.set_title("JS Divergence vs change in output")
    fig.tight_layout()
    fig.savefig(plot_path)
    plt.close(fig)
    print(f"saved plot to {plot_path.resolve()}")
    print("In training, alpha=12 (the paper's weight) multiplies this term.")


if __name__ == "__main__":
    main()
