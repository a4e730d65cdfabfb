import pytest

from qlora_studio import config as C
from qlora_studio.errors import ConfigError


def test_defaults_are_the_paper_recipe():
    cfg = C.RunConfig()
    assert (cfg.quant.quant_type, cfg.quant.double_quant, cfg.quant.compute_dtype) == ("nf4", True, "auto")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (64, 16.0, 0.05, ["all-linear"])
    t = cfg.train
    assert (t.optimizer, t.learning_rate, t.schedule, t.max_grad_norm, t.gradient_checkpointing) == (
        "paged_adamw_32bit", 2e-4, "constant", 0.3, True)
    assert cfg.data.train_on_prompt is False


def test_toml_round_trip(tmp_path):
    cfg = C.replace(C.RunConfig(), model={"name_or_path": "org/model"}, lora={"r": 8, "target_modules": ["q_proj", "v_proj"]},
                    data={"path": "d.jsonl", "columns": {"instruction": "question"}}, train={"epochs": 2.5})
    cfg.save(tmp_path / "c.toml")
    assert C.load(tmp_path / "c.toml") == cfg


@pytest.mark.parametrize(
    "text, needles",
    [
        ("[lora]\nrank = 8\n", ["unknown key lora.rank", "Valid keys in [lora]: r, alpha, dropout, target_modules"]),
        ("[optim]\nlr = 1\n", ["unknown section [optim]", "Valid sections: model, quant, lora, data, train, output"]),
        ('[quant]\nquant_type = "int4"\n', ["quant.quant_type = 'int4'", "Valid choices: nf4, fp4"]),
        ("[lora]\nr = 0\n", ["lora.r = 0 must be greater than 0"]),
        ("[train]\nlearning_rate = -0.001\n", ["train.learning_rate = -0.001"]),
        ("[data]\nmax_seq_len = 0\n", ["data.max_seq_len = 0"]),
        ('[lora]\nr = "sixteen"\n', ["lora.r = 'sixteen' must be a whole number"]),
        ("[train\n", ["not valid TOML"]),
    ],
)
def test_invalid_config_names_key_file_and_choices(tmp_path, text, needles):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        C.load(path)
    message = info.value.one_line()
    assert str(path) in message
    for needle in needles:
        assert needle in message
    assert "\n" not in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        C.load(tmp_path)
