"""AugMix and the Jensen-Shannon consistency loss for fastai: batched, per-image, on the device."""
__version__ = "0.1.0"

from fastai_jsd.loss import JsdCrossEntropy

__all__ = ["JsdCrossEntropy", "__version__"]
