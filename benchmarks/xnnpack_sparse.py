"""Dense vs sparse TFLite latency, batch 1: XNNPACK's sparse 1x1 convolutions and the
block-sparse FullyConnected kernel.

``--model=mobilenet_v2`` (Keras 3, TensorFlow backend): ``keras.applications.MobileNetV2``
(``weights=None``, 224x224) in two forms: as Keras builds it ("stock": asymmetric
``ZeroPadding2D`` before its stride-2 depthwise convolutions, a "same"-padded first
convolution) and with the same layers padded by 1 on every side ("symmetric": the same
output shapes, the graph `tf_stdprune.PruneForLatencyOnXNNPack` accepts). The std rule
prunes the 1x1 ``Conv2D`` kernels only (that policy's choice) to 70/80/90 % zeros: each
layer's ``layer_quality`` is set so that ``q * sigma_0`` is its ``z``-quantile of ``|w|``.

``--model=dense4096`` / ``--model=mlp`` (tf_keras): one 4096x4096 Dense layer (VGG's
classifier) or three 1024x1024 Dense layers, pruned by the std rule on pooled blocks of
four weights to 90 % zero blocks. Two block shapes: ``block_size=(1, 4)`` (four outputs of
one input, on the ``[in, out]`` kernel: the orientation tfmot's ``block_size`` has) and
``block_size=(4, 1)`` (four consecutive inputs of one output, which is TFLite's 1x4 block
of its ``[out, in]`` weights).

Each pruned model is exported with `tf_stdprune.export_tflite` twice, ``sparse=False``
(the baseline, the same zeros stored densely) and ``sparse=True``, and the two run
interleaved (`common.interleaved_samples`), ``--calls`` invocations per round, in
``tf.lite.Interpreter`` and in ``ai_edge_litert``'s interpreter, at 1 and 2 threads.

Evidence of the path taken (printed as ``plan`` objects): the sparse tensors in the
flatbuffer, the ops of the execution plan (``DELEGATE`` = one XNNPACK partition; a
``DENSIFY`` inside it means XNNPACK got a dense copy of that tensor at load time) and
which ops stayed outside XNNPACK. Python exposes no per-op profiler for these
interpreters; the timings at 70/80/90 % (flat when the work does not shrink) are the op
profile's stand-in.

    python benchmarks/xnnpack_sparse.py --model=mobilenet_v2 --rounds=5 --calls=5
    python benchmarks/xnnpack_sparse.py --model=dense4096,mlp --rounds=5 --calls=20
"""
import collections
import json
import os
import tempfile

from absl import app, flags
import numpy as np

from common import interleaved_samples, report

FLAGS = flags.FLAGS
flags.DEFINE_list("model", ["mobilenet_v2"], "mobilenet_v2, dense4096 and/or mlp.")
flags.DEFINE_list("zeros", ["0.7", "0.8", "0.9"], "Zero fractions of the pruned kernels "
                  "(of the blocks, for the Dense models).")
flags.DEFINE_list("threads", ["1", "2"], "Interpreter threads.")
flags.DEFINE_list("runtimes", ["tf_lite", "ai_edge_litert"], "Interpreters.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds per pair.")
flags.DEFINE_integer("calls", 5, "Invocations per contender per round.")

SUMMARY = []  # one row per timed pair, printed at the end


def interpreter_class(runtime):
    if runtime == "tf_lite":
        import tensorflow as tf

        return tf.lite.Interpreter
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter


