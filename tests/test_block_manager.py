"""The block manager's contract: reservations make admission safe, blocks are taken as tokens arrive."""
import pytest

from hjcg.block_manager import BlockManager, BlockTable
from hjcg.kv_cache import TRASH_BLOCK


def test_blocks_are_taken_as_tokens_arrive_within_the_reservation():
    m = BlockManager(num_blocks=9, block_size=4)  # 8 usable blocks: 32 tokens
    table = BlockTable()
    assert m.can_reserve(32) and not m.can_reserve(33)
    m.reserve(table, 10)                      # 3 blocks reserved, none taken yet
    assert m.free_blocks == 8 and m.used_blocks == 0
    assert not m.can_reserve(21)              # 6 blocks left to reserve
    assert [i for i, _ in m.grow(table, 5)] == [0, 1]
    assert m.used_blocks == 2 and table.reserved == 1
    assert m.grow(table, 8) == []             # still inside two blocks
    m.grow(table, 10)
    with pytest.raises(RuntimeError, match="past its reservation"):
        m.grow(table, 13)
    assert TRASH_BLOCK not in table.blocks
    m.release(table)
    assert m.free_blocks == 8 and m.can_reserve(32) and table.blocks == [] and table.reserved == 0


def test_a_request_larger_than_the_pool_never_fits():
    m = BlockManager(num_blocks=3, block_size=16)
    assert m.fits_ever(32) and not m.fits_ever(33)


def test_released_blocks_are_reused():
    m = BlockManager(num_blocks=3, block_size=1)
    a, b = BlockTable(), BlockTable()
    m.reserve(a, 2)
    m.grow(a, 2)
    assert not m.can_reserve(1)
    m.release(a)
    m.reserve(b, 2)
    assert sorted(block for _, block in m.grow(b, 2)) == [1, 2]
