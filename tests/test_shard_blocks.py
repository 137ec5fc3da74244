"""The arithmetic under sharded 8-bit state, in one process: how a shard splits into whole blocks
and pieces of cut blocks, torch.chunk's rule, and the fact that makes cut blocks exact (a piece
of a block quantized with the whole block's absmax gets the whole block's codes)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lion8bit import quant
from lion8bit.shard_blocks import split
from lion8bit.sharded import FlatRange, chunk_range, runtime_blocks


@given(
    rows=st.integers(0, 300), row=st.integers(1, 700), shards=st.integers(1, 9),
    block_size=st.sampled_from([1, 64, 256, 4096]),
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
