"""Real-image fixtures shared by the tests: scikit-learn's two sample photos, no network."""
import numpy as np
import torch
from PIL import Image


def sample_photos():
    """The two photos scikit-learn ships (china.jpg, flower.jpg) as uint8 [2, 427, 640, 3]."""
    from sklearn.datasets import load_sample_images
    return np.stack(load_sample_images().images)


def photo_crops(n, height, width, seed=0):
    """`n` real-image crops of `height` x `width`, resized from random windows of the photos, uint8 [n, H, W, 3]."""
    photos = sample_photos()
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        photo = photos[i % len(photos)]
        side = int(rng.integers(min(height, width) * 2, 400))
        top = int(rng.integers(0, photo.shape[0] - side))
        left = int(rng.integers(0, photo.shape[1] - side))
        window = Image.fromarray(photo[top:top + side, left:left + side])
        crops.append(np.asarray(window.resize((width, height), Image.BILINEAR)))
    return np.stack(crops)


def to_tensor(images):
    """uint8 [N, H, W, 3] or [N, H, W] -> float [N, C, H, W] in [0, 1], values multiples of 1/255."""
    t = torch.from_numpy(np.ascontiguousarray(images)).float() / 255
    return t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def to_grayscale(images):
    """uint8 [N, H, W, 3] -> uint8 [N, H, W] with PIL's own 'L' conversion."""
    return np.stack([np.asarray(Image.fromarray(im).convert('L')) for im in images])


def to_pil(image):
    """float [C, H, W] in [0, 1] (multiples of 1/255) -> PIL 'RGB' or 'L' image."""
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0].numpy(), 'L')
    return Image.fromarray(arr.permute(1, 2, 0).numpy(), 'RGB')


def from_pil(img):
    """PIL 'RGB' or 'L' image -> float [C, H, W] in [0, 1]."""
    arr = torch.from_numpy(np.asarray(img).copy()).float() / 255
    return arr.unsqueeze(0) if arr.ndim == 2 else arr.permute(2, 0, 1).contiguous()
