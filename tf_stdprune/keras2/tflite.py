"""`export_tflite` for tf_keras models: a pruned model as a TFLite (LiteRT) flatbuffer.

The model (stripped, or with pruning/quantization wrappers; it is not changed) is traced
with a free batch dimension and converted by ``tf.lite.TFLiteConverter``; what ``sparse``
and ``int8`` do, and how the file is written, is `tf_stdprune.compression.litert`'s.
"""
import re

import tensorflow as tf

from tf_stdprune.compression import litert
from tf_stdprune.compression.litert import run_tflite  # noqa: F401  (public here too)
from tf_stdprune.keras2.export import private_plain_copy
from tf_stdprune.keras2.prune import all_layers


def _converter(model, sparse, int8, representative_data):
    """The configured converter and the concrete function it converts."""
    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], model.inputs[0].dtype)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []
    if int8:
        converter.optimizations.append(tf.lite.Optimize.DEFAULT)
        converter.representative_dataset = litert.representative_samples(representative_data,
                                                                        spec.shape[1:])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter, function


def rejected_layers(function, model, message):
    """``{layer name: [TF op types]}`` for the ops a converter error message names
    (``'tf.<Op>' op is neither a custom op nor a flex op``), found in the traced graph."""
    op_types = set(re.findall(r"'tf\.(\w+)' op", message))
    names = {l.name for l in all_layers(model)}
    found = {}
    for op in function.graph.get_operations():
        if op.type in op_types:
            layer = next((part for part in op.name.split("/") if part in names), op.name)
            found[layer] = sorted({*found.get(layer, []), op.type})
    return found


def _convert(model, sparse, int8, representative_data):
    converter, function = _converter(model, sparse, int8, representative_data)
    try:
        return converter.convert()
    except Exception as error:  # the converter raises its own ConverterError types
        message = str(error)
        layers = rejected_layers(function, model, message)
        what = (", ".join(f"layer {k!r} (ops {', '.join(v)})" for k, v in layers.items())
                or (message.strip().splitlines() or [type(error).__name__])[0])
        raise ValueError(
            f"tf.lite.TFLiteConverter cannot convert model {model.name!r}: {what} has no "
            f"TFLite builtin{' int8' if int8 else ''} kernel. Replace it with layers built from "
            "TFLite builtin ops, or serve the model as a SavedModel "
            "(export_sparse_saved_model).") from error


def export_tflite(model, path, sparse=True, int8=False, representative_data=None,
                  overwrite=False):
    """Converts ``model`` to a TFLite flatbuffer at ``path`` (module docstring); returns
    the absolute path.

    Args:
      model: a built tf_keras model with one input, pruned (plain, or with pruning or
        quantization wrappers). It is not changed.
      path: the ``.tflite`` file to write.
      sparse: store sparse weights sparsely (``Optimize.EXPERIMENTAL_SPARSITY``); the
        model must then have pruned weights.
      int8: full-integer post-training quantization; needs ``representative_data``.
      representative_data: an array of inputs ``[n, ...]`` or a `tf.data.Dataset` of
        batches (or of ``(x, y)`` batches), used only with ``int8``.
      overwrite: replace an existing TFLite file at ``path``.

    Examples::

        export_tflite(strip_pruning(pruned), "exports/model.tflite")
        export_tflite(pruned, "exports/model_int8.tflite", int8=True,
                      representative_data=x_train[:256])
    """
    return litert.export(model, path, sparse, int8, representative_data, overwrite,
                         private_plain_copy,
                         lambda copy, _: _convert(copy, sparse, int8, representative_data))
