"""The sparse and dense SavedModel exports, for either Keras (TensorFlow only).

`keras2.export` (tf_keras) and `keras3.export` (Keras 3 on the TensorFlow backend) each supply
a private plain copy of the model and the way to substitute a layer's tensors during a
call; the rest (storage, decode on load, sparse compute, the marker) is this module.

A sparse export stores pruned tensors sparsely.

Every prunable tensor (kernels, BN gammas; see `registry`) of ``N`` entries with ``n``
nonzeros is stored as variables

    gaps:   uint8, the relative positions of the nonzeros (`coding.relative_gaps`, span
            256: one byte per nonzero plus one filler per 255 zeros in a row);
    values: float32 [n], or, when the tensor has at most 256 distinct nonzero values (a
            quantized model), ``codebook`` float32 [K] and ``indices`` uint8 [n].

Decode on load: ``tf.saved_model.load`` rebuilds every tensor,
``w = reshape(scatter(positions, values, [N]), shape)``, into a cache variable, through
the initializer of a resource (`CacheFiller`) that the loader runs once the variables
are restored, as it does for lookup tables. Every call then reads the caches, so it
costs what a dense call costs. The caches are saved empty (shape ``[0]``), so the files
hold only the sparse form. The other variables (biases, BN beta and moving statistics) are
stored as they are. Storage per prunable tensor: ``5 n`` bytes (``2 n + 4 K``
quantized) against ``4 N`` dense. The result needs only TensorFlow:
``tf.saved_model.load(path).signatures["serving_default"]``.

Sparse compute (``sparse_compute``): a `Dense` layer with a 2-D input, or a `Conv2D` with
a 1x1 kernel and stride 1 (``channels_last``, one group; its input reshaped to rows of
``C_in`` values, ``B * H * W`` of them), may instead compute ``y = act((W^T x^T)^T + b)``
with ``W^T`` (``C_out x C_in``) decoded once into row-major COO index and value caches: batches of at most `SPARSE_MAX_BATCH` rows use ``tf.sparse.sparse_dense_matmul``
on it, larger ones ``tf.raw_ops.SparseMatrixMatMul`` on a CSR matrix built from it in the
call (a CSR matrix is a variant tensor, which no saved variable can hold).

The rule comes from ``benchmarks/serving.py --matmul``, which times one 4096 x 4096
kernel (the classifier of full-width VGG19-BN) against the dense ``tf.matmul`` on CPU.
With 96-98 % zeros COO beats dense at batch 1 to 4 and CSR beats it at batch 16 to 64,
while COO loses at batch >= 16 and CSR at batch <= 4 (its per-call conversion costs
more than the product saves); with 90 % zeros COO loses at every batch size and CSR
wins only at the largest batches. ``"auto"`` therefore computes sparsely an eligible layer
with at least `SPARSE_MIN_ZEROS` zeros and `SPARSE_MIN_WEIGHTS` weights (smaller
products are dominated by per-op overhead) and leaves every other layer dense; ``True``
computes every eligible layer sparsely; ``False`` none. A 1x1 convolution multiplies
``B * H * W`` rows, so it takes the CSR product except on a 2x2 or smaller map at batch
1. Other convolutions always use the dense cache.

Every export directory holds `MARKER`, a JSON file naming the format; ``overwrite=True``
replaces only a directory that carries it (see `io.write_atomically`). Exporting never
changes the model it reads: the tensors are taken from a private copy.
"""
import collections
import contextlib
import io
import json
import os
import tarfile

import numpy as np
import tensorflow as tf

from tf_stdprune.compression import coding
from tf_stdprune import io as atomic_io
from tf_stdprune.registry import get_tensor, is_keras_class
from tf_stdprune.report import prunable_layers

GAP_SPAN = 256
MAX_CODEBOOK = 256
MARKER = "tf_stdprune_export.json"
FORMAT_VERSION = 2
SPARSE_MIN_ZEROS = 0.95
SPARSE_MIN_WEIGHTS = 1 << 20
SPARSE_MAX_BATCH = 4  # COO up to here, CSR above

# What a Keras world supplies to `export`: ``private_plain_copy(model)``, a plain copy
# with its own variables (``model`` untouched), and ``substituted(layer, attributes,
# tensors)``, a context manager that makes ``layer`` compute with ``tensors``.
World = collections.namedtuple("World", ["private_plain_copy", "substituted"])


