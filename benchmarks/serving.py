"""Serving cost of every exported form of a pruned VGG19-BN: size, latency, top-1.

Forms, all from the same model (magnitude-pruned to ``--zeros`` per tensor, then with
``--weight_sharing``, as the compression pipeline leaves it):

    dense_saved_model    export_dense_saved_model (the baseline)
    sparse_saved_model   export_sparse_saved_model (decode once, dense compute)
    sparse_auto          export_sparse_saved_model(sparse_compute="auto")
    tflite_dense         export_tflite(sparse=False)
    tflite_sparse        export_tflite(sparse=True)
    tflite_int8          export_tflite(int8=True), calibrated on the data

Latency: at each batch size the forms run in interleaved rounds (`common.interleaved_samples`),
reported as medians and per-round ratios to the dense SavedModel with 95 % intervals
(`common.report`). ``--train_epochs=N`` trains the model on the digits data first (then
prunes and fine-tunes one epoch) so that top-1 on its test split means something.

``--matmul`` instead times one ``4096 x 4096`` Dense kernel (the classifier of full-width
VGG19-BN) at ``--matmul_zeros``: dense ``tf.matmul`` against
``tf.sparse.sparse_dense_matmul`` (``W^T`` as COO) and ``tf.raw_ops.SparseMatrixMatMul``
(CSR, built from the COO form on every call), the measurement behind
`export.sparse_compute_mode`.

    python benchmarks/serving.py --width=0.25 --rounds=5
    python benchmarks/serving.py --width=0.25 --train_epochs=3
    python benchmarks/serving.py --matmul --matmul_batches=1,4,16,64
"""
import json
import os
import tempfile

from absl import app, flags
import numpy as np
import tensorflow as tf

from tf_stdprune.keras2.engine import keras
from tf_stdprune.data import digits_arrays
from tf_stdprune.keras2.export import disk_size, export_dense_saved_model, export_sparse_saved_model
from tf_stdprune.models import vgg19_bn
from tf_stdprune.keras2.quantize import quantize_weights
from tf_stdprune.keras2.tflite import export_tflite

from common import interleaved_samples, report

FLAGS = flags.FLAGS
FORMS = ("dense_saved_model", "sparse_saved_model", "sparse_auto", "tflite_dense",
         "tflite_sparse", "tflite_int8")
flags.DEFINE_float("width", 0.25, "VGG19-BN width multiplier.")
flags.DEFINE_float("zeros", 0.92, "Fraction of each kernel / BN gamma set to zero.")
flags.DEFINE_bool("weight_sharing", True, "quantize_weights with its defaults (8 bits "
                  "conv and BN, 5 bits dense) after pruning.")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes to time.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_integer("calls", 10, "Calls per form per round at batch 1 (calls // batch "
                     "at larger batches, at least 1).")
flags.DEFINE_integer("threads", None, "TFLite interpreter threads (default: its own).")
flags.DEFINE_list("forms", list(FORMS), "The forms to export and time (dense_saved_model, "
                  "the baseline, is always included).")
flags.DEFINE_integer("train_epochs", 0, "Train on digits first to report top-1.")
flags.DEFINE_string("out_dir", None, "Where the exports go (default: a temporary directory).")
flags.DEFINE_bool("matmul", False, "Time one 4096x4096 Dense kernel instead.")
flags.DEFINE_list("matmul_zeros", ["0.9", "0.96", "0.98"], "Zero fractions for --matmul.")
flags.DEFINE_list("matmul_batches", ["1", "64"], "Batch sizes for --matmul.")


def _zero_smallest(model, fraction):
    """Zeroes the ``fraction`` smallest |w| of every kernel and BN gamma (numpy)."""
    for weight in model.weights:
        if weight.name.endswith(("kernel:0", "gamma:0")):
            w = weight.numpy()
            w[np.abs(w) < np.quantile(np.abs(w), fraction)] = 0.0
            weight.assign(w)


