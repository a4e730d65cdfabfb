"""Faults: the worker killed at any moment, the disk filling up during a checkpoint or an export.

The disk is a small tmpfs mounted for the test (root only; the tests skip, saying why, elsewhere).
The kill test is ``slow``: ``pytest -m slow tests/reliability`` (or ``python bench/reliability_kill.py``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import tomli_w

from qlora_studio import events as ev
from qlora_studio import runs

from .fuzzkit import ENV, ERROR_PREFIX, cli

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str):
    """A script of bench/ as a module (the kill harness is shared by the benchmark and this test)."""
    qualified = f"bench_{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    spec = importlib.util.spec_from_file_location(qualified, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(size)`` mounts a tmpfs of ``size`` (e.g. "6m") and returns its folder; unmounted after."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True,
                                check=False)
        if result.returncode != 0:
            pytest.skip(f"this sandbox does not allow mounting a tmpfs: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)


def resize(point: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True, capture_output=True)


def _set(config: Path, section: str, **values) -> None:
    data = tomllib.loads(config.read_text())
    data[section].update(values)
    config.write_text(tomli_w.dumps(data))


def _events(run_dir: Path) -> list[dict]:
    return list(ev.read(run_dir / runs.EVENTS))


# ------------------------------------------------------------------------------------------------
# The disk filling up during a checkpoint

#: One checkpoint of the demo (adapter, optimizer and RNG states) takes about 4 MB: on this disk the
#: first fits and the second cannot.
CHECKPOINT_DISK = "6m"


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_the_run_resumes(demo, small_disk):
    verify_checkpoint = bench_module("reliability_kill").verify_checkpoint
    disk = small_disk(CHECKPOINT_DISK)
    run_dir = disk / "run"
    _set(demo / "config.toml", "train", checkpoint_every=1, keep_checkpoints=2, max_steps=6)
    result = cli("train", demo / "config.toml", "--output", run_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{ERROR_PREFIX}{run_dir / runs.CHECKPOINTS}: could not write the checkpoint at step 2 (")
    assert line.endswith("Free disk space and resume; the previous checkpoint step-00000001 is intact.")
    failed = _events(run_dir)[-1]
    assert failed["type"] == "failed" and failed["kind"] == "checkpoint_failed", failed
    assert "finished" not in [e["type"] for e in _events(run_dir)] and not (run_dir / runs.ADAPTER).exists()
    assert sorted(p.name for p in (run_dir / runs.CHECKPOINTS).iterdir()) == ["step-00000001"]  # no .tmp- left
    assert runs.summarize(run_dir).status == "failed"
    # The checkpoint of step 1 is the latest, whole and loadable; an unfinished one is never listed.
    assert [step for step, _ in runs.list_checkpoints(run_dir)] == [1]
    assert verify_checkpoint(runs.latest_checkpoint(run_dir)) == 1
    assert runs.summarize(run_dir).resumable
    # Space freed: the run resumes from that checkpoint and reaches its last step.
    resize(disk, "64m")
    result = cli("train", "--resume", run_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    started = [e for e in _events(run_dir) if e["type"] == "run_started"]
    assert started[-1]["plan"]["resumed_from"] == 1
    assert _events(run_dir)[-1]["type"] == "finished" and _events(run_dir)[-1]["step"] == 6


@pytest.fixture(scope="module")
def trained_state(demo_template):
    """The demo's model, optimizer (with its full state) and schedule, as the loop holds them."""
    import torch

    from qlora_studio import config
    from qlora_studio.engine.demo import demo_config
    from qlora_studio.engine.model import load_model
    from qlora_studio.engine.trainer import build_optimizer, build_scheduler

    cfg = config.replace(demo_config(), model={"name_or_path": str(demo_template / "model")})
    model, _tokenizer, _info = load_model(cfg, torch.device("cpu"), torch.bfloat16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, 10)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer, scheduler


def _second_checkpoint_error(trained_state, disk: Path):
    from qlora_studio.engine import checkpoint as ckpt

    model, optimizer, scheduler = trained_state
    run_dir = disk / "run"
    run_dir.mkdir()
    state = {"step": 1, "tokens": 0, "data": {"epoch": 0, "index": 0}}
    ckpt.save(run_dir, model, optimizer, scheduler, state, keep=2)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save(run_dir, model, optimizer, scheduler, {**state, "step": 2}, keep=2)
    return run_dir, info.value


