"""The moving statistics of BatchNormalization re-estimated over K batches (either Keras).

Each forward pass runs in training mode with momentum 0, so after it a layer's moving
statistics hold exactly that batch's statistics; averaged over the ``K`` batches::

    moving_mean     = (1/K) sum_k mean_k
    moving_variance = (1/K) sum_k var_k

``var_k`` being the variance the layer itself feeds its moving average. The momenta are
restored afterwards, whatever happens. This module imports no Keras: each world's
`recalibrate_batchnorm` (`keras2.recalibration`, `keras3.iterative`) gives it the layers, the
forward pass and how to read a variable.
"""
import numpy as np


def average_batch_statistics(layers, forward, x_batches, batches, to_numpy):
    """Sets the moving statistics of ``layers`` to the mean over the first ``batches``
    batches of ``x_batches`` (each run through ``forward(x)``); returns how many it used.

    ``to_numpy(variable)`` reads a variable. With no batch (or ``batches < 1``) the
    statistics are unchanged.
    """
    if batches < 1:
        return 0
    momenta = [layer.momentum for layer in layers]
    sums = [[np.zeros(l.moving_mean.shape, np.float64) for _ in range(2)] for l in layers]
    count = 0
    try:
        for layer in layers:
            layer.momentum = 0.0
        for x in x_batches:
            forward(x)
            for layer, (mean, variance) in zip(layers, sums):
                mean += to_numpy(layer.moving_mean)
                variance += to_numpy(layer.moving_variance)
            count += 1
            if count == batches:
                break  # no batch more is drawn from x_batches
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    for layer, (mean, variance) in zip(layers, sums):
        if count:
            layer.moving_mean.assign(mean / count)
            layer.moving_variance.assign(variance / count)
    return count
