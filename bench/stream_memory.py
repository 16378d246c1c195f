"""What one idle open stream keeps in chat.py, and its size.

    python bench/stream_memory.py            # 1,000 idle streams, ~20 s
    python bench/stream_memory.py --streams 3000

An idle stream is what bench/run.py's idle scenario holds: a browser's GET /events open on an
answer whose model server sent its headers and the role chunk, then nothing. This starts the
fake upstream (bench/upstream.py) and chat.py in a child process that measures itself: the
Python allocations made while the streams opened and still alive (tracemalloc, grouped by where
they were made), the greenlets' saved C stacks, and RSS. Prints a table of bytes per stream.
Talks to 127.0.0.1 only; needs only ../requirements.txt.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def serve(args):
    """The child: chat.py in this process, measuring itself at SIGUSR1 (baseline) and SIGUSR2 (report)."""
    sys.argv = [os.path.join(ROOT, "chat.py"), "--port", str(args.port)]
    sys.path.insert(0, ROOT)
    import chat  # patches the standard library first
    import gc
    import tracemalloc

    import gevent
    import greenlet
    state = {}

    def rss():
        with open("/proc/self/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024

    def stacks():
        sizes = {}
        for obj in gc.get_objects():
            if isinstance(obj, greenlet.greenlet) and not obj.dead:
                frame, name = obj.gr_frame, "hub" if isinstance(obj, gevent.hub.Hub) else "?"
                while frame is not None and frame.f_back is not None:
                    frame = frame.f_back
                if frame is not None:
                    name = frame.f_code.co_name
                count, size = sizes.get(name, (0, 0))
                sizes[name] = (count + 1, size + obj._stack_saved)
        return sizes

    def baseline():
        gc.collect()
        state["rss"], state["stacks"] = rss(), stacks()
        if args.trace:
            tracemalloc.start(40)

    def report():
        gc.collect()
        groups, after = {}, rss()
        snap = tracemalloc.take_snapshot() if args.trace else None
        tracemalloc.stop()
        for stat in snap.statistics("traceback") if snap else ():
            frames = list(stat.traceback)  # oldest first
            ours = [f for f in frames if f.filename.endswith("chat.py")]
            where = ours[-1] if ours else frames[-1]
            inner = frames[-1]
            key = (f"{os.path.basename(where.filename)}:{where.lineno} "
                   f"({os.path.basename(inner.filename)}:{inner.lineno})")
            groups[key] = groups.get(key, 0) + stat.size
        ours_only = {}
        for key, size in groups.items():
            ours_only[key.split(" ")[0]] = ours_only.get(key.split(" ")[0], 0) + size
        out = {"ours": ours_only, "rss": after - state["rss"], "python": sum(groups.values()), "groups": groups,
               "stacks_before": state["stacks"], "stacks": stacks(), "streams": len(chat.streams)}
        with open(args.report, "w") as f:
            json.dump(out, f)

    gevent.signal_handler(signal.SIGUSR1, lambda: gevent.spawn(baseline))
    gevent.signal_handler(signal.SIGUSR2, lambda: gevent.spawn(report))
    chat.main()


def request(port, raw):
    """One HTTP/1.1 request on a new connection; returns (socket, bytes read up to the end of the headers)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(raw)
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            break
        data += more
    return sock, data


def open_idle(port):
    """POST a question whose answer stays silent, then open its /events; returns the open socket."""
    body = b"prompt=mode%3Didle+hold%3D900"
    sock, head = request(port, b"POST /streaming HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nOrigin: http://127.0.0.1:%d\r\n"
                               b"Content-Type: application/x-www-form-urlencoded\r\nHX-Request: true\r\nContent-Length: %d\r\n"
                               b"Connection: close\r\n\r\n%s" % (port, port, len(body), body))
    while True:
        more = sock.recv(65536)
        if not more:
            break
        head += more
    sock.close()
    if b"sse-connect" not in head:
        raise RuntimeError(head[:600].decode("utf-8", "replace"))
    stream = re.search(rb'sse-connect="/events\?stream=([\w-]+)"', head).group(1)
    cookie = re.search(rb"Set-Cookie: (chat_owner=[^;]+)", head, re.I).group(1)
    sock, _ = request(port, b"GET /events?stream=%s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nCookie: %s\r\n\r\n"
                            % (stream, port, cookie))
    return sock


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--trace", action="store_true", help="also where the Python objects were made (tracemalloc: "
                                                         "it inflates RSS)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)
    sys.path.insert(0, HERE)
    import run  # bench/run.py: free_port, start_upstream, raise_nofile
    run.raise_nofile()
    tmp = tempfile.mkdtemp(prefix="chat-mem-")
    upstream = run.start_upstream(tmp)
    port, report = run.free_port(), os.path.join(tmp, "report.json")
    env = dict(os.environ, OPENAI_BASE_URL=f"http://127.0.0.1:{upstream.port}/v1", CHAT_MODEL="bench",
               CHAT_DB=os.path.join(tmp, "chat.db"), CHAT_MAX_STREAMS="1000000", CHAT_STREAMS_PER_OWNER="1000",
               CHAT_CONNECTIONS_PER_ADDRESS="1000000", CHAT_NEW_OWNERS_PER_MINUTE="1000000",
               CHAT_NEW_OWNERS_PER_MINUTE_TOTAL="1000000")
    env.pop("OPENAI_API_KEY", None)
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--port", str(port), "--report", report]
                              + ["--trace"] * args.trace,
                              env=env, stderr=open(os.path.join(tmp, "server.log"), "w"))
    try:
        run.wait_http(f"http://127.0.0.1:{port}/healthz", server)
        warm = [open_idle(port) for _ in range(20)]  # first-use costs (imports, pools, caches) out of the count
        for sock in warm:
            sock.close()
        time.sleep(1)
        server.send_signal(signal.SIGUSR1)
        time.sleep(1)
        held = [open_idle(port) for _ in range(args.streams)]
        time.sleep(2)
        server.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 120
        while not os.path.exists(report) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        with open(report) as f:
            r = json.load(f)
    finally:
        server.kill()
        upstream.kill()
    n = len(held)
    print(f"{n} idle streams held ({r['streams']} registered); per stream:")
    print(f"  RSS                                  {r['rss'] / n / 1024:7.1f} KB")
    if args.trace:
        print(f"  Python objects (tracemalloc)         {r['python'] / n / 1024:7.1f} KB")
    before = r["stacks_before"]
    total = 0
    for name, (count, size) in sorted(r["stacks"].items(), key=lambda kv: -kv[1][1]):
        c0, s0 = before.get(name, (0, 0))
        if count - c0 > 0:
            total += size - s0
            print(f"  saved C stacks of {count - c0:5d} greenlets in {name:18s} {(size - s0) / n / 1024:5.1f} KB")
    print(f"  saved C stacks in all                {total / n / 1024:7.1f} KB")
    if args.trace:
        print("Python objects by the line of chat.py that made them:")
        for key, size in sorted(r["ours"].items(), key=lambda kv: -kv[1])[:25]:
            if size / n >= 64:
                print(f"  {size / n:8.0f} B  {key}")
    print("Python objects by where chat.py made them (innermost allocation in brackets):")
    for key, size in sorted(r["groups"].items(), key=lambda kv: -kv[1])[:25]:
        if size / n >= 64:
            print(f"  {size / n:8.0f} B  {key}")


if __name__ == "__main__":
    main()
