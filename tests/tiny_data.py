"""Tiny synthetic datasets shared by the engine tests and the kill -9 reliability test (also run as a child script)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class NoisyColours(Dataset):
    """``n`` tiny red-ish / blue-ish images (2 classes); ``__getitem__`` adds noise from the global RNG (an
    augmentation stand-in), so an exact resume needs every RNG state restored, not only the weights."""

    def __init__(self, n: int = 48, size: int = 12):
        g = torch.Generator().manual_seed(1)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        colour = torch.zeros(n, 3, 1, 1)
        colour[:, 0] = 1.0 - self.labels.float()[:, None, None]
        colour[:, 2] = self.labels.float()[:, None, None]
        self.images = 0.2 + 0.5 * colour + 0.1 * torch.randn(n, 3, size, size, generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i] + 0.05 * torch.randn_like(self.images[i]), int(self.labels[i])
