"""On an NVIDIA GPU: NVML agrees with CUDA, and a page-out made on purpose shows as a paging event.

Safety (the GPU may be shared): these tests allocate at most 1 GiB of device memory and 128 MiB of
managed memory, check first that the card has far more than that free, and make pages move by
touching them from the CPU, never by oversubscribing the card.

Run on the GPU machine:  pytest -m gpu tests/monitor/test_monitor_gpu.py -v -s
"""

from __future__ import annotations

import os

import pytest

from qlora_studio import events
from qlora_studio.monitor.nvml import NvmlReader
from qlora_studio.monitor.paging import make_collector, paged_state_bytes

pytestmark = pytest.mark.gpu

MIB = 1 << 20
GIB = 1 << 30


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return torch


@pytest.fixture(scope="module")
def reader():
    reader = NvmlReader()
    reader.open()
    yield reader
    reader.close()


def _nvml_index(torch, reader, cuda_index: int) -> int:
    """NVML's index of a CUDA device (they differ under CUDA_VISIBLE_DEVICES), matched by UUID."""
    uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    for gpu in reader.gpus:
        if gpu.uuid.removeprefix("GPU-") == uuid:
            return gpu.index
    if len(reader.gpus) == 1:
        return 0
    pytest.fail(f"no NVML GPU has the UUID {uuid} of CUDA device {cuda_index}")


def _require_free(torch, device, needed: int) -> None:
    free, _ = torch.cuda.mem_get_info(device)
    if free < 8 * needed:
        pytest.skip(f"only {free / GIB:.1f} GiB free on {device}: not risking a shared card")


def test_nvml_used_memory_agrees_with_cuda(torch, reader):
    device = torch.device("cuda", 0)
    _require_free(torch, device, GIB)
    block = torch.ones(GIB, dtype=torch.uint8, device=device)  # a visible amount, really resident
    torch.cuda.synchronize(device)
    index = _nvml_index(torch, reader, 0)
    free_before, total = torch.cuda.mem_get_info(device)
    sample = reader.read_gpu(index)
    free_after, _ = torch.cuda.mem_get_info(device)
    cuda_used = total - (free_before + free_after) // 2
    print(f"\nNVML: total {sample.total}, reserved {sample.reserved}, used {sample.used}, free {sample.free}")
    print(f"CUDA: total {total}, used {cuda_used}, free {free_before} .. {free_after}")
    assert abs(sample.used - cuda_used) <= 64 * MIB
    assert abs(sample.free - (free_before + free_after) // 2) <= 64 * MIB
    assert sample.used >= GIB
    del block


def test_nvml_lists_this_process_with_its_memory(torch, reader):
    device = torch.device("cuda", 0)
    _require_free(torch, device, GIB)
    block = torch.ones(GIB, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    sample = reader.read_gpu(_nvml_index(torch, reader, 0))
    me = sample.process(os.getpid())
    if me is None:
        pytest.skip(f"NVML lists pids {[p.pid for p in sample.processes]}: another pid namespace (a container)")
    assert me.used_bytes is not None and me.used_bytes >= GIB
    assert me.name
    del block


def test_a_cpu_touch_of_the_paged_state_shows_as_a_paging_event(torch, tmp_path):
    pytest.importorskip("cupti", reason="cupti-python is not installed")
    import bitsandbytes as bnb

    device = torch.device("cuda", 0)
    n = 16 * 1024 * 1024  # float32: 64 MiB per state, 128 MiB for AdamW's two
    _require_free(torch, device, 2 * n * 4 + 2 * n * 4)
    collector = make_collector(True, device)
    assert collector.unavailable is None, collector.unavailable
    writer = events.EventWriter(tmp_path / "events.jsonl")
    try:
        p = torch.nn.Parameter(torch.zeros(n, device=device))
        opt = bnb.optim.PagedAdamW32bit([p], lr=1e-3)
        p.grad = torch.full_like(p, 1e-3)
        opt.step()
        torch.cuda.synchronize(device)
        size = paged_state_bytes(opt)
        assert size == 2 * n * 4
        collector.flush(0, force=True)  # drain the moves of creating the state (step 0)

        with collector.phase("touch"):
            # Writing every element from the CPU faults each page over to host memory.
            for key in ("state1", "state2"):
                state = opt.state[p][key]
                assert state.device.type == "cpu" and state.is_paged
                state.add_(0.0)
        with collector.phase("optimizer"):
            opt.step()  # bitsandbytes prefetches the state back to the device first
        torch.cuda.synchronize(device)  # as the training loop does before it flushes
        for totals in collector.flush(1, force=True):  # force: well within the flush interval
            writer.emit("paging", **{"step": 1, **totals})
    finally:
        collector.close()
        writer.close()

    emitted = [e for e in events.read(tmp_path / "events.jsonl") if e["type"] == "paging"]
    print("\n" + "\n".join(str(e) for e in emitted))
    paging = [e for e in emitted if e["step"] == 1]  # step 0's records may arrive late, as step 0
    by_phase = {e["phase"]: e for e in paging}
    moved_out = sum(e["bytes_dtoh"] for e in paging)
    assert abs(moved_out - size) <= 0.05 * size, f"out {moved_out} vs state {size}"
    assert "optimizer" in by_phase, "the optimizer step moved nothing back"
    moved_in = by_phase["optimizer"]["bytes_htod"]
    assert abs(moved_in - size) <= 0.05 * size, f"in {moved_in} vs state {size}"
