"""Dropout ratio adjustment during retraining (Han et al. 2015, section 3.3).

Pruning removes connections, so the retrained network needs less regularization. After
each pruning step every Dropout layer's rate becomes::

    D_r = D_o * sqrt(C_ir / C_io)

``D_o`` is the layer's original rate, ``C_io`` the number of connections (entries of the
kernels, BatchNormalization's gamma excluded) of the layer whose output the dropout acts
on, in the original dense network, and ``C_ir`` the number of those connections that are
nonzero now. That layer is the nearest layer with connections upstream of the Dropout in
the model's graph (through activations, pooling, reshapes, ...); a Dropout with none
upstream (dropout on the inputs) takes the nearest one it feeds. A Dropout with neither
keeps its rate.

``D_o`` is stored on the Dropout layer itself, as the attribute ``ORIGINAL_RATE``, the
first time its rate is changed; `restore_dropout` puts it back and removes the
attribute, so it may be called any number of times.

Keras reads a Dropout's rate when the training function is traced, so a change of rate
only takes effect in a re-traced function: `DropoutRescaling` rebuilds the model's
training function whenever it changes a rate. The functions serve tf_keras and Keras 3
models alike; `callbacks.DropoutRescaling` is the tf_keras callback that applies them.
"""
import collections
import math
import numbers

import numpy as np

from tf_stdprune.registry import get_tensor, prunable_attributes
from tf_stdprune.procedure.sensitivity import pruning_state

ORIGINAL_RATE = "stdprune_original_rate"


def rescaled_rate(original_rate, original_connections, remaining_connections):
    """``D_r = D_o * sqrt(C_ir / C_io)`` (Han et al. 2015, equation 2).

    Examples:
      >>> rescaled_rate(0.5, 100, 25)
      0.25
    """
    if not isinstance(original_rate, numbers.Real) or not 0.0 <= original_rate < 1.0:
        raise ValueError(f"original_rate must be a dropout rate in [0, 1), got {original_rate!r}.")
    if not isinstance(original_connections, numbers.Integral) or original_connections < 1:
        raise ValueError("original_connections must be an integer >= 1 (the connections of "
                         f"the dense layer), got {original_connections!r}.")
    if not isinstance(remaining_connections, numbers.Integral) \
            or not 0 <= remaining_connections <= original_connections:
        raise ValueError(
            f"remaining_connections must be an integer in [0, original_connections="
            f"{original_connections}], got {remaining_connections!r}.")
    return float(original_rate) * math.sqrt(remaining_connections / original_connections)


def connections(layer):
    """``(C_o, C_r)`` of a layer: its kernel entries, and how many of them are nonzero.

    ``layer`` may be a pruning wrapper (its ``layer`` is inspected, and an entry whose
    mask is 0 counts as pruned even before the weight itself is zeroed) or a plain
    layer. ``(0, 0)`` for a layer without connections.
    """
    inner = getattr(layer, "layer", layer)
    masks = {key: mask for key, (mask, _) in pruning_state(layer).items()}
    total = remaining = 0
    for path in prunable_attributes(inner, prune_batchnorm=False):
        variable = get_tensor(inner, path)
        values = np.asarray(variable.numpy())
        if id(variable) in masks:
            values = np.where(np.asarray(masks[id(variable)].numpy()) != 0, values, 0)
        total += values.size
        remaining += int(np.count_nonzero(values))
    return total, remaining


def is_dropout(layer):
    """True for Keras's Dropout or a subclass of it (SpatialDropout*), in either Keras."""
    return any(cls.__name__ == "Dropout" and cls.__module__.split(".")[0] in ("keras", "tf_keras")
               for cls in type(layer).__mro__)


def _is_model(layer):
    return isinstance(getattr(layer, "layers", None), list)


def _has_connections(layer):
    return bool(prunable_attributes(getattr(layer, "layer", layer), prune_batchnorm=False))


def _node_layers(node, direction):
    if direction == "up":
        layers = getattr(node, "inbound_layers", None)
        if layers is None:  # Keras 3
            layers = [parent.operation for parent in getattr(node, "parent_nodes", [])]
        return layers if isinstance(layers, (list, tuple)) else [layers]
    layer = getattr(node, "outbound_layer", None) or getattr(node, "operation", None)
    return [layer] if layer is not None else []


def _neighbours(layer, direction, members):
    nodes = (getattr(layer, "inbound_nodes", None) or getattr(layer, "_inbound_nodes", []))\
        if direction == "up" else \
        (getattr(layer, "outbound_nodes", None) or getattr(layer, "_outbound_nodes", []))
    return [n for node in nodes for n in _node_layers(node, direction) if id(n) in members]


def _nearest(start, direction, members):
    """Breadth-first search from ``start`` for the nearest layer with connections."""
    seen, queue = {id(start)}, collections.deque([start])
    while queue:
        for layer in _neighbours(queue.popleft(), direction, members):
            if id(layer) in seen:
                continue
            if _has_connections(layer):
                return layer
            seen.add(id(layer))
            queue.append(layer)
    return None


def _nearest_in_order(layers, index):
    """For a model without a graph: the previous layer with connections, else the next."""
    for layer in list(reversed(layers[:index])) + layers[index + 1:]:
        if _has_connections(layer):
            return layer
    return None


def dropout_sources(model):
    """``[(dropout_layer, source_layer or None)]`` for every Dropout in ``model``.

    The source is found in the graph of the (possibly nested) model that holds the
    Dropout, as the module docstring says; it may be a pruning wrapper.
    """
    pairs = []
    members = {id(layer) for layer in model.layers}
    for index, layer in enumerate(model.layers):
        if _is_model(layer):
            pairs.extend(dropout_sources(layer))
        elif is_dropout(layer):
            has_graph = bool(getattr(layer, "inbound_nodes", None)
                             or getattr(layer, "_inbound_nodes", None))
            source = (_nearest(layer, "up", members) or _nearest(layer, "down", members)
                      if has_graph else _nearest_in_order(model.layers, index))
            pairs.append((layer, source))
    return pairs


def rescale_dropout(model, sources=None):
    """Sets every Dropout's rate to ``D_o * sqrt(C_ir / C_io)`` of its source layer.

    ``sources`` is `dropout_sources(model)` (computed if not given). Stores ``D_o`` on
    the layer the first time. Returns ``{dropout_name: rate}`` for the rates it changed.
    """
    changed = {}
    for dropout, source in dropout_sources(model) if sources is None else sources:
        if source is None:
            continue
        original = getattr(dropout, ORIGINAL_RATE, None)
        if original is None:
            original = float(dropout.rate)
        total, remaining = connections(source)
        rate = rescaled_rate(original, total, remaining) if total else original
        if rate != dropout.rate:
            setattr(dropout, ORIGINAL_RATE, original)
            dropout.rate = rate
            changed[dropout.name] = rate
    return changed


def restore_dropout(model):
    """Gives every Dropout layer of ``model`` its original rate back; safe to repeat.

    Returns ``{dropout_name: rate}`` for the layers it restored (empty the second time).
    """
    restored = {}
    for dropout, _ in dropout_sources(model):
        original = getattr(dropout, ORIGINAL_RATE, None)
        if original is not None:
            dropout.rate = original
            delattr(dropout, ORIGINAL_RATE)
            restored[dropout.name] = original
    return restored
