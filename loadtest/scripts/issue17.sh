#!/usr/bin/env bash
# The issue 17 workloads, each run against tickfan AND the bare ceiling server
# (`tickfan-loadtest ceiling`) in the same sitting with the same client: the server pinned to
# core 0, the load generator to core 1, loopback only, bounded in time. Usage:
#   cargo build --release -p tickfan -p tickfan-loadtest && loadtest/scripts/issue17.sh [scenario...]
# Scenarios:
#   w2 RATE=60000   W2: 100 clients x 10 symbols (all 10 each), the producer sends every tick
#                   due each millisecond in one /ingest frame (unique ids), 64 KiB reads;
#                   RATE ticks/s in = RATE x 100 deliveries/s (60000 -> 6M/s)
#   cost            W2 shape at 10,000 ticks/s = 1M deliveries/s: server CPU per delivery
#   w1              W1: 1,000 clients, 100 symbols, 10 per client, 20,000 ticks/s (2M/s)
#   ingest10k ingest100k   no clients, one producer: server CPU per accepted tick
#   ingestmax       no clients, 4 producers, server on both cores: accepted ticks/s
# SERVERS="tickfan ceiling" (default) picks which servers run; "base" is a second tickfan binary
# given as BASE_BIN=path (before/after runs in one sitting). DUR=10 is the window in seconds;
# SERVE_ARGS go to `tickfan serve`; GC_MS=20 runs tickfan with store.group_commit_ms = 20.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release/tickfan}
LT=target/release/tickfan-loadtest
OUT=${OUT:-target/issue17-results}
DUR=${DUR:-10}
SERVERS=${SERVERS:-tickfan ceiling}
mkdir -p "$OUT"
if [ -n "${GC_MS:-}" ]; then # another store.group_commit_ms for tickfan
  printf '[store]\ngroup_commit_ms = %d\n' "$GC_MS" >"$OUT/gc.toml"
  SERVE_ARGS="${SERVE_ARGS:-} --config $OUT/gc.toml"
fi

start_server() { # $1: tickfan|ceiling, $2: cpu list
  DATA=$(mktemp -d)
  # Emptied here, not by the background job's redirection: that may run after the first
  # check below, which would then read the previous server's port.
  : >"$OUT/server.out"
  if [ "$1" = tickfan ] || [ "$1" = base ]; then
    local bin=$BIN; [ "$1" = base ] && bin=${BASE_BIN:?BASE_BIN=path of the other tickfan binary}
    taskset -c "$2" "$bin" serve --listen 127.0.0.1:0 --no-simulator --data-dir "$DATA" ${SERVE_ARGS:-} >"$OUT/server.out" 2>"$OUT/server.err" &
  else
    taskset -c "$2" "$LT" ceiling >"$OUT/server.out" 2>"$OUT/server.err" &
  fi
  SPID=$!
  for _ in $(seq 100); do grep -q listening "$OUT/server.out" 2>/dev/null && break; sleep 0.05; done
  PORT=$(grep -o '[0-9]*$' "$OUT/server.out")
}
stop_server() { kill -TERM "$SPID" 2>/dev/null; wait "$SPID" 2>/dev/null || true; rm -rf "$DATA"; }
run() { # name, server, server cpus, loadtest cpus, loadtest args...
  local name=$1 server=$2 scpu=$3 lcpu=$4; shift 4
  start_server "$server" "$scpu"
  echo "== $name on $server ($(cut -d' ' -f1-3 /proc/loadavg)): tickfan-loadtest $*"
  taskset -c "$lcpu" "$LT" --url "ws://127.0.0.1:$PORT" --server-pid "$SPID" --json "$OUT/$name-$server.json" "$@" 2>/dev/null \
    | tee "$OUT/$name-$server.txt" | grep -E "^(connections|deliveries|expected|seq|latency|closes|producer|server|client)" || true
  case $name in ingest*) per_tick "$OUT/$name-$server.json" ;; esac
  echo "   load after: $(cut -d' ' -f1-3 /proc/loadavg)"
  stop_server
}
per_tick() { # server CPU per accepted tick, from a --json summary
  python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); a=d["producer"]["accepted"] if d.get("producer") else 0; c=d["server"]["cpu_secs"]; print(f"   server CPU per accepted tick: {c/a*1e6:.2f} us ({a:,} accepted, {c:.2f} s)" if a else "")' "$1" 2>/dev/null || true
}
w2()   { for s in $SERVERS; do run "w2-${RATE:-60000}" "$s" 0 1 -c 100 --symbols 10 -k 10 -r "${RATE:-60000}" --batch-ms 1 --read-buffer-kb 64 -d "$DUR" -q; done; }
cost() { for s in $SERVERS; do run cost "$s" 0 1 -c 100 --symbols 10 -k 10 -r 10000 --batch-ms 1 --read-buffer-kb 64 -d "$DUR" -q; done; }
w1()   { for s in $SERVERS; do run w1 "$s" 0 1 -c 1000 --symbols 100 -k 10 -r 20000 --batch-ms 1 -d "$DUR" -q; done; }

for sc in "${@:-cost w2 w1 ingest10k ingest100k}"; do
  for one in $sc; do
    case $one in
      w2) w2 ;;
      cost) cost ;;
      w1) w1 ;;
      ingest10k)  for s in $SERVERS; do [ "$s" = ceiling ] || run ingest10k "$s" 0 1 -c 0 --symbols 10 -r 10000 --batch-ms 1 -d "$DUR" -q; done ;;
      ingest100k) for s in $SERVERS; do [ "$s" = ceiling ] || run ingest100k "$s" 0 1 -c 0 --symbols 10 -r 100000 --batch-ms 1 -d "$DUR" -q; done ;;
      ingestmax)
        U="ws://127.0.0.1:PORT"
        start_server tickfan 0,1
        echo "== ingestmax on tickfan ($(cut -d' ' -f1-3 /proc/loadavg)): 4 producers, ${RATE:-1500000} ticks/s in all"
        "$LT" --url "ws://127.0.0.1:$PORT" --ingest-url "${U/PORT/$PORT},${U/PORT/$PORT},${U/PORT/$PORT},${U/PORT/$PORT}" \
          --server-pid "$SPID" --json "$OUT/ingestmax.json" -c 0 --symbols "${SYMS:-100}" -r "${RATE:-1500000}" --batch-ms 2 -d "$DUR" -q 2>/dev/null \
          | tee "$OUT/ingestmax.txt" | grep -E "^(producer|server|client)" || true
        per_tick "$OUT/ingestmax.json"
        echo "   load after: $(cut -d' ' -f1-3 /proc/loadavg)"
        stop_server ;;
      *) echo "unknown scenario $one"; exit 2 ;;
    esac
  done
done
