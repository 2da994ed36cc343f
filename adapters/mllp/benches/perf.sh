#!/usr/bin/env bash
# MLLP throughput/latency run for docs/PERFORMANCE.md (MLLP listener).
#   cargo build --release -p tributary
#   (cd /tmp/mllp-peers && npm install @medplum/hl7); pip install hl7apy
#   PEERS_DIR=/tmp/mllp-peers adapters/mllp/benches/perf.sh
# Prints one markdown table row per run. Each Tributary run starts a fresh `tributary serve`
# (fsync'd journal + audit, store-before-ACK) on a fresh data directory.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
BIN=$ROOT/target/release/tributary
CORPUS=${CORPUS:-$ROOT/../shared/corpus/hl7v2}
PEERS_DIR=${PEERS_DIR:-/tmp/mllp-peers}
CONNS=${CONNS:-"1 8 32 128"}
PEER_CONNS=${PEER_CONNS:-"8 32"}
WORK=$(mktemp -d)
# CR segment separators for every server (hl7apy's MLLP server accepts nothing else)
ADT=$WORK/adt_a01.hl7; tr '\n' '\r' < "$CORPUS/ms-fhir-converter/ADT-A01-01.hl7" > "$ADT"
ORU=$WORK/oru_r01.hl7; tr '\n' '\r' < "$CORPUS/ms-fhir-converter/ORU-R01-01.hl7" > "$ORU"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (echo > /dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 not up" >&2; return 1; }
msgs_for() { case $1 in 1) echo 2000;; 8) echo 20000;; *) echo 60000;; esac; }

bench() { # addr conns messages file [rate] [--reconnect]
  local extra=()
  [ -n "${5:-}" ] && extra=(--rate "$5")
  [ -n "${6:-}" ] && extra+=("$6")
  "$BIN" bench mllp --addr "$1" --connections "$2" --messages "$3" --file "$4" --json "${extra[@]}"
}

row() { # label sample conns json rss_kb
  python3 - "$@" <<'PY'
import json,sys
label,sample,conns,js,rss=sys.argv[1:6]
r=json.loads(js)
print(f"| {label} | {sample} | {conns} | {r['positive']} | {r['msgs_per_sec']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['max_ms']:.1f} | {int(rss)//1024 if rss!='-' else '-'} |")
PY
}

tributary_run() { # sample-name file conns [rate]
  local p h d
  p=$(port); h=$(port); d=$WORK/data-$RANDOM
  "$BIN" serve --data-dir "$d" --http-listen 127.0.0.1:$h --mllp-listen 127.0.0.1:$p >"$WORK/serve.log" 2>&1 &
  local pid=$!
  wait_port "$p"
  local n; n=$(msgs_for "$3"); [ -n "${4:-}" ] && n=$(( ${4%.*} * 5 ))
  local js; js=$(bench 127.0.0.1:$p "$3" "$n" "$2" "${4:-}")
  local rss; rss=$(awk '/VmHWM/{print $2}' /proc/$pid/status)
  kill -TERM $pid; wait $pid || true
  rm -rf "$d"
  row "tributary${4:+ @${4}/s}" "$1" "$3" "$js" "$rss"
}

peer_run() { # label cmd... -- sample-name file conns
  local label=$1; shift
  local p; p=$(port)
  local cmd=("$@"); local n=${#cmd[@]}
  local conns=${cmd[$((n-1))]} file=${cmd[$((n-2))]} sample=${cmd[$((n-3))]}
  unset 'cmd[n-1]' 'cmd[n-2]' 'cmd[n-3]'
  "${cmd[@]}" "$p" >"$WORK/peer.log" 2>&1 &
  local pid=$!
  wait_port "$p"
  local m; m=$(msgs_for "$conns"); [ "$label" = hl7apy ] && m=1000
  local rc=""; [ "$label" = hl7apy ] && rc=--reconnect
  local js; js=$(bench 127.0.0.1:$p "$conns" "$m" "$file" "" $rc || true)
  local rss; rss=$(awk '/VmHWM/{print $2}' /proc/$pid/status)
  kill $pid 2>/dev/null; wait $pid 2>/dev/null || true
  row "$label" "$sample" "$conns" "$js" "$rss"
}

echo "| server | sample | connections | ACKed | msgs/s | p50 ms | p99 ms | max ms | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|---|---|"
for s in ADT ORU; do
  f=$ADT; [ $s = ORU ] && f=$ORU
  for c in $CONNS; do tributary_run $s "$f" "$c"; done
done
tributary_run ADT "$ADT" 32 5000
for s in ADT ORU; do
  f=$ADT; [ $s = ORU ] && f=$ORU
  for c in $PEER_CONNS; do
    if [ -d "$PEERS_DIR/node_modules/@medplum/hl7" ]; then
      (cd "$PEERS_DIR" && cp "$ROOT/adapters/mllp/benches/peers/medplum_server.mjs" .)
      peer_run medplum node "$PEERS_DIR/medplum_server.mjs" $s "$f" "$c"
    fi
    if python3 -c 'import hl7apy' 2>/dev/null; then
      peer_run hl7apy python3 "$ROOT/adapters/mllp/benches/peers/hl7apy_server.py" $s "$f" "$c"
    fi
  done
done
