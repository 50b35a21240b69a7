"""tf_stdprune: Han et al.'s std-threshold pruning as a tfmot plugin for tf_keras.

Replace ``tfmot.sparsity.keras.prune_low_magnitude(model)`` by
``tf_stdprune.prune_low_std(model)``: a weight is pruned when ``|w| < q * std(layer)``.
"""
from tf_stdprune._keras import keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tf_stdprune.callbacks import IterationLearningRate, PruningSummaries, UpdatePruningStep
from tf_stdprune.iterative import IterativePruning, iterative_callbacks
from tf_stdprune.prune import prune_low_std, prune_scope, strip_pruning
from tf_stdprune.recalibration import recalibrate_batchnorm
from tf_stdprune.report import SparsityReport, sparsity_report
from tf_stdprune.run_state import restore_run
from tf_stdprune.schedule import StdPruningSchedule
from tf_stdprune.wrapper import PruneLowStd

__all__ = [
    "IterationLearningRate",
    "IterativePruning",
    "PruneLowStd",
    "PruningSummaries",
    "SparsityReport",
    "StdPruningSchedule",
    "UpdatePruningStep",
    "iterative_callbacks",
    "prune_low_std",
    "prune_scope",
    "recalibrate_batchnorm",
    "restore_run",
    "sparsity_report",
    "strip_pruning",
]
