"""A long demo run on the CPU with the window attached: does the GUI's memory stay flat, and does
the event log stay small?

The worker trains the demo for --steps steps (micro-batch 1, 64 tokens, so steps are quick) in a
runs folder; the main window, opened on that folder offscreen, attaches to the run and follows its
events as a person's window would. Every --every seconds the window's resident memory and the size
of events.jsonl are sampled.

    python bench/long_run.py [--steps 20000]

Prints the samples and a summary; writes bench/results/long_run-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--every", type=float, default=30.0, help="seconds between samples")
    args = ap.parse_args()

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    home = Path(tempfile.mkdtemp(prefix="qlora-long-"))
    os.environ["QLORA_STUDIO_HOME"] = str(home)
    subprocess.run([sys.executable, "-m", "qlora_studio", "demo", str(home / "demo")], check=True, stdout=subprocess.DEVNULL)
    data = tomllib.loads((home / "demo" / "config.toml").read_text())
    data["data"]["max_seq_len"] = 64
    data["train"].update(micro_batch_size=1, max_steps=args.steps, checkpoint_every=2000, log_every=0)
    config = home / "demo" / "long.toml"
    config.write_text(tomli_w.dumps(data))

    import psutil
    from PySide6.QtWidgets import QApplication

    from qlora_studio.gui.app_state import AppState
    from qlora_studio.gui.main_window import MainWindow

    app = QApplication.instance() or QApplication([])
    state = AppState.create(home)
    run_dir = state.runs_dir / "long"
    worker = subprocess.Popen([sys.executable, "-m", "qlora_studio", "train", str(config), "--output", str(run_dir)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (run_dir / "worker.pid").exists() and worker.poll() is None:
        time.sleep(0.2)
    window = MainWindow(state, prepare_demo=False)
    window.ask_close_during_run = lambda: "stop"
    window.show()
    me = psutil.Process()
    samples = []
    t0 = time.time()
    next_sample = t0
    while worker.poll() is None:
        app.processEvents()
        if time.time() >= next_sample:
            events = run_dir / "events.jsonl"
            size = events.stat().st_size if events.exists() else 0
            lines = sum(1 for _ in open(events, "rb")) if events.exists() else 0
            step = window.training_page.progress.value() if hasattr(window.training_page, "progress") else None
            samples.append({"t_s": round(time.time() - t0), "gui_rss_mb": round(me.memory_info().rss / 2**20, 1),
                            "events_bytes": size, "events_lines": lines, "progress": step})
            print(samples[-1], flush=True)
            next_sample += args.every
        time.sleep(0.02)
    for _ in range(50):
        app.processEvents()
        time.sleep(0.02)
    window.close()
    events = run_dir / "events.jsonl"
    steps_done = sum(1 for line in open(events) if '"type":"step"' in line)
    warm = [s["gui_rss_mb"] for s in samples if s["t_s"] >= 60] or [s["gui_rss_mb"] for s in samples]
    result = {
        "steps": args.steps, "worker_exit": worker.returncode, "duration_s": round(time.time() - t0),
        "gui_rss_mb_after_1min": warm[0], "gui_rss_mb_end": warm[-1], "gui_rss_mb_max": max(warm),
        "events_bytes": events.stat().st_size, "events_lines": sum(1 for _ in open(events)), "step_events": steps_done,
        "samples": samples,
    }
    print(f"{args.steps} steps in {result['duration_s']} s (worker exit {worker.returncode}); GUI memory "
          f"{result['gui_rss_mb_after_1min']} MB after a minute, {result['gui_rss_mb_end']} MB at the end "
          f"(max {result['gui_rss_mb_max']}); events.jsonl {result['events_bytes'] / 1e6:.2f} MB, "
          f"{result['step_events']} step events")
    write_result("long_run", result)
    return 0 if worker.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
