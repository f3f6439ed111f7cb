#!/usr/bin/env bash
# `ultramem serve` end to end on 127.0.0.1 with a tiny trained model: curl (completions, streaming, chat,
# the error cases), the official OpenAI JavaScript client (tests/serve/openai_client.mjs), a load test
# (64 concurrent clients x 8 requests, outputs equal to the same requests one at a time), a client that
# leaves mid-stream, bad flags, SIGTERM (in-flight request finishes, exit status 0), and
# `bench serve --quick`.
# Usage: serve_smoke.sh PATH/TO/ultramem     (node and tests/serve/node_modules: scripts/setup.sh)
set -euo pipefail
um="$1"
here="$(cd "$(dirname "$0")" && pwd)"
work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill -9 "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
fail() {
  echo "FAIL: $*" >&2
  [ -f "$work/serve.log" ] && tail -20 "$work/serve.log" >&2
  exit 1
}
command -v node >/dev/null || fail "node is missing (bash scripts/setup.sh installs it)"
[ -d "$here/serve/node_modules/openai" ] || fail "tests/serve/node_modules/openai is missing (bash scripts/setup.sh installs it)"

# A tiny model: 12 training steps on a repetitive corpus; a context of 1100 so a stream can run long.
mkdir -p "$work/corpus"
for d in 1 2 3 4 5 6; do
  for i in $(seq 1 100); do
    echo "The people of district $d will vote on measure $((i % 7)) in the spring session."
  done > "$work/corpus/doc$d.txt"
done
"$um" prepare --input "$work/corpus" --out "$work/data" --vocab 300 --val-fraction 0.25 >/dev/null
cat > "$work/model.json" <<'JSON'
{"model": {"name": "serve-tiny", "vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 1100,
           "ffn_hidden": 64, "ffn": ["dense", "moe"], "moe": {"num_experts": 4, "top_k": 2},
           "memory": {"kind": "ultramem", "placement": "1:2",
                      "ultramem": {"n": 8, "E": 4, "Dk": 8, "Dv": 16, "r": 2, "C": 2, "H": 2, "m": 4}}},
 "train": {"steps": 12, "batch_size": 4, "seq_len": 32, "lr": 0.003, "eval_every": 0, "log_every": 12,
           "checkpoint_every": 0}}
JSON
"$um" --threads 1 train "$work/model.json" --data "$work/data" --out "$work/run" >/dev/null

# Bad flags fail before serving, naming the flag.
if out=$("$um" serve "$work/run" --max-batch 0 2>&1); then fail "--max-batch 0 accepted"; fi
grep -q -- "--max-batch" <<<"$out" || fail "--max-batch 0: $out"
if out=$("$um" serve "$work/nothing" 2>&1); then fail "a missing model accepted"; fi
grep -qi "nothing" <<<"$out" || fail "missing model: $out"

# `bench serve --quick` on a tiny shape: JSON lines with the served and decode rates, every request
# answered in full, the chart; a bad --streams is refused.
"$um" --threads 1 bench serve --quick --config "$here/../configs/tiny-ultramem.json" --data "$work/data" \
  --plot "$work/bench" > "$work/bench.jsonl" 2>"$work/bench.err" || fail "bench serve --quick: $(cat "$work/bench.err")"
python3 - "$work/bench.jsonl" <<'PY' || fail "bench serve --quick output"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
cfg = [l["config"] for l in lines if "config" in l]
assert len(cfg) == 1 and cfg[0]["vocab"] == 300 and cfg[0]["sample_token_us"] > 0, cfg
cases = [l for l in lines if l.get("case") == "serve"]
assert sorted((c["kind"], c["streams"]) for c in cases) == sorted(
    (k, s) for k in ("ultramem", "moe", "dense") for s in (1, 4)), cases
for c in cases:
    assert c["failed_requests"] == 0 and c["completion_tokens"] == 8 * c["streams"], c
    assert c["served_tokens_per_second"] > 0 and c["decode_tokens_per_second"] > 0, c
    assert c["ratio"]["served_over_decode"] > 0 and 0 < c["server_step_share"] <= 1.5, c
    assert c["latency_p50_ms"] <= c["latency_p99_ms"] and c["first_token_p50_ms"] > 0, c
PY
[ -s "$work/bench/serve_tokens_per_second.png" ] || fail "bench serve --plot wrote no chart"
if out=$("$um" bench serve --streams 0 2>&1); then fail "bench serve --streams 0 accepted"; fi
grep -q -- "--streams" <<<"$out" || fail "bench serve --streams 0: $out"

