"""The training loop on the demo model: learning, exact resume, stop requests, loss normalisation."""

from pathlib import Path

import pytest
import torch

from qlora_studio import config as C
from qlora_studio import events, runs
from qlora_studio.engine.trainer import StopFlag, Trainer

from .adamw import run_adamw


def _train(demo: Path, run_dir: Path, resume=False, stop=None, **overrides) -> tuple[str, list[dict]]:
    cfg = C.load(demo / "config.toml")
    sections = {"train": {"max_steps": 12, "checkpoint_every": 0, "log_every": 1}}
    for name, values in overrides.items():
        sections.setdefault(name, {}).update(values)
    cfg = C.replace(cfg, **sections)
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = events.EventWriter(run_dir / runs.EVENTS)
    flag = stop or StopFlag(run_dir)
    outcome = Trainer(cfg, run_dir, writer, flag, base_dir=demo, resume=resume).run()
    writer.close()
    return outcome.status, list(events.read(run_dir / runs.EVENTS))


def _losses(evts):
    return {e["step"]: e["loss"] for e in evts if e["type"] == "step"}


def test_loss_decreases_and_run_finishes(demo_template, tmp_path):
    status, evts = _train(demo_template, tmp_path / "run", train={"max_steps": 30})
    assert status == "finished"
    losses = list(_losses(evts).values())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    kinds = [e["type"] for e in evts]
    assert kinds[0] == "run_started" and kinds[1] == "data_ready" and kinds[-1] == "finished"
    step = next(e for e in evts if e["type"] == "step")
    for key in events.EVENT_FIELDS["step"]:
        assert key in step
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert runs.summarize(tmp_path / "run").status == "finished"


def test_resume_equals_uninterrupted_run(demo_template, tmp_path):
    # An uninterrupted run of 12 steps, against 6 steps + checkpoint, then a resumed run to 12.
    _, full = _train(demo_template, tmp_path / "full", lora={"dropout": 0.1})
    _train(demo_template, tmp_path / "part", lora={"dropout": 0.1}, train={"max_steps": 6, "checkpoint_every": 3})
    ckpts = runs.list_checkpoints(tmp_path / "part")
    assert [s for s, _ in ckpts] == [3]  # the checkpoint at the final step is replaced by the adapter
    # Interrupt after step 3 as a kill would: drop what came after the checkpoint.
    status, resumed = _train(demo_template, tmp_path / "part", resume=True, lora={"dropout": 0.1})
    assert status == "finished"
    last_start = max(i for i, e in enumerate(resumed) if e["type"] == "run_started")
    full_losses, resumed_losses = _losses(full), _losses(resumed[last_start:])
    assert sorted(resumed_losses) == list(range(4, 13))
    for step in range(4, 13):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5, abs=1e-6), step
    started = [e for e in resumed if e["type"] == "run_started"][-1]
    assert started["plan"]["resumed_from"] == 3


