#!/usr/bin/env bash
# One GPU session's plan in one command: tests, kernel micro-benchmarks, engine benches.
# Usage on the GPU machine (repo root): bash benchmarks/gpu_plan.sh STAGE [STAGE ...]
# Stages: see the case below (tests, kernels, bench-*, ladder, gate-selftest, tests-mem, vae, torchao,
# bench-memory, planner, ladder-full, main-1024, main-2048, tests-lora, lora-kc, lora-fast, profile-lora, lora-28,
# tests-tasks, task-TASK for every engine.bench --task, tests-cache, cache-taylorseer, cache-fbcache-0,
# cache-fbcache-008, profile-cache, tests-fp8attn, kernels-attention, fp8attn-1024, fp8attn-2048, tune-table,
# startup, startup-tables, startup-nographs, tests-startup, cache-fbcache-graphs, tests-fbcache-graphs,
# tests-controlnet-graphs, gluon-kernels, gluon-step, profile-cp-2, tests-cp, cp-2-chunks, cp-2-nccl, cp-2-prio, timeline-cp-2, startup-shipped,
# startup-package, startup-profile, startup-frames, startup-frames-only, startup-noframes,
# startup-frames-nographs, tests-frames, profile-cudnn, profile-cudnn-nographs, vae-compile, pack-artifacts, cudnn-attention, tests-cudnn, cudnn-1024, cudnn-2048, cudnn-kontext,
# cudnn-taylorseer, cudnn-lora-28, cudnn-lora-2048, cudnn-startup, cudnn-plans, gelu-ab, tests-gelu-cudnn, profile-vae, profile-vae-chunked,
# profile-vae-eager, tests-vae-kernels, taylorseer-compiledvae, cudnn-startup-package, startup-package-profile,
# profile-encode, profile-cudnn-2048, power-probe, tune-qk-e4m3,
# cold-start-causes, jit-probe, warm-ab, warm-ba, jit-probe-parts, warm-enc, fp8-lora-gemm, tests-guards,
# tests-sweep, generate-kontext, tokens-8704, probe-state, probe-from-pipe, probe-release).
# Each stage has its own time limit, so one failing or slow stage cannot eat the others; logs go to $OUT/plan.log, JSON
# results to $OUT/.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
LOG="$OUT/plan.log"
if [ -d .wheelhouse ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheelhouse/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# The folder kernels/ imports as flux_kernels once the project is installed (pyproject.toml maps it): install it
# editable, without its dependencies (the wheels above and the machine's own torch/triton provide them). If that
# cannot be done, a link named flux_kernels serves the same imports.
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1; then
  mkdir -p /tmp/src && ln -sfn "$PWD/kernels" /tmp/src/flux_kernels
  export PYTHONPATH=$PYTHONPATH:/tmp/src
  echo "editable install failed (see $LOG): flux_kernels from a link" | tee -a "$LOG"
fi
export FLUX_ENGINE_COMMIT=${FLUX_ENGINE_COMMIT:-unknown}
DAY=$(date -u +%Y%m%d-%H%M)
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //; s/ /-/g' | tr 'A-Z' 'a-z')
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$LOG"
SUMMARY=()

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "===== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/.stage.log" 2>&1
  local rc=$?
  cat "$OUT/.stage.log" >>"$LOG"
  grep -v -E "it/s\]|s/it\]|%\|" "$OUT/.stage.log" | tail -n 25
  rm -f "$OUT/.stage.log"
  SUMMARY+=("$name rc=$rc $((SECONDS - t0))s")
  echo "===== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
}

