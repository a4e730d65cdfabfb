"""One regression test per bug the fuzz suite found, each fixed in its own commit.

Every case here once escaped as something other than a UserError (an internal error, exit code 1,
a traceback for the person) or named no file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qlora_studio import formats
from qlora_studio.errors import DataError

from .fuzzkit import check_user_error


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_an_integer_too_long_for_python_is_a_data_error(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text('{"instruction": "q", "output": ' + "9" * 5000 + "}\n")
    with pytest.raises(DataError, match="more than 4300 digits") as info:
        formats.read_local(path)
    check_user_error(info.value)
    assert info.value.where == (f"{path}, line 1" if suffix == ".jsonl" else str(path))


@pytest.mark.parametrize("spec, message", [
    ("x" * 5000 + ".jsonl", "cannot look up the file (File name too long)"),
    ("d/" * 3000 + "f.json", "cannot look up the file (File name too long)"),
    ("~nosuchuser/data.jsonl", "dataset file not found"),
    ("my data", "dataset file not found"),  # cannot be a hub id, so checked before the run starts
])
def test_a_dataset_path_the_system_cannot_look_up_is_a_data_error(tmp_path, spec, message):
    from qlora_studio.engine.data import load_records, resolve_data_path

    resolved = resolve_data_path(spec, tmp_path)
    assert formats.looks_local(resolved)
    with pytest.raises(DataError) as info:
        load_records(resolved)
    check_user_error(info.value)
    assert message in info.value.what


def _as_nobody(function: str, path) -> str:
    """The error line of ``qlora_studio.<function>(path)`` run by an unprivileged user in a child
    process (permissions do not bind root)."""
    import subprocess
    import sys

    module, name = function.rsplit(".", 1)
    code = (f"import os, sys\nfrom qlora_studio import {module}\n"  # imported first: root's Python may be private
            "from qlora_studio.errors import UserError\n"
            "os.setgid(65534); os.setuid(65534)\n"
            f"try:\n    {module}.{name}(sys.argv[1])\n"
            "except UserError as exc:\n    print(exc.one_line())\n")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _world_readable_folder():
    import tempfile

    tmp = tempfile.TemporaryDirectory()
    os.chmod(tmp.name, 0o755)
    return tmp


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
@pytest.mark.parametrize("function, name", [("formats.read_local", "data.jsonl"), ("config.load", "config.toml")])
def test_an_unreadable_file_is_a_user_error(function, name):
    with _world_readable_folder() as tmp:
        path = Path(tmp) / name
        path.write_text('{"text": "hello"}\n')
        path.chmod(0o000)
        assert _as_nobody(function, path) == f"{path}: cannot read the file (Permission denied). Check that the file is readable."
        inner = Path(tmp) / "private"
        inner.mkdir(mode=0o700)
        (inner / name).write_text('{"text": "hello"}\n')
        assert _as_nobody(function, inner / name) == (f"{inner / name}: cannot look up the file (Permission denied). "
                                                      "Check the path and the permissions of its folders.")


def test_a_configuration_path_too_long_exits_2(tmp_path):
    from .fuzzkit import ERROR_PREFIX, cli

    result = cli("train", tmp_path / ("x" * 5000 + ".toml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(ERROR_PREFIX) and result.stderr.rstrip().endswith(
        "cannot look up the file (File name too long). Check the path and the permissions of its folders.")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize("text, message", [
    ("[train]\nlearning_rate = nan", "train.learning_rate = nan must be a finite number"),
    ("[lora]\nalpha = inf", "lora.alpha = inf must be a finite number"),
    ("[train]\nlearning_rate = 1e308", "train.learning_rate = 1e+308 must be in [0, 1]"),
    ("[train]\nadam_beta1 = 1.0", "train.adam_beta1 = 1.0 must be in [0, 1)"),
    ("[train]\nadam_beta2 = -0.5", "train.adam_beta2 = -0.5 must be in [0, 1)"),
    ("[train]\nseed = -1", "train.seed = -1 must be in [0, 4294967295]"),
    ("[data]\nshuffle_seed = 4294967296", "data.shuffle_seed = 4294967296 must be in [0, 4294967295]"),
])
def test_values_the_engine_cannot_use_are_refused_by_the_configuration(text, message):
    """Each was accepted, then failed inside the worker (the optimizer, the seeding) as an internal error."""
    from qlora_studio import config
    from qlora_studio.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config.loads(text, "run.toml")
    check_user_error(info.value)
    assert info.value.one_line().startswith(f"run.toml: {message}")


def test_a_lone_surrogate_escape_in_json_is_a_data_error_naming_the_line(tmp_path, demo_tokenizer):
    """Legal JSON, not text: it reached the tokenizer, which raised a TypeError."""
    from qlora_studio.config import DataConfig
    from qlora_studio.engine.data import build_examples

    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q\\ud800", "output": "a"}\n')
    records = formats.read_local(path)
    with pytest.raises(DataError) as info:
        build_examples(records, "alpaca", DataConfig(path=str(path)), demo_tokenizer)
    check_user_error(info.value)
    assert info.value.where == f"{path}, line 2"
    assert "field 'instruction' holds invalid Unicode (a lone surrogate '\\ud800' at character 2)" in info.value.what


def test_a_conversation_the_chat_template_refuses_is_a_data_error_naming_the_line(tmp_path, template_tokenizer):
    """Templates raise on turns in an order they do not support; that escaped as jinja2's TemplateError."""
    from qlora_studio.config import DataConfig
    from qlora_studio.engine.data import build_examples

    path = tmp_path / "data.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
                    '{"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    records = formats.read_local(path)
    with pytest.raises(DataError) as info:
        build_examples(records, "chat", DataConfig(path=str(path)), template_tokenizer)
    check_user_error(info.value)
    assert info.value.where == f"{path}, line 2"
    assert info.value.what == ("the tokenizer's chat template refuses this conversation "
                               "(Conversation roles must alternate user/assistant/user/assistant/...)")
    examples, *_ = build_examples(records[:1], "chat", DataConfig(path=str(path)), template_tokenizer)
    assert len(examples) == 1


