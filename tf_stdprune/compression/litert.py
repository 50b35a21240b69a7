"""The TFLite (LiteRT) flatbuffer, for either Keras: arguments, calibration samples, the
check that it runs, reading its tensors, and the atomic write.

Each Keras world converts its model its own way (`tf_stdprune.keras2.tflite`,
`tf_stdprune.keras3.tflite`) and hands the flatbuffer here:

* ``sparse=True`` adds ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``: the converter stores
  each constant weight tensor that it finds sparse enough in TFLite's sparse format
  (per-dimension dense/CSR metadata plus the nonzero values) and a ``DENSIFY`` op before
  its consumer. XNNPACK (the CPU engine of TFLite) densifies those tensors once, when the
  model is loaded, and a model with sparse tensors asks XNNPACK for its sparse inference
  (1x1 convolutions multiplied by sparse kernels; see `tf_stdprune.policy`).
* ``int8=True`` does full-integer post-training quantization: weights int8 per channel,
  activations int8 with ranges calibrated on ``representative_data`` (the first
  `MAX_CALIBRATION_SAMPLES` samples, one at a time); the inputs and outputs stay float32.

What the flatbuffer keeps of weight sharing (Han, Mao and Dally 2016): the sparsity
pattern, but not the sharing. A quantized model's ``K`` shared values are stored value by
value, as float32 (or, with ``int8=True``, as int8 levels); the codebook and its short
indices are not kept. `compressed_file.compress` is the form that keeps them.

The flatbuffer is run once in ``tf.lite.Interpreter`` before it is written, and written
atomically: an existing file is replaced only with ``overwrite=True`` and only if it is a
TFLite flatbuffer.
"""
import itertools
import os

import numpy as np
import tensorflow as tf

from tf_stdprune import io as atomic_io
from tf_stdprune.compression.serving import check_pruned

MAX_CALIBRATION_SAMPLES = 256
TFLITE_IDENTIFIER = b"TFL3"


def check_arguments(sparse, int8, overwrite, representative_data):
    """Raises TypeError / ValueError for bad flags or int8 without calibration data."""
    for name, value in (("sparse", sparse), ("int8", int8), ("overwrite", overwrite)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}.")
    if int8 and representative_data is None:
        raise ValueError("int8=True needs representative_data: a few hundred typical "
                         "inputs (e.g. representative_data=x_train[:256]) to calibrate the "
                         "activation ranges.")


def prepare_target(path, overwrite):
    """The absolute path; cleans an interrupted write's leftovers and raises if ``path``
    is a directory, or exists and may not (or must not) be replaced."""
    path = os.path.abspath(os.fspath(path))
    atomic_io.clean_temporaries(os.path.dirname(path), target_name=os.path.basename(path))
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
    return path


def representative_samples(representative_data, input_shape):
    """Up to `MAX_CALIBRATION_SAMPLES` float32 samples of shape ``[1, *input_shape]``, as
    the converter's ``representative_dataset`` (a callable returning a generator)."""
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


def check_runs(flatbuffer, input_shape, name):
    """Raises ValueError naming the model if the flatbuffer does not run on one zero input."""
    try:
        run_tflite(flatbuffer, np.zeros([1, *input_shape], np.float32))
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"The converted model {name!r} does not run in "
                         f"tf.lite.Interpreter: {error}. Try sparse=False, or int8=False."
                         ) from error


def write(path, flatbuffer, overwrite):
    """Writes the bytes to ``path`` atomically (`tf_stdprune.io`); returns the path."""

    def save(temporary):
        with open(temporary, "wb") as f:
            f.write(flatbuffer)
            f.flush()
            os.fsync(f.fileno())

    return atomic_io.write_atomically(path, save, overwrite=overwrite)


def export(model, path, sparse, int8, representative_data, overwrite, plain_copy, convert):
    """The export both worlds share: checks the arguments and the target, takes the
    world's ``plain_copy(model)``, checks it has one input (and, with ``sparse``, a pruned
    weight), gets the flatbuffer from the world's ``convert(copy, input_shape)``, runs it
    once and writes it atomically; returns the absolute path."""
    check_arguments(sparse, int8, overwrite, representative_data)
    path = prepare_target(path, overwrite)
    copy = plain_copy(model)
    if len(copy.inputs) != 1:
        raise ValueError(f"export_tflite supports models with one input; {copy.name!r} has "
                         f"{len(copy.inputs)}.")
    if sparse:
        check_pruned(copy, "export_tflite(sparse=True)")
    input_shape = tuple(copy.inputs[0].shape[1:])
    flatbuffer = convert(copy, input_shape)
    check_runs(flatbuffer, input_shape, copy.name)
    return write(path, flatbuffer, overwrite)


def constant_tensors(flatbuffer):
    """``{name: array}`` of the float constant tensors of rank 2 or 4 that the flatbuffer
    stores densely (kernels, in TFLite's layout: ``[out, in]`` and ``[out, h, w, in]``)."""
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    found = {}
    for detail in interpreter.get_tensor_details():
        if len(detail["shape"]) in (2, 4) and detail["dtype"] == np.float32:
            try:
                found[detail["name"]] = interpreter.get_tensor(detail["index"])
            except ValueError:  # an activation: no data before the model runs
                continue
    return found


def sparse_tensor_count(flatbuffer):
    """How many tensors the flatbuffer stores in TFLite's sparse format."""
    interpreter = tf.lite.Interpreter(model_content=flatbuffer)
    return sum(bool(d.get("sparsity_parameters")) for d in interpreter.get_tensor_details())
