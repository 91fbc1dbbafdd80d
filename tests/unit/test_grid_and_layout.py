"""Pure math: the process grid (rank <-> coordinates, groups) and ZeRO's flat bucket layout."""

from __future__ import annotations

import pytest

from shardwise.comm import grid
from shardwise.zero.layout import build_layout


def test_grid_axis_order_puts_tensor_ranks_together() -> None:
    sizes = grid.resolve_sizes(8, pp=2, tp=2)
    assert sizes == {"pp": 2, "dp": 2, "sp": 1, "tp": 2}
    assert grid.axis_groups(["tp"], sizes) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert grid.axis_groups(["dp"], sizes) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert grid.axis_groups(["pp"], sizes) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    assert grid.axis_groups(["dp", "tp"], sizes) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    for rank in range(8):
        assert grid.rank_of(grid.coords_of(rank, sizes), sizes) == rank


def test_grid_errors_name_the_numbers() -> None:
    with pytest.raises(grid.GridError, match=r"world size 6 is not divisible by pipeline 4 x tensor 1 x sequence 1"):
        grid.resolve_sizes(6, pp=4)
    with pytest.raises(grid.GridError, match=r"= 8 != world size 4"):
        grid.resolve_sizes(4, dp=4, tp=2)


def test_hpz_chunk_and_peer_groups() -> None:
    groups = [tuple(range(8))]
    assert grid.chunk_groups(groups, 4) == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert grid.strided_groups(groups, 4) == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_layout_buckets_hold_whole_parameters_and_pad_to_the_world() -> None:
    layout = build_layout([10, 100, 7, 300, 5], bucket_numel=120, world=2, align=4)
    assert [b.params for b in layout.buckets] == [(0, 1, 2), (3,), (4,)]
    assert all(b.size % (2 * 4) == 0 for b in layout.buckets)
    assert layout.partition_numel * 2 == layout.total
    assert layout.used_numel == 422


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_every_element_is_owned_exactly_once(world: int) -> None:
    numels = [13, 64, 1, 250, 7, 33]
    layout = build_layout(numels, bucket_numel=100, world=world, align=2)
    for i, n in enumerate(numels):
        covered = []
        for rank in range(world):
            for start, end, part in layout.owned_pieces(i, rank):
                assert 0 <= part and part + (end - start) <= layout.partition_numel
                covered.extend(range(start, end))
                assert all(layout.owner_of(i, e) == rank for e in range(start, end))
        assert sorted(covered) == list(range(n))
