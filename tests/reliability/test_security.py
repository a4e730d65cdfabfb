"""Security: no pickle and no model code run unless the person allows it for that model, and the
Hugging Face token never lands in a file QLoRA Studio writes.

Each test plants a trap that leaves a marker file if it is ever executed, then runs the real command line.
"""

from __future__ import annotations

import json
import pickle
import tomllib
from pathlib import Path

import tomli_w

from qlora_studio import runs

from .fuzzkit import ERROR_PREFIX, FAKE_TOKEN, TOKEN_ENV, cli


class _Trap:
    """Unpickling this object creates ``marker`` (builtins.open): the classic pickle payload, harmless."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _set(config: Path, section: str, **values) -> None:
    data = tomllib.loads(config.read_text())
    data[section].update(values)
    config.write_text(tomli_w.dumps(data))


def test_pickle_weights_are_never_unpickled(demo, tmp_path):
    marker = tmp_path / "pickle-ran"
    model = demo / "model"
    with open(model / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"model.embed_tokens.weight": _Trap(marker)}, fh)
    # Both files: the safetensors weights are used, the pickle is not touched.
    result = cli("train", demo / "config.toml", "--output", tmp_path / "both", "--max-steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()
    # Only the pickle: refused unless allowed for this model ...
    (model / "model.safetensors").unlink()
    result = cli("train", demo / "config.toml", "--output", tmp_path / "refused", "--max-steps", "1")
    assert result.returncode == 2 and result.stderr.startswith(ERROR_PREFIX)
    assert "pickle files (.bin), which can run code when loaded" in result.stderr
    assert "model.allow_pickle_weights = true" in result.stderr
    assert not (tmp_path / "refused").exists() and not marker.exists()
    # ... and even when allowed, torch.load(weights_only=True) refuses to call anything.
    _set(demo / "config.toml", "model", allow_pickle_weights=True)
    result = cli("train", demo / "config.toml", "--output", tmp_path / "allowed", "--max-steps", "1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot load the model" in result.stderr.splitlines()[-1]
    assert not marker.exists()


def test_model_code_is_never_run_without_trust_remote_code(demo, tmp_path):
    marker = tmp_path / "remote-code-ran"
    model = demo / "model"
    (model / "custom_model.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
        "class CustomLlamaForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n"
    )
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="custom-llama", architectures=["CustomLlamaForCausalLM"],
               auto_map={"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomLlamaForCausalLM"})
    (model / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["custom_model.CustomTokenizer", None]}
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    run_dir = tmp_path / "run"
    result = cli("train", demo / "config.toml", "--output", run_dir, "--max-steps", "1")
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.splitlines()[-1]
    assert last.startswith(ERROR_PREFIX) and "model.trust_remote_code = true" in last, last
    assert not marker.exists()
    assert "finished" not in [e["type"] for e in _events(run_dir)]


def _events(run_dir: Path) -> list[dict]:
    from qlora_studio import events as ev

    return list(ev.read(run_dir / runs.EVENTS))


def test_the_hugging_face_token_is_never_written(finished_run, demo_template, tmp_path):
    """finished_run trained with HF_TOKEN set (conftest.py); its adapter is exported with it set too."""
    export_dir = tmp_path / "export"
    result = cli("export", finished_run, "--format", "adapter", "--out", export_dir, env=TOKEN_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    written = [p for folder in (finished_run, export_dir) for p in folder.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {runs.CONFIG, runs.EVENTS, runs.LOG, runs.STATE, "optimizer.pt", "README.md", "adapter_model.safetensors"} <= names
    for path in written:
        assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    assert FAKE_TOKEN not in result.stdout + result.stderr
    # The card names the base model and the dataset without this machine's paths.
    card = (export_dir / "README.md").read_text()
    assert str(demo_template) not in card and str(finished_run.parent) not in card
