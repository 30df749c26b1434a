"""Image files of a dataset: listing a folder, and decoding a split once into memory.

    paths = list_images("photos/", recursive=True)
    images = ImageTensors(paths, size=128)     # uint8 (N, 3, 128, 128); unreadable files dropped
    batch = images.batch([0, 5, 7])            # (3, 3, 128, 128), normalised as `preprocess` does
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from captioner.image import ImageError, load_image, normalize, resize

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in a folder (by suffix), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    pattern = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class ImageTensors:
    """Images decoded once and kept in memory as uint8 (N, 3, S, S); normalised per batch.

    Decoding and resizing dominate a small model's training step on a CPU, so datasets that fit
    in memory (the shapes world, coco-mini) are decoded once. Unreadable files are dropped here.
    """

    def __init__(self, paths: Sequence[Path], size: int, progress=None):
        kept, tensors, bad = [], [], []
        iterator = progress(paths) if progress else paths
        for i, path in enumerate(iterator):
            try:
                image = load_image(path)
            except ImageError as exc:
                bad.append(f"{path}: {exc}")
                continue
            tensors.append(resize(image, size))
            kept.append(i)
        self.kept = kept  # indices into `paths` that decoded
        self.unreadable = bad
        self.data = (
            torch.stack(tensors) if tensors else torch.empty(0, 3, size, size, dtype=torch.uint8)
        )

    def __len__(self) -> int:
        return self.data.shape[0]

    def batch(self, indices: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Normalised float images (B, 3, S, S), exactly as `captioner.image.preprocess` makes them."""
        return normalize(self.data[list(indices)].to(device))
