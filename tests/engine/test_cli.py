"""The command line as a person (or the GUI) uses it: exit codes, one-line errors, kill and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_studio import runs

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def cli(*args, cwd=None, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "qlora_studio", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=timeout, **kw)


def _set(config: Path, section: str, key: str, value) -> None:
    import tomllib

    import tomli_w

    data = tomllib.loads(config.read_text())
    data[section][key] = value
    config.write_text(tomli_w.dumps(data))


def _break_data(demo: Path, content: bytes, name="data.jsonl") -> None:
    (demo / name).write_bytes(content)
    if name != "data.jsonl":
        text = (demo / "config.toml").read_text().replace('path = "data.jsonl"', f'path = "{name}"')
        (demo / "config.toml").write_text(text)


CASES = {
    "missing dataset": (lambda d: (d / "data.jsonl").unlink(), ["data.jsonl", "not found"]),
    "empty dataset": (lambda d: _break_data(d, b""), ["empty"]),
    "malformed json line 3": (lambda d: _break_data(d, b'{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n'),
                              ["line 3", "malformed JSON"]),
    "missing columns": (lambda d: (_break_data(d, b'{"instruction": "a", "answer": "b"}\n'), _set(d / "config.toml", "data", "format", "alpaca")),
                        ["missing column output", "columns found: answer, instruction"]),
    "undetectable format": (lambda d: _break_data(d, b'{"foo": "a", "bar": "b"}\n'), ["cannot tell the dataset's format", "(foo, bar)"]),
    "not utf-8": (lambda d: _break_data(d, b'{"text": "caf\xe9"}\n'), ["line 1", "not UTF-8"]),
    "no weights": (lambda d: (d / "model" / "model.safetensors").unlink(), ["no weights"]),
    "max_seq_len 0": (lambda d: _set(d / "config.toml", "data", "max_seq_len", 0), ["data.max_seq_len = 0", "config.toml"]),
    "r 0": (lambda d: _set(d / "config.toml", "lora", "r", 0), ["lora.r = 0"]),
    "negative lr": (lambda d: _set(d / "config.toml", "train", "learning_rate", -1e-4), ["train.learning_rate = -0.0001"]),
    "unknown key": (lambda d: _set(d / "config.toml", "train", "batch_size", 4), ["unknown key train.batch_size", "micro_batch_size"]),
    "unsupported file type": (lambda d: _break_data(d, b"a,b", name="data.xlsx"), ["unsupported file type '.xlsx'"]),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_with_one_line(demo, case):
    breaker, needles = CASES[case]
    config = demo / "config.toml"
    breaker(demo)
    result = cli("train", config)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("qlora-studio: error: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.stderr
    # Nothing that looks like a run was left behind.
    assert not (demo / "runs").exists()


def test_missing_config_and_resume_of_nothing(tmp_path):
    result = cli("train", tmp_path / "nope.toml")
    assert result.returncode == 2 and "configuration file not found" in result.stderr
    result = cli("train", "--resume", tmp_path)
    assert result.returncode == 2 and "not a run folder" in result.stderr


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / runs.EVENTS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _wait_for_step(run_dir: Path, step: int, proc, timeout=240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(e["type"] == "step" and e["step"] >= step for e in _events(run_dir)):
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached")


def test_sigkill_then_resume_reaches_final_step(demo, tmp_path):
    run_dir = tmp_path / "run"
    # Checkpoint often, so the kill lands among checkpoint writes.
    _set(demo / "config.toml", "train", "checkpoint_every", 2)
    proc = subprocess.Popen([sys.executable, "-m", "qlora_studio", "train", str(demo / "config.toml"), "--output", str(run_dir),
                             "--max-steps", "30", "--events"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        _wait_for_step(run_dir, 11, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert runs.summarize(run_dir).status == "interrupted"
    assert runs.latest_checkpoint(run_dir) is not None
    result = cli("train", "--resume", run_dir)
    assert result.returncode == 0, result.stderr
    evts = _events(run_dir)
    assert evts[-1]["type"] == "finished" and evts[-1]["step"] == 30
    assert runs.summarize(run_dir).status == "finished"


def test_stop_line_on_stdin_exits_3_with_checkpoint(demo, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "qlora_studio", "train", str(demo / "config.toml"), "--output", str(run_dir),
                             "--events"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    seen = []
    for line in proc.stdout:
        event = json.loads(line)  # standard output carries event lines only
        seen.append(event)
        if event["type"] == "step" and event["step"] == 3:
            proc.stdin.write("stop\n")
            proc.stdin.flush()
    assert proc.wait(timeout=120) == 3
    assert seen[-1]["type"] == "stopped"
    stop_step = seen[-1]["step"]
    assert runs.latest_checkpoint(run_dir).name == runs.checkpoint_name(stop_step)
    assert runs.summarize(run_dir).status == "stopped"
