"""Deep-Compression pipeline on VGG19-BN: sizes, export/compress/decompress time, latency.

The model's kernels and BN gammas are pruned to ``--sparsity`` by magnitude (per tensor,
set directly: no training), quantized (k-means, 8 bits conv / 5 bits dense / 8 bits BN),
then written as a dense SavedModel, a sparse SavedModel (`export_sparse_saved_model`) and
a compressed file (`compress`), read back (`read_weights`: Huffman decoding only;
`decompress`: also rebuilds the Keras model). Times are single runs except serving latency, which
interleaves the dense and sparse SavedModels (medians of ``--rounds``).

    python benchmarks/compression_stages.py --width=0.25
    python benchmarks/compression_stages.py --width=1.0 --rounds=5
"""
import json
import os
import tempfile
import time

from absl import app, flags
import numpy as np
import tensorflow as tf

from tf_stdprune.compression.compressed_file import compress, decompress, read_weights
from tf_stdprune.compression.stages import compression_report
from tf_stdprune.keras2.export import disk_size, export_dense_saved_model, export_sparse_saved_model
from tf_stdprune.models import vgg19_bn
from tf_stdprune.keras2.quantize import prunable_layers, quantize_weights, strip_quantization

from common import interleaved_samples, report

FLAGS = flags.FLAGS
flags.DEFINE_float("width", 0.25, "VGG19-BN width multiplier.")
flags.DEFINE_float("sparsity", 0.92, "Fraction of each kernel / BN gamma set to zero.")
flags.DEFINE_integer("conv_bits", 8, "Cluster bits of conv layers.")
flags.DEFINE_integer("dense_bits", 5, "Cluster bits of dense layers.")
flags.DEFINE_integer("batch_size", 64, "Images per serving call.")
flags.DEFINE_integer("rounds", 7, "Interleaved serving rounds.")


def _pruned_vgg(width, sparsity, seed=0):
    """VGG19-BN with He-normal kernels (trained weights are bell-shaped, not uniform),
    random BN statistics, and the smallest ``sparsity`` of each prunable tensor set to 0."""
    rng = np.random.default_rng(seed)
    model = vgg19_bn(width=width, weight_decay=0.0)
    for layer, attributes in prunable_layers(model):
        if hasattr(layer, "moving_variance"):
            layer.gamma.assign(rng.uniform(0.2, 1.5, layer.gamma.shape))
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
        for attribute in attributes:
            weight = getattr(layer, attribute)
            value = weight.numpy()
            if attribute != "gamma":
                value = rng.normal(0, np.sqrt(2 / np.prod(value.shape[:-1])), value.shape)
            value[np.abs(value) < np.quantile(np.abs(value), sparsity)] = 0.0
            weight.assign(value.astype(np.float32))
    return model


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(_):
    model = _pruned_vgg(FLAGS.width, FLAGS.sparsity)
    quantized, quantize_s = _timed(lambda: strip_quantization(quantize_weights(
        model, conv_bits=FLAGS.conv_bits, dense_bits=FLAGS.dense_bits)))
    work = tempfile.mkdtemp(prefix="compression_bench_")
    paths = {name: os.path.join(work, name) for name in ("dense", "sparse", "model.tfspz")}
    _, dense_s = _timed(lambda: export_dense_saved_model(quantized, paths["dense"]))
    _, sparse_s = _timed(lambda: export_sparse_saved_model(quantized, paths["sparse"]))
    _, compress_s = _timed(lambda: compress(quantized, paths["model.tfspz"]))
    _, read_weights_s = _timed(lambda: read_weights(paths["model.tfspz"]))
    restored, decompress_s = _timed(lambda: decompress(paths["model.tfspz"]))
    exact = all(a.tobytes() == b.tobytes()
                for a, b in zip(quantized.get_weights(), restored.get_weights()))
    sizes = {"dense_saved_model": disk_size(paths["dense"]),
             "sparse_saved_model": disk_size(paths["sparse"]),
             "compressed_file": disk_size(paths["model.tfspz"])}
    summary = compression_report(paths["model.tfspz"])

    x = tf.constant(np.random.default_rng(1).normal(
        size=(FLAGS.batch_size, 32, 32, 3)).astype("float32"))
    served = {name: tf.saved_model.load(paths[name]).signatures["serving_default"]
              for name in ("dense", "sparse")}
    outputs = {name: list(f(x).values())[0].numpy() for name, f in served.items()}
    samples = interleaved_samples(
        {f"{name}_saved_model": (lambda f=f: list(f(x).values())[0].numpy())
         for name, f in served.items()}, FLAGS.rounds)
    config = {"width": FLAGS.width, "sparsity": FLAGS.sparsity, "conv_bits": FLAGS.conv_bits,
              "dense_bits": FLAGS.dense_bits, "batch_size": FLAGS.batch_size,
              "parameters": model.count_params()}
    report("serving latency (sparse vs dense SavedModel)", config, samples,
           baseline="dense_saved_model", items=FLAGS.batch_size)
    dense_bytes = sizes["dense_saved_model"]["bytes"]
    results = {
        "seconds": {"quantize": quantize_s, "export_dense": dense_s, "export_sparse": sparse_s,
                    "compress": compress_s, "read_weights": read_weights_s,
                    "decompress (read_weights + build model)": decompress_s},
        "sizes": sizes,
        "ratios_vs_dense_saved_model": {
            name: dense_bytes / size["bytes"] for name, size in sizes.items()},
        "gzip_ratio_vs_dense_saved_model_gzip": {
            name: sizes["dense_saved_model"]["gzip_bytes"] / size["gzip_bytes"]
            for name, size in sizes.items()},
        "deep_compression_stages": {"bytes": summary.stage_bytes(), "ratios": summary.ratios()},
        "decompressed_bit_exact": exact,
        "sparse_vs_dense_max_abs_output_diff": float(
            np.abs(outputs["sparse"] - outputs["dense"]).max()),
    }
    print(json.dumps({"benchmark": "compression", "config": config, "results": results}, indent=2))
    print(f"\n{'artifact':<22} {'bytes':>12} {'gzip bytes':>12} {'x dense':>8} {'x dense gz':>10}")
    for name, size in sizes.items():
        print(f"{name:<22} {size['bytes']:>12} {size['gzip_bytes']:>12} "
              f"{dense_bytes / size['bytes']:>8.2f} "
              f"{results['gzip_ratio_vs_dense_saved_model_gzip'][name]:>10.2f}")
    print(f"\n{'step':<40} {'seconds':>10}")
    for name, seconds in results["seconds"].items():
        print(f"{name:<40} {seconds:>10.2f}")
    print("\n" + summary.table())


if __name__ == "__main__":
    app.run(main)
