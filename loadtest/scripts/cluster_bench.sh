#!/usr/bin/env bash
# Runs the cluster-mode measurements behind docs/benchmarks.md ("Cluster mode"): a
# nats-server -js with its store in a temp dir, N tickfan nodes in cluster mode, and the load
# tester, loopback only, each run bounded in time. Usage:
#   cargo build --release --workspace --examples && loadtest/scripts/cluster_bench.sh [scenario...]
# Scenarios: raw bus3 bus3shared buslat singlelat conn100k
#   RATE=100000 bus3       producers on 3 nodes (each its third of the symbols), one client per
#                          node subscribed to every symbol (every tick counted on every node)
#   bus3shared             the same, every producer sends every symbol (chains contended)
#   buslat / singlelat     producer on node A, 1,000 clients on node B, 10,000 ticks/s
#                          (singlelat: the same on one single-node server);
#                          LAT_SHAPE="-c 100 --symbols 100 -k 1" for a light fan-out
#   NODES=7 CONNS=100000 conn100k   100k connections spread over NODES nodes by several
#                          load-test processes, 1 of 1,000 symbols each, producer 1,000 ticks/s
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=target/release/tickfan
LT=target/release/tickfan-loadtest
OUT=${OUT:-target/bench-results}
NATS_PORT=${NATS_PORT:-14222}
mkdir -p "$OUT"
PIDS=()
DIRS=()

start_nats() {
  local d; d=$(mktemp -d); DIRS+=("$d")
  nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$d/js" -l "$d/nats.log" &
  NATS_PID=$!
  for _ in $(seq 200); do grep -q "Server is ready" "$d/nats.log" 2>/dev/null && break; sleep 0.05; done
}

# start_node NAME [extra serve args]: sets NODE_PORT and NODE_PID
start_node() {
  local name=$1; shift
  local d; d=$(mktemp -d); DIRS+=("$d")
  printf '[cluster]\nnode_name = "%s"\n' "$name" >"$d/c.toml"
  local nats=(--nats "nats://127.0.0.1:$NATS_PORT")
  [ "${SINGLE:-}" = 1 ] && nats=()
  "$BIN" serve --config "$d/c.toml" --listen 127.0.0.1:0 --no-simulator --data-dir "$d/data" "${nats[@]}" "$@" \
    >"$OUT/node-$name.out" 2>"$OUT/node-$name.err" &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  for _ in $(seq 200); do grep -q listening "$OUT/node-$name.out" 2>/dev/null && break; sleep 0.05; done
  NODE_PORT=$(grep -o '[0-9]*$' "$OUT/node-$name.out" | head -1)
}

stop_all() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  [ -n "${NATS_PID:-}" ] && { kill -TERM "$NATS_PID" 2>/dev/null || true; wait "$NATS_PID" 2>/dev/null || true; }
  for d in "${DIRS[@]}"; do rm -rf "$d"; done
  PIDS=(); DIRS=(); NATS_PID=
}

cpu_of() { # pid -> utime+stime in seconds
  awk '{print ($14+$15)/100}' "/proc/$1/stat" 2>/dev/null || echo 0
}

health() { # port -> the cluster object of /health
  curl -s "127.0.0.1:$1/health" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin).get("cluster")))'
}

