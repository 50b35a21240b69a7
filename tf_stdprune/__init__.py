"""tf_stdprune: Han et al.'s std-threshold pruning and Deep Compression for Keras.

A weight is pruned when ``|w| < q * std(layer)`` (Han et al. 2015). The same public
names serve tf_keras models (with tfmot as the engine) and Keras 3 models on any backend:
each call is routed by the model it receives (see `tf_stdprune.dispatch`). Importing the
package sets no environment variable and loads neither tf_keras nor tfmot; they load
when a tf_keras object is first handed in.

Pruning:      prune_low_std, strip_pruning, StdPruningSchedule, UpdatePruningStep,
              sparsity_report, accuracy_change, PruneLowStd, prune_scope, PruningSummaries,
              check_m_by_n_sparsity, PruneForLatencyOnXNNPack, NonFiniteError
Procedure:    iterative_callbacks, IterativePruning, IterationLearningRate, restore_run,
              recalibrate_batchnorm, sensitivity_analysis, suggest_layer_quality
Compression:  quantize_weights, strip_quantization, QuantizeWeights, linear_kmeans,
              compress, decompress, read_weights, compression_report,
              export_sparse_saved_model, export_dense_saved_model, export_tflite, disk_size,
              compare_forms, forms_markdown
"""
import importlib

from tf_stdprune.dispatch import UpdatePruningStep, module_for, procedure_callbacks
from tf_stdprune.schedule import StdPruningSchedule
from tf_stdprune.validate import NonFiniteError


def prune_low_std(to_prune, *args, **kwargs):
    """Wraps every prunable layer of a model (or a layer, or a list of layers) so that
    weights with ``|w| < q * std`` are pruned during training.

    Routed to `tf_stdprune.keras2.prune.prune_low_std` for tf_keras objects and to
    `tf_stdprune.keras3.prune.prune_low_std` for Keras 3 objects; see those for the
    arguments (``pruning_schedule``, ``std_mode``, ``layer_quality``, ...).

    Examples:
      >>> schedule = tf_stdprune.StdPruningSchedule([0.5, 1.0], steps_per_iteration=300)
      >>> pruned = tf_stdprune.prune_low_std(model, pruning_schedule=schedule)
      >>> pruned.fit(x, y, epochs=6, callbacks=[tf_stdprune.UpdatePruningStep()])
    """
    module = module_for(to_prune, "prune", "prune_low_std")
    return module.prune_low_std(to_prune, *args, **kwargs)


def strip_pruning(model):
    """The model without pruning wrappers, its pruned weights exact zeros (either Keras).

    Examples:
      >>> final = tf_stdprune.strip_pruning(pruned)
      >>> final.save("pruned.keras")
    """
    return module_for(model, "prune", "strip_pruning").strip_pruning(model)


def quantize_weights(model, *args, **kwargs):
    """Weight sharing (Han, Mao and Dally 2016): every prunable tensor's nonzeros clustered
    into ``2^bits`` shared values, centroids trainable; see `tf_stdprune.keras2.quantize` (tf_keras)
    and `tf_stdprune.keras3.quantize` (Keras 3).

    Examples:
      >>> quantized = tf_stdprune.quantize_weights(tf_stdprune.strip_pruning(pruned))
    """
    return module_for(model, "quantize", "quantize_weights").quantize_weights(model, *args, **kwargs)


# The procedure's callbacks, for either Keras (each becomes the model's Keras's in fit).
IterativePruning = procedure_callbacks.IterativePruning
IterationLearningRate = procedure_callbacks.IterationLearningRate


def iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, *args, **kwargs):
    """The callbacks of the reference experiment's iterative procedure (either Keras):
    learning-rate list and drops, pruning at each iteration's start, BN recalibration,
    dropout rescaling, history, checkpoints and figures in ``run_dir``; see
    `tf_stdprune.procedure.iterative.iterative_callbacks` for the arguments. Each callback becomes
    the model's Keras's when ``fit`` hands it the model.

    Examples:
      >>> initial_epoch = tf_stdprune.restore_run(pruned, "runs/a")
      >>> pruned.fit(x, y, epochs=3 * E, initial_epoch=initial_epoch,
      ...            callbacks=tf_stdprune.iterative_callbacks("runs/a", E, [0.05, 0.01]))
    """
    procedure = importlib.import_module("tf_stdprune.procedure.iterative")
    return procedure.iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, *args,
                                         **kwargs)


def restore_run(model, run_dir, *args, **kwargs):
    """Restores the last finished iteration of ``run_dir`` into the compiled ``model``
    and returns the epoch to pass as ``fit(initial_epoch=...)`` (0 for a new run);
    refuses a directory made with other settings. Routed to
    `tf_stdprune.keras2.run_state.restore_run` (tf_keras) or
    `tf_stdprune.keras3.iterative.restore_run` (Keras 3).

    Examples:
      >>> initial_epoch = tf_stdprune.restore_run(pruned, "runs/a", fall_back=True)
    """
    return module_for(model, "run", "restore_run").restore_run(model, run_dir, *args, **kwargs)


