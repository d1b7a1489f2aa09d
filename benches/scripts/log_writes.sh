#!/usr/bin/env bash
# How many write system calls spillway's logging makes per connection
# (issue 12): one worker, --log-file, N new connections one after the
# other, each a small request and a small answer from a built-in backend;
# `strace -c` counts write/writev/pwrite64 in the proxy.
#
#   benches/scripts/log_writes.sh [BINARY] [LEVEL] [N]
#   benches/scripts/log_writes.sh target/release/spillway info 1028
#
# Needs strace and python3. Everything on 127.0.0.1, ephemeral ports.
set -euo pipefail
bin=${1:-target/release/spillway}
level=${2:-info}
n=${3:-1028}
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT

# A backend that answers each connection with a small response and closes.
python3 - "$work/backend.port" <<'PY' &
import socket, sys
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(512)
open(sys.argv[1], "w").write(str(ls.getsockname()[1]))
while True:
    c, _ = ls.accept()
    c.recv(65536)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    c.close()
PY
for _ in $(seq 100); do [ -s "$work/backend.port" ] && break; sleep 0.05; done
backend=127.0.0.1:$(cat "$work/backend.port")

"$bin" --listen 127.0.0.1:0 --backend "$backend" --workers 1 \
  --log-level "$level" --log-file "$work/spillway.log" &
pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/spillway.log" 2>/dev/null && break; sleep 0.05; done
addr=$(sed -n 's/.*listening on \([0-9.:]*\) .*/\1/p' "$work/spillway.log" | head -1)

strace -q -c -f -e trace=write,writev,pwrite64 -p "$pid" -o "$work/strace.out" &
tracer=$!
sleep 0.5
python3 - "$addr" "$n" <<'PY'
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
for _ in range(int(sys.argv[2])):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    while s.recv(65536):
        pass
    s.close()
PY
sleep 0.5
kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
writes=$(awk '$NF ~ /^(write|writev|pwrite64)$/ {sum += $4} END {print sum + 0}' "$work/strace.out")
closes=$(grep -c " closed " "$work/spillway.log" || true)
echo "$bin --log-level $level: $writes write calls for $n connections ($closes close lines logged)"
