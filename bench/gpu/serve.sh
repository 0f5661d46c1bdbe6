# One device call (`run` with carry [".whl", ".devdata"], command `bash bench/gpu/serve.sh`), or part of real_size.sh
# (SERVE=1): the serving path on the Qwen2.5-0.5B shape (Q4_K_M mix). The engine's own figures (cuda_bench.py,
# ENGINE=0 skips them; ENGINE_STEPS: their --steps, 64); BURST=1: the levels through the engine alone
# (bench/engine_burst.py: the HTTP figures' ceiling); then a CUDA worker (--slots 256) streamed over HTTP by
# bench/worker_http.py while py-spy samples it (SPY_S seconds), once per --step-tokens of STEP_TOKENS (default: the
# worker's), then (ORCD=1) rbees-orcd in front of that worker and in front of bench/orcd_relay.py's synthetic source.
# The worker's serving stack is not on the device: make .whl with `device-prep.sh MODEL orjson uvloop httptools py-spy`.
[ -n "$NUMBA_CACHE_DIR" ] || source bench/gpu/setup.sh
R=$PWD; M=/root/m/q05.gguf
[ -f $M ] || python3 bench/gguf_shapes.py --shape qwen2.5-0.5b --mix q4_k_m --out $M --vocab-from $R/${VOCAB:-.devdata/vocab.gguf} | tail -1
if [ "${ENGINE:-1}" = 1 ]; then
  echo "== engine 0.5B"; timeout 150 python3 bench/cuda_bench.py $M --batches ${ENGINE_BATCHES:-1,16,64,256} --steps ${ENGINE_STEPS:-64} --repeat 3 --json 2>&1 | tail -1 | tee $OUT/engine_q05.log
fi
if [ "${BURST:-0}" = 1 ]; then
  echo "== engine burst 0.5B"; timeout 240 python3 bench/engine_burst.py $M --backend cuda --levels ${LEVELS:-1,16,64,256} \
    --max-tokens 128 --rounds ${ROUNDS:-1} --json 2>&1 | tail -1 | tee $OUT/burst_q05.log
fi
for st in ${STEP_TOKENS:-default}; do  # (STEP_TOKENS="512 2048": a worker of each --step-tokens in turn)
python3 -m rbees_workerd.cli serve --worker-id g --model $M --port 8188 --slots 256 --context-length 512 \
  --backend cuda --log-level WARNING $([ $st = default ] || echo --step-tokens $st) > $OUT/worker_$st.log 2>&1 &
WPID=$!; W0=$(date +%s)
for i in $(seq ${READY_S:-150}); do python3 -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:8188/health').json()['state'] != 'Ready')" 2>/dev/null && break; sleep 1; done
echo "worker (--step-tokens $st) Ready after $(( $(date +%s) - W0 )) s"
SPY=/root/dev/site/bin/py-spy  # (carried in .whl) the worker's stacks while the streams run, for the serving path's profile
SPID=; [ -x $SPY ] && [ -n "$SPY_S" ] && { timeout 100 $SPY record --nonblocking -r 100 -d $SPY_S -f raw -o $OUT/worker_spy.txt \
  --pid $WPID >/dev/null 2>&1 & SPID=$!; }  # (it writes its file when its -d ends: the worker must live until then)
echo "== HTTP"; timeout 120 python3 bench/worker_http.py --url http://127.0.0.1:8188 --levels ${LEVELS:-1,16,64,256} --max-tokens 128 \
  --rounds ${ROUNDS:-1} --no-engine --json 2>&1 | tail -3 | tee $OUT/http_q05_$st.log
if [ -n "$ORCD" ]; then
  echo "== orcd, GPU worker"; timeout 150 python3 bench/orcd_relay.py --worker http://127.0.0.1:8188 --tokens 128 \
    --rounds ${ORCD_ROUNDS:-3} 2>&1 | tail -16 | tee $OUT/orcd_gpu.log
fi
[ -n "$SPID" ] && wait $SPID
kill $WPID 2>/dev/null; wait $WPID 2>/dev/null
done
if [ -n "$ORCD" ]; then
  echo "== orcd, synthetic source"; timeout 120 python3 bench/orcd_relay.py --rounds ${ORCD_ROUNDS:-3} 2>&1 | tail -16 | tee $OUT/orcd_synthetic.log
fi
