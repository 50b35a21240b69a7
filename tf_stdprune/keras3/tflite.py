"""`export_tflite` for Keras 3 models: a TFLite (LiteRT) flatbuffer through Keras's own
``model.export(path, format="litert")``, on the TensorFlow backend.

A private plain copy of the model (pruning wrappers stripped with their masks applied,
quantized values baked in; the model itself is not changed) is exported by Keras, which
converts it with ``tf.lite.TFLiteConverter`` from a SavedModel; the converter settings for
``sparse`` and ``int8`` are handed to Keras's exporter. What they do, the check that the
flatbuffer runs and the atomic write are `tf_stdprune.compression.litert`'s.

Which backend writes which format with Keras 3.15's ``model.export``: TensorFlow writes
``"tf_saved_model"``, ``"litert"`` and ``"onnx"`` (with tf2onnx); JAX writes
``"tf_saved_model"`` (jax2tf) and ``"onnx"`` (with jax2onnx), not ``"litert"``; PyTorch
writes ``"onnx"`` (torch.onnx), ``"litert"`` (with litert-torch) and ``"tf_saved_model"``
(with torch_xla). The TensorFlow and JAX rows are the ones the tests run. This function, like
the SavedModel exports, needs the TensorFlow backend.
"""
import os
import tempfile

import tensorflow as tf

from tf_stdprune.compression import litert
from tf_stdprune.keras3.export import check_backend, private_plain_copy


def converter_settings(sparse, int8, representative_data, input_shape):
    """The ``tf.lite.TFLiteConverter`` attributes Keras's LiteRT exporter is given."""
    settings = {"optimizations": [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []}
    if int8:
        settings["optimizations"].append(tf.lite.Optimize.DEFAULT)
        settings["representative_dataset"] = litert.representative_samples(
            representative_data, input_shape)
        settings["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
    return settings


def export_tflite(model, path, sparse=True, int8=False, representative_data=None,
                  overwrite=False):
    """Converts the Keras 3 ``model`` to a TFLite flatbuffer at ``path`` (module
    docstring); returns the absolute path. Arguments as `tf_stdprune.keras2.tflite`'s.

    Examples::

        export_tflite(strip_pruning(pruned), "exports/model.tflite")
    """
    check_backend("export_tflite")
    return litert.export(model, path, sparse, int8, representative_data, overwrite,
                         private_plain_copy,
                         lambda copy, shape: convert(copy, shape, sparse, int8,
                                                     representative_data))


def convert(copy, input_shape, sparse, int8, representative_data):
    """The flatbuffer of the plain ``copy``, written by Keras's LiteRT export."""
    settings = converter_settings(sparse, int8, representative_data, input_shape)
    with tempfile.TemporaryDirectory() as directory:
        target = os.path.join(directory, "model.tflite")
        try:
            copy.export(target, format="litert", verbose=False, **settings)
        except Exception as error:  # the converter raises its own ConverterError types
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"Keras's LiteRT export cannot convert model {copy.name!r}: {first}. Replace "
                "the layers it names with layers built from TFLite builtin ops, or serve "
                "the model as a SavedModel (export_sparse_saved_model).") from error
        with open(target, "rb") as f:
            return f.read()
