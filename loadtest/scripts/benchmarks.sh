#!/usr/bin/env bash
# Runs the load scenarios behind docs/benchmarks.md: the server pinned to core 0, the load
# generator to core 1, loopback only, each run bounded in time. Usage:
#   cargo build --release --workspace && loadtest/scripts/benchmarks.sh [scenario...]
# Scenarios: idle10k idle10k1 idle19k sparse wake10k realtime batch fleet fleetbatch throttled latency latency5 max max3m ingest import
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/tickfan
LT=target/release/tickfan-loadtest
OUT=${OUT:-target/bench-results}
mkdir -p "$OUT"

start_server() { # $1: extra serve args
  DATA=$(mktemp -d)
  taskset -c 0 "$BIN" serve --listen 127.0.0.1:0 --no-simulator --data-dir "$DATA" $1 >"$OUT/server.out" 2>"$OUT/server.err" &
  SPID=$!
  for _ in $(seq 100); do grep -q listening "$OUT/server.out" 2>/dev/null && break; sleep 0.05; done
  PORT=$(grep -o '[0-9]*$' "$OUT/server.out")
}
stop_server() { kill -TERM "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null || true; rm -rf "$DATA"; }
run() { # name, loadtest args...
  local name=$1; shift
  echo "== $name: tickfan-loadtest $*"
  taskset -c 1 "$LT" --url "ws://127.0.0.1:$PORT" --server-pid "$SPID" --json "$OUT/$name.json" "$@" 2>/dev/null | tee "$OUT/$name.txt"
}

scenario() {
  case $1 in
    idle10k)  start_server ""; run idle10k -c 10000 --idle -d ${IDLE_SECS:-10}; stop_server ;;
    idle10k1) start_server ""; run idle10k1 -c 10000 --idle -d 10 -k 1; stop_server ;;
    idle19k)  start_server ""; run idle19k -c 19000 --idle -d 20; stop_server ;;
    # Each connection gets a tick every ~10 s: it parks in between and resumes for each tick.
    sparse)   start_server ""; run sparse -c 10000 --symbols 1000 -k 1 -r 100 -d 30; stop_server ;;
    # 10,000 idle connections (10 of 100 symbols each) are held; once all are parked, five
    # bursts of one tick per symbol wake every one of them at once (100,000 deliveries a burst).
    # PARK_CONFIG=--config\ file.toml runs the same with other settings (e.g. park_after_ms = 0).
    wake10k)
      start_server "${PARK_CONFIG:-}"
      run wake10k -c 10000 --idle -d 16 &
      LTPID=$!
      # Every client subscribed, then (parking on) every connection parked.
      want='"clients":10000,'; [ -z "${PARK_CONFIG:-}" ] && want='"parked":10000[,}]'
      for _ in $(seq 300); do
        curl -s "127.0.0.1:$PORT/api/stats" | grep -q "$want" && break; sleep 0.1
      done
      sleep 3
      for burst in 1 2 3 4 5; do
        body=$(for i in $(seq 0 99); do printf '{"symbol":"LT%d","ts":%d,"price":%d,"volume":1},' "$i" "$(date +%s%3N)" "$((100 + burst))"; done)
        curl -s -o /dev/null -w "burst $burst: HTTP %{http_code}\n" -H 'content-type: application/json' \
          --data "[${body%,}]" "127.0.0.1:$PORT/api/ticks"
        sleep 0.2
      done
      wait "$LTPID"; stop_server ;;
    realtime) start_server ""; run realtime -c 100 --symbols 10 -k 10 -r 10000 -d 10; stop_server ;;
    batch)    start_server ""; run batch -c 100 --symbols 10 -k 10 -r 10000 -d 10 --mode batch --interval-ms 50; stop_server ;;
    fleet)    start_server ""; run fleet -c 1000 --symbols 10 -k 10 -r 1000 -d 10; stop_server ;;
    fleetbatch) start_server ""; run fleetbatch -c 1000 --symbols 10 -k 10 -r 1000 -d 10 --mode batch --interval-ms 50; stop_server ;;
    throttled) start_server ""; run throttled -c 100 --symbols 10 -k 10 -r 10000 -d 10 --mode throttled --interval-ms 100; stop_server ;;
    latency)  start_server ""; run latency -c 1000 --symbols 100 -k 10 -r 2000 -d 15 --batch-ms 1; stop_server ;;
    latency5) start_server ""; run latency5 -c 1000 --symbols 100 -k 10 -r 2000 -d 15 --batch-ms 5; stop_server ;;
    max)      start_server ""; run max -c 100 --symbols 10 -k 10 -r 20000 -d 10; stop_server ;;
    max3m)    start_server ""; run max3m -c 100 --symbols 10 -k 10 -r 30000 -d 10; stop_server ;;
    ingest)   start_server ""; run ingest -c 1 --symbols 100 -k 1 -r 200000 -d 10 --batch-ms 2; stop_server ;;
    import)
      D=$(mktemp -d); F="$D/ticks.csv"
      python3 - "$F" <<'PY'
import sys, time
n = 1_000_000; base = int(time.time() * 1000) - 86_400_000 * 3
with open(sys.argv[1], "w") as f:
    f.write("symbol,ts,price,volume,bid,ask\n")
    for i in range(n):
        p = 100 + (i % 1000) * 0.01
        f.write(f"SYM{i % 50},{base + i},{p:.2f},{1 + i % 300},{p - 0.01:.2f},{p + 0.01:.2f}\n")
PY
      echo "== import: tickfan import --data-dir \$D $F (1,000,000 rows)"
      /usr/bin/time -f "elapsed %e s, max RSS %M KiB, CPU %P" taskset -c 0,1 "$BIN" import --data-dir "$D/data" "$F" 2>&1 | tee "$OUT/import.txt"
      rm -rf "$D" ;;
    *) echo "unknown scenario $1"; exit 2 ;;
  esac
}

if [ $# -eq 0 ]; then set -- idle10k idle10k1 idle19k sparse realtime batch fleet fleetbatch throttled latency max max3m ingest import; fi
for s in "$@"; do scenario "$s"; done
