#!/usr/bin/env bash
# Soak test (issue 12): a fresh release server on loopback, N lossless clients with churn
# (random clients disconnect and resume with since_seq), a producer on /ingest, the server's
# RSS, fds and CPU sampled every few seconds, and a verdict at the end:
#   RSS flat after the warm-up, no fd leak, 0 gaps, 0 duplicates, no gap:true snapshot,
#   no slow_consumer or other server close, no WARN/ERROR line in the server's log.
#
# Usage:
#   cargo build --release --workspace
#   loadtest/scripts/soak.sh              # the full soak: 600 s, 15,000 connections
#   loadtest/scripts/soak.sh 60           # a 1-minute smoke run of the same shape
#   CONNS=3000 CHURN=50 loadtest/scripts/soak.sh 60
#
# Settings (environment): CONNS=15000 CHURN=200 (per second) RATE=20000 (ticks/s)
# SYMBOLS=1000 K=1 (symbols per client) MODE=realtime (or batch; both lossless)
# INTERVAL=100 (ms, batch) WARMUP=(240, or a third of a run under 600 s)
# SAMPLE=5 (seconds) CONNS_PER_IP=5000 THREADS=1 (loadtest workers) PIN=0 (1: server on
# core 0, loadtest on core 1) OUT=target/soak-results.
# Everything is bounded: the loadtest by `timeout`, the server's stop by a grace period; the
# store lives in a temp dir removed at the end. Exit status 0 = PASS, 1 = FAIL, 2 = setup.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${1:-${DURATION:-600}}
CONNS=${CONNS:-15000}
CHURN=${CHURN:-200}
RATE=${RATE:-20000}
SYMBOLS=${SYMBOLS:-1000}
K=${K:-1}
MODE=${MODE:-realtime}
INTERVAL=${INTERVAL:-100}
SAMPLE=${SAMPLE:-5}
CONNS_PER_IP=${CONNS_PER_IP:-5000}
THREADS=${THREADS:-1}
PIN=${PIN:-0}
OUT=${OUT:-target/soak-results}
# RSS is judged after the warm-up, once the server's bounded caches are full: the dispatcher's
# ring (recent_ticks = 1000 per symbol: 50 s at 20 ticks/s per symbol) and redb's page cache
# (cache_mb = 256, filled as the store file grows, ~1.5 MB/s at 20k ticks/s: about 3 minutes).
if [ -z "${WARMUP:-}" ]; then
  WARMUP=240
  [ "$DURATION" -lt 600 ] && WARMUP=$((DURATION / 3))
fi
FD_TOLERANCE=${FD_TOLERANCE:-8}
BIN=target/release/tickfan
LT=target/release/tickfan-loadtest
for b in "$BIN" "$LT"; do
  [ -x "$b" ] || { echo "missing $b: run cargo build --release --workspace" >&2; exit 2; }
done
mkdir -p "$OUT"
rm -f "$OUT"/soak.csv "$OUT"/soak.json "$OUT"/server.out "$OUT"/server.err "$OUT"/loadtest.err
# Every connection is a file descriptor, in the server and in the loadtest.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((CONNS + 200)) ]; then
  echo "open-files limit $(ulimit -n) is too low for $CONNS connections" >&2; exit 2
fi
SRV_CPU=(); LT_CPU=()
if [ "$PIN" = 1 ]; then SRV_CPU=(taskset -c 0); LT_CPU=(taskset -c 1); fi

DATA=$(mktemp -d /tmp/tickfan-soak.XXXXXX)
SPID=
cleanup() {
  if [ -n "$SPID" ] && kill -0 "$SPID" 2>/dev/null; then
    kill -TERM "$SPID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SPID" 2>/dev/null || true
  fi
  rm -rf "$DATA"
}
trap cleanup EXIT

# Simulator off (only the loadtest's producer makes ticks, so every seq is accounted for);
# the clients come from 127.0.0.1, .2, ... CONNS_PER_IP each, below the per-IP cap, and the
# producer from the next address. Everything else is the default configuration.
CONF="$OUT/soak.toml"
# STORE_TOML and EXTRA_TOML add keys (e.g. STORE_TOML='cache_mb = 16', or a whole
# [dispatch] table in EXTRA_TOML) for experiments; the documented runs use neither.
cat >"$CONF" <<EOF
[server]
listen = "127.0.0.1:0"
[store]
dir = "$DATA"
${STORE_TOML:-}
[feed]
simulator = false
[limits]
max_connections_per_ip = 10000
max_connections = 100000
${EXTRA_TOML:-}
EOF

