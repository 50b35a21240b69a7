"""Keras 3: train step of VGG19-BN pruned by `prune_low_std` vs dense, on the backend that
KERAS_BACKEND names, and the time of one mask update vs the tf_keras path's.

Both train-step contenders start from the same weights and run ``steps`` SGD-momentum
steps per round through ``fit`` (one epoch of ``steps`` batches, the pruning callback
attached for the pruned model; its schedule does not prune after step 0); rounds are
interleaved and the per-round ratio reported with its 95 % interval. The mask update
recomputes every mask of the model once (`PruneLowStd.update_masks`, slots included) on
the Keras 3 model and on the tf_keras model (`pruning_obj.update_masks`), interleaved.

    KERAS_BACKEND=jax python benchmarks/overhead.py --keras=3 --width=0.25 --batch_size=64
    KERAS_BACKEND=jax python benchmarks/overhead.py --keras=3 --model=gpt2 --batch_size=16

``--model=bert|gpt2`` times a small KerasHub task instead (`hub_models`): a
``BertTextClassifier`` or a ``GPT2CausalLM`` on random token ids, every Dense, EinsumDense
and embedding kernel at every depth pruned, ``steps`` ``train_on_batch`` calls per round
(the step alone: `_step_runner`); the mask update is not timed there.
"""
import keras
import numpy as np

import tf_stdprune
from tf_stdprune.keras3.prune import wrappers
from tf_stdprune.models import vgg19_bn

from common import interleaved_samples, report


def _compiled(model):
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _fit_runner(model, x, y, batch_size, steps, callbacks):
    def run():
        model.fit(x, y, batch_size=batch_size, epochs=1, steps_per_epoch=steps, shuffle=False,
                  verbose=0, callbacks=callbacks)
    return run


def _step_runner(model, x, y, steps):
    """``steps`` compiled train steps on one batch (``train_on_batch``): the step alone.
    Between pruning steps `UpdatePruningStep` does nothing per batch; its re-masking at the
    start of each ``fit`` is once per fit, not a cost of the step, so it is left out."""
    def run():
        for _ in range(steps):
            model.train_on_batch(x, y)
    return run


# The KerasHub configurations of ``--model``: small, yet every kind of nested kernel.
HUB_CONFIG = {"vocabulary_size": 1000, "num_layers": 2, "num_heads": 4, "hidden_dim": 128,
              "intermediate_dim": 512, "max_sequence_length": 128}
SEQUENCE_LENGTH = 128


def hub_models(name):
    """``(dense, pruned, inputs_and_targets(batch))``: two copies with the same weights of
    a small ``bert`` classifier or ``gpt2`` causal LM, the second pruned at every depth."""
    import keras_hub

    def build():
        keras.utils.set_random_seed(0)
        if name == "bert":
            backbone = keras_hub.models.BertBackbone(**HUB_CONFIG)
            return keras_hub.models.BertTextClassifier(backbone, num_classes=2,
                                                       preprocessor=None)
        backbone = keras_hub.models.GPT2Backbone(**HUB_CONFIG)
        return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)

    def data(batch):
        rng = np.random.default_rng(0)
        ids = rng.integers(1, HUB_CONFIG["vocabulary_size"], size=(batch, SEQUENCE_LENGTH))
        x = {"token_ids": ids.astype("int32"), "padding_mask": np.ones_like(ids, "int32")}
        if name == "bert":
            x["segment_ids"] = np.zeros_like(ids, "int32")
            return x, rng.integers(0, 2, size=batch)
        return x, np.roll(ids, -1, axis=1).astype("int32")

    dense, copy = build(), build()
    copy.set_weights(dense.get_weights())
    schedule = tf_stdprune.StdPruningSchedule([1.0], steps_per_iteration=10**9)
    return dense, tf_stdprune.prune_low_std(copy, pruning_schedule=schedule), data


def train_step_contenders(width, batch_size, steps, model="vgg"):
    """``{"dense": run, "prune_low_std": run}`` on the same data and initial weights."""
    if model != "vgg":
        dense, pruned, data = hub_models(model)
        x, y = data(batch_size)
        return {"dense": _step_runner(_compiled(dense), x, y, steps),
                "prune_low_std": _step_runner(_compiled(pruned), x, y, steps)}
    keras.utils.set_random_seed(0)
    dense = vgg19_bn(width=width, keras_module=keras)
    weights = dense.get_weights()
    copy = vgg19_bn(width=width, keras_module=keras)
    copy.set_weights(weights)
    schedule = tf_stdprune.StdPruningSchedule([1.0], steps_per_iteration=10**9)
    pruned = tf_stdprune.prune_low_std(copy, pruning_schedule=schedule)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size * steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=batch_size * steps)
    return {
        "dense": _fit_runner(_compiled(dense), x, y, batch_size, steps, []),
        "prune_low_std": _fit_runner(_compiled(pruned), x, y, batch_size, steps,
                                     [tf_stdprune.UpdatePruningStep()]),
    }


def mask_update_contenders(width):
    """``{"keras3": run, "tf_keras": run}``: one update of every mask of VGG19-BN."""
    keras.utils.set_random_seed(0)
    model = _compiled(tf_stdprune.prune_low_std(vgg19_bn(width=width, keras_module=keras)))
    model.optimizer.build(model.trainable_variables)
    layers = wrappers(model)

    def keras3():
        for layer in layers:
            layer.update_masks(0.5, model.optimizer)
        keras.ops.convert_to_numpy(layers[-1].masks[0])  # wait for the device

    import tensorflow as tf  # the tf_keras path runs on TensorFlow whatever the backend

    from tf_stdprune.keras2.prune import all_layers
    from tf_stdprune.keras2.wrapper import PruneLowStd

    tf_model = tf_stdprune.prune_low_std(vgg19_bn(width=width))
    tf_model(tf.zeros([1, 32, 32, 3]))
    tf_layers = [l for l in all_layers(tf_model) if isinstance(l, PruneLowStd)]

    @tf.function
    def update():
        for layer in tf_layers:
            layer.pruning_obj.update_masks(0.5)

    def tf_keras():
        update()
        tf_layers[-1].pruning_vars[0][1].numpy()

    return {"keras3": keras3, "tf_keras": tf_keras}


def run(width, batch_size, steps, rounds, model="vgg"):
    """Prints both reports (JSON, then a table; for a KerasHub ``model`` the train step
    only) and returns their rows."""
    backend = keras.backend.backend()
    config = {"backend": backend, "model": model, "batch_size": batch_size, "steps": steps,
              "rounds": rounds, **({"width": width} if model == "vgg" else HUB_CONFIG)}
    samples = interleaved_samples(train_step_contenders(width, batch_size, steps, model),
                                  rounds)
    per_step = {name: [t / steps for t in times] for name, times in samples.items()}
    title = "Keras 3 train step" + ("" if model == "vgg" else f", KerasHub {model}")
    train = report(f"{title} ({backend})", config, per_step, "dense", items=batch_size)
    if model != "vgg":
        return {"train_step": train}
    updates = interleaved_samples(mask_update_contenders(width), rounds)
    masks = report(f"mask update, all layers (Keras 3 on {backend} vs tf_keras)",
                   {"backend": backend, "width": width, "rounds": rounds}, updates, "tf_keras")
    return {"train_step": train, "mask_update": masks}
