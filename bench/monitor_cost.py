"""What the GPU monitor costs: the NVML sampler's CPU time, and CUPTI's share of a training step.

Goals (issue 4): the sampler under 2% of one CPU core at 4 Hz; the paging counters under 2% of the
worker's step time.

1. Sampler: the GUI's NVML sampler runs in its own thread at 4 Hz for ``--sampler-s`` seconds in a
   fresh process that imports no torch; its cost is the process's CPU time over the wall time, in
   percent of one core. Measured twice: as shipped (PCIe read once a second) and with PCIe read at
   every sample, to show what that choice saves.
2. Paging counters: a training-like step (a stack of linear layers, bf16 autocast, bitsandbytes'
   PagedAdamW32bit, bracketed in forward/backward/optimizer phases and flushed each step like the
   engine's loop) timed without and with the CUPTI collector, in alternating fresh processes.
   The phases only record GPU markers; the collector drains CUPTI at most once a second, so a
   few steps carry that cost and most none: the overhead is taken from the mean step time, over
   timed steps that span several seconds (``--steps``, 400 by default, about 6 s on an H200).
   ``--touch-every K`` also pages the optimizer state out from the CPU every K steps, so that the
   counters have records to deliver; a forced flush after the timed steps collects the rest.

Memory safety on a shared card: the workload is sized up front (about 2.7 GiB with the defaults, of
which 1 GiB managed) and the script refuses to start unless the card has 4 times that free. Pages
move only by CPU touches, never by oversubscription.

Run on the GPU machine:  python bench/monitor_cost.py
Writes bench/results/monitor_cost-<date>-<commit>.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))

from _results import git_commit  # QS_COMMIT where the tree is a copy (the GPU machine)
GIB = float(1 << 30)


# ---------------------------------------------------------------------------------------------
# children (each runs in a fresh process and prints one JSON line)


def child_sampler(seconds: float, pcie_interval_s: float) -> dict:
    sys.path.insert(0, str(ROOT))
    from qlora_studio.monitor.nvml import NvmlReader, NvmlSampler

    rounds: list[float] = []
    sampler = NvmlSampler(reader=NvmlReader(pcie_interval_s=pcie_interval_s), interval_s=0.25)
    sampler.on_samples.append(lambda samples: rounds.append(time.monotonic()))
    sampler.start()
    time.sleep(2.0)  # NVML's start-up is a one-off: measure the steady state
    if sampler.status.state != "ok":
        sampler.stop()
        return {"error": sampler.status.message}
    first = len(rounds)
    wall0, cpu0 = time.monotonic(), time.process_time()
    time.sleep(seconds)
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    taken = len(rounds) - first
    sampler.stop()
    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "percent_of_one_core": 100.0 * cpu / wall,
        "samples": taken,
        "rate_hz": taken / wall,
        "gpus": len(sampler.gpus),
        "torch_imported": "torch" in sys.modules,
    }


def child_train(mode: str, args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(ROOT))
    import bitsandbytes as bnb
    import torch

    from qlora_studio.monitor.paging import make_collector, paged_state_bytes

    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    device = torch.device("cuda", 0)
    h, layers, tokens = args.hidden, args.layers, args.tokens
    params = layers * h * h
    act = tokens * h * 2 * (layers + 2)  # bf16 activations kept for backward, roughly
    needed = params * 4 * 2 + act  # fp32 weights and grads (device) + activations
    managed = params * 4 * 2  # AdamW's two fp32 states, paged
    free, _ = torch.cuda.mem_get_info(device)
    if free < 4 * (needed + managed):
        wanted = 4 * (needed + managed) / GIB
        return {"error": f"only {free / GIB:.1f} GiB free; this workload wants {wanted:.1f} GiB of headroom"}

    interval = {} if args.flush_interval is None else {"flush_interval_s": args.flush_interval}
    collector = make_collector(mode == "cupti", device, **interval)
    if mode == "cupti" and collector.unavailable:
        return {"error": f"paging counters unavailable: {collector.unavailable}"}
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(h, h, bias=False) for _ in range(layers)]).to(device)
    opt = bnb.optim.PagedAdamW32bit(model.parameters(), lr=1e-5)
    x = torch.randn(tokens, h, device=device)

    step_times = []
    moved = {"bytes_htod": 0, "bytes_dtoh": 0, "faults": 0, "events": 0}
    in_collector = [0.0]  # host seconds spent inside the collector's calls during timed steps

    class timed_phase:  # the collector's phase, with the host time of its entry and exit counted
        def __init__(self, name: str):
            self.inner = collector.phase(name)

        def __enter__(self) -> None:
            t = time.perf_counter()
            self.inner.__enter__()
            in_collector[0] += time.perf_counter() - t

        def __exit__(self, *exc: object) -> None:
            t = time.perf_counter()
            self.inner.__exit__(*exc)
            in_collector[0] += time.perf_counter() - t

    def count(records: list[dict]) -> None:
        for r in records:
            if r["step"] >= args.warmup:  # a record may come a flush or more after its step
                moved["events"] += 1
                for key in ("bytes_htod", "bytes_dtoh", "faults"):
                    moved[key] += r[key]

    for step in range(args.warmup + args.steps):
        if args.touch_every and step and step % args.touch_every == 0:
            for state in opt.state.values():  # a CPU touch between steps: pages go to host memory
                for value in state.values():
                    if getattr(value, "is_paged", False):
                        value.add_(0.0)
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        if step == args.warmup:
            in_collector[0] = 0.0
        with timed_phase("forward"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
        with timed_phase("backward"):
            loss.backward()
        with timed_phase("optimizer"):
            opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize(device)
        t_flush = time.perf_counter()
        records = collector.flush(step)
        t1 = time.perf_counter()
        in_collector[0] += t1 - t_flush
        if step >= args.warmup:
            step_times.append(t1 - t0)
        count(records)
    count(collector.flush(step, force=True))  # untimed: what is still on its way
    collector.close()
    return {
        "mode": mode,
        "median_step_s": statistics.median(step_times),
        "mean_step_s": statistics.fmean(step_times),
        "max_step_s": max(step_times),
        "timed_s": sum(step_times),
        "steps": len(step_times),
        # The host time of the collector's own calls (markers, drains), over the timed steps' wall time:
        # an upper bound of what the collector adds to a step whose host waits on it.
        "collector_host_s": in_collector[0],
        "collector_host_percent": 100.0 * in_collector[0] / sum(step_times),
        "paged_state_bytes": paged_state_bytes(opt),
        "paging": moved,
    }


# ---------------------------------------------------------------------------------------------
# the orchestrator


def _child(argv: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1])


def _environment() -> dict:
    env = {"python": platform.python_version(), "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        env["gpu"] = pynvml.nvmlDeviceGetName(handle)
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - reported, not fatal
        env["gpu"] = f"unknown ({exc})"
    from importlib import metadata

    for package in ("torch", "bitsandbytes", "nvidia-ml-py", "cupti-python"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampler-s", type=float, default=30.0, help="seconds to run the sampler (default 30)")
    parser.add_argument("--pairs", type=int, default=3, help="baseline/CUPTI process pairs (default 3)")
    parser.add_argument("--steps", type=int, default=400,
                        help="timed steps per process (default 400): several seconds, so several CUPTI drains")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192, help="rows per step (batch x sequence)")
    parser.add_argument("--touch-every", type=int, default=0, metavar="K",
                        help="page the optimizer state out every K steps (0: never)")
    parser.add_argument("--flush-interval", type=float, default=None, metavar="S",
                        help="seconds between the collector's CUPTI drains (default: the collector's own)")
    parser.add_argument("--skip-cupti", action="store_true", help="measure only the sampler")
    parser.add_argument("--child", choices=("sampler", "baseline", "cupti"), help=argparse.SUPPRESS)
    parser.add_argument("--pcie-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "sampler":
        print(json.dumps(child_sampler(args.sampler_s, args.pcie_interval)))
        return 0
    if args.child in ("baseline", "cupti"):
        print(json.dumps(child_train(args.child, args)))
        return 0

    result: dict = {
        "date": dt.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(), "environment": _environment(),
    }
    timeout = args.sampler_s + 120
    sampler = ["--child", "sampler", "--sampler-s", str(args.sampler_s), "--pcie-interval"]
    result["sampler"] = {
        "pcie_every_1s": _child([*sampler, "1.0"], timeout),
        "pcie_every_sample": _child([*sampler, "0.25"], timeout),
    }
    if not args.skip_cupti:
        passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--hidden", str(args.hidden),
                       "--layers", str(args.layers), "--tokens", str(args.tokens), "--touch-every", str(args.touch_every)]
        if args.flush_interval is not None:
            passthrough += ["--flush-interval", str(args.flush_interval)]
        runs: dict[str, list[dict]] = {"baseline": [], "cupti": []}
        for _ in range(args.pairs):
            for mode in ("baseline", "cupti"):
                runs[mode].append(_child(["--child", mode, *passthrough], 900))
        result["training"] = {"config": vars(args) | {"child": None}, "runs": runs}
        ok = {m: [r for r in rs if "mean_step_s" in r] for m, rs in runs.items()}
        if ok["baseline"] and ok["cupti"]:
            for stat in ("median_step_s", "mean_step_s"):
                result["training"][stat] = {m: statistics.median(r[stat] for r in rs) for m, rs in ok.items()}
            # The mean: CUPTI is drained about once a second, a cost the median step never shows.
            base, cupti = result["training"]["mean_step_s"]["baseline"], result["training"]["mean_step_s"]["cupti"]
            result["training"]["overhead_percent"] = 100.0 * (cupti - base) / base
            # Paired: each CUPTI run against the baseline run just before it, so slow drifts cancel.
            pairs = [100.0 * (c["mean_step_s"] - b["mean_step_s"]) / b["mean_step_s"]
                     for b, c in zip(runs["baseline"], runs["cupti"]) if "mean_step_s" in b and "mean_step_s" in c]
            result["training"]["paired_overhead_percent"] = pairs
            result["training"]["paired_overhead_median_percent"] = statistics.median(pairs)
            result["training"]["collector_host_percent"] = statistics.median(
                r["collector_host_percent"] for r in ok["cupti"])

    _print_table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"monitor_cost-{dt.datetime.now():%Y%m%d-%H%M%S}-{result['commit']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return 0


def _print_table(result: dict) -> None:
    env = result["environment"]
    print(f"GPU monitor cost   {result['date']}   commit {result['commit']}")
    print(f"GPU {env.get('gpu')}, driver {env.get('driver')}, torch {env.get('torch')}, cupti-python {env.get('cupti-python')}")
    print()
    print(f"{'NVML sampler at 4 Hz':<34}{'CPU (% of one core)':>21}{'rate (Hz)':>11}   goal < 2%")
    for key, label in (("pcie_every_1s", "as shipped (PCIe once a second)"), ("pcie_every_sample", "PCIe at every sample")):
        r = result["sampler"][key]
        if "error" in r:
            print(f"{label:<34}{'error: ' + r['error']}")
        else:
            print(f"{label:<34}{r['percent_of_one_core']:>20.2f}%{r['rate_hz']:>11.2f}")
    training = result.get("training")
    if training:
        print()
        print(f"{'training-like step':<34}{'mean step (ms)':>21}{'median (ms)':>13}   means of the runs")
        for mode in ("baseline", "cupti"):
            rs = training["runs"][mode]
            means = [f"{r['mean_step_s'] * 1000:.2f}" for r in rs if "mean_step_s" in r]
            errors = [r["error"] for r in rs if "error" in r]
            label = "without paging counters" if mode == "baseline" else "with CUPTI paging counters"
            mean = training.get("mean_step_s", {}).get(mode)
            median = training.get("median_step_s", {}).get(mode)
            shown = f"{mean * 1000:>21.2f}{median * 1000:>13.2f}" if mean else f"{'–':>21}{'–':>13}"
            first_error = errors[0].strip().splitlines()[-1] if errors else ""
            print(f"{label:<34}{shown}   {', '.join(means)}" + (f"   error: {first_error}" if errors else ""))
        if "overhead_percent" in training:
            print(f"{'CUPTI overhead (mean step)':<34}{training['overhead_percent']:>20.2f}%   goal < 2%")
            paired = ", ".join(f"{p:.2f}" for p in training["paired_overhead_percent"])
            print(f"{'  paired runs, median':<34}{training['paired_overhead_median_percent']:>20.2f}%   each: {paired}")
            print(f"{'  collector calls, host time':<34}{training['collector_host_percent']:>20.2f}%   of the timed wall time")
        moved = [r["paging"] for r in training["runs"]["cupti"] if "paging" in r]
        if moved:
            m = moved[0]
            print(f"paging seen in one CUPTI run: {m['events']} events, in {m['bytes_htod'] / GIB:.2f} GiB, "
                  f"out {m['bytes_dtoh'] / GIB:.2f} GiB, {m['faults']} faults")


if __name__ == "__main__":
    sys.exit(main())
