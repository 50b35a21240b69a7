"""Memory copies in one XLA-compiled train step: dense vs tfmot vs ours (no timing).

Under XLA a `tf.cond` that may write a variable passes the untouched values through its
other branch, and XLA may copy them at every step. This counts the ``copy`` instructions
of the optimized HLO of ``model.train_step`` compiled with ``jit_compile=True``, and the
elements they copy, for the contenders of `overhead.py` (same models, same batch, and
its flags: ``--width``, ``--batch_size``, ``--with_kernels_only``, ``--mixed_precision``).
Deterministic for a given TensorFlow/XLA version, so one run is enough.

    python benchmarks/xla_copies.py --width=0.25 --batch_size=8
"""
import json

from absl import app, flags
import tensorflow as tf

from tf_stdprune.keras2.engine import keras

from common import hlo_copies
from overhead import contender_models, fixed_batch

FLAGS = flags.FLAGS


def compiled_step_hlo(model, callback, data):
    """The optimized HLO of ``model.train_step(data)`` under XLA, after one `fit` step
    (so optimizer slots exist and the masks were computed at step 0)."""
    model.fit(*data, batch_size=len(data[0]), epochs=1, verbose=0,
              callbacks=[callback] if callback else [])
    step = tf.function(lambda: model.train_step(data), jit_compile=True)
    return step.experimental_get_compiler_ir()(stage="optimized_hlo")


def main(_):
    data = tuple(tf.constant(a) for a in fixed_batch())
    results = {}
    for name, (model, callback) in contender_models().items():
        copies, elements = hlo_copies(compiled_step_hlo(model, callback, data))
        results[name] = {"copies": copies, "copied_elements": elements,
                         "parameters": model.count_params()}
    dense = results["dense"]["copied_elements"]
    for result in results.values():
        result["extra_vs_dense"] = result["copied_elements"] - dense
    print(json.dumps({"benchmark": "xla copies", "config": {
        "width": FLAGS.width, "batch_size": FLAGS.batch_size, "tensorflow": tf.__version__,
        "policy": keras.mixed_precision.global_policy().name},
        "results": results}, indent=2))
    print(f"\nXLA copies per train step (width={FLAGS.width}, batch_size={FLAGS.batch_size})")
    print(f"{'contender':<24}{'copies':>10}{'elements copied':>18}{'more than dense':>18}")
    for name, result in results.items():
        print(f"{name:<24}{result['copies']:>10}{result['copied_elements']:>18,}"
              f"{result['extra_vs_dense']:>18,}")


if __name__ == "__main__":
    app.run(main)