start_server() {
  "$um" --threads 2 serve "$work/run" --port 0 --max-batch 64 --max-queue 512 "$@" 2>"$work/serve.log" &
  server_pid=$!
  for _ in $(seq 1 300); do
    port=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$work/serve.log" | grep -o '[0-9]*$' || true)
    [ -n "$port" ] && break
    kill -0 "$server_pid" 2>/dev/null || fail "the server exited at start"
    sleep 0.1
  done
  [ -n "$port" ] || fail "the server did not print its address"
  base="http://127.0.0.1:$port"
}
start_server
echo "serve_smoke: serving on $base"

# curl: status and body of each case.
post() {  # post PATH JSON -> sets code and body
  body=$(curl -s -w '\n%{http_code}' -H 'Content-Type: application/json' -d "$2" "$base$1")
  code=$(tail -n1 <<<"$body")
  body=$(sed '$d' <<<"$body")
}
post /v1/completions '{"model":"run","prompt":"The people","max_tokens":6,"temperature":0}'
[ "$code" = 200 ] || fail "completion: $code $body"
grep -q '"object":"text_completion"' <<<"$body" || fail "completion body: $body"
grep -q '"completion_tokens":' <<<"$body" || fail "completion usage: $body"
sse=$(curl -sN -H 'Content-Type: application/json' \
  -d '{"prompt":"The people","max_tokens":6,"temperature":0,"stream":true}' "$base/v1/completions")
grep -q '^data: {' <<<"$sse" || fail "stream: no data events: $sse"
[ "$(tail -n1 <<<"$sse")" = "data: [DONE]" ] || fail "stream does not end with [DONE]: $sse"
post /v1/chat/completions '{"messages":[{"role":"user","content":"The people"}],"max_tokens":6,"temperature":0}'
[ "$code" = 200 ] && grep -q '"role":"assistant"' <<<"$body" || fail "chat: $code $body"
for bad in '{"prompt":"x","max_tokens":-1}' '{"prompt":"x","temperature":"hot"}' '{"max_tokens":3}' '{"prompt":' \
           '{"prompt":"x","n":99}' '{"prompt":"x","stop":[1]}'; do
  post /v1/completions "$bad"
  [ "$code" = 400 ] || fail "$bad: expected 400, got $code $body"
  grep -q '"type":"invalid_request_error"' <<<"$body" || fail "$bad: not an OpenAI error body: $body"
done
post /v1/chat/completions '{"messages":[]}'
[ "$code" = 400 ] || fail "empty messages: $code"
long=$(printf 'The people %.0s' $(seq 1 1200))
post /v1/completions "{\"prompt\":\"$long\"}"
[ "$code" = 400 ] && grep -q 'context' <<<"$body" || fail "a prompt longer than the context: $code $body"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$base/health")" = 200 ] || fail "/health"
curl -s "$base/v1/models" | grep -q '"id":"run"' || fail "/v1/models does not list the run"
curl -s "$base/metrics" | grep -q '^ultramem_requests_total{endpoint="/v1/completions",status="400"} 7' \
  || fail "/metrics does not count the 400s: $(curl -s "$base/metrics" | grep requests_total)"

# The official OpenAI client, a client that leaves mid-stream, and the load test.
node "$here/serve/openai_client.mjs" "$base/v1" run || fail "openai_client.mjs"
node "$here/serve/sse_disconnect.mjs" "$base/v1" run || fail "sse_disconnect.mjs"
node "$here/serve/load_test.mjs" "$base/v1" run 64 8 || fail "load_test.mjs"

# SIGTERM: a request in flight finishes (200, all its tokens), new ones are refused, exit status 0.
curl -s -o "$work/inflight.json" -w '%{http_code}' -H 'Content-Type: application/json' \
  -d '{"prompt":"The people","max_tokens":900,"ignore_eos":true}' "$base/v1/completions" > "$work/inflight.code" &
curl_pid=$!
for _ in $(seq 1 200); do
  curl -s "$base/metrics" | grep -q '^ultramem_active_sequences 1' && break
  sleep 0.02
done
kill -TERM "$server_pid"
wait "$curl_pid" || true
rc=0
wait "$server_pid" || rc=$?
server_pid=""
[ "$rc" = 0 ] || fail "the server exited with $rc after SIGTERM"
[ "$(cat "$work/inflight.code")" = 200 ] || fail "the in-flight request got $(cat "$work/inflight.code") after SIGTERM"
grep -q '"completion_tokens":900' "$work/inflight.json" || fail "the in-flight request was cut: $(cat "$work/inflight.json")"
grep -q 'SIGTERM: draining' "$work/serve.log" || fail "no drain message"
grep -q '"event":"stopped"' "$work/serve.log" || fail "no stop line"
echo "serve_smoke: all checks passed"
