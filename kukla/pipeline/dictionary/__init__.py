"""Sparse dictionaries (Matryoshka SAEs and transcoders): model, loss, calibration, directory format.

The trainer builds on this API: `Dictionary(cfg)`, `set_scales`, `initialize`, then per batch
`training_loss(dictionary, …)` → backward → `project_decoder_grads` → step → `normalize_decoder` →
`update_dead` (all without reading the device); at logging intervals `count_dead` (sizes aux-k's
candidates); after training `calibrate_threshold`, then `save_dictionary`.
"""

from kukla import lazy_exports

_EXPORTS = {
    "calibrate_threshold": "kukla.pipeline.dictionary.rules.batchtopk",
    "calibration_rows": "kukla.pipeline.dictionary.rules.batchtopk",
    "evaluation_rows": "kukla.pipeline.dictionary.rules.batchtopk",
    "DictionaryConfig": "kukla.pipeline.dictionary.config", "DictionarySettings": "kukla.pipeline.dictionary.config",
    "default_lr": "kukla.pipeline.dictionary.config",
    "load_dictionary": "kukla.pipeline.dictionary.directory", "save_dictionary": "kukla.pipeline.dictionary.directory",
    "TrainOutput": "kukla.pipeline.dictionary.loss", "training_loss": "kukla.pipeline.dictionary.loss",
    "Dictionary": "kukla.pipeline.dictionary.model",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)  # configs import without torch (the CLI's --help)
