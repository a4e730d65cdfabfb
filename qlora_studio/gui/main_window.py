"""The main window: seven pages, the menus, the settings it remembers, and the run's life cycle.

The pages edit parts of one :class:`~qlora_studio.config.RunConfig`; :meth:`MainWindow.collect_config`
assembles it over the last loaded configuration, so keys no page shows survive a save/load round
trip. Runs go through :class:`~qlora_studio.gui.run_control.RunControl` (a worker process).

On first launch the demo (tiny model, sample data) is preselected and created in the background;
pressing Start before it is ready starts the run as soon as it is. A run that trains without a
window (left in the background, outliving a crashed window, or started from the command line) is
followed on the Training page as soon as the Runs page's listing finds it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence
from PySide6.QtWidgets import (
    QFileDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from .. import __version__, runs
from .. import config as cfgmod
from ..errors import UserError
from . import jobs, presets, vram
from .app_state import DISPLAY_NAME, AppState
from .demo_setup import DemoSetup, demo_ready
from .jobs import FunctionJob, LatestOnlyRunner
from .pages.dataset_page import DatasetPage
from .pages.export_page import ExportPage
from .pages.model_page import ModelPage
from .pages.playground_page import PlaygroundPage
from .pages.runs_page import RunsPage
from .pages.training_page import TrainingPage
from .run_control import RunControl
from .supervisor import Outcome, RunResult

try:  # written by the monitor work; the window works without it
    from .pages.monitor_page import MonitorPage
except ImportError:  # pragma: no cover - depends on what is installed
    MonitorPage = None  # type: ignore[assignment,misc]

CONFIG_FILTER = "Run configuration (*.toml);;All files (*)"
PAGE_TITLES = ("Model", "Dataset", "Training", "GPU Monitor", "Export", "Playground", "Runs")  # Ctrl+1 … Ctrl+7
PAGE_NAMES = ("modelPage", "datasetPage", "trainingPage", "monitorPage", "exportPage", "playgroundPage", "runsPage")


def demo_config(demo_dir: Path) -> cfgmod.RunConfig:
    """The demo's configuration with absolute paths (usable before the demo folder exists)."""
    config_file = demo_dir / "config.toml"
    if config_file.is_file():
        cfg = cfgmod.load(config_file)
    else:
        from ..engine.demo import demo_config as engine_demo_config  # torch-free module

        cfg = engine_demo_config()
    return cfgmod.replace(
        cfg,
        model={"name_or_path": str(demo_dir / "model")},
        data={"path": str(demo_dir / "data.jsonl")},
    )


def resolve_relative(cfg: cfgmod.RunConfig, base: Path) -> cfgmod.RunConfig:
    """Paths in a configuration file are relative to its folder; the window holds absolute ones."""
    def resolve(spec: str) -> str:
        if not spec:
            return spec
        path = Path(spec).expanduser()
        if path.is_absolute():
            return spec
        candidate = base / path
        return str(candidate.resolve()) if candidate.exists() else spec

    return cfgmod.replace(
        cfg,
        model={"name_or_path": resolve(cfg.model.name_or_path)},
        data={"path": resolve(cfg.data.path), "val_path": resolve(cfg.data.val_path)},
    )


