"""`export_sparse_saved_model` and `export_dense_saved_model` for Keras 3 models.

A SavedModel holds TensorFlow graphs, so these need Keras 3's TensorFlow backend
(``KERAS_BACKEND=tensorflow``); on another backend they raise before anything is
written. The format, the decode on load and sparse compute are `serving`'s (module
docstring); this module supplies the Keras 3 pieces: a private plain copy of the model
(pruning wrappers stripped with the masks applied, quantized values baked in) and the
tensor substitution of `keras3.wrapper`. Nothing here imports tf_keras or tfmot.

Keras 3's own ``model.export(path)`` also works on a pruned model, wrapped or stripped:
it writes a dense SavedModel whose ``serve`` endpoint computes what the model computes.
"""
import contextlib

import keras
import tensorflow as tf

from tf_stdprune import registry

from tf_stdprune.compression import serving
from tf_stdprune.dispatch import KERAS3, world_of
from tf_stdprune.keras3 import nested
from tf_stdprune.keras3.prune import is_flat
from tf_stdprune.keras3.quantize import plain_model
from tf_stdprune.keras3.wrapper import substituted

BACKEND_ERROR = (
    "{what} writes a TensorFlow SavedModel, which needs Keras 3's TensorFlow backend, but "
    "the backend is {backend!r}. Run with KERAS_BACKEND=tensorflow (set before keras is "
    "imported).")
# Keras 3 converts JAX functions to TensorFlow (jax2tf); its torch route fails on our models.
JAX_ALTERNATIVE = (
    " Or, on JAX, write a dense SavedModel of the stripped model with Keras 3's own "
    "tf_stdprune.strip_pruning(model).export(path, format='tf_saved_model').")


def check_backend(what):
    """Raises `RuntimeError` unless Keras 3 runs on the TensorFlow backend; on JAX the
    message also names Keras 3's own dense export, which works there."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        alternative = JAX_ALTERNATIVE if backend == "jax" else ""
        raise RuntimeError(BACKEND_ERROR.format(what=what, backend=backend) + alternative)


def _inputs(model):
    try:
        return model.inputs
    except (AttributeError, ValueError):  # an unbuilt Sequential has no inputs yet
        return None


def private_plain_copy(model):
    """A plain Keras 3 copy of ``model`` with its own variables and the same values:
    the pruning wrappers of the copy are stripped (its masks applied) and its quantized
    values baked in, so ``model`` stays exactly as it was. A model that is not a flat
    Sequential or functional one (a KerasHub task, a subclassed model) is rebuilt from its
    config (`tf_stdprune.keras3.nested`)."""
    if world_of(model) != KERAS3 or not isinstance(model, keras.Model):
        raise TypeError(f"model must be a Keras 3 Model, got {type(model).__name__} "
                        f"(from {type(model).__module__}).")
    if not is_flat(model):  # a KerasHub model, a subclass: rebuilt from its config
        plain = plain_model(model)
        return nested.copy_model(plain) if plain is model else plain
    copy = serving.private_copy(model, keras.models.clone_model, bool(_inputs(model)),
                                "keras.saving.register_keras_serializable")
    return plain_model(copy)


@contextlib.contextmanager
def substituted_as_read(layer, paths, tensors):
    """`tf_stdprune.keras3.wrapper.substituted` with each tensor cast to the dtype Keras 3 reads the
    variable it replaces in: the layer's compute dtype (a mixed precision kernel is cast
    on read), except for BatchNormalization, whose variables are read in their own dtype
    (float32)."""
    keep = registry.keras_class_name(layer) == "BatchNormalization"
    variables = [registry.get_tensor(layer, path) for path in paths]
    cast = [tf.cast(t, v.dtype if keep else layer.compute_dtype)
            for t, v in zip(tensors, variables)]
    with substituted(layer, paths, cast):
        yield


_WORLD = serving.World(private_plain_copy, substituted_as_read)


def export_sparse_saved_model(model, path, overwrite=False, sparse_compute=False):
    """Writes the Keras 3 ``model`` (stripped, or with pruning/quantization wrappers) as a
    SavedModel whose prunable tensors are sparse and decoded once; returns the absolute
    path. See `tf_stdprune.export_sparse_saved_model` for the contract.

    Examples::

        export_sparse_saved_model(strip_pruning(pruned), "exports/sparse")
        serve = tf.saved_model.load("exports/sparse").signatures["serving_default"]
    """
    check_backend("export_sparse_saved_model")
    return serving.export(model, path, overwrite, True, sparse_compute, _WORLD)


def export_dense_saved_model(model, path, overwrite=False):
    """The baseline: the same serving function and signature with every tensor dense."""
    check_backend("export_dense_saved_model")
    return serving.export(model, path, overwrite, False, False, _WORLD)
