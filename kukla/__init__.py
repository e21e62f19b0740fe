"""kukla: harvest activations, train Matryoshka dictionaries, evaluate them."""

import os

# torch backs large CPU tensors with transparent huge pages when this is set before torch is
# imported: a fresh 38 MB float32 batch then costs ~20 page faults instead of ~9,000, which made
# the reader's bf16 -> float32 batches 2.3x faster per CPU-second (benchmarks/RESULTS.md, Store).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"