def test_stop_request_checkpoints_and_reports(demo_template, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    flag = StopFlag(run_dir)
    writer_steps = []

    class StopAfter(StopFlag):
        def is_set(self):
            steps = [e for e in events.read(run_dir / runs.EVENTS) if e["type"] == "step"]
            writer_steps.append(len(steps))
            if len(steps) >= 4:
                (run_dir / runs.STOP).write_text("")
            return super().is_set()

    status, evts = _train(demo_template, run_dir, stop=StopAfter(run_dir), train={"max_steps": 50})
    assert status == "stopped"
    stopped = evts[-1]
    assert stopped["type"] == "stopped" and stopped["step"] == 4 and stopped["reason"] == "stop file"
    assert runs.latest_checkpoint(run_dir).name == runs.checkpoint_name(4)
    assert not (run_dir / runs.STOP).exists()
    assert not (run_dir / runs.ADAPTER).exists()
    assert flag.stop_file == run_dir / runs.STOP


def test_gradient_accumulation_matches_one_large_batch(demo_template):
    """4 micro-batches of 2 give the same gradient as 1 batch of 8 (loss normalised by learned tokens)."""
    from qlora_studio.engine.data import Batcher, collate, load_dataset
    from qlora_studio.engine.model import load_model
    from qlora_studio.engine.trainer import count_learned, loss_sum

    cfg = C.load(demo_template / "config.toml")
    model, tok, _ = load_model(cfg, torch.device("cpu"), torch.bfloat16, demo_template)
    # Give LoRA B nonzero values so gradients reach every adapter matrix.
    torch.manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    data = load_dataset(cfg.data, tok, demo_template)
    examples = Batcher(data.train, 8, 0).next()
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(micro: int) -> list[torch.Tensor]:
        model.zero_grad()
        batches = [collate(examples[i : i + micro], tok.pad_token_id) for i in range(0, 8, micro)]
        n = sum(count_learned(b["labels"]) for b in batches)
        for b in batches:
            (loss_sum(model, b) / n).backward()
        return [p.grad.clone() for p in params]

    one, four = grads(8), grads(2)
    for a, b in zip(one, four):
        # bf16 compute: compare each adapter matrix's gradient as a whole.
        assert (a - b).norm() <= 2e-2 * b.norm()


def test_chunked_loss_equals_standard(demo_template):
    from qlora_studio.engine import trainer
    from qlora_studio.engine.data import Batcher, collate, load_dataset
    from qlora_studio.engine.model import load_model

    cfg = C.load(demo_template / "config.toml")
    model, tok, _ = load_model(cfg, torch.device("cpu"), torch.bfloat16, demo_template)
    data = load_dataset(cfg.data, tok, demo_template)
    batch = collate(Batcher(data.train, 8, 0).next(), tok.pad_token_id)
    trainer.LOSS_CHUNK_TOKENS = 7  # several chunks
    try:
        standard = trainer.loss_sum(model, batch, "standard")
        chunked = trainer.loss_sum(model, batch, "chunked")
        keep = trainer.learned_positions(batch["labels"])
        given = trainer.loss_sum(model, batch, "chunked", keep)  # as the training step passes them
    finally:
        trainer.LOSS_CHUNK_TOKENS = 1024
    torch.testing.assert_close(chunked, standard, rtol=1e-4, atol=1e-3)
    assert torch.equal(given, chunked)
    assert 0 < keep.numel() == trainer.count_learned(batch["labels"]) < batch["labels"][:, 1:].numel()


def test_frozen_head_cross_entropy_matches_autograd():
    from qlora_studio.engine.losses import frozen_head_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(37, 64, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 64, dtype=torch.float64)
    targets = torch.randint(0, 300, (37,))
    ours = frozen_head_cross_entropy(hidden, weight, targets, chunk=8)
    (g_ours,) = torch.autograd.grad(ours * 0.5, hidden)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref * 0.5, hidden)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)  # logits are computed in fp32


def _oom_when_rows_exceed(limit):
    """loss_sum that fails like CUDA does when a micro-batch has more than ``limit`` rows."""
    from qlora_studio.engine import trainer

    real = trainer.loss_sum

    def fake(model, batch, impl="standard", keep=None):
        if batch["input_ids"].shape[0] > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, batch, impl, keep)

    return fake


def test_out_of_memory_halves_micro_batch_and_keeps_the_effective_batch(demo_template, tmp_path, monkeypatch):
    from qlora_studio.engine import trainer

    _, plain = _train(demo_template, tmp_path / "plain", train={"max_steps": 3})
    monkeypatch.setattr(trainer, "loss_sum", _oom_when_rows_exceed(2))
    status, evts = _train(demo_template, tmp_path / "oom", train={"max_steps": 3})
    assert status == "finished"
    recovered = [e for e in evts if e["type"] == "oom_recovered"]
    assert [(e["micro_batch_size"], e["grad_accum_steps"]) for e in recovered] == [(4, 2), (2, 4)]
    assert all(e["step"] == 1 for e in recovered)
    # Same examples, same effective batch: the same losses up to rounding.
    for step, loss in _losses(plain).items():
        assert _losses(evts)[step] == pytest.approx(loss, rel=2e-2)


def test_out_of_memory_at_micro_batch_one_stops_with_checkpoint_and_advice(demo_template, tmp_path, monkeypatch):
    from qlora_studio.engine import trainer
    from qlora_studio.engine.trainer import OutOfMemory

    monkeypatch.setattr(trainer, "loss_sum", _oom_when_rows_exceed(0))
    with pytest.raises(OutOfMemory) as info:
        _train(demo_template, tmp_path / "run", train={"max_steps": 3})
    assert "micro-batch of 1" in info.value.one_line() and "max_seq_len" in info.value.one_line()
    assert runs.latest_checkpoint(tmp_path / "run") is not None


@pytest.mark.parametrize("name", ["PagedAdamW32bit", "PagedAdamW8bit"])
def test_one_sync_paged_adamw_equals_bitsandbytes(name):
    import bitsandbytes as bnb

    from qlora_studio.engine import optim

    ours_cls = {"PagedAdamW32bit": optim.PagedAdamW32bitOneSync, "PagedAdamW8bit": optim.PagedAdamW8bitOneSync}[name]
    torch.manual_seed(0)
    start = [torch.randn(256, 512), torch.randn(300), torch.randn(64, 64)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(4)]
    results = []
    for cls in (getattr(bnb.optim, name), ours_cls):
        params, opt = run_adamw(cls, start, grads)
        results.append([p.detach().clone() for p in params])
        state = opt.state_dict()
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert state["state"]


