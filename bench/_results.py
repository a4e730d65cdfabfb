"""Writing benchmark results: bench/results/<name>-<date>-<commit>.json, with the machine they ran on."""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    import os

    if os.environ.get("QS_COMMIT"):  # a copy of the tree without .git (the GPU machine)
        return os.environ["QS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    try:
        import os

        info["cpus"] = os.cpu_count()
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_result(name: str, result: dict, markdown: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%Y-%m-%d')}-{git_commit()}"
    path = RESULTS / f"{stem}.json"
    payload = {"name": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": git_commit(), "machine": machine(), "result": result}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    if markdown:
        (RESULTS / f"{stem}.md").write_text(markdown)
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")
    return path
