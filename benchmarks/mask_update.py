"""Time to recompute every mask of VGG19-BN: ours (q * sigma) vs tfmot's (sort / top-k).

tfmot finds a magnitude threshold for a target sparsity by sorting ``|w|`` (top_k over the
whole tensor); the std rule needs two reductions and a compare. Both recompute and assign
all masks of the model inside one ``tf.function``; rounds interleaved, medians reported.

    python benchmarks/mask_update.py --width=1.0
"""
from absl import app, flags
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import (
    PruneLowMagnitude,
)

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.models import vgg19_bn
from tf_stdprune.keras2.prune import all_layers

from common import interleaved_samples, report

FLAGS = flags.FLAGS
flags.DEFINE_float("width", 1.0, "VGG19-BN width multiplier.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
flags.DEFINE_list("std_modes", ["initial", "surviving", "all"], "Our std modes to time.")


def _built(model):
    model(tf.zeros([1, 32, 32, 3]))
    return [l for l in all_layers(model) if isinstance(l, PruneLowMagnitude)]


def main(_):
    keras.utils.set_random_seed(0)
    schedule = tf_stdprune.StdPruningSchedule([0.5], steps_per_iteration=1)
    ours = {mode: _built(tf_stdprune.prune_low_std(vgg19_bn(width=FLAGS.width),
                                                   pruning_schedule=schedule, std_mode=mode))
            for mode in FLAGS.std_modes}
    keras.utils.set_random_seed(0)
    theirs = _built(tfmot.sparsity.keras.prune_low_magnitude(
        vgg19_bn(width=FLAGS.width), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=1)))

    def updater(layers):
        @tf.function
        def update():
            for layer in layers:
                layer.pruning_obj.update_masks(0.5)
        return update

    @tf.function
    def update_tfmot():
        for layer in theirs:
            for weight, mask, threshold in layer.pruning_vars:
                new_threshold, new_mask = layer.pruning_obj._update_mask(weight)
                threshold.assign(new_threshold)
                mask.assign(new_mask)

    def run(fn, layers):
        # tfmot also wraps layers with nothing to prune (dropout, the logits activation).
        last = [l for l in layers if l.pruning_vars][-1]

        def call():
            fn()
            float(last.pruning_vars[0][2].numpy())  # wait for the assignments
        return call

    contenders = {"tfmot_top_k": run(update_tfmot, theirs)}
    contenders.update({f"prune_low_std[{mode}]": run(updater(layers), layers)
                       for mode, layers in ours.items()})
    samples = interleaved_samples(contenders, FLAGS.rounds)
    prunable = sum(int(tf.size(w)) for w, _, _ in (v for l in theirs for v in l.pruning_vars))
    rows = report("mask update, all layers", {"width": FLAGS.width, "prunable_weights": prunable,
                                              "rounds": FLAGS.rounds}, samples, "tfmot_top_k")
    for name, row in rows.items():
        print(f"{name} speed-up over tfmot: {1 / row['ratio_vs_tfmot_top_k']:.1f}x")


if __name__ == "__main__":
    app.run(main)
