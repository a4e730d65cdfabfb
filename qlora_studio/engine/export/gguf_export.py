"""The GGUF format: the merged model as one GGUF file, the LoRA adapter as a GGUF adapter, an Ollama
Modelfile, the card and the run's configuration (optionally the base model as GGUF too, for
llama.cpp's ``--lora``)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .adapter import copy_run_config
from .card import CardInfo, write_card
from .gguf_lora import adapter_plan, write_lora_gguf
from .gguf_model import (
    Arch,
    HParams,
    TensorNamer,
    architecture,
    model_metadata,
    nbytes,
    plan_tensors,
    write_gguf,
)
from .gguf_vocab import Vocab, read_vocab
from .merge import MergePlan, Progress
from .source import ExportSource

MODELFILE = "Modelfile"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


class GGUFPlan:
    """What will be written, with its size, before anything is."""

    def __init__(self, source: ExportSource, merge_base: str, dtype: str, include_base: bool = False):
        self.source = source
        self.dtype = dtype
        self.include_base = include_base
        self.merge = MergePlan(source, merge_base)
        try:
            self._plan(source, dtype, include_base)
        except BaseException:
            self.merge.close()
            raise

    def _plan(self, source: ExportSource, dtype: str, include_base: bool) -> None:
        where = str(self.merge.folder / "config.json")
        self.arch: Arch = architecture(self.merge.base_config, where)
        self.hp = HParams(self.merge.base_config, where)
        self.namer = TensorNamer(self.arch, self.hp)
        self.vocab: Vocab = read_vocab(self.merge.folder, self.hp.vocab, bool(source.cfg and source.cfg.model.trust_remote_code))
        freqs = self.hp.rope_frequency_factors(self.merge.base_config)
        self.extra = {} if freqs is None else {"rope_freqs.weight": freqs}
        self.planned = plan_tensors(self.merge.specs, self.namer, dtype, self.extra)
        self.order = [s.name for s in self.merge.specs]
        self.lora_planned = adapter_plan(self.merge.adapter, self.namer, self.order)
        label = _slug(source.label)
        self.model_file = f"{label}-{dtype}.gguf"
        self.adapter_file = f"{label}-lora-f32.gguf"
        self.base_file = f"base-{_slug(self.merge.folder.name)}-{dtype}.gguf" if include_base else None

    def close(self) -> None:
        self.merge.close()

    def model_bytes(self) -> int:
        return sum(nbytes(t.shape, t.qtype) for t in self.planned)

    def estimate(self) -> int:
        vocab_bytes = sum(len(t.encode("utf-8")) + 16 for t in self.vocab.tokens) + sum(len(m) + 8 for m in self.vocab.merges or [])
        model = self.model_bytes() + vocab_bytes
        lora = sum(nbytes(t.shape, t.qtype) for t in self.lora_planned)
        return model * (2 if self.include_base else 1) + lora

    def write(self, out: Path, progress: Progress, include_paths: bool = False) -> None:
        total = max(self.estimate(), 1)
        done = 0

        def advance(n: int, what: str) -> None:
            nonlocal done
            done += n
            progress(min(0.97, 0.97 * done / total), what)

        name = self.source.label
        write_gguf(out / self.model_file, self.arch, model_metadata(self.arch, self.hp, self.vocab, name, self.dtype),
                   self.planned, self.merge.tensors(), self.extra, self.namer.fix_rows,
                   lambda n: advance(n, f"writing {self.model_file}"))
        write_lora_gguf(out / self.adapter_file, self.merge.adapter, self.namer, self.arch, self.order, f"{name} (LoRA)",
                        lambda n: advance(n, f"writing {self.adapter_file}"))
        if self.base_file:
            base_name = self.merge.folder.name
            write_gguf(out / self.base_file, self.arch, model_metadata(self.arch, self.hp, self.vocab, base_name, self.dtype),
                       self.planned, self.merge.tensors(apply_adapter=False), self.extra, self.namer.fix_rows,
                       lambda n: advance(n, f"writing {self.base_file}"))
        (out / MODELFILE).write_text(self.modelfile(), encoding="utf-8")
        copy_run_config(self.source, out)
        progress(0.98, "writing the model card")
        info = CardInfo("gguf", merge=self.merge.describe(), include_paths=include_paths,
                        gguf={"model": self.model_file, "adapter": self.adapter_file, "base": self.base_file,
                              "dtype": self.dtype, "arch": self.arch.name, "warnings": self.vocab.warnings,
                              "default_template": self.vocab.template_is_default})
        write_card(out, self.source, info)

    def modelfile(self) -> str:
        """An Ollama Modelfile for the merged model. Ollama reads the chat template from the GGUF for
        templates it knows; the default template is spelled out in Ollama's template language."""
        lines = [
            "# Ollama Modelfile written by QLoRA Studio. Create the model with:",
            "#   ollama create my-model -f Modelfile",
            f"FROM ./{self.model_file}",
            "",
            "# To run the base model with the LoRA adapter instead of the merged model, use:",
            f"#   FROM ./{self.base_file or 'BASE-MODEL.gguf'}",
            f"#   ADAPTER ./{self.adapter_file}",
        ]
        if self.vocab.template_is_default:
            lines += [
                "",
                "# The prompt format the model was trained with (QLoRA Studio's default template).",
                'TEMPLATE """{{ if .System }}### System:',
                "{{ .System }}",
                "",
                "{{ end }}### User:",
                "{{ .Prompt }}",
                "",
                "### Assistant:",
                '{{ .Response }}"""',
            ]
        eos = self.vocab.special.get("eos")
        if eos is not None:
            text = self.vocab.tokens[eos].replace("\\", "\\\\").replace('"', '\\"')
            lines += ["", f'PARAMETER stop "{text}"']
            if self.vocab.template_is_default:
                lines.append('PARAMETER stop "### User:"')
        return "\n".join(lines) + "\n"


@contextmanager
def open_plan(source: ExportSource, merge_base: str, dtype: str, include_base: bool = False) -> Iterator[GGUFPlan]:
    plan = GGUFPlan(source, merge_base, dtype, include_base)
    try:
        yield plan
    finally:
        plan.close()
