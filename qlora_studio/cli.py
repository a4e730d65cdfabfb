"""The command line: ``qlora-studio`` (the app) and its sub-commands.

``train`` is also the GUI's worker process: with ``--events`` its standard output carries only
event lines (events.py), everything else goes to standard error and the run's log file.

Exit codes: 0 finished, 1 internal error, 2 bad input, 3 stopped on request.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import __version__, runs
from . import config as config_mod
from .errors import UserError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3

log = logging.getLogger("qlora_studio")
LOG_ONLY = "qlora_studio.worker"  #: records of this logger go to the run's log file, not the console


def _say(text: str) -> None:
    """A line for the person on standard error; a reader that went away (a closed GUI) is no error."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError, ValueError):
        pass


def _fail(message: str) -> int:
    _say(f"qlora-studio: error: {message}")
    return EXIT_BAD_INPUT


# ----------------------------------------------------------------------------------------------
# train


def _preflight(cfg: config_mod.RunConfig, base_dir: Path, source: str) -> None:
    """Cheap checks of the model folder and the dataset, before a run folder is created."""
    from . import formats
    from .engine.data import detect, load_records, resolve_data_path
    from .engine.model import check_local_model, resolve_source

    cfg.require_complete(source)
    model_source = resolve_source(cfg.model.name_or_path, base_dir)
    if Path(model_source).exists():
        check_local_model(Path(model_source), cfg.model.allow_pickle_weights)
    spec = resolve_data_path(cfg.data.path, base_dir)
    if formats.looks_local(spec):
        records = load_records(spec, cfg.data.split)
        detect(records, cfg.data, spec)
    if cfg.data.val_path:
        vspec = resolve_data_path(cfg.data.val_path, base_dir)
        if formats.looks_local(vspec):
            detect(load_records(vspec, cfg.data.split), cfg.data, vspec)


def _absolute(cfg: config_mod.RunConfig, base_dir: Path) -> config_mod.RunConfig:
    """The run folder's copy of the config: local paths made absolute so it works from any folder."""
    from .engine.data import resolve_data_path
    from .engine.model import resolve_source

    data = {"path": resolve_data_path(cfg.data.path, base_dir)}
    if cfg.data.val_path:
        data["val_path"] = resolve_data_path(cfg.data.val_path, base_dir)
    return config_mod.replace(cfg, model={"name_or_path": resolve_source(cfg.model.name_or_path, base_dir)}, data=data)


def _new_run_dir(cfg: config_mod.RunConfig, base_dir: Path) -> Path:
    root = Path(cfg.output.runs_dir).expanduser()
    return runs.new_run_dir(root if root.is_absolute() else base_dir / root, cfg.output.run_name)


class _Progress:
    """A one-line progress display on a terminal: step, loss, tokens/s, ETA."""

    def __init__(self, stream):
        self.stream = stream
        self.total = 0
        self.first: tuple[float, int] | None = None

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "run_started":
            self.total = int(event["plan"]["max_steps"])
        elif kind == "step":
            step = event["step"]
            now = time.time()
            if self.first is None:
                self.first = (now, step)
            t0, s0 = self.first
            rate = (step - s0) / (now - t0) if now > t0 and step > s0 else 0
            eta = (self.total - step) / rate if rate else 0
            tps = event.get("tokens_per_s") or 0
            self.stream.write(
                f"\rstep {step}/{self.total}  loss {event['loss']:.4f}  {tps:,.0f} tok/s  ETA {int(eta) // 60}:{int(eta) % 60:02d} "
            )
            self.stream.flush()
        elif kind in ("finished", "stopped"):
            self.stream.write("\n")
            self.stream.flush()


def cmd_train(args: argparse.Namespace) -> int:
    events_out = None
    if args.events:
        # Keep the real standard output for event lines only; anything else printed (by us, by a
        # library or by native code) goes to standard error.
        events_out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr

    if args.resume:
        run_dir = Path(args.resume).resolve()
        if not (run_dir / runs.CONFIG).is_file():
            return _fail(f"{run_dir}: not a run folder (no {runs.CONFIG}); pass the folder of the run to resume")
        if runs.latest_checkpoint(run_dir) is None:
            return _fail(f"{run_dir}: the run has no checkpoint to resume from; start it again instead")
        summary = runs.summarize(run_dir)
        if summary.status == "running":
            return _fail(f"{run_dir}: the run is still running (worker pid in {runs.PID}); stop it first")
        cfg_path = run_dir / runs.CONFIG
    else:
        if not args.config:
            return _fail("give a CONFIG file, or --resume RUN_DIR")
        cfg_path = Path(args.config)
        run_dir = None
    try:
        cfg = config_mod.load(cfg_path)
        if args.max_steps is not None:
            cfg = config_mod.replace(cfg, train={"max_steps": args.max_steps})
        base_dir = cfg_path.resolve().parent
        _preflight(cfg, base_dir, str(cfg_path))
        cfg = _absolute(cfg, base_dir)
    except UserError as exc:
        return _fail(exc.one_line())

    if run_dir is None:
        run_dir = Path(args.output).resolve() if args.output else _new_run_dir(cfg, base_dir)
        if run_dir.exists() and any(run_dir.iterdir()):
            return _fail(f"{run_dir}: the run folder exists and is not empty; pick another --output or --resume it")
        run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / runs.CONFIG)
    return _run_worker(cfg, run_dir, resume=bool(args.resume), events_out=events_out)


