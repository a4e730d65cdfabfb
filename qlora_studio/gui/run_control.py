"""Starting, stopping, resuming and re-attaching runs: the window's one link to the training worker.

It turns a :class:`~qlora_studio.config.RunConfig` into a worker command (the configuration is
staged as a TOML file with absolute paths, the run gets a fresh folder) and relays the
:class:`~qlora_studio.gui.supervisor.Supervisor`'s signals. A run that trains without a window is
followed instead (:meth:`RunControl.attach`, a :class:`~qlora_studio.gui.follower.RunFollower`) with
the same signals, so the window shows and stops both alike. One run at a time.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject, Signal

from .. import config as cfgmod
from .. import formats, runs
from .follower import RunFollower, find_worker
from .supervisor import DEFAULT_GRACE_S, Outcome, RunResult, Supervisor, worker_command


def absolute_paths(cfg: cfgmod.RunConfig) -> cfgmod.RunConfig:
    """Local model and data paths made absolute (against the current folder), hub ids unchanged."""
    def absolute(spec: str, local: bool) -> str:
        if not spec:
            return spec
        path = Path(spec).expanduser()
        return str(path.resolve()) if local or path.exists() else spec

    return cfgmod.replace(
        cfg,
        model={"name_or_path": absolute(cfg.model.name_or_path, False)},
        data={
            "path": absolute(cfg.data.path, formats.looks_local(cfg.data.path)),
            "val_path": absolute(cfg.data.val_path, bool(cfg.data.val_path) and formats.looks_local(cfg.data.val_path)),
        },
    )


class RunControl(QObject):
    started = Signal(object, str)  # run folder, a one-line description
    event = Signal(object)
    log_line = Signal(str)
    worker_pid = Signal(object)  # int, or None when the worker has ended
    escalated = Signal(str)  # the stop grace period ran out
    ended = Signal(object)  # RunResult

    def __init__(self, staging_dir: Path, parent: QObject | None = None):
        super().__init__(parent)
        self.staging_dir = Path(staging_dir)
        self.grace_s = DEFAULT_GRACE_S
        # The thread watching the run in progress: a worker this window started, or one it found.
        self.watcher: Supervisor | RunFollower | None = None
        self.run_dir: Path | None = None
        self._staged: Path | None = None

    @property
    def running(self) -> bool:
        return self.watcher is not None

    @property
    def attached(self) -> bool:
        """The run in progress is one this window follows rather than started."""
        return isinstance(self.watcher, RunFollower)

    @property
    def stopping(self) -> bool:
        return self.watcher is not None and self.watcher.stop_requested

    def start_new(self, cfg: cfgmod.RunConfig, runs_dir: Path, max_steps: int | None = None) -> Path:
        """Stage ``cfg`` and start a worker on it; returns the new run folder."""
        cfg.require_complete("the app's settings")
        cfg = absolute_paths(cfgmod.replace(cfg, output={"runs_dir": str(runs_dir)}))
        runs_dir.mkdir(parents=True, exist_ok=True)
        run_dir = runs.new_run_dir(runs_dir, cfg.output.run_name)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        staged = self.staging_dir / f"{run_dir.name}.toml"
        cfg.save(staged)
        self._staged = staged
        model = Path(cfg.model.name_or_path).name or cfg.model.name_or_path
        data = Path(cfg.data.path).name or cfg.data.path
        self.start_command(worker_command(staged, run_dir, max_steps=max_steps), run_dir, f"Training {model} on {data}")
        return run_dir

    def resume(self, run_dir: Path) -> None:
        self.start_command(worker_command(None, run_dir, resume=True), run_dir, f"Resuming {run_dir.name}")

    def start_command(self, argv: list[str], run_dir: Path, description: str) -> None:
        """Run any worker command line under a supervisor (the two above, or a test's)."""
        if self.watcher is not None:
            raise RuntimeError("a run is already in progress")
        sup = Supervisor(argv, run_dir, grace_s=self.grace_s, stderr_dir=self.staging_dir, parent=self)
        sup.event.connect(self.event)
        sup.log_line.connect(self.log_line)
        sup.worker_started.connect(self.worker_pid)
        sup.stop_escalated.connect(self.escalated)
        sup.run_ended.connect(self._ended)
        self.watcher = sup
        self.run_dir = Path(run_dir)
        self.started.emit(self.run_dir, description)
        sup.start()

    def attach(self, run_dir: Path) -> bool:
        """Follow a run whose worker trains without a window; False if it has no live worker."""
        if self.watcher is not None:
            return False
        worker = find_worker(Path(run_dir))
        if worker is None:
            return False
        follower = RunFollower(run_dir, worker, grace_s=self.grace_s, parent=self)
        follower.events.connect(self._relay)
        follower.worker_started.connect(self.worker_pid)
        follower.stop_escalated.connect(self.escalated)
        follower.run_ended.connect(self._ended)
        self.watcher = follower
        self.run_dir = Path(run_dir)
        self.started.emit(self.run_dir, f"Following {self.run_dir.name}: it trains in process {worker.pid}, "
                                        "started outside this window.")
        follower.start()
        return True

    def _relay(self, batch: list[dict]) -> None:
        follower = self.sender()
        if follower is self.watcher:  # not a late list from a follower already let go
            for event in batch:
                self.event.emit(event)
        if isinstance(follower, RunFollower):
            follower.consumed()

    def stop(self) -> bool:
        return self.watcher.request_stop() if self.watcher is not None else False

    def kill(self) -> None:
        if self.watcher is not None:
            self.watcher.kill()

    def detach(self) -> None:
        if self.watcher is not None:
            self.watcher.detach()

    def wait(self, msecs: int) -> bool:
        """Block until the watching thread ends (used while the window closes)."""
        return self.watcher.wait(msecs) if self.watcher is not None else True

    def _ended(self, result: RunResult) -> None:
        watcher = self.watcher
        self.watcher = None
        if watcher is not None:
            watcher.wait(5000)  # run() has returned once it emits run_ended; join the thread
            watcher.deleteLater()
        if self._staged is not None:
            # A worker left in the background may not have read its configuration yet; it has
            # once its run folder holds its own copy.
            if result.outcome is not Outcome.DETACHED or (Path(result.run_dir) / runs.CONFIG).exists():
                self._staged.unlink(missing_ok=True)
            self._staged = None
        self.worker_pid.emit(None)
        self.ended.emit(result)
