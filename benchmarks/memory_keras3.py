"""Memory of pruning a small GPT-2 (KerasHub) on Keras 3: variable bytes and peak RSS,
dense vs pruned at every depth.

Each contender runs in a fresh subprocess (peak resident memory is per process): it
builds a ``GPT2CausalLM``, prunes it (or not), compiles it with Adam and runs
``--steps`` train steps, then reports the bytes of its model variables, split into
weights and pruning state (masks, thresholds, sigmas), the optimizer's bytes and the
process's peak RSS (``ru_maxrss``). Masks are uint8: a quarter of a float32 kernel.

    KERAS_BACKEND=jax python benchmarks/memory_keras3.py --hidden_dim=256 --num_layers=4
"""
import json
import os
import subprocess
import sys

from absl import app, flags

SIZES = {  # flag: (default, meaning)
    "hidden_dim": (256, "GPT-2 hidden size."),
    "num_layers": (4, "Transformer blocks."),
    "vocabulary_size": (8192, "Token embedding rows."),
    "sequence_length": (128, "Tokens per example."),
    "batch_size": (8, "Examples per train step."),
    "steps": (3, "Train steps per contender."),
}
for _name, (_default, _meaning) in SIZES.items():
    flags.DEFINE_integer(_name, _default, _meaning)
flags.DEFINE_string("contender", None, "Internal: run one contender (dense or pruned).")
FLAGS = flags.FLAGS


def measure(contender):
    """Builds, prunes (``pruned``) and trains one model; returns its byte counts."""
    import resource

    import keras
    import keras_hub
    import numpy as np

    import tf_stdprune
    from tf_stdprune.keras3.prune import wrappers

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=FLAGS.vocabulary_size, num_layers=FLAGS.num_layers, num_heads=4,
        hidden_dim=FLAGS.hidden_dim, intermediate_dim=4 * FLAGS.hidden_dim,
        max_sequence_length=FLAGS.sequence_length, dropout=0.0)
    model = keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
    if contender == "pruned":
        schedule = tf_stdprune.StdPruningSchedule([1.0], steps_per_iteration=2)
        model = tf_stdprune.prune_low_std(model, pruning_schedule=schedule)
    model.compile(keras.optimizers.Adam(1e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, FLAGS.vocabulary_size,
                       size=(FLAGS.batch_size * FLAGS.steps, FLAGS.sequence_length))
    x = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, "int32")}
    callbacks = [tf_stdprune.UpdatePruningStep()] if contender == "pruned" else []
    model.fit(x, np.roll(ids, -1, 1), batch_size=FLAGS.batch_size, epochs=1, verbose=0,
              callbacks=callbacks)
    state = {id(v) for w in wrappers(model) for v in w.pruning_variables}
    nbytes = lambda v: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize  # noqa: E731
    return {
        "weight_bytes": sum(nbytes(v) for v in model.variables if id(v) not in state),
        "pruning_state_bytes": sum(nbytes(v) for v in model.variables if id(v) in state),
        "mask_bytes": sum(nbytes(m) for w in wrappers(model) for m in w.masks),
        "pruned_tensor_bytes": sum(nbytes(t) for w in wrappers(model) for t in w.pruned_weights),
        "optimizer_bytes": sum(nbytes(v) for v in model.optimizer.variables),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(_):
    if FLAGS.contender:
        print(json.dumps(measure(FLAGS.contender)))
        return
    argv = [a for a in sys.argv[1:] if not a.startswith("--contender")]
    rows = {}
    for contender in ("dense", "pruned"):
        result = subprocess.run([sys.executable, os.path.abspath(__file__), *argv,
                                 f"--contender={contender}"], capture_output=True, text=True,
                                check=True)
        rows[contender] = json.loads(result.stdout.strip().splitlines()[-1])
    import keras

    config = {"backend": keras.backend.backend(), "hidden_dim": FLAGS.hidden_dim,
              "num_layers": FLAGS.num_layers, "vocabulary_size": FLAGS.vocabulary_size,
              "sequence_length": FLAGS.sequence_length, "batch_size": FLAGS.batch_size}
    pruned = rows["pruned"]
    ratios = {"mask_bytes / pruned_tensor_bytes":
              pruned["mask_bytes"] / max(pruned["pruned_tensor_bytes"], 1),
              "pruned / dense variable bytes":
              (pruned["weight_bytes"] + pruned["pruning_state_bytes"]) /
              rows["dense"]["weight_bytes"],
              "pruned / dense peak RSS": pruned["peak_rss_mib"] / rows["dense"]["peak_rss_mib"]}
    print(json.dumps({"benchmark": "Keras 3 memory, GPT-2 pruned vs dense", "config": config,
                      "results": rows, "ratios": ratios}, indent=2))
    print(f"\nKeras 3 memory, GPT-2 pruned vs dense  ({', '.join(f'{k}={v}' for k, v in config.items())})")
    print(f"{'contender':<10} {'weights MiB':>12} {'pruning state MiB':>18} "
          f"{'optimizer MiB':>14} {'peak RSS MiB':>13}")
    for name, row in rows.items():
        print(f"{name:<10} {row['weight_bytes'] / 2**20:>12.2f} "
              f"{row['pruning_state_bytes'] / 2**20:>18.2f} "
              f"{row['optimizer_bytes'] / 2**20:>14.2f} {row['peak_rss_mib']:>13.1f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")


if __name__ == "__main__":
    app.run(main)
