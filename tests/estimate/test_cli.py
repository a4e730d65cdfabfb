"""``qlora-studio estimate CONFIG [--json] [--gpu-memory GB]``."""

from __future__ import annotations

import json

import pytest

from qlora_studio import cli
from qlora_studio import config as C
from qlora_studio.engine import estimate as E

from .shapes import LLAMA_1B, write_model_folder

GiB = 1024**3


@pytest.fixture
def project(tmp_path):
    """A config.toml next to a model folder that holds only config.json (no weights needed)."""
    write_model_folder(tmp_path / "model", LLAMA_1B)
    cfg = C.replace(C.RunConfig(), model={"name_or_path": "model"}, data={"path": "data.jsonl", "max_seq_len": 1024},
                    train={"micro_batch_size": 2})
    cfg.save(tmp_path / "config.toml")
    return tmp_path


def test_json_with_a_given_gpu_size(project, capsys):
    assert cli.main(["estimate", str(project / "config.toml"), "--json", "--gpu-memory", "24"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == "fits" and data["gpu_total"] == data["gpu_free"] == 24 * GiB
    assert data["model"]["param_count"] == 1_235_814_400 and data["model"]["name_or_path"] == "model"
    assert sum(item["bytes"] for item in data["items"]) == data["peak"]
    assert data["settings"]["micro_batch_size"] == 2 and data["settings"]["seq_len"] == 1024
    assert data["max_micro_batch"] >= 2


def test_table_without_a_gpu(project, capsys, monkeypatch):
    monkeypatch.setattr(E, "gpu_memory", lambda index=None: None)
    assert cli.main(["estimate", str(project / "config.toml")]) == 0
    out = capsys.readouterr().out
    for line in ("4-bit weights (packed values)", "logits and loss buffers", "CUDA context", "peak ("):
        assert line in out
    assert "no GPU found" in out


def test_table_against_the_gpu_nvml_reports(project, capsys, monkeypatch):
    monkeypatch.setattr(E, "gpu_memory", lambda index=None: ("NVIDIA Test GPU", 8 * GiB, 8 * GiB))
    assert cli.main(["estimate", str(project / "config.toml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["gpu_name"] == "NVIDIA Test GPU" and data["gpu_total"] == 8 * GiB
    assert data["verdict"] in ("fits", "tight", "does_not_fit")
    monkeypatch.setattr(E, "gpu_memory", lambda index=None: ("NVIDIA Test GPU", 2 * GiB, 2 * GiB))
    assert cli.main(["estimate", str(project / "config.toml")]) == 0
    out = capsys.readouterr().out
    assert "Verdict   does not fit" in out and "Even micro-batch 1 of 64 tokens does not fit" in out


@pytest.mark.parametrize("change, message", [
    (lambda p: (p / "config.toml").unlink(), "configuration file not found"),
    (lambda p: (p / "model" / "config.json").unlink(), "no config.json in the model folder"),
    (lambda p: (p / "model" / "config.json").write_text("{oops"), "not valid JSON"),
])
def test_bad_input_is_one_line_and_exit_2(project, capsys, change, message):
    change(project)
    assert cli.main(["estimate", str(project / "config.toml")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bad_gpu_memory_and_uncached_hub_model(project, capsys, monkeypatch, tmp_path):
    assert cli.main(["estimate", str(project / "config.toml"), "--gpu-memory", "0"]) == 2
    assert "--gpu-memory" in capsys.readouterr().err
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cfg = C.replace(C.load(project / "config.toml"), model={"name_or_path": "someone/not-downloaded"})
    cfg.save(project / "hub.toml")
    assert cli.main(["estimate", str(project / "hub.toml")]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
