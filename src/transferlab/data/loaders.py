"""DataLoaders under DDP: evaluation that sees each sample exactly once."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader


def exact_eval_loader(loader: DataLoader, trainer: Any) -> DataLoader:
    """Under DDP, the same loader with each sample on exactly one process.

    Lightning would give evaluation loaders a DistributedSampler, which pads the last ranks with
    duplicates so that every rank gets as many batches: val/test metrics would count those twice.
    Lightning keeps a sampler that already is a DistributedSampler, so this one stays. Ranks may then
    see different numbers of batches, which evaluation allows (no gradient sync); metrics and logged
    means are summed over processes (torchmetrics states, Lightning's batch-size weighted means).
    """
    if trainer is None or trainer.world_size <= 1:
        return loader
    sampler = UnrepeatedDistributedSampler(
        loader.dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        persistent_workers=loader.persistent_workers,
    )
