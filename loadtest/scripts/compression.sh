#!/usr/bin/env bash
# Compression on/off with the bundled load tester: wire bytes and server CPU per delivery,
# memory per connection. Release builds; server and client each on the loaded 2-vCPU box.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/tickfan
LT=target/release/tickfan-loadtest
OUT=${OUT:-/tmp/deflate_runs}
mkdir -p "$OUT"
run() { # name, loadtest args...
  local name=$1; shift
  local dir; dir=$(mktemp -d)
  $BIN serve --listen 127.0.0.1:0 --no-simulator --data-dir "$dir" >"$OUT/$name.srv" 2>/dev/null &
  local pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$OUT/$name.srv" && break; sleep 0.1; done
  local addr; addr=$(sed -n 's/listening on http:\/\///p' "$OUT/$name.srv")
  echo "== $name ($(cut -d' ' -f1-3 /proc/loadavg))" | tee "$OUT/$name.txt"
  $LT --url "ws://$addr" --server-pid "$pid" -q "$@" >>"$OUT/$name.txt" 2>&1 || true
  curl -s "http://$addr/metrics" | grep -E "^tickfan_(messages_sent_total|sent_bytes_total|deflate_[a-z_]+|messages_queued_total) " >>"$OUT/$name.txt" || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  cat "$OUT/$name.txt"
}
run realtime_plain   -c 100 --symbols 100 -k 10 --rate 20000 --duration 10
run realtime_deflate -c 100 --symbols 100 -k 10 --rate 20000 --duration 10 --deflate
run batch_plain      -c 100 --symbols 100 -k 10 --rate 20000 --duration 10 --mode batch --interval-ms 100
run batch_deflate    -c 100 --symbols 100 -k 10 --rate 20000 --duration 10 --mode batch --interval-ms 100 --deflate
run idle_plain       -c 5000 --symbols 100 -k 10 --idle --duration 5
run idle_deflate     -c 5000 --symbols 100 -k 10 --idle --duration 5 --deflate