def _model_copy(demo_template, tmp_path) -> Path:
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(demo_template / "model", folder)
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _shard_index(folder: Path) -> None:
    import json

    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("damage, file, message", [
    (_truncate, "model.safetensors", "the weights file is damaged or incomplete (Error while deserializing header: incomplete metadata"),
    (lambda p: p.write_bytes(os.urandom(4096)), "model.safetensors", "the weights file is damaged or incomplete"),
    (lambda p: p.write_bytes(b""), "model.safetensors", "the weights file is damaged or incomplete"),
    (lambda p: _shard_index(p.parent), "model.safetensors.index.json",
     "the weights index names 1 missing file(s): model-00002-of-00002.safetensors"),
])
def test_damaged_weights_are_a_model_error_naming_the_file(demo_template, tmp_path, damage, file, message):
    """Each escaped from the loader as safetensors' SafetensorError (exit code 1) after the run folder was made."""
    from qlora_studio.engine.model import check_local_model
    from qlora_studio.errors import ModelError

    folder = _model_copy(demo_template, tmp_path)
    damage(folder / "model.safetensors")
    with pytest.raises(ModelError) as info:
        check_local_model(folder, allow_pickle=False)
    check_user_error(info.value)
    assert info.value.where == str(folder / file)
    assert info.value.what.startswith(message)


def _edit_config(folder: Path, **changes) -> None:
    import json

    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    # Each loaded into a mismatched model (an AttributeError from PEFT, exit code 1) or allocated
    # tensors of the size config.json claims (64 GB for this one) before failing.
    ({"intermediate_size": 10**9}, ("the weights do not match config.json: model.layers.0.mlp.gate_proj.weight is [768, 256] "
                                    "in the weights, config.json implies [1000000000, 256] (and 11 more)")),
    ({"num_hidden_layers": 6}, "config.json describes 6 layers; the weights hold 4"),
    ({"num_hidden_layers": 10**6}, "config.json describes 1000000 layers; the weights hold 4"),
    ({"num_hidden_layers": -1}, "config.json describes -1 layers; the weights hold 4"),
    ({"hidden_size": "big"}, ("config.json is not a valid model configuration (Validation error for field 'hidden_size': "
                              "TypeError: Field 'hidden_size' expected int, got str (value: 'big'))")),
    ({"num_attention_heads": 3}, "config.json is not a valid model configuration (Class validation error"),
])
def test_a_config_json_that_does_not_match_the_weights_is_refused_before_loading(demo_template, tmp_path, changes, message):
    from qlora_studio.engine.model import check_local_model
    from qlora_studio.errors import ModelError

    folder = _model_copy(demo_template, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ModelError) as info:
        check_local_model(folder, allow_pickle=False)
    check_user_error(info.value)
    assert info.value.where == str(folder / "config.json")
    assert info.value.what.startswith(message), info.value.what


