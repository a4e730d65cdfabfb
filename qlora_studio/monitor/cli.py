"""``qlora-studio monitor``: the GPU monitor as a refreshing table on a terminal (for a box over SSH).

Shows every GPU's memory, utilisation, temperature, power and PCIe traffic, and the processes
holding its memory. With ``--run RUN_DIR`` the training worker (its ``worker.pid``) is marked in
the process list, and the run's latest allocator figures and paging events are shown under it.
Without an NVIDIA GPU it prints :data:`~qlora_studio.monitor.nvml.NO_GPU_MESSAGE` once and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import IO

from .. import runs
from ..errors import UserError
from .nvml import NO_GPU_MESSAGE, GpuSample, NvmlSampler
from .runview import RunFollower, RunState, describe_paging, fmt_bytes

HELP = "live GPU memory, utilisation and paging figures on the terminal"
DEFAULT_INTERVAL_S = 1.0

_CLEAR = "\x1b[H\x1b[J"
_BOLD = "\x1b[1m"
_RESET = "\x1b[0m"


class RunFolderError(UserError):
    kind = "bad_input"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="SECONDS",
                        help=f"seconds between refreshes (default {DEFAULT_INTERVAL_S:g}, at least 0.25)")
    parser.add_argument("--run", metavar="RUN_DIR", default=None,
                        help="a run folder: mark its training worker and show its allocator figures and paging events")
    parser.add_argument("--gpu", type=int, default=None, metavar="INDEX",
                        help="show only this GPU (NVML's index, as nvidia-smi numbers them)")


def run(args: argparse.Namespace, out: IO[str] | None = None, sampler: NvmlSampler | None = None) -> int:
    """Run the view; returns the exit code. ``out`` and ``sampler`` exist for tests."""
    out = out or sys.stdout
    interval = max(float(args.interval), 0.25)
    follower = _follower(args.run)
    sampler = sampler or NvmlSampler(interval_s=interval)
    live = not args.once
    tty = live and out.isatty()
    try:
        while True:
            started = time.monotonic()
            sampler.tick()  # samples, or (after a failure) retries NVML on its own back-off
            run_state = follower.poll() if follower else None
            worker_pid = follower.worker_pid() if follower else None
            status = sampler.status
            if status.state == "no_gpu":
                out.write(NO_GPU_MESSAGE + "\n")
                if run_state is not None:
                    out.write("\n".join(_run_lines(follower.run_dir, run_state, worker_pid, tty)) + "\n")
                out.flush()
                return 0
            frame = _frame(sampler, args.gpu, follower, run_state, worker_pid, tty)
            out.write((_CLEAR if tty else "") + frame + "\n")
            if live and not tty:
                out.write("\n")
            out.flush()
            if not live:
                return 0 if status.state == "ok" else 1
            time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    finally:
        sampler.reader.close()


def _follower(run_dir: str | None) -> RunFollower | None:
    if run_dir is None:
        return None
    path = Path(run_dir)
    if not path.is_dir():
        raise RunFolderError("run folder not found", where=str(path),
                             fix="Pass the folder of a training run (it holds events.jsonl and worker.pid).")
    if not (path / runs.EVENTS).exists() and not (path / runs.PID).exists():
        raise RunFolderError("not a run folder (no events.jsonl, no worker.pid)", where=str(path),
                             fix="Pass the folder that `qlora-studio train --output` wrote.")
    return RunFollower(path)


def _frame(sampler: NvmlSampler, only_gpu: int | None, follower: RunFollower | None,
           run_state: RunState | None, worker_pid: int | None, tty: bool) -> str:
    status = sampler.status
    lines = [f"QLoRA Studio GPU monitor   {time.strftime('%H:%M:%S')}" + ("   (Ctrl-C to quit)" if tty else "")]
    if status.state != "ok":
        lines.append(status.message)
    samples = [s for s in (sampler.latest(g.index) for g in sampler.gpus) if s is not None]
    if only_gpu is not None:
        samples = [s for s in samples if s.index == only_gpu]
        if not samples:
            lines.append(f"No GPU with index {only_gpu}; there are {len(sampler.gpus)}.")
    if samples:
        names = {g.index: g.name for g in sampler.gpus}
        lines.append("")
        lines.extend(_gpu_table(samples, names))
        for sample in samples:
            lines.append("")
            lines.extend(_process_lines(sample, worker_pid, tty))
    if follower is not None and run_state is not None:
        lines.append("")
        lines.extend(_run_lines(follower.run_dir, run_state, worker_pid, tty))
    return "\n".join(lines)


def _opt(value: float | None, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _rate(bps: float | None) -> str:
    return "–" if bps is None else f"{fmt_bytes(bps)}/s"


def _gpu_table(samples: list[GpuSample], names: dict[int, str]) -> list[str]:
    header = ("GPU", "Name", "Used / usable", "Util", "Mem ctl", "Temp", "Power", "PCIe TX", "PCIe RX")
    rows = [header]
    for s in samples:
        rows.append((
            str(s.index), names.get(s.index, ""),
            f"{fmt_bytes(s.used)} / {fmt_bytes(s.usable)}",
            _opt(s.util_gpu, "{:.0f}%"), _opt(s.util_mem, "{:.0f}%"),
            _opt(s.temperature_c, "{:.0f} °C"), _opt(s.power_w, "{:.0f} W"),
            _rate(s.pcie_tx_bps), _rate(s.pcie_rx_bps),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]


def _process_lines(sample: GpuSample, worker_pid: int | None, tty: bool) -> list[str]:
    if not sample.processes:
        return [f"GPU {sample.index}: no processes listed"
                + (" (the worker is not among them: NVML may see other process ids in a container)" if worker_pid else "")]
    lines = [f"Processes on GPU {sample.index}:", f"    {'PID':>8}  {'Memory':>10}  Name"]
    for proc in sample.processes:
        is_worker = proc.pid == worker_pid
        line = f"{'>>' if is_worker else '  '}  {proc.pid:>8}  {fmt_bytes(proc.used_bytes):>10}  {proc.name}"
        if is_worker:
            line += "   <- training worker"
            if tty:
                line = _BOLD + line + _RESET
        lines.append(line)
    return lines


def _run_lines(run_dir: Path, state: RunState, worker_pid: int | None, tty: bool) -> list[str]:
    worker = f"worker pid {worker_pid}" if worker_pid else "no worker running"
    lines = [f"Run {run_dir.name}: {state.status}, {worker}"]
    step = state.last_step
    if step is not None:
        lines.append(
            f"  step {step.get('step', '?')}: allocated {fmt_bytes(step.get('mem_allocated'))}, "
            f"reserved {fmt_bytes(step.get('mem_reserved'))}, peak {fmt_bytes(step.get('mem_peak'))}"
        )
        paged = step.get("paged_state_bytes")
        if paged:
            lines.append(f"  paged optimizer state: {fmt_bytes(paged)}")
    lines.append("  " + state.paging.status_line())
    for event in state.paging.recent:
        lines.append("    " + describe_paging(event))
    return lines
