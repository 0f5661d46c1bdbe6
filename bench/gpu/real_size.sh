# One device call (`run` with carry [".whl", ".devdata", ".llama-src"], command `bash bench/gpu/real_size.sh`):
# rbees and llama.cpp on the Llama-3.1-8B and Qwen2.5-0.5B shapes in the Q4_K_M mix, same card; the serving
# path (a CUDA worker over HTTP against the engine) and the real-GPU kernel tests while llama.cpp builds.
# .devdata/vocab.gguf: a vocabulary-only GGUF of SmolLM2 (`python bench/gguf_shapes.py --vocab-only --out .devdata/vocab.gguf`).
# BUDGET: seconds this script may take (the call's device time left, less the machine's start). TEST_S, TEST_N, TESTS:
# the tests' time limit, pytest-xdist processes (carry its wheels) and -k selection; SERVE=1: bench/gpu/serve.sh;
# Q05_S: the 0.5B run's time limit (its kernels compile on a cold cache); WARM=N: N warm starts of an 8B worker (after
# llama.cpp's 8B figures, WARM_S seconds at most);
# ALT_FILES: the .alt tree's models (l8b q05; their batches B8, B05); LLAMA_R: llama-bench's repetitions;
# ENVS: space-separated NAME=VALUE[@NAME=VALUE] settings the 8B is run under again; ARGS8 / ARGS05: space-separated
# cuda_bench.py options (@ between several) the 8B's batches B8A (64) / the 0.5B's B05A (64,256) are run with again;
# SWEEP: tuning variants of the one-token product on the 8B shape. BENCH_8B / BENCH_05: cuda_bench.py options of the
# main 8B / 0.5B runs (e.g. --sweep NAME=V1,V2: each combination's decode on the one load); S8: the 8B run's limit. TEST_N above 2 starves llama.cpp's build
# (2026-12-06: unfinished after 6 minutes beside `-n 8`). ALT: a second tree to time beside this one in the same
# call (`mkdir .alt && git archive BRANCH | tar -x -C .alt`, `/.alt/` in .git/info/exclude, carry ".alt").
source bench/gpu/setup.sh
R=$PWD; T0=$(date +%s); left() { echo $(( ${BUDGET:-450} - ($(date +%s) - T0) )); }
V=$R/${VOCAB:-.devdata/vocab.gguf}
cd /root/m
[ -f l8b.gguf ] || (time python3 $R/bench/gguf_shapes.py --shape llama-3.1-8b --mix q4_k_m --out l8b.gguf --vocab-from $V) 2>&1 | tail -4 | tee $OUT/gen.log
[ -f q05.gguf ] || python3 $R/bench/gguf_shapes.py --shape qwen2.5-0.5b --mix q4_k_m --out q05.gguf --vocab-from $V 2>&1 | tail -1
cd $R
echo "== tests"; REQUIRE_REAL_GPU=1 timeout ${TEST_S:-170} python3 -m pytest -q -p no:cacheprovider ${TEST_N:+-n $TEST_N} \
  tests/test_cuda_kernels.py tests/test_architectures.py::test_cuda_matches_cpu -k "${TESTS:-not nothing}" > /root/tests.log 2>&1
grep -E "^(FAILED|ERROR)|^E  |passed|failed" /root/tests.log | head -40  # (the output: a call brings back 8 files)
echo "== rbees 8B"; timeout ${S8:-150} python3 bench/cuda_bench.py /root/m/l8b.gguf --batches ${B8:-1,64} --steps 64 --repeat 3 --json $BENCH_8B 2>&1 | tail -2 | tee $OUT/rbees_l8b.log
for a in ${SWEEP:-}; do  # tuning variants of the one-token product, batch 1 (e.g. SWEEP="--fetch-regs=40 --long-block-warps=8")
  echo "== rbees 8B $a"; timeout 90 python3 bench/cuda_bench.py /root/m/l8b.gguf --batches 1 --steps 64 --repeat 3 --json $a 2>&1 | tail -1 | tee -a $OUT/sweep_l8b.log
