"""`qlora-studio monitor` (the terminal view) and the run-folder follower behind it."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
from pathlib import Path

import pynvml
import pytest
from monitor_fakes import GIB, MIB, FakeGpu, FakeNvml

from qlora_studio import events, runs
from qlora_studio.errors import UserError
from qlora_studio.monitor import cli
from qlora_studio.monitor.nvml import NO_GPU_MESSAGE, NvmlSampler
from qlora_studio.monitor.runview import RunFollower, fmt_bytes

RUN = Path(__file__).parent / "data" / "run_events.jsonl"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def _run_dir(tmp_path: Path, pid: int | None = None) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(RUN, run_dir / runs.EVENTS)
    if pid is not None:
        (run_dir / runs.PID).write_text(str(pid))
    return run_dir


def test_without_a_gpu_it_says_so_once_and_exits_0():
    out = io.StringIO()
    sampler = NvmlSampler(FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert cli.run(_args("--once"), out=out, sampler=sampler) == 0
    assert out.getvalue() == NO_GPU_MESSAGE + "\n"
    out = io.StringIO()  # live mode too: there is nothing to watch
    sampler = NvmlSampler(FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert cli.run(_args("--interval", "0.25"), out=out, sampler=sampler) == 0
    assert out.getvalue().count(NO_GPU_MESSAGE) == 1


def test_without_a_gpu_the_run_is_still_summarised(tmp_path):
    out = io.StringIO()
    sampler = NvmlSampler(FakeNvml(init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert cli.run(_args("--once", "--run", str(_run_dir(tmp_path))), out=out, sampler=sampler) == 0
    text = out.getvalue()
    assert text.startswith(NO_GPU_MESSAGE + "\n")
    assert "Paging: 3 events, 512 MiB moved" in text


def test_a_snapshot_shows_gpus_processes_worker_and_the_run(tmp_path):
    me = os.getpid()  # alive, so worker.pid counts as a running worker
    nvml = FakeNvml([
        FakeGpu(used=12 * GIB, processes=[(me, 10 * GIB), (31337, 1 * GIB)]),
        FakeGpu(name="NVIDIA H100", total=80 * GIB, processes=[]),
    ], names={31337: "/usr/lib/xorg/Xorg"})
    out = io.StringIO()
    code = cli.run(_args("--once", "--run", str(_run_dir(tmp_path, me))), out=out, sampler=NvmlSampler(nvml))
    assert code == 0
    lines = out.getvalue().splitlines()
    header = next(line for line in lines if line.startswith("GPU"))
    for column in ("Used / usable", "Util", "Mem ctl", "Temp", "Power", "PCIe TX", "PCIe RX"):
        assert column in header
    row0 = next(line for line in lines if line.startswith("0 "))
    assert "NVIDIA H200" in row0 and "12.0 GiB / 144 GiB" in row0 and "87%" in row0 and "45%" in row0
    assert "51 °C" in row0 and "312 W" in row0 and "1.00 MiB/s" in row0 and "2.00 MiB/s" in row0
    worker = next(line for line in lines if "training worker" in line)
    assert worker.startswith(">>") and str(me) in worker and "10.0 GiB" in worker
    xorg = next(line for line in lines if "Xorg" in line)
    assert not xorg.startswith(">>") and "1.00 GiB" in xorg
    assert "\x1b[" not in out.getvalue()  # not a terminal: no escape codes
    assert f"Run run: finished, worker pid {me}" in lines
    assert "  step 6: allocated 3.30 GiB, reserved 4.88 GiB, peak 6.20 GiB" in lines
    assert "  paged optimizer state: 128 MiB" in lines
    assert "  Paging: 3 events, 512 MiB moved" in lines
    assert "    step 3 optimizer: in 128 MiB, out 0 B, 626 faults" in lines


def test_only_one_gpu_when_asked(tmp_path):
    nvml = FakeNvml([FakeGpu(), FakeGpu(name="NVIDIA H100")])
    out = io.StringIO()
    assert cli.run(_args("--once", "--gpu", "1"), out=out, sampler=NvmlSampler(nvml)) == 0
    text = out.getvalue()
    assert "NVIDIA H100" in text and "NVIDIA H200" not in text


def test_nvml_failing_in_a_snapshot_is_reported_not_raised():
    nvml = FakeNvml(init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    out = io.StringIO()
    assert cli.run(_args("--once"), out=out, sampler=NvmlSampler(nvml)) == 1
    assert "retrying" in out.getvalue() and "Traceback" not in out.getvalue()


def test_live_view_refreshes_until_interrupted(monkeypatch):
    nvml = FakeNvml()
    frames = []

    class Out(io.StringIO):
        def isatty(self):
            return True

    out = Out()
    sleeps = []

    def fake_sleep(seconds):
        sleeps.append(seconds)
        frames.append(out.getvalue())
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", fake_sleep)
    assert cli.run(_args("--interval", "0.5"), out=out, sampler=NvmlSampler(nvml)) == 0
    assert out.getvalue().count("\x1b[H\x1b[J") == 3  # the screen is redrawn each time
    assert all(0 < s <= 0.5 for s in sleeps)
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == 3
    assert not nvml.initialised  # NVML shut down on the way out


def test_a_missing_run_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="run folder not found"):
        cli.run(_args("--once", "--run", str(tmp_path / "nope")), out=io.StringIO(), sampler=NvmlSampler(FakeNvml()))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a run folder"):
        cli.run(_args("--once", "--run", str(tmp_path / "empty")), out=io.StringIO(), sampler=NvmlSampler(FakeNvml()))


def test_the_help_text_names_the_options():
    parser = argparse.ArgumentParser(prog="qlora-studio monitor", description=cli.HELP)
    cli.add_arguments(parser)
    text = parser.format_help()
    for option in ("--once", "--interval", "--run", "--gpu"):
        assert option in text


# ---- the follower --------------------------------------------------------------------------


def test_the_follower_reads_only_what_was_appended_and_waits_for_whole_lines(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / runs.EVENTS
    follower = RunFollower(run_dir)
    assert follower.poll().status == "created"
    writer = events.EventWriter(path)
    writer.emit("run_started", run_dir=str(run_dir), config={}, model={}, device={"kind": "cuda"}, versions={}, plan={})
    writer.emit("step", step=1, epoch=0.0, loss=2.0, lr=1e-4, grad_norm=1.0, tokens=10, tokens_per_s=1.0,
                step_s=1.0, mem_allocated=GIB, mem_reserved=2 * GIB, mem_peak=3 * GIB)
    state = follower.poll()
    assert state.status == "running" and state.last_step["step"] == 1
    line = events.dumps(events.make("paging", step=1, phase="optimizer", bytes_htod=MIB, bytes_dtoh=0, faults=2))
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line[:20])  # a torn line, as a writer in mid-write leaves it
    assert follower.poll().paging.events == 0
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line[20:] + "\n")
    state = follower.poll()
    assert state.paging.events == 1 and state.paging.bytes_htod == MIB
    writer.emit("log", level="info", message="Paging counters unavailable: turned off")
    assert follower.poll().paging.status_line() == "Paging: 1 event, 1.00 MiB moved"
    writer.close()
    path.write_text(events.dumps(events.make("failed", kind="x", message="m", advice="a", log="l")) + "\n")
    state = follower.poll()  # a shorter file: a new run wrote it; start over
    assert state.status == "failed" and state.paging.events == 0


def test_the_follower_knows_a_dead_worker(tmp_path):
    run_dir = _run_dir(tmp_path, pid=2**22 + 12345)  # beyond pid_max on Linux: never alive
    assert RunFollower(run_dir).worker_pid() is None
    (run_dir / runs.PID).write_text(str(os.getpid()))
    assert RunFollower(run_dir).worker_pid() == os.getpid()


@pytest.mark.parametrize("n, text", [
    (None, "–"), (0, "0 B"), (1023, "1023 B"), (MIB, "1.00 MiB"), (512 * MIB, "512 MiB"),
    (int(1.5 * GIB), "1.50 GiB"), (144 * GIB, "144 GiB"), (12.5 * GIB, "12.5 GiB"),
])
def test_bytes_for_people(n, text):
    assert fmt_bytes(n) == text


def test_the_entry_point_module_runs_without_qt_or_torch():
    import subprocess

    code = (
        "import sys, argparse; from qlora_studio.monitor import cli; "
        "p = argparse.ArgumentParser(); cli.add_arguments(p); "
        "cli.run(p.parse_args(['--once'])); "
        "bad = [m for m in ('torch', 'PySide6', 'pyqtgraph') if m in sys.modules]; sys.exit(str(bad) if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or done.stdout
