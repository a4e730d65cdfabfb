"""Shared helpers of the reliability suite: the contracts every bad input must meet, and a tally.

The contract of an in-process function: it returns, or it raises a :class:`UserError` whose ``what``
and ``where`` are filled in. Anything else escaping (a ``ValueError`` from a parser, a ``TypeError``
from a tokenizer) would reach a person as an internal error, exit code 1 and a traceback.

The contract of the command line (``python -m qlora_studio train CONFIG``): the run starts and
finishes normally, or the command exits with code 2 and its standard error is one line
``qlora-studio: error: WHERE: WHAT. FIX`` -- never a traceback, never exit code 1 -- and no run
folder holds anything that looks finished (an ``adapter/`` folder or a ``finished`` event).

Example counts scale with ``QLORA_FUZZ_SCALE`` (``bench/reliability_fuzz.py`` runs the suite with a
larger scale); with ``QLORA_FUZZ_REPORT=FILE`` the outcomes per input family are written to FILE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from qlora_studio import events as ev
from qlora_studio import runs
from qlora_studio.errors import UserError

SCALE = float(os.environ.get("QLORA_FUZZ_SCALE", "1"))
ERROR_PREFIX = "qlora-studio: error: "
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
#: A Hugging Face token that must never appear in anything QLoRA Studio writes.
FAKE_TOKEN = "hf_QLoRAStudioFakeToken0123456789abcdefXYZ"
TOKEN_ENV = {**ENV, "HF_TOKEN": FAKE_TOKEN, "HUGGING_FACE_HUB_TOKEN": FAKE_TOKEN}

#: (family, outcome) -> count; outcome is "accepted" or the UserError kind.
TALLY: Counter[tuple[str, str]] = Counter()


def examples(n: int) -> int:
    """``n`` scaled by QLORA_FUZZ_SCALE (at least 1)."""
    return max(1, round(n * SCALE))


def tally(family: str, outcome: str) -> None:
    TALLY[(family, outcome)] += 1


def write_tally(path: str | Path) -> None:
    rows: dict[str, dict[str, int]] = {}
    for (family, outcome), n in sorted(TALLY.items()):
        rows.setdefault(family, {})[outcome] = n
    Path(path).write_text(json.dumps(rows, indent=1, sort_keys=True), encoding="utf-8")


def check_user_error(exc: BaseException) -> UserError:
    """``exc`` must be a UserError that says what and where."""
    assert isinstance(exc, UserError), f"{type(exc).__name__} escaped: {exc!r}"
    assert exc.what and exc.what.strip(), f"empty 'what' in {exc!r}"
    assert exc.where and exc.where.strip(), f"empty 'where' in {exc.one_line()!r}"
    assert "\n" not in exc.one_line()
    return exc


def call(family: str, fn, *args, **kwargs):
    """Run ``fn``; return its value or the UserError it raised (after checking it), tallying either."""
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the point is to see what escapes
        err = check_user_error(exc)
        tally(family, err.kind)
        return err
    tally(family, "accepted")
    return value


# ------------------------------------------------------------------------------------------------
# The command line


def cli(*args, timeout: float = 300, cwd: Path | None = None, env: dict[str, str] | None = None):
    return subprocess.run([sys.executable, "-m", "qlora_studio", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env or ENV, check=False)


def demo_config_file(demo_template: Path, folder: Path, **changes: dict) -> Path:
    """The demo's configuration with absolute paths and some keys changed, written into ``folder``."""
    import tomllib

    import tomli_w

    settings = tomllib.loads((demo_template / "config.toml").read_text())
    settings["model"]["name_or_path"] = str(demo_template / "model")
    settings["data"]["path"] = str(demo_template / "data.jsonl")
    settings["output"]["runs_dir"] = str(folder / "runs")
    for section, values in changes.items():
        settings.setdefault(section, {}).update(values)
    path = folder / "config.toml"
    path.write_text(tomli_w.dumps(settings), encoding="utf-8")
    return path


def event_types(run_dir: Path) -> list[str]:
    return [e.get("type") for e in ev.read(run_dir / runs.EVENTS)]


def check_cli_outcome(result: subprocess.CompletedProcess, run_dir: Path, where: str | None = None) -> str:
    """The command line contract for one ``train`` call; returns "accepted" or "rejected".

    ``where``: a text the error line must contain when the input is rejected (the broken file's name).
    """
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode in (0, 2), f"exit code {result.returncode}\n{result.stderr[-3000:]}"
    if result.returncode == 0:
        assert (run_dir / runs.ADAPTER).is_dir(), result.stderr[-2000:]
        assert event_types(run_dir)[-1] == "finished"
        return "accepted"
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith(ERROR_PREFIX) and len(lines[-1]) > len(ERROR_PREFIX) + 10, result.stderr[-3000:]
    assert sum(line.startswith(ERROR_PREFIX) for line in lines) == 1, result.stderr[-3000:]
    if where is not None:
        assert where in lines[-1], f"{where!r} not named in {lines[-1]!r}"
    if run_dir.exists():
        # Found inside the worker: the run folder says it failed, and nothing more. (Library log
        # lines may still precede the error line there: test_cli_contract.py tracks that.)
        assert not (run_dir / runs.ADAPTER).exists()
        types = event_types(run_dir)
        assert "finished" not in types and types[-1:] == ["failed"], types
    else:
        assert len(lines) == 1, result.stderr[-3000:]  # found before the run began: one line, no folder
    return "rejected"