for s in "$@"; do
  case $s in
    tests) stage tests 200 python3 -m pytest -q -x -m gpu tests ;;
    tests-engine) stage tests-engine 150 python3 -m pytest -q -x tests/test_engine_attention.py ;;
    kernels)
      stage bench-attention 170 python3 -m benchmarks.kernels.bench_flash_attention --out "$OUT/attention-$CARD-$DAY.json"
      stage bench-norm 100 python3 -m benchmarks.kernels.bench_norm_ops --out "$OUT/norm-$CARD-$DAY.json" ;;
    bench-baseline)
      stage bench-baseline 120 python3 -m engine.bench --res 1024 --steps 4 \
        --out "$OUT/bench-baseline-$CARD-$DAY.json" ;;
    bench-kernels)
      stage bench-kernels 200 python3 -m engine.bench --res 1024 2048 --steps 4 --preset kernels \
        --out "$OUT/bench-kernels-$CARD-$DAY.json" ;;
    bench-kernels-triton)
      stage bench-kernels-triton 200 python3 -m engine.bench --res 1024 2048 --steps 4 --preset kernels-triton-attn \
        --out "$OUT/bench-kernels-triton-$CARD-$DAY.json" ;;
    bench-compile)
      stage bench-compile 270 python3 -m engine.bench --res 1024 2048 1360x768 512 --steps 4 --preset compile \
        --out "$OUT/bench-compile-$CARD-$DAY.json" ;;
    bench-kernels-compile)
      stage bench-kernels-compile 270 python3 -m engine.bench --res 1024 2048 1360x768 512 --steps 4 \
        --preset kernels-compile --out "$OUT/bench-kernels-compile-$CARD-$DAY.json" ;;
    tests-compile) stage tests-compile 150 python3 -m pytest -q -x tests/test_compile.py -k "kernels_inside or cuda_graphs" ;;
    ladder)
      stage ladder 420 python3 -m engine.bench --res 1024 1360x768 512 832x1216 2048 --steps 4 \
        --preset kernels,kernels-compile,kernels-compile-cudagraphs --out "$OUT/bench-ladder-$CARD-$DAY.json" ;;
    gate-selftest)
      # record a gate baseline, then slow the attention kernel to a poor tile: the gate must fail (rc=1 expected)
      stage gate-record 150 python3 -m engine.bench --res 2048 --steps 2 --runs 2 --no-baseline \
        --preset kernels-triton-attn --out "$OUT/gate-baseline-$CARD-$DAY.json"
      stage gate-slowed 150 env FLUX_KERNELS_ATTENTION_CONFIG=64,32,4,1 python3 -m engine.bench --res 2048 --steps 2 \
        --runs 2 --no-baseline --preset kernels-triton-attn --out "$OUT/gate-slowed-$CARD-$DAY.json" \
        --gate "$OUT/gate-baseline-$CARD-$DAY.json" ;;
    quant-compile)
      stage quant-compile 300 python3 -m benchmarks.bench_quant --modes none,fp8 --budget-s 280 \
        --out "$OUT/quant-compile-$CARD-$DAY.json" ;;
    tests-all-gpu)
      stage tests-all-gpu 200 python3 -m pytest -q -m gpu tests
      stage tests-engine-gpu 200 python3 -m pytest -q tests/test_engine_attention.py tests/test_compile.py \
        -k "not cache_round_trip and not no_graph_break_and_no_recompile" ;;
    tests-mem) stage tests-mem 240 python3 -m pytest -q -m gpu tests/test_offload.py tests/test_vae.py tests/test_planner.py ;;
    vae) stage vae 150 python3 -m benchmarks.bench_vae --res 1024,2048 --out "$OUT" ;;
    torchao) stage torchao 260 python3 -m benchmarks.bench_torchao --out "$OUT" ;;
    bench-memory)
      # policies side by side with diffusers and fp8-compile without offload (the reference of the 1.3x target)
      stage bench-memory 420 python3 -m engine.bench --res 1024 2048 --steps 4 --runs 2 \
        --preset fp8-compile,fp8-block,lean-bf16,fp8-leaf --cache-dir /tmp/fe-cache \
        --out "$OUT/bench-memory-$CARD-$DAY.json" ;;
    planner)
      stage planner 560 python3 -m engine.bench --vram 6,8,12,16,24,48 --res 1024 2048 --steps 4 --runs 1 \
        --cache-dir /tmp/fe-cache --out "$OUT/bench-planner-$CARD-$DAY.json" ;;
    ladder-a|ladder-b)
      # the full ladder (`--preset ladder`) takes ~11 min on an H100, past the device's 10-min command limit:
      # two halves, each beside its own diffusers baseline
      if [ "$s" = ladder-a ]; then P=baseline,kernels,compile,kernels-compile,kernels-compile-cudagraphs,fp8,fp8-compile
      else P=nf4,int8-weight,kernels-triton-attn,lean-bf16,fp8-block,fp8-leaf; fi
      stage "$s" 560 python3 -m engine.bench --res 1024 2048 --steps 4 --runs 2 --preset "$P" \
        --cache-dir /tmp/fe-cache --out "$OUT/bench-$s-$CARD-$DAY.json" --save-baseline "$OUT/gate-$s-$CARD.json" ;;
    ladder-full)
      stage ladder-full 580 python3 -m engine.bench --res 1024 2048 --steps 4 --runs 2 --preset ladder \
        --cache-dir /tmp/fe-cache --out "$OUT/bench-ladder-full-$CARD-$DAY.json" \
        --save-baseline "$OUT/baseline-ladder-$CARD.json" ;;
    tests-fp8) stage tests-fp8 200 python3 -m pytest -q -m gpu tests/kernels/test_layernorm_modulate.py tests/kernels/test_gelu_fp8.py tests/kernels/test_fp8.py tests/test_quantize.py ;;
    micro-fp8)
      # the fp8 micro-benchmarks (norm into an fp8 input, fp8 linear with / without fast accumulation), compared
      # with the saved H100 baseline where it has them
      stage micro-fp8 150 python3 -m pytest -q benchmarks/kernels/test_micro_kernels.py -k "norm_into_fp8 or linear" \
        --benchmark-json "$OUT/micro-fp8-$CARD-$DAY.json" ;;
    load-peak)
      stage load-peak 300 python3 -m benchmarks.bench_quant --load-peak-mode fp8 --load-peak-dir /tmp/load-peak \
        --out "$OUT/quant-load-$CARD-$DAY.json" ;;
    fp8-fusion) stage fp8-fusion 300 python3 -m benchmarks.bench_fp8_fusion --out "$OUT/fp8-fusion-$CARD-$DAY.json" ;;
    fp8-forward)
      stage fp8-forward 200 python3 -m benchmarks.bench_fp8_fusion --skip-kernels --out "$OUT/fp8-forward-$CARD-$DAY.json" ;;
    fp8-ab)
      # the fp8 activation-quantisation fusion and fast accumulation, each against the others and bf16 compiled
      stage fp8-ab 560 python3 -m engine.bench --res 1024 2048 --steps 4 --runs 2 \
        --preset kernels-compile,fp8-compile-unfused-quant,fp8-compile,fp8-compile-fastacc,fp8-compile-fastacc-cudagraphs --cache-dir /tmp/fe-cache \
        --out "$OUT/bench-fp8-ab-$CARD-$DAY.json" ;;
    cp-2|cp-2-eager|cp-2-c1)
      # context parallelism on 2 GPUs beside the same config on 1 GPU, 28 steps (issue "Several GPUs"); cp-2 runs the
      # fastest preset (CUDA graphs capture the NCCL collectives), cp-2-eager the same without CUDA graphs, cp-2-c1
      # the 2-GPU half alone with the exchange in one piece (no overlap with attention), for the A/B of the overlap
      P=fp8-compile-fastacc-cudagraphs; EXTRA=()
      [ "$s" = cp-2-eager ] && P=fp8-compile-fastacc
      [ "$s" = cp-2-c1 ] && EXTRA=(--cp-chunks 1 --no-single)
      stage "$s" 420 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.bench --gpus 2 --res 1024 2048 \
        --steps 28 --runs 2 --preset "$P" "${EXTRA[@]}" --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    cp-2-chunks)
      # the exchange in more head slices (issue "Several GPUs"): chunks 4 at both sizes beside one GPU, then chunks 3
      # and 6 at 2048^2 on 2 GPUs alone (one process each, so each row is its own compile)
      for c in 4 3 6; do
        EXTRA=(--res 1024 2048); [ "$c" != 4 ] && EXTRA=(--res 2048 --no-single)
        stage "cp-2-c$c" 300 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
          python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.bench --gpus 2 "${EXTRA[@]}" \
          --steps 28 --runs 2 --preset fp8-compile-fastacc-cudagraphs --cp-chunks "$c" \
          --out "/tmp/bench-cp-2-c$c.json"
        cp "/tmp/bench-cp-2-c$c.json" "$OUT/bench-cp-2-c$c-$CARD-$DAY.json"
      done ;;
    cp-2-prio)
      # the A/B of ParallelConfig.comm_priority (issue "Several GPUs"): the exchanges on high-priority NCCL streams,
      # 2048^2 on 2 GPUs alone; run after cp-2 (normal priority, the default since 2026-11-30 11:45)
      stage cp-2-prio 240 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.bench --gpus 2 --res 2048 \
        --no-single --steps 28 --runs 2 --preset fp8-compile-fastacc-cudagraphs --cp-priority high \
        --out "$OUT/bench-cp-2-high-$CARD-$DAY.json" ;;
    cp-2-nccl)
      # NCCL's SM share (issue "Several GPUs"): fewer channels (CTAs) for the exchange's kernels leave more SMs to the
      # attention and GEMMs they overlap, at a lower link rate; 2048^2 on 2 GPUs alone, the default first
      for n in ${NCCL_CHANNELS:-default 8 4}; do  # min32: at least 32 channels instead of at most n
        CH=(); [ "$n" != default ] && CH=(NCCL_MAX_NCHANNELS="$n" NCCL_MAX_P2P_NCHANNELS="$n")
        [ "$n" = min32 ] && CH=(NCCL_MIN_NCHANNELS=32 NCCL_MIN_P2P_NCHANNELS=32)
        stage "cp-2-nccl-$n" 240 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
          "${CH[@]}" python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.bench --gpus 2 \
          --res 2048 --no-single --steps 28 --runs 2 --preset fp8-compile-fastacc-cudagraphs \
          --out "/tmp/bench-cp-2-nccl-$n.json"
        cp "/tmp/bench-cp-2-nccl-$n.json" "$OUT/bench-cp-2-nccl-$n-$CARD-$DAY.json"
      done ;;
    startup-shipped)
      # the cold start of a fresh machine if the package shipped this card's compile artefacts (issue "Our attention at
      # the top", item 4): cold, warm, then a fresh folder with the cold run's artefacts as shipped ones (inductor's
      # <key>.bin and our Triton kernels' <key>.triton.zip); they come back under $OUT/artifacts to be committed into
      # engine/compiled/ if they pay
      stage startup-shipped 420 python3 -m benchmarks.startup --preset fp8-compile-fastacc-cudagraphs --sizes 1024 \
        1360x768 --runs tables:cold,tables:warm,tables:shipped --artifacts-out "$OUT/artifacts" \
        --out "$OUT/startup-shipped-$CARD-$DAY.json" ;;
    startup-profile)
      # where a start's first call goes (cProfile, text under $OUT/profiles): cold then warm; the profiler inflates the
      # times (dynamo is Python), so the JSON marks them profiled and they are no start-up figures
      stage startup-profile 300 python3 -m benchmarks.startup --preset fp8-compile-fastacc-cudagraphs --sizes 1024 \
        --runs tables:cold,tables:warm --profile-dir "$OUT/profiles" --out "$OUT/startup-profile-$CARD-$DAY.json" ;;
    startup-frames|startup-frames-only)
      # engine.frames on one machine (issue "Our attention at the top", item 4): cold, warm and shipped starts with the
      # regions' frames saved and loaded, then cold and warm tracing every frame as before (--no-frames); each first
      # call's image checksum says whether two starts ran the same code. Artefacts (with <key>.frames) under
      # $OUT/artifacts, to be committed into engine/compiled/ if they pay
      stage startup-frames 420 python3 -m benchmarks.startup --preset fp8-compile-fastacc-cudagraphs --sizes 1024 \
        1360x768 --runs tables:cold,tables:warm,tables:shipped --artifacts-out "$OUT/artifacts" \
        --out "$OUT/startup-frames-$CARD-$DAY.json"
      [ "$s" = startup-frames ] || continue ;&
    startup-noframes)
      stage startup-noframes 300 python3 -m benchmarks.startup --preset fp8-compile-fastacc-cudagraphs --sizes 1024 \
        1360x768 --runs tables:cold,tables:warm --no-frames --out "$OUT/startup-noframes-$CARD-$DAY.json" ;;
    startup-frames-nographs)
      # engine.frames on the fp8 preset without CUDA graphs (the host launches every block: the frames' dispatch is
      # on its path), 20 steps a call: warm calls with and without frames, no frames first
      for f in noframes frames; do
        stage "startup-nographs-$f" 240 python3 -m benchmarks.startup --preset fp8-compile-fastacc --sizes 1024 \
          --steps 20 --runs tables:cold,tables:warm $([ $f = noframes ] && echo --no-frames) \
          --out "$OUT/startup-nographs-$f-$CARD-$DAY.json"
      done ;;
    tests-frames)
      stage tests-frames 400 python3 -m pytest -q -m gpu tests/test_frames.py tests/test_compile.py \
        tests/test_lora.py tests/test_step_cache.py tests/test_tasks.py tests/test_startup_bench.py ;;
    startup-package-profile)
      # the package start's first calls under cProfile (each size's: where a fresh machine's first call and next size
      # go); inflated times, text under $OUT/profiles
      stage "$s" 200 python3 -m benchmarks.startup --preset fp8-compile-fastacc-cudagraphs --sizes 1024 1360x768 \
        --runs tables:package --profile-dir "$OUT/profiles" --out "$OUT/$s-$CARD-$DAY.json"
      tar -C "$OUT" -czf "$OUT/profiles.tgz" profiles && rm -rf "$OUT/profiles" ;;
    startup-package|cudnn-startup-package)
      # a fresh machine's first process today: an empty cache and the artefacts the package ships (engine/compiled/),
      # for the fastest preset or the cuDNN-attention one
      P=fp8-compile-fastacc-cudagraphs; [ "$s" = cudnn-startup-package ] && P=fp8-compile-fastacc-cudagraphs-cudnnattn
      stage "$s" 200 python3 -m benchmarks.startup --preset "$P" --sizes 1024 1360x768 --runs tables:package \
        --out "$OUT/$s-$CARD-$DAY.json" ;;
    cold-start-causes)
      # what a fresh machine's first package start leaves behind that makes the next start fast (NOTES 2026-12-01
      # 08:09): the files written during the first start, then starts with one candidate reset at a time
      drop_cache() { sync; echo 3 >/proc/sys/vm/drop_caches || echo "could not drop the page cache"; }
      C="$OUT/causes-$CARD-$DAY.txt"; touch /tmp/marker; sleep 1
      n=0
      for run in fastest:fresh fastest:jit fastest:pyc fastest:used cudnn:fresh cudnn:jit; do
        n=$((n + 1)); P=fp8-compile-fastacc-cudagraphs; [ "${run%:*}" = cudnn ] && P=$P-cudnnattn
        JIT=$HOME/.nv/ComputeCache
        [ "${run#*:}" = jit ] && JIT=/tmp/jit-$n  # an empty CUDA JIT cache
        [ "${run#*:}" = pyc ] && find /tmp/site "$PWD" -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null
        drop_cache
        stage "cold-$n-$run" 150 env CUDA_CACHE_PATH="$JIT" python3 -m benchmarks.startup \
          --preset "$P" --sizes 1024 1360x768 --runs tables:package --out "$OUT/cold-$n-${run%:*}-${run#*:}-$CARD-$DAY.json"
        { echo "== after $n $run"; du -sk "$HOME/.nv/ComputeCache" /tmp/jit-* "$HOME/.cache"/* 2>/dev/null
          echo "pyc files: $(find /tmp/site "$PWD" -name '*.pyc' 2>/dev/null | wc -l)"; } >>"$C"
        if [ $n = 1 ]; then
          echo "== files written during the first start (KiB by folder, 3 levels)" >>"$C"
          find / -xdev -newer /tmp/marker -type f ! -path "$OUT/*" ! -path '/proc/*' ! -path '/sys/*' -printf '%k %h\n' \
            2>/dev/null | awk '{split($2, p, "/"); k = "/" p[2] "/" p[3] "/" p[4]; s[k] += $1; c[k]++}
            END {for (k in s) print s[k], c[k], k}' | sort -rn | head -40 >>"$C"
        fi
      done ;;
    jit-probe)
      # FLUX's fp8 GEMMs and SDPA at each token count, first call timed, the CUDA JIT cache empty then filled
      # (NOTES 2026-12-01 08:16)
      rm -rf /tmp/jit-probe
      stage jit-probe-empty 120 env CUDA_CACHE_PATH=/tmp/jit-probe python3 -m benchmarks.jit_probe --out "$OUT/jit-probe-empty-$CARD-$DAY.json"
      stage jit-probe-filled 120 env CUDA_CACHE_PATH=/tmp/jit-probe python3 -m benchmarks.jit_probe --out "$OUT/jit-probe-filled-$CARD-$DAY.json" ;;
    warm-ab)
      # engine.warmup's warm of the attention kernels: the probe on an empty CUDA JIT cache (warm, then each core's
      # first call at lengths of every kind), then package starts with and without the warm, each on an empty JIT
      # cache (NOTES 2026-12-01 08:20)
      stage warm-probe 120 env CUDA_CACHE_PATH=/tmp/jit-probe python3 -m benchmarks.jit_probe --out "$OUT/warm-probe-$CARD-$DAY.json" \
        --warm-tokens 4592 4593 4600 4624 4640 4672 4736 3600 1536 4608 8704
      n=0
      for run in fastest:1 fastest:0 cudnn:1 cudnn:0; do
        n=$((n + 1)); P=fp8-compile-fastacc-cudagraphs; [ "${run%:*}" = cudnn ] && P=$P-cudnnattn
        stage "warm-$n-$run" 150 env FLUX_ENGINE_WARM_ATTENTION="${run#*:}" CUDA_CACHE_PATH="/tmp/jit-$n" python3 -m \
          benchmarks.startup --preset "$P" --sizes 1024 1360x768 --runs tables:package \
          --out "$OUT/warm-$n-${run%:*}-${run#*:}-$CARD-$DAY.json"
      done ;;
    jit-probe-parts)
      # the prompt encoding's and the VAE decode's first calls on an empty CUDA JIT cache (NOTES 2026-12-01 08:32)
      stage jit-probe-parts 150 env CUDA_CACHE_PATH=/tmp/jit-parts python3 -m benchmarks.jit_probe --pipeline-parts \
        --out "$OUT/jit-probe-parts-$CARD-$DAY.json" ;;
    warm-ba|warm-enc)
      # warm-ab's starts in the other order, the page cache dropped and an empty CUDA JIT cache before each, and the
      # first one again at the end (the spread) (NOTES 2026-12-01 08:25); warm-enc: the fastest preset with the warm
      # (prompt encoding too, NOTES 08:35) then without
      n=0; RUNS="fastest:0 fastest:1 cudnn:0 cudnn:1 fastest:0"; [ "$s" = warm-enc ] && RUNS="fastest:1 fastest:0"
      for run in $RUNS; do
        n=$((n + 1)); P=fp8-compile-fastacc-cudagraphs; [ "${run%:*}" = cudnn ] && P=$P-cudnnattn
        sync; echo 3 >/proc/sys/vm/drop_caches || echo "could not drop the page cache"
        stage "$s-$n-$run" 150 env FLUX_ENGINE_WARM_ATTENTION="${run#*:}" CUDA_CACHE_PATH="/tmp/jit-ba-$n" \
          python3 -m benchmarks.startup --preset "$P" --sizes 1024 1360x768 --runs tables:package \
          --out "$OUT/$s-$n-${run%:*}-${run#*:}-$CARD-$DAY.json"
      done ;;
    timeline-cp-2)
      # each rank's compute / communication / idle time per step under the fastest preset's CUDA graphs, beside one
      # GPU's, and the ranks' Chrome traces (gzipped): what the 2-GPU step waits for (NOTES 2026-11-30 09:30)
      stage timeline-cp-2 300 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.profile_parallel --timeline \
        --preset fp8-compile-fastacc-cudagraphs --res 2048 --out "$OUT/timeline-cp-2-$CARD-$DAY.json" \
        --trace-dir /tmp/traces
      for r in rank0 rank1; do [ -f "/tmp/traces/$r.json" ] && gzip -c "/tmp/traces/$r.json" > "$OUT/trace-cp-2-$r.json.gz"; done ;;
    profile-cp-2)
      # where a 2-GPU step's time goes beside one GPU's (kernel time per category, rank 0; eager regional compile)
      stage profile-cp-2 300 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m benchmarks.profile_parallel --res 2048 \
        --out "$OUT/profile-cp-2-$CARD-$DAY.json" ;;
    tests-cp) stage tests-cp 150 python3 -m pytest -q -m gpu tests/kernels/test_qk_norm_rope.py ;;
    cp-2-smoke)
      # the final code on 2 GPUs, quickly: the bench (4 steps, 1 run) and engine.generate, each must exit 0
      stage cp-2-smoke-bench 240 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.bench --gpus 2 --res 1024 \
        --steps 4 --runs 1 --preset fp8-compile-fastacc-cudagraphs --out "$OUT/bench-cp-2-smoke-$CARD-$DAY.json"
      stage cp-2-smoke-generate 150 env NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m engine.generate "a fox in the snow" \
        --res 1360x768 --steps 4 --gpus 2 --preset fp8-compile-fastacc-cudagraphs -o "$OUT/cp-2-fox.png" ;;
    tests-lora) stage tests-lora 200 python3 -m pytest -q -m gpu tests/test_lora_quant.py tests/test_lora.py ;;
    lora-kc|lora-fast)
      # a rank-64 adapter on every attention and MLP projection (issue "LoRA"): each config measured without it, then
      # with it (the adapter's cost, one process), beside diffusers with the same adapter; then a hot-swap
      P=kernels-compile; [ "$s" = lora-fast ] && P=fp8-compile-fastacc-cudagraphs
      stage "$s" 330 python3 -m engine.bench --res 1024 2048 --steps 4 --runs 2 --preset "$P" --lora synthetic:64 \
        --cache-dir /tmp/fe-cache --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    profile-cudnn|profile-cudnn-nographs)
      # where the cuDNN preset's step goes at 1024^2 (largest kernels), and what a rank-64 adapter adds to it
      EXTRA=(); [ "$s" = profile-cudnn-nographs ] && EXTRA=(--no-cuda-graphs)
      stage "$s" 240 python3 -m benchmarks.profile_lora --res 1024 --rank 64 \
        --preset fp8-compile-fastacc-cudagraphs-cudnnattn "${EXTRA[@]}" --out "$OUT/$s-$CARD-$DAY.json" ;;
    tune-qk-e4m3)
      # the QK-norm kernel's e4m3 keys (cuDNN preset) tuned at every size class, kept in $OUT/tuned/ to merge into
      # kernels/tuned/<card>.json (a fresh machine then tunes none of them)
      mkdir -p "$OUT/tuned"
      stage "$s" 200 env FLUX_KERNELS_TUNING=retune FLUX_KERNELS_TUNING_DIR="$OUT/tuned" \
        python3 -m benchmarks.kernels.tune_qk_e4m3 ;;
    power-probe)
      # whether the card holds its clocks: NVML's SM clock, power and clock-event reasons during cuDNN's attention
      # alone (20 and 600 calls) and during the cuDNN preset's 2048^2 steps (benchmarks/power_probe.py)
      stage "$s" 240 python3 -m benchmarks.power_probe --out "$OUT/$s-$CARD-$DAY.json" ;;
    profile-cudnn-2048)
      # where the cuDNN preset's 2048^2 step goes (largest kernels; no adapter)
      stage "$s" 240 python3 -m benchmarks.profile_lora --res 2048 --rank 0 \
        --preset fp8-compile-fastacc-cudagraphs-cudnnattn --out "$OUT/$s-$CARD-$DAY.json" ;;
    vae-compile) stage vae-compile 300 python3 -m benchmarks.bench_vae --res 1024,1360x768,2048 --tiles 1024/128 --no-diffusers \
      --no-channels-last --compile --out "$OUT" ;;
    pack-artifacts)
      # the start-up stages' $OUT/artifacts as one tar per key (the device brings back at most 8 files)
      for bin in "$OUT"/artifacts/*.bin; do
        [ -e "$bin" ] || continue
        key=$(basename "$bin" .bin)
        tar -C "$OUT/artifacts" -cf "$OUT/artifacts-$key.tar" $(cd "$OUT/artifacts" && ls "$key".*) && rm -f "$OUT/artifacts/$key".*
      done
      ls -la "$OUT" ;;
    profile-lora)
      stage profile-lora 240 python3 -m benchmarks.profile_lora --res 1024 --rank 64 --preset fp8-compile-fastacc \
        --out "$OUT/profile-lora-$CARD-$DAY.json" ;;
    lora-28)
      # the 28-step 1024x1024 image with the rank-64 adapter active, fastest preset, beside diffusers with it
      stage lora-28 300 python3 -m engine.bench --res 1024 --steps 28 --runs 2 --preset fp8-compile-fastacc-cudagraphs \
        --lora synthetic:64 --cache-dir /tmp/fe-cache --out "$OUT/bench-lora-28-$CARD-$DAY.json" ;;
    tests-tasks) stage tests-tasks 240 python3 -m pytest -q -m gpu tests/test_tasks.py tests/test_pipeline_classes.py ;;
    task-*)
      # issue "Every FLUX.1 pipeline": the task's engine (no --preset: the fastest config here) beside diffusers' own
      # class of the task, same synthetic inputs, 1024^2; the compile cache is shared with the other task stages
      stage "$s" 200 python3 -m engine.bench --task "${s#task-}" --res 1024 --steps 4 --runs 3 --cache-dir /tmp/fe-cache \
        --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    tests-cache) stage tests-cache 200 python3 -m pytest -q -m gpu tests/test_step_cache.py ;;
    cache-taylorseer)
      # issue "Step caching": 28-step images with TaylorSeer (full steps 0-2, then every 5th: 8 of 28) on the fastest
      # preset, beside the same preset uncached (same process) and diffusers with its own TaylorSeer (lite)
      stage "$s" 420 python3 -m engine.bench --res 1024 2048 --steps 28 --runs 2 --preset fp8-compile-fastacc-cudagraphs \
        --cache taylorseer:5 --cache-dir /tmp/fe-cache --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    cache-fbcache-0|cache-fbcache-008)
      # First-Block Cache at threshold 0 (never skips: the cache's own cost a step) and 0.08, beside diffusers' FBCache
      T=0; [ "$s" = cache-fbcache-008 ] && T=0.08
      stage "$s" 300 python3 -m engine.bench --res 1024 --steps 28 --runs 2 --preset fp8-compile-fastacc \
        --cache "fbcache:$T" --cache-dir /tmp/fe-cache --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    cache-fbcache-graphs)
      # First-Block Cache at threshold 0 on the fastest preset (the blocks after the second replayed as a CUDA graph):
      # its cost a full step against itself paused and, in a second process, against the whole-forward graph
      stage "$s" 300 python3 -m engine.bench --res 1024 --steps 28 --runs 2 --preset fp8-compile-fastacc-cudagraphs \
        --cache fbcache:0 --cache-dir /tmp/fe-cache --out "$OUT/bench-$s-$CARD-$DAY.json"
      stage "$s-plain" 200 python3 -m engine.bench --res 1024 --steps 28 --runs 2 --no-baseline \
        --preset fp8-compile-fastacc-cudagraphs --cache-dir /tmp/fe-cache --out "$OUT/bench-$s-plain-$CARD-$DAY.json" ;;
    tests-fbcache-graphs)
      stage "$s" 150 python3 -m pytest -q -m gpu tests/test_step_cache.py tests/test_compile.py ;;
    profile-cache)
      # FBCache's cost per full step: step time against kernel time, paused and cached (benchmarks/profile_cache.py)
      stage profile-cache 240 python3 -m benchmarks.profile_cache --res 1024 --preset fp8-compile-fastacc \
        --out "$OUT/profile-cache-$CARD-$DAY.json" ;;
    tests-fp8attn)
      stage tests-fp8attn 300 python3 -m pytest -q tests/kernels/test_fp8_attention.py tests/kernels/test_qk_norm_rope.py \
        tests/kernels/test_flash_attention.py tests/test_engine_attention.py ;;
    kernels-attention)
      # issue "Our attention at the top": bf16 and quantised attention beside every SDPA backend, and the quantised
      # one's accuracy on FLUX-like activations
      stage kernels-attention 420 python3 -m benchmarks.kernels.bench_flash_attention \
        --out "$OUT/attention-$CARD-$DAY.json" ;;
    cudnn-attention)
      # issue "Our attention at the top": cuDNN's fp8 SDPA (flux_kernels.cudnn_attention) beside our cores and
      # cuDNN's bf16 one at FLUX's long lengths, and its accuracy on FLUX-like activations
      stage cudnn-attention 420 python3 -m benchmarks.kernels.bench_flash_attention --lengths 4608 8704 16896 \
        --out "$OUT/attention-cudnn-$CARD-$DAY.json" ;;
    tests-cudnn) stage tests-cudnn 240 python3 -m pytest -q tests/kernels/test_cudnn_attention.py ;;
    cudnn-plans)
      # every execution plan cuDNN offers for the fp8 SDPA graph (heuristics A, B, fallback, then each engine's knobs),
      # timed at 4608 / 8704 / 16896 tokens beside the plan the engine runs (heuristic A's first)
      stage cudnn-plans 330 python3 -m benchmarks.kernels.bench_cudnn_plans --lengths 4608 8704 16896 --budget 90 \
        --out "$OUT/cudnn-plans-$CARD-$DAY.json" ;;
    fp8-lora-gemm)
      # our fp8 GEMM with the LoRA update in its epilogue against cuBLAS + the in-place addmm_ (issue "LoRA")
      stage tests-fp8-lora-gemm 150 python3 -m pytest -q tests/kernels/test_fp8_lora_gemm.py
      stage fp8-lora-gemm 480 python3 -m benchmarks.kernels.bench_fp8_lora_gemm \
        --out "$OUT/fp8-lora-gemm-$CARD-$DAY.json" ;;
    gelu-ab)
      # gelu_concat_fp8 against another version of kernels/gelu_fp8.py: GELU_BASELINE names that file, in the working
      # tree sent to the GPU machine (it has no git: `git show REV:kernels/gelu_fp8.py > gelu_before.py` here first)
      if [ -f "${GELU_BASELINE:-}" ]; then
        stage gelu-ab 240 python3 -m benchmarks.kernels.bench_gelu_fp8 --baseline "$GELU_BASELINE" \
          --out "$OUT/gelu-ab-$CARD-$DAY.json"
      else
        echo "===== gelu-ab skipped: GELU_BASELINE='${GELU_BASELINE:-}' is not a file" | tee -a "$LOG"
        SUMMARY+=("gelu-ab skipped")
      fi ;;
    profile-vae)
      # the VAE decode's largest kernels (eager, compiled as the engine does) and its mid-block attention's backends
      stage profile-vae 300 python3 -m benchmarks.profile_vae --res 1024,2048 --out "$OUT/profile-vae-$CARD-$DAY.json" ;;
    profile-vae-chunked)
      # the decode, eager and compiled, as diffusers runs it and with the engine's VAE kernels (PSNR of each against
      # diffusers' eager decode)
      stage profile-vae-chunked 300 python3 -m benchmarks.profile_vae --res 1024,2048 --no-backends \
        --out "$OUT/profile-vae-chunked-$CARD-$DAY.json" ;;
    profile-vae-eager)
      # the same, eager decodes only (no compiles): diffusers', the engine's kernels NCHW and channels_last
      stage profile-vae-eager 200 python3 -m benchmarks.profile_vae --res 1024,2048 --no-backends --eager-only \
        --out "$OUT/profile-vae-eager-$CARD-$DAY.json" ;;
    profile-encode)
      # where encode_prompt's time goes (CLIP + T5-XXL at 512 tokens): wall vs kernel time, T5's weight dtypes
      stage profile-encode 150 python3 -m benchmarks.profile_encode --out "$OUT/profile-encode-$CARD-$DAY.json" ;;
    tests-vae-kernels) stage tests-vae-kernels 240 python3 -m pytest -q tests/test_vae_kernels.py \
        tests/kernels/test_group_norm.py tests/kernels/test_residual_add.py tests/kernels/test_upsample_nearest.py ;;
    taylorseer-compiledvae)
      # issue "Step caching": TaylorSeer interval 5, 28 steps, 1024^2 and 2048^2, on the opt-in compiled-VAE preset,
      # beside the same preset uncached and diffusers with its own TaylorSeer (same process)
      stage "$s" 480 python3 -m engine.bench --res 1024 2048 --steps 28 --runs 2 \
        --preset fp8-compile-fastacc-cudagraphs-cudnnattn-compiledvae --cache taylorseer:5 --cache-dir /tmp/fe-cache \
        --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    tests-gelu-cudnn) stage tests-gelu-cudnn 240 python3 -m pytest -q -m gpu tests/kernels/test_gelu_fp8.py \
        tests/kernels/test_cudnn_attention.py ;;
    cudnn-1024|cudnn-2048)
      # the fastest preset with cuDNN's fp8 attention core beside the fastest preset and diffusers, same process
      # (at 2048^2 the cuDNN preset first: its peak memory without another preset's run before it)
      presets=fp8-compile-fastacc-cudagraphs,fp8-compile-fastacc-cudagraphs-cudnnattn
      [ "$s" = cudnn-2048 ] && presets=fp8-compile-fastacc-cudagraphs-cudnnattn,fp8-compile-fastacc-cudagraphs
      stage "$s" 420 python3 -m engine.bench --res "${s#cudnn-}" --steps 4 --runs 3 --cache-dir /tmp/fe-cache \
        --preset "$presets" --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    cudnn-taylorseer)
      # issue "Step caching" with cuDNN's attention core: 28-step images, TaylorSeer interval 5 (8 of 28 full), beside
      # the same preset uncached (same process) and diffusers with its own TaylorSeer
      stage "$s" 420 python3 -m engine.bench --res 1024 2048 --steps 28 --runs 2 \
        --preset fp8-compile-fastacc-cudagraphs-cudnnattn --cache taylorseer:5 --cache-dir /tmp/fe-cache \
        --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    tests-guards) stage tests-guards 150 python3 -m pytest -q -m gpu tests/test_block_guards.py ;;
    generate-kontext)
      # the README's Kontext example as a user runs it (the fastest preset the planner picks, 28 steps, 1024^2), timed
      python3 -c "import numpy as np; from PIL import Image; Image.fromarray(np.random.default_rng(0).integers(0, 256, \
        (1024, 1024, 3), dtype=np.uint8)).save('/tmp/in.png')"
      stage "$s" 300 bash -c "time python3 -m engine.generate 'make it snow' --task kontext --image /tmp/in.png \
        --res 1024 --steps 28 -o '$OUT/$s-$CARD-$DAY.png'" ;;
    probe-state)
      # state a captured CUDA graph bakes in, changed between calls through diffusers' / PEFT's / torch's APIs
      # (benchmarks/probe_graph_state.py): each image after the change against one captured under it
      stage "$s" 300 env OUT="$OUT" python3 -m benchmarks.probe_graph_state ;;
    probe-release)
      # whether an optimised pipeline's transformer is freed once the pipeline is dropped (benchmarks/probe_release.py)
      stage "$s" 240 env OUT="$OUT" python3 -m benchmarks.probe_release ;;
    probe-from-pipe)
      # a pipeline built over one optimize() gave an offload policy (benchmarks/probe_from_pipe.py)
      stage "$s" 200 env OUT="$OUT" python3 -m benchmarks.probe_from_pipe ;;
    tests-sweep)
      # every GPU test in one pass (nf4's need the bitsandbytes wheel, which the carry limit leaves out), the slowest
      # listed, a JUnit report under $OUT; SWEEP_FILES="tests/a.py tests/b.py" for a part (the whole took > 450 s)
      # shellcheck disable=SC2086
      stage "$s" 540 python3 -m pytest -q -m gpu ${SWEEP_FILES:-tests} -k "not nf4" --durations=15 -p no:cacheprovider \
        --junitxml "$OUT/gpu-tests-$CARD-$DAY.xml" ;;
    cudnn-lora-28)
      # issue "LoRA": the 28-step 1024x1024 image with the rank-64 adapter active on the cuDNN-attention preset
      stage "$s" 240 python3 -m engine.bench --res 1024 --steps 28 --runs 2 --lora synthetic:64 \
        --preset fp8-compile-fastacc-cudagraphs-cudnnattn --cache-dir /tmp/fe-cache --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    cudnn-lora-2048)
      # issue "LoRA": the rank-64 adapter's cost a 2048x2048 step on the cuDNN-attention preset (without it, then with
      # it, in one process) beside diffusers with the same adapter
      stage "$s" 300 python3 -m engine.bench --res 2048 --steps 4 --runs 2 --lora synthetic:64 \
        --preset fp8-compile-fastacc-cudagraphs-cudnnattn --cache-dir /tmp/fe-cache --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    cudnn-startup)
      # the cuDNN-attention preset's start: cold and warm processes, then the next size (issue "Our attention at the
      # top", item 4); its artefacts under $OUT/artifacts, to ship in engine/compiled/ beside the fastest preset's
      stage "$s" 330 python3 -m benchmarks.startup --preset fp8-compile-fastacc-cudagraphs-cudnnattn --sizes 1024 \
        1360x768 --runs tables:cold,tables:warm --artifacts-out "$OUT/artifacts" --out "$OUT/startup-$s-$CARD-$DAY.json" ;;
    tokens-8704)
      # Kontext's 8,704 tokens two ways on the cuDNN preset, each beside diffusers: text-to-image at 1024x2048 (8,192
      # image + 512 text tokens) and the 1024^2 Kontext edit; a lower Kontext ratio would be Kontext's own cost
      stage "$s-t2i" 240 python3 -m engine.bench --res 1024x2048 --steps 4 --runs 3 --cache-dir /tmp/fe-cache \
        --preset fp8-compile-fastacc-cudagraphs-cudnnattn --out "$OUT/bench-$s-t2i-$CARD-$DAY.json"
      stage "$s-kontext" 240 python3 -m engine.bench --task kontext --res 1024 --steps 4 --runs 3 --cache-dir \
        /tmp/fe-cache --preset fp8-compile-fastacc-cudagraphs-cudnnattn --out "$OUT/bench-$s-kontext-$CARD-$DAY.json" ;;
    cudnn-kontext)
      # the same two presets on the Kontext edit (8704 tokens at 1024^2) beside diffusers' FluxKontextPipeline
      stage "$s" 300 python3 -m engine.bench --task kontext --res 1024 --steps 4 --runs 3 --cache-dir /tmp/fe-cache \
        --preset fp8-compile-fastacc-cudagraphs,fp8-compile-fastacc-cudagraphs-cudnnattn \
        --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    fp8attn-1024|fp8attn-2048)
      # the whole step with the quantised attention core, beside the same presets with the bf16 core, and diffusers
      stage "$s" 420 python3 -m engine.bench --res "${s#fp8attn-}" --steps 4 --runs 3 --cache-dir /tmp/fe-cache \
        --preset fp8-compile-fastacc-cudagraphs,fp8-compile-fastacc-cudagraphs-fp8attn,kernels-compile,kernels-compile-fp8attn \
        --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    tune-table)
      # flux_kernels.tuning's table for this card: every size class of FLUX's token counts (256 .. 32768 tokens) timed
      # again by the presets whose kernels the fast presets run; kept in $OUT/tuned/ and, for the stages after this
      # one, in kernels/tuned/ (commit it from $OUT)
      rm -rf /tmp/fe-tune && mkdir -p "$OUT/tuned" kernels/tuned
      stage tune-table 300 env FLUX_KERNELS_TUNING=retune FLUX_KERNELS_TUNING_DIR=/tmp/fe-tune/kernel-tuning \
        python3 -m engine.bench --res 256 512 640 1024 1152 1536 2048 --steps 1 --runs 1 --warmup 0 --no-baseline \
        --cache-dir /tmp/fe-tune --preset kernels,fp8,kernels-compile-fp8attn --out "$OUT/tune-table-$CARD-$DAY.json"
      cp /tmp/fe-tune/kernel-tuning/*.json "$OUT/tuned/" && cp /tmp/fe-tune/kernel-tuning/*.json kernels/tuned/ ;;
    startup|startup-tables|startup-nographs)
      # cold start, warm start and each new size's first call, each run a fresh process, tuning per process (as
      # before flux_kernels.tuning) against the tables (benchmarks/startup.py); startup-tables: the tables only;
      # startup-nographs: the issue's case (fp8-compile-fastacc, no CUDA graph), cold, per process and tables
      preset=fp8-compile-fastacc-cudagraphs runs=per-process:cold,per-process:warm,tables:cold,tables:warm
      [ "$s" = startup-tables ] && runs=tables:cold,tables:warm
      [ "$s" = startup-nographs ] && preset=fp8-compile-fastacc runs=per-process:cold,tables:cold
      stage "$s" 480 python3 -m benchmarks.startup --preset "$preset" --runs "$runs" --out "$OUT/$s-$CARD-$DAY.json" ;;
    tests-startup)
      stage tests-tuning 100 python3 -m pytest -q tests/kernels/test_tuning.py
      stage tests-graphs 200 python3 -m pytest -q -m gpu tests/test_compile.py tests/test_step_cache.py tests/test_lora.py \
        tests/test_tasks.py ;;
    tests-controlnet-graphs)
      # FluxControlNetPipeline under compile.cuda_graphs: the residuals as inputs of the transformer's graph
      stage tests-controlnet-graphs 150 python3 -m pytest -q -m gpu tests/test_controlnet.py tests/test_compile.py \
        -k "cuda_graph or new_size" ;;
    gluon-kernels)
      # the Gluon attention core (issue "Our attention at the top"): its GPU tests, the kernel table with its rows
      stage tests-gluon 150 python3 -m pytest -q -m gpu tests/kernels/test_fp8_attention_gluon.py
      stage gluon-kernels 200 python3 -m benchmarks.kernels.bench_flash_attention --out "$OUT/attention-gluon-$CARD-$DAY.json" ;;
    gluon-step)
      # the whole step with the quantised core on Gluon (GLUON_CORE, default 'gluon'; beside diffusers and the
      # bf16-core preset) and on the Triton kernel, one process each
      mkdir -p /tmp/gluon-ab
      stage gluon-step 200 env FLUX_KERNELS_FP8_ATTENTION_CORE="${GLUON_CORE:-gluon}" python3 -m engine.bench --res 1024 2048 \
        --steps 4 --runs 3 --preset fp8-compile-fastacc-cudagraphs,fp8-compile-fastacc-cudagraphs-fp8attn \
        --cache-dir /tmp/fe-cache --out "/tmp/gluon-ab/gluon-step-gluon-$CARD-$DAY.json"
      stage triton-step 150 env FLUX_KERNELS_FP8_ATTENTION_CORE=triton python3 -m engine.bench --res 1024 2048 --steps 4 \
        --runs 3 --preset fp8-compile-fastacc-cudagraphs-fp8attn --no-baseline --cache-dir /tmp/fe-cache \
        --out "/tmp/gluon-ab/gluon-step-triton-$CARD-$DAY.json"
      cp /tmp/gluon-ab/*.json "$OUT"/ ;;
    main-1024|main-2048)
      # the README's main command as a user runs it: no --preset, so diffusers against the fastest config here
      stage "$s" 400 python3 -m engine.bench --res "${s#main-}" --out "$OUT/bench-$s-$CARD-$DAY.json" ;;
    *) echo "unknown stage $s" | tee -a "$LOG" ;;
  esac
done

echo "===== summary"
printf '%s\n' "${SUMMARY[@]}"
