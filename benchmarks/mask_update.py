"""Time to recompute every mask of VGG19-BN: ours (q * sigma) vs tfmot's (sort / top-k).

tfmot finds a magnitude threshold for a target sparsity by sorting ``|w|`` (top_k over the
whole tensor); the std rule needs two reductions and a compare. Both recompute and assign
all masks of the model inside one ``tf.function``; rounds interleaved, medians reported.

    python benchmarks/mask_update.py --width=1.0
"""
from absl import app, flags
import tensorflow as tf
import tensorflow_model_optimization as tfmot

import tf_stdprune
from tf_stdprune._keras import keras
from tf_stdprune.models import vgg19_bn
from tf_stdprune.prune import all_layers

from common import interleaved_medians, report

FLAGS = flags.FLAGS
flags.DEFINE_float("width", 1.0, "VGG19-BN width multiplier.")
flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")


def _built(model):
    model(tf.zeros([1, 32, 32, 3]))
    return [l for l in all_layers(model) if isinstance(l, tfmot.sparsity.keras.PruneLowMagnitude)]


def main(_):
    keras.utils.set_random_seed(0)
    ours = _built(tf_stdprune.prune_low_std(vgg19_bn(width=FLAGS.width), pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.5], steps_per_iteration=1)))
    keras.utils.set_random_seed(0)
    theirs = _built(tfmot.sparsity.keras.prune_low_magnitude(
        vgg19_bn(width=FLAGS.width), pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 0, frequency=1)))

    @tf.function
    def update_ours():
        for layer in ours:
            layer.pruning_obj.update_masks(0.5)

    @tf.function
    def update_tfmot():
        for layer in theirs:
            for weight, mask, threshold in layer.pruning_vars:
                new_threshold, new_mask = layer.pruning_obj._update_mask(weight)
                threshold.assign(new_threshold)
                mask.assign(new_mask)

    def run(fn, layers):
        def call():
            fn()
            float(layers[-1].pruning_vars[0][2].numpy())  # wait for the assignments
        return call

    medians = interleaved_medians(
        {"tfmot_top_k": run(update_tfmot, theirs), "prune_low_std": run(update_ours, ours)},
        FLAGS.rounds)
    prunable = sum(int(tf.size(w)) for l in ours for w, _, _ in l.pruning_vars)
    rows = report("mask update, all layers", {"width": FLAGS.width, "prunable_weights": prunable,
                                              "rounds": FLAGS.rounds}, medians, "tfmot_top_k")
    print(f"\nprune_low_std is {1 / rows['prune_low_std']['ratio_vs_tfmot_top_k']:.1f}x faster")


if __name__ == "__main__":
    app.run(main)
