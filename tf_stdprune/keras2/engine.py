"""The one place the tf_keras path imports tf_keras and tfmot.

tfmot 0.8 works with Keras 2 only, which TensorFlow >= 2.16 ships as the separate
``tf_keras`` package; every module of the tf_keras path takes ``keras`` and ``tfmot`` from
here, and `tf_stdprune` imports this module only when a tf_keras object is handed in.

tfmot sets ``TF_USE_LEGACY_KERAS=1`` when it is imported, which would turn the user's
``tf.keras`` into Keras 2 if TensorFlow resolves ``tf.keras`` afterwards. So ``tf.keras``
is resolved first, under the user's own setting, and the variable is put back as it was:
loading the tf_keras path changes neither ``tf.keras`` nor the environment.
"""
import os

import tensorflow as tf


def _import_tfmot():
    before = os.environ.get("TF_USE_LEGACY_KERAS")
    getattr(tf.keras, "__name__", None)  # resolve TensorFlow's lazy tf.keras now
    try:
        import tensorflow_model_optimization
    finally:
        if before is None:
            os.environ.pop("TF_USE_LEGACY_KERAS", None)
        else:
            os.environ["TF_USE_LEGACY_KERAS"] = before
    return tensorflow_model_optimization


tfmot = _import_tfmot()

import tf_keras as keras  # noqa: E402
from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (  # noqa: E402
    PruneLowMagnitude,
)

KERAS3_ERROR = (
    "{what} is a Keras 3 object, but the tf_keras path (tfmot's engine) takes tf_keras "
    "objects only. Pass Keras 3 models to tf_stdprune's public functions "
    "(tf_stdprune.prune_low_std, ...), which route them to the Keras 3 path, or build the "
    "model with `import tf_keras as keras`."
)


def check_keras2(obj, what="The object passed"):
    """Raises `TypeError` if `obj` (or any item of a list of them) is a Keras 3 object."""
    for item in obj if isinstance(obj, (list, tuple)) else [obj]:
        module = type(item).__module__
        if module.split(".")[0] == "keras" and not isinstance(item, keras.layers.Layer):
            raise TypeError(KERAS3_ERROR.format(what=f"{what} ({type(item).__name__})"))
    return obj