def ready(runtime, path, threads, x):
    """An interpreter over ``path`` with its input set, run once."""
    interpreter = interpreter_class(runtime)(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter


def plan(path, runtime="tf_lite"):
    """The flatbuffer's size, sparse tensors and the ops of its execution plan."""
    interpreter = interpreter_class(runtime)(model_path=path, num_threads=1)
    interpreter.allocate_tensors()
    ops = interpreter._get_ops_details()
    sparse = sum(bool(d.get("sparsity_parameters")) for d in interpreter.get_tensor_details())
    return {"file_bytes": os.path.getsize(path), "sparse_tensors": sparse,
            "ops": dict(collections.Counter(op["op_name"] for op in ops))}


def time_pair(name, config, paths, x):
    """Interleaved dense vs sparse latency of two flatbuffers for every runtime/thread."""
    for runtime in FLAGS.runtimes:
        for threads in map(int, FLAGS.threads):
            interpreters = {form: ready(runtime, path, threads, x) for form, path in paths.items()}
            contenders = {form: (lambda it=it: [it.invoke() for _ in range(FLAGS.calls)])
                          for form, it in interpreters.items()}
            samples = interleaved_samples(contenders, FLAGS.rounds)
            samples = {k: [t / FLAGS.calls for t in v] for k, v in samples.items()}
            outputs = [it.get_tensor(it.get_output_details()[0]["index"])
                       for it in interpreters.values()]
            difference = float(np.max(np.abs(outputs[0] - outputs[1])))
            rows = report(f"{name} {runtime} threads={threads}",
                          dict(config, runtime=runtime, threads=threads, batch=1,
                               calls=FLAGS.calls, rounds=FLAGS.rounds,
                               max_output_difference=difference),
                          samples, "dense")
            SUMMARY.append((name, runtime, threads, rows["dense"]["median_ms"],
                            rows["sparse"]["median_ms"], rows["sparse"]["paired_ratio_vs_dense"],
                            difference))


# ---- MobileNetV2 (Keras 3) -----------------------------------------------------------

def symmetric_padding(model):
    """``model`` rebuilt layer by layer with every ``ZeroPadding2D`` padding 1 on each side
    and each stride-2 "same" ``Conv2D`` as ``ZeroPadding2D(1)`` + "valid" (same shapes at
    224x224); fresh weights (``weights=None`` anyway)."""
    import keras

    inputs = keras.Input(model.inputs[0].shape[1:])
    new = {id(model.inputs[0]): inputs}
    swap = lambda t: new[id(t)] if isinstance(t, keras.KerasTensor) else t  # noqa: E731
    for layer in model.layers[1:]:
        node = layer._inbound_nodes[0]
        args = keras.tree.map_structure(swap, node.arguments.args)
        kwargs = keras.tree.map_structure(swap, node.arguments.kwargs)
        config = layer.get_config()
        if isinstance(layer, keras.layers.ZeroPadding2D):
            config["padding"] = ((1, 1), (1, 1))
        elif type(layer) is keras.layers.Conv2D and tuple(layer.strides) == (2, 2):
            config["padding"] = "valid"
            args = (keras.layers.ZeroPadding2D(1)(args[0]),)
        new[id(node.output_tensors[0])] = type(layer).from_config(config)(*args, **kwargs)
    return keras.Model(inputs, new[id(model.outputs[0])], name=f"{model.name}_symmetric")


def one_by_one_qualities(model, zeros):
    """``{layer: q}`` with ``q * std(w) = quantile(|w|, zeros)`` for each 1x1 Conv2D."""
    import keras

    qualities = {}
    for layer in model.layers:
        if type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == (1, 1):
            kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float64)
            qualities[layer.name] = float(np.quantile(np.abs(kernel), zeros) / kernel.std())
    return qualities


def pruned_mobilenet(model, zeros, policy):
    """The stripped model with its 1x1 kernels pruned once by the std rule."""
    import tf_stdprune
    from tf_stdprune.keras3.prune import wrappers

    pruned = tf_stdprune.prune_low_std(model, layer_quality=one_by_one_qualities(model, zeros),
                                       pruning_policy=policy)
    for wrapper in wrappers(pruned):
        wrapper.update_masks(1.0)
    return tf_stdprune.strip_pruning(pruned)


class OneByOneOnly:
    """The policy's layer choice without its model check (for the stock graph it refuses)."""

    def __init__(self):
        import tf_stdprune

        self.policy = tf_stdprune.PruneForLatencyOnXNNPack()

    def allow_pruning(self, layer):
        return self.policy.allow_pruning(layer)

    def ensure_model_supports_pruning(self, model):
        return None


def mobilenet(directory):
    import keras
    import tf_stdprune

    stock = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    x = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    for variant, model in (("stock", stock), ("symmetric", symmetric_padding(stock))):
        try:
            tf_stdprune.PruneForLatencyOnXNNPack().ensure_model_supports_pruning(model)
            policy, verdict = tf_stdprune.PruneForLatencyOnXNNPack(), "accepted"
        except ValueError as error:
            policy, verdict = OneByOneOnly(), f"refused: {error}"
        dense = None
        for zeros in map(float, FLAGS.zeros):
            final = pruned_mobilenet(model, zeros, policy)
            kernels = [np.asarray(keras.ops.convert_to_numpy(l.kernel)) for l in final.layers
                       if type(l) is keras.layers.Conv2D and tuple(l.kernel_size) == (1, 1)]
            measured = float(np.mean(np.concatenate([k.ravel() for k in kernels]) == 0))
            if dense is None:  # dense compute does not depend on the values
                dense = tf_stdprune.export_tflite(
                    final, os.path.join(directory, f"{variant}_dense.tflite"), sparse=False)
            sparse = tf_stdprune.export_tflite(
                final, os.path.join(directory, f"{variant}_{zeros}.tflite"))
            print(json.dumps({"plan": f"mobilenet_v2 {variant} {zeros:.0%}", "policy": verdict,
                              "dense": plan(dense), "sparse": plan(sparse)}))
            time_pair(f"mobilenet_v2 {variant} {zeros:.0%} 1x1 zeros",
                      {"variant": variant, "zeros_1x1": round(measured, 4)},
                      {"dense": dense, "sparse": sparse}, x)


