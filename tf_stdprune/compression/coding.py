"""Relative-index (gap) coding and canonical Huffman coding of sparse tensors, in numpy.

Sparse positions, as in Deep Compression (Han et al., 2016, section 2): the positions
``p_0 < p_1 < ...`` of the nonzeros of a flattened tensor are stored as gaps
``d_i = p_i - p_{i-1}`` (``p_{-1} = -1``) in ``k``-bit symbols of span ``S = 2^k``:

    symbol g in [1, S-1]:  the next nonzero is g positions after the previous one;
    symbol 0 (filler):     advance S-1 positions without a nonzero.

A gap ``d`` therefore costs ``floor((d-1) / (S-1))`` fillers and one symbol
``d - fillers * (S-1)``. Unlike the paper, fillers live in the gap stream only, so the
value (cluster index) stream holds exactly one symbol per nonzero.

Huffman coding: code lengths from symbol frequencies with a heap (ties broken by node id,
so codes are deterministic), limited to ``MAX_CODE_BITS`` by halving the frequencies until
they fit; canonical codes (sorted by ``(length, symbol)``). Only the lengths are stored.
The encoder records the bit offset of every ``BLOCK_SYMBOLS``-th symbol so the decoder can
run all blocks of all streams in lockstep, one table lookup per block and step: the
Python loop runs ``BLOCK_SYMBOLS`` times whatever the number of symbols.
"""
import heapq

import numpy as np

MAX_CODE_BITS = 20
BLOCK_SYMBOLS = 2048


def relative_gaps(positions, span):
    """The gap symbols (see module docstring) of sorted flat ``positions``, span ``S``.

    Returns uint8 symbols for ``S <= 256``, else uint16.
    """
    if not 2 <= span <= 2 ** 16:
        raise ValueError(f"span must be in [2, 65536] (2^index_bits), got {span!r}.")
    step = span - 1
    gaps = np.diff(np.asarray(positions, np.int64), prepend=-1)
    fillers = (gaps - 1) // step
    symbols = np.zeros(len(gaps) + int(fillers.sum()), np.uint8 if span <= 256 else np.uint16)
    symbols[np.cumsum(fillers + 1) - 1] = gaps - fillers * step
    return symbols


def positions_from_gaps(symbols, span):
    """Inverse of `relative_gaps`: ``p = cumsum(advance) - 1`` at the non-filler symbols,
    where ``advance = symbol`` or ``S-1`` for a filler."""
    symbols = np.asarray(symbols)
    advance = np.where(symbols == 0, span - 1, symbols).astype(np.int64)
    return (np.cumsum(advance) - 1)[symbols != 0]


def _unlimited_code_lengths(frequencies):
    """Huffman code lengths: merge the two lightest nodes until one is left."""
    used = np.flatnonzero(frequencies)
    lengths = np.zeros(len(frequencies), np.uint8)
    if len(used) == 1:
        lengths[used] = 1
    if len(used) <= 1:
        return lengths
    heap = [(int(frequencies[s]), int(s)) for s in used]
    heapq.heapify(heap)
    parent, next_id = {}, len(frequencies)
    while len(heap) > 1:
        (f1, a), (f2, b) = heapq.heappop(heap), heapq.heappop(heap)
        parent[a] = parent[b] = next_id
        heapq.heappush(heap, (f1 + f2, next_id))
        next_id += 1
    depth = {next_id - 1: 0}
    for node in range(next_id - 2, len(frequencies) - 1, -1):  # internal nodes, root first
        depth[node] = depth[parent[node]] + 1
    for s in used:
        lengths[s] = depth[parent[int(s)]] + 1
    return lengths


