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
