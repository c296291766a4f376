"""The growing KV cache: appends in place while there is room, never changes what an older view sees. The static
cache: holds the grown one's positions in buffers of fixed shape and writes each step at its position tensor."""

from __future__ import annotations

import pytest
import torch

from switchformer.layers.kv_cache import MIN_CAPACITY, DecoderCache, LayerKV, StaticDecoderCache

B, H, K = 3, 2, 4


def _positions(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, K, generator=g), torch.randn(B, H, n, K, generator=g)


def _grown(steps: int) -> tuple[LayerKV, torch.Tensor, torch.Tensor]:
    key, value = _positions(1, 0)
    kv, keys, values = LayerKV(key, value), [key], [value]
    for step in range(1, steps):
        key, value = _positions(1, step)
        kv = kv.append(key, value)
        keys.append(key)
        values.append(value)
    return kv, torch.cat(keys, 2), torch.cat(values, 2)


def test_appending_equals_concatenating_and_reuses_the_buffer_until_it_is_full():
    kv, keys, values = _grown(5)
    assert torch.equal(kv.key, keys) and torch.equal(kv.value, values)
    assert kv.buffers is not None and kv.buffers.capacity == MIN_CAPACITY
    storage = kv.buffers.key.data_ptr()
    for step in range(MIN_CAPACITY - 5):  # room left: no new allocation
        kv = kv.append(*_positions(1, 100 + step))
        assert kv.buffers.key.data_ptr() == storage
    assert kv.length == MIN_CAPACITY
    kv = kv.append(*_positions(1, 200))  # full: twice the room
    assert kv.buffers.key.data_ptr() != storage and kv.buffers.capacity >= 2 * kv.length


def test_an_older_view_is_unchanged_and_branching_from_it_copies():
    base, keys, _ = _grown(5)
    first = base.append(*_positions(1, 10))
    second = base.append(*_positions(1, 11))  # branches off base: must not overwrite first's new position
    assert torch.equal(base.key, keys)
    assert torch.equal(first.key[:, :, 5:], _positions(1, 10)[0])
    assert torch.equal(second.key[:, :, 5:], _positions(1, 11)[0])
    assert torch.equal(first.key[:, :, :5], keys) and torch.equal(second.key[:, :, :5], keys)


def test_reorder_selects_rows_and_keeps_room_to_grow():
    kv, keys, values = _grown(6)
    index = torch.tensor([2, 2, 0])
    reordered = kv.reorder(index)
    assert torch.equal(reordered.key, keys[index]) and torch.equal(reordered.value, values[index])
    assert reordered.buffers is not None and reordered.buffers.capacity == kv.buffers.capacity
    assert torch.equal(kv.key, keys)  # the original is untouched
    grown = reordered.append(*_positions(1, 7))
    assert grown.buffers.key.data_ptr() == reordered.buffers.key.data_ptr()


def test_reorder_beams_keeps_the_cross_attention_cache_in_place():
    self_kv, _, _ = _grown(4)
    cross = LayerKV(*_positions(7, 3))
    cache = DecoderCache([self_kv], [cross])
    index = torch.tensor([1, 1, 2])
    beams = cache.reorder_beams(index)
    assert beams.cross_attention[0] is cross
    assert torch.equal(beams.self_attention[0].key, self_kv.key[index])
    assert torch.equal(cache.reorder(index).cross_attention[0].key, cross.key[index])
    assert beams.length == cache.length == 4


def test_a_static_cache_holds_the_grown_positions_and_writes_each_step_at_its_position():
    grown, keys, values = _grown(3)
    cross = LayerKV(*_positions(5, 9))
    static = StaticDecoderCache.from_cache(DecoderCache([grown, grown], [cross, cross]), capacity=6)
    assert static.length == 3 and static.capacity == 6 and static.cross_attention[0] is cross
    layer = static.self_attention[0]
    assert torch.equal(layer.key[:, :, :3], keys) and torch.equal(layer.value[:, :, :3], values)
    assert not layer.key[:, :, 3:].any()  # room, zero until written
    layer.key[:, :, :3].add_(1.0)
    assert torch.equal(grown.key, keys)  # copied, not shared

    key, value = _positions(1, 7)
    same = layer.append(key, value)
    assert same is layer and same.capacity == 6  # the whole buffers, written in place
    assert torch.equal(layer.key[:, :, 3:4], key) and torch.equal(layer.value[:, :, 3:4], value)
    after = static.advanced()
    assert after.length == 4 and after.self_attention[1].key is static.self_attention[1].key
    assert static.length == 3  # the cache it advanced from still says where it was


def test_a_static_cache_reorders_its_rows_like_the_grown_one():
    grown, _, _ = _grown(2)
    cross = LayerKV(*_positions(5, 9))
    cache = DecoderCache([grown], [cross])
    static = StaticDecoderCache.from_cache(cache, capacity=4)
    index = torch.tensor([2, 2, 0])
    beams, rows = static.reorder_beams(index), static.reorder(index)
    assert torch.equal(beams.self_attention[0].key[:, :, :2], cache.reorder(index).self_attention[0].key)
    assert beams.cross_attention[0] is cross and torch.equal(rows.cross_attention[0].value, cross.value[index])
    assert beams.length == rows.length == 2


def test_a_static_cache_too_short_for_the_cached_positions_is_an_error():
    grown, _, _ = _grown(3)
    with pytest.raises(ValueError, match="2 positions cannot hold the 3 already cached"):
        StaticDecoderCache.from_cache(DecoderCache([grown], [None]), capacity=2)
