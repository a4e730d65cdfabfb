"""The caching-allocator replay follows PyTorch's rules for segments, splitting and merging."""

from __future__ import annotations

from qlora_studio.engine.estimate import _CachingAllocator

MiB = 1 << 20


def replay(*events):
    """Events: ('a', name, bytes) or ('f', name). Returns the allocator."""
    allocator, handles = _CachingAllocator(), {}
    for event in events:
        if event[0] == "a":
            handles[event[1]] = len(handles)
            allocator.malloc(handles[event[1]], event[2])
        else:
            allocator.free(handles[event[1]])
    return allocator


def test_segment_sizes_by_request():
    assert replay(("a", "x", 100)).reserved == 2 * MiB  # small pool: 2 MiB segments
    assert replay(("a", "x", 5 * MiB)).reserved == 20 * MiB  # 1-10 MiB: 20 MiB segments
    assert replay(("a", "x", 11 * MiB + 1)).reserved == 12 * MiB  # large: rounded up to 2 MiB


def test_cached_blocks_are_reused_and_split():
    # a freed 20 MiB segment serves two 8 MiB requests (the rest after the first is split off)
    assert replay(("a", "x", 20 * MiB), ("f", "x"), ("a", "y", 8 * MiB), ("a", "z", 8 * MiB)).reserved == 20 * MiB
    # a remainder of 1 MiB or less is not split off: it stays with the block
    assert replay(("a", "x", 12 * MiB), ("f", "x"), ("a", "y", 11 * MiB + 512), ("a", "z", 600 * 1024)).reserved == 14 * MiB


def test_best_fit_and_merging():
    # the smaller of two free blocks that fit is taken, so the larger stays whole
    a = replay(("a", "big", 40 * MiB), ("a", "small", 12 * MiB), ("f", "big"), ("f", "small"),
               ("a", "x", 12 * MiB), ("a", "y", 40 * MiB))
    assert a.reserved == 52 * MiB
    # neighbours merge when freed, so a segment split in two serves its whole size again
    b = replay(("a", "x", 30 * MiB), ("f", "x"), ("a", "p", 10 * MiB), ("a", "q", 20 * MiB), ("f", "p"), ("f", "q"),
               ("a", "whole", 30 * MiB))
    assert b.reserved == 30 * MiB


def test_fragmentation_grows_reserved_memory():
    # two 10 MiB blocks with a live one between them cannot serve 20 MiB: a new segment is needed
    a = replay(("a", "s", 30 * MiB), ("f", "s"), ("a", "p", 10 * MiB), ("a", "mid", 10 * MiB), ("a", "q", 10 * MiB),
               ("f", "p"), ("f", "q"), ("a", "big", 20 * MiB))
    assert a.reserved == 50 * MiB


def test_each_stream_has_its_own_pools():
    def run(second_stream: int) -> int:
        allocator = _CachingAllocator()
        allocator.malloc(0, 16 * MiB, stream=1)  # e.g. a layer input fetched back on a side stream
        allocator.free(0)
        allocator.malloc(1, 16 * MiB, stream=second_stream)
        return allocator.reserved

    assert run(1) == 16 * MiB  # the same stream reuses the cached block
    assert run(0) == 32 * MiB  # another stream cannot: a new segment
