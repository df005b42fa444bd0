#!/usr/bin/env bash
# Device check on the lent GPU machine (one call, about 7-9 minutes): owns the whole GPU run.
#   1. install the carried cp312 wheels (.whl/) into /tmp/site, put the repo on PYTHONPATH, show the GPU
#   2. pytest of everything that needs no packaged model weights, with CUDA present (log: $OUT/pytest.log)
#   3. a Llama-3.1-8B-shaped bf16 model with random weights, built on the GPU and saved under /dev/shm or /tmp
#   4. sync check: every strategy's fused prefill under torch.cuda.set_sync_debug_mode("error"), caches from
#      the CPU tier (pinned) and from the disk tier (int8, cachegen-2: decoded on the GPU)
#      -> $OUT/sync_check.txt (bench/gpu/sync_check.py)
#   5. the Triton sparse-query attention kernel against masked SDPA: error and time at 8K / 32K
#      -> $OUT/sparse_attention.txt (bench/gpu/sparse_attention_check.py)
#   6. chunkcache bench ttft, caches served from the CPU tier (pinned): full, reuse, cacheblend:0.15, epic,
#      ape at 1K-32K tokens in 16 chunks, a new question each round; CacheBlend and reuse in fixed-shape
#      buckets captured as CUDA graphs (fusion_mode auto; captures and replays in ttft.json) -> $OUT/ttft-cpu/
#   6b. the same at 1K / 8K for full, reuse, cacheblend:0.15 in each request's own shapes (fusion_mode off):
#      what the graphs buy, side by side -> $OUT/ttft-own-shapes/
#   7. the same from the disk tier (int8 entries; fewer lengths) -> $OUT/ttft-disk/
#   7b. chunkcache bench codec: size and GB/s of decoding onto the GPU per codec
#      (issue 21's target: cachegen-2 >= 5 GB/s of bf16) -> $OUT/codec/
#   7c. full vs cacheblend:0.15 at 8K from the disk tier in cachegen-2 and in raw (issue 21's target:
#      cachegen-2 >= 3x faster than full; int8 is step 7) -> $OUT/ttft-disk-cachegen/, $OUT/ttft-disk-raw/
#   8. cacheblend:0.15 with the masked-SDPA attention backend instead of Triton, CPU tier -> $OUT/ttft-sdpa/
#   8b. chunkcache bench decode: batched decode step, batch 1 / 8 / 32 at context 1K / 8K, per decode mode side by
#      side: loop (one attention call a sequence) and graphs (one batched call a layer, captured as CUDA graphs;
#      first step = capture, reported apart); DECODE_MODES=loop,kernel,graphs adds the batched call uncaptured
#      -> $OUT/decode/
#   9. chunkcache eval on 3 bundled questions: first-token KL of cacheblend:1.0 (and 0.15, reuse)
#      vs full in bf16 -> $OUT/eval/ (report.json, report.md)
#  10. (only when GPU_CHECK_SKIP leaves it in) torch.profiler of one warm answer per strategy
#      (bench/gpu/profile_fusion.py) -> $OUT/profile.txt
# Run from the repo root with $OUT set:  bash bench/gpu/device_check.sh   (carry: .whl .gpu)
# CPU dry run of the steps that need no GPU:
#   GPU_CHECK_TINY=1 GPU_CHECK_WHEELS=0 GPU_CHECK_SKIP="pytest sparse profile" PYTHON=.venv/bin/python OUT=/tmp/gpu-out \
#   TTFT_LENGTHS=1024 TTFT_DISK_LENGTHS=1024 bash bench/gpu/device_check.sh
# Knobs (env): GPU_CHECK_TINY=1 (2-layer, hidden-64 model), GPU_CHECK_WHEELS=0 (skip the wheel install),
# PYTHON, GPU_CHECK_LAYERS (layer count of the big model), TTFT_LENGTHS, TTFT_OWN_LENGTHS, TTFT_DISK_LENGTHS, TTFT_CHUNKS,
# TTFT_REPEATS, DECODE_MODES, DECODE_BATCHES, DECODE_CONTEXTS, GPU_CHECK_SKIP (space-separated steps to skip: pytest sync sparse ttft disk codec sdpa decode eval profile;
# default "profile"), GPU_CHECK_TESTS (test paths for step 2), PROFILE_TOKENS (sync check and profile),
# GPU_CHECK_REUSE_MODEL=1 (a rerun on the still-warm machine keeps the saved model instead of building it again).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
: "${OUT:?set OUT to the folder that comes back}"
mkdir -p "$OUT"

