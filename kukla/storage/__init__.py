"""The Zarr activation store: writer, global shuffle, reader and streaming batches.

See docs/FORMATS.md §1 for the on-disk contract. Names load on first use (`lazy_exports`), so
the CLI imports `kukla.storage.codecs` without torch.
"""

from kukla import lazy_exports

_EXPORTS = {
    "DEFAULT_CODEC": "kukla.storage.codecs",
    "finalize_store": "kukla.storage.finalize", "finalize_worker": "kukla.storage.finalize",
    "unfinished_ranks": "kukla.storage.format",
    "Store": "kukla.storage.store", "open_store": "kukla.storage.store",
    "ActivationStream": "kukla.storage.stream", "Batch": "kukla.storage.stream",
    "batches_per_epoch": "kukla.storage.stream", "rank_share": "kukla.storage.stream",
    "split_range": "kukla.storage.stream",
    "StoreWriter": "kukla.storage.writer",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
