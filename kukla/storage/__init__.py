"""The Zarr activation store: writer, global shuffle, reader and streaming batches.

See docs/FORMATS.md §1 for the on-disk contract. Names load on first use (`lazy_exports`), so
the CLI imports `kukla.storage.format` without torch.
"""

from kukla import lazy_exports

_EXPORTS = {
    "finalize_store": "kukla.storage.finalize", "finalize_worker": "kukla.storage.finalize",
    "DEFAULT_CODEC": "kukla.storage.format",
    "StoreWriter": "kukla.storage.part", "unfinished_ranks": "kukla.storage.part",
    "Store": "kukla.storage.store", "open_store": "kukla.storage.store",
    "ActivationStream": "kukla.storage.stream", "Batch": "kukla.storage.stream",
    "batches_per_epoch": "kukla.storage.stream", "rank_share": "kukla.storage.stream",
    "split_range": "kukla.storage.stream",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
