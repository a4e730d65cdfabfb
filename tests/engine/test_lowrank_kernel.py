"""The thin-product kernels (engine/lowrank_kernel.py) on the CPU, through Triton's interpreter,
against fp32 products; and the fused layer's fallback to torch's products when they fail."""

import json
import os
import subprocess
import sys

import pytest
import torch

from qlora_studio.engine import lora_kernels

# Triton reads TRITON_INTERPRET when it is imported: the interpreted kernels run in a process of their own.
CHECK = """
import json, sys
import torch
from qlora_studio.engine import lowrank_kernel as K

torch.manual_seed(0)
out = []
# (tokens, width, rank, configuration): tiles partly outside the operands, sums in 1, 2 and 4 parts
# (the parts are asked for where the programs do not fill the GPU: a few tokens here), ranks that
# are not a power of two, operands read through strides (a transposed weight, a column slice)
cases = [(200, 320, 16, None), (64, 128, 48, (32, 64, 4, 4, 2)), (130, 64, 8, (16, 32, 1, 4, 2)),
         (96, 200, 24, (32, 64, 2, 4, 2)), (256, 512, 16, (32, 64, 4, 4, 2))]
for tokens, width, rank, config in cases:
    for dtype in (torch.float16, torch.float32):
        x = torch.randn(tokens, width, dtype=dtype)
        a = torch.randn(rank, width, dtype=dtype)
        got = K.times_small(x, a.t(), config)
        ref = x.double() @ a.double().t()
        wide = torch.randn(tokens, 2 * rank, dtype=dtype)
        u = wide[:, rank:]  # a column slice, as the group's xA for its second projection
        t_config = None if config is None else (config[1], config[0], *config[2:])
        g = K.small_t_times(u, x, 0.5, False, t_config)
        gt = K.small_t_times(u, x, 0.5, True, t_config)
        ref2 = 0.5 * (u.double().t() @ x.double())
        out.append({"case": [tokens, width, rank, str(dtype)], "dtype": str(got.dtype), "shape": list(got.shape),
                    "err": ((got.double() - ref).abs().max() / ref.abs().max()).item(),
                    "t_dtype": str(g.dtype), "t_shape": list(g.shape), "tt_shape": list(gt.shape),
                    "tt_contiguous": gt.is_contiguous(),
                    "t_err": ((g.double() - ref2).abs().max() / ref2.abs().max()).item(),
                    "tt_err": ((gt.double() - ref2.t()).abs().max() / ref2.abs().max()).item(),
                    "supported": K.supported(x, a)})
json.dump(out, sys.stdout)
"""


def test_kernels_give_the_products_under_the_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    cases = json.loads(done.stdout)
    assert len(cases) == 10
    for c in cases:
        tokens, width, rank, dtype = c["case"]
        # the tall product rounds to the operands' dtype (fp16: 2^-11); the gradients stay in fp32
        assert c["dtype"] == dtype and c["shape"] == [tokens, rank] and c["err"] < (1e-3 if "16" in dtype else 1e-5), c
        assert c["t_dtype"] == "torch.float32" and c["t_shape"] == [rank, width] and c["tt_shape"] == [width, rank], c
        assert c["tt_contiguous"] and c["t_err"] < 1e-5 and c["tt_err"] < 1e-5, c
        assert not c["supported"], c  # CPU operands: the fused layer uses torch's products


def test_a_kernel_that_fails_leaves_torch_for_the_rest_of_the_run(monkeypatch, caplog):
    calls = []

    class Broken:
        @staticmethod
        def times_small(x, s):
            calls.append("times_small")
            raise RuntimeError("the kernel could not be compiled\ndetails")

        @staticmethod
        def small_t_times(u, x, scale, transposed):
            calls.append("small_t_times")
            raise RuntimeError("never reached")

    monkeypatch.setattr(lora_kernels, "_LOWRANK_OFF", [])
    monkeypatch.setattr(lora_kernels, "_lowrank_kernel", lambda *t: None if lora_kernels._LOWRANK_OFF else Broken)
    torch.manual_seed(0)
    x, a, u = torch.randn(32, 64), torch.randn(8, 64), torch.randn(32, 8)
    with caplog.at_level("WARNING", logger="qlora_studio.engine.lora_kernels"):
        first = lora_kernels._thin(x, a.t())
        second = lora_kernels._thin_t(u, x, 0.5, transposed=True)
    assert calls == ["times_small"]
    assert torch.equal(first, x @ a.t())
    assert torch.equal(second, (x.t() @ u) * 0.5)
    assert lora_kernels._LOWRANK_OFF == ["RuntimeError: the kernel could not be compiled"]
    assert "torch computes those products from now on" in caplog.text


def test_cpu_operands_take_torchs_products():
    torch.manual_seed(0)
    x, a, u = torch.randn(32, 64), torch.randn(8, 64), torch.randn(32, 8)
    assert lora_kernels._lowrank_kernel(x, a) is None
    assert torch.equal(lora_kernels._thin_t(u, x), u.t() @ x)
    assert torch.equal(lora_kernels._thin_t(u, x, 2.0, transposed=True), (x.t() @ u) * 2.0)


@pytest.mark.parametrize("path", ["thin", "dequantize"])
def test_running_out_of_memory_in_a_kernel_is_raised_and_leaves_it_on(monkeypatch, path):
    # The trainer catches the error and retries with a smaller micro-batch; the kernels stay in use.
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lora_kernels, "_LOWRANK_OFF", [])
    monkeypatch.setattr(lora_kernels, "_KERNEL_OFF", [])
    if path == "thin":
        broken = type("Broken", (), {"times_small": staticmethod(out_of_memory)})
        monkeypatch.setattr(lora_kernels, "_lowrank_kernel", lambda *t: broken)
        with pytest.raises(torch.OutOfMemoryError):
            lora_kernels._thin(torch.randn(32, 64), torch.randn(64, 8))
    else:
        import bitsandbytes.functional as bnbF

        packed, state = bnbF.quantize_4bit(torch.randn(64, 128), blocksize=64, quant_type="nf4")
        weight = torch.nn.Parameter(packed, requires_grad=False)
        weight.quant_state = state
        monkeypatch.setattr(lora_kernels, "_nf4_kernel", lambda d, s: out_of_memory)
        with pytest.raises(torch.OutOfMemoryError):
            lora_kernels._dequantize(weight)
    assert lora_kernels._LOWRANK_OFF == [] and lora_kernels._KERNEL_OFF == []