# ---- Dense layers (tf_keras, block sparsity) -----------------------------------------

def block_qualities(model, zeros, block):
    """``{layer: q}`` with ``q * std(P) = quantile(P, zeros)`` on the pooled blocks ``P``."""
    import tensorflow as tf
    from tf_stdprune.mask_rule import block_magnitudes

    qualities = {}
    for layer in model.layers[1:]:
        pooled = block_magnitudes(tf.constant(layer.kernel.numpy()), block, "AVG").numpy()
        pooled = pooled.astype(np.float64)
        qualities[layer.name] = float(np.quantile(pooled, zeros) / pooled.std())
    return qualities


def dense_models(names, directory):
    import tf_stdprune
    from tf_stdprune.keras2.engine import keras

    for name in names:
        widths = [4096, 4096] if name == "dense4096" else [1024, 1024, 1024, 1024]
        x = np.random.default_rng(0).normal(size=(1, widths[0])).astype(np.float32)
        for block in ((1, 4), (4, 1)):
            inputs = keras.Input((widths[0],))
            hidden = inputs
            for i, width in enumerate(widths[1:]):
                hidden = keras.layers.Dense(width, activation="relu", name=f"d{i}")(hidden)
            model = keras.Model(inputs, hidden)
            dense = None
            for zeros in map(float, FLAGS.zeros):
                pruned = tf_stdprune.prune_low_std(
                    model, block_size=block, layer_quality=block_qualities(model, zeros, block))
                for layer in pruned.layers[1:]:
                    layer.pruning_obj.update_masks(1.0)
                final = tf_stdprune.strip_pruning(pruned)
                measured = float(np.mean(np.concatenate(
                    [l.kernel.numpy().ravel() for l in final.layers[1:]]) == 0))
                tag = f"{name}_{block[0]}x{block[1]}"
                if dense is None:
                    dense = tf_stdprune.export_tflite(
                        final, os.path.join(directory, f"{tag}_dense.tflite"), sparse=False)
                sparse = tf_stdprune.export_tflite(
                    final, os.path.join(directory, f"{tag}_{zeros}.tflite"))
                print(json.dumps({"plan": f"{tag} {zeros:.0%}", "dense": plan(dense),
                                  "sparse": plan(sparse)}))
                time_pair(f"{name} block_size={block} {zeros:.0%} block zeros",
                          {"block_size": list(block), "zeros": round(measured, 4)},
                          {"dense": dense, "sparse": sparse}, x)


def print_summary():
    """Every pair in one table: medians, sparse / dense per round, output difference."""
    print(f"\n{'model':<48} {'runtime':<15} {'thr':>3} {'dense ms':>9} {'sparse ms':>9} "
          f"{'sparse / dense per round':>26} {'max |diff|':>10}")
    for name, runtime, threads, dense, sparse, (median, low, high), difference in SUMMARY:
        print(f"{name:<48} {runtime:<15} {threads:>3} {dense:>9.3f} {sparse:>9.3f} "
              f"{f'{median:.3f} [{low:.3f}, {high:.3f}]':>26} {difference:>10.1e}")


def main(argv):
    del argv
    unknown = set(FLAGS.model) - {"mobilenet_v2", "dense4096", "mlp"}
    if unknown:
        raise SystemExit(f"--model: unknown {sorted(unknown)}; use mobilenet_v2, dense4096, mlp.")
    with tempfile.TemporaryDirectory() as directory:
        if "mobilenet_v2" in FLAGS.model:
            mobilenet(directory)
        dense_names = [m for m in FLAGS.model if m in ("dense4096", "mlp")]
        if dense_names:
            dense_models(dense_names, directory)
    print_summary()


if __name__ == "__main__":
    app.run(main)
