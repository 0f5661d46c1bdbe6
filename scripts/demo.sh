#!/usr/bin/env bash
# `make demo`: the whole flow on this host, then everything stopped. An orchestrator on loopback, a pool in
# a temporary root with the default model (the file `make model` fetched), a CPU worker spawned by rbees-pool
# that registers through its ready callback, and an answer streamed through the orchestrator by `rbees infer`.
set -euo pipefail
VENV_BIN=${VENV_BIN:-.venv/bin}
MODEL_FILE=${MODEL_FILE:?the GGUF file to serve}
PROMPT=${PROMPT:-The capital of France is}
PY="$VENV_BIN/python"
MODEL_ID=smollm2-local
PORT=${ORCD_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
ORCD="http://127.0.0.1:$PORT"
WORK=$(mktemp -d)
POOL=("$VENV_BIN/rbees-pool" --root "$WORK/pool")
ORCD_PID=

cleanup() {
    "${POOL[@]}" worker stop-all >/dev/null 2>&1 || true
    if [ -n "$ORCD_PID" ]; then kill -TERM "$ORCD_PID" 2>/dev/null || true; wait "$ORCD_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# Until GET $1 answers 200 and its body holds $2 (30 s at most).
wait_for() {
    "$PY" - "$1" "$2" <<'EOF'
import sys, time, httpx
url, needle = sys.argv[1:]
for _ in range(300):
    try:
        r = httpx.get(url, timeout=2)
        if r.status_code == 200 and needle in r.text:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.1)
sys.exit(f"error: {url} did not show {needle!r} within 30 s")
EOF
}

echo "--- rbees-orcd --bind 127.0.0.1:$PORT"
"$VENV_BIN/rbees-orcd" --bind "127.0.0.1:$PORT" --db "$WORK/orcd.sqlite" --log-level WARNING 2>"$WORK/orcd.log" &
ORCD_PID=$!
wait_for "$ORCD/health" '"status"' || { cat "$WORK/orcd.log" >&2; exit 1; }
echo "--- rbees-pool: register and download the default model, spawn a CPU worker that calls the orchestrator back"
# the built-in entry smollm2-135m would fetch the same file again from PyPI: this one takes the local copy
"${POOL[@]}" models register "$MODEL_ID" --name "SmolLM2 135M Instruct (Q4_1), local" --source "file://$MODEL_FILE" \
    >/dev/null
"${POOL[@]}" models download "$MODEL_ID" --quiet
"${POOL[@]}" worker spawn cpu --model "$MODEL_ID" --slots 2 --callback-url "$ORCD/v2/workers/ready"
wait_for "$ORCD/v1/models" "$MODEL_ID"
echo "--- rbees infer --orcd $ORCD --model $MODEL_ID \"$PROMPT\""
"$VENV_BIN/rbees" infer --orcd "$ORCD" --model "$MODEL_ID" --max-tokens 32 --temperature 0 "$PROMPT"
