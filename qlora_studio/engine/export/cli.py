"""``qlora-studio export RUN_DIR --format adapter|merged|gguf``: the command line of the exporter.

``qlora_studio.cli`` builds the sub-command from :func:`add_arguments` and calls :func:`run`; this
module imports no torch at import time. The GUI runs it as a worker process,
``python -m qlora_studio.engine.export.cli ... --progress-json``, and reads one JSON object per
line on standard output: ``{"type": "progress", "fraction", "message"}``, then ``{"type": "done",
"out"}`` or ``{"type": "error", "message", "kind"}``. Exit codes: 0 done, 1 internal error, 2 bad
input (one line on standard error), 143 terminated.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import IO

from ...errors import UserError
from . import FORMATS, GGUF_DTYPES, MERGE_BASES

HELP = "export a run's adapter: PEFT adapter, merged 16-bit model, or GGUF for llama.cpp/Ollama"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Export a training run. adapter: the PEFT adapter with a model card and the run's config.toml; "
        "merged: the LoRA merged into the base model's 16-bit weights (a Hugging Face model folder); "
        "gguf: the merged model and the LoRA adapter as GGUF files for llama.cpp, with an Ollama Modelfile. "
        "Writes to RUN_DIR/exports/<format> unless --out is given; never replaces a folder without --overwrite."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (or a PEFT adapter folder)")
    parser.add_argument("--format", "-f", dest="fmt", choices=FORMATS, required=True, help="what to write")
    parser.add_argument("--out", metavar="DIR", help="the output folder (default: RUN_DIR/exports/<format>)")
    parser.add_argument("--checkpoint", metavar="STEP", help="export the adapter of this checkpoint step (or 'latest') "
                                                              "instead of the final adapter")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    parser.add_argument("--merge-base", choices=MERGE_BASES, default="original",
                        help="merged/gguf: merge into the original 16-bit weights (default) or into the dequantized "
                             "NF4 weights the adapter was trained against")
    parser.add_argument("--gguf-dtype", choices=GGUF_DTYPES, default="f16", help="gguf: the type of the weight matrices (default f16)")
    parser.add_argument("--with-base-gguf", action="store_true",
                        help="gguf: also write the base model as GGUF, to use with the GGUF LoRA adapter")
    parser.add_argument("--card-paths", action="store_true", help="keep local paths of the base model and dataset in the model card")
    parser.add_argument("--progress-json", action="store_true", help="print progress as JSON lines on standard output (for the GUI)")


class TerminalBar:
    """``[#########.........]  45%  merging model.layers.3...`` redrawn in place, at most 10 times a second."""

    def __init__(self, stream: IO[str], width: int = 30):
        self.stream = stream
        self.width = width
        self.last = 0.0

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self.last < 0.1 and fraction < 1.0:
            return
        self.last = now
        filled = int(self.width * max(0.0, min(1.0, fraction)))
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:3.0f}%  {message}"
        self.stream.write("\r" + line[:110].ljust(110))
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def _json_line(stream: IO[str], **fields) -> None:
    stream.write(json.dumps(fields) + "\n")
    stream.flush()


def run(args: argparse.Namespace) -> int:
    from . import export

    bar = None
    if args.progress_json:
        def progress(fraction: float, message: str) -> None:
            _json_line(sys.stdout, type="progress", fraction=round(fraction, 4), message=message)
    elif sys.stderr.isatty():
        bar = progress = TerminalBar(sys.stderr)
    else:
        progress = None
    checkpoint = args.checkpoint
    if checkpoint is not None and checkpoint != "latest":
        try:
            checkpoint = int(checkpoint)
        except ValueError:
            raise UserError(f"--checkpoint {checkpoint!r} is not a step number", fix="Give a step such as 200, or 'latest'.") from None
    try:
        out = export(args.run_dir, args.fmt, out=args.out, checkpoint=checkpoint, progress=progress,
                     overwrite=args.overwrite, merge_base=args.merge_base, gguf_dtype=args.gguf_dtype,
                     include_paths=args.card_paths, gguf_include_base=args.with_base_gguf)
    except UserError as exc:
        if args.progress_json:
            _json_line(sys.stdout, type="error", message=exc.one_line(), kind=exc.kind)
        raise
    finally:
        if bar is not None:
            bar.close()
    if args.progress_json:
        _json_line(sys.stdout, type="done", out=str(out))
    else:
        print(f"exported to {out}")
    return 0


def _terminate(signum, frame) -> None:
    # Unwinds through the export, whose staging folder is removed on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qlora-studio export", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return run(args)
    except UserError as exc:
        print(f"qlora-studio export: error: {exc.one_line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
