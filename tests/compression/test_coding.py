"""Huffman and gap coding against reference computations; the compressed file format."""
import hashlib
import heapq
import json
import os
import struct
import zlib

import numpy as np
import pytest

from tf_stdprune.compression import coding
from tf_stdprune.keras2.engine import keras
from tf_stdprune.compression.compressed_file import (CompressedFileError, compress, decompress,
                                         read_weights)
from tf_stdprune.keras2.quantize import quantize_weights, strip_quantization

from conftest import tiny_cnn
from conftest import zero_out


def optimal_cost(frequencies):
    """Bits of an optimal prefix code: the sum of the weights of all merged nodes."""
    heap = [int(f) for f in frequencies if f > 0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total if len(heap) and total else sum(heap)  # one symbol: 1 bit each


def reference_gap_count(positions, span):
    """Symbols of the gap stream, counted with a plain loop (fillers advance span-1)."""
    count, previous = 0, -1
    for p in positions:
        gap = p - previous
        while gap > span - 1:
            count, gap = count + 1, gap - (span - 1)
        count, previous = count + 1, p
    return count


@pytest.mark.parametrize("alphabet,seed", [(2, 0), (7, 1), (33, 2), (257, 3), (4097, 4)])
def test_code_lengths_are_optimal_and_complete(alphabet, seed):
    rng = np.random.default_rng(seed)
    frequencies = np.minimum(rng.zipf(1.3, size=alphabet), 10 ** 6) * (rng.random(alphabet) < 0.8)
    frequencies[:2] += 1  # at least two used symbols
    lengths = coding.code_lengths(frequencies, max_bits=64)
    assert int((frequencies * lengths.astype(np.int64)).sum()) == optimal_cost(frequencies)
    assert np.all((lengths > 0) == (frequencies > 0))
    assert sum(2.0 ** -int(l) for l in lengths if l) == 1.0  # Kraft equality


def test_length_limit_keeps_a_valid_code():
    fibonacci = [1, 1]
    while len(fibonacci) < 40:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    unlimited = coding.code_lengths(fibonacci, max_bits=64)
    limited = coding.code_lengths(fibonacci, max_bits=12)
    assert unlimited.max() == 39 and limited.max() <= 12 and limited.min() >= 1
    assert sum(2.0 ** -int(l) for l in limited) <= 1.0


def test_canonical_codes_are_prefix_free_and_ordered():
    lengths = coding.code_lengths(np.random.default_rng(5).integers(0, 50, 60))
    codes = coding.canonical_codes(lengths)
    used = [s for s in range(len(lengths)) if lengths[s]]
    words = {s: format(int(codes[s]), f"0{lengths[s]}b") for s in used}
    for a in used:
        assert not any(b != a and words[b].startswith(words[a]) for b in used)
    ordered = sorted(used, key=lambda s: (lengths[s], s))
    aligned = [int(codes[s]) << (32 - int(lengths[s])) for s in ordered]
    assert aligned == sorted(set(aligned))  # canonical: increasing in (length, symbol)


def test_huffman_round_trip_many_streams_in_one_decode():
    rng = np.random.default_rng(6)
    block = coding.BLOCK_SYMBOLS
    cases = [(0, 5), (1, 5), (block - 1, 3), (block, 1), (block + 1, 300),
             (3 * block + 5, 4097), (20000, 2)]
    streams, originals = [], []
    for count, alphabet in cases:
        symbols = rng.zipf(1.4, size=count) % alphabet
        lengths = coding.code_lengths(np.bincount(symbols, minlength=alphabet))
        data, bits, offsets = coding.huffman_encode(symbols, lengths)
        assert bits == int(lengths[symbols].astype(np.int64).sum())
        assert len(data) == (bits + 7) // 8 and len(offsets) == -(-count // block)
        streams.append((data, lengths, offsets, count))
        originals.append(symbols)
    for decoded, symbols in zip(coding.huffman_decode(streams), originals):
        np.testing.assert_array_equal(decoded, symbols)


def test_huffman_bits_match_a_string_reference():
    symbols = np.array([3, 0, 0, 1, 3, 3, 2, 0, 3, 3])
    lengths = coding.code_lengths(np.bincount(symbols))
    codes = coding.canonical_codes(lengths)
    text = "".join(format(int(codes[s]), f"0{lengths[s]}b") for s in symbols)
    data, bits, _ = coding.huffman_encode(symbols, lengths)
    assert bits == len(text)
    assert np.unpackbits(np.frombuffer(data, np.uint8))[:bits].tolist() == [int(c) for c in text]


@pytest.mark.parametrize("span", [2, 32, 256, 1024])
def test_relative_gaps_round_trip_with_fillers(span):
    rng = np.random.default_rng(span)
    positions = np.sort(rng.choice(5000, 300, replace=False))
    positions = np.concatenate([positions[positions < 2000], [2000 + 3 * span, 4999 + 5 * span]])
    symbols = coding.relative_gaps(positions, span)
    assert len(symbols) == reference_gap_count(positions, span)
    assert symbols.max() < span
    np.testing.assert_array_equal(coding.positions_from_gaps(symbols, span), positions)
    assert len(coding.relative_gaps(np.zeros(0, np.int64), span)) == 0


def _quantized_tiny():
    return strip_quantization(quantize_weights(zero_out(tiny_cnn(), 0.7), bits=4))


def test_compress_round_trip_is_bit_exact(tmp_path):
    model = _quantized_tiny()
    path = compress(model, tmp_path / "model.tfsp")
    restored = decompress(path)
    assert restored.to_json() == model.to_json()
    for expected, actual in zip(model.get_weights(), restored.get_weights()):
        assert expected.dtype == actual.dtype and expected.tobytes() == actual.tobytes()
    x = np.random.default_rng(7).normal(size=(4, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))
    assert os.listdir(tmp_path) == ["model.tfsp"]  # no temporary file left


def test_unquantized_tensors_are_lossless_and_negative_zero_reads_as_zero(tmp_path):
    model = keras.Sequential([keras.Input((80,)), keras.layers.Dense(80)])  # 6400 distinct
    kernel = model.layers[0].kernel.numpy()
    kernel[::3] = 0.0
    kernel[1, :5] = -0.0
    model.layers[0].kernel.assign(kernel)
    weights = read_weights(compress(model, tmp_path / "raw.tfsp"))
    np.testing.assert_array_equal(weights[0], kernel)
    assert not np.signbit(weights[0][1, :5]).any()
    np.testing.assert_array_equal(weights[1], model.layers[0].bias.numpy())


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    return compress(_quantized_tiny(), tmp_path_factory.mktemp("compressed") / "model.tfsp")


@pytest.mark.parametrize("change,message", [
    (lambda d: d.__delitem__(slice(-1, None)), "truncated"),
    (lambda d: d.__delitem__(slice(30, None)), "truncated"),
    (lambda d: d.extend(b"\0"), "padded"),
    (lambda d: d.__setitem__(len(d) - 10, d[len(d) - 10] ^ 0x01), "checksum"),
    (lambda d: d.__setitem__(200, d[200] ^ 0x80), "checksum"),
    (lambda d: d.__setitem__(slice(8, 10), struct.pack("<H", 2)), "version 2"),
    (lambda d: d.__setitem__(0, ord("P")), "magic"),
], ids=["cut-last-byte", "cut-to-30-bytes", "trailing-byte", "flip-near-end",
        "flip-in-metadata", "version-2", "bad-magic"])
def test_damaged_files_raise_a_clear_error(compressed, tmp_path, change, message):
    data = bytearray(open(compressed, "rb").read())
    assert len(data) > 200
    change(data)
    damaged = tmp_path / "damaged.tfsp"
    damaged.write_bytes(bytes(data))
    with pytest.raises(CompressedFileError, match=message):
        read_weights(damaged)
    with pytest.raises(CompressedFileError, match=message):
        decompress(damaged)


def test_compress_refuses_to_overwrite_unless_asked(tmp_path):
    first = _quantized_tiny()
    path = compress(first, tmp_path / "model.tfsp")
    second = strip_quantization(quantize_weights(zero_out(tiny_cnn(), 0.2, seed=1), bits=2))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        compress(second, path)
    assert read_weights(path)[0].tobytes() == first.get_weights()[0].tobytes()
    compress(second, path, overwrite=True)
    assert read_weights(path)[0].tobytes() == second.get_weights()[0].tobytes()
    with pytest.raises(ValueError, match="dense_index_bits"):
        compress(second, tmp_path / "other.tfsp", dense_index_bits=0)


def test_compress_into_a_missing_directory_names_it_and_creates_nothing(tmp_path):
    target = tmp_path / "missing" / "model.tfspz"
    with pytest.raises(FileNotFoundError, match=r"directory '.*missing' does not exist. Create"):
        compress(_quantized_tiny(), target)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("content", [[], ["keep.txt"]], ids=["empty", "non-empty"])
def test_compress_onto_a_directory_refuses_and_keeps_it(tmp_path, overwrite, content):
    target = tmp_path / "out"
    target.mkdir()
    for name in content:
        (target / name).write_text("the user's")
    with pytest.raises(IsADirectoryError, match=r"is a directory. Give the path of the file"):
        compress(_quantized_tiny(), target, overwrite=overwrite)
    assert sorted(os.listdir(target)) == content and os.listdir(tmp_path) == ["out"]


def test_index_bits_must_be_integers_not_bools(tmp_path):
    with pytest.raises(ValueError, match=r"dense_index_bits must be an integer >= 1.*True"):
        compress(_quantized_tiny(), tmp_path / "m.tfspz", dense_index_bits=True)
    with pytest.raises(ValueError, match=r"conv_index_bits must be an integer in \[1, 16\]"):
        compress(_quantized_tiny(), tmp_path / "m.tfspz", conv_index_bits=17)
    assert os.listdir(tmp_path) == []


def _unpack(path):
    """``(metadata, sections)`` of a valid file, read independently of the reader."""
    payload = open(path, "rb").read()[52:]
    (size,) = struct.unpack_from("<Q", payload)
    return json.loads(zlib.decompress(payload[8:8 + size])), bytearray(payload[8 + size:])


def _repack(metadata, sections, path):
    """A file with a valid header and checksum around ``metadata`` and ``sections``."""
    text = zlib.compress(json.dumps(metadata).encode("utf-8"))
    payload = struct.pack("<Q", len(text)) + text + bytes(sections)
    header = struct.pack("<8sHHQ32s", b"\x89TFSPZ\r\n", 1, 0, len(payload),
                         hashlib.sha256(payload).digest())
    path.write_bytes(header + payload)
    return path


def _sparse(m):
    return next(t for t in m["tensors"] if t["encoding"] == "sparse")


def _raw(m):
    return next(t for t in m["tensors"] if t["encoding"] == "raw")


def _zero_codebook(m, s):
    offset = _sparse(m)["codebook"][0]
    _sparse(m)["codebook"] = [offset, 8]  # 2 values left; the indices go up to 15


INCONSISTENT = {
    "raw-shape-larger-than-its-section": lambda m, s: _raw(m).update(shape=[5]),
    "sparse-size-not-its-shape": lambda m, s: _sparse(m).update(size=3),
    "section-out-of-range": lambda m, s: _raw(m).update(data=[10 ** 12, 4]),
    "negative-section-length": lambda m, s: _raw(m).update(data=[0, -4]),
    "index-out-of-codebook-range": _zero_codebook,
    "index-bits-70": lambda m, s: _sparse(m).update(index_bits=70),
    "index-bits-0": lambda m, s: _sparse(m).update(index_bits=0),
    "index-bits-not-the-gap-alphabet": lambda m, s: _sparse(m).update(index_bits=7),
    "nonzeros-not-the-gap-stream": lambda m, s: _sparse(m).update(nonzeros=1),
    "a-tensor-missing": lambda m, s: m["tensors"].pop(),
    "raw-dtype-not-the-model's": lambda m, s: _raw(m).update(dtype="<i4"),
    "model-config-unreadable": lambda m, s: m.update(model_config="{}"),
    "unknown-encoding": lambda m, s: _raw(m).update(encoding="zip"),
}


@pytest.mark.parametrize("change", INCONSISTENT.values(), ids=INCONSISTENT.keys())
def test_valid_checksum_with_inconsistent_contents_raises_compressed_file_error(
        compressed, tmp_path, change):
    metadata, sections = _unpack(compressed)
    control = _repack(metadata, sections, tmp_path / "control.tfspz")
    assert [a.tobytes() for a in read_weights(control)] == [
        a.tobytes() for a in read_weights(compressed)]  # the re-packing itself is faithful
    change(metadata, sections)
    damaged = _repack(metadata, sections, tmp_path / "damaged.tfspz")
    with pytest.raises(CompressedFileError, match="damaged.tfspz: "):
        decompress(damaged)