echo "== machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r)"
echo "== commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (dirty)'); load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
"${SRV_CPU[@]}" "$BIN" serve --config "$CONF" >"$OUT/server.out" 2>"$OUT/server.err" &
SPID=$!
PORT=
for _ in $(seq 200); do
  PORT=$(grep -o 'listening on http://127.0.0.1:[0-9]*' "$OUT/server.out" 2>/dev/null | grep -o '[0-9]*$' || true)
  [ -n "$PORT" ] && break
  kill -0 "$SPID" 2>/dev/null || { echo "server exited:" >&2; cat "$OUT/server.err" >&2; exit 2; }
  sleep 0.1
done
[ -n "$PORT" ] || { echo "server did not start listening within 20 s" >&2; exit 2; }
FDS_IDLE=$(ls /proc/"$SPID"/fd | wc -l)
echo "== server pid $SPID on port $PORT, $FDS_IDLE fds, config $CONF"

ARGS=(--url "ws://127.0.0.1:$PORT" --server-pid "$SPID" -c "$CONNS" --symbols "$SYMBOLS" -k "$K"
  -r "$RATE" -d "$DURATION" --mode "$MODE" --interval-ms "$INTERVAL" --churn "$CHURN" --sample-secs "$SAMPLE" --warmup-secs "$WARMUP"
  --fd-tolerance "$FD_TOLERANCE" --conns-per-ip "$CONNS_PER_IP" --threads "$THREADS"
  --drain-ms 3000 --ramp-timeout 180 --csv "$OUT/soak.csv" --json "$OUT/soak.json" --quiet)
echo "== tickfan-loadtest ${ARGS[*]}"
LT_STATUS=0
timeout --signal=INT --kill-after=30 $((DURATION + 300)) \
  "${LT_CPU[@]}" "$LT" "${ARGS[@]}" 2> >(tee "$OUT/loadtest.err" >&2) | tee "$OUT/soak.txt" || LT_STATUS=$?

# Every client closed: the server must be back to its idle fd count (closed sockets may take
# a moment to be reaped).
FDS_AFTER=
for _ in $(seq 100); do
  FDS_AFTER=$(ls /proc/"$SPID"/fd 2>/dev/null | wc -l)
  [ "$FDS_AFTER" -le $((FDS_IDLE + FD_TOLERANCE)) ] && break
  sleep 0.2
done
RSS_AFTER=$(awk '/VmRSS/{print $2 " " $3}' /proc/"$SPID"/status 2>/dev/null || echo '?')
echo "== after the loadtest exited: server fds $FDS_AFTER (idle before: $FDS_IDLE), RSS $RSS_AFTER, store $(du -sh "$DATA" | cut -f1)"

# Stop the server and judge its log.
kill -TERM "$SPID"
SRV_STATUS=0
for _ in $(seq 300); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$SPID" 2>/dev/null; then
  echo "server still running 30 s after SIGTERM" >&2; kill -KILL "$SPID"; SRV_STATUS=137
fi
wait "$SPID" || SRV_STATUS=$?
SPID=
LOG_LINES=$(grep -cE '\b(WARN|ERROR)\b' "$OUT/server.err" || true)
SLOW_LINES=$(grep -c 'slow consumer closed' "$OUT/server.err" || true)
echo "== server exit status $SRV_STATUS; $LOG_LINES WARN/ERROR lines in $OUT/server.err ($(wc -l <"$OUT/server.err") lines, $SLOW_LINES 'slow consumer closed')"
grep -E '\b(WARN|ERROR)\b' "$OUT/server.err" | head -20 || true
echo "== load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

FAIL=()
case $LT_STATUS in
  0) ;;
  3) FAIL+=("loadtest verdict FAIL") ;;
  *) FAIL+=("loadtest exit status $LT_STATUS") ;;
esac
[ "$LOG_LINES" -eq 0 ] || FAIL+=("$LOG_LINES WARN/ERROR log lines")
[ "$FDS_AFTER" -le $((FDS_IDLE + FD_TOLERANCE)) ] || FAIL+=("server holds $FDS_AFTER fds after every client left ($FDS_IDLE before)")
[ "$SRV_STATUS" -eq 0 ] || FAIL+=("server exit status $SRV_STATUS")
if [ ${#FAIL[@]} -eq 0 ]; then
  echo "== SOAK PASS ($OUT: soak.txt, soak.csv, soak.json, server.err)"
else
  printf '== SOAK FAIL: %s\n' "$(IFS=';'; echo "${FAIL[*]}")"
  exit 1
fi