class SparseTensor(tf.Module):
    """The variables of one sparse tensor, its rebuild and its caches (filled on load).

    ``matmul``: cache the transposed kernel in COO form (for `sparse_dense_call`)
    instead of the dense tensor.
    """

    def __init__(self, array, matmul=False):
        super().__init__()
        flat = np.asarray(array, np.float32).ravel()
        self.shape = tuple(int(d) for d in array.shape)
        # a kernel as the matrix it multiplies: [C_in, C_out] (a 1x1 conv's [1, 1, C_in, C_out])
        self.matrix_shape = (int(np.prod(self.shape[:-1])), self.shape[-1])
        self.matmul = matmul
        positions = np.flatnonzero(flat)
        self.gaps = tf.Variable(coding.relative_gaps(positions, GAP_SPAN), trainable=False)
        codebook, indices = np.unique(flat[positions], return_inverse=True)
        if len(codebook) <= MAX_CODEBOOK:
            self.codebook = tf.Variable(codebook, trainable=False)
            self.indices = tf.Variable(indices.ravel().astype(np.uint8), trainable=False)
        else:
            self.values = tf.Variable(flat[positions], trainable=False)
        if not matmul:
            self.cache = _empty_cache(tf.float32, [0])
        else:
            self.transposed_indices = _empty_cache(tf.int64, [0, 2])
            self.transposed_values = _empty_cache(tf.float32, [0])

    def positions_and_values(self):
        """The flat positions (int32 [n]) and values (float32 [n]) of the nonzeros."""
        gaps = tf.cast(self.gaps, tf.int32)
        advance = tf.where(gaps == 0, GAP_SPAN - 1, gaps)
        positions = tf.boolean_mask(tf.cumsum(advance) - 1, gaps != 0)
        if hasattr(self, "codebook"):
            values = tf.gather(self.codebook, tf.cast(self.indices, tf.int32))
        else:
            values = tf.convert_to_tensor(self.values)
        return positions, values

    def dense(self):
        """``w = reshape(scatter(positions, values, [N]), shape)``."""
        positions, values = self.positions_and_values()
        flat = tf.scatter_nd(positions[:, None], values, [int(np.prod(self.shape))])
        return tf.reshape(flat, self.shape)

    def decode(self):
        """The assignments that fill the caches (run once, when the export is loaded)."""
        if not self.matmul:
            return [self.cache.assign(self.dense())]
        positions, values = self.positions_and_values()
        rows, columns = positions // self.matrix_shape[1], positions % self.matrix_shape[1]
        transposed = tf.sparse.reorder(tf.SparseTensor(
            tf.cast(tf.stack([columns, rows], 1), tf.int64), values, self.matrix_shape[::-1]))
        return [self.transposed_indices.assign(transposed.indices),
                self.transposed_values.assign(transposed.values)]

    def read(self):
        """The cached dense tensor (valid after `decode`)."""
        return tf.reshape(self.cache.read_value(), self.shape)

    def read_transposed(self):
        """The cached ``W^T`` as a `tf.SparseTensor` (valid after `decode`)."""
        return tf.SparseTensor(tf.reshape(self.transposed_indices.read_value(), [-1, 2]),
                               tf.reshape(self.transposed_values.read_value(), [-1]),
                               self.matrix_shape[::-1])


def _empty_cache(dtype, empty_shape):
    """A variable of any shape, saved empty, filled by the first serving call."""
    return tf.Variable(tf.zeros(empty_shape, dtype), shape=tf.TensorShape(None),
                       trainable=False)


def uses_sparse_compute(layer, array, sparse_compute):
    """Whether the prunable tensor ``array`` of ``layer`` is computed sparsely (module
    docstring): the float32 kernel of a `Dense` layer with a 2-D input or of a pointwise
    `Conv2D` (`is_pointwise_conv`), and with ``"auto"`` at least `SPARSE_MIN_ZEROS` zeros
    and `SPARSE_MIN_WEIGHTS` weights."""
    dense = _is_keras(layer, "Dense") and array.ndim == 2 and _input_rank(layer) == 2
    eligible = (layer.compute_dtype == "float32" and array is not None
                and (dense or (is_pointwise_conv(layer) and array.ndim == 4)))
    if not eligible or sparse_compute is False:
        return False
    zeros = 1.0 - np.count_nonzero(array) / array.size
    return sparse_compute is True or (zeros >= SPARSE_MIN_ZEROS
                                      and array.size >= SPARSE_MIN_WEIGHTS)


def is_pointwise_conv(layer):
    """A `Conv2D` that is a matrix product per pixel: 1x1 kernel, stride 1, one group,
    ``channels_last``."""
    return (_is_keras(layer, "Conv2D") and tuple(layer.kernel_size) == (1, 1)
            and tuple(layer.strides) == (1, 1) and layer.groups == 1
            and layer.data_format == "channels_last")


def _is_keras(layer, name):
    """``layer`` is exactly Keras's own class ``name`` (tf_keras or Keras 3), no subclass."""
    return type(layer).__name__ == name and is_keras_class(type(layer))