def _digits():
    x_train, y_train, x_test, y_test = digits_arrays()
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def benchmark_model(data):
    """The pruned (and, with ``--weight_sharing``, weight-shared) VGG19-BN every form is made of."""
    keras.utils.set_random_seed(0)
    model = vgg19_bn(width=FLAGS.width)
    if FLAGS.train_epochs:
        x, y = data[:2]
        model.compile(keras.optimizers.Adam(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, epochs=FLAGS.train_epochs, batch_size=64, verbose=2)
        _zero_smallest(model, FLAGS.zeros)
        model.fit(x, y, epochs=1, batch_size=64, verbose=2)
    _zero_smallest(model, FLAGS.zeros)
    return quantize_weights(model) if FLAGS.weight_sharing else model


def export_all(model, out_dir, calibration, forms):
    """``{form: path}`` of the exported ``forms`` (module docstring)."""
    join = lambda name: os.path.join(out_dir, name)  # noqa: E731
    exporters = {
        "dense_saved_model": lambda: export_dense_saved_model(model, join("dense"),
                                                              overwrite=True),
        "sparse_saved_model": lambda: export_sparse_saved_model(model, join("sparse"),
                                                                overwrite=True),
        "sparse_auto": lambda: export_sparse_saved_model(model, join("sparse_auto"),
                                                         overwrite=True, sparse_compute="auto"),
        "tflite_dense": lambda: export_tflite(model, join("dense.tflite"), sparse=False,
                                              overwrite=True),
        "tflite_sparse": lambda: export_tflite(model, join("sparse.tflite"), overwrite=True),
        "tflite_int8": lambda: export_tflite(model, join("int8.tflite"), int8=True,
                                             overwrite=True, representative_data=calibration),
    }
    unknown = set(forms) - set(exporters)
    if unknown:
        raise ValueError(f"--forms names unknown forms {sorted(unknown)}; choose from {FORMS}.")
    return {name: exporters[name]() for name in FORMS if name in forms}


def predictor(path, batch):
    """A function mapping a ``[batch, ...]`` array to logits, for one exported form."""
    if path.endswith(".tflite"):
        interpreter = tf.lite.Interpreter(model_path=path, num_threads=FLAGS.threads)
        inputs = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(inputs["index"], [batch, 32, 32, 3])
        interpreter.allocate_tensors()
        output = interpreter.get_output_details()[0]["index"]

        def run(x):
            interpreter.set_tensor(inputs["index"], x)
            interpreter.invoke()
            return interpreter.get_tensor(output)
        return run
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda x: list(serve(tf.constant(x)).values())[0].numpy()


def timed(predict, x, calls):
    def run():
        for _ in range(calls):
            predict(x)
    return run


def top1(paths, x, y):
    """Top-1 of every form on ``(x, y)``, evaluated in batches of 64."""
    result = {}
    for name, path in paths.items():
        predict = predictor(path, 64)
        logits = [predict(np.resize(x[i:i + 64], (64,) + x.shape[1:]))[:len(x[i:i + 64])]
                  for i in range(0, len(x), 64)]
        result[name] = float(np.mean(np.argmax(np.concatenate(logits), 1) == y))
    return result


def serving(_):
    data = _digits()
    model = benchmark_model(data)
    out_dir = FLAGS.out_dir or tempfile.mkdtemp(prefix="serving_")
    forms = {"dense_saved_model", *FLAGS.forms}
    paths = export_all(model, out_dir, data[0][:256], forms)
    sizes = {name: disk_size(path) for name, path in paths.items()}
    config = {"width": FLAGS.width, "zeros": FLAGS.zeros, "weight_sharing": FLAGS.weight_sharing,
              "rounds": FLAGS.rounds, "threads": FLAGS.threads,
              "train_epochs": FLAGS.train_epochs}
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in FLAGS.batch_sizes):
        x = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
        calls = max(1, FLAGS.calls // batch)
        contenders = {name: timed(predictor(path, batch), x, calls)
                      for name, path in paths.items()}
        samples = interleaved_samples(contenders, FLAGS.rounds)
        per_call = {name: [t / calls for t in times] for name, times in samples.items()}
        report(f"serving latency, batch {batch}", dict(config, batch=batch, calls=calls),
               per_call, "dense_saved_model", items=batch,
               pairs=[(a, "tflite_dense") for a in ("tflite_sparse", "tflite_int8")
                      if {a, "tflite_dense"} <= set(paths)])
    accuracy = top1(paths, *data[2:]) if FLAGS.train_epochs else {}
    dense_bytes = sizes["dense_saved_model"]["bytes"]
    print(json.dumps({"benchmark": "serving size", "config": config, "sizes": sizes,
                      "top1": accuracy}, indent=2))
    print(f"\n{'form':<20} {'bytes':>12} {'x smaller':>10} {'gzip bytes':>12} {'top-1':>7}")
    for name, size in sizes.items():
        print(f"{name:<20} {size['bytes']:>12} {dense_bytes / size['bytes']:>10.1f} "
              f"{size['gzip_bytes']:>12} {accuracy.get(name, float('nan')):>7.4f}")


def _matmul_contenders(kernel, x):
    """``{name: function}`` computing ``x @ kernel`` densely, as COO and as CSR products,
    and as a gather of ``x`` at the nonzeros' columns summed per row."""
    n_in, n_out = kernel.shape
    transposed = kernel.T
    indices = tf.Variable(np.argwhere(transposed != 0).astype(np.int64))
    values = tf.Variable(transposed[transposed != 0])
    dense = tf.Variable(kernel)
    x = tf.constant(x)

    def coo():
        product = tf.sparse.sparse_dense_matmul(
            tf.SparseTensor(indices, values, [n_out, n_in]), x, adjoint_b=True)
        return tf.transpose(product)

    def csr():
        matrix = tf.raw_ops.SparseTensorToCSRSparseMatrix(
            indices=indices, values=values, dense_shape=tf.constant([n_out, n_in], tf.int64))
        return tf.transpose(tf.raw_ops.SparseMatrixMatMul(a=matrix, b=x, adjoint_b=True))

    rows = tf.Variable(indices.numpy()[:, 0].astype(np.int32))
    columns = tf.Variable(indices.numpy()[:, 1].astype(np.int32))

    def gather_segment_sum():  # y[:, j] = sum over row j of W^T: w * x[:, i]
        products = tf.gather(tf.transpose(x), columns) * values[:, None]
        return tf.transpose(tf.math.unsorted_segment_sum(products, rows, n_out))

    functions = {"dense": lambda: tf.matmul(x, dense), "sparse_dense_matmul": coo,
                 "csr_sparse_matrix_matmul": csr, "gather_segment_sum": gather_segment_sum}
    return {name: tf.function(f) for name, f in functions.items()}


def matmul(_):
    rng = np.random.default_rng(0)
    for zeros in (float(z) for z in FLAGS.matmul_zeros):
        kernel = rng.normal(size=(4096, 4096)).astype(np.float32)
        kernel[rng.random(kernel.shape) < zeros] = 0.0
        for batch in (int(b) for b in FLAGS.matmul_batches):
            x = rng.normal(size=(batch, 4096)).astype(np.float32)
            functions = _matmul_contenders(kernel, x)
            expected = functions["dense"]().numpy()
            for f in functions.values():
                np.testing.assert_allclose(f().numpy(), expected, rtol=1e-3, atol=1e-3)
            calls = max(1, FLAGS.calls // batch)
            contenders = {name: timed(lambda _, f=f: f().numpy(), None, calls)
                          for name, f in functions.items()}
            samples = interleaved_samples(contenders, FLAGS.rounds)
            per_call = {name: [t / calls for t in times] for name, times in samples.items()}
            report("4096x4096 matmul", {"zeros": zeros, "batch": batch, "calls": calls,
                                        "rounds": FLAGS.rounds}, per_call, "dense", items=batch)


def main(argv):
    (matmul if FLAGS.matmul else serving)(argv)


if __name__ == "__main__":
    app.run(main)
