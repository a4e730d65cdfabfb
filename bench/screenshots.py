"""Screenshots of the app's pages during a real demo run, for the README (docs/screenshots/*.png).

It opens the real main window on an X display, lets it prepare the demo exactly as a first launch
does (the Model page with its memory estimate, the Dataset page), presses Start on the preselected
demo, and captures the Training and GPU Monitor pages while the run trains; it lets the run finish
and captures the Training, Runs and Export pages with the finished run; then, on the Playground, it
asks the base model and the fine-tuned one a question of the demo's data and captures both answers.
Nothing is staged: the charts show the run's real events and the answers are the models' own.

Run from the repository root (it starts a private Xvfb display; needs ``xvfb``):

    python bench/screenshots.py

Options: ``--out DIR`` (default docs/screenshots), ``--steps N`` (loss points to wait for before the
Training page is captured), ``--scale F`` (QT_SCALE_FACTOR, e.g. 1.25 or 2 to check readability),
``--prompt TEXT`` (the Playground's question; the default is in the demo's data).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZE = (1440, 900)
PROMPT = "What is the capital of Japan?"  # the demo's data answers "Tokyo."


def wait(app, condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        app.processEvents()
        time.sleep(0.02)


def settle(app, seconds: float = 0.6) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.02)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--scale", type=float, default=None)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--home", type=Path, default=None, help="the app's data folder (default: a fresh temporary one)")
    args = parser.parse_args()
    from virtual_display import start_xvfb  # beside this script

    xvfb = start_xvfb("3840x2400x24" if (args.scale or 1) > 1.5 else "1920x1200x24")
    if args.scale:
        os.environ["QT_SCALE_FACTOR"] = str(args.scale)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT))

    from qlora_studio.gui.app import make_application
    from qlora_studio.gui.app_state import AppState
    from qlora_studio.gui.main_window import MainWindow
    from qlora_studio.gui.supervisor import Outcome

    try:
        app = make_application()
        home = args.home
        if home is None:
            # The script's own scratch folder, with a plain name since it shows in the pictures.
            home = Path(tempfile.gettempdir()) / "qlora-studio-screenshots"
            shutil.rmtree(home, ignore_errors=True)
        window = MainWindow(AppState.create(home))
        window.resize(*SIZE)
        window.show()
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = f"@{args.scale:g}x" if args.scale else ""

        def shot(page, name: str) -> None:
            window.tabs.setCurrentWidget(page)
            settle(app)
            window.training_page.charts.flush()
            settle(app, 0.3)
            path = args.out / f"{name}{suffix}.png"
            window.grab().save(str(path))
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

        # First launch: the demo is created in the background, then the pages read it.
        wait(app, lambda: (window.state.demo_dir / "config.toml").exists(), 300, "the demo to be created")
        wait(app, lambda: window.model_page.facts is not None, 60, "the model's config.json")
        wait(app, lambda: window.dataset_page.lengths.size > 0, 120, "the dataset scan")
        shot(window.model_page, "model")
        shot(window.dataset_page, "dataset")

        window.training_page.start_button.click()
        wait(app, lambda: window.training_page.charts.point_count("loss") >= args.steps, 900, f"{args.steps} loss points")
        shot(window.training_page, "training")
        shot(window.monitor_page, "monitor")

        wait(app, lambda: not window.run.running, 1800, "the run to finish")
        result = window.last_result
        if result is None or result.outcome != Outcome.FINISHED:
            raise SystemExit(f"the demo run did not finish: {result.message if result else 'no result'}")
        shot(window.training_page, "training-finished")
        window.runs_page.refresh()
        wait(app, lambda: window.runs_page.table.rowCount() >= 1, 30, "the runs list")
        window.runs_page.table.selectRow(0)  # hands the run to the Playground and Export pages
        shot(window.runs_page, "runs")
        window.export_page.refresh()
        shot(window.export_page, "export")

        playground = window.playground_page
        window.tabs.setCurrentWidget(playground)  # starts its worker, which loads torch meanwhile
        playground.prompt.setPlainText(args.prompt)
        playground.generate()
        wait(app, lambda: playground.active is None, 600, "both answers in the Playground")
        answers = playground.answers()
        if set(playground.last_done) != {"base", "tuned"}:
            raise SystemExit(f"the Playground did not answer on both sides: {playground.status.text()}")
        shot(playground, "playground")
        print(f"base model: {answers['base'][:80]!r}\nfine-tuned: {answers['tuned'][:80]!r}")
        window.close()
    finally:
        xvfb.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
