"""Sparse dictionaries (Matryoshka SAEs and transcoders): model, loss, calibration, directory format.

The trainer builds on this API: `Dictionary(cfg)`, `set_scales`, `initialize`, then per batch
`training_loss(dictionary, …)` → backward → `project_decoder_grads` → step → `normalize_decoder` →
`update_dead` (all without reading the device); at logging intervals `count_dead` (sizes aux-k's
candidates); after training `calibrate_threshold`, then `save_dictionary`.
"""

from kukla.pipeline.dictionary.calibrate import calibrate_threshold
from kukla.pipeline.dictionary.config import DictionaryConfig, DictionarySettings, default_lr
from kukla.pipeline.dictionary.directory import load_dictionary, save_dictionary
from kukla.pipeline.dictionary.loss import TrainOutput, training_loss
from kukla.pipeline.dictionary.model import Dictionary

__all__ = ["Dictionary", "DictionaryConfig", "DictionarySettings", "TrainOutput", "calibrate_threshold", "default_lr",
           "load_dictionary", "save_dictionary", "training_loss"]
