"""The CUDA caching allocator model against the rules of ``CUDACachingAllocator.cpp``, each
case worked by hand here, and against a snapshot recorded on an H200."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from bpmem.cli import main
from bpmem.cuda_allocator.config import AllocatorConfig, MiB, allocation_size, round_size
from bpmem.cuda_allocator.model import CachingAllocator, OutOfMemory
from bpmem.cuda_allocator.replay import load_snapshot, replay

STEP = Path(__file__).resolve().parents[1] / "reports" / "gpu-example" / "trace" / "step.pickle"
DEFAULT = AllocatorConfig()


def test_requests_round_to_512_bytes_and_pick_their_segment() -> None:
    assert [round_size(n, DEFAULT) for n in (1, 512, 513, 1_000_000)] == [512, 512, 1024, 1_000_448]
    assert allocation_size(MiB) == 2 * MiB  # the small pool's segment
    assert allocation_size(MiB + 512) == allocation_size(10 * MiB - 512) == 20 * MiB
    assert allocation_size(10 * MiB) == 10 * MiB and allocation_size(11 * MiB) == 12 * MiB


def test_power_of_two_divisions_round_between_powers() -> None:
    four = AllocatorConfig.parse("roundup_power2_divisions:4")
    assert round_size(5000, four) == 5120  # 4096 + one quarter step of 1024
    assert round_size(1200, four) == 1536  # at most 512 x 4: plain 512 B rounding
    table = AllocatorConfig.parse("roundup_power2_divisions:[1:1,2:2,>:8]")
    assert table.roundup_power2_divisions[:3] == (1, 2, 8) and table.roundup_power2_divisions[-1] == 8


def test_a_small_request_takes_a_block_of_a_two_mib_segment_and_the_rest_stays_cached() -> None:
    allocator = CachingAllocator()
    first = allocator.malloc(100)
    second = allocator.malloc(600)
    assert second == first + 512  # split off the same segment, best fit at the lowest address
    assert (allocator.stats.allocated, allocator.stats.reserved) == (512 + 1024, 2 * MiB)
    allocator.free(first)
    allocator.free(second)  # merges with both neighbours: the segment is one free block again
    assert [[b.size for b in run] for run in allocator.segments()] == [[2 * MiB]]
    allocator.release_cached()
    assert allocator.stats.reserved == 0


def test_an_unsplit_rest_counts_as_allocated() -> None:
    allocator = CachingAllocator()
    allocator.malloc(19 * MiB + MiB // 2)  # its own 20 MiB segment; the 0.5 MiB rest is too small to split
    assert (allocator.stats.allocated, allocator.stats.reserved) == (20 * MiB, 20 * MiB)
    small_rest = CachingAllocator()
    small_rest.malloc(3 * MiB)  # in a 20 MiB segment, the 17 MiB rest is split off and cached
    assert (small_rest.stats.allocated, small_rest.stats.reserved) == (3 * MiB, 20 * MiB)


def test_a_freed_block_is_reused_by_best_fit_before_any_new_segment() -> None:
    allocator = CachingAllocator()
    big, small = allocator.malloc(30 * MiB), allocator.malloc(12 * MiB)
    allocator.free(big)
    allocator.free(small)
    again = allocator.malloc(11 * MiB)
    assert again == small and allocator.stats.reserved == 42 * MiB  # the 12 MiB block fits best


def test_a_failed_cuda_malloc_frees_the_cache_and_retries() -> None:
    allocator = CachingAllocator(limit_bytes=20 * MiB)
    allocator.free(allocator.malloc(100))  # a cached 2 MiB small segment
    allocator.malloc(19 * MiB)  # 2 + 20 MiB would pass the limit: the cached segment goes, then it fits
    assert allocator.stats.reserved == 20 * MiB
    held = CachingAllocator(limit_bytes=20 * MiB)
    held.malloc(100)  # the small segment is in use: nothing to free
    with pytest.raises(OutOfMemory):
        held.malloc(19 * MiB)


def test_an_oversize_block_is_not_cut_for_a_smaller_request() -> None:
    allocator = CachingAllocator(AllocatorConfig.parse("max_split_size_mb:100"))
    allocator.free(allocator.malloc(200 * MiB))
    allocator.malloc(50 * MiB)  # the cached 200 MiB block is oversize: a new segment
    assert allocator.stats.reserved == 250 * MiB
    unlimited = CachingAllocator()
    unlimited.free(unlimited.malloc(200 * MiB))
    unlimited.malloc(50 * MiB)
    assert unlimited.stats.reserved == 200 * MiB


def test_expandable_segments_tile_one_segment_in_twenty_mib_pages() -> None:
    allocator = CachingAllocator(AllocatorConfig.parse("expandable_segments:True"))
    a, b = allocator.malloc(4 * MiB), allocator.malloc(4 * MiB)
    assert b == a + 4 * MiB and allocator.stats.reserved == 20 * MiB
    allocator.malloc(30 * MiB)  # 38 MiB in all: two pages
    assert allocator.stats.reserved == 40 * MiB and len(allocator.segments()) == 1
    plain = CachingAllocator()
    for size in (4 * MiB, 4 * MiB, 30 * MiB):
        plain.malloc(size)
    assert plain.stats.reserved == 50 * MiB  # a 20 MiB segment for both 4 MiB, and 30 MiB of its own


@pytest.mark.parametrize("conf,flag", [("max_split_size_mb:5", "too small"), ("expandable_segments:yes", "True"),
                                       ("garbage_collection_threshold:1.5", "strictly between"),
                                       ("roundup_power2_divisions:3", "power of 2"), ("nonsense", "KEY:VALUE")])
def test_bad_settings_are_named(conf: str, flag: str) -> None:
    with pytest.raises(ValueError, match=flag):
        AllocatorConfig.parse(conf)


def test_the_recorded_h200_step_is_reproduced_to_the_byte() -> None:
    """A Linear stack's training step recorded mid-process (history on for one step): rewound
    to its first event and replayed, the model ends with the snapshot's 10 segments and every
    block in place, and peaks where the device did."""
    result = replay(load_snapshot(STEP))
    assert not result.from_empty and result.differences == ()
    assert (len(result.segment_sizes), result.max_reserved_bytes, result.max_allocated_bytes) == \
        (10, 134_217_728, 111_551_488)
    assert result.recorded["max_allocated_bytes"] == result.max_allocated_bytes


def test_a_recording_from_the_process_start_replays_from_empty_and_finds_the_first_failure(tmp_path: Path) -> None:
    events = [{"action": "segment_alloc", "addr": 1 << 32, "size": 20 * MiB, "stream": 0},
              {"action": "alloc", "addr": 1 << 32, "size": 3 * MiB, "stream": 0},
              {"action": "alloc", "addr": (1 << 32) + 3 * MiB, "size": 5 * MiB, "stream": 0},
              {"action": "free_completed", "addr": 1 << 32, "size": 3 * MiB, "stream": 0}]
    blocks = [{"address": 1 << 32, "size": 3 * MiB, "requested_size": 3 * MiB, "state": "inactive"},
              {"address": (1 << 32) + 3 * MiB, "size": 5 * MiB, "requested_size": 5 * MiB, "state": "active_allocated"},
              {"address": (1 << 32) + 8 * MiB, "size": 12 * MiB, "requested_size": 0, "state": "inactive"}]
    snapshot = {"segments": [{"device": 0, "address": 1 << 32, "total_size": 20 * MiB, "segment_type": "large",
                              "stream": 0, "blocks": blocks}], "device_traces": [events]}
    result = replay(snapshot)
    assert result.from_empty and result.differences == () and result.max_allocated_bytes == 8 * MiB
    assert replay(snapshot, limit_bytes=10 * MiB).first_failure == {
        "event": 1, "requested_bytes": 3 * MiB, "reserved_bytes": 0, "allocated_bytes": 0}
    path = tmp_path / "tiny.pickle"
    path.write_bytes(pickle.dumps(snapshot))
    assert main(["allocator", "replay", str(path), "--json"]) == 0


def test_the_replay_command_is_torch_free_and_its_json_has_the_contract_keys() -> None:
    code = ("import sys, json; from bpmem.cli import main; rc = main(['allocator', 'replay', sys.argv[1], '--json']);"
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(STEP)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {"max_reserved_bytes", "max_allocated_bytes", "segment_sizes", "recorded"} <= set(out)
    assert out["segment_sizes"] == out["recorded"]["segment_sizes"] and out["agrees"] is True


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["allocator", "replay", str(tmp_path / "missing.pickle")]) == 2
    assert main(["allocator", "replay", str(STEP), "--alloc-conf", "expandable_segments:maybe"]) == 2
    assert main(["allocator", "replay", str(STEP), "--device-memory", "lots"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 3 and all("error: argument" in line for line in lines)
