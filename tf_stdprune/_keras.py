"""The one place tf_stdprune imports Keras.

tfmot 0.8 works with Keras 2 only, which TensorFlow >= 2.16 ships as the separate
`tf_keras` package. Every module of tf_stdprune takes `keras` from here, and every
public entry point passes user objects through `check_keras2`, so a Keras 3 model
fails early with a message that says how to fix it instead of deep inside tfmot.
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import tf_keras as keras  # noqa: E402  (the environment variable must be set first)

KERAS3_ERROR = (
    "{what} is a Keras 3 object, but tf_stdprune (like tfmot 0.8) works with Keras 2 "
    "only. Build the model with `import tf_keras as keras`, or set the environment "
    "variable TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported so that "
    "`tf.keras` is Keras 2."
)


def check_keras2(obj, what="The object passed"):
    """Raises `TypeError` if `obj` (or any item of a list of them) is a Keras 3 object."""
    for item in obj if isinstance(obj, (list, tuple)) else [obj]:
        module = type(item).__module__
        if module.split(".")[0] == "keras" and not isinstance(item, keras.layers.Layer):
            raise TypeError(KERAS3_ERROR.format(what=f"{what} ({type(item).__name__})"))
    return obj
