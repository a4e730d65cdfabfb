"""The training loop: QLoRA as in Algorithm 2 of the paper, in one readable function.

Per optimizer step: draw ``grad_accum_steps`` micro-batches, run forward and backward through the
frozen 4-bit base and its LoRA adapters, normalise the loss by the number of learned tokens in the
whole step (so accumulation gives the same gradient as one large batch), clip, step the paged
optimizer and the schedule. Evaluate and checkpoint every N steps; honour a stop request after the
current step.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .. import __version__, runs
from ..config import RunConfig
from ..errors import UserError
from ..events import EventWriter
from ..monitor.paging import paged_state_bytes
from . import checkpoint as ckpt
from . import device as devices
from . import offload
from .data import IGNORE, Batcher, Dataset, collate, load_dataset
from .losses import frozen_head_cross_entropy
from .model import load_model

log = logging.getLogger(__name__)

LOSS_CHUNK_TOKENS = 1024  #: at most this many tokens per chunk of the chunked loss
LOSS_LOGITS_BYTES = 128 << 20  #: and at most this much for a chunk's fp32 logits (at least 64 tokens)


def loss_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk of the chunked loss: 1,024 for a 32k vocabulary, 256 for 128k."""
    by_bytes = max(64, LOSS_LOGITS_BYTES // (4 * vocab_size) // 64 * 64)
    return max(1, min(LOSS_CHUNK_TOKENS, by_bytes))


# ----------------------------------------------------------------------------------------------
# Stop requests


class StopFlag:
    """Set by a line ``stop`` on standard input, a STOP file in the run folder, or SIGTERM."""

    def __init__(self, run_dir: Path):
        self.stop_file = run_dir / runs.STOP
        self._event = threading.Event()
        self.reason = ""

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        if not self._event.is_set() and self.stop_file.exists():
            self.request("stop file")
        return self._event.is_set()

    def watch_stdin(self, stream=None) -> None:
        stream = stream or sys.stdin

        def reader() -> None:
            try:
                for line in stream:
                    if line.strip().lower() == "stop":
                        self.request("stop requested")
                        return
            except (OSError, ValueError):
                return
            # Standard input closed: the supervising GUI went away. Training goes on headless;
            # the GUI re-attaches through the run folder.

        threading.Thread(target=reader, name="stdin-stop", daemon=True).start()

    def clear_file(self) -> None:
        try:
            self.stop_file.unlink()
        except FileNotFoundError:
            pass


# ----------------------------------------------------------------------------------------------
# Pieces of the loop


def build_optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = cfg.train
    kwargs = dict(lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    if t.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    from .optim import PagedAdamW8bitOneSync, PagedAdamW32bitOneSync, PagedAdamWFused

    cls = {
        # The fused optimizer wants fp32 weights, as PEFT keeps adapters over a 4-bit base.
        "paged_adamw_32bit": PagedAdamWFused if t.fused_optimizer and all(p.dtype == torch.float32 for p in params)
        else PagedAdamW32bitOneSync,
        "paged_adamw_8bit": PagedAdamW8bitOneSync,
        "adamw_32bit": bnb.optim.AdamW32bit,
    }[t.optimizer]
    return cls(params, **kwargs)


def build_scheduler(cfg: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    t = cfg.train
    warmup = t.warmup_steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if t.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plan_steps(cfg: RunConfig, n_train: int) -> int:
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    return max(1, math.ceil(cfg.train.epochs * n_train / per_step))


def count_learned(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


def learned_positions(labels: torch.Tensor) -> torch.Tensor:
    """Indices of the learned next-token positions of a micro-batch, flattened (what ``chunked`` keeps)."""
    return (labels[:, 1:].reshape(-1) != IGNORE).nonzero().squeeze(1)


def loss_sum(model, batch: dict[str, torch.Tensor], impl: str = "standard", keep: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over the learned tokens of a micro-batch.

    ``standard`` materialises the logits of every position (as transformers does). ``chunked``
    computes the output head only for learned positions, a chunk at a time (losses.py), so the
    full-vocabulary logits never exist at once. Both give the same sum. ``keep``: the learned
    positions (:func:`learned_positions`), found from the labels while they were still on the CPU;
    found here otherwise, which on a GPU waits for the forward pass to finish.
    """
    labels = batch["labels"][:, 1:]
    if impl == "chunked":
        base = model.get_base_model()
        head = base.get_output_embeddings()
        if head is not None and not getattr(base.config, "final_logit_softcapping", None):
            hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            offload.settle()  # the last layers' inputs, waiting for their copy to CPU memory, go first (a no-op
            # where the final norm's hook did so)
            h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            del hidden  # the final norm keeps its input, not its output
            y = labels.reshape(-1)
            keep = learned_positions(batch["labels"]) if keep is None else keep
            if keep.numel() != h.shape[0]:  # when every position is learned, the rows are already those
                h, y = h.index_select(0, keep), y.index_select(0, keep)
            chunk = loss_chunk_tokens(head.weight.shape[0])
            if not head.weight.requires_grad:
                graphs = getattr(model, "layer_graphs", None)
                return frozen_head_cross_entropy(h, head.weight, y, chunk, graphs.scratch if graphs is not None else None)
            total = h.new_zeros((), dtype=torch.float32)
            for start in range(0, h.shape[0], chunk):
                total = total + activation_checkpoint(
                    _head_ce, h[start : start + chunk], y[start : start + chunk], head.weight, use_reentrant=False,
                )
            return total
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def _head_ce(h: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), y, reduction="sum")


def accumulate(model, batches: list[dict[str, torch.Tensor]], cfg: RunConfig, device: torch.device,
               paging=None) -> torch.Tensor:
    """Forward and backward over the micro-batches of one step; returns the step's loss (0-dim).

    The loss of every micro-batch is divided by the learned tokens of the whole step, so the
    accumulated gradient equals that of one batch holding all of them. The loss stays a tensor:
    reading it waits for the GPU, which the caller does after queueing the optimizer step, so the
    host prepares the update while the GPU finishes the backward pass.
    """
    phase = paging.phase if paging is not None else (lambda name: contextlib.nullcontext())
    n_learned = max(1, sum(count_learned(b["labels"]) for b in batches))
    total = torch.zeros((), device=device)
    for b in batches:
        # The learned positions are found on the CPU: on the GPU that would wait for the forward pass.
        keep = learned_positions(b["labels"]).to(device, non_blocking=True) if cfg.train.loss_impl == "chunked" else None
        b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
        with phase("forward"):
            loss = loss_sum(model, b, cfg.train.loss_impl, keep) / n_learned
        with phase("backward"):
            loss.backward()
        total += loss.detach()
    return total


def update(params: list[torch.nn.Parameter], optimizer, scheduler, cfg: RunConfig, paging=None) -> tuple[float, float]:
    """Clip, step the optimizer and the schedule; returns (grad_norm before clipping, lr used)."""
    phase = paging.phase if paging is not None else (lambda name: contextlib.nullcontext())
    if cfg.train.max_grad_norm > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
    lr = scheduler.get_last_lr()[0]
    with phase("optimizer"):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return float(grad_norm), lr


def train_step(model, batches, params, optimizer, scheduler, cfg: RunConfig, device: torch.device,
               paging=None) -> tuple[float, float, float]:
    """One optimizer step over ``batches``; returns (loss, grad_norm, lr)."""
    loss = accumulate(model, batches, cfg, device, paging)
    grad_norm, lr = update(params, optimizer, scheduler, cfg, paging)
    return float(loss), grad_norm, lr


def logs_step(step: int, every: int) -> bool:
    """Whether a step gets a `step` event: every ``every`` steps, or with 0 every step up to 1,000 and
    then every ceil(step / 1,000)-th, so the event log stays small however long a run is."""
    if every > 0:
        return step % every == 0
    return step <= 1000 or step % -(-step // 1000) == 0


def smaller_micro_batch(micro_batch: int) -> int | None:
    """The largest divisor of ``micro_batch`` at most half of it, so the effective batch stays exact."""
    for candidate in range(micro_batch // 2, 0, -1):
        if micro_batch % candidate == 0:
            return candidate
    return None


class OutOfMemory(UserError):
    kind = "out_of_memory"


@torch.no_grad()
def evaluate(model, examples, cfg: RunConfig, pad_id: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    size = cfg.train.micro_batch_size
    for start in range(0, len(examples), size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + size], pad_id).items()}
        total += float(loss_sum(model, batch, cfg.train.loss_impl))
        count += count_learned(batch["labels"])
    model.train()
    return total / max(1, count)


def versions() -> dict[str, str]:
    import bitsandbytes
    import peft
    import transformers

    return {
        "qlora_studio": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
    }


def make_paging_collector(device: torch.device, enabled: bool = True):
    """CUPTI paging counters on a GPU; a collector that says why not elsewhere. Never stops training."""
    from ..monitor.paging import NullCollector, make_collector

    try:
        return make_collector(enabled=enabled, device=device)
    except Exception as exc:  # the monitor must never stop training
        return NullCollector(f"paging counters failed to start ({exc})")


# ----------------------------------------------------------------------------------------------
# The loop


@dataclass
class Outcome:
    status: str  # finished or stopped
    step: int


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, events: EventWriter, stop: StopFlag,
                 base_dir: Path | None = None, resume: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.events = events
        self.stop = stop
        self.base_dir = base_dir
        self.resume = resume
        self.rank = int(os.environ.get("RANK", "0"))
        self.is_main = self.rank == 0
        self.optimizer: torch.optim.Optimizer | None = None  # set once built (the GPU tests touch its state)

    def run(self) -> Outcome:
        cfg = self.cfg
        t0 = time.time()
        torch.manual_seed(cfg.train.seed)
        device = devices.resolve_device(cfg.train.device)
        dtype = devices.resolve_compute_dtype(cfg.quant.compute_dtype, device)
        log.info("loading %s on %s (%s)", cfg.model.name_or_path, device, dtype)

        model, tokenizer, info = load_model(cfg, device, dtype, self.base_dir)
        data: Dataset = load_dataset(cfg.data, tokenizer, self.base_dir, str(self.run_dir / runs.CONFIG))
        total_steps = plan_steps(cfg, len(data.train))

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = self.optimizer = build_optimizer(cfg, params)
        if device.type == "cpu" and cfg.train.optimizer.startswith("paged"):
            log.info("on the CPU the paged optimizer keeps its state in ordinary memory (nothing to page)")
        scheduler = build_scheduler(cfg, optimizer, total_steps)
        pad_id = tokenizer.pad_token_id
        batcher = Batcher(data.train, cfg.train.micro_batch_size, cfg.train.seed)
        step, tokens_seen = 0, 0
        # The shape of a step; an out-of-memory recovery halves the first and doubles the second.
        micro_batch, accum = cfg.train.micro_batch_size, cfg.train.grad_accum_steps

        ckpt.clean_temporary(self.run_dir)
        latest = runs.latest_checkpoint(self.run_dir) if self.resume else None
        if latest is not None:
            state = ckpt.load(latest, model, optimizer, scheduler)
            step, tokens_seen = state["step"], state["tokens"]
            micro_batch, accum = state["micro_batch_size"], state["grad_accum_steps"]
            batcher = Batcher(data.train, cfg.train.micro_batch_size, cfg.train.seed, **state["data"])
            log.info("resumed from %s at step %d", latest.name, step)

        self.events.emit(
            "run_started",
            run_dir=str(self.run_dir),
            config=cfg.to_dict(),
            model=info.to_dict(),
            device={**devices.describe(device, dtype), "pid": os.getpid()},
            versions=versions(),
            plan={"max_steps": total_steps, "resumed_from": step, "tokens_per_step_max": cfg.train.micro_batch_size
                  * cfg.train.grad_accum_steps * cfg.data.max_seq_len},
        )
        self.events.emit("data_ready", **data.summary(cfg.data.max_seq_len))
        if data.truncated:
            log.warning("%d examples were longer than max_seq_len=%d and were truncated", data.truncated, cfg.data.max_seq_len)

        paging = make_paging_collector(device, cfg.train.paging_counters)
        if paging.unavailable:
            log.info("Paging counters unavailable: %s", paging.unavailable)
            self.events.emit("log", level="info", message=f"Paging counters unavailable: {paging.unavailable}")

        def save_checkpoint() -> Path | None:
            if not self.is_main:
                return None
            state = {"step": step, "tokens": tokens_seen, "data": batcher.position(), "max_steps": total_steps,
                     "micro_batch_size": micro_batch, "grad_accum_steps": accum}
            path = ckpt.save(self.run_dir, model, optimizer, scheduler, state, cfg.train.keep_checkpoints)
            self.events.emit("checkpoint", step=step, path=str(path))
            return path

        model.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        last_loss = float("nan")
        try:
            while step < total_steps:
                if self.stop.is_set():
                    path = save_checkpoint()
                    self.stop.clear_file()
                    self.events.emit("stopped", step=step, checkpoint=str(path) if path else None, reason=self.stop.reason)
                    return Outcome("stopped", step)
                start = time.perf_counter()
                examples = batcher.take(micro_batch * accum)
                while True:
                    batches = [collate(examples[i : i + micro_batch], pad_id) for i in range(0, len(examples), micro_batch)]
                    try:
                        step_loss = accumulate(model, batches, cfg, device, paging)
                        break
                    except torch.cuda.OutOfMemoryError:
                        optimizer.zero_grad(set_to_none=True)
                        del batches
                        gc.collect()
                        torch.cuda.empty_cache()
                        smaller = smaller_micro_batch(micro_batch)
                        if smaller is None:
                            save_checkpoint()
                            raise OutOfMemory(
                                f"the GPU ran out of memory at step {step + 1} even with a micro-batch of 1",
                                fix="Lower data.max_seq_len, turn on train.gradient_checkpointing, or use a smaller "
                                    "model; a checkpoint was saved, so the run can resume after that.",
                            ) from None
                        accum = accum * micro_batch // smaller
                        micro_batch = smaller
                        log.warning("out of GPU memory: micro-batch now %d, gradient accumulation %d", micro_batch, accum)
                        self.events.emit("oom_recovered", step=step + 1, micro_batch_size=micro_batch, grad_accum_steps=accum)
                step_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
                grad_norm, lr = update(params, optimizer, scheduler, cfg, paging)
                step_loss = float(step_loss)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step += 1
                tokens_seen += step_tokens
                step_s = time.perf_counter() - start
                last_loss = step_loss
                if self.is_main and (logs_step(step, cfg.train.log_every) or step == total_steps):
                    self.events.emit(
                        "step", step=step, epoch=round(batcher.epoch_float, 4), loss=step_loss, lr=lr,
                        grad_norm=grad_norm, tokens=tokens_seen, tokens_per_s=step_tokens / step_s if step_s > 0 else None,
                        step_s=step_s, paged_state_bytes=paged_state_bytes(optimizer), **devices.memory_stats(device),
                    )
                # A record names its own step when it arrives a step or more late.
                for record in paging.flush(step):
                    self.events.emit("paging", **{"step": step, **record})
                if data.val and cfg.train.eval_every and step % cfg.train.eval_every == 0 and self.is_main:
                    val = evaluate(model, data.val, cfg, pad_id, device)
                    self.events.emit("eval", step=step, loss=val, perplexity=math.exp(min(val, 50)))
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total_steps:
                    save_checkpoint()
        finally:
            with contextlib.suppress(Exception):  # the last moves; the monitor never stops training
                for record in paging.flush(step, force=True):
                    self.events.emit("paging", **{"step": step, **record})
            paging.close()

        eval_loss = None
        if data.val and self.is_main:
            eval_loss = evaluate(model, data.val, cfg, pad_id, device)
            self.events.emit("eval", step=step, loss=eval_loss, perplexity=math.exp(min(eval_loss, 50)))
        adapter = self.save_adapter(model, tokenizer) if self.is_main else None
        self.events.emit(
            "finished", step=step, adapter=str(adapter) if adapter else None, train_loss=last_loss, eval_loss=eval_loss,
            tokens=tokens_seen, duration_s=time.time() - t0,
        )
        return Outcome("finished", step)

    def save_adapter(self, model, tokenizer) -> Path:
        """The final adapter, atomically: a run folder with ``adapter/`` is a finished run."""
        final = self.run_dir / runs.ADAPTER
        tmp = self.run_dir / f"{ckpt.TMP_PREFIX}{runs.ADAPTER}"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return final
