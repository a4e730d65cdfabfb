"""bench/estimate_accuracy.py stays runnable: its dry run, and its worker driving the engine on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "estimate_accuracy.py"), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_dry_run_prints_the_grid_and_skips_what_does_not_fit(tmp_path):
    proc = _run("--dry-run", "--shapes", "8b", "--seqs", "512,4096", "--batches", "1,8", "--gpu-memory", "80",
                "--models", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2 * 2 * 2  # sequence lengths x batches x checkpointing on/off
    assert all("estimate" in line and "GiB" in line for line in lines)
    skipped = [line for line in lines if "skipped" in line]
    assert skipped and all("ckpt off" in line for line in skipped)


def test_worker_measures_points_with_the_engine_on_the_cpu(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from perf_harness import build_model
    finally:
        sys.path.remove(str(BENCH))
    model = tmp_path / "llama-tiny"
    build_model("tiny", model)
    proc = _run("--worker", "--device", "cpu", "--model", str(model), "--points", "32x1,64x2", "--steps", "1",
                "--checkpointing", "on")
    assert proc.returncode == 0, proc.stderr[-2000:]
    points = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("POINT ")]
    assert [(p["seq"], p["batch"]) for p in points] == [(32, 1), (64, 2)]
    assert all("oom" not in p for p in points)


class _FakeAllocator:
    """torch.cuda's peak counters, driven by hand."""

    def __init__(self):
        self.now = self.peak = 0

    def allocate(self, n):
        self.now += n
        self.peak = max(self.peak, self.now)

    def max_memory_allocated(self):
        return self.peak

    def max_memory_reserved(self):
        return self.peak

    def reset_peak_memory_stats(self):
        self.peak = self.now


class _FakeGraphs:
    """A GraphContext whose scratch allocates ``scratch_bytes`` in a pool of ``pool`` bytes."""

    def __init__(self, allocator, pool, scratch_bytes, recorded=True):
        self.allocator, self.pool, self.scratch_bytes, self.recorded = allocator, pool, scratch_bytes, recorded

    def scratch_in_pool(self):
        return self.recorded

    def scratch(self):
        import contextlib

        @contextlib.contextmanager
        def cm():
            self.allocator.allocate(self.scratch_bytes)
            yield
            self.allocator.allocate(-self.scratch_bytes)
        return cm()

    def pool_bytes(self):
        return self.pool


def test_peak_memory_counts_the_losss_temporaries_in_the_graphs_pool_once():
    import types

    sys.path.insert(0, str(BENCH))
    from _peak import PeakMemory

    alloc = _FakeAllocator()
    graphs = _FakeGraphs(alloc, pool=60, scratch_bytes=50)
    peak = PeakMemory(graphs)
    peak.torch = types.SimpleNamespace(cuda=alloc)
    peak.reset()
    alloc.allocate(100)  # outside the pool
    with graphs.scratch():  # the loss: 50 more, in the pool that is counted whole
        pass
    assert peak.allocated() == 100 + 60  # not 150 + 60
    assert peak.allocated(pool=False) == 100
    alloc.allocate(30)  # a later peak outside the pool counts
    assert peak.allocated() == 130 + 60
    # Before any recording the loss allocates outside the pool: its temporaries count.
    alloc2 = _FakeAllocator()
    eager = _FakeGraphs(alloc2, pool=0, scratch_bytes=50, recorded=False)
    peak2 = PeakMemory(eager)
    peak2.torch = types.SimpleNamespace(cuda=alloc2)
    peak2.reset()
    alloc2.allocate(100)
    with eager.scratch():
        pass
    assert peak2.allocated() == 150


def test_memory_peak_leaves_the_graphs_pool_out_of_the_allocators_peak():
    sys.path.insert(0, str(BENCH))
    from memory_peak import peak_breakdown

    frames = [{"filename": "qlora_studio/engine/losses.py", "line": 1, "name": "forward"}]
    trace = [
        {"action": "alloc", "addr": 100, "size": 30, "frames": frames},     # outside the pool
        {"action": "alloc", "addr": 5000, "size": 50, "frames": frames},    # in the pool: counted with it
        {"action": "free_completed", "addr": 5000, "size": 50},
        {"action": "alloc", "addr": 200, "size": 10, "frames": frames},
        {"action": "free_completed", "addr": 100, "size": 30},
    ]
    peak, sites = peak_breakdown(trace, 1000, [(4096, 8192)])
    assert peak == 1040
    assert sum(n for _, n in sites) == 40
    assert peak_breakdown(trace, 1000)[0] == 1080  # without the pool's ranges, as the allocator counts


def test_every_harness_row_turns_off_something_that_exists():
    # A row's override that names an engine attribute which was renamed would set a new attribute
    # nobody reads: the row would measure the defaults under another name.
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        import perf_harness
    finally:
        sys.path.remove(str(BENCH))
    handled = set(perf_harness._CONFIG_KEYS) | set(perf_harness._ENGINE_SWITCHES) | {
        "auto", "loss_chunk_tokens", "paging_counters"}
    for row, overrides in perf_harness.ENGINE_VARIANTS.items():
        assert set(overrides) <= handled, row
    for key, (module, attribute, _) in perf_harness._ENGINE_SWITCHES.items():
        assert hasattr(importlib.import_module(f"qlora_studio.engine.{module}"), attribute), key
