#!/usr/bin/env python3
"""Exhaustion without credentials, at full size, against a release binary on loopback.

1. N idle TCP connects from 127.0.0.1 (held open, nothing sent), then a WebSocket client from
   127.0.0.2 connects and subscribes while they are held.
2. 20 POSTs from 127.0.0.4 that each send 15 MiB of a declared 16 MiB body and stall; the
   server's RSS is sampled before, at the peak and after the body deadline.

Usage: python3 tests/exhaustion_load.py [--binary target/release/tickfan] [--idle 20000]
Prints one JSON summary. Loopback only; bounded in count and time.
"""

import argparse
import base64
import json
import multiprocessing as mp
import os
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def connect_from(src, port, timeout=10.0):
    s = socket.socket()
    s.bind((src, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def http_get(src, port, path):
    s = connect_from(src, port)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b" ")[1].decode(), body.decode(errors="replace")


def safe(f):
    try:
        return f()
    except (OSError, IndexError) as e:
        return f"failed: {e}"


def metric(port, series):
    _, body = http_get("127.0.0.3", port, "/metrics")
    for line in body.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def ws_frame(text):
    """A masked client text frame."""
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x81])
    if n < 126:
        head += bytes([0x80 | n])
    else:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def ws_read_text(s, buf):
    """Reads one server text frame; returns (text, rest of buffer)."""
    while True:
        if len(buf) >= 2:
            n = buf[1] & 0x7F
            off = 2
            if n == 126:
                if len(buf) < 4:
                    n = None
                else:
                    n = struct.unpack(">H", buf[2:4])[0]
                    off = 4
            elif n == 127:
                if len(buf) < 10:
                    n = None
                else:
                    n = struct.unpack(">Q", buf[2:10])[0]
                    off = 10
            if n is not None and len(buf) >= off + n:
                opcode = buf[0] & 0x0F
                payload, buf = buf[off : off + n], buf[off + n :]
                if opcode == 1:
                    return payload.decode(), buf
                continue
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk


def ws_subscribe(src, port):
    """Connects to /ws from `src`, reads the welcome, subscribes; returns timings."""
    t0 = time.monotonic()
    s = connect_from(src, port)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            chunk = s.recv(4096)
        except OSError as e:
            return {"refused": f"{e} after {buf!r}", "seconds": time.monotonic() - t0}
        if not chunk:
            return {"refused": f"closed after {buf!r}", "seconds": time.monotonic() - t0}
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        return {"refused": head.split(b"\r\n")[0].decode(), "seconds": time.monotonic() - t0}
    welcome, buf = ws_read_text(s, buf)
    assert json.loads(welcome)["type"] == "welcome", welcome
    s.sendall(ws_frame(json.dumps({"op": "subscribe", "id": 1, "symbols": ["LOAD"]})))
    while True:
        msg, buf = ws_read_text(s, buf)
        v = json.loads(msg)
        if v.get("id") == 1:
            break
    s.close()
    return {"reply": v.get("type"), "seconds": round(time.monotonic() - t0, 4)}


