"""How fast and how steady the desktop app is (issue 3, item 9).

Goals: the window visible within 2 s of launch on a 2-core machine; while a run streams 20 events
per second the GUI event loop's p99 latency under 50 ms; chart memory flat over hours.

1. **Launch.** ``python -m qlora_studio`` (what the ``qlora-studio`` command runs) is started
   ``--launches`` times with a fresh data folder (a first launch, which also starts building the
   demo in the background) and with a prepared one (a later launch). The time is from the process
   start until the X server reports a window titled "QLoRA Studio" as viewable (``xwininfo``) on a
   private Xvfb display that the script starts (needs ``xvfb`` and ``x11-utils``).
2. **Event-loop latency.** The real main window, with a stand-in worker process that prints
   realistic event lines at ``--rate`` per second for ``--seconds`` (training itself is not what is
   measured; a GPU worker uses little of the GUI machine's CPU). A 10 ms precise timer runs in the
   GUI thread; its lateness is the event loop's latency. A quiet baseline of the same length is
   measured first.
3. **Chart memory.** ``--points`` step events (432 000 = 6 hours at 20 per second) go straight into
   the Training page's charts; the process's resident memory and the charts' own bytes are sampled
   as they grow. The whole window (Monitor page included) is measured the same way over
   ``--window-points`` events.

Run:  python bench/gui_latency.py
Writes bench/results/gui_latency-<date>-<commit>.json and prints the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TITLE = "QLoRA Studio"
MiB = float(1 << 20)


# ---------------------------------------------------------------------------------------------
# the stand-in worker: realistic event lines at a fixed rate


def stream_child(rate: float, seconds: float) -> int:
    def emit(kind: str, **fields) -> None:
        sys.stdout.write(json.dumps({"v": 1, "type": kind, "time": time.time(), **fields}) + "\n")
        sys.stdout.flush()

    total = int(rate * seconds)
    emit("run_started", run_dir="bench", config={}, model={"name": "bench"}, device={"kind": "cuda", "name": "bench"},
         versions={}, plan={"max_steps": total})
    emit("data_ready", format="alpaca", train_examples=10_000, val_examples=100, truncated=0, max_seq_len=1024)
    rng = random.Random(0)
    loss = 2.5
    start = time.monotonic()
    for step in range(1, total + 1):
        loss = max(0.05, loss * 0.9995 + rng.gauss(0, 0.05))
        emit("step", step=step, epoch=step / 1000, loss=loss, lr=2e-4, grad_norm=0.3 + rng.random() * 0.1,
             tokens=step * 4096, tokens_per_s=9000 + rng.gauss(0, 300), step_s=1 / rate,
             mem_allocated=5_000_000_000, mem_reserved=6_000_000_000, mem_peak=6_500_000_000)
        if step % 100 == 0:
            emit("eval", step=step, loss=loss * 1.1, perplexity=math.exp(loss * 1.1))
        if step % 500 == 0:
            emit("checkpoint", step=step, path=f"checkpoints/step-{step:08d}")
        if step % 20 == 0:
            sys.stderr.write(f"step {step}: loss {loss:.4f}\n")
            sys.stderr.flush()
        delay = start + step / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    emit("finished", step=total, adapter="bench/adapter", train_loss=loss, eval_loss=None, tokens=total * 4096,
         duration_s=time.monotonic() - start)
    return 0


# ---------------------------------------------------------------------------------------------
# 1. launch to visible


def window_viewable(display_env: dict[str, str]) -> bool:
    out = subprocess.run(["xwininfo", "-name", TITLE], capture_output=True, text=True, env=display_env)
    return out.returncode == 0 and "IsViewable" in out.stdout


def measure_launch(home: Path, timeout_s: float = 30.0) -> float:
    env = dict(os.environ)
    env["QLORA_STUDIO_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("QT_QPA_PLATFORM", None)  # the real X display
    stderr = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qlora_studio"], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        while time.perf_counter() - t0 < timeout_s:
            if window_viewable(env):
                return time.perf_counter() - t0
            if proc.poll() is not None:
                stderr.seek(0)
                tail = stderr.read().decode("utf-8", "replace")[-3000:]
                raise RuntimeError(f"the app exited with code {proc.returncode} before showing its window:\n{tail}")
            time.sleep(0.01)
        raise RuntimeError(f"no window titled {TITLE!r} within {timeout_s} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the app and the demo builder it may have started
        except ProcessLookupError:
            pass
        proc.wait()
        stderr.close()
        deadline = time.perf_counter() + 5
        while window_viewable(env) and time.perf_counter() < deadline:
            time.sleep(0.05)


def launch_part(launches: int, demo: Path | None) -> dict:
    if shutil.which("xwininfo") is None:
        return {"skipped": "needs xwininfo (Debian/Ubuntu: apt-get install x11-utils)"}
    first, later = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(launches):
            fresh = Path(tmp) / f"fresh-{i}"
            first.append(measure_launch(fresh))
        prepared = Path(tmp) / "prepared"
        prepared.mkdir()
        if demo is not None:
            shutil.copytree(demo, prepared / "demo")
        measure_launch(prepared)  # writes the settings a later launch finds
        for _ in range(launches):
            later.append(measure_launch(prepared))
    return {
        "first_launch_s": [round(x, 3) for x in first],
        "later_launch_s": [round(x, 3) for x in later],
        "first_launch_median_s": round(statistics.median(first), 3),
        "later_launch_median_s": round(statistics.median(later), 3),
        "worst_s": round(max(first + later), 3),
    }


# ---------------------------------------------------------------------------------------------
# 2. event-loop latency while events stream, 3. chart memory


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q / 100 * len(ordered))) - 1)]


def latency_stats(lateness_ms: list[float]) -> dict:
    return {
        "samples": len(lateness_ms),
        "p50_ms": round(percentile(lateness_ms, 50), 2),
        "p99_ms": round(percentile(lateness_ms, 99), 2),
        "max_ms": round(max(lateness_ms), 2),
    }


def in_process_parts(rate: float, seconds: float, points: int, window_points: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import psutil
    from PySide6.QtCore import QEventLoop, Qt, QTimer

    from qlora_studio.gui.app import make_application
    from qlora_studio.gui.app_state import AppState
    from qlora_studio.gui.main_window import MainWindow
    from qlora_studio.gui.pages.training_page import TrainingPage

    app = make_application()
    tmp = Path(tempfile.mkdtemp(prefix="gui-bench-"))
    window = MainWindow(AppState.create(tmp / "home"), prepare_demo=False)
    window.show()
    window.tabs.setCurrentWidget(window.training_page)
    process = psutil.Process()

    def measure_loop(duration_s: float, start=None) -> tuple[list[float], int]:
        """Lateness of a 10 ms timer in ms, while the event loop runs for duration_s."""
        ticks: list[float] = []
        timer = QTimer()
        timer.setTimerType(Qt.TimerType.PreciseTimer)
        timer.setInterval(10)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        events = []
        window.run.event.connect(events.append)
        loop = QEventLoop()
        QTimer.singleShot(int(duration_s * 1000), loop.quit)
        timer.start()
        if start is not None:
            start()
        loop.exec()
        timer.stop()
        window.run.event.disconnect(events.append)
        gaps = [(b - a) * 1000 - 10 for a, b in zip(ticks, ticks[1:], strict=False)]
        return [max(0.0, g) for g in gaps], len(events)

    quiet, _ = measure_loop(min(seconds, 10))

    def start_stream() -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--stream-child", "--rate", str(rate), "--seconds", str(seconds)]
        window.run.start_command(argv, tmp / "run", "benchmark stream")

    streaming, received = measure_loop(seconds + 1, start_stream)
    deadline = time.monotonic() + 10
    while window.run.running and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.01)

    # Chart memory: events straight into a Training page's charts, as fast as they go.
    page = TrainingPage()
    page.show()
    rss = []
    rng = random.Random(1)
    t0 = time.perf_counter()
    checkpoints = sorted({int(points * f / 10) for f in range(1, 11)})
    loss = 2.5
    for step in range(1, points + 1):
        loss = max(0.05, loss * 0.99999 + rng.gauss(0, 0.05))
        page.on_event({"type": "step", "step": step, "loss": loss, "lr": 2e-4, "tokens_per_s": 9000.0, "time": time.time()})
        if step % 100 == 0:
            page.on_event({"type": "eval", "step": step, "loss": loss, "perplexity": 1.0})
        if step % 2000 == 0:
            page.charts.flush()
            app.processEvents()
        if step in checkpoints:
            rss.append((step, process.memory_info().rss / MiB))
    feed_s = time.perf_counter() - t0
    charts = {
        "points": points,
        "hours_at_rate": round(points / rate / 3600, 2),
        "rss_mib": [(s, round(m, 1)) for s, m in rss],
        "rss_growth_second_half_mib": round(rss[-1][1] - rss[len(rss) // 2 - 1][1], 1),
        "chart_bytes": page.charts.nbytes,
        "points_held_loss_curve": page.charts.point_count("loss"),
        "feed_us_per_event": round(feed_s / points * 1e6, 1),
    }
    page.close()

    # The whole window: the same stream through the main window (Training and Monitor pages).
    whole = []
    checkpoints = sorted({int(window_points * f / 10) for f in range(1, 11)})
    base = time.time()
    t0 = time.perf_counter()
    for step in range(1, window_points + 1):
        event = {"type": "step", "step": step, "loss": 1.0 + rng.random(), "lr": 2e-4, "tokens_per_s": 9000.0,
                 "time": base + step / rate, "mem_allocated": 5e9, "mem_reserved": 6e9, "mem_peak": 6.5e9}
        window._on_event(event)
        if step % 200 == 0:
            app.processEvents()
        if step in checkpoints:
            whole.append((step, round(process.memory_info().rss / MiB, 1)))
    window_feed_s = time.perf_counter() - t0
    window.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "platform": app.platformName(),
        "quiet_loop": latency_stats(quiet),
        "streaming_loop": {**latency_stats(streaming), "rate_per_s": rate, "seconds": seconds, "events_received": received},
        "charts": charts,
        "whole_window": {
            "points": window_points,
            "rss_mib": whole,
            "rss_growth_second_half_mib": round(whole[-1][1] - whole[len(whole) // 2 - 1][1], 1),
            "feed_us_per_event": round(window_feed_s / window_points * 1e6, 1),
        },
    }


# ---------------------------------------------------------------------------------------------


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return out.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=5)
    parser.add_argument("--demo", type=Path, help="a demo folder to copy into the prepared data folder (default: build one)")
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--points", type=int, default=432_000)
    parser.add_argument("--window-points", type=int, default=72_000)
    parser.add_argument("--skip-launch", action="store_true")
    parser.add_argument("--stream-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_child:
        return stream_child(args.rate, args.seconds)
    sys.path.insert(0, str(ROOT / "bench"))
    from virtual_display import start_xvfb

    xvfb = start_xvfb("1600x1000x24")
    try:
        result: dict = {
            "date": dt.datetime.now().isoformat(timespec="seconds"),
            "commit": git_commit(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_at_start": [round(x, 2) for x in os.getloadavg()]},
        }
        if not args.skip_launch:
            demo = args.demo
            tmp_demo = None
            if demo is None:
                tmp_demo = Path(tempfile.mkdtemp(prefix="gui-bench-demo-"))
                demo = tmp_demo / "demo"
                subprocess.run([sys.executable, "-m", "qlora_studio", "demo", str(demo)], check=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True)
            result["launch"] = launch_part(args.launches, demo)
            if tmp_demo is not None:
                shutil.rmtree(tmp_demo, ignore_errors=True)
        result.update(in_process_parts(args.rate, args.seconds, args.points, args.window_points))

        result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        xvfb.terminate()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"gui_latency-{dt.date.today().isoformat()}-{result['commit']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
