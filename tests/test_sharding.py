"""Work plan, counter-based seeds and array chunking (DESIGN.md section 3); pure numpy, no torch."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpcluster.sharding import (ESTIMATION, SELECTION, BatchStates, balanced_ranges, build_units, check_batching,
                                make_plan, split_array, unit_batches)
from cpcluster.util.errors import InputError


def _units_by_loops(images, n0, n, block_size, mode):
    rows = []
    for i in images:
        if mode == "certify":
            rows.append([i, 0, 0, n0])
        done, b = 0, 0
        while done < n:
            size = min(block_size, n - done)
            rows.append([i, 1, b, size])
            done += size
            b += 1
    return np.asarray(rows, dtype=np.int64)


@pytest.mark.parametrize("mode", ["certify", "predict"])
@pytest.mark.parametrize("n,block", [(1000, 300), (900, 300), (5, 100), (1, 1)])
def test_units_match_a_loop_construction(mode, n, block):
    images = [7, 2, 40]
    units = build_units(images, 13, n, block, mode)
    np.testing.assert_array_equal(units, _units_by_loops(images, 13, n, block, mode))
    per_image = {i: units[units[:, 0] == i] for i in images}
    for rows in per_image.values():
        assert rows[rows[:, 1] == ESTIMATION][:, 3].sum() == n
        assert rows[rows[:, 1] == SELECTION][:, 3].sum() == (13 if mode == "certify" else 0)


@settings(max_examples=300, deadline=None)
@given(draws=st.lists(st.integers(1, 1000), min_size=1, max_size=60), data=st.data())
def test_ranges_are_contiguous_nonempty_and_balanced(draws, data):
    shards = data.draw(st.integers(1, len(draws)))
    ranges = balanced_ranges(draws, shards)
    assert len(ranges) == shards
    assert ranges[0][0] == 0 and ranges[-1][1] == len(draws)
    assert all(a < b for a, b in ranges), "every shard holds at least one unit"
    assert all(ranges[k][1] == ranges[k + 1][0] for k in range(shards - 1)), "contiguous, no gap or overlap"
    sums = np.asarray([sum(draws[a:b]) for a, b in ranges])
    assert sums.max() <= sum(draws) / shards + max(draws), "no shard exceeds the fair share by more than a unit"


@settings(max_examples=100, deadline=None)
@given(units=st.integers(1, 300), data=st.data())
def test_equal_units_are_split_within_one_unit(units, data):
    shards = data.draw(st.integers(1, units))
    sizes = [b - a for a, b in balanced_ranges([5] * units, shards)]
    assert max(sizes) - min(sizes) <= 1


def test_plan_shards_partition_the_units():
    plan = make_plan([3, 5, 9, 11], n0=100, n=1050, block_size=200, num_shards=5)
    parts = [plan.shard_units(k) for k in range(5)]
    np.testing.assert_array_equal(np.vstack(parts), plan.units)
    assert plan.shard_draws().sum() == plan.total_draws == 4 * 1150
    # shards > images: slices of images; the images a shard touches are listed in plan order
    many = make_plan([3, 5], 100, 1050, 200, 9)
    assert [list(many.shard_images(k)) for k in range(9)][:2] == [[3], [3]]
    assert sorted(set(np.concatenate([many.shard_images(k) for k in range(9)]))) == [3, 5]


def test_plan_refuses_bad_shard_counts():
    with pytest.raises(InputError, match="more than the 14 work units"):
        make_plan([1, 2], 10, 60, 10, 15)
    with pytest.raises(InputError, match="at least 1 shard"):
        make_plan([1, 2], 10, 60, 10, 0)
    with pytest.raises(InputError, match="--mode"):
        build_units([1], 10, 60, 10, "guess")


def test_two_batches_of_a_run_never_share_a_generator_state():
    """CPU: the Philox block of counter (1, j, s, i) sits in words 1..8 of the mt19937 state; CUDA: a bijection."""
    states = BatchStates(0)
    key = np.random.SeedSequence(0).generate_state(2, np.uint64)
    np.testing.assert_array_equal(states.key, key)
    words = states.mt19937_words(7, 1, 3)
    assert words.dtype == np.uint32 and words.shape == (624,) and words[0] == 0x80000000
    block = np.random.Philox(key=key, counter=[0, 3, 1, 7]).random_raw(4).view(np.uint32)  # counter +1 first
    np.testing.assert_array_equal(words[1:9], block)
    grid = [(i, s, j) for i in range(60) for s in (0, 1) for j in range(60)]
    cpu = {states.mt19937_words(*c)[1:].tobytes() for c in grid}
    cuda = {states.cuda_seed(*c) for c in grid}
    assert len(cpu) == len(cuda) == len(grid), "every batch has its own state"
    assert all(0 <= v < 2**64 for v in cuda)
    # the CUDA map is a bijection of the packed counter: extreme counters stay distinct, other seeds move everything
    edge = [(0, 0, 0), (0, 0, 2**25 - 1), (0, 1, 0), (2**38 - 1, 1, 2**25 - 1), (1, 0, 0)]
    assert len({states.cuda_seed(*c) for c in edge}) == len(edge)
    assert states.cuda_seed(3, 1, 0) != BatchStates(1).cuda_seed(3, 1, 0)
    assert not np.array_equal(states.mt19937_words(3, 1, 0), BatchStates(1).mt19937_words(3, 1, 0))
    for bad in [(-1, 0, 0), (0, 2, 0), (0, 0, 2**25), (2**38, 0, 0)]:
        with pytest.raises(ValueError, match="noise counter"):
            states.cuda_seed(*bad)


def _stream_batches(units, block_size, draw_batch):
    return [b for u in units for b in unit_batches(int(u[1]), int(u[2]), int(u[3]), block_size, draw_batch)]


@pytest.mark.parametrize("n,draw_batch", [(1000, 100), (1030, 100), (7, 3), (100, 100)])
def test_noise_batches_do_not_depend_on_block_size(n, draw_batch):
    """Draw d of a stream is always row d % draw_batch of batch d // draw_batch, whatever the blocks are."""
    expected = [(j, min(draw_batch, n - j * draw_batch)) for j in range(-(-n // draw_batch))]
    for block in {draw_batch, 2 * draw_batch, 5 * draw_batch, draw_batch * (-(-n // draw_batch))}:
        est = build_units([0], 0, n, block, "predict")
        assert _stream_batches(est, block, draw_batch) == expected
    sel = build_units([0], n, 10, 10, "certify")[:1]
    assert _stream_batches(sel, 10, draw_batch) == expected


def test_check_batching():
    check_batching(1000, 100)
    with pytest.raises(InputError, match="not a multiple"):
        check_batching(1000, 300)
    with pytest.raises(InputError, match="--draw-batch 0"):
        check_batching(1000, 0)


def test_split_array():
    assert split_array(12, 5) == [range(0, 5), range(5, 10), range(10, 12)]
    assert split_array(0, 5) == []
    assert split_array(1001) == [range(0, 1001)]
    assert [len(r) for r in split_array(2500)] == [1001, 1001, 498]
    with pytest.raises(InputError):
        split_array(3, 0)