def idle_worker(port, count, out):
    """Opens `count` idle connections from 127.0.0.1 and holds them; reports how they fared."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    held, refused, errors, refuse_times = [], 0, 0, []
    for i in range(count):
        try:
            s = connect_from("127.0.0.1", port, timeout=10.0)
        except OSError:
            errors += 1
            continue
        if i >= 512 and i % 500 == 0:
            # Sampled, past the per-address cap: how long until the server closes it.
            s.settimeout(1.0)
            t0 = time.monotonic()
            try:
                data = s.recv(1024)
                refused += 1
                refuse_times.append(time.monotonic() - t0)
                s.close()
                continue
            except socket.timeout:
                pass
            except OSError:
                refused += 1
                refuse_times.append(time.monotonic() - t0)
                s.close()
                continue
        held.append(s)
    # Unsampled ones: closed by the server by now, or still open?
    time.sleep(1.0)
    still_open = []
    for s in held:
        s.setblocking(False)
        try:
            data = s.recv(1024)
            refused += 1
            s.close()
        except BlockingIOError:
            still_open.append(s)
        except OSError:
            refused += 1
            s.close()
    out.put(
        {
            "attempted": count,
            "connect_errors": errors,
            "refused": refused,
            "held_open": len(still_open),
            "refuse_ms": sorted(round(t * 1000, 2) for t in refuse_times),
        }
    )
    # Hold them until the parent terminates this worker.
    time.sleep(3600)


def part_idle(pid, port, n):
    out = mp.Queue()
    per = n // 2
    workers = [mp.Process(target=idle_worker, args=(port, per, out)) for _ in range(2)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    reports = [out.get(timeout=600) for _ in workers]
    took = time.monotonic() - t0
    while_held = {
        "server_fds": fds(pid),
        "server_rss_kb": rss_kb(pid),
        "ws_from_127.0.0.2": ws_subscribe("127.0.0.2", port),
        "health_from_127.0.0.3": safe(lambda: http_get("127.0.0.3", port, "/health")[0]),
        "limit_hits_max_http_connections_per_ip": safe(
            lambda: metric(port, 'tickfan_limit_hits_total{limit="max_http_connections_per_ip"}')
        ),
        "limit_hits_max_tcp_connections": safe(
            lambda: metric(port, 'tickfan_limit_hits_total{limit="max_tcp_connections"}')
        ),
    }
    for w in workers:
        w.terminate()
        w.join()
    times = sorted(t for r in reports for t in r["refuse_ms"])
    return {
        "idle_connects": n,
        "seconds_to_connect_all": round(took, 1),
        "refused": sum(r["refused"] for r in reports),
        "held_open": sum(r["held_open"] for r in reports),
        "connect_errors": sum(r["connect_errors"] for r in reports),
        "refuse_ms_sampled": {
            "n": len(times),
            "p50": times[len(times) // 2] if times else None,
            "p99": times[int(len(times) * 0.99)] if times else None,
            "max": times[-1] if times else None,
        },
        "while_held": while_held,
    }


def stalled_post(port, declared, sent, result, i):
    s = connect_from("127.0.0.4", port, timeout=120.0)
    t0 = time.monotonic()
    s.sendall(
        f"POST /api/ticks HTTP/1.1\r\nHost: t\r\nContent-Length: {declared}\r\n\r\n".encode()
    )
    chunk = b" " * (1 << 20)
    for _ in range(sent >> 20):
        s.sendall(chunk)
    t_sent = time.monotonic() - t0
    data = b""
    while True:
        try:
            c = s.recv(65536)
        except OSError:
            break
        if not c:
            break
        data += c
    result[i] = {
        "sent_s": round(t_sent, 2),
        "closed_after_s": round(time.monotonic() - t0, 2),
        "status": data.split(b" ")[1].decode() if data.startswith(b"HTTP/1.1") else None,
    }


def part_posts(pid, port, count=20):
    before = rss_kb(pid)
    result = [None] * count
    threads = [
        threading.Thread(target=stalled_post, args=(port, 16 << 20, 15 << 20, result, i))
        for i in range(count)
    ]
    peak = before
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_kb(pid))
        time.sleep(0.2)
        if time.monotonic() - t0 > 300:
            break
    all_closed = time.monotonic() - t0
    time.sleep(2.0)
    after = rss_kb(pid)
    time.sleep(8.0)
    later = rss_kb(pid)
    return {
        "posts": count,
        "rss_kb_before": before,
        "rss_kb_peak": peak,
        "rss_kb_2s_after_last_close": after,
        "rss_kb_10s_after_last_close": later,
        "seconds_until_all_closed": round(all_closed, 1),
        "statuses": sorted({str(r and r["status"]) for r in result}),
        "closed_after_s": sorted(r["closed_after_s"] for r in result if r),
        "limit_hits_body_timeout": metric(port, 'tickfan_limit_hits_total{limit="body_timeout"}'),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/tickfan")
    ap.add_argument("--idle", type=int, default=20000)
    ap.add_argument("--extra-config", default="")
    ap.add_argument("--skip-posts", action="store_true")
    ap.add_argument("--post-rounds", type=int, default=1)
    args = ap.parse_args()
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="tickfan-exhaustion-")
    cfg = os.path.join(tmp, "tickfan.toml")
    with open(cfg, "w") as f:
        f.write(
            f'[server]\nlisten = "127.0.0.1:{port}"\n[store]\ndir = "{tmp}/data"\n'
            f'[feed]\nsimulator = false\n[log]\nlevel = "warn"\n{args.extra_config}\n'
        )
    server = subprocess.Popen([args.binary, "serve", "--config", cfg], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if http_get("127.0.0.3", port, "/health")[0] == "200":
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not come up")
            time.sleep(0.1)
        summary = {
            "fd_limit": json.loads(http_get("127.0.0.3", port, "/health")[1]).get("fd_limit"),
            "idle": part_idle(server.pid, port, args.idle),
        }
        time.sleep(2.0)
        summary["after_idle_released"] = {
            "server_fds": fds(server.pid),
            "server_rss_kb": rss_kb(server.pid),
            "limit_hits_max_tcp_connections": safe(
                lambda: metric(port, 'tickfan_limit_hits_total{limit="max_tcp_connections"}')
            ),
        }
        if not args.skip_posts:
            summary["stalled_posts"] = [
                part_posts(server.pid, port) for _ in range(args.post_rounds)
            ]
        summary["server_alive"] = server.poll() is None
        print(json.dumps(summary, indent=1))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
