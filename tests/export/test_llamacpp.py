"""llama.cpp (through llama-cpp-python, built from its source package) reads the GGUF exports and
continues a prompt greedily exactly as transformers does.

Slow: run with ``pytest -m slow tests/export`` after ``pip install llama-cpp-python`` (a source
build, about 10 minutes on 2 cores). The merged GGUF is compared with transformers running the
merged model; the base GGUF with the LoRA GGUF applied is compared with transformers running the
base with the PEFT adapter.
"""

from __future__ import annotations

import pytest
import torch

from qlora_studio.engine.export import export

pytestmark = pytest.mark.slow

llama_cpp = pytest.importorskip("llama_cpp", reason="pip install llama-cpp-python (builds llama.cpp from source)")

PROMPT = "The capital of France is"
TOKENS = 24


def _hf_greedy(model, ids: list[int]) -> list[int]:
    """Argmax continuation for TOKENS tokens, through end-of-sequence tokens as llama.cpp's loop does
    (``generate`` would stop there, or with ``min_new_tokens`` forbid them)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(TOKENS):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def _llama_cpp_greedy(model_path, ids: list[int], lora_path=None) -> tuple[list[int], list[int]]:
    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None,
                          n_ctx=256, n_threads=2, seed=0, verbose=False)
    tokenized = llm.tokenize(PROMPT.encode("utf-8"), add_bos=True, special=False)
    generated = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        generated.append(token)
        if len(generated) == TOKENS:
            break
    llm.close()
    return tokenized, generated


@pytest.fixture(scope="module")
def exported(tmp_path_factory, request):
    made = {}

    def get(fixture):
        if fixture not in made:
            tiny = request.getfixturevalue(fixture)
            root = tmp_path_factory.mktemp(f"llamacpp-{fixture}")
            made[fixture] = (tiny, export(tiny.run, "gguf", out=root / "gguf", gguf_include_base=True),
                             export(tiny.run, "merged", out=root / "merged"))
        return made[fixture]

    return get


@pytest.mark.parametrize("fixture", ["llama_run", "mistral_run", "qwen2_run"])
def test_llama_cpp_matches_transformers(fixture, exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny, gguf_dir, merged_dir = exported(fixture)
    tok = AutoTokenizer.from_pretrained(tiny.model)
    ids = [tok.bos_token_id] + tok(PROMPT, add_special_tokens=False)["input_ids"]

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    expected_merged = _hf_greedy(merged, ids)
    tokenized, got_merged = _llama_cpp_greedy(gguf_dir / "run-f16.gguf", ids)
    assert tokenized == ids  # the GGUF's tokenizer metadata tokenizes like the original tokenizer
    assert got_merged == expected_merged
    assert len(set(expected_merged)) >= 4  # a real continuation, not one token repeated

    base = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, tiny.run / "adapter").eval()
    expected_lora = _hf_greedy(peft_model, ids)
    _, got_lora = _llama_cpp_greedy(next(gguf_dir.glob("base-*.gguf")), ids, lora_path=gguf_dir / "run-lora-f32.gguf")
    assert got_lora == expected_lora
    with peft_model.disable_adapter():
        assert _hf_greedy(peft_model, ids) != expected_lora  # the adapter changes the answer


def test_q8_0_and_bf16_files_load_and_generate(llama_run, tmp_path):
    for dtype in ("q8_0", "bf16"):
        out = export(llama_run.run, "gguf", out=tmp_path / dtype, gguf_dtype=dtype)
        _, generated = _llama_cpp_greedy(out / f"run-{dtype}.gguf", [0, 275, 300, 297])
        assert len(generated) == TOKENS


def test_demo_run_exports_agree_with_transformers(demo_template, tmp_path):
    """The offline demo, trained briefly: llama.cpp continues a demo question exactly as transformers
    does, from the merged GGUF and from the base GGUF with the LoRA GGUF."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlora_studio import formats

    demo = tmp_path / "demo"
    shutil.copytree(demo_template, demo)
    run = demo / "runs" / "short"
    proc = subprocess.run([sys.executable, "-m", "qlora_studio", "train", str(demo / "config.toml"), "--output", str(run),
                           "--max-steps", "40"], capture_output=True, text=True, check=False, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    gguf_dir = export(run, "gguf", out=tmp_path / "gguf", gguf_include_base=True)
    merged_dir = export(run, "merged", out=tmp_path / "merged")

    tok = AutoTokenizer.from_pretrained(demo / "model")
    question = json.loads((demo / "data.jsonl").read_text().splitlines()[0])["instruction"]
    text = tok.bos_token + formats.render_prompt_default([{"role": "user", "content": question}])
    ids = tok(text, add_special_tokens=False)["input_ids"]

    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    _, got = _llama_cpp_greedy(next(gguf_dir.glob("short-f16.gguf")), ids)
    assert got == _hf_greedy(merged, ids)

    base = AutoModelForCausalLM.from_pretrained(demo / "model", dtype=torch.float32)
    tuned = PeftModel.from_pretrained(base, run / "adapter").eval()
    _, got_lora = _llama_cpp_greedy(next(gguf_dir.glob("base-*.gguf")), ids, lora_path=gguf_dir / "short-lora-f32.gguf")
    assert got_lora == _hf_greedy(tuned, ids)