def test_weights_missing_a_tensor_are_a_model_error(demo_template, tmp_path):
    """transformers initialised the missing tensor at random, unquantized: PEFT then raised an AttributeError."""
    import torch
    from safetensors.torch import load_file, save_file

    from qlora_studio.engine.demo import demo_config
    from qlora_studio.engine.model import load_base
    from qlora_studio.errors import ModelError

    folder = _model_copy(demo_template, tmp_path)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelError) as info:
        load_base(str(folder), demo_config(), torch.device("cpu"), torch.bfloat16)
    check_user_error(info.value)
    assert info.value.what == "the weights lack 1 tensor(s) that config.json describes (first: model.layers.2.mlp.up_proj.weight)"


@pytest.mark.parametrize("cell", ["[" + "9" * 5000 + "]", "[" * 100_000 + "]" * 100_000])
def test_a_csv_conversation_cell_that_json_cannot_read_is_a_data_error(tmp_path, cell):
    """A CSV cell holding a conversation is parsed as JSON; a number too long or nesting too deep
    escaped as ValueError / RecursionError."""
    path = tmp_path / "data.csv"
    path.write_text(f'messages\n"{cell}"\n')
    records = formats.read_local(path)
    with pytest.raises(DataError) as info:
        formats.record_segments(records[0].data, "chat", {}, records[0].where, "</s>")
    check_user_error(info.value)
    assert info.value.where == f"{path}, line 2"
    assert info.value.what == "field 'messages' must be a non-empty list of turns"


@pytest.mark.parametrize("changes, message", [
    ({"architectures": "LlamaForCausalLM"}, "config.json's architectures must be a list of names, found 'LlamaForCausalLM'"),
    ({"architectures": [], "model_type": ["llama"]}, "config.json's model_type must be a name, found ['llama']"),
])
def test_config_json_fields_of_the_wrong_type_are_named(demo_template, tmp_path, changes, message):
    """A string was read letter by letter ("architecture L, l, a, m, a, ..."); a list model_type raised a TypeError."""
    from qlora_studio.engine.model import check_local_model
    from qlora_studio.errors import ModelError

    folder = _model_copy(demo_template, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ModelError) as info:
        check_local_model(folder, allow_pickle=False)
    check_user_error(info.value)
    assert info.value.what == message


def test_a_lora_rank_wider_than_every_layer_is_refused_before_allocating(demo_template):
    """PEFT allocated the adapters of whatever rank was asked (r = 10**6: gigabytes per layer), then failed."""
    import torch

    from qlora_studio import config
    from qlora_studio.engine.demo import demo_config
    from qlora_studio.engine.model import attach_lora, load_base
    from qlora_studio.errors import ModelError

    cfg = config.replace(demo_config(), model={"name_or_path": str(demo_template / "model")}, lora={"r": 10**6})
    base = load_base(cfg.model.name_or_path, cfg, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ModelError) as info:
        attach_lora(base, cfg)
    check_user_error(info.value)
    assert info.value.what == "lora.r = 1000000 is larger than every target layer allows (at most 256 here)"
    attach_lora(base, config.replace(cfg, lora={"r": 256}))


@pytest.mark.parametrize("name", ["x" * 5000, "d/" * 3000 + "model", "~nosuchuser/model", "my model", "org/name/extra"])
def test_a_model_name_that_is_neither_a_folder_nor_a_hub_id_is_not_found(tmp_path, name):
    """A name too long made Path.exists() raise (exit code 1); others were passed on as hub ids."""
    from qlora_studio.engine.model import resolve_source
    from qlora_studio.errors import ModelError

    with pytest.raises(ModelError) as info:
        resolve_source(name, tmp_path)
    check_user_error(info.value)
    assert info.value.what == "model folder not found" and info.value.where == name
    assert resolve_source("org/name", tmp_path) == "org/name"


