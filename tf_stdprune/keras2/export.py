"""`export_sparse_saved_model` and `export_dense_saved_model` for tf_keras models.

The format, the decode on load and sparse compute are `serving`'s (module docstring);
this module supplies the tf_keras pieces: a private plain copy of the model (wrappers
stripped, quantized values baked in) and the tensor substitution of `wrapper`.
"""
from tf_stdprune.compression import serving
from tf_stdprune.keras2.engine import check_keras2, keras
from tf_stdprune.keras2.prune import prune_scope
from tf_stdprune.keras2.quantize import QuantizeWeights, plain_model
from tf_stdprune.compression.serving import (  # noqa: F401  (public here too)
    MARKER, SPARSE_MAX_BATCH, SPARSE_MIN_WEIGHTS, SPARSE_MIN_ZEROS, check_pruned, disk_size)
from tf_stdprune.keras2.wrapper import substituted  # noqa: F401  (the world's substitution)


def private_plain_copy(model):
    """A plain (unwrapped) copy of ``model`` with its own variables, the same values.

    Stripping a quantized model assigns the shared values to its layers' kernels; doing
    that on a copy leaves ``model`` exactly as it was.
    """
    check_keras2(model, "The model passed to the export")
    if not isinstance(model, keras.Model):
        raise TypeError(f"model must be a tf_keras Model, got {type(model).__name__}.")
    copy = serving.private_copy(model, _clone, bool(model.inputs),
                                "keras.utils.register_keras_serializable")
    return plain_model(copy)


def _clone(model):
    with prune_scope(), keras.utils.custom_object_scope({"QuantizeWeights": QuantizeWeights}):
        return keras.models.clone_model(model)


def export_sparse_saved_model(model, path, overwrite=False, sparse_compute=False):
    """Writes the tf_keras ``model`` (stripped, or with pruning/quantization wrappers) as
    a SavedModel whose prunable tensors are sparse and decoded once; returns the absolute
    path. See `tf_stdprune.export_sparse_saved_model` for the contract.

    Examples::

        export_sparse_saved_model(strip_pruning(pruned), "exports/sparse")
        serve = tf.saved_model.load("exports/sparse").signatures["serving_default"]
    """
    return serving.export(model, path, overwrite, True, sparse_compute, _WORLD)


def export_dense_saved_model(model, path, overwrite=False):
    """The baseline: the same serving function and signature with every tensor dense."""
    return serving.export(model, path, overwrite, False, False, _WORLD)


_WORLD = serving.World(private_plain_copy, substituted)