scenario() {
  case $1 in
    raw)
      start_nats
      for b in 190 ${RAW_BYTES:-}; do
        echo "== raw: bus_bench 200000 msgs, 100 subjects, $b B"
        target/release/examples/bus_bench "nats://127.0.0.1:$NATS_PORT" 200000 100 "$b" | tee -a "$OUT/raw.txt"
      done
      stop_all ;;
    bus3|bus3shared)
      start_nats
      local urls=() ports=()
      for n in a b c; do start_node "$n"; urls+=("ws://127.0.0.1:$NODE_PORT"); ports+=("$NODE_PORT"); done
      local list; list=$(IFS=,; echo "${urls[*]}")
      local extra=(); [ "$1" = bus3shared ] && extra=(--shared-symbols)
      local before=(); for p in "${PIDS[@]}"; do before+=("$(cpu_of "$p")"); done
      local nb; nb=$(cpu_of "$NATS_PID")
      echo "== $1: load $(cut -d' ' -f1-3 /proc/loadavg); tickfan-loadtest --url A,B,C --ingest-url A,B,C -c 3 --symbols 100 -k 100 -r ${RATE:-100000} -d ${SECS:-10} --batch-ms 2 --drain-ms ${DRAIN_MS:-3000} ${extra[*]}"
      "$LT" --url "$list" --ingest-url "$list" -c 3 --symbols 100 -k 100 -r "${RATE:-100000}" -d "${SECS:-10}" \
        --batch-ms 2 --drain-ms ${DRAIN_MS:-3000} --threads 1 -q ${extra[@]+"${extra[@]}"} --json "$OUT/$1.json" 2>"$OUT/$1.err" | tee "$OUT/$1.txt"
      echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
      local i=0; for p in "${PIDS[@]}"; do
        echo "node ${ports[$i]}: cpu $(echo "$(cpu_of "$p") - ${before[$i]}" | bc) s; $(health "${ports[$i]}")"; i=$((i+1))
      done | tee -a "$OUT/$1.txt"
      echo "nats-server cpu $(echo "$(cpu_of "$NATS_PID") - $nb" | bc) s" | tee -a "$OUT/$1.txt"
      stop_all ;;
    buslat|singlelat)
      [ "$1" = singlelat ] && export SINGLE=1 || start_nats
      start_node a; local a=$NODE_PORT
      local b=$a
      if [ "$1" = buslat ]; then start_node b; b=$NODE_PORT; fi
      local shape=(${LAT_SHAPE:--c 1000 --symbols 100 -k 10})
      echo "== $1: load $(cut -d' ' -f1-3 /proc/loadavg); tickfan-loadtest --url B --ingest-url A ${shape[*]} -r 10000 -d 15 --batch-ms 1"
      "$LT" --url "ws://127.0.0.1:$b" --ingest-url "ws://127.0.0.1:$a" "${shape[@]}" -r 10000 -d 15 \
        --batch-ms 1 -q --json "$OUT/$1.json" 2>/dev/null | tee "$OUT/$1.txt"
      echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/$1.txt"
      unset SINGLE
      stop_all ;;
    conn100k)
      start_nats
      local nodes=${NODES:-7} conns=${CONNS:-100000} procs=${PROCS:-5}
      local urls=() ports=()
      for i in $(seq "$nodes"); do start_node "n$i"; urls+=("ws://127.0.0.1:$NODE_PORT"); ports+=("$NODE_PORT"); done
      local list; list=$(IFS=,; echo "${urls[*]}")
      local per=$((conns / procs)) secs=${SECS:-60}
      echo "== conn100k: load $(cut -d' ' -f1-3 /proc/loadavg); $nodes nodes, $procs load testers x $per connections (1 of 1,000 symbols each), producer 1,000 ticks/s on node 1"
      local lts=()
      for p in $(seq 0 $((procs - 1))); do
        local prod=(); [ "$p" = 0 ] && prod=(-r 1000 --ingest-url "${urls[0]}")
        # Each process its own 127.0.0.x blocks (offset in blocks of --conns-per-ip 5,000).
        "$LT" --url "$list" -c "$per" --symbols 1000 -k 1 -d "$secs" --conns-per-ip 5000 --source-offset $((p * 5)) \
          --ramp-timeout 240 --connect-concurrency 50 --threads 1 -q "${prod[@]}" --json "$OUT/conn100k-$p.json" \
          >"$OUT/conn100k-$p.txt" 2>"$OUT/conn100k-$p.err" &
        lts+=($!)
      done
      # While the window runs: RSS and CPU of every node, once everyone is connected.
      local total=0
      for _ in $(seq 480); do
        total=0; for port in "${ports[@]}"; do
          c=$(curl -s "127.0.0.1:$port/api/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("clients",0))' 2>/dev/null || echo 0)
          total=$((total + c)); done
        [ "$total" -ge $((per * procs)) ] && break; sleep 0.5
      done
      echo "subscribed clients over all nodes: $total at $(date -u +%T); load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/conn100k.txt"
      local before=(); for p in "${PIDS[@]}"; do before+=("$(cpu_of "$p")"); done
      sleep 20
      local i=0 rss=0
      for p in "${PIDS[@]}"; do
        r=$(awk '/VmRSS/{print $2}' "/proc/$p/status"); rss=$((rss + r))
        echo "node ${ports[$i]}: RSS $r KiB, cpu over 20 s $(echo "$(cpu_of "$p") - ${before[$i]}" | bc) s, $(health "${ports[$i]}")"; i=$((i+1))
      done | tee -a "$OUT/conn100k.txt"
      echo "load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/conn100k.txt"
      for l in "${lts[@]}"; do wait "$l" || true; done
      for p in $(seq 0 $((procs - 1))); do echo "-- load tester $p"; cat "$OUT/conn100k-$p.txt"; done | tee -a "$OUT/conn100k.txt"
      stop_all ;;
    *) echo "unknown scenario $1"; exit 2 ;;
  esac
}

trap stop_all EXIT
for s in "$@"; do scenario "$s"; done