def test_a_blank_dataset_or_model_name_is_named_as_such(tmp_path):
    """" " passed the emptiness check and became a path named " ": an error whose 'where' was blank."""
    from qlora_studio import config
    from qlora_studio.engine.data import load_records
    from qlora_studio.errors import ConfigError

    with pytest.raises(DataError) as info:
        load_records(" ")
    check_user_error(info.value)
    assert info.value.one_line() == "data.path: no dataset file given (the path is blank). Set it to a dataset file or a hub dataset id."
    for section, key in (("model", "name_or_path"), ("data", "path")):
        cfg = config.from_dict({"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, section: {key: " \t"}})
        with pytest.raises(ConfigError, match=f"{section}.{key} is empty"):
            cfg.require_complete("run.toml")


@pytest.mark.parametrize("changes, message", [
    # Each escaped from the tokenizer (which reads config.json first) or from the model's constructor.
    ({"num_key_value_heads": 0}, "config.json describes a model that cannot be built (ZeroDivisionError"),
    ({"vocab_size": 0}, "config.json describes a model that cannot be built (AssertionError: Padding_idx must be within num_embeddings"),
    ({"num_attention_heads": 0}, "config.json is not a valid model configuration"),
    ({"dtype": ""}, "config.json is not a valid model configuration"),
])
def test_load_model_reports_a_broken_config_json_before_the_tokenizer_reads_it(demo_template, tmp_path, changes, message):
    import torch

    from qlora_studio import config
    from qlora_studio.engine.demo import demo_config
    from qlora_studio.engine.model import load_model
    from qlora_studio.errors import ModelError

    folder = _model_copy(demo_template, tmp_path)
    _edit_config(folder, **changes)
    cfg = config.replace(demo_config(), model={"name_or_path": str(folder)})
    with pytest.raises(ModelError) as info:
        load_model(cfg, torch.device("cpu"), torch.bfloat16)
    check_user_error(info.value)
    assert info.value.where == str(folder / "config.json")
    assert info.value.what.startswith(message), info.value.what


def test_damaged_pickle_weights_allowed_by_the_person_are_a_model_error(demo_template, tmp_path):
    """torch.load(weights_only=True) raised UnpicklingError, which the loader did not expect."""
    import torch

    from qlora_studio import config
    from qlora_studio.engine.demo import demo_config
    from qlora_studio.engine.model import load_base
    from qlora_studio.errors import ModelError

    folder = _model_copy(demo_template, tmp_path)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # not a pickle at all
    cfg = config.replace(demo_config(), model={"name_or_path": str(folder), "allow_pickle_weights": True})
    with pytest.raises(ModelError) as info:
        load_base(str(folder), cfg, torch.device("cpu"), torch.bfloat16)
    check_user_error(info.value)
    assert info.value.what.startswith("cannot load the model (Weights only load failed")


def test_parquet_files_are_read_without_log_lines_of_their_own(tmp_path, capfd):
    """datasets' parquet reader logged "Failed to read schema ..." on standard error before the
    command line's one error line (and copied every good file into its cache)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from qlora_studio.engine.data import load_records

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"\x00")
    with pytest.raises(DataError) as info:
        load_records(str(broken))
    check_user_error(info.value)
    assert info.value.what.startswith("cannot read the parquet file (Parquet file size is 1 bytes")
    good = tmp_path / "chat.parquet"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), good)
    records = load_records(str(good))
    assert [r.data for r in records] == rows and records[4].where == f"{good}, row 5"
    assert [r.data for r in load_records(str(good), limit=2)] == rows[:2]
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist(rows).slice(0, 0), empty)
    with pytest.raises(DataError, match="holds no examples"):
        load_records(str(empty))
    assert capfd.readouterr().err == ""


def test_a_bad_record_is_refused_before_the_run_folder_exists(demo, tmp_path):
    """Records were checked only while the worker tokenized them, inside a new run folder, so the
    error came after the model had loaded, with log lines around it."""
    from .fuzzkit import ERROR_PREFIX, cli

    data = demo / "data.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q", "output": " "}\n')
    run_dir = tmp_path / "run"
    result = cli("train", demo / "config.toml", "--output", run_dir)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"{ERROR_PREFIX}{data}, line 2: field 'output' is empty. Remove the record or fill the field."]
    assert not run_dir.exists()


def test_auto_map_needs_consent_only_for_model_types_transformers_lacks(demo_template, tmp_path):
    """A model with its own code was refused deep in the loader with advice to check the weights; a
    type transformers implements itself (Phi-3 and Qwen repositories carry an auto_map too) loads natively."""
    from qlora_studio.engine.model import check_local_model
    from qlora_studio.errors import ModelError

    folder = _model_copy(demo_template, tmp_path)
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    check_local_model(folder, allow_pickle=False)  # model_type llama: transformers' own implementation
    _edit_config(folder, model_type="x-custom")
    with pytest.raises(ModelError) as info:
        check_local_model(folder, allow_pickle=False)
    check_user_error(info.value)
    assert info.value.where == str(folder / "config.json")
    assert "model.trust_remote_code = true" in info.value.fix
    check_local_model(folder, allow_pickle=False, trust_remote_code=True)  # consent given: left to the loader


def test_a_run_folder_with_fields_of_the_wrong_type_is_summarised(tmp_path):
    """The Runs page and `train --resume` read every run folder: one damaged event raised
    TypeError/AttributeError there, and a huge number in worker.pid an OverflowError."""
    import json

    from qlora_studio import runs

    (tmp_path / runs.EVENTS).write_text("\n".join(json.dumps(e) for e in [
        {"v": 1, "type": "run_started", "time": 1.0, "config": True, "plan": {"max_steps": "many"}},
        {"v": 1, "type": "step", "time": 2.0, "step": None, "loss": "low"},
        {"v": 1, "type": "step", "time": 3.0, "step": 4, "loss": 0.5},
    ]))
    for pid in ("2147483648", "0", "-1"):
        (tmp_path / runs.PID).write_text(pid)
        summary = runs.summarize(tmp_path)
        assert summary.status == "interrupted"  # no such worker: 0 and -1 would name process groups
        assert (summary.step, summary.max_steps, summary.losses, summary.model) == (4, 0, [(4, 0.5)], "")


@pytest.mark.parametrize("name", ["a\x00b", "x" * 300, "..", "runs/../../elsewhere"])
def test_a_run_name_that_is_not_a_plain_folder_name_is_refused(name):
    """The command line made the run folder from it: a NUL or a name too long raised inside
    mkdir (exit code 1), and slashes or '..' put the run outside the runs folder."""
    from qlora_studio import config
    from qlora_studio.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config.from_dict({"output": {"run_name": name}}, "run.toml")
    check_user_error(info.value)
    assert "is not a plain folder name" in info.value.what
    assert config.from_dict({"output": {"run_name": "qlora-r16_v2.1"}}).output.run_name == "qlora-r16_v2.1"


def test_an_epoch_count_whose_step_plan_overflows_is_refused():
    """train.epochs = 1e308 with max_steps = 0 planned inf steps: OverflowError in the worker."""
    from qlora_studio import config
    from qlora_studio.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config.loads("[train]\nmax_steps = 0\nepochs = 1e308\n", "run.toml")
    check_user_error(info.value)
    assert info.value.what == "train.epochs = 1e+308 must be in [0, 1000000]"
    assert config.loads("[train]\nmax_steps = 0\nepochs = 3.5\n").train.epochs == 3.5


def test_a_chat_template_that_does_not_parse_is_a_model_error_naming_the_tokenizer(tmp_path, demo_template):
    """It was reported as the first record's fault ("refuses this conversation (unexpected '}')")."""
    from transformers import AutoTokenizer

    from qlora_studio.config import DataConfig
    from qlora_studio.engine.data import build_examples
    from qlora_studio.errors import ModelError

    tokenizer = AutoTokenizer.from_pretrained(str(demo_template / "model"))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }"
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "q", "output": "a"}\n')
    with pytest.raises(ModelError) as info:
        build_examples(formats.read_local(path), "alpaca", DataConfig(path=str(path)), tokenizer)
    check_user_error(info.value)
    assert info.value.where == str(demo_template / "model")
    assert info.value.what.startswith("the tokenizer's chat template is not valid Jinja (unexpected '}', line 1 of the template)")


def test_a_validation_dataset_id_the_hub_cannot_give_names_the_setting_and_the_configuration(demo_template, tmp_path):
    # data.val_path = "auto" is not a local file, so a hub id; offline there is none: the error line
    # named only "auto", not where that came from
    from .fuzzkit import check_cli_outcome, cli, demo_config_file

    path = demo_config_file(demo_template, tmp_path, data={"val_path": "auto"})
    run_dir = tmp_path / "run"
    result = cli("train", path, "--output", run_dir, "--max-steps", "1")
    assert check_cli_outcome(result, run_dir, where=path.name) == "rejected"
    last = result.stderr.splitlines()[-1]
    assert "data.val_path = 'auto': cannot load the hub dataset" in last and str(run_dir / "config.toml") in last
