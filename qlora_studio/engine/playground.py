"""The playground's worker process: the base model and the fine-tuned model answer the same prompt
side by side, token by token.

Run as ``python -m qlora_studio.engine.playground``. It reads one JSON request per line on
standard input and writes one JSON event per line on standard output (logging goes to standard
error), so the GUI never imports torch and a slow or crashing generation never freezes it.

Requests::

    {"op": "load", "target": RUN_DIR or ADAPTER_DIR, "checkpoint": null | STEP, "device": "auto", "quantize": true}
    {"op": "generate", "id": "...", "prompt": "...", "system": "", "raw": false,
     "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 128, "seed": 0}
    {"op": "stop"}     ends the current generation (both sides report reason "stopped")
    {"op": "quit"}     (or end of input) exits

Events: ``ready``, ``loading``, ``loaded`` (base, adapter, step, device, dtype, chat_template),
``started`` (id, prompt_tokens), ``token`` (id, side, text), ``done`` (id, side, tokens, reason,
seconds), ``finished`` (id), ``error`` (message, kind, id).

One model is loaded: the base as QLoRA trained it (4-bit NF4, the run's compute dtype) with the
adapter on top; the ``base`` side runs with the adapter disabled. The two sides take turns, one
token each, with their own key/value caches and random generators seeded alike, so what differs
between them is the adapter alone. Prompts are rendered as in training: the tokenizer's chat
template, or the default template (``formats.DEFAULT_TEMPLATE``) after the BOS token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .. import runs
from ..errors import UserError

log = logging.getLogger("qlora_studio.playground")

SIDES = ("base", "tuned")
MAX_NEW_TOKENS = 4096


class Emitter:
    """Thread-safe JSON lines on the real standard output (kept apart from stray prints)."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, type_: str, **fields: Any) -> None:
        line = json.dumps({"type": type_, **fields}, ensure_ascii=False)
        with self.lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                os._exit(0)  # the GUI went away