def _input_rank(layer):
    """The rank of the layer's input (tf_keras: ``input_shape``; Keras 3: ``input``), or
    None when it has none or several (a shared layer)."""
    for read in (lambda: layer.input_shape, lambda: layer.input.shape):
        try:
            return len(read())
        except (AttributeError, RuntimeError, ValueError):
            continue
    return None


def sparse_matmul(transposed, x):
    """``x @ W`` from ``transposed = W^T`` (a `tf.SparseTensor`): COO
    ``sparse_dense_matmul`` for at most `SPARSE_MAX_BATCH` rows, CSR above."""
    def coo():
        return tf.transpose(tf.sparse.sparse_dense_matmul(transposed, x, adjoint_b=True))

    def csr():
        matrix = tf.raw_ops.SparseTensorToCSRSparseMatrix(
            indices=transposed.indices, values=transposed.values,
            dense_shape=tf.cast(transposed.dense_shape, tf.int64))
        return tf.transpose(tf.raw_ops.SparseMatrixMatMul(a=matrix, b=x, adjoint_b=True))

    return tf.cond(tf.shape(x)[0] <= SPARSE_MAX_BATCH, coo, csr)


@contextlib.contextmanager
def sparse_dense_call(layer, tensor):
    """Makes the `Dense` or pointwise `Conv2D` ``layer`` compute ``act(x @ W + b)`` with
    `sparse_matmul`, a convolution's input taken as rows of ``C_in`` values."""
    def call(inputs, *args, **kwargs):  # Keras 3 may pass ``training``
        inputs = tf.convert_to_tensor(inputs)
        rows = tf.reshape(inputs, [-1, tensor.matrix_shape[0]])
        y = sparse_matmul(tensor.read_transposed(), rows)
        if inputs.shape.rank != 2:
            y = tf.reshape(y, tf.concat([tf.shape(inputs)[:-1], [tensor.matrix_shape[1]]], 0))
        if layer.use_bias:
            y = tf.nn.bias_add(y, layer.bias)
        return layer.activation(y) if layer.activation is not None else y

    object.__setattr__(layer, "call", call)
    try:
        yield
    finally:
        object.__delattr__(layer, "call")


class CacheFiller(tf.saved_model.experimental.TrackableResource):
    """A resource whose initializer fills the caches of ``tensors`` (`SparseTensor`).

    ``tf.saved_model.load`` runs the initializer of every resource it restores, after
    the variables: that is the one decode. The resource itself is a placeholder boolean
    variable handle that nothing reads.
    """

    def __init__(self, tensors):
        self._tensors = list(tensors)
        super().__init__()

    def _create_resource(self):
        return tf.raw_ops.VarHandleOp(dtype=tf.bool, shape=[], shared_name="")

    def _initialize(self):
        return tf.group([u for t in self._tensors for u in t.decode()])


def output_names(model):
    """The signature's output names: the model's own, or ``output_<k>`` (a Keras 3
    Sequential has none)."""
    names = getattr(model, "output_names", None)
    return list(names) if names else [f"output_{k}" for k in range(len(model.outputs))]


class Serving(tf.Module):
    """Holds the variables to save; `serving_function` calls the (private copy of the)
    Keras model, which is kept out of the tracked state so that only these are saved.

    ``substituted(layer, attributes, tensors)``: the Keras world's context manager that
    makes ``layer`` compute with ``tensors`` in place of those attributes.
    """

    def __init__(self, model, sparse, sparse_compute, substituted):
        super().__init__()
        replaced, self.tensors, substitutions = set(), [], []
        self.matmul = []
        for layer, attributes in prunable_layers(model) if sparse else []:
            arrays = [np.asarray(get_tensor(layer, a)) for a in attributes]
            modes = [uses_sparse_compute(layer, a, sparse_compute) for a in arrays]
            tensors = [SparseTensor(a, m) for a, m in zip(arrays, modes)]
            self.matmul += [layer.name] if any(modes) else []
            substitutions.append((layer, attributes, tensors))
            self.tensors += tensors
            replaced |= {id(get_tensor(layer, a)) for a in attributes}
        self.other_variables = [v for v in model.weights if id(v) not in replaced]
        self.filler = CacheFiller(self.tensors)  # runs when the export is loaded
        names = output_names(model)

        def serve(*inputs):
            with contextlib.ExitStack() as stack:
                for layer, attributes, tensors in substitutions:
                    if tensors[0].matmul:
                        stack.enter_context(sparse_dense_call(layer, tensors[0]))
                    else:
                        stack.enter_context(substituted(layer, attributes,
                                                        [t.read() for t in tensors]))
                outputs = model(tf.nest.pack_sequence_as(structure, list(inputs)),
                                training=False)
            return dict(zip(names, tf.nest.flatten(outputs)))

        # the model's own input structure (one tensor, a list, or a dict such as KerasHub's
        # {"token_ids", "padding_mask"}, whose keys name the signature's inputs)
        structure = input_structure(model)
        keys = sorted(structure) if isinstance(structure, dict) else None
        specs = [tf.TensorSpec(i.shape, i.dtype, name=keys[k] if keys else f"input_{k}")
                 for k, i in enumerate(tf.nest.flatten(structure))]
        # Left for tf.saved_model.save to trace: under a multi-worker strategy it then reads
        # each distributed variable's primary copy instead of tracing collectives.
        self.serving_function = tf.function(serve, input_signature=specs, autograph=False)