def code_lengths(frequencies, max_bits=MAX_CODE_BITS):
    """Huffman code length of every symbol (0 for unused ones), at most ``max_bits``.

    If the optimal code is longer, frequencies ``f`` become ``max(1, f // 2)`` (used
    symbols stay used) until it fits; all-equal frequencies always fit when the alphabet
    has at most ``2^max_bits`` used symbols.
    """
    frequencies = np.asarray(frequencies, np.int64)
    if np.count_nonzero(frequencies) > 2 ** max_bits:
        raise ValueError(f"at most 2^{max_bits} distinct symbols can be coded.")
    lengths = _unlimited_code_lengths(frequencies)
    while lengths.max(initial=0) > max_bits:
        frequencies = np.where(frequencies > 0, np.maximum(1, frequencies // 2), 0)
        lengths = _unlimited_code_lengths(frequencies)
    return lengths


def canonical_codes(lengths):
    """Canonical Huffman codes: by ``(length, symbol)``, ``code_{i+1} = (code_i + 1) <<
    (len_{i+1} - len_i)`` starting at 0. Returns uint32 codes (0 for unused symbols)."""
    lengths = np.asarray(lengths)
    codes = np.zeros(len(lengths), np.uint32)
    used = np.flatnonzero(lengths)
    code, previous = 0, 0
    for s in used[np.lexsort((used, lengths[used]))]:
        code <<= int(lengths[s]) - previous
        previous = int(lengths[s])
        codes[s] = code
        code += 1
    return codes


def huffman_encode(symbols, lengths, block=BLOCK_SYMBOLS):
    """Encodes ``symbols`` with the canonical code of ``lengths``.

    Returns ``(data, bit_count, offsets)``: the bits packed MSB first, their number, and
    the bit offset of symbols ``0, block, 2*block, ...`` (int64).
    """
    symbols = np.asarray(symbols, np.int64)
    if len(symbols) and lengths[symbols].min() == 0:
        raise ValueError("a symbol to encode has no code (frequency 0 in `lengths`).")
    codes = canonical_codes(lengths).astype(np.float64)[symbols]
    sizes = np.asarray(lengths, np.int64)[symbols]
    ends = np.cumsum(sizes)
    starts = ends - sizes
    bit_count = int(ends[-1]) if len(ends) else 0
    # Code i covers bits [off, off + len) of 32-bit word starts >> 5 and maybe the next:
    # x = code * 2^(32 - off - len) splits exactly (float64) into an integer part for the
    # word and a fraction for the next one. Codes never overlap, so the sums are ORs.
    x = np.ldexp(codes, (32 - (starts & 31) - sizes).astype(np.int32))
    high = np.floor(x)
    n_words = (bit_count + 31) // 32 + 1
    words = (np.bincount(starts >> 5, weights=high, minlength=n_words)
             + np.bincount((starts >> 5) + 1, weights=(x - high) * 2.0 ** 32, minlength=n_words))
    data = words.astype(">u4").tobytes()[:(bit_count + 7) // 8]
    return data, bit_count, starts[::block]


def _decode_table(lengths):
    """``(symbol, length)`` of every ``L``-bit window, ``L`` = the longest code."""
    lengths = np.asarray(lengths, np.int64)
    longest = int(lengths.max(initial=1))
    codes = canonical_codes(lengths).astype(np.int64)
    used = np.flatnonzero(lengths)
    span = 1 << (longest - lengths[used])
    firsts = codes[used] << (longest - lengths[used])
    symbol_table = np.zeros(1 << longest, np.int32)
    length_table = np.zeros(1 << longest, np.int64)
    rows = np.repeat(firsts, span) + np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
    symbol_table[rows] = np.repeat(used, span)
    length_table[rows] = np.repeat(lengths[used], span)
    return symbol_table, length_table, longest


def huffman_decode(streams, block=BLOCK_SYMBOLS):
    """Decodes several streams at once; each is ``(data, lengths, offsets, count)``.

    Every block of ``block`` symbols starts at its stored bit offset; at step ``t`` the
    ``t``-th symbol of every block still running is looked up in its stream's table
    from the 32 bits at its position. Returns one int32 array per stream.
    """
    tables, chunks, blocks = [], [], []  # blocks: (count, bit position, table index)
    base_bits = 0
    for data, lengths, offsets, count in streams:
        tables.append(_decode_table(lengths))
        starts = np.arange(0, count, block)
        expected = len(starts)
        if len(offsets) != expected:
            raise ValueError(f"a stream of {count} symbols needs {expected} block offsets, "
                             f"got {len(offsets)}.")
        blocks += [(min(block, count - s), base_bits + int(o), len(tables) - 1)
                   for s, o in zip(starts, offsets)]
        chunks.append(np.frombuffer(data, np.uint8))
        base_bits += 8 * len(data)
    buffer = np.concatenate(chunks + [np.zeros(8, np.uint8)]).astype(np.uint64)
    table_starts = np.cumsum([0] + [len(t[0]) for t in tables])
    symbol_table = np.concatenate([t[0] for t in tables] or [np.zeros(0, np.int32)])
    length_table = np.concatenate([t[1] for t in tables] or [np.zeros(0, np.int64)])
    # Blocks ordered by decreasing count, so the running ones are always a prefix.
    order = sorted(range(len(blocks)), key=lambda i: -blocks[i][0])
    counts = np.array([blocks[i][0] for i in order], np.int64)
    position = np.array([blocks[i][1] for i in order], np.int64)
    table = np.array([blocks[i][2] for i in order], np.int64)
    width = np.array([t[2] for t in tables], np.int64)[table] if len(order) else table
    base = table_starts[table] if len(order) else table
    out = np.zeros((len(order), block), np.int32)
    running = np.searchsorted(-counts, -np.arange(block), side="left")  # counts > t
    for t in range(int(counts.max(initial=0))):
        n = running[t]
        byte, shift = position[:n] >> 3, (position[:n] & 7).astype(np.uint64)
        word = ((buffer[byte] << 32) | (buffer[byte + 1] << 24) | (buffer[byte + 2] << 16)
                | (buffer[byte + 3] << 8) | buffer[byte + 4])
        bits32 = (word >> (np.uint64(8) - shift)) & np.uint64(0xFFFFFFFF)
        row = base[:n] + (bits32 >> (32 - width[:n]).astype(np.uint64)).astype(np.int64)
        out[:n, t] = symbol_table[row]
        position[:n] += length_table[row]
    decoded = [None] * len(blocks)
    for k, i in enumerate(order):
        decoded[i] = out[k, :counts[k]]
    results, first = [], 0
    for _, _, offsets, count in streams:
        parts = decoded[first:first + len(offsets)]
        results.append(np.concatenate(parts) if parts else np.zeros(0, np.int32))
        first += len(offsets)
    return results
