"""Harvest: run a model (or the toy-tree source) over text and write a shuffled activation store.

    from kukla.pipeline.harvest import HarvestConfig, harvest
    harvest(HarvestConfig(output="run.zarr", dataset="train.jsonl", hook=["resid_post:6", "mlp_out:6"]))

The pieces, in the order a harvest uses them: `kukla.pipeline.text` (dataset → packed BOS-led
windows; evaluate re-makes its downstream windows with it too), `forward` (one segment through
the model, all hooks at once, rows to the host in the store dtype), `kukla.pipeline.massive` (the
massive-activation flags), `kukla.pipeline.toy` (the synthetic source), `run` (the plan: windows →
budget cut → segments → ranks; the resumable loop and its background writer thread).
"""

from kukla import lazy_exports
from kukla.pipeline.harvest.config import DatasetConfig, HarvestConfig, ToyConfig

__all__ = ["HarvestConfig", "DatasetConfig", "ToyConfig", "harvest", "ToyTree", "TOY_HOOK"]
__getattr__ = lazy_exports(__name__, {"harvest": "kukla.pipeline.harvest.run", "ToyTree": "kukla.pipeline.toy",
                                      "TOY_HOOK": "kukla.pipeline.toy"})
