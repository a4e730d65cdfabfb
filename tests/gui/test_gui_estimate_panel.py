"""The estimate panel shows the verdict, a breakdown to scale and the suggestions."""

from qlora_studio import config as C
from qlora_studio.engine import estimate as E
from qlora_studio.gui.estimate_panel import GROUPS, VERDICT_WORDS, EstimatePanel
from qlora_studio.gui.vram import GpuMemory

LLAMA_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "tie_word_embeddings": True, "max_position_embeddings": 8192}


def _estimate(gpu):
    cfg = C.replace(C.RunConfig(), model={"name_or_path": "m"}, data={"path": "d.jsonl", "max_seq_len": 1024})
    return E.estimate(LLAMA_1B, cfg, gpu.total if gpu else None, gpu.free if gpu else None)


def test_panel_shows_verdict_parts_and_capacity(qtbot):
    panel = EstimatePanel()
    qtbot.addWidget(panel)
    gpu = GpuMemory("Test GPU", 8 * 2**30, 7 * 2**30)
    result = _estimate(gpu)
    panel.show_estimate(result, gpu)
    assert _says_verdict(panel.headline.text(), result.verdict)
    assert "Test GPU" in panel.headline.text()
    assert sum(size for _, size, _ in panel.bar.parts) == sum(i.bytes for i in result.items)
    assert {label for label, _, _ in panel.bar.parts} <= {g[0] for g in GROUPS}
    assert panel.bar.capacity == gpu.total
    panel.bar.grab()  # paints without error


def test_panel_without_gpu_and_with_a_tiny_gpu(qtbot):
    panel = EstimatePanel()
    qtbot.addWidget(panel)
    panel.show_estimate(_estimate(None), None)
    assert "No NVIDIA GPU found" in panel.headline.text()
    small = GpuMemory("Small GPU", 2 * 2**30, 2 * 2**30)
    result = _estimate(small)
    panel.show_estimate(result, small)
    assert result.verdict == "does_not_fit" and "Does not fit" in panel.headline.text()
    assert panel.details.text()  # suggestions say what would fit
    panel.show_text("Pick a model")
    assert not panel.bar.isVisible() and panel.headline.text() == "Pick a model"


def _says_verdict(text: str, verdict: str) -> bool:
    return VERDICT_WORDS[verdict] in text



def test_every_part_of_the_estimate_has_its_group():
    grouped = {key for _, _, keys in GROUPS for key in keys}
    assert set(E.LABELS) == grouped  # a new part (the CUDA graphs' pool, say) gets a colour a person can name
