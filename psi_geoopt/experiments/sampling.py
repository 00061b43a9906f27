"""The minibatch sampling of every training run: seeded epochs of a random permutation.

:func:`minibatches` draws a fresh permutation of the training set each epoch from a generator
seeded with ``seed`` and cuts it into batches of ``batch_size``, dropping the incomplete last
one so that every BatchNorm batch has ``batch_size`` samples. The same seed gives the same
batches whatever the dataset is stored as.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["minibatches"]


def minibatches(num_samples: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless index batches of ``batch_size`` from ``range(num_samples)``, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    batches_per_epoch = num_samples // batch_size
    while True:
        permutation = torch.randperm(num_samples, generator=generator)
        for index in range(batches_per_epoch):
            yield permutation[index * batch_size : (index + 1) * batch_size]
