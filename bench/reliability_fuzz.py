"""Run the reliability fuzz suite at a larger scale and count the inputs tried, per family.

The suite (tests/reliability/test_fuzz_*.py) draws broken dataset files, configurations and model
folders with hypothesis and checks that each is either accepted or refused with a UserError that
names the file (and line, record or row); through the command line, exit code 2 and one error line.
This script runs it with ``QLORA_FUZZ_SCALE`` times the examples of a normal test run and prints, per
family, how many inputs were accepted and how many refused (by error kind).

    python bench/reliability_fuzz.py [--scale 10] [--cli] [--write]

``--cli`` includes the command-line properties (each call starts a worker: about 5-15 s each).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(scale: float, cli: bool) -> tuple[dict[str, dict[str, int]], int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "tally.json"
        env = {**os.environ, "QLORA_FUZZ_SCALE": str(scale), "QLORA_FUZZ_REPORT": str(report), "HF_HUB_OFFLINE": "1"}
        selection = [] if cli else ["-k", "not cli"]
        t0 = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *selection,
             "tests/reliability/test_fuzz_data.py", "tests/reliability/test_fuzz_config.py",
             "tests/reliability/test_fuzz_model.py", "tests/reliability/test_fuzz_runs.py"],
            cwd=ROOT, env=env, text=True, capture_output=True, check=False,
        )
        seconds = time.monotonic() - t0
        print(result.stdout[-3000:])
        tally = json.loads(report.read_text()) if report.exists() else {}
    return tally, result.returncode, seconds


def table(tally: dict[str, dict[str, int]]) -> str:
    kinds = sorted({k for row in tally.values() for k in row if k != "accepted"})
    lines = ["| inputs | tried | accepted | " + " | ".join(f"refused: {k}" for k in kinds) + " |",
             "|---|---:|---:|" + "---:|" * len(kinds)]
    for family, row in sorted(tally.items()):
        total = sum(row.values())
        lines.append(f"| {family} | {total} | {row.get('accepted', 0)} | " + " | ".join(str(row.get(k, 0)) for k in kinds) + " |")
    grand = sum(sum(row.values()) for row in tally.values())
    lines.append(f"| **all** | **{grand}** | | " + " | ".join("" for _ in kinds) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=10.0, help="times the examples of a normal test run")
    ap.add_argument("--cli", action="store_true", help="include the command-line properties (slow)")
    ap.add_argument("--write", action="store_true", help="write bench/results/reliability_fuzz-<date>-<commit>.json")
    args = ap.parse_args()
    tally, code, seconds = run(args.scale, args.cli)
    text = table(tally)
    print(text)
    print(f"\n{sum(sum(r.values()) for r in tally.values())} inputs in {seconds:.0f} s; pytest exit code {code}")
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_result

        write_result("reliability_fuzz", {"scale": args.scale, "cli": args.cli, "exit_code": code,
                                          "seconds": round(seconds, 1), "tally": tally}, markdown=text + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
