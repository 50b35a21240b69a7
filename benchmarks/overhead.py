"""Train-step time of VGG19-BN: dense vs tfmot `prune_low_magnitude` vs `prune_low_std`.

Same initial weights, data, optimizer (SGD momentum 0.9) and batch for all three; each
contender runs ``steps`` compiled train steps per round, rounds interleaved, medians
reported with the ratio to dense. ``--clock=page_faults`` counts the minor page faults
of a step instead (fresh memory the kernel maps in: tfmot's ``w = w * m`` assignment
allocates new weight buffers at every step, and at full width that shows).

    python benchmarks/overhead.py --width=0.25
    python benchmarks/overhead.py --width=1.0 --batch_size=32 --rounds=5
    python benchmarks/overhead.py --width=1.0 --batch_size=8 --clock=page_faults
    KERAS_BACKEND=jax python benchmarks/overhead.py --keras=3   # see overhead_keras3.py
    KERAS_BACKEND=jax python benchmarks/overhead.py --keras=3 --model=bert
"""
import time

from absl import app, flags
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.models import vgg19_bn

from common import interleaved_samples, minor_page_faults, report

FLAGS = flags.FLAGS
CLOCKS = {
    "wall": time.perf_counter,
    "cpu": time.process_time,
    "page_faults": minor_page_faults,
}
flags.DEFINE_float("width", 0.25, "VGG19-BN width multiplier.")
flags.DEFINE_integer("batch_size", 64, "Images per train step.")
flags.DEFINE_integer("steps", 10, "Train steps per contender per round.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds.")
flags.DEFINE_bool("jit_compile", False, "Compile the train steps with XLA.")
flags.DEFINE_enum("clock", "wall", list(CLOCKS),
                  "wall: elapsed time; cpu: this process's CPU time (steadier on a shared "
                  "machine); page_faults: minor page faults of this process (not a time).")
flags.DEFINE_bool("with_kernels_only", False,
                  "Also time prune_low_std(prune_batchnorm=False): the tensors tfmot prunes.")
flags.DEFINE_enum("keras", "2", ["2", "3"],
                  "2: tf_keras (dense, tfmot, ours); 3: Keras 3 on KERAS_BACKEND (dense, ours) "
                  "and the mask update vs the tf_keras path.")
flags.DEFINE_enum("model", "vgg", ["vgg", "bert", "gpt2"],
                  "vgg: VGG19-BN at --width; bert, gpt2: a small KerasHub task model "
                  "(--keras=3 only; see overhead_keras3.py).")
flags.DEFINE_bool("mixed_precision", False,
                  "mixed_float16 on GPU, mixed_bfloat16 on CPU (masks stay float32).")


def _compiled(model):
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=FLAGS.jit_compile)
    return model


def _runner(model, data, callback=None):
    """A function that runs ``FLAGS.steps`` train steps of ``model``, calling ``callback``'s
    batch hooks around each as ``model.fit`` does."""
    callbacks = keras.callbacks.CallbackList([callback] if callback else [], model=model)
    callbacks.on_train_begin()
    train_step = model.make_train_function()
    iterator = iter(data)

    def run():
        for batch in range(FLAGS.steps):
            callbacks.on_train_batch_begin(batch)
            logs = train_step(iterator)
            callbacks.on_train_batch_end(batch, logs)
        float(logs["loss"])  # wait for the device

    return run


def fixed_batch():
    """One fixed batch of CIFAR-sized images and labels, ``FLAGS.batch_size`` of them."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(FLAGS.batch_size, 32, 32, 3)).astype("float32")
    return x, rng.integers(0, 10, size=FLAGS.batch_size)


def contender_models():
    """``{name: (compiled model, its pruning callback or None)}``: dense VGG19-BN, tfmot's
    `prune_low_magnitude` and ours (also ours without BN gammas with
    ``--with_kernels_only``), all from the same initial weights, none pruning after step 0,
    built under ``--mixed_precision``'s policy."""
    if FLAGS.mixed_precision:
        gpu = bool(tf.config.list_physical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    keras.utils.set_random_seed(0)
    dense = vgg19_bn(width=FLAGS.width)
    weights = dense.get_weights()

    def fresh():
        model = vgg19_bn(width=FLAGS.width)
        model.set_weights(weights)
        return model

    def ours(**kwargs):
        schedule = tf_stdprune.StdPruningSchedule([1.0], steps_per_iteration=10**6)
        model = tf_stdprune.prune_low_std(fresh(), pruning_schedule=schedule, **kwargs)
        return _compiled(model), tf_stdprune.UpdatePruningStep()

    tfmot_model = tfmot.sparsity.keras.prune_low_magnitude(
        fresh(), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.9, 0, frequency=10**6))
    contenders = {
        "dense": (_compiled(dense), None),
        "prune_low_magnitude": (_compiled(tfmot_model), tfmot.sparsity.keras.UpdatePruningStep()),
        "prune_low_std": ours(),
    }
    if FLAGS.with_kernels_only:
        contenders["prune_low_std_kernels"] = ours(prune_batchnorm=False)
    return contenders


def main(_):
    if FLAGS.keras == "3":
        import overhead_keras3

        overhead_keras3.run(FLAGS.width, FLAGS.batch_size, FLAGS.steps, FLAGS.rounds,
                            FLAGS.model)
        return
    if FLAGS.model != "vgg":
        raise app.UsageError(f"--model={FLAGS.model} is a KerasHub model: add --keras=3.")
    data = tf.data.Dataset.from_tensors(fixed_batch()).repeat()
    contenders = {name: _runner(model, data, callback)
                  for name, (model, callback) in contender_models().items()}
    samples = interleaved_samples(contenders, FLAGS.rounds, clock=CLOCKS[FLAGS.clock])
    per_step = {name: [t / FLAGS.steps for t in times] for name, times in samples.items()}
    scale = ({"unit_scale": 1.0, "unit": "faults"} if FLAGS.clock == "page_faults"
            else {"items": FLAGS.batch_size})
    report("train step", {"width": FLAGS.width, "batch_size": FLAGS.batch_size,
                          "steps": FLAGS.steps, "rounds": FLAGS.rounds,
                          "jit_compile": FLAGS.jit_compile, "clock": FLAGS.clock,
                          "policy": keras.mixed_precision.global_policy().name,
                          "devices": [d.device_type for d in tf.config.list_logical_devices()]},
           per_step, "dense", **scale,
           pairs=[(name, "prune_low_magnitude") for name in per_step
                  if name.startswith("prune_low_std")])


if __name__ == "__main__":
    app.run(main)
