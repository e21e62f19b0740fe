"""The Zarr activation store: writer, global shuffle, reader and streaming batches.

See docs/FORMATS.md §1 for the on-disk contract.
"""

from kukla.storage.codecs import DEFAULT_CODEC
from kukla.storage.finalize import finalize_store, finalize_worker, unfinished_ranks
from kukla.storage.store import Store, open_store
from kukla.storage.stream import ActivationStream, Batch, batches_per_epoch, rank_share, split_range
from kukla.storage.writer import StoreWriter

__all__ = ["DEFAULT_CODEC", "ActivationStream", "Batch", "Store", "StoreWriter", "batches_per_epoch",
           "finalize_store", "finalize_worker", "open_store", "rank_share", "split_range", "unfinished_ranks"]