def recalibrate_batchnorm(model, data, batches):
    """Fresh BatchNormalization moving statistics: the mean of ``batches`` batches' own
    statistics of ``data`` (either Keras; see `tf_stdprune.keras2.recalibration`).

    Examples:
      >>> tf_stdprune.recalibrate_batchnorm(pruned, batches_of_x, 20)
    """
    module = module_for(model, "recalibration", "recalibrate_batchnorm")
    return module.recalibrate_batchnorm(model, data, batches)


def strip_quantization(model):
    """A plain model holding the shared values (either Keras); ``model`` is unchanged."""
    return module_for(model, "quantize", "strip_quantization").strip_quantization(model)


def export_sparse_saved_model(model, path, overwrite=False, sparse_compute=False):
    """Writes ``model`` (stripped, or with pruning/quantization wrappers) as a SavedModel
    whose prunable tensors are stored sparsely and decoded once when it is loaded (see
    `tf_stdprune.compression.serving`); returns the absolute path. tf_keras models, and Keras 3
    models on the TensorFlow backend (another backend raises before writing anything).

    ``sparse_compute``: ``"auto"``, ``True`` or ``False``: whether eligible Dense and
    pointwise Conv2D layers multiply by the sparse kernel. Written to a temporary
    directory next to ``path``, then renamed. Raises `FileExistsError` if ``path`` is a
    file or a non-empty directory, unless ``overwrite``; ``overwrite`` replaces only an
    earlier export (a directory holding ``tf_stdprune_export.json``) and never the
    working directory, its parents, the home directory or the root. ``model`` is not
    changed.

    Examples:
      >>> tf_stdprune.export_sparse_saved_model(tf_stdprune.strip_pruning(pruned), "out/sparse")
      >>> serve = tf.saved_model.load("out/sparse").signatures["serving_default"]
    """
    module = module_for(model, "export", "export_sparse_saved_model")
    return module.export_sparse_saved_model(model, path, overwrite, sparse_compute)


def export_dense_saved_model(model, path, overwrite=False):
    """The baseline of `export_sparse_saved_model`: the same serving function and
    signature with every tensor dense (either Keras; Keras 3 on TensorFlow only).

    Examples:
      >>> tf_stdprune.export_dense_saved_model(final, "out/dense")
    """
    module = module_for(model, "export", "export_dense_saved_model")
    return module.export_dense_saved_model(model, path, overwrite)


def export_tflite(model, path, sparse=True, int8=False, representative_data=None,
                  overwrite=False):
    """Writes ``model`` (stripped, or with pruning/quantization wrappers; not changed) as a
    TFLite (LiteRT) flatbuffer at ``path``; returns the absolute path. tf_keras models, and
    Keras 3 models on the TensorFlow backend (through Keras's ``export(format="litert")``).

    ``sparse``: pruned weights stored in TFLite's sparse format, which also asks XNNPACK
    for its sparse inference of 1x1 convolutions; ``int8``: full-integer quantization
    calibrated on ``representative_data``. See `tf_stdprune.compression.litert`.

    Examples:
      >>> tf_stdprune.export_tflite(tf_stdprune.strip_pruning(pruned), "out/model.tflite")
      >>> tf_stdprune.export_tflite(pruned, "out/int8.tflite", int8=True,
      ...                           representative_data=x_train[:256])
    """
    module = module_for(model, "tflite", "export_tflite")
    return module.export_tflite(model, path, sparse, int8, representative_data, overwrite)


# Names that only the tf_keras path has (so far): loaded, with tf_keras and tfmot, on
# first use.
_LAZY = {
    "CompressedFileError": "compression.compressed_file", "compress": "compression.compressed_file",
    "decompress": "compression.compressed_file", "read_weights": "compression.compressed_file",
    "CompressionReport": "compression.stages", "compression_report": "compression.stages",
    "plot_compression_stages": "compression.stages",
    "compare_forms": "compression.forms", "forms_markdown": "compression.forms",
    "disk_size": "compression.serving",  # any path
    "PruningSummaries": "keras2.callbacks",
    "prune_scope": "keras2.prune", "PruneLowStd": "keras2.wrapper",
    "QuantizeWeights": "keras2.quantize", "linear_kmeans": "compression.kmeans",
    "SparsityReport": "report", "sparsity_report": "report",
    "check_m_by_n_sparsity": "report", "PruneForLatencyOnXNNPack": "policy",
    "AccuracyChange": "accuracy", "accuracy_change": "accuracy",
    "sensitivity_analysis": "procedure.sensitivity", "suggest_layer_quality": "procedure.sensitivity",
    "SensitivityTable": "procedure.sensitivity",
}
_SUBMODULES = ("models", "data")


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"tf_stdprune.{_LAZY[name]}"), name)
        globals()[name] = value  # also hides a submodule of the same name
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"tf_stdprune.{name}")
    raise AttributeError(f"module 'tf_stdprune' has no attribute {name!r}")


def __dir__():
    return sorted(set(__all__) | set(_SUBMODULES))


__all__ = sorted(["IterationLearningRate", "IterativePruning", "NonFiniteError", "StdPruningSchedule",
                  "UpdatePruningStep", "iterative_callbacks",
                  "export_dense_saved_model", "export_sparse_saved_model", "export_tflite",
                  "prune_low_std", "quantize_weights", "recalibrate_batchnorm", "restore_run",
                  "strip_pruning", "strip_quantization", *_LAZY])