class MainWindow(QMainWindow):
    def __init__(self, state: AppState | None = None, *, prepare_demo: bool = True):
        super().__init__()
        self.state = state or AppState.create()
        self.setWindowTitle(DISPLAY_NAME)
        self.setObjectName("mainWindow")
        self.base_config = cfgmod.RunConfig()
        self.failure_dialog: QMessageBox | None = None
        self.last_result: RunResult | None = None
        self._start_when_demo_ready = False
        self._close_when_done = False
        self._first_listing = True  # a run found training at start-up gets the Training page shown
        self._applying = False
        self._model_info: Any = None
        self._gpu: vram.GpuMemory | None = None
        self._estimates = LatestOnlyRunner(self)
        self._estimate_timer = QTimer(self)
        self._estimate_timer.setSingleShot(True)
        self._estimate_timer.setInterval(300)
        self._estimate_timer.timeout.connect(self.update_estimate)

        self.run = RunControl(self.state.staging_dir, self)
        self.demo = DemoSetup(self.state.demo_dir, self)

        self._build_pages()
        self._build_menus()
        self._connect()
        if prepare_demo:
            self._ensure_demo()
        self._restore()
        self._read_gpu()
        self.runs_page.refresh()  # in the background: what Resume would continue

    # ------------------------------------------------------------------ construction

    def _build_pages(self) -> None:
        self.model_page = ModelPage()
        self.dataset_page = DatasetPage()
        self.training_page = TrainingPage()
        if MonitorPage is not None:
            self.monitor_page: QWidget = MonitorPage()
        else:
            self.monitor_page = QWidget()
            QVBoxLayout(self.monitor_page).addWidget(QLabel("The GPU monitor is not part of this build."))
        self.export_page = ExportPage(runs_dir=self.state.runs_dir)  # lists the runs when first shown
        self.playground_page = PlaygroundPage()
        self.runs_page = RunsPage(self.state.runs_dir)
        self.estimate_panels = (self.model_page.estimate, self.training_page.estimate)
        self.tabs = QTabWidget()
        self.tabs.setObjectName("pages")
        self.tabs.setDocumentMode(True)
        pages = (self.model_page, self.dataset_page, self.training_page, self.monitor_page, self.export_page,
                 self.playground_page, self.runs_page)
        for page, title, name in zip(pages, PAGE_TITLES, PAGE_NAMES, strict=True):
            page.setObjectName(name)
            index = self.tabs.addTab(page, title)
            self.tabs.setTabToolTip(index, f"{title} (Ctrl+{index + 1})")
        self.setCentralWidget(self.tabs)
        self.demo_label = QLabel()
        self.demo_label.setObjectName("demoStatus")
        self.statusBar().addPermanentWidget(self.demo_label)
        self.resize(1280, 820)

    def _build_menus(self) -> None:
        def action(text: str, shortcut: Any, slot: Any, name: str) -> QAction:
            act = QAction(text, self)
            act.setObjectName(name)
            if shortcut is not None:
                act.setShortcut(QKeySequence(shortcut))
            act.triggered.connect(slot)
            self.addAction(act)
            return act

        file_menu = self.menuBar().addMenu("&File")
        file_menu.addAction(action("&Open configuration…", QKeySequence.StandardKey.Open, self._open_config_dialog, "openConfig"))
        file_menu.addAction(
            action("&Save configuration as…", QKeySequence.StandardKey.Save, self._save_config_dialog, "saveConfig")
        )
        file_menu.addAction(action("Use the &demo", None, self.use_demo, "useDemo"))
        file_menu.addSeparator()
        file_menu.addAction(action("&Quit", QKeySequence.StandardKey.Quit, self.close, "quit"))

        run_menu = self.menuBar().addMenu("&Run")
        self.start_action = action("&Start", "F5", self.start_run, "startAction")
        self.stop_action = action("S&top", "Shift+F5", self.stop_run, "stopAction")
        self.resume_action = action("Resu&me last run", None, self.resume_last, "resumeAction")
        for act in (self.start_action, self.stop_action, self.resume_action):
            run_menu.addAction(act)

        view_menu = self.menuBar().addMenu("&View")
        for i, title in enumerate(PAGE_TITLES):
            show = lambda _=False, i=i: self.tabs.setCurrentIndex(i)  # noqa: E731 - one per page
            view_menu.addAction(action(title, f"Ctrl+{i + 1}", show, f"page{i + 1}"))

        help_menu = self.menuBar().addMenu("&Help")
        help_menu.addAction(action("&About QLoRA Studio", None, self._about, "about"))

    def _connect(self) -> None:
        t = self.training_page
        t.start_requested.connect(self.start_run)
        t.stop_requested.connect(self.stop_run)
        t.resume_requested.connect(self.resume_last)
        t.preset_chosen.connect(self.apply_preset)
        t.grace.valueChanged.connect(lambda v: setattr(self.run, "grace_s", float(v)))
        for page in (self.model_page, self.dataset_page, self.training_page):
            page.changed.connect(self._settings_changed)
        self.model_page.demo_requested.connect(self.use_demo_model)
        self.model_page.source_committed.connect(self._model_committed)
        self.model_page.facts_loaded.connect(self._model_facts)
        self.dataset_page.source_committed.connect(lambda text: self._remember("datasets", text))
        self.runs_page.resume_requested.connect(self.resume_run)
        self.runs_page.listed.connect(self._update_resume)
        self.runs_page.listed.connect(self._attach_to_running)
        self.runs_page.run_selected.connect(self._run_selected)
        bar = self.statusBar()
        self.playground_page.failed.connect(lambda message: bar.showMessage(f"Playground: {message}", 15000))
        self.export_page.exported.connect(lambda out: bar.showMessage(f"Exported to {out}", 15000))
        self.export_page.failed.connect(lambda message: bar.showMessage(message, 15000))

        self.run.started.connect(self._run_started)
        self.run.event.connect(self._on_event)
        self.run.log_line.connect(self.training_page.append_log)
        self.run.worker_pid.connect(self._worker_pid)
        self.run.escalated.connect(self._escalated)
        self.run.ended.connect(self._run_ended)

        self.demo.ready.connect(self._demo_ready)
        self.demo.failed.connect(self._demo_failed)

    # ------------------------------------------------------------------ settings and restore

    def _restore(self) -> None:
        s = self.state
        geometry = s.geometry("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        window_state = s.geometry("state")
        if window_state is not None:
            self.restoreState(window_state)
        for i, splitter in enumerate(self.training_page.splitters):
            saved = s.geometry(f"training_splitter_{i}")
            if saved is not None:
                splitter.restoreState(saved)
        self.training_page.grace.setValue(int(s.get("run/stop_grace_s", 60, int)))
        self.run.grace_s = float(self.training_page.grace.value())
        self.model_page.source.set_recent(s.recent("models"))
        self.dataset_page.source.set_recent(s.recent("datasets"))

        cfg = None
        text = s.last_config_toml()
        if text:
            try:
                cfg = cfgmod.loads(text, "the last session's settings")
            except UserError:
                cfg = None  # settings of an older version: start from the demo instead
        if cfg is None:
            cfg = presets.apply(demo_config(self.state.demo_dir), "Quick demo")
        self.apply_config(cfg)
        page = self.findChild(QWidget, str(s.get("window/page_name", "trainingPage", str)))
        self.tabs.setCurrentWidget(page if page is not None and self.tabs.indexOf(page) >= 0 else self.training_page)

    def save_settings(self) -> None:
        s = self.state
        s.set_geometry("geometry", self.saveGeometry())
        s.set_geometry("state", self.saveState())
        for i, splitter in enumerate(self.training_page.splitters):
            s.set_geometry(f"training_splitter_{i}", splitter.saveState())
        s.set("window/page_name", self.tabs.currentWidget().objectName())  # by name: pages may be added
        s.set("run/stop_grace_s", self.training_page.grace.value())
        try:
            s.set_last_config_toml(self.collect_config().to_toml())
        except UserError:
            pass  # an incomplete form is not worth remembering over the last good one
        s.sync()

    def _remember(self, kind: str, text: str) -> None:
        items = self.state.add_recent(kind, text)
        field = self.model_page.source if kind == "models" else self.dataset_page.source
        field.set_recent(items)

    # ------------------------------------------------------------------ the configuration

    def apply_config(self, cfg: cfgmod.RunConfig) -> None:
        self._applying = True
        try:
            self.base_config = cfg
            self.model_page.apply_config(cfg)
            self.dataset_page.set_model(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
            self.dataset_page.apply_config(cfg)
            self.training_page.apply_config(cfg)
        finally:
            self._applying = False
        self._settings_changed()

    def collect_config(self) -> cfgmod.RunConfig:
        """The configuration the pages show; raises ConfigError for an invalid value."""
        data = self.base_config.to_dict()
        self.model_page.update_config(data)
        self.dataset_page.update_config(data)
        self.training_page.update_config(data)
        return cfgmod.from_dict(data, "the app's settings")

    def load_config_file(self, path: Path) -> cfgmod.RunConfig:
        cfg = resolve_relative(cfgmod.load(path), Path(path).resolve().parent)
        self.apply_config(cfg)
        self.statusBar().showMessage(f"Loaded {path}", 5000)
        return cfg

    def save_config_file(self, path: Path) -> cfgmod.RunConfig:
        cfg = self.collect_config()
        cfg.save(path)
        self.base_config = cfg
        self.statusBar().showMessage(f"Saved {path}", 5000)
        return cfg

    def apply_preset(self, name: str) -> None:
        try:
            cfg = presets.apply(self.collect_config(), name)
        except UserError as exc:
            self.show_error("Cannot apply the preset", exc.one_line())
            return
        self.apply_config(cfg)

    def _settings_changed(self) -> None:
        if self._applying:
            return
        self._estimate_timer.start()
        try:
            cfg = self.collect_config()
        except UserError:
            self.training_page.show_preset(presets.CUSTOM)
            return
        self.training_page.show_preset(presets.matching(cfg))

    def _open_config_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a run configuration", str(self.state.home), CONFIG_FILTER)
        if path:
            try:
                self.load_config_file(Path(path))
            except UserError as exc:
                self.show_error("Cannot load the configuration", exc.one_line())

    def _save_config_dialog(self) -> None:
        suggested = str(self.state.home / "config.toml")
        path, _ = QFileDialog.getSaveFileName(self, "Save the run configuration", suggested, CONFIG_FILTER)
        if path:
            try:
                self.save_config_file(Path(path))
            except (UserError, OSError) as exc:
                self.show_error("Cannot save the configuration", str(exc))

    # ------------------------------------------------------------------ model and demo

    def _model_committed(self, text: str) -> None:
        self._remember("models", text)
        self.dataset_page.set_model(text, self.model_page.revision.text().strip() or "main",
                                    self.model_page.trust_remote_code.isChecked())

    def _model_facts(self, answer: dict[str, Any] | None) -> None:
        self._model_info = answer["info"] if answer else None
        self._estimate_timer.start()

    def _read_gpu(self) -> None:
        job = FunctionJob(vram.read_gpu, parent=self)
        job.succeeded.connect(self._gpu_read)
        job.finished.connect(job.deleteLater)
        job.start()

    def _gpu_read(self, gpu: vram.GpuMemory | None) -> None:
        self._gpu = gpu
        self._estimate_timer.start()

    def update_estimate(self) -> None:
        """Re-estimate the GPU memory of the settings on screen, off the GUI thread.

        An estimate with suggestions takes 30–350 ms, so it runs as a background job. Requests are
        coalesced (:class:`~qlora_studio.gui.jobs.LatestOnlyRunner`): one job runs at a time, a
        request made meanwhile waits (a newer one replaces it), and only the answer to the latest
        request is shown.
        """
        if self._model_info is None:
            self._estimates.cancel()
            self._show_estimate_text("")
            return
        try:
            cfg = self.collect_config()
        except UserError as exc:
            self._estimates.cancel()
            self._show_estimate_text(f"No memory estimate: {exc.one_line()}")
            return
        gpu = self._gpu
        self._estimates.submit(vram.compute, self._model_info, cfg, gpu,
                               on_success=lambda result, g=gpu: self._estimate_ready(result, g),
                               on_failure=self._estimate_failed)

    def _estimate_ready(self, result: Any, gpu: vram.GpuMemory | None) -> None:
        for panel in self.estimate_panels:
            panel.show_estimate(result, gpu)
        self._set_estimated_peak(result.peak)

    def _estimate_failed(self, exc: BaseException) -> None:
        if isinstance(exc, UserError):
            self._show_estimate_text(f"No memory estimate: {exc.one_line()}")
        elif isinstance(exc, ImportError):
            self._show_estimate_text("")  # a build without the estimate module
        else:
            self._show_estimate_text(f"No memory estimate: {type(exc).__name__}: {exc}")

    def _show_estimate_text(self, text: str) -> None:
        for panel in self.estimate_panels:
            panel.show_text(text)
        self._set_estimated_peak(None)

    def _set_estimated_peak(self, peak: int | None) -> None:
        set_peak = getattr(self.monitor_page, "set_estimated_peak", None)
        if set_peak is not None:
            set_peak(peak)

    def _ensure_demo(self) -> None:
        if demo_ready(self.state.demo_dir):
            self.demo_label.setText("")
            return
        if self.demo.isRunning():
            return
        if self.demo.start():
            self.demo_label.setText("Preparing the demo model…")
            note = (str(self.state.demo_dir), "The demo is being created (a few seconds on first launch)…")
            self.model_page.waiting_for = self.dataset_page.waiting_for = note
            self.model_page.refresh_facts()
            self.dataset_page.rescan()

    def _demo_ready(self, demo_dir: Path) -> None:
        self.model_page.waiting_for = self.dataset_page.waiting_for = None
        self.demo_label.setText("Demo ready.")
        QTimer.singleShot(5000, self.demo_label.clear)
        # Fields pointing at the demo can now be read.
        if self.model_page.source.text().startswith(str(demo_dir)):
            self.model_page.refresh_facts()
        if self.dataset_page.source.text().startswith(str(demo_dir)):
            self.dataset_page.rescan()
        if self._start_when_demo_ready:
            self._start_when_demo_ready = False
            self.start_run()

    def _demo_failed(self, message: str) -> None:
        self.model_page.waiting_for = self.dataset_page.waiting_for = None
        self.demo_label.setText("The demo could not be created.")
        if self._start_when_demo_ready:
            self._start_when_demo_ready = False
            self.training_page.set_running(False)
        self.show_error("Demo", message)

    def use_demo_model(self) -> None:
        self.model_page.set_source(str(self.state.demo_dir / "model"))
        self._ensure_demo()

    def use_demo(self) -> None:
        """Model, dataset and settings of the demo."""
        self.apply_config(presets.apply(demo_config(self.state.demo_dir), "Quick demo"))
        self._ensure_demo()

    def _uses_demo(self, cfg: cfgmod.RunConfig) -> bool:
        demo = str(self.state.demo_dir)
        return cfg.model.name_or_path.startswith(demo) or cfg.data.path.startswith(demo)

    # ------------------------------------------------------------------ runs

    def start_run(self) -> None:
        if self.run.running:
            return
        try:
            cfg = self.collect_config()
            cfg.require_complete("the app's settings")
        except UserError as exc:
            self.show_error("Cannot start", exc.one_line())
            return
        if self._uses_demo(cfg) and not demo_ready(self.state.demo_dir):
            self._start_when_demo_ready = True
            self._ensure_demo()
            self.training_page.set_running(True)  # Stop cancels the pending start
            self.training_page.status.setText("The run starts as soon as the demo model is ready…")
            return
        self._remember("models", cfg.model.name_or_path)
        self._remember("datasets", cfg.data.path)
        self.base_config = cfg
        try:
            self.run.start_new(cfg, self.state.runs_dir)
        except (UserError, OSError) as exc:
            self.show_error("Cannot start", str(exc))

    def stop_run(self) -> None:
        if self._start_when_demo_ready and not self.run.running:
            self._start_when_demo_ready = False
            self.training_page.set_running(False)
            self.training_page.status.setText("Start cancelled.")
            return
        if self.run.stop():
            grace = self.run.grace_s
            self.training_page.set_running(True, stopping=True)
            self.training_page.status.setText(f"Stopping: waiting for the checkpoint (the worker is killed after {grace:g} s)…")
            self.training_page.append_log("— Stop requested.")

    def resume_run(self, run_dir: Path) -> None:
        if self.run.running:
            return
        self.run.resume(Path(run_dir))

    def resume_target(self) -> Path | None:
        """The run Resume continues: the last one of this session, else the newest resumable one
        (from the Runs page's list, which is read in the background)."""
        if self.last_result is not None and runs.summarize(self.last_result.run_dir).resumable:
            return self.last_result.run_dir
        for summary in self.runs_page.summaries:
            if summary.resumable:
                return summary.path
        return None

    def resume_last(self) -> None:
        target = self.resume_target()
        if target is not None:
            self.resume_run(target)

    def _attach_to_running(self) -> None:
        """Follow a run of the runs folder that trains without a window (the newest, if several).

        Its worker may still be loading the model (no ``run_started`` event yet: status "created"),
        so the pid file decides (:func:`~qlora_studio.gui.follower.find_worker`).
        """
        first, self._first_listing = self._first_listing, False
        if self.run.running or self._start_when_demo_ready or self._close_when_done:
            return
        for summary in self.runs_page.summaries:
            if summary.status in ("running", "created") and self.run.attach(summary.path):
                if first:
                    self.tabs.setCurrentWidget(self.training_page)
                self.statusBar().showMessage(f"Following {summary.path.name}, which trains without a window.", 15000)
                return

    def _run_selected(self, run_dir: Path) -> None:
        self.playground_page.set_run(run_dir)
        self.export_page.set_run(run_dir)

    def _run_started(self, run_dir: Path, description: str) -> None:
        self.training_page.begin_run(description)
        self.training_page.set_running(True)
        self.runs_page.set_active_run(run_dir)
        reset = getattr(self.monitor_page, "reset", None)
        if reset is not None:
            reset()
        if not self.run.attached:  # a run found by a listing does not take the page from the person
            self.tabs.setCurrentWidget(self.training_page)
        self._update_resume()

    def _on_event(self, event: dict[str, Any]) -> None:
        self.training_page.on_event(event)
        on_event = getattr(self.monitor_page, "on_event", None)
        if on_event is not None:
            on_event(event)
        kind = event.get("type")
        if kind == "checkpoint":
            self.statusBar().showMessage(f"Checkpoint saved at step {event.get('step')}", 8000)
        elif kind == "run_started":
            self.runs_page.refresh()

    def _worker_pid(self, pid: int | None) -> None:
        set_pid = getattr(self.monitor_page, "set_worker_pid", None)
        if set_pid is not None:
            set_pid(pid)

    def _escalated(self, message: str) -> None:
        self.training_page.append_log(f"— {message}")
        self.training_page.status.setText(message)

    def _run_ended(self, result: RunResult) -> None:
        self.last_result = result
        self.training_page.end_run(result.message)
        self.training_page.set_running(False)
        self.runs_page.set_active_run(None)
        self.runs_page.refresh()
        if runs.latest_checkpoint(result.run_dir) is not None or (result.run_dir / runs.ADAPTER).is_dir():
            self.playground_page.set_run(result.run_dir)  # try what it learned
            self.export_page.set_run(result.run_dir)
        self.statusBar().showMessage(result.message, 15000)
        self._update_resume()
        if self._close_when_done:
            QTimer.singleShot(0, self.close)
            return
        if result.outcome in (Outcome.FAILED, Outcome.CRASHED):
            self._show_failure(result)

    def _update_resume(self) -> None:
        enabled = not self.run.running and self.resume_target() is not None
        self.training_page.resume_button.setEnabled(enabled)
        self.resume_action.setEnabled(enabled)

    def _show_failure(self, result: RunResult) -> None:
        failure = result.failure or {}
        message = result.message.removeprefix("qlora-studio: error: ")
        box = QMessageBox(self)
        box.setObjectName("failureDialog")
        box.setIcon(QMessageBox.Icon.Critical)
        box.setWindowTitle("Training failed")
        box.setText(message)
        advice = failure.get("advice")
        if advice:
            box.setInformativeText(str(advice))
        details = []
        if failure.get("log"):
            details.append(f"Log: {failure['log']}")
        details.extend(result.stderr_tail[-10:])
        if details:
            box.setDetailedText("\n".join(details))
        box.setStandardButtons(QMessageBox.StandardButton.Ok)
        self.failure_dialog = box
        box.open()  # window-modal and non-blocking: the event loop (and the app) keep running

    def show_error(self, title: str, text: str) -> QMessageBox:
        box = QMessageBox(QMessageBox.Icon.Warning, title, text, QMessageBox.StandardButton.Ok, self)
        box.setObjectName("errorDialog")
        self.failure_dialog = box
        box.open()
        return box

    def _about(self) -> None:
        QMessageBox.about(self, f"About {DISPLAY_NAME}", f"{DISPLAY_NAME} {__version__}\nQLoRA fine-tuning on your own GPU.\n"
                          f"Data folder: {self.state.home}")

    # ------------------------------------------------------------------ closing

    def ask_close_during_run(self) -> str:
        """``stop``, ``background`` or ``cancel`` (tests replace this to answer without a dialog)."""
        box = QMessageBox(QMessageBox.Icon.Question, "A run is in progress",
                          "Training is still running. What should happen to it?", parent=self)
        stop = box.addButton("Stop with a checkpoint, then close", QMessageBox.ButtonRole.AcceptRole)
        background = box.addButton("Keep training in the background", QMessageBox.ButtonRole.DestructiveRole)
        box.addButton(QMessageBox.StandardButton.Cancel)
        box.setDefaultButton(stop)
        box.setInformativeText("A run kept in the background goes on without the window; when the window "
                               "opens again, the Training page follows it and can stop it.")
        box.exec()
        clicked = box.clickedButton()
        return "stop" if clicked is stop else "background" if clicked is background else "cancel"

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 - Qt's name
        if self.run.running:
            if self.run.stopping:
                event.ignore()  # already stopping; the window closes when the worker has
                self._close_when_done = True
                return
            choice = self.ask_close_during_run()
            if choice == "cancel":
                event.ignore()
                return
            if choice == "stop":
                self._close_when_done = True
                self.stop_run()
                self.training_page.status.setText(self.training_page.status.text() + " The window closes when it is done.")
                event.ignore()
                return
            self.run.detach()
            self.run.wait(3000)
        self.save_settings()
        self.demo.cancel()
        self._estimates.shutdown()
        self.model_page.shutdown()
        self.dataset_page.shutdown()
        self.runs_page.shutdown()
        self.playground_page.shutdown()  # its generation worker process
        self.export_page.shutdown()  # a running export (its partial folder is removed)
        shutdown = getattr(self.monitor_page, "shutdown", None)
        if shutdown is not None:
            shutdown()  # the NVML sampler thread
        jobs.shutdown_jobs()
        event.accept()
