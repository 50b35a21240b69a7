"""`export_tflite`: a pruned model as a TFLite (LiteRT) flatbuffer.

The model (stripped, or with pruning/quantization wrappers; it is not changed) is traced
with a free batch dimension and converted by ``tf.lite.TFLiteConverter``:

* ``sparse=True`` adds ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``: the converter stores
  each constant weight tensor that it finds sparse enough in TFLite's sparse format
  (per-dimension dense/CSR metadata plus the nonzero values) instead of densely.
* ``int8=True`` does full-integer post-training quantization: weights int8 per channel,
  activations int8 with ranges calibrated on ``representative_data`` (the first
  `MAX_CALIBRATION_SAMPLES` samples, one at a time); the inputs and outputs stay float32.

What the flatbuffer keeps of weight sharing (Han, Mao and Dally 2016): the sparsity
pattern, but not the sharing. A quantized model's ``K`` shared values are stored
value by value, as float32 (or, with ``int8=True``, as int8 levels: at most ``K``
distinct levels per channel, but one byte per weight); the codebook and its short
indices are not kept. `compressed_file.compress` is the form that keeps them.

The flatbuffer is run once in ``tf.lite.Interpreter`` before it is written, and
written atomically: an existing file is replaced only with ``overwrite=True`` and only
if it is a TFLite flatbuffer.
"""
import itertools
import os
import re

import numpy as np
import tensorflow as tf

from tf_stdprune import io as atomic_io
from tf_stdprune.keras2.export import check_pruned, private_plain_copy
from tf_stdprune.keras2.prune import all_layers

MAX_CALIBRATION_SAMPLES = 256
TFLITE_IDENTIFIER = b"TFL3"


def _check_target(path, overwrite):
    if os.path.isdir(path):
        raise ValueError(f"path {path!r} is a directory; export_tflite writes one file: "
                         "give a file path such as 'exports/model.tflite'.")
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it.")
        with open(path, "rb") as f:
            identifier = f.read(8)[4:8]
        if identifier != TFLITE_IDENTIFIER:
            raise ValueError(f"Refusing to replace {path!r}: it is not a TFLite flatbuffer. "
                             "Choose a new path, or move that file away yourself.")


def _samples(representative_data, input_shape):
    """Up to `MAX_CALIBRATION_SAMPLES` float32 samples of shape ``[1, *input_shape]``."""
    if isinstance(representative_data, tf.data.Dataset):
        batches = (b[0] if isinstance(b, (tuple, list)) else b
                   for b in representative_data.as_numpy_iterator())
        data = np.concatenate(list(itertools.islice(batches, MAX_CALIBRATION_SAMPLES)))
    else:
        data = np.asarray(representative_data, np.float32)
    expected = tuple(input_shape)
    if data.ndim != len(expected) + 1 or any(
            e is not None and e != d for e, d in zip(expected, data.shape[1:])) or not len(data):
        raise ValueError(
            f"representative_data must be a non-empty batch of model inputs of shape "
            f"[n, {', '.join(str(d) for d in expected)}] (or a tf.data.Dataset of such "
            f"batches), got an array of shape {data.shape}.")
    data = data[:MAX_CALIBRATION_SAMPLES].astype(np.float32)
    return lambda: ([sample[None]] for sample in data)


def _converter(model, sparse, int8, representative_data):
    """The configured converter and the concrete function it converts."""
    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], model.inputs[0].dtype)
    function = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
    converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY] if sparse else []
    if int8:
        converter.optimizations.append(tf.lite.Optimize.DEFAULT)
        converter.representative_dataset = _samples(representative_data, spec.shape[1:])
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


def run_tflite(flatbuffer, x, num_threads=None):
    """Outputs of the flatbuffer (bytes) on the batch ``x`` in ``tf.lite.Interpreter``
    (XNNPACK where it applies): a list of arrays, in the model's output order."""
    interpreter = tf.lite.Interpreter(model_content=flatbuffer, num_threads=num_threads)
    inputs = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inputs["index"], list(np.shape(x)))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inputs["index"], np.asarray(x, inputs["dtype"]))
    interpreter.invoke()
    return [interpreter.get_tensor(o["index"]) for o in interpreter.get_output_details()]


def _check_runs(flatbuffer, model):
    x = np.zeros([1, *model.inputs[0].shape[1:]], np.float32)
    try:
        run_tflite(flatbuffer, x)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"The converted model {model.name!r} does not run in "
                         f"tf.lite.Interpreter: {error}. Try sparse=False, or int8=False."
                         ) from error


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
    for name, value in (("sparse", sparse), ("int8", int8), ("overwrite", overwrite)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
    if int8 and representative_data is None:
        raise ValueError("int8=True needs representative_data: a few hundred typical "
                         "inputs (e.g. representative_data=x_train[:256]) to calibrate the "
                         "activation ranges.")
    path = os.path.abspath(os.fspath(path))
    atomic_io.clean_temporaries(os.path.dirname(path), target_name=os.path.basename(path))
    _check_target(path, overwrite)
    copy = private_plain_copy(model)
    if len(copy.inputs) != 1:
        raise ValueError(f"export_tflite supports models with one input; {copy.name!r} has "
                         f"{len(copy.inputs)}.")
    if sparse:
        check_pruned(copy, "export_tflite(sparse=True)")
    flatbuffer = _convert(copy, sparse, int8, representative_data)
    _check_runs(flatbuffer, copy)

    def save(temporary):
        with open(temporary, "wb") as f:
            f.write(flatbuffer)
            f.flush()
            os.fsync(f.fileno())

    return atomic_io.write_atomically(path, save, overwrite=overwrite)