def input_structure(model):
    """The model's inputs as its call takes them: a dict of named inputs (a KerasHub
    model's ``token_ids`` and ``padding_mask``), else one input or a list of them."""
    try:
        structure = model.input
    except (AttributeError, ValueError):  # Keras 3's Sequential has no input before a call
        structure = None
    if isinstance(structure, dict):
        return structure
    return model.inputs[0] if len(model.inputs) == 1 else list(model.inputs)


def private_copy(model, clone, has_inputs, register):
    """``clone(model)`` (the Keras world's ``clone_model``) holding ``model``'s values in
    its own variables. Raises `ValueError` with the fix if ``model`` is not built
    (``has_inputs``: whether it has defined inputs) or cannot be cloned; ``register``
    names that world's function to register a custom layer."""
    if not model.built or not has_inputs:
        raise ValueError(
            f"model {model.name!r} is not built or has no defined inputs; build it with an "
            "input shape (keras.Input(shape) as its first layer) before exporting.")
    try:
        copy = clone(model)
    except (NotImplementedError, ValueError, TypeError) as error:
        raise ValueError(
            f"model {model.name!r} cannot be copied for export ({error}). Export a Sequential "
            "or functional model whose layers can be rebuilt from their config (register "
            f"custom layers with {register}).") from error
    copy.set_weights(model.get_weights())
    return copy


def check_pruned(model, what="export_sparse_saved_model"):
    """Raises unless some prunable tensor of the plain ``model`` holds a zero."""
    tensors = [np.asarray(get_tensor(l, a)) for l, attrs in prunable_layers(model) for a in attrs]
    if not any(t.size and np.count_nonzero(t) < t.size for t in tensors):
        raise ValueError(
            f"{what}: model {model.name!r} has no pruned weight (no zero in any kernel or "
            "BN gamma), so a sparse form would only be larger. Prune it first "
            "(tf_stdprune.prune_low_std, train, strip_pruning), or export it dense with "
            "export_dense_saved_model / export_tflite(..., sparse=False).")


def check_sparse_compute(sparse_compute):
    if not (sparse_compute is True or sparse_compute is False or sparse_compute == "auto"):
        raise ValueError(f"sparse_compute must be 'auto', True or False, got "
                         f"{sparse_compute!r}.")


def export(model, path, overwrite, sparse, sparse_compute, world):
    """Writes the sparse or dense SavedModel of ``model`` to ``path`` (module docstring;
    the public functions' contract), the world-specific steps taken from ``world`` (a
    `World`)."""
    check_sparse_compute(sparse_compute)
    path = os.path.abspath(os.fspath(path))
    atomic_io.clean_temporaries(os.path.dirname(path), target_name=os.path.basename(path))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path!r} is a file; give the path of a directory for the "
                              "SavedModel (a new one, or an earlier export with overwrite=True).")
    copy = world.private_plain_copy(model)
    if sparse:
        check_pruned(copy)
    module = Serving(copy, sparse, sparse_compute, world.substituted)
    metadata = {"format": "tf_stdprune " + ("sparse" if sparse else "dense") + " SavedModel",
                "version": FORMAT_VERSION, "sparse_compute_layers": module.matmul}

    def save(temporary):
        tf.saved_model.save(module, temporary,
                            signatures={"serving_default": module.serving_function})
        with open(os.path.join(temporary, MARKER), "w") as f:
            json.dump(metadata, f, indent=2)

    return atomic_io.write_atomically(path, save, overwrite=overwrite, marker=MARKER)


def disk_size(path):
    """``{"bytes": size of the file or sum over the directory's files, "gzip_bytes": size
    of it as a .tar.gz}`` (tfmot's guide compares gzip sizes)."""
    total = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(path, arcname=os.path.basename(path))
    return {"bytes": total, "gzip_bytes": buffer.tell()}
