"""The offline demo, end to end, as a person would run it: demo + train, then greedy answers.

Prints the wall time of `qlora-studio demo` and `qlora-studio train`, and how many of the demo's
answers greedy generation reproduces exactly before training (the base model) and after (with the
adapter). Writes bench/results/demo-<date>-<commit>.json.

    python bench/demo_memorization.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result


def answers_matched(run_or_model: str, use_adapter: bool, records: list[dict]) -> int:
    from qlora_studio.engine.generate import generate, load_for_generation

    model, tok = load_for_generation(run_or_model, use_adapter=use_adapter, device_pref="cpu")
    hits = 0
    for r in records:
        out = generate(model, tok, r["instruction"], max_new_tokens=16)
        hits += out.strip() == r["output"].strip()
    return hits


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="write the demo here instead of a temporary folder")
    args = ap.parse_args()
    folder = Path(args.keep or tempfile.mkdtemp(prefix="qlora-demo-"))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qlora_studio", "demo", str(folder), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL)
    t_demo = time.perf_counter() - t0
    run_dir = folder / "runs" / "bench"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qlora_studio", "train", str(folder / "config.toml"), "--output", str(run_dir)],
                   check=True, stderr=subprocess.DEVNULL)
    t_train = time.perf_counter() - t0
    records = [json.loads(line) for line in (folder / "data.jsonl").read_text().splitlines() if line.strip()]
    before = answers_matched(str(run_dir), False, records)
    after = answers_matched(str(run_dir), True, records)
    steps = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    final_loss = [e["loss"] for e in steps if e["type"] == "step"][-1]
    result = {
        "demo_s": round(t_demo, 1), "train_s": round(t_train, 1), "total_s": round(t_demo + t_train, 1),
        "answers": len(records), "exact_before": before, "exact_after": after,
        "exact_after_pct": round(100 * after / len(records), 1), "final_loss": round(final_loss, 4),
    }
    print(f"demo {t_demo:.1f} s + train {t_train:.1f} s = {t_demo + t_train:.1f} s (goal: at most 90 s)")
    print(f"exact answers before training: {before}/{len(records)}; after: {after}/{len(records)} "
          f"({result['exact_after_pct']}%, goal: at least 90%)")
    write_result("demo", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