def _run_worker(cfg: config_mod.RunConfig, run_dir: Path, resume: bool, events_out) -> int:
    from .events import EventWriter

    handler = logging.FileHandler(run_dir / runs.LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    # Libraries' records (transformers' load report, Python warnings, ...) and what the worker reports
    # itself (as one line below) go to the log file only; the console shows QLoRA Studio's own.
    console.addFilter(_for_console)
    root.addHandler(console)

    # Progress bars only for a person at a terminal: in a pipe or a log pane they are noise.
    _quiet_libraries(progress_bars=events_out is None and sys.stderr.isatty())
    restore_library_logging = _library_logging_to_root()
    (run_dir / runs.PID).write_text(str(os.getpid()))
    writer = EventWriter(run_dir / runs.EVENTS, echo=events_out, enabled=int(os.environ.get("RANK", "0")) == 0)
    if events_out is None and sys.stderr.isatty():
        writer.listeners.append(_Progress(sys.stderr))

    from .engine.trainer import StopFlag, Trainer

    stop = StopFlag(run_dir)
    if events_out is not None:
        stop.watch_stdin()
    interrupts = {"n": 0}

    def on_signal(signum, frame):
        interrupts["n"] += 1
        if signum == signal.SIGINT and interrupts["n"] > 1:
            raise KeyboardInterrupt
        stop.request("interrupted" if signum == signal.SIGINT else "terminated")
        if signum == signal.SIGINT:
            _say("\nStopping after this step with a checkpoint (Ctrl-C again to quit at once)...")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        outcome = Trainer(cfg, run_dir, writer, stop, base_dir=run_dir, resume=resume).run()
        if outcome.status == "stopped":
            _say(f"Stopped at step {outcome.step} with a checkpoint; resume with: qlora-studio train --resume {run_dir}")
            return EXIT_STOPPED
        _say(f"Finished: the adapter is in {run_dir / runs.ADAPTER}")
        return EXIT_OK
    except UserError as exc:
        logging.getLogger(LOG_ONLY).error("%s", exc.one_line())
        writer.emit("failed", kind=exc.kind, message=exc.one_line(), advice=exc.fix or "", log=str(run_dir / runs.LOG))
        _say(f"qlora-studio: error: {exc.one_line()}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        writer.emit("failed", kind="interrupted", message="interrupted before a checkpoint could be written",
                    advice="Resume from the last checkpoint.", log=str(run_dir / runs.LOG))
        return EXIT_STOPPED
    except BaseException as exc:  # noqa: BLE001 - the worker must always report how it ended
        kind, advice = _classify(exc)
        logging.getLogger(LOG_ONLY).error("internal error\n%s", traceback.format_exc())
        message = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")
        writer.emit("failed", kind=kind, message=message, advice=advice, log=str(run_dir / runs.LOG))
        _say(f"qlora-studio: internal error: {message} (details in {run_dir / runs.LOG})")
        return EXIT_INTERNAL
    finally:
        writer.close()
        try:
            (run_dir / runs.PID).unlink()
        except FileNotFoundError:
            pass
        restore_library_logging()
        root.removeHandler(handler)
        handler.close()
        root.removeHandler(console)


def _for_console(record: logging.LogRecord) -> bool:
    """Only QLoRA Studio's own records reach the console, and not those meant for the log file only."""
    name = record.name
    if name == LOG_ONLY or name.startswith(LOG_ONLY + "."):
        return False
    return name == "qlora_studio" or name.startswith("qlora_studio.")


def _library_logging_to_root():
    """Send transformers' and huggingface_hub's records to the root logger instead of their own stderr handlers.

    Both libraries print through a handler of their own (transformers' load report for weights missing a
    tensor is several lines of table), which would land before the worker's one error line. Through the
    root logger they reach the run's log file, and the console filter keeps them off the console.
    Returns a function that puts the libraries' handlers back (for callers in the same process).
    """
    undo = []
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        pass
    else:
        library = hf_logging.get_logger("transformers")
        before, propagated = list(library.handlers), library.propagate
        hf_logging.disable_default_handler()
        hf_logging.enable_propagation()
        removed = [h for h in before if h not in library.handlers]

        def undo_transformers():
            library.propagate = propagated
            for h in removed:
                library.addHandler(h)

        undo.append(undo_transformers)
    try:
        import huggingface_hub.utils.logging  # noqa: F401 - adds its stderr handler on import
    except ImportError:
        pass
    else:
        hub = logging.getLogger("huggingface_hub")
        own = [h for h in hub.handlers if type(h) is logging.StreamHandler]  # not the FileHandler subclass
        propagated = hub.propagate
        for h in own:
            hub.removeHandler(h)
        hub.propagate = True

        def undo_hub():
            hub.propagate = propagated
            for h in own:
                hub.addHandler(h)

        undo.append(undo_hub)

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


def _quiet_libraries(progress_bars: bool) -> None:
    """Library chatter goes to the log file; the log pane and the terminal get what a person needs."""
    import warnings

    if not progress_bars:  # a GUI's log pane shows carriage-return progress bars as noise
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass

    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    warnings.filterwarnings("ignore", message=".*use_cache=True.* is incompatible with gradient checkpointing")
    # bitsandbytes' CPU backend looks for an optional kernel package and says so on every start.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _classify(exc: BaseException) -> tuple[str, str]:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return "out_of_memory", ("The GPU ran out of memory. Lower train.micro_batch_size or data.max_seq_len, "
                                     "turn on train.gradient_checkpointing, or run `qlora-studio estimate` first.")
    except ImportError:
        pass
    if isinstance(exc, MemoryError):
        return "out_of_memory", "The computer ran out of memory. Lower train.micro_batch_size or data.max_seq_len."
    return "internal", "This is a bug in QLoRA Studio or a library: the log file has the details."


