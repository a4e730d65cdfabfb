#!/usr/bin/env bash
# The GPU work of a session in one command: the `gpu`-marked tests and the GPU benchmarks.
#
#   bash bench/run_gpu.sh OUT_DIR [PART ...]
#
# PART is any of: tests fastpaths estimatetests perf1b perf8b estimate monitor optimizer profile1b profile8b memory1b
# memory8b opcosts gemmfusion epilogue (default: tests perf1b). fastpaths: the engine's GPU tests only; estimatetests: the estimate's.
# QS_CONTENDERS / QS_CONTENDERS_8B choose the harness rows; QS_MONITOR_ARGS passes options to monitor_cost.py; QS_PROFILE_SETS lists profile variants. Wheels of packages
# the GPU machine lacks are taken from .whl/ (and the Unsloth peer from .peer/) when present:
# `bash ../shared/device/wheels.sh --peer gguf` fills them. Logs and result files go to OUT_DIR.
set -uo pipefail
out=${1:?usage: bash bench/run_gpu.sh OUT_DIR [PART ...]}; shift
parts=${*:-tests perf1b}
mkdir -p "$out"
stamp=$(mktemp)  # result files newer than this one are this run's
site=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
fi
if compgen -G ".peer/*.whl" >/dev/null; then
  peer=$(mktemp -d)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$peer" .peer/*.whl || exit 1
  export QS_PEER_PATH=$peer
fi
export PYTHONPATH=$site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export QS_BENCH_MODELS=${QS_BENCH_MODELS:-$(mktemp -d)}
# The copy of the tree on the GPU machine can carry an older .git than its files: name results by
# the commit that was copied (QS_COMMIT=$(git rev-parse --short HEAD) on the way in).
[ -n "${QS_COMMIT:-}" ] || echo "warning: QS_COMMIT is not set; result files take the commit of the copy's .git, which can be older than its files" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)'
status=0
for part in $parts; do
  start=$(date +%s)
  case $part in
    tests) QS_RECORD_DIR=$out python3 -m pytest -m gpu tests/engine tests/monitor tests/estimate -v -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -40 ;;
    perf1b) python3 bench/perf_harness.py --shape 1b --contenders ${QS_CONTENDERS:-seed,engine,engine-peft-lora,engine-cupti,unsloth,engine-auto} --results "$out" ;;
    fastpaths) python3 -m pytest -m gpu tests/engine -v -p no:cacheprovider 2>&1 | tee "$out/gpu-tests.log" | tail -25 ;;
    estimatetests) python3 -m pytest -m gpu tests/estimate -v -p no:cacheprovider 2>&1 | tee "$out/gpu-estimate-tests.log" | tail -15 ;;
    perf8b) python3 bench/perf_harness.py --shape 8b --contenders ${QS_CONTENDERS_8B:-seed,engine,unsloth,engine-auto} --results "$out" ;;
    estimate) python3 bench/estimate_accuracy.py ;;
    monitor) python3 bench/monitor_cost.py ${QS_MONITOR_ARGS:-} ;;
    profile8b|profile1b)  # one profile per QS_PROFILE_SETS entry (';'-separated; an entry: KEY=VALUE settings and --options)
      IFS=';' read -ra variants <<< "${QS_PROFILE_SETS:-}"; [ ${#variants[@]} -gt 0 ] || variants=("")
      for v in "${variants[@]}"; do
        sets=(); for kv in $v; do case $kv in --*) sets+=("$kv") ;; *) sets+=(--set "$kv") ;; esac; done
        python3 bench/profile_step.py --shape "${part#profile}" --phases ${QS_PROFILE_PHASES:-20} "${sets[@]}" \
          ${QS_PROFILE_TRACE:+--trace "$out/trace-${part#profile}.json.gz"} || break
      done ;;
    opcosts) python3 bench/op_costs.py --shape 8b ;;
    gemmfusion) python3 bench/gemm_fusion.py --shape 8b ;;
    epilogue) python3 bench/lora_epilogue.py --shape 8b && python3 bench/lora_epilogue.py --shape 1b ;;
    optimizer) python3 bench/optimizer_step.py --shape 1b && python3 bench/optimizer_step.py --shape 8b ;;
    memory1b|memory8b)  # what is alive at the peak, with the defaults and with each QS_MEMORY_SETS entry (';'-separated KEY=VALUE lists)
      IFS=';' read -ra variants <<< "${QS_MEMORY_SETS:-}"
      for v in "" "${variants[@]}"; do
        sets=(); for kv in $v; do sets+=(--set "$kv"); done
        python3 bench/memory_peak.py --shape "${part#memory}" "${sets[@]}" || break
      done ;;
    *) echo "unknown part $part"; status=2 ;;
  esac
  rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || status=$rc
  echo "== $part: exit $rc in $(( $(date +%s) - start )) s"
done
# Results that scripts wrote into bench/results during this run travel back too.
find bench/results -type f -newer "$stamp" -exec cp {} "$out"/ \;
exit $status
