#!/usr/bin/env bash
# `make demo`: the whole flow on this host, then everything stopped. An orchestrator on loopback, a pool in
# a temporary root with the default model (the file `make model` fetched), a CPU worker spawned by rbees-pool
# that registers through its ready callback, and an answer streamed through the orchestrator with curl.
set -euo pipefail
VENV_BIN=${VENV_BIN:-.venv/bin}
MODEL_FILE=${MODEL_FILE:?}
PROMPT=${PROMPT:-The capital of France is}
PORT=${ORCD_PORT:-18080}
WORK=$(mktemp -d)
ORCD_PID=
cleanup() {
    "$VENV_BIN/rbees-pool" --root "$WORK/pool" worker stop-all >/dev/null 2>&1 || true
    if [ -n "$ORCD_PID" ]; then kill -TERM "$ORCD_PID" 2>/dev/null || true; wait "$ORCD_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
"$VENV_BIN/rbees-orcd" --bind "127.0.0.1:$PORT" --db "$WORK/orcd.sqlite" --log-level WARNING 2>"$WORK/orcd.log" &
ORCD_PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.1; done
POOL=("$VENV_BIN/rbees-pool" --root "$WORK/pool")
"${POOL[@]}" models register smollm2-135m --name "SmolLM2 135M Instruct (Q4_1)" --source "file://$MODEL_FILE" >/dev/null
"${POOL[@]}" models download smollm2-135m --quiet
"${POOL[@]}" worker spawn cpu --model smollm2-135m --slots 2 --callback-url "http://127.0.0.1:$PORT/v2/workers/ready"
for _ in $(seq 100); do curl -s "http://127.0.0.1:$PORT/v1/models" | grep -q smollm2-135m && break; sleep 0.1; done
echo "--- workers registered with the orchestrator:"
curl -s "http://127.0.0.1:$PORT/v2/workers"; echo
echo "--- streaming through the orchestrator (POST /v1/chat/completions, stream):"
BODY=$(printf '{"model":"smollm2-135m","messages":[{"role":"user","content":"%s"}],"max_tokens":48,"temperature":0,"stream":true}' "$PROMPT")
curl -sN "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' -d "$BODY" \
    | "$VENV_BIN/python" -c 'import json, sys
for line in sys.stdin:
    if line.startswith("data: {"):
        chunk = json.loads(line[6:])
        for choice in chunk["choices"]:
            print(choice["delta"].get("content") or "", end="", flush=True)
print()'
