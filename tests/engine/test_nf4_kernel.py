"""The NF4 dequantization kernel (engine/nf4_kernel.py) on the CPU, through Triton's interpreter,
against bitsandbytes' dequantization; and the fused layer's fallback when the kernel fails."""

import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_studio.engine import lora_kernels


# Triton reads TRITON_INTERPRET when it is imported (its library functions are compiled or
# interpreted from then on), so the interpreted kernel runs in a process of its own.
CHECK = """
import json, sys
import torch
import bitsandbytes.functional as bnbF
from qlora_studio.engine import nf4_kernel

out = []
torch.manual_seed(0)
for shape in [(64, 320), (192, 64), (1, 2050)]:
    for nested in (True, False):
        for dtype in (torch.float16, torch.float32):
            w = torch.randn(*shape, dtype=dtype) * 0.02
            packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
            got = nf4_kernel.dequantize_nf4(packed, state)
            out.append({"case": [list(shape), nested, str(dtype)], "shape": list(got.shape), "dtype": str(got.dtype),
                        "equal": bool(torch.equal(got, bnbF.dequantize_4bit(packed, state))),
                        "supported": nf4_kernel.supported(packed, state)})
json.dump(out, sys.stdout)
"""


# The interpreter rounds fp32 to bf16 by truncation, a GPU to the nearest: bf16 is checked on the GPU
# (tests/engine/test_gpu_fast_paths.py), fp16 and fp32 here; shapes whose last program is partly
# outside the weight, with and without double quantization.
def test_kernel_gives_bitsandbytes_values_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = json.loads(done.stdout)
    assert len(cases) == 12
    for c in cases:
        shape, _, dtype = c["case"]
        assert c["shape"] == shape and c["dtype"] == dtype and c["equal"], c
        assert not c["supported"], c  # a CPU weight: the fused layer uses bitsandbytes' own path


def test_a_kernel_that_fails_leaves_bitsandbytes_for_the_rest_of_the_run(monkeypatch, caplog):
    import bitsandbytes.functional as bnbF

    torch.manual_seed(0)
    packed, state = bnbF.quantize_4bit(torch.randn(64, 128), blocksize=64, quant_type="nf4")
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.quant_state = state
    calls = []

    def broken(data, st):
        calls.append(1)
        raise RuntimeError("the kernel could not be compiled\ndetails")

    monkeypatch.setattr(lora_kernels, "_KERNEL_OFF", [])
    monkeypatch.setattr(lora_kernels, "_nf4_kernel", lambda d, s: None if lora_kernels._KERNEL_OFF else broken)
    with caplog.at_level("WARNING", logger="qlora_studio.engine.lora_kernels"):
        first = lora_kernels._dequantize(weight)
        second = lora_kernels._dequantize(weight)
    expected = bnbF.dequantize_4bit(packed, state)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert calls == [1]
    assert lora_kernels._KERNEL_OFF == ["RuntimeError: the kernel could not be compiled"]
    assert "bitsandbytes dequantizes the weights from now on" in caplog.text


def test_running_out_of_memory_in_the_kernel_is_raised_and_leaves_it_on(monkeypatch):
    # The trainer catches the error and retries with a smaller micro-batch; the kernel stays in use.
    import bitsandbytes.functional as bnbF

    def out_of_memory(data, state):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    packed, state = bnbF.quantize_4bit(torch.randn(64, 128), blocksize=64, quant_type="nf4")
    weight = torch.nn.Parameter(packed, requires_grad=False)
    weight.quant_state = state
    monkeypatch.setattr(lora_kernels, "_KERNEL_OFF", [])
    monkeypatch.setattr(lora_kernels, "_nf4_kernel", lambda d, s: out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        lora_kernels._dequantize(weight)
    assert lora_kernels._KERNEL_OFF == []
