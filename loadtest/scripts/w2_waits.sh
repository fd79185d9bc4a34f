#!/usr/bin/env bash
# One W2 run (100 clients x 10 symbols, RATE ticks/s in) with the server on core 0 and the
# client on core 1, then the server's own wait histograms read from /metrics before it stops:
# how long ticks waited in the priority queue (ingest_to_dispatch), ingest to socket write,
# and store commit time; then the kernel's TCP retransmissions and loss probes during the run
# (`nstat`, when installed), which mark a tail the loopback made rather than the server.
# Used to place the occasional W2 tail stall (docs/benchmarks.md).
#   RATE=60000 BIN=target/release/tickfan loadtest/scripts/w2_waits.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/tickfan}
LT=target/release/tickfan-loadtest
DATA=$(mktemp -d)
OUT=$(mktemp)
taskset -c 0 "$BIN" serve --listen 127.0.0.1:0 --no-simulator --data-dir "$DATA" >"$OUT" 2>/dev/null &
SPID=$!
trap 'kill $SPID 2>/dev/null; wait $SPID 2>/dev/null; rm -rf "$DATA" "$OUT"' EXIT
for _ in $(seq 200); do grep -q listening "$OUT" && break; sleep 0.05; done
PORT=$(grep -o '[0-9]*$' "$OUT" | head -1)
NSTAT=$(command -v nstat || true)
[ -n "$NSTAT" ] && "$NSTAT" -n >/dev/null
taskset -c 1 "$LT" --url "ws://127.0.0.1:$PORT" --server-pid "$SPID" -c 100 --symbols 10 -k 10 \
  -r "${RATE:-60000}" --batch-ms 1 --read-buffer-kb 64 -d "${DUR:-10}" -q 2>/dev/null | grep -E "^(seq|latency|server) "
curl -s "http://127.0.0.1:$PORT/metrics" \
  | grep -E '^tickfan_(ingest_to_dispatch|ingest_to_write|store_commit)_seconds_(bucket\{le="(0.005|0.01|0.025|0.05)"\}|count)'
if [ -n "$NSTAT" ]; then
  # Without -a, nstat prints what changed since the `nstat -n` above (zeros are left out).
  echo "tcp during the run: $("$NSTAT" 2>/dev/null | awk '{n[$1] = $2} END {printf "TcpRetransSegs %d, TcpExtTCPLossProbes %d", n["TcpRetransSegs"], n["TcpExtTCPLossProbes"]}')"
fi