done
for v in ${ENVS:-}; do  # the 8B again under environment settings (e.g. ENVS="NAME=VALUE@OTHER=VALUE"), same tree and cache
  echo "== rbees 8B $v"; env ${v//@/ } timeout 150 python3 bench/cuda_bench.py /root/m/l8b.gguf --batches ${B8:-1,64} --steps 64 --repeat 3 --json 2>&1 | tail -1 | tee -a $OUT/envs_l8b.log
done
for a in ${ARGS8:-}; do  # the 8B's batches again with options of cuda_bench.py (e.g. ARGS8="--hmma-min-tokens=33")
  echo "== rbees 8B $a"; timeout 150 python3 bench/cuda_bench.py /root/m/l8b.gguf --batches ${B8A:-64} --steps 64 --repeat 3 --json ${a//@/ } 2>&1 | tail -1 | tee -a $OUT/args_l8b.log
done
if [ -d .alt ]; then  # the other tree's engine on the same files, same call
  for f in ${ALT_FILES:-l8b q05}; do echo "== alt $f"; b=$B05; [ $f = l8b ] && b=$B8
    (cd .alt && PYTHONPATH=/root/dev/site:$R/.alt timeout 150 python3 bench/cuda_bench.py \
    /root/m/$f.gguf --batches ${b:-1,64} --steps 64 --repeat 3 --json 2>&1 | tail -1 | tee -a $OUT/alt.log); done
fi
echo "== rbees 0.5B"; timeout ${Q05_S:-80} python3 bench/cuda_bench.py /root/m/q05.gguf --batches ${B05:-1,64,256} --steps 64 --repeat 3 --json $BENCH_05 2>&1 | tail -2 | tee $OUT/rbees_q05.log
for a in ${ARGS05:-}; do  # the same for the 0.5B (its batches B05A)
  echo "== rbees 0.5B $a"; timeout 120 python3 bench/cuda_bench.py /root/m/q05.gguf --batches ${B05A:-64,256} --steps 64 --repeat 3 --json ${a//@/ } 2>&1 | tail -1 | tee -a $OUT/args_q05.log
done
[ -n "$SERVE" ] && bash bench/gpu/serve.sh
[ -d /root/llama ] || { echo "left $(left) (no llama.cpp: .llama-src not carried)"; exit 0; }
while [ ! -f /root/build.rc ] && [ $(left) -gt 50 ]; do sleep 2; done; echo "build rc $(cat /root/build.rc 2>/dev/null) left $(left)"
B=/root/llama/llama.cpp/build/bin
timeout $(( $(left) / 3 )) $B/llama-bench -m /root/m/l8b.gguf -ngl 99 -fa 1 -p 512 -n 128 -r ${LLAMA_R:-2} 2>&1 | grep -E "pp|tg" | tee $OUT/llama_l8b.log
timeout $(( $(left) / 3 )) $B/llama-batched-bench -m /root/m/l8b.gguf -ngl 99 -fa on -npp 128 -ntg 128 -npl 1,64 -c 17000 2>&1 | grep -E "^\|" | tee -a $OUT/llama_l8b.log
if [ -n "$WARM" ]; then  # the 8B worker's start to Ready on the Numba cache the benchmarks filled (after the
  echo "== warm start 8B"  # 8B's llama.cpp figures: its first start may compile what they did not)
  timeout ${WARM_S:-150} python3 bench/worker_start.py --model /root/m/l8b.gguf --backend cuda --slots 4 \
    --cache-dir $NUMBA_CACHE_DIR --warm ${WARM} --json 2>&1 | tail -1 | tee $OUT/start_l8b.log
fi
timeout $(( $(left) / 2 )) $B/llama-bench -m /root/m/q05.gguf -ngl 99 -fa 1 -p 512 -n 128 -r ${LLAMA_R:-2} 2>&1 | grep -E "pp|tg" | tee $OUT/llama_q05.log
timeout $(( $(left) - 3 )) $B/llama-batched-bench -m /root/m/q05.gguf -ngl 99 -fa on -npp 128 -ntg 128 -npl 1,64,256 -c 66000 2>&1 | grep -E "^\|" | tee -a $OUT/llama_q05.log
echo "left $(left)"
