"""Prunes a small model for a few steps under a distribution, then saves its masks.

Run as a subprocess by test_keras3_distribution.py, since the device count and the
backend must be set before Keras starts::

    python distribution_run.py OUT_DIR jax|tensorflow MODEL:MODE [MODEL:MODE ...]

Each ``MODEL:MODE`` run, one after the other in this process, writes
``OUT_DIR/MODEL_MODE.npz``. ``MODE``: ``single``, no distribution; ``data``/``model``:
``keras.distribution.DataParallel`` / ``ModelParallel`` on 2 JAX host devices; ``mirrored``:
``tf.distribute.MirroredStrategy`` over 2 logical CPUs (TensorFlow backend). ``MODEL``:
``dense`` (a functional model whose middle layer is a custom layer of two Dense sublayers),
``gpt2`` or ``gemma`` (a tiny KerasHub causal LM; Gemma's ModelParallel layout is KerasHub's
``get_layout_map``). Each file holds every mask (``layer path:tensor``), ``distinct`` (the
number of masks whose whole copies on the devices differ), ``unlike_kernel`` (under
``model``, the masks whose sharding differs from their kernel's), ``sharded`` (the masks
split across devices) and ``copies`` (the most whole copies of one mask). ``outside``
(``MODEL`` ``flat``: a Sequential of two Dense layers) creates the model, then sets
ModelParallel and prunes it; its file holds only ``error``, the message of the refusal.
"""
import contextlib
import os
import sys

OUT_DIR, BACKEND, RUNS = sys.argv[1], sys.argv[2], sys.argv[3:]
os.environ["KERAS_BACKEND"] = BACKEND
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_stdprune  # noqa: E402
from tf_stdprune.keras3.prune import wrappers  # noqa: E402
from keras3.helpers import TwoDense  # noqa: E402


def build(model_name):
    keras.utils.set_random_seed(0)
    if model_name in ("gpt2", "gemma"):
        import keras_hub

        if model_name == "gpt2":
            backbone = keras_hub.models.GPT2Backbone(
                vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=16,
                intermediate_dim=32, max_sequence_length=8, dropout=0.0)
            return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=2,
            hidden_dim=16, intermediate_dim=32, head_dim=8)
        return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    if model_name == "flat":
        return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="dense_in"),
                                 keras.layers.Dense(4, name="dense_out")])
    inputs = keras.Input((8,))
    hidden = TwoDense(16, name="two_dense")(keras.layers.Dense(16, name="dense_in")(inputs))
    return keras.Model(inputs, keras.layers.Dense(4, name="dense_out")(hidden))


def data(model_name):
    rng = np.random.default_rng(0)
    if model_name in ("gpt2", "gemma"):
        ids = rng.integers(0, 64, size=(16, 8)).astype("int32")
        return {"token_ids": ids, "padding_mask": np.ones_like(ids)}, np.roll(ids, -1, 1)
    return rng.normal(size=(16, 8)).astype("float32"), rng.normal(size=(16, 4)).astype("float32")


def two_logical_cpus():
    """Splits TensorFlow's CPU in two before anything runs on it."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def distribution_scope(model_name, mode):
    if BACKEND == "jax":
        keras.distribution.set_distribution(None)
    if mode == "mirrored":
        import tensorflow as tf

        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]).scope()
    if mode == "data":
        keras.distribution.set_distribution(keras.distribution.DataParallel())
    if mode == "model":
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"], devices)
        if model_name == "gemma":
            import keras_hub

            layout_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
        else:
            layout_map = keras.distribution.LayoutMap(mesh)
            layout_map["dense_(in|out)/kernel"] = (None, "model")
            layout_map["two_dense/.*/kernel"] = ("model", None)
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    return contextlib.nullcontext()


def copies(variable, mode):
    """The variable's value as each device holds it (whole copies only)."""
    value = variable.value
    if mode == "mirrored":
        return [v.numpy() for v in getattr(value, "values", [value])]
    shards = [np.asarray(shard.data) for shard in getattr(value, "addressable_shards", [])
              if all(s == slice(None) or (s.start in (None, 0) and s.stop in (None, n))
                     for s, n in zip(shard.index, variable.shape))]
    return shards or [np.asarray(value)]


def refusal(model_name):
    """The error of pruning under ModelParallel a model created before it was set."""
    keras.distribution.set_distribution(None)
    model = build(model_name)
    distribution_scope(model_name, "model")
    try:
        tf_stdprune.prune_low_std(model)
    except ValueError as error:
        return str(error)
    return ""


def run(model_name, mode):
    keras.backend.clear_session()
    if mode == "outside":
        np.savez(os.path.join(OUT_DIR, f"{model_name}_{mode}.npz"),
                 error=np.array(refusal(model_name)))
        return
    with distribution_scope(model_name, mode):
        model = build(model_name)
        schedule = tf_stdprune.StdPruningSchedule([0.8, 1.2], steps_per_iteration=2)
        pruned = tf_stdprune.prune_low_std(model, pruning_schedule=schedule)
        pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                       keras.losses.MeanSquaredError() if model_name == "dense" else
                       keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data(model_name)
    pruned.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0,
               callbacks=[tf_stdprune.UpdatePruningStep()])
    result, distinct, unlike, sharded, copies_seen = {}, 0, 0, 0, 0
    for state in wrappers(pruned):
        for path, mask, weight in zip(state.paths, state.masks, state.pruned_weights):
            result[f"{state.name}:{path}"] = keras.ops.convert_to_numpy(mask)
            values = copies(mask, mode)
            copies_seen = max(copies_seen, len(values))
            distinct += any(not np.array_equal(values[0], other) for other in values[1:])
            if mode == "model":
                unlike += mask.value.sharding.spec != weight.value.sharding.spec
                sharded += any(axis is not None for axis in mask.value.sharding.spec)
    np.savez(os.path.join(OUT_DIR, f"{model_name}_{mode}.npz"), distinct=np.array(distinct),
             unlike_kernel=np.array(unlike), sharded=np.array(sharded),
             copies=np.array(copies_seen), **result)


if BACKEND == "tensorflow":
    two_logical_cpus()
for model_and_mode in RUNS:
    run(*model_and_mode.split(":"))