def _adamw_data(steps=4):
    torch.manual_seed(0)
    start = [torch.randn(256, 512), torch.randn(300), torch.randn(64, 64)]
    return start, [[torch.randn_like(t) for t in start] for _ in range(steps)]


def test_fused_paged_adamw_does_bitsandbytes_arithmetic():
    import bitsandbytes as bnb

    from qlora_studio.engine.optim import PagedAdamWFused

    start, grads = _adamw_data(6)
    ours, opt = run_adamw(PagedAdamWFused, start, grads)
    theirs, _ = run_adamw(bnb.optim.PagedAdamW32bit, start, grads)
    for a, b, s in zip(ours, theirs, start):
        assert not torch.equal(a, s)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # every state is a view of one buffer per moment; on the CPU nothing is paged
    pointers = {state["exp_avg"].untyped_storage().data_ptr() for state in opt.state.values()}
    assert len(pointers) == 1 and not opt.paged and opt.managed_host_tensors() == []
    assert all(float(state["step"]) == 6 for state in opt.state.values())
    with pytest.raises(ValueError, match="fp32"):
        PagedAdamWFused([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))])


def test_fused_paged_adamw_resumes_exactly_and_from_bitsandbytes_state():
    import bitsandbytes as bnb

    from qlora_studio.engine.optim import PagedAdamWFused

    start, grads = _adamw_data(4)
    straight, _ = run_adamw(PagedAdamWFused, start, grads)
    for first_cls in (PagedAdamWFused, bnb.optim.PagedAdamW32bit):
        half, first = run_adamw(first_cls, start, grads[:2])
        saved = first.state_dict()
        params = [torch.nn.Parameter(p.detach().clone()) for p in half]
        opt = PagedAdamWFused(params, lr=5.0, weight_decay=0.5)  # the saved hyperparameters win
        buffer = opt.state[params[0]]["exp_avg"].untyped_storage().data_ptr()
        opt.load_state_dict(saved)
        assert opt.state[params[-1]]["exp_avg"].untyped_storage().data_ptr() == buffer  # loaded into the same buffers
        for g in grads[2:]:
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            opt.step()
        for a, b in zip(params, straight):
            if first_cls is PagedAdamWFused:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert len({s["exp_avg_sq"].untyped_storage().data_ptr() for s in opt.state.values()}) == 1
    _, eight = run_adamw(bnb.optim.PagedAdamW8bit, start, grads[:1])
    with pytest.raises(ValueError, match="8-bit"):
        PagedAdamWFused([torch.nn.Parameter(t.clone()) for t in start]).load_state_dict(eight.state_dict())


def test_step_events_thin_out_on_long_runs():
    from qlora_studio.engine.trainer import logs_step

    assert all(logs_step(s, 1) for s in range(1, 50))
    assert [s for s in range(1, 31) if logs_step(s, 10)] == [10, 20, 30]
    auto = [s for s in range(1, 20_001) if logs_step(s, 0)]
    assert auto[:1000] == list(range(1, 1001))
    assert 3_000 < len(auto) < 4_500  # 20,000 steps: a few thousand events, not 20,000
    assert len([s for s in range(1, 1_000_001) if logs_step(s, 0)]) < 9_000


def test_a_loss_kernel_that_fails_to_build_leaves_the_pytorch_operations_with_a_warning(monkeypatch, caplog):
    from qlora_studio.engine import losses

    torch.manual_seed(0)
    hidden = torch.randn(37, 64, requires_grad=True)
    weight = torch.randn(300, 64)
    targets = torch.randint(0, 300, (37,))
    expected = losses.frozen_head_cross_entropy(hidden, weight, targets, chunk=8)
    (expected_grad,) = torch.autograd.grad(expected, hidden)

    def broken(logits, y, grad):
        raise RuntimeError("the kernel could not be compiled\ndetails")

    monkeypatch.setattr(losses, "_KERNEL_OFF", [])
    real = losses._kernel
    monkeypatch.setattr(losses, "_kernel", lambda h: broken if not losses._KERNEL_OFF else real(h))
    with caplog.at_level("WARNING", logger="qlora_studio.engine.losses"):
        loss = losses.frozen_head_cross_entropy(hidden, weight, targets, chunk=8)
        (grad,) = torch.autograd.grad(loss, hidden)
    assert torch.equal(loss, expected) and torch.equal(grad, expected_grad)
    assert losses._KERNEL_OFF == ["RuntimeError: the kernel could not be compiled"]
    assert "runs as PyTorch operations" in caplog.text
