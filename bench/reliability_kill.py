"""SIGKILL the training worker at random moments, resume it each time, and count the work lost.

The demo trains with a checkpoint after every step. Each cycle starts the worker (``train CONFIG``
the first time, ``train --resume RUN_DIR`` after that) and kills it with SIGKILL, which no code can
catch, at one of three kinds of moment:

* ``checkpoint`` -- as soon as a checkpoint is being written (its ``.tmp-`` folder exists),
* ``training``   -- a random moment up to half a second after the worker's first step of the cycle,
* ``startup``    -- a random moment of the first seconds (importing, loading the model).

After every kill the run folder must hold a loadable latest checkpoint: the files a resume reads,
the adapter through safetensors, the optimizer and RNG states through ``torch.load(weights_only=True)``.
The next cycle must resume from exactly that checkpoint (work lost beyond the last checkpoint: 0
steps), and the steps it redoes are counted. A last resume runs to the planned final step, and its
losses are compared with those of the same run never interrupted.

    python bench/reliability_kill.py [--kills 20] [--max-steps 400] [--seed 0] [--keep DIR] [--write]

tests/reliability/test_faults.py runs it (``pytest -m slow``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRIGGERS = ("checkpoint", "training", "training", "checkpoint", "startup")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Kill:
    cycle: int
    trigger: str
    at_step: int  # the last step the worker reported before it was killed
    checkpoint_step: int  # the latest complete checkpoint left in the run folder
    mid_write: bool  # killed while a checkpoint was being written (a .tmp- folder was left)
    partial_bytes: int  # the size of that unfinished checkpoint (discarded by the resume)
    seconds_after_start: float
    steps_redone: int  # steps done after the latest checkpoint (at_step - checkpoint_step), lost to the kill
    resumed_from: int | None = None  # where the next worker to start training resumed
    lost_beyond_checkpoint: int | None = None  # checkpoint_step - resumed_from: must be 0


@dataclass
class Report:
    kills: list[Kill] = field(default_factory=list)
    final_step: int = 0
    planned_steps: int = 0
    final_exit: int | None = None
    max_loss_difference: float | None = None  # vs the same run never interrupted
    seconds: float = 0.0

    def summary(self) -> dict:
        resumed = [k for k in self.kills if k.resumed_from is not None]
        return {
            "kills": len(self.kills),
            "by_trigger": {t: sum(k.trigger == t for k in self.kills) for t in sorted(set(TRIGGERS))},
            "killed_mid_checkpoint_write": sum(k.mid_write for k in self.kills),
            "recoveries": len(resumed),
            "loadable_checkpoint_after_every_kill": True,  # verify() raised otherwise
            "steps_redone_total": sum(k.steps_redone for k in self.kills),
            "steps_redone_max": max((k.steps_redone for k in self.kills), default=0),
            "work_lost_beyond_last_checkpoint_steps": sum(k.lost_beyond_checkpoint or 0 for k in resumed),
            "partial_checkpoint_bytes_discarded": sum(k.partial_bytes for k in self.kills),
            "final_step": self.final_step,
            "planned_steps": self.planned_steps,
            "final_exit_code": self.final_exit,
            "max_loss_difference_vs_uninterrupted": self.max_loss_difference,
            "seconds": round(self.seconds, 1),
        }


# ------------------------------------------------------------------------------------------------
# Reading and checking the run folder


def events(run_dir: Path) -> list[dict]:
    from qlora_studio import events as ev
    from qlora_studio import runs

    return list(ev.read(run_dir / runs.EVENTS))


def last_step(run_dir: Path) -> int:
    steps = [e["step"] for e in events(run_dir) if e.get("type") == "step"]
    return steps[-1] if steps else 0


def partial_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return [p for p in root.iterdir() if p.name.startswith(".tmp-")] if root.is_dir() else []


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def verify_checkpoint(checkpoint: Path) -> int:
    """Load everything a resume loads; return the checkpoint's step. Raises AssertionError if it cannot."""
    import torch
    from safetensors.torch import load_file

    from qlora_studio import runs

    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.pt", "state.pt", runs.STATE):
        assert (checkpoint / name).is_file(), f"{checkpoint.name} lacks {name}"
    json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
    weights = load_file(str(checkpoint / "adapter" / "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values()), f"{checkpoint.name}: bad adapter weights"
    optimizer = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    assert optimizer.get("state"), f"{checkpoint.name}: empty optimizer state"
    extra = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    assert "scheduler" in extra and "rng" in extra
    state = runs.read_state(checkpoint)
    assert runs.checkpoint_name(state["step"]) == checkpoint.name, (state, checkpoint.name)
    return int(state["step"])


def last_losses(run_dir: Path) -> dict[int, float]:
    """Each step's loss as last reported (a redone step reports again)."""
    return {e["step"]: e["loss"] for e in events(run_dir) if e.get("type") == "step"}


# ------------------------------------------------------------------------------------------------
# One cycle


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as err:
        return subprocess.Popen([sys.executable, "-m", "qlora_studio", "train", *args], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=ENV, start_new_session=True)


def _wait_for(condition, proc: subprocess.Popen, timeout: float, poll: float) -> bool:
    """True once ``condition()`` holds; False if the worker exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("the worker made no progress")


def run_cycle(cycle: int, trigger: str, start_args: list[str], run_dir: Path, log: Path, rng: random.Random,
              timeout: float = 600) -> Kill | None:
    """Start the worker, kill it at a ``trigger`` moment; None if it finished before it could be killed."""
    from qlora_studio import runs

    before = len(events(run_dir)) if (run_dir / runs.EVENTS).exists() else 0
    proc = _start(start_args, log)
    started = time.monotonic()

    def reported(kind: str) -> bool:
        return any(e.get("type") == kind for e in events(run_dir)[before:])

    try:
        if trigger == "checkpoint":
            # After the cycle's first step: by then the resume has removed the unfinished checkpoint
            # the previous kill left, so a .tmp- folder is this cycle's own write.
            alive = _wait_for(lambda: reported("step"), proc, timeout, 0.01)
            alive = alive and _wait_for(lambda: bool(partial_checkpoints(run_dir)), proc, timeout, 0.0005)
        elif trigger == "training":
            # The first cycle must leave a checkpoint to resume from.
            alive = _wait_for(lambda: reported("checkpoint" if cycle == 0 else "step"), proc, timeout, 0.01)
            if alive:
                time.sleep(rng.uniform(0.0, 0.5))
        else:
            time.sleep(rng.uniform(0.0, 6.0))
            alive = proc.poll() is None
        if not alive or proc.poll() is not None:
            proc.wait()
            return None
        os.killpg(proc.pid, signal.SIGKILL)
        if proc.wait() != -signal.SIGKILL:
            return None  # it ended by itself just before the kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    at = time.monotonic() - started
    partial = partial_checkpoints(run_dir)
    latest = runs.latest_checkpoint(run_dir)
    assert latest is not None, f"cycle {cycle}: no complete checkpoint after the kill"
    step = verify_checkpoint(latest)
    assert all(not p.name.startswith(".") for _, p in runs.list_checkpoints(run_dir))
    assert runs.summarize(run_dir).status == "interrupted"
    at_step = last_step(run_dir)
    trained = reported("step")
    # A worker killed before its first step redid nothing (what it would redo is the previous kill's),
    # and a .tmp- folder it leaves is the previous kill's (the resume removes it only once loaded).
    redone = at_step - step if trained else 0
    mid_write = bool(partial) and trained
    return Kill(cycle, trigger, at_step, step, mid_write, sum(folder_bytes(p) for p in partial) if mid_write else 0,
                round(at, 2), redone)


def resumed_from(run_dir: Path, after_events: int) -> int | None:
    """Where the worker started after ``after_events`` events resumed; None if it was killed before."""
    started = [e for e in events(run_dir)[after_events:] if e.get("type") == "run_started"]
    return int(started[0]["plan"]["resumed_from"]) if started else None


# ------------------------------------------------------------------------------------------------


def prepare(folder: Path, max_steps: int) -> Path:
    """The demo with a checkpoint after every step, ``max_steps`` steps; returns its config path."""
    import tomllib

    import tomli_w

    from qlora_studio.engine.demo import build_demo

    config = build_demo(folder)
    settings = tomllib.loads(config.read_text())
    settings["train"].update(checkpoint_every=1, keep_checkpoints=2, max_steps=max_steps)
    config.write_text(tomli_w.dumps(settings))
    return config


def kill_and_resume(folder: Path, kills: int = 20, max_steps: int = 400, seed: int = 0, compare: bool = True,
                    progress=print) -> Report:
    from qlora_studio import runs

    t0 = time.monotonic()
    rng = random.Random(seed)
    config = prepare(folder, max_steps)
    run_dir = folder / "run"
    log = folder / "worker-stderr.log"
    report = Report(planned_steps=max_steps)
    pending: list[Kill] = []  # kills whose resume has not started training yet
    cycle = 0
    while len(report.kills) < kills:
        first = not (run_dir / runs.EVENTS).exists()
        trigger = "training" if first else TRIGGERS[cycle % len(TRIGGERS)]
        args = [str(config), "--output", str(run_dir)] if first else ["--resume", str(run_dir)]
        n_before = len(events(run_dir)) if not first else 0
        kill = run_cycle(cycle, trigger, args, run_dir, log, rng)
        pending = _account(pending, run_dir, n_before)
        if kill is None:  # it finished (or failed) before the kill
            break
        report.kills.append(kill)
        progress(f"kill {len(report.kills):2d} ({kill.trigger:10s}) at step {kill.at_step:3d}, {kill.seconds_after_start:5.1f} s "
                 f"after start; latest checkpoint step {kill.checkpoint_step}{', mid-write' if kill.mid_write else ''}")
        pending.append(kill)
        cycle += 1
    n_before = len(events(run_dir))
    final = subprocess.run([sys.executable, "-m", "qlora_studio", "train", "--resume", str(run_dir)],
                           capture_output=True, text=True, env=ENV, timeout=1800, check=False)
    _account(pending, run_dir, n_before)
    report.final_exit = final.returncode
    finished = [e for e in events(run_dir) if e.get("type") == "finished"]
    report.final_step = finished[-1]["step"] if finished else last_step(run_dir)
    if compare:
        reference = folder / "reference"
        subprocess.run([sys.executable, "-m", "qlora_studio", "train", str(config), "--output", str(reference)],
                       capture_output=True, text=True, env=ENV, timeout=1800, check=True)
        ours, theirs = last_losses(run_dir), last_losses(reference)
        report.max_loss_difference = max(abs(ours[s] - theirs[s]) for s in theirs)
    report.seconds = time.monotonic() - t0
    return report


def _account(pending: list[Kill], run_dir: Path, after_events: int) -> list[Kill]:
    """Give the pending kills the step the next worker resumed from; return those still pending."""
    start = resumed_from(run_dir, after_events)
    if start is None:
        return pending
    for kill in pending:
        kill.resumed_from = start
        kill.lost_beyond_checkpoint = kill.checkpoint_step - start
    return []


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--max-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="work in this folder (kept) instead of a temporary one")
    ap.add_argument("--write", action="store_true", help="write bench/results/reliability_kill-<date>-<commit>.json")
    args = ap.parse_args()
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qlora-kill-"))
    try:
        report = kill_and_resume(folder, args.kills, args.max_steps, args.seed)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    summary = report.summary()
    print(json.dumps(summary, indent=1))
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_result

        write_result("reliability_kill", {"summary": summary, "kills": [asdict(k) for k in report.kills]})
    ok = (summary["final_step"] == summary["planned_steps"] and summary["work_lost_beyond_last_checkpoint_steps"] == 0
          and summary["final_exit_code"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
