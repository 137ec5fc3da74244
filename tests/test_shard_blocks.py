"""The arithmetic under sharded 8-bit and 4-bit state, in one process: how a shard splits into
whole blocks and pieces of cut blocks, torch.chunk's rule, where a shard's packed 4-bit codes
sit, and the fact that makes cut blocks exact (a piece of a block quantized with the whole
block's absmax gets the whole block's codes)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lion8bit import quant
from lion8bit.shard_blocks import _codes, split
from lion8bit.sharded import FlatRange, chunk_range, covered, runtime_blocks


@given(
    rows=st.integers(0, 300), row=st.integers(1, 700), shards=st.integers(1, 9),
    block_size=st.sampled_from([1, 32, 64, 256, 4096]),
)
def test_a_shard_splits_into_whole_blocks_and_pieces_of_cut_blocks(rows, row, shards, block_size):
    numel, B = rows * row, block_size
    for index in range(shards):
        low, high = chunk_range(0, rows, shards, index)
        shard = FlatRange(low * row, high * row, numel)
        (start, end), edges = split(shard, B)
        assert start % B == 0 and start <= end
        pieces = sorted([(start, end)] * (end > start) + edges)
        covered = [e for a, b in pieces for e in range(a, b)]
        assert covered == list(range(shard.start, shard.end))  # a partition of the shard, in order
        if end > start:  # whole blocks: each ends on a block boundary or at the parameter's end
            assert end % B == 0 or end == numel
        for a, b in edges:
            assert a // B == (b - 1) // B  # within one block ...
            whole = (a // B * B, min(a // B * B + B, numel))
            assert (a, b) != whole  # ... that the shard does not hold whole
        first, stop = runtime_blocks(shard, B)
        assert stop - first == len({e // B for e in covered})  # the local absmax: the blocks it touches


@pytest.mark.parametrize("length", [0, 1, 5, 64, 81, 200, 257])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 7])
def test_chunk_range_is_torch_chunk(length, chunks):
    pieces = torch.arange(length).chunk(chunks)
    expected = [(int(p[0]), int(p[-1]) + 1) for p in pieces if p.numel()]
    found = [chunk_range(0, length, chunks, i) for i in range(chunks)]
    assert [r for r in found if r[0] < r[1]] == expected
    assert all(r[0] == r[1] == length for r in found[len(expected):])  # the empty ones sit at the end


@pytest.mark.parametrize("cut", [1, 100, 255])
@pytest.mark.parametrize("scale", [1.0, 1e-40, 0.0])  # 1e-40: a subnormal absmax
def test_pieces_of_a_block_quantized_with_its_absmax_get_the_whole_blocks_codes(cut, scale):
    values = torch.randn(256, generator=torch.Generator().manual_seed(cut)) * scale
    codes, absmax = quant.quantize_blockwise(values, 256)
    pieces = [values[:cut], values[cut:]]
    maxima = torch.stack([piece.abs().amax() for piece in pieces])
    assert torch.equal(maxima.max().reshape(1), absmax)
    assert torch.equal(torch.cat([quant.quantize_with_absmax(p, absmax, 256) for p in pieces]), codes)


@given(rows=st.integers(0, 120), row=st.integers(1, 75), shards=st.integers(1, 9), seed=st.integers(0, 99))
def test_a_shards_4bit_codes_are_the_packed_bytes_of_its_blocks_whatever_its_offset(rows, row, shards, seed):
    """The local codes hold the packed bytes of whole blocks of 32 (so they start on a byte for
    odd shard offsets too), and the interior's bytes among them are the bytes of the interior's
    codes: what the backend steps is a packed tensor of its own."""
    numel, B = rows * row, quant.BLOCK_SIZE_4BIT
    values = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    packed, _ = quant.quantize_4bit(values)
    for index in range(shards):
        low, high = chunk_range(0, rows, shards, index)
        shard = FlatRange(low * row, high * row, numel)
        start, end = covered(shard, B)
        first, stop = runtime_blocks(shard, B)
        assert (start, end) == (first * B, min(stop * B, numel))
        assert start <= shard.start <= shard.end <= end or start == end == 0 == shard.end - shard.start
        local = packed[start // 2 : quant.packed_size(end)]  # what this shard holds
        assert local.numel() == quant.packed_size(end - start)
        (inner_start, inner_end), _ = split(shard, B)
        inside = slice(max(inner_start - shard.start, 0), max(inner_end - shard.start, 0))
        expected = packed[inner_start // 2 : quant.packed_size(inner_end)] if inner_end > inner_start else packed[:0]
        assert torch.equal(local[_codes("4bit", inside, shard, B)], expected)


@pytest.mark.parametrize("cuts", [[1], [15], [16, 17], [7, 20, 31], [1, 2, 3]])
@pytest.mark.parametrize("scale", [1.0, 1e-40, 0.0])
@pytest.mark.parametrize("numel", [32, 23])  # a whole block; a last, partial one of odd length
def test_pieces_of_a_4bit_block_coded_with_its_absmax_and_own_bits_get_the_whole_blocks_bytes(cuts, scale, numel):
    """Shards cut a block at any element, odd ones inside a byte; each piece codes its elements
    with the block's absmax (the max over pieces, rounded up to bf16) and the bits of their
    whole-parameter indices, zero elsewhere; the sum over pieces, packed, is the block's bytes."""
    cuts = [c for c in cuts if c < numel]
    offset = 64  # the block's first element in the whole parameter: bits are keyed on it
    values = torch.randn(numel, generator=torch.Generator().manual_seed(numel + len(cuts))) * scale
    bits = quant.random_bits(12345, numel, "cpu", offset)
    whole_packed, whole_absmax = quant.quantize_4bit(values, bits)
    bounds = [0, *cuts, numel]
    pieces = list(zip(bounds[:-1], bounds[1:], strict=True))
    maximum = torch.stack([values[a:b].abs().amax() for a, b in pieces]).amax().reshape(1)
    absmax = quant.round_up_to_bf16(maximum)
    assert torch.equal(absmax, whole_absmax)
    summed = torch.zeros(numel, dtype=torch.uint8)
    for a, b in pieces:
        own_bits = quant.random_bits(12345, b - a, "cpu", offset + a)
        row = torch.zeros(numel, dtype=torch.uint8)
        row[a:b] = quant.codes_4bit_with_absmax(values[a:b], absmax, own_bits)
        summed += row
    assert torch.equal(quant.pack_nibbles(summed), whole_packed)
