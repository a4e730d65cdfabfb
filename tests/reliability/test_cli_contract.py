"""The command line's contract when an error is found inside the worker, after the run folder exists
(here: a LoRA target module the model does not have, known only once the model is loaded)."""

from __future__ import annotations

import json
import tomllib

import pytest
import tomli_w

from qlora_studio import events as ev
from qlora_studio import runs

from .fuzzkit import ERROR_PREFIX, cli


@pytest.fixture(scope="module")
def worker_error(tmp_path_factory, demo_template):
    folder = tmp_path_factory.mktemp("worker-error")
    settings = tomllib.loads((demo_template / "config.toml").read_text())
    settings["model"]["name_or_path"] = str(demo_template / "model")
    settings["data"]["path"] = str(demo_template / "data.jsonl")
    settings["lora"]["target_modules"] = ["q_proj", "nope_proj"]
    config = folder / "config.toml"
    config.write_text(tomli_w.dumps(settings))
    run_dir = folder / "run"
    return run_dir, cli("train", config, "--output", run_dir, "--events")


def test_a_worker_error_exits_2_with_a_failed_event_and_nothing_finished(worker_error):
    run_dir, result = worker_error
    assert result.returncode == 2 and "Traceback" not in result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]  # --events: event lines only
    assert [e["type"] for e in out] == [e["type"] for e in ev.read(run_dir / runs.EVENTS)]
    failed = out[-1]
    assert failed["type"] == "failed" and failed["kind"] == "bad_model"
    assert "lora.target_modules names nope_proj, which the model does not have" in failed["message"]
    assert "q_proj" in failed["advice"] and "\n" not in failed["message"]
    assert not (run_dir / runs.ADAPTER).exists() and runs.summarize(run_dir).status == "failed"
    assert result.stderr.splitlines()[-1] == f"{ERROR_PREFIX}{failed['message']}"


def test_a_worker_error_is_one_line_on_standard_error(worker_error):
    _run_dir, result = worker_error
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_weights_missing_a_tensor_are_one_line_on_standard_error(demo_template, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from .fuzzkit import demo_config_file

    model = tmp_path / "model"
    shutil.copytree(demo_template / "model", model)
    weights = load_file(str(model / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    config = demo_config_file(demo_template, tmp_path, model={"name_or_path": str(model)})
    result = cli("train", config, "--output", tmp_path / "run", "--max-steps", "1")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith("the weights lack 1 tensor(s) that config.json describes "
                                                   "(first: lm_head.weight). Download or copy the model's weight files again.")
    assert len(result.stderr.splitlines()) == 1, result.stderr
    # transformers' own report of the missing tensor is kept, in the run's log file
    assert "LOAD REPORT" in (tmp_path / "run" / runs.LOG).read_text()