main() {
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
unset CI  # tests/conftest.py fails (not skips) the redis tests when CI is set and redis-server is absent
PY=${PYTHON:-python3}
TINY=${GPU_CHECK_TINY:-0}
SKIP=" ${GPU_CHECK_SKIP-profile} "
SCRATCH=${GPU_CHECK_SCRATCH:-/tmp/gpu-check}
# the packaged models' cache: only SmolLM2's tokenizer files (tests' tiny models use them), no weights
export XDG_CACHE_HOME=$SCRATCH/xdg
START=$(date +%s)
T0=$START
step() {  # step NAME: print the time of the previous step and the total so far
  local now; now=$(date +%s)
  echo
  echo "=== [$(date +%H:%M:%S)] +$((now - T0)) s (total $((now - START)) s) ==> $*"
  T0=$now
}
FAILED=""
fail() { echo "!!! FAILED: $*"; FAILED="$FAILED $1"; }

step "0 setup: scratch $SCRATCH, tiny=$TINY, python $PY"
rm -rf "$SCRATCH" && mkdir -p "$SCRATCH" "$XDG_CACHE_HOME/chunkcache/models/smollm2-135m" || return 1
[ -f .gpu/tokenizer/tokenizer.json ] || { echo "missing .gpu/tokenizer (carry .gpu)"; return 1; }
cp .gpu/tokenizer/* "$XDG_CACHE_HOME/chunkcache/models/smollm2-135m/"
echo '{"name": "smollm2-135m", "source": "device check: tokenizer files only"}' \
  > "$XDG_CACHE_HOME/chunkcache/models/smollm2-135m/chunkcache-converted.json"

if [ "${GPU_CHECK_WHEELS:-1}" = 1 ]; then
  step "1 wheels: $(ls .whl/*.whl 2>/dev/null | wc -l) from .whl into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; return 1; }
  export PYTHONPATH=$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  # tests that start Python with a bare environment (no PYTHONPATH) must still find the package
  # and the wheels: a .pth file in the image's own site-packages (the machine is thrown away)
  "$PY" -c "import site; print(site.getsitepackages()[0])" | { read -r site_dir && printf '%s\n%s\n' "$REPO" /tmp/site \
    > "$site_dir/chunkcache-device-check.pth"; } || echo "(no .pth: tests with a bare environment will fail)"
else
  step "1 wheels: skipped (GPU_CHECK_WHEELS=0)"
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi 2>&1 | head -20 || echo "(no nvidia-smi)"
"$PY" - <<'EOF' || { echo "import check failed: the steps below would fail"; return 1; }
import importlib, sys
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {torch.cuda.is_available()} {torch.version.cuda}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
for name in ("lmdb", "zstandard", "constriction", "redis", "rouge", "fastapi", "pydantic", "starlette", "numpy", "yaml",
             "matplotlib", "tqdm", "rich", "prometheus_client", "httpx", "safetensors", "accelerate"):
    mod = importlib.import_module(name)
    print(f"  {name:18} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
import chunkcache.cli
chunkcache.cli.build_parser()
print("chunkcache.cli parser ok")
EOF
"$PY" -m chunkcache.cli --help | head -4
"$PY" -m chunkcache.cli bench ttft --help | head -3

# 2. the tests that need no packaged weights, in the background while the big model is built and saved
PYTEST_PID=""
if [[ $SKIP != *" pytest "* ]]; then
  step "2 pytest in the background (log: \$OUT/pytest.log)"
  # GPU_CHECK_TESTS narrows the run (a space-separated list of test paths)
  read -r -a TEST_PATHS <<< "${GPU_CHECK_TESTS:-tests/codec tests/blend tests/model tests/store tests/test_engine.py tests/test_config.py}"
  PYTEST_ARGS=(-q -rs -p no_weights_plugin -p no:cacheprovider -m "not slow and not qwen" --durations=10
    "${TEST_PATHS[@]}" --ignore tests/eval/test_recall.py)
  "$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_ARGS+=(--timeout 120)
  ( cd "$REPO" && PYTHONPATH=$REPO/bench/gpu:$PYTHONPATH timeout -k 10 300 "$PY" -m pytest "${PYTEST_ARGS[@]}" \
      > "$OUT/pytest.log" 2>&1; echo "pytest exit $?" >> "$OUT/pytest.log" ) &
  PYTEST_PID=$!
fi

# 3. the random-weight model: on the GPU, saved where loading it back is fastest
if [ "$TINY" = 1 ]; then
  MODEL=$SCRATCH/llama8b-random-tiny; BUILD=(--tiny)
else
  SHM_FREE=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
  if [ "${SHM_FREE:-0}" -gt $((24 * 1024 * 1024)) ]; then MODEL=/dev/shm/llama8b-random; else MODEL=/tmp/llama8b-random; fi
  BUILD=(${GPU_CHECK_LAYERS:+--layers $GPU_CHECK_LAYERS})
fi
step "3 build + save random model -> $MODEL (df: $(df -Ph "$(dirname "$MODEL")" | awk 'NR==2 {print $4 " free on " $6}'))"
if [ "${GPU_CHECK_REUSE_MODEL:-0}" = 1 ] && [ -f "$MODEL/config.json" ] && ls "$MODEL"/*.safetensors >/dev/null 2>&1; then
  echo "reusing $MODEL (GPU_CHECK_REUSE_MODEL=1)"
else
  rm -rf "$MODEL"
  timeout -k 10 240 "$PY" bench/gpu/random_model.py --out "$MODEL" --tokenizer .gpu/tokenizer --dtype bfloat16 "${BUILD[@]}" \
    || fail "build the random model"
fi
ls -la "$MODEL" 2>/dev/null

if [ -n "$PYTEST_PID" ]; then
  step "2 (waiting for pytest to finish before timing anything)"
  wait "$PYTEST_PID"
  grep -E "^(FAILED|ERROR) " "$OUT/pytest.log" | head -40
  tail -2 "$OUT/pytest.log"
  grep -q "pytest exit 0" "$OUT/pytest.log" || fail "pytest"
fi

export CHUNKCACHE_CPU_BUDGET=${CHUNKCACHE_CPU_BUDGET:-96GiB}  # the CPU tier holds every prompt's caches
SIZES=${PROFILE_TOKENS:-8192}
if [[ $SKIP != *" sync "* && -f $MODEL/config.json ]]; then
  step "4 sync check: fused prefill under set_sync_debug_mode(\"error\"), CPU and disk tiers, $SIZES tokens"
  timeout -k 10 150 "$PY" bench/gpu/sync_check.py --model "$MODEL" --dtype bfloat16 --tokens "$SIZES" --chunks 16 \
    > "$OUT/sync_check.txt" 2>&1 || fail "sync check"
  grep -E "SYNC" "$OUT/sync_check.txt"
fi

if [[ $SKIP != *" sparse "* && $TINY != 1 ]]; then
  step "5 sparse-query attention: Triton kernel vs masked SDPA at 8K / 32K"
  timeout -k 10 90 "$PY" bench/gpu/sparse_attention_check.py --lengths 8192,32768 > "$OUT/sparse_attention.txt" 2>&1 \
    || fail "sparse attention check"
  cat "$OUT/sparse_attention.txt"
fi

CHUNKS=${TTFT_CHUNKS:-16}
REPEATS=${TTFT_REPEATS:-3}
ttft() {  # ttft STEP LABEL LENGTHS STRATEGIES [ENV=VALUE ...]: one bench ttft run into $OUT/ttft-LABEL
  local number=$1 label=$2 lengths=$3 strategies=$4; shift 4
  step "$number chunkcache bench ttft ($label: $*) --lengths $lengths --chunks $CHUNKS --repeats $REPEATS"
  rm -rf "$SCRATCH/store-$label"
  env "$@" timeout -k 10 200 "$PY" -m chunkcache.cli bench ttft --model "$MODEL" --dtype bfloat16 \
    --store "$SCRATCH/store-$label" --lengths "$lengths" --chunks "$CHUNKS" --repeats "$REPEATS" \
    --strategies "$strategies" --out "$OUT/ttft-$label" || fail "bench ttft $label"
}
if [[ -f $MODEL/config.json ]]; then
  [[ $SKIP != *" ttft "* ]] && ttft 6 cpu "${TTFT_LENGTHS:-1024,4096,8192,16384,32768}" \
    full,reuse,cacheblend:0.15,epic,ape CHUNKCACHE_STORE_TIERS=cpu
  [[ $SKIP != *" ttft "* ]] && ttft 6b own-shapes "${TTFT_OWN_LENGTHS:-1024,8192}" full,reuse,cacheblend:0.15 \
    CHUNKCACHE_STORE_TIERS=cpu CHUNKCACHE_FUSION_MODE=off
  [[ $SKIP != *" disk "* ]] && ttft 7 disk "${TTFT_DISK_LENGTHS:-1024,8192,32768}" \
    full,reuse,cacheblend:0.15,epic CHUNKCACHE_STORE_TIERS=disk CHUNKCACHE_CODEC=int8
  [[ $SKIP != *" codec "* ]] && ttft 7c disk-cachegen "${TTFT_CODEC_LENGTHS:-8192}" full,cacheblend:0.15 \
    CHUNKCACHE_STORE_TIERS=disk CHUNKCACHE_CODEC=cachegen-2
  [[ $SKIP != *" codec "* ]] && ttft 7c disk-raw "${TTFT_CODEC_LENGTHS:-8192}" full,cacheblend:0.15 \
    CHUNKCACHE_STORE_TIERS=disk CHUNKCACHE_CODEC=raw
  [[ $SKIP != *" sdpa "* ]] && ttft 8 sdpa "${TTFT_SDPA_LENGTHS:-8192,32768}" full,cacheblend:0.15 \
    CHUNKCACHE_STORE_TIERS=cpu CHUNKCACHE_ATTENTION_BACKEND=sdpa
fi

if [[ $SKIP != *" codec "* && -f $MODEL/config.json ]]; then
  step "7b chunkcache bench codec, decoding on the model's device: GB/s per codec (target: cachegen-2 >= 5 GB/s of bf16)"
  timeout -k 10 150 "$PY" -m chunkcache.cli bench codec --model "$MODEL" --dtype bfloat16 --store "$SCRATCH/store-codec" \
    --codecs "${CODEC_SPECS:-raw,int8,kivi2,cachegen-2}" --repeats 3 --out "$OUT/codec" \
    || fail "bench codec"
fi

if [[ $SKIP != *" decode "* && -f $MODEL/config.json ]]; then
  step "8b chunkcache bench decode: batch 1/8/32 at context 1K/8K, modes ${DECODE_MODES:-loop,graphs} (targets: batch 1 <= 5 ms/token, batch 32 >= 15x its tokens/s)"
  timeout -k 10 240 "$PY" -m chunkcache.cli bench decode --model "$MODEL" --dtype bfloat16 --store "$SCRATCH/store-decode" \
    --batches "${DECODE_BATCHES:-1,8,32}" --contexts "${DECODE_CONTEXTS:-1024,8192}" --steps 16 --max-kv 60GiB \
    --modes "${DECODE_MODES:-loop,graphs}" \
    --out "$OUT/decode" || fail "bench decode"
fi

if [[ $SKIP != *" eval "* && -f $MODEL/config.json ]]; then
  step "9 chunkcache eval: 3 bundled questions, first-token KL vs full in bf16"
  rm -rf "$SCRATCH/store-eval" "$SCRATCH/eval"
  timeout -k 10 120 "$PY" -m chunkcache.cli eval --model "$MODEL" --dtype bfloat16 --store "$SCRATCH/store-eval" \
    --dataset chunkcache/data/demo.json --limit 3 --max-new-tokens 8 --quiet \
    --strategies full,cacheblend:1.0,cacheblend:0.15,reuse --out "$SCRATCH/eval" || fail "eval"
  mkdir -p "$OUT/eval"
  cp "$SCRATCH"/eval/report.json "$SCRATCH"/eval/report.md "$OUT/eval/" 2>/dev/null
  "$PY" - "$SCRATCH/eval/report.json" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
for label, s in r["strategies"].items():
    print(f"NUMERICS {label:18} first-token KL vs full {s['first_token_kl']:.3e}  first-token agree "
          f"{s['first_token_agreement']:.2f}  answer agree {s['agreement_with_full']:.2f}  "
          f"TTFT {s['ttft_s_median'] * 1e3:.0f} ms  recomputed {s['recomputed_fraction']:.0%}")
EOF
fi

if [[ $SKIP != *" profile "* && -f $MODEL/config.json ]]; then
  step "10 torch.profiler of one warm answer per strategy at $SIZES tokens -> \$OUT/profile.txt"
  timeout -k 10 180 "$PY" bench/gpu/profile_fusion.py --model "$MODEL" --dtype bfloat16 --tokens "$SIZES" \
    --chunks 16 > "$OUT/profile.txt" 2>&1 || fail "profile"
  grep -E "^=====|^host waits" "$OUT/profile.txt"
fi

step "done; files under \$OUT:"
find "$OUT" -type f | sort | while read -r f; do echo "  $(du -h "$f" | cut -f1)  ${f#"$OUT"/}"; done
[ -z "$FAILED" ] && echo "DEVICE CHECK OK" || { echo "DEVICE CHECK FAILED:$FAILED"; return 1; }
}

main 2>&1 | tee -a "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