@pytest.mark.parametrize("size", ["4600k", CHECKPOINT_DISK])  # the adapter does not fit; the optimizer state does not
def test_a_full_disk_during_a_checkpoint_is_a_checkpoint_error(trained_state, small_disk, size):
    run_dir, err = _second_checkpoint_error(trained_state, small_disk(size))
    assert err.kind == "checkpoint_failed"
    assert "could not write the checkpoint at step 2" in err.what
    assert "step-00000001 is intact" in err.fix
    assert sorted(p.name for p in (run_dir / runs.CHECKPOINTS).iterdir()) == ["step-00000001"]


@pytest.mark.parametrize("size", ["4600k", CHECKPOINT_DISK])
def test_a_full_disk_during_a_checkpoint_says_so(trained_state, small_disk, size):
    _run_dir, err = _second_checkpoint_error(trained_state, small_disk(size))
    # torch.save and safetensors word a full disk their own way; the message names it, with the space left
    assert "No space left on device, " in err.what and err.what.endswith(" MB free)"), err.what


def test_a_checkpoint_writer_error_with_space_left_keeps_the_writers_words(trained_state, tmp_path, monkeypatch):
    import shutil

    from qlora_studio.engine import checkpoint as ckpt

    if shutil.disk_usage(tmp_path).free < 4 * ckpt.NEARLY_FULL:
        pytest.skip("the temporary folder's disk is nearly full itself")
    model, optimizer, scheduler = trained_state

    def failing_save(obj, path, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.save(tmp_path, model, optimizer, scheduler, {"step": 1, "tokens": 0, "data": {"epoch": 0, "index": 0}}, keep=2)
    assert "unexpected pos 64 vs 0" in info.value.what and "No space left" not in info.value.what
    assert list((tmp_path / runs.CHECKPOINTS).iterdir()) == []  # the partial checkpoint is removed


# ------------------------------------------------------------------------------------------------
# The disk filling up during an export


def test_an_export_that_cannot_fit_is_refused_before_writing(finished_run, small_disk):
    disk = small_disk("3m")
    result = cli("export", finished_run, "--format", "merged", "--out", disk / "merged")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"{ERROR_PREFIX}{disk}: not enough free disk space: the export needs about")
    assert list(disk.iterdir()) == []


#: ``qlora-studio export`` with the free-space check answering "enough": the disk then fills up
#: while the export writes, as when another program takes the space in the meantime.
EXPORT_DESPITE_THE_CHECK = """
import sys
from qlora_studio.engine.export import staging
staging.check_free_space = lambda folder, needed: None
from qlora_studio.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_disk_that_fills_during_an_export_is_a_clear_error(finished_run, small_disk):
    disk = small_disk("3m")
    result = subprocess.run([sys.executable, "-c", EXPORT_DESPITE_THE_CHECK, "export", str(finished_run), "--format",
                             "merged", "--out", str(disk / "merged")], capture_output=True, text=True, env=ENV, timeout=300,
                            check=False)
    assert list(disk.iterdir()) == []  # no folder named merged, no partial one
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(ERROR_PREFIX)
    assert "No space left on device" in result.stderr


# ------------------------------------------------------------------------------------------------
# SIGKILL at random moments


@pytest.mark.slow
def test_sigkill_20_times_loses_no_checkpointed_work(tmp_path):
    harness = bench_module("reliability_kill")
    report = harness.kill_and_resume(tmp_path, kills=20, max_steps=400, seed=1, progress=lambda line: None)
    summary = report.summary()
    assert summary["kills"] == 20, summary
    assert summary["recoveries"] == 20
    assert summary["by_trigger"]["checkpoint"] >= 6 and summary["killed_mid_checkpoint_write"] >= 5
    # Every resume started at the latest complete checkpoint the kill left (verified loadable then).
    assert all(k.lost_beyond_checkpoint == 0 for k in report.kills), [k for k in report.kills if k.lost_beyond_checkpoint]
    assert summary["work_lost_beyond_last_checkpoint_steps"] == 0
    assert summary["final_exit_code"] == 0 and summary["final_step"] == summary["planned_steps"] == 400
    # With a checkpoint every step, a kill costs at most the step whose checkpoint it interrupted.
    assert summary["steps_redone_max"] <= 1
    # Resuming is exact: every step's loss equals that of the same run never interrupted.
    assert summary["max_loss_difference_vs_uninterrupted"] <= 1e-6
