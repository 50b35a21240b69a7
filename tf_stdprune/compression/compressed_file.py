"""`compress` / `decompress`: a pruned (and quantized) model in one Huffman-coded file.

Every prunable tensor (kernels, BN gammas) is stored sparsely: its gap symbols
(`coding.relative_gaps`, span ``2^k`` with ``k`` index bits: 8 for conv and BN, 5 for
dense, as Deep Compression) are Huffman coded; its nonzero values are either a float32
codebook of the ``K <= 2^12`` distinct nonzero values plus Huffman-coded indices into it
(a quantized model), or raw float32 values. All other tensors (biases, BN beta and moving
statistics) are raw bytes. Lossless: a zero is stored as +0.0 (so -0.0 reads back as +0.0),
every other float32 bit for bit.

File layout (version 1, little-endian)::

    0   8 bytes   magic  b"\\x89TFSPZ\\r\\n"
    8   uint16    format version
    10  uint16    reserved, 0
    12  uint64    payload length
    20  32 bytes  SHA-256 of the payload
    52  payload:  uint64 metadata length, metadata (zlib-compressed UTF-8 JSON: the Keras
                  model JSON and one entry per tensor in ``model.get_weights()`` order),
                  binary sections
                  (referenced from the metadata as ``[offset, length]``).

A file whose checksum is valid but whose contents contradict themselves (a section out
of range or of the wrong length, a shape that does not match the stored values, a
cluster index outside its codebook, tensors that do not fit the stored model) raises
`CompressedFileError`, as does a damaged one.
"""
import hashlib
import json
import os
import struct
import zlib

import numpy as np

from tf_stdprune.compression import coding
from tf_stdprune.io import write_atomically
from tf_stdprune.dispatch import KERAS3, TF_KERAS, keras_module, module_for, world_of
from tf_stdprune.registry import get_tensor, layer_kind
from tf_stdprune.report import prunable_layers
from tf_stdprune.validate import check_int

MAGIC = b"\x89TFSPZ\r\n"
VERSION = 1
_HEADER = struct.Struct("<8sHHQ32s")
HEADER_BYTES = _HEADER.size
_LENGTH = struct.Struct("<Q")
MAX_CODEBOOK_BITS = 12
MAX_INDEX_BITS = 16


class CompressedFileError(ValueError):
    """The file is not a valid compressed model: wrong magic or version, truncated,
    corrupted (checksum mismatch) or inconsistent."""


