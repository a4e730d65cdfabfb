"""``qlora-studio export``: exit codes, one-line errors, JSON progress for the GUI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qlora_studio import cli


def _run(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "qlora_studio.engine.export.cli", *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kwargs)


def test_json_progress_and_done(llama_run, tmp_path):
    proc = _run(llama_run.run, "--format", "merged", "--out", tmp_path / "m", "--checkpoint", "10", "--progress-json")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    fractions = [line["fraction"] for line in lines if line["type"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 5
    assert lines[-1] == {"type": "done", "out": str(tmp_path / "m")}


def test_bad_input_is_one_line_and_exit_code_2(llama_run, tmp_path):
    proc = _run(llama_run.run, "--format", "merged", "--checkpoint", "7", "--progress-json")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no checkpoint at step 7" in proc.stderr and "Available steps: 10" in proc.stderr
    error = json.loads(proc.stdout.splitlines()[-1])
    assert error["type"] == "error" and error["kind"] == "bad_export"

    proc = _run(tmp_path / "missing", "--format", "adapter")
    assert proc.returncode == 2 and "folder not found" in proc.stderr


def test_wired_into_the_main_command_line(llama_run, tmp_path, capsys):
    out = tmp_path / "a"
    assert cli.main(["export", str(llama_run.run), "--format", "adapter", "--out", str(out)]) == 0
    assert (out / "adapter_config.json").is_file()
    assert cli.main(["export", str(llama_run.run), "--format", "adapter", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
