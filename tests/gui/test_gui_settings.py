"""Configuration save/load through the window, presets, and what a second launch remembers."""

from __future__ import annotations

from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QSpinBox

from qlora_studio import config
from qlora_studio.gui import presets


def choose_preset(window, name: str) -> None:
    combo = window.findChild(QComboBox, "presetCombo")
    index = combo.findText(name)
    combo.setCurrentIndex(index)
    combo.activated.emit(index)


def test_config_save_and_load_round_trip(make_window, tmp_path):
    window = make_window()
    window.findChild(QComboBox, "quantType").setCurrentIndex(1)  # fp4
    window.findChild(QCheckBox, "doubleQuant").setChecked(False)
    window.findChild(QSpinBox, "loraR").setValue(32)
    window.findChild(QDoubleSpinBox, "loraDropout").setValue(0.1)
    window.findChild(QSpinBox, "maxSeqLen").setValue(512)
    window.findChild(QDoubleSpinBox, "valFraction").setValue(0.05)
    window.findChild(QDoubleSpinBox, "train_learning_rate").setValue(3e-4)
    window.findChild(QComboBox, "train_schedule").setCurrentText("cosine")
    window.findChild(QSpinBox, "train_warmup_steps").setValue(7)
    window.training_page.run_name.setText("round-trip")
    shown = window.collect_config()

    path = tmp_path / "saved.toml"
    window.save_config_file(path)
    saved = config.load(path)  # the command line's own reader
    assert saved == shown
    assert (saved.quant.quant_type, saved.quant.double_quant, saved.lora.r) == ("fp4", False, 32)
    assert (saved.train.schedule, saved.train.warmup_steps, saved.output.run_name) == ("cosine", 7, "round-trip")

    window.apply_config(config.RunConfig())
    assert window.collect_config() != saved
    window.load_config_file(path)
    assert window.collect_config() == saved


def test_keys_no_page_shows_survive_a_round_trip(window, tmp_path):
    source = tmp_path / "extra.toml"
    source.write_text('[train]\nadam_beta2 = 0.95\nloss_impl = "chunked"\n[model]\nname_or_path = "org/model"\n')
    window.load_config_file(source)
    out = tmp_path / "out.toml"
    window.save_config_file(out)
    cfg = config.load(out)
    assert (cfg.train.adam_beta2, cfg.train.loss_impl, cfg.model.name_or_path) == (0.95, "chunked", "org/model")


def test_relative_paths_in_a_config_file_are_relative_to_its_folder(window, app_home):
    demo = app_home / "demo"
    window.load_config_file(demo / "config.toml")  # model = "model", data.path = "data.jsonl"
    cfg = window.collect_config()
    assert cfg.model.name_or_path == str((demo / "model").resolve())
    assert cfg.data.path == str((demo / "data.jsonl").resolve())


def test_presets_fill_the_pages_and_editing_makes_it_custom(window):
    choose_preset(window, "Low VRAM")
    cfg = window.collect_config()
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.train.optimizer) == (1, 16, "paged_adamw_8bit")
    assert cfg.lora.r == 16 and cfg.data.max_seq_len == 512
    assert cfg.model.name_or_path.endswith("model")  # the model choice survives a preset
    combo = window.findChild(QComboBox, "presetCombo")
    assert combo.currentText() == "Low VRAM"

    window.findChild(QDoubleSpinBox, "train_learning_rate").setValue(5e-4)
    assert combo.currentText() == presets.CUSTOM

    choose_preset(window, "QLoRA paper")
    cfg = window.collect_config()
    paper = config.RunConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.train.learning_rate, cfg.train.max_grad_norm) == (
        paper.lora.r, paper.lora.alpha, paper.train.learning_rate, paper.train.max_grad_norm)
    assert combo.currentText() == "QLoRA paper"


def test_a_second_launch_restores_settings_layout_and_recent_items(make_window, qtbot, tmp_path):
    first = make_window()
    first.resize(760, 540)  # within the offscreen screen (800×600)
    first.findChild(QSpinBox, "loraR").setValue(48)
    first.model_page.set_source(str(tmp_path / "some-model"))
    first.tabs.setCurrentWidget(first.runs_page)
    first.training_page.grace.setValue(90)
    first.close()

    second = make_window()
    assert second.collect_config().lora.r == 48
    assert (second.size().width(), second.size().height()) == (760, 540)
    assert second.tabs.currentWidget() is second.runs_page
    assert second.run.grace_s == 90.0
    assert str(tmp_path / "some-model") in first.state.recent("models")
    recent_menu = second.model_page.source.recent_button.menu()
    assert str(tmp_path / "some-model") in [a.text() for a in recent_menu.actions()]


def test_tooltips_explain_the_qlora_settings(window):
    for name in ("quantType", "doubleQuant", "computeDtype", "loraR", "loraAlpha", "loraDropout", "allLinear",
                 "train_optimizer", "train_gradient_checkpointing", "maxSeqLen", "presetCombo"):
        widget = window.findChild(QComboBox, name) or window.findChild(QCheckBox, name) or \
            window.findChild(QSpinBox, name) or window.findChild(QDoubleSpinBox, name)
        assert widget is not None, name
        assert len(widget.toolTip()) > 30, name
    assert "NF4" in window.findChild(QComboBox, "quantType").toolTip()
    assert "paged" in window.findChild(QComboBox, "train_optimizer").toolTip().lower()


def test_the_gpu_paths_and_paging_counters_are_settings_with_explanations(window):
    assert window.collect_config().train.offload_checkpoints  # on by default, as in the engine
    for key in ("offload_checkpoints", "embeddings_on_cpu", "fused_kernels", "fused_optimizer", "cuda_graphs",
                "paging_counters"):
        box = window.findChild(QCheckBox, f"train_{key}")
        assert box is not None and len(box.toolTip()) > 30, key
        box.setChecked(False)
        assert getattr(window.collect_config().train, key) is False, key
    assert "liger-kernel" in window.findChild(QCheckBox, "train_fused_kernels").toolTip()
