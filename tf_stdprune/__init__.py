"""tf_stdprune: Han et al.'s std-threshold pruning as a tfmot plugin for tf_keras.

Replace ``tfmot.sparsity.keras.prune_low_magnitude(model)`` by
``tf_stdprune.prune_low_std(model)``: a weight is pruned when ``|w| < q * std(layer)``.
"""
from tf_stdprune._keras import keras  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tf_stdprune.callbacks import IterationLearningRate, PruningSummaries, UpdatePruningStep
from tf_stdprune.compressed_file import CompressedFileError, compress, decompress, read_weights
from tf_stdprune.compression_report import (
    CompressionReport,
    compression_report,
    plot_compression_stages,
)
from tf_stdprune.export import disk_size, export_dense_saved_model, export_sparse_saved_model
from tf_stdprune.iterative import IterativePruning, iterative_callbacks
from tf_stdprune.prune import prune_low_std, prune_scope, strip_pruning
from tf_stdprune.quantize import QuantizeWeights, linear_kmeans, quantize_weights, strip_quantization
from tf_stdprune.recalibration import recalibrate_batchnorm
from tf_stdprune.report import SparsityReport, sparsity_report
from tf_stdprune.run_state import restore_run
from tf_stdprune.schedule import StdPruningSchedule
from tf_stdprune.wrapper import PruneLowStd

__all__ = [
    "CompressedFileError",
    "CompressionReport",
    "IterationLearningRate",
    "IterativePruning",
    "PruneLowStd",
    "PruningSummaries",
    "QuantizeWeights",
    "SparsityReport",
    "StdPruningSchedule",
    "UpdatePruningStep",
    "compress",
    "compression_report",
    "decompress",
    "disk_size",
    "export_dense_saved_model",
    "export_sparse_saved_model",
    "iterative_callbacks",
    "linear_kmeans",
    "plot_compression_stages",
    "prune_low_std",
    "prune_scope",
    "quantize_weights",
    "read_weights",
    "recalibrate_batchnorm",
    "restore_run",
    "sparsity_report",
    "strip_pruning",
    "strip_quantization",
]