# ----------------------------------------------------------------------------------------------
# demo, generate, doctor


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine.demo import build_demo

    folder = Path(args.dir)
    if folder.exists() and not folder.is_dir():
        return _fail(f"{folder}: exists and is not a folder")
    path = build_demo(folder, overwrite=args.overwrite)
    print(f"Demo written to {folder}. Train it with:\n  qlora-studio train {path}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.generate import generate, load_for_generation

    _quiet_libraries(progress_bars=False)
    try:
        model, tokenizer = load_for_generation(args.target, use_adapter=not args.no_adapter, checkpoint=args.checkpoint)
    except UserError as exc:
        return _fail(exc.one_line())
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p, chat=not args.raw))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import report

    checks = report()
    if args.json:
        print(json.dumps(checks, indent=2))
    else:
        for name, item in checks.items():
            mark = "ok " if item["ok"] else "-- "
            print(f"{mark}{name:<14} {item['value']}" + (f"  ({item['reason']})" if item.get("reason") else ""))
    return EXIT_OK


def cmd_gui(args: argparse.Namespace) -> int:
    try:
        from .gui.app import main as gui_main
    except ImportError as exc:
        return _fail(f"the desktop app cannot start ({exc}); the command line works: qlora-studio --help")
    return gui_main([])


# ----------------------------------------------------------------------------------------------


def _optional(subparsers, name: str, module: str, help_text: str) -> None:
    """A sub-command provided by another module, imported lazily (it may need torch or NVML)."""
    import importlib

    p = subparsers.add_parser(name, help=help_text, description=help_text)
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        p.set_defaults(func=lambda a, e=exc: _fail(f"`{name}` is not available ({e})"))
        return
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-studio",
        description="QLoRA fine-tuning of causal language models. Without a command, opens the desktop app.",
    )
    parser.add_argument("--version", action="version", version=f"qlora-studio {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune a model with QLoRA", description="Fine-tune a model with QLoRA from a TOML configuration.")
    p.add_argument("config", nargs="?", help="the run configuration (config.toml)")
    p.add_argument("--output", metavar="RUN_DIR", help="the run folder (default: <runs_dir>/<run_name or timestamp>)")
    p.add_argument("--max-steps", type=int, metavar="N", help="override train.max_steps")
    p.add_argument("--resume", metavar="RUN_DIR", help="resume an interrupted or stopped run from its latest checkpoint")
    p.add_argument("--events", action="store_true", help="print JSON-line events on standard output (for the GUI)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="write the offline demo (tiny model, sample data, config)",
                       description="Write an offline demo: a tiny random Llama, a locally built tokenizer, a sample dataset and config.toml.")
    p.add_argument("dir", help="folder to write the demo into")
    p.add_argument("--overwrite", action="store_true", help="rebuild it if it exists")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="generate text from a run or a model",
                       description="Generate text from a run folder (base + its adapter) or a model folder / hub id.")
    p.add_argument("target", metavar="RUN_DIR|MODEL")
    p.add_argument("--prompt", required=True, help="the user's message (the chat template is applied)")
    p.add_argument("--no-adapter", action="store_true", help="use the base model of a run, without its adapter")
    p.add_argument("--checkpoint", type=int, metavar="STEP", help="use the adapter of this checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--raw", action="store_true", help="pass the prompt as is, without the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("doctor", help="check Python, torch, CUDA, bitsandbytes, NVML and CUPTI",
                       description="Report what this machine offers for QLoRA training, with a reason for whatever is missing.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_doctor)

    _optional(sub, "estimate", "qlora_studio.engine.estimate", "estimate the GPU memory a configuration needs")
    _optional(sub, "monitor", "qlora_studio.monitor.cli", "show live GPU memory and paging figures on a terminal")
    _optional(sub, "export", "qlora_studio.engine.export.cli", "export a run's adapter (PEFT, merged, GGUF)")

    p = sub.add_parser("gui", help="open the desktop app (the default)")
    p.set_defaults(func=cmd_gui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        return cmd_gui(args)
    try:
        return args.func(args)
    except UserError as exc:
        return _fail(exc.one_line())


if __name__ == "__main__":
    sys.exit(main())