@dataclass
class Settings:
    prompt: str
    system: str = ""
    raw: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> Settings:
        try:
            s = cls(prompt=str(req["prompt"]), system=str(req.get("system") or ""), raw=bool(req.get("raw", False)),
                    temperature=float(req.get("temperature", 0.0)), top_p=float(req.get("top_p", 1.0)),
                    max_new_tokens=int(req.get("max_new_tokens", 128)), seed=int(req.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"bad generate request ({exc})") from None
        if not s.prompt.strip():
            raise UserError("the prompt is empty", fix="Type a prompt.")
        if not 0 <= s.temperature <= 5 or not 0 < s.top_p <= 1 or not 1 <= s.max_new_tokens <= MAX_NEW_TOKENS:
            raise UserError("temperature must be in [0, 5], top-p in (0, 1], max tokens in [1, 4096]")
        return s


def pick_adapter(target: str | Path, checkpoint: int | None = None):
    """The export source for a run (its final adapter, else its latest checkpoint) or an adapter folder."""
    from .export import source as source_mod
    from .export.errors import ExportError

    try:
        return source_mod.resolve(target, checkpoint)
    except ExportError:
        if checkpoint is None and Path(target).is_dir() and runs.list_checkpoints(target):
            return source_mod.resolve(target, "latest")
        raise


class Playground:
    def __init__(self, emit: Emitter):
        self.emit = emit
        self.model = None
        self.tokenizer = None
        self.stop = threading.Event()
        self.eos_ids: set[int] = set()

    # -- loading -------------------------------------------------------------------------------

    def load(self, req: dict[str, Any]) -> None:
        self.emit("loading", message="starting torch…")
        import torch
        from peft import PeftModel

        from .. import config as config_mod
        from . import device as devices
        from .model import load_base, load_tokenizer, resolve_source

        t0 = time.time()
        checkpoint = req.get("checkpoint")
        src = pick_adapter(str(req.get("target") or ""), int(checkpoint) if checkpoint is not None else None)
        cfg = src.cfg or config_mod.RunConfig()
        base_source = resolve_source(src.base_ref, src.run_dir)
        self.emit("loading", message=f"loading {Path(base_source).name} with the adapter from {src.adapter_dir.parent.name}/{src.adapter_dir.name}")
        self.model = self.tokenizer = None
        device = devices.resolve_device(str(req.get("device") or "auto"))
        dtype = devices.resolve_compute_dtype(cfg.quant.compute_dtype, device)
        tokenizer = load_tokenizer(base_source, cfg)
        base = load_base(base_source, cfg, device, dtype, quantize=bool(req.get("quantize", True)))
        model = PeftModel.from_pretrained(base, str(src.adapter_dir)).eval()
        self.model, self.tokenizer = model, tokenizer
        eos = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
        eos |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
        self.eos_ids = {i for i in eos if i is not None}
        self.device = device
        torch.set_grad_enabled(False)
        self.emit("loaded", base=Path(base_source).name if Path(base_source).exists() else base_source,
                  adapter=str(src.adapter_dir), step=src.step, device=device.type, dtype=str(dtype).replace("torch.", ""),
                  chat_template=bool(getattr(tokenizer, "chat_template", None)), seconds=round(time.time() - t0, 2))

    # -- generation ----------------------------------------------------------------------------

    def prompt_ids(self, s: Settings) -> list[int]:
        from .data import render_prompt

        tok = self.tokenizer
        if s.raw:
            ids = tok(s.prompt, add_special_tokens=False)["input_ids"]
            return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids
        messages = ([{"role": "system", "content": s.system}] if s.system.strip() else []) + [{"role": "user", "content": s.prompt}]
        return tok(render_prompt(tok, messages), add_special_tokens=False)["input_ids"]

    def generate(self, req: dict[str, Any]) -> None:
        import torch

        if self.model is None:
            raise UserError("no model is loaded", fix="Pick a run or an adapter folder first.")
        request_id = str(req.get("id", ""))
        s = Settings.from_request(req)
        ids = self.prompt_ids(s)
        self.stop.clear()
        self.emit("started", id=request_id, prompt_tokens=len(ids))
        sides = {name: _Side(name, self.model, s.seed) for name in SIDES}
        prompt = torch.tensor([ids], device=self.device)
        for side in sides.values():
            side.feed(prompt)
        while any(not side.finished for side in sides.values()):
            for side in sides.values():
                if side.finished:
                    continue
                if self.stop.is_set():
                    side.finish("stopped")
                else:
                    token = sample(side.logits, s.temperature, s.top_p, side.generator)
                    side.append(token, self.tokenizer)
                    if side.delta:
                        self.emit("token", id=request_id, side=side.name, text=side.delta)
                    if token in self.eos_ids:
                        side.finish("eos")
                    elif len(side.generated) >= s.max_new_tokens:
                        side.finish("length")
                    else:
                        side.feed(torch.tensor([[token]], device=self.device))
                if side.finished:
                    self.emit("done", id=request_id, side=side.name, tokens=len(side.generated), reason=side.reason,
                              seconds=round(time.time() - side.t0, 3))
        self.emit("finished", id=request_id)


@dataclass
class _Side:
    """One side's state: its cache, its last logits, what it has said so far."""

    name: str
    model: Any
    seed: int
    generated: list[int] = field(default_factory=list)
    text: str = ""
    delta: str = ""
    reason: str = ""
    finished: bool = False
    cache: Any = None
    logits: Any = None

    def __post_init__(self) -> None:
        import torch

        self.generator = torch.Generator().manual_seed(self.seed)
        self.t0 = time.time()

    def adapter(self):
        return self.model.disable_adapter() if self.name == "base" else contextlib.nullcontext()

    def feed(self, input_ids) -> None:
        with self.adapter():
            out = self.model(input_ids=input_ids, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.logits = out.logits[0, -1].float().cpu()

    def append(self, token: int, tokenizer) -> None:
        """Grow the decoded text; hold back a trailing partial UTF-8 character until it completes."""
        self.generated.append(token)
        text = tokenizer.decode(self.generated, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            self.delta = ""
            return
        self.delta = text.removeprefix(self.text)
        self.text = text

    def finish(self, reason: str) -> None:
        self.finished = True
        self.reason = reason


def sample(logits, temperature: float, top_p: float, generator) -> int:
    """Greedy at temperature 0; otherwise nucleus sampling from the smallest set of tokens whose
    probability reaches ``top_p``."""
    import torch

    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p  # always keeps the first
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def _reader(requests: queue.Queue, stop: threading.Event) -> None:
    """Standard input on a thread: ``stop`` acts at once, other requests wait their turn."""
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError:
            req = {"op": "invalid", "line": line[:200]}
        if isinstance(req, dict) and req.get("op") == "stop":
            stop.set()
            continue
        requests.put(req)
    requests.put({"op": "quit"})


def _warm_up() -> None:
    """Import the heavy libraries while the GUI is still waiting for a prompt (seconds saved)."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - the real import reports it
        pass


def main() -> int:
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything printed by libraries goes to standard error
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    emit = Emitter(events)
    playground = Playground(emit)
    requests: queue.Queue = queue.Queue()
    threading.Thread(target=_reader, args=(requests, playground.stop), daemon=True).start()
    threading.Thread(target=_warm_up, daemon=True).start()
    emit("ready", pid=os.getpid())
    while True:
        req = requests.get()
        op = req.get("op") if isinstance(req, dict) else None
        if op == "quit":
            events.flush()
            os._exit(0)  # nothing to save; skips tearing down torch's thread pools
        try:
            if op == "load":
                playground.load(req)
            elif op == "generate":
                playground.generate(req)
            else:
                raise UserError(f"unknown request {req!r}"[:200], fix='Use op "load", "generate", "stop" or "quit".')
        except UserError as exc:
            emit("error", message=exc.one_line(), kind=exc.kind, id=req.get("id") if isinstance(req, dict) else None)
        except Exception as exc:
            log.exception("request failed")
            emit("error", message=f"{type(exc).__name__}: {exc}".splitlines()[0], kind="internal",
                 id=req.get("id") if isinstance(req, dict) else None)


if __name__ == "__main__":
    sys.exit(main())