class _Sections:
    """Binary sections appended one after the other, referenced as ``[offset, length]``."""

    def __init__(self, blob=b""):
        self.parts, self.size, self.blob = [], 0, blob

    def add(self, data):
        data = bytes(data)
        self.parts.append(data)
        self.size += len(data)
        return [self.size - len(data), len(data)]

    def get(self, ref, dtype=np.uint8, count=None):
        """The section ``ref = [offset, length]`` as ``dtype``; with ``count``, it must
        hold exactly ``count`` items."""
        offset, length = ref
        if not all(isinstance(v, int) and v >= 0 for v in (offset, length)) \
                or offset + length > len(self.blob):
            raise CompressedFileError(f"the section {ref!r} points outside the file.")
        itemsize = np.dtype(dtype).itemsize
        if length % itemsize or (count is not None and length != count * itemsize):
            expected = "" if count is None else f", not {count} of them"
            raise CompressedFileError(f"the section {ref!r} does not hold whole "
                                      f"{np.dtype(dtype).name} values{expected}.")
        return np.frombuffer(self.blob, dtype, length // itemsize, offset)


def _stream(symbols, alphabet, sections):
    """Huffman-codes ``symbols`` (in ``[0, alphabet)``) into sections; returns its entry."""
    lengths = coding.code_lengths(np.bincount(symbols, minlength=alphabet))
    data, bits, offsets = coding.huffman_encode(symbols, lengths)
    return {"count": len(symbols), "bits": int(bits),
            "lengths": sections.add(lengths.astype(np.uint8).tobytes()),
            "offsets": sections.add(offsets.astype("<i8").tobytes()),
            "data": sections.add(data)}


def _encode_sparse(array, index_bits, sections, where):
    """The entry of a prunable tensor (module docstring); ``where`` names it in errors."""
    flat = np.ascontiguousarray(array, np.float32).ravel()
    bad = np.count_nonzero(~np.isfinite(flat))
    if bad:
        raise ValueError(f"{where}: {bad} of {flat.size} weights are NaN or inf; only "
                         "finite weights can be compressed. Training has diverged: go back "
                         "to a checkpoint with finite weights.")
    positions = np.flatnonzero(flat)
    gaps = coding.relative_gaps(positions, 2 ** index_bits)
    entry = {"encoding": "sparse", "size": flat.size, "nonzeros": len(positions),
             "index_bits": int(index_bits), "gaps": _stream(gaps, 2 ** index_bits, sections)}
    codebook, indices = np.unique(flat[positions], return_inverse=True)
    if len(codebook) <= 2 ** MAX_CODEBOOK_BITS:
        entry["codebook"] = sections.add(codebook.astype("<f4").tobytes())
        entry["indices"] = _stream(indices.ravel(), max(len(codebook), 1), sections)
    else:
        entry["values"] = sections.add(flat[positions].astype("<f4").tobytes())
    return entry


def _check_index_bits(index_bits):
    for kind, bits in index_bits.items():
        where = f"{kind}_index_bits"
        check_int(bits, where, 1, f"at most {MAX_INDEX_BITS}: gap symbols span 2^bits")
        if bits > MAX_INDEX_BITS:
            raise ValueError(f"{where} must be an integer in [1, {MAX_INDEX_BITS}], got {bits!r}.")


def serialize(model, conv_index_bits=8, dense_index_bits=5, bn_index_bits=8):
    """``(metadata, payload bytes)`` of a tf_keras or Keras 3 ``model`` (see `compress`)."""
    model = module_for(model, "quantize", "compress").plain_model(model)
    index_bits = {"conv": conv_index_bits, "dense": dense_index_bits, "bn": bn_index_bits}
    _check_index_bits(index_bits)
    prunable = {}
    for layer, attributes in prunable_layers(model):
        for attribute in attributes:
            prunable[id(get_tensor(layer, attribute))] = (layer.name, layer_kind(layer))
    sections, tensors = _Sections(), []
    for variable in model.weights:
        array = np.asarray(variable)
        # Keras 3 names a tensor by its path (``transformer_layer_0/.../kernel``), tf_keras
        # by its scoped name (``dense/kernel:0``)
        name = getattr(variable, "path", variable.name)
        entry = {"name": name, "shape": list(array.shape), "dtype": array.dtype.str}
        if id(variable) in prunable and array.dtype == np.float32:
            layer, kind = prunable[id(variable)]
            entry.update(layer=layer, kind=kind, **_encode_sparse(
                array, index_bits.get(kind, conv_index_bits), sections,
                f"Layer {layer!r}, tensor {name!r}"))
        else:
            entry.update(encoding="raw", data=sections.add(np.ascontiguousarray(array).tobytes()))
        tensors.append(entry)
    metadata = {"model_config": model.to_json(), "keras": world_of(model), "tensors": tensors}
    text = zlib.compress(json.dumps(metadata).encode("utf-8"), 9)
    return metadata, _LENGTH.pack(len(text)) + text + b"".join(sections.parts)


def _check_target(path):
    """Raises a clear error if ``path`` cannot name the file to write."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"Cannot write {path!r}: the directory {directory!r} does not exist. Create it "
            "first (os.makedirs), or give a path in an existing directory.")
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"Cannot write {path!r}: it is a directory. Give the path of the file to write "
            f"in it, e.g. {os.path.join(path, 'model.tfspz')!r}.")
    return path


def compress(model, path, overwrite=False, conv_index_bits=8, dense_index_bits=5,
             bn_index_bits=8):
    """Writes ``model`` (stripped, or with pruning/quantization wrappers) to one file.

    ``*_index_bits`` = ``k``, the gap symbol width per layer kind (span ``2^k``). Written
    atomically (`tf_stdprune.io.write_atomically`); an existing ``path`` raises
    `FileExistsError` unless ``overwrite``, a directory or a missing parent directory
    raises before anything is encoded. ``model`` is not changed. Returns the absolute path.
    By convention the file's extension is ``.tfspz``.
    """
    path = _check_target(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it.")
    _, payload = serialize(model, conv_index_bits, dense_index_bits, bn_index_bits)
    header = _HEADER.pack(MAGIC, VERSION, 0, len(payload), hashlib.sha256(payload).digest())

    def save(temporary):
        with open(temporary, "wb") as f:
            f.write(header + payload)
            f.flush()
            os.fsync(f.fileno())

    return write_atomically(path, save, overwrite)


def _read(path):
    """``(metadata, sections)`` of a verified file; `CompressedFileError` otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size:
        raise CompressedFileError(f"{path}: truncated ({len(data)} bytes, shorter than the "
                                  f"{_HEADER.size}-byte header).")
    magic, version, _, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CompressedFileError(f"{path}: not a tf_stdprune compressed model (bad magic).")
    if version != VERSION:
        raise CompressedFileError(f"{path}: format version {version}; this tf_stdprune reads "
                                  f"version {VERSION} only.")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise CompressedFileError(f"{path}: truncated or padded: the payload has "
                                  f"{len(payload)} bytes, the header says {length}.")
    if hashlib.sha256(payload).digest() != digest:
        raise CompressedFileError(f"{path}: corrupted: the SHA-256 checksum does not match.")
    (size,) = _LENGTH.unpack_from(payload)
    try:
        text = zlib.decompress(payload[_LENGTH.size:_LENGTH.size + size])
        metadata = json.loads(text.decode("utf-8"))
    except (ValueError, zlib.error) as error:
        raise CompressedFileError(f"{path}: unreadable metadata ({error}).") from None
    return metadata, _Sections(payload[_LENGTH.size + size:])


def read_metadata(path):
    """The verified metadata of a compressed file (model JSON, per-tensor entries)."""
    return _read(path)[0]


def _fail(entry, problem):
    raise CompressedFileError(f"tensor {entry.get('name')!r}: {problem}.")


def _check_entry(entry):
    """Checks the fields of a tensor entry that decoding relies on; returns its size."""
    shape = entry["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        _fail(entry, f"invalid shape {shape!r}")
    size = int(np.prod(shape, dtype=np.int64))
    if entry["encoding"] == "raw":
        np.dtype(entry["dtype"])  # TypeError for a name numpy does not know
        return size
    if entry["encoding"] != "sparse":
        _fail(entry, f"unknown encoding {entry['encoding']!r}")
    if entry["dtype"] != np.dtype(np.float32).str or entry["size"] != size:
        _fail(entry, f"a sparse tensor must be float32 of size {size} (its shape), got "
                     f"{entry['dtype']!r} of size {entry['size']!r}")
    bits = entry["index_bits"]
    if not isinstance(bits, int) or not 1 <= bits <= MAX_INDEX_BITS:
        _fail(entry, f"index_bits must be in [1, {MAX_INDEX_BITS}], got {bits!r}")
    if entry["gaps"]["lengths"][1] != 2 ** bits:
        _fail(entry, f"the gap code has {entry['gaps']['lengths'][1]} symbols, not 2^{bits}")
    if not isinstance(entry["nonzeros"], int) or not 0 <= entry["nonzeros"] <= size:
        _fail(entry, f"{entry['nonzeros']!r} nonzeros do not fit {size} weights")
    return size


def _stream_input(entry, sections):
    return (sections.get(entry["data"]).tobytes(), sections.get(entry["lengths"]),
            sections.get(entry["offsets"], "<i8"), entry["count"])


def _sparse_values(entry, sections, decoded):
    """The nonzero values of a sparse entry: codebook[indices], or the raw values."""
    count = entry["nonzeros"]
    if "codebook" not in entry:
        return sections.get(entry["values"], "<f4", count)
    codebook = sections.get(entry["codebook"], "<f4")
    indices = next(decoded)
    if len(indices) != count:
        _fail(entry, f"{len(indices)} cluster indices for {count} nonzeros")
    if count and indices.max() >= len(codebook):
        _fail(entry, f"cluster index {indices.max()} is outside its {len(codebook)}-value "
                     "codebook")
    return codebook[indices]


def _decode(metadata, sections):
    tensors = metadata["tensors"]
    sizes = [_check_entry(t) for t in tensors]
    streams = [_stream_input(t[key], sections) for t in tensors if t["encoding"] == "sparse"
               for key in ("gaps", "indices") if key in t]
    decoded = iter(coding.huffman_decode(streams))
    weights = []
    for entry, size in zip(tensors, sizes):
        if entry["encoding"] == "raw":
            array = sections.get(entry["data"], np.dtype(entry["dtype"]), size)
            weights.append(array.reshape(entry["shape"]).copy())
            continue
        positions = coding.positions_from_gaps(next(decoded), 2 ** entry["index_bits"])
        if len(positions) != entry["nonzeros"] or (len(positions) and positions[-1] >= size):
            _fail(entry, f"the gap stream gives {len(positions)} positions up to "
                         f"{positions[-1] if len(positions) else -1}, not {entry['nonzeros']} "
                         f"nonzeros in {size} weights")
        flat = np.zeros(size, np.float32)
        flat[positions] = _sparse_values(entry, sections, decoded)
        weights.append(flat.reshape(entry["shape"]))
    return weights


def _read_weights(path):
    metadata, sections = _read(path)
    try:
        return metadata, _decode(metadata, sections)
    except CompressedFileError as error:
        raise CompressedFileError(f"{path}: inconsistent contents: {error}") from None
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as error:
        raise CompressedFileError(f"{path}: inconsistent contents ({error!r}).") from None


def read_weights(path):
    """The model's weights (``model.get_weights()`` order) as numpy arrays."""
    return _read_weights(path)[1]


def _keras_of(metadata):
    """The Keras that wrote the file: its ``"keras"`` entry; a file without one holds a
    model JSON that Keras 3 marks ``"module": "keras"`` (tf_keras does not)."""
    written_by = metadata.get("keras")
    if written_by not in (KERAS3, TF_KERAS):
        keras3 = json.loads(metadata["model_config"]).get("module") == "keras"
        written_by = KERAS3 if keras3 else TF_KERAS
    return keras_module(written_by)


def _model(path, metadata, weights, custom_objects):
    """The stored model with ``weights`` set; `CompressedFileError` if they do not fit."""
    try:
        model = _keras_of(metadata).models.model_from_json(
            metadata["model_config"], custom_objects=custom_objects)
    except (KeyError, TypeError, ValueError) as error:
        raise CompressedFileError(f"{path}: the stored model cannot be rebuilt ({error!r}); "
                                  "a custom layer needs custom_objects.") from None
    expected = [(tuple(w.shape), np.dtype(getattr(w.dtype, "as_numpy_dtype", w.dtype)).type)
                for w in model.weights]
    stored = [(a.shape, a.dtype.type) for a in weights]
    if stored != expected:
        first = next((i for i, (a, b) in enumerate(zip(stored, expected)) if a != b),
                     min(len(stored), len(expected)))
        raise CompressedFileError(
            f"{path}: inconsistent contents: the stored model has {len(expected)} weights, "
            f"the file holds {len(stored)}; the first that differs is #{first}: model "
            f"{expected[first] if first < len(expected) else None}, file "
            f"{stored[first] if first < len(stored) else None}.")
    model.set_weights(weights)
    return model


def decompress(path, custom_objects=None):
    """The model (tf_keras or Keras 3, as it was written) rebuilt from the stored JSON with
    `read_weights` set.

    A custom layer class must be registered with Keras or passed in ``custom_objects``.
    """
    metadata, weights = _read_weights(path)
    return _model(path, metadata, weights, custom_objects)
