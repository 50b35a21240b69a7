"""BatchNormalization recalibration: fresh moving statistics for a pruned network.

Pruning changes every activation downstream, so the moving mean/variance a BN layer
learned before are stale and inference accuracy collapses even when training-mode
accuracy is fine. Recalibration (`batchnorm_statistics`) runs ``K`` forward passes in
training mode, no weight update, and sets for every BN layer

    moving_mean     = (1/K) sum_k mean_k
    moving_variance = (1/K) sum_k var_k

the average of the per-batch statistics (each pass runs with momentum 0, so after it the
moving statistics hold exactly that batch's statistics). ``var_k`` is the variance the layer
itself feeds its moving average: with ``n`` values per channel in the batch, the fused kernel
(4-D inputs) uses ``sum (x - mean_k)^2 / (n - 1)``, other inputs ``/ n``. A BN layer with
``trainable=False`` runs in inference mode and keeps its statistics.
"""
import tensorflow as tf

from tf_stdprune.keras2.engine import keras
from tf_stdprune.procedure.batchnorm_statistics import average_batch_statistics
from tf_stdprune.keras2.prune import all_layers, strip_pruning

BATCHNORM_LAYERS = (keras.layers.BatchNormalization, keras.layers.experimental.SyncBatchNormalization)


def recalibrate_batchnorm(model, data, batches):
    """Re-estimates the moving statistics of every BN layer of ``model`` over ``batches``.

    ``data`` (a `tf.data.Dataset` or an iterable) yields ``x`` or ``(x, ...)`` batches. The forward passes go through the
    stripped model, which shares its layers with ``model``: pruning steps and masks are
    left untouched, and the pruned weights it reads are exactly 0 already.
    Returns the number of batches used.
    """
    if isinstance(data, tuple):
        raise TypeError(
            "recalibrate_batchnorm takes batches (a batched tf.data.Dataset or a list of x "
            "batches), not a tuple of arrays: pass tf.data.Dataset.from_tensor_slices(x)"
            ".batch(batch_size)."
        )
    forward_model = strip_pruning(model)
    layers = [l for l in all_layers(forward_model) if isinstance(l, BATCHNORM_LAYERS)]
    if not layers or batches < 1:
        return 0
    forward = tf.function(lambda x: forward_model(x, training=True))
    x_batches = (batch[0] if isinstance(batch, (tuple, list)) else batch
                 for batch in (data.take(batches) if isinstance(data, tf.data.Dataset) else data))
    return average_batch_statistics(layers, forward, x_batches, batches, lambda v: v.numpy())
