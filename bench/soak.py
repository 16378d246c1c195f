"""Fault soak: chat.py under a steady load of well-behaved chats while faults hit it, one at a time.

    python bench/soak.py                       # the full soak, about 8 minutes
    python bench/soak.py --quick               # about 3 minutes: shorter phases, fewer users
    python bench/soak.py --faults kill,dblock  # only these faults (names: see FAULTS)

What runs (loopback only; every loop is bounded; every process started here is killed at the
end, on error and on Ctrl-C; the tmpfs is unmounted):

  * a fake OpenAI-compatible upstream (this file, `--role upstream`), whose behaviour each
    request picks with key=value words in its prompt: mode=paced (default) | drop | trickle |
    flood (pattern= picks its text) | bomb | hang. Only the attackers' prompts name a fault, so faults hit only their chats.
  * chat.py (`python chat.py --port P`) pinned to core 0, with CHAT_PASSWORD set, short limits
    (SERVER_ENV), TMPDIR a folder of the soak's own (it must stay empty) and CHAT_DB on a tmpfs
    mounted here when root (else a temporary directory, and the full-disk fault is skipped with
    a note).
  * the well-behaved load (this file, `--role load`): N users, each logged in once from its
    own X-Forwarded-For address (203.0.113.N), each keeping its cookies and chatting in a
    closed loop (POST /streaming, GET /events to `done`, a short pause; four turns per
    conversation, then a new one). Every token is stamped by the upstream when sent; the
    client records receipt - stamp, /events time to headers, POST latency and the answer
    text it saw.
  * the faults, from 198.51.100.N (and a few other documentation ranges), each for --fault-seconds
    after a quiet period (FAULTS): slowloris, chunked bodies before login, one address taking every
    connection, stuck readers (of long answers; of one answer larger than a socket buffer),
    cookie-less send flood, cookie-less sends from hundreds of addresses, login guessing (from
    a few addresses; from rotating IPv4 and IPv6 addresses), a cookie-less search flood, an
    upstream that drops / trickles / floods / sends an endless event / sends pathological
    Markdown / hangs, a database locked by another process, a full disk, kill -9 and a restart.
  * 3 control chats that read the fake upstream directly: this machine's floor, per phase.

At the end every answer a well-behaved client saw is looked up in the SQLite file: its stored
text must start with what the client saw. Prints one row per phase, with what each fault did,
and writes bench/results/soak-latest.json (logs and state.json in bench/results/soak-logs/).
bench/README.md explains the columns.
"""

import argparse
import array
import asyncio
import bisect
import collections
import contextlib
import errno
import html
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.parse

from fastloop import new_loop  # bench/ is on sys.path: this script runs as python bench/soak.py

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
PY = sys.executable
HOST = "127.0.0.1"
PASSWORD = "soak-correct-horse-battery-staple"

# Small but realistic limits, so that every fault resolves within its phase.
SERVER_ENV = {
    "CHAT_PASSWORD": PASSWORD,
    "CHAT_MODEL": "soak",
    "CHAT_HEADER_TIMEOUT": "3",
    "CHAT_WRITE_TIMEOUT": "5",
    "CHAT_READ_TIMEOUT": "5",
    "CHAT_FIRST_BYTE_TIMEOUT": "10",
    "CHAT_MAX_ANSWER_CHARS": "200000",
    "CHAT_MAX_ANSWER_SECONDS": "15",
    "CHAT_STREAM_GRACE": "5",
    # A cap the soak can reach cheaply: one address may hold 10 % of it (CHAT_CONNECTIONS_PER_ADDRESS), 200.
    "CHAT_MAX_CONNECTIONS": "2000",
}

NETERR = (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
SSE_CONNECT = re.compile(r'sse-connect="/events\?stream=([^"&]+)"')
HIDDEN_CONVERSATION = re.compile(r'name="conversation" id="conversation" value="([^"]+)"')
DONE_STATUS = re.compile(r'class="msg assistant done (\w+)"')
ALERT = re.compile(r'role="alert">(.*?)</p>', re.S)
STAMP = re.compile(r" t(\d+)")
HTMX = [("HX-Request", "true")]  # what htmx adds to its requests (without it chat.py takes the no-JS path)


# ---------------------------------------------------------------------------
# HTTP, the way a browser (or a bad client) speaks it: one request per connection
# ---------------------------------------------------------------------------

def parse_head(head):
    """Status code and lower-cased (name, value) headers of a response head (bytes, no blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return status, headers


async def read_body(reader, headers, limit=1 << 22):
    """A response body: chunked, Content-Length or until close (at most limit bytes)."""
    h = dict(headers)
    if "chunked" in h.get("transfer-encoding", "").lower():
        out, total = [], 0
        while total <= limit:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                break
            out.append(await reader.readexactly(size))
            await reader.readexactly(2)
            total += size
        return b"".join(out)
    if "content-length" in h:
        return await reader.readexactly(min(limit, int(h["content-length"])))
    return await reader.read(limit)


class Jar(dict):
    """Cookies by name, kept from Set-Cookie like a browser (no paths or expiry beyond Max-Age=0)."""

    def take(self, headers):
        for name, value in headers:
            if name != "set-cookie":
                continue
            pair = value.split(";")[0]
            key, _, val = pair.partition("=")
            if val and "max-age=0" not in value.lower():
                self[key.strip()] = val.strip()
            else:
                self.pop(key.strip(), None)

    def header(self):
        return "; ".join(f"{k}={v}" for k, v in self.items())


async def http(port, method, path, *, xff=None, jar=None, form=None, headers=(), timeout=30.0):
    """One request on its own connection: (status, headers, body). Raises one of NETERR."""
    body = urllib.parse.urlencode(form).encode() if form is not None else b""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close"]
    if xff:
        lines.append(f"X-Forwarded-For: {xff}")
    if jar:
        lines.append(f"Cookie: {jar.header()}")
    if method == "POST":
        lines += [f"Origin: http://{HOST}:{port}", "Content-Type: application/x-www-form-urlencoded",
                  f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status, rh = parse_head(head[:-4])
            data = await read_body(reader, rh)
        finally:
            writer.close()
    if jar is not None:
        jar.take(rh)
    return status, rh, data


async def login(port, jar, xff, password=PASSWORD, timeout=30.0):
    """POST /login; the status (303 and a chat_session cookie when it worked)."""
    status, _, _ = await http(port, "POST", "/login", xff=xff, jar=jar,
                              form={"password": password, "next": "/"}, timeout=timeout)
    return status


async def read_events(port, stream_id, jar, xff, last_id=0, on_token=None, idle=30.0):
    """GET /events?stream=ID and read it to `done` or until it breaks; returns what happened."""
    out = {"http": 0, "tth_ms": None, "end": "error", "done": None, "missing": False, "last_id": last_id,
           "err": None, "t_done": None}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 10)
    except NETERR as exc:
        out["err"] = type(exc).__name__
        return out
    try:
        req = (f"GET /events?stream={stream_id} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
               f"Accept: text/event-stream\r\nCache-Control: no-cache\r\nHX-Request: true\r\n"
               f"X-Forwarded-For: {xff}\r\n" + (f"Cookie: {jar.header()}\r\n" if jar else "")
               + (f"Last-Event-ID: {last_id}\r\n" if last_id else "") + "\r\n")
        t0 = time.monotonic_ns()
        writer.write(req.encode("latin-1"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle)
        out["tth_ms"] = (time.monotonic_ns() - t0) / 1e6
        status, headers = parse_head(head[:-4])
        out["http"] = status
        if status != 200:
            out["end"] = "http"
            return out
        chunked = any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in headers)
        buf = b""
        while True:
            if chunked:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), idle)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    out["end"] = "eof"
                    return out
                data = (await asyncio.wait_for(reader.readexactly(size + 2), idle))[:-2]
            else:
                data = await asyncio.wait_for(reader.read(65536), idle)
                if not data:
                    out["end"] = "eof"
                    return out
            now = time.monotonic_ns()
            buf += data
            *frames, buf = buf.split(b"\n\n")
            for frame in frames:
                event, lines, fid = "message", [], None
                for line in frame.split(b"\n"):
                    if line.startswith(b":"):
                        continue
                    name, _, value = line.partition(b":")
                    value = value[1:] if value.startswith(b" ") else value
                    if name == b"id":
                        fid = int(value)
                    elif name == b"event":
                        event = value.decode()
                    elif name == b"data":
                        lines.append(value.decode("utf-8", "replace"))
                if not lines:
                    continue
                if fid is not None:
                    out["last_id"] = fid
                payload = "\n".join(lines)
                if event == "message":
                    if payload.startswith("<span>") and payload.endswith("</span>"):
                        payload = payload[6:-7]
                    if on_token:
                        on_token(now, html.unescape(payload))
                elif event == "done":
                    m = DONE_STATUS.search(payload)
                    alert = ALERT.search(payload)
                    out.update(end="done", done=m.group(1) if m else "?", t_done=now,
                               missing="no longer available" in payload,
                               alert=html.unescape(alert.group(1)).strip()[:300] if alert else None)
                    return out
    except asyncio.IncompleteReadError:
        out["end"] = "eof"
    except NETERR as exc:
        out["end"], out["err"] = "error", type(exc).__name__
    finally:
        writer.close()
    return out


class LagMonitor:
    """Records when this process's own event loop was late by more than `threshold` s (harness stalls)."""

    def __init__(self, threshold=0.02, every=0.005):
        self.threshold, self.every = threshold, every
        self.stalls = []  # (monotonic ns when noticed, ms late)
        self.running = True

    async def run(self):
        while self.running:
            t = time.monotonic()
            await asyncio.sleep(self.every)
            late = time.monotonic() - t - self.every
            if late > self.threshold and len(self.stalls) < 100_000:
                self.stalls.append((time.monotonic_ns(), round(late * 1e3, 1)))


async def on_schedule(first, stop, step, rate, t_start, end):
    """Yield first, first + step, ... (below stop) each at its time on a schedule of `rate` a second from t_start,
    until end."""
    for n in range(first, stop, step):
        wait = t_start + n / rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if time.monotonic() >= end:
            return
        yield n


def percentile(values, q):
    """Nearest-rank percentile of a list (None if empty)."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, int(q * len(values) + 0.5) - 1))]


# ---------------------------------------------------------------------------
# Role: the fake upstream (its own process)
# ---------------------------------------------------------------------------

HEAD_SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
CHUNK_HEAD = '{"id":"chatcmpl-soak","object":"chat.completion.chunk","created":1700000000,"model":"soak",'
ROLE = ("data: " + CHUNK_HEAD + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"finish_reason":null}]}\n\n').encode()
FINISH = ("data: " + CHUNK_HEAD + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n').encode()
MODELS = json.dumps({"object": "list", "data": [{"id": "soak", "object": "model", "owned_by": "soak"}]}).encode()


def http_chunk(payload):
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def content_event(text):
    return ("data: " + CHUNK_HEAD + '"choices":[{"index":0,"delta":{"content":' + json.dumps(text)
            + '},"finish_reason":null}]}\n\n').encode()


def end_bytes(count):
    usage = ("data: " + CHUNK_HEAD + '"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":%d,'
             '"total_tokens":%d}}\n\n' % (count, count + 8)).encode()
    return http_chunk(FINISH) + http_chunk(usage) + http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def simple_response(status, body, ctype="application/json"):
    return (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status.encode(), ctype.encode(), len(body))) + body


class UpStats:
    connections = 0
    modes = collections.defaultdict(lambda: {"started": 0, "completed": 0, "peer_closed": 0, "dropped": 0,
                                             "chars": 0, "lifetimes": [], "chars_at_close": []})

    lag = None

    @classmethod
    def snapshot(cls):
        return {"connections": cls.connections, "modes": {m: dict(v) for m, v in cls.modes.items()},
                "stalls": cls.lag.stalls if cls.lag else []}


def prompt_params(body):
    """The key=value words of the last user message."""
    params = {}
    try:
        messages = json.loads(body)["messages"]
        text = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
    except (ValueError, KeyError, TypeError, StopIteration):
        return params
    for word in str(text).split():
        key, sep, value = word.partition("=")
        if sep:
            params[key] = value
    return params


class FakeUpstream(asyncio.Protocol):
    """One keep-alive connection, one answer at a time; idle connections close after `idle` s (as uvicorn's 5 s)."""

    def __init__(self, loop, idle):
        self.loop, self.idle = loop, idle
        self.transport = None
        self.buf = b""
        self.busy = False
        self.closed = False
        self.paused = False
        self.timer = None
        self.idle_timer = None
        self.job = None

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024)
        UpStats.connections += 1
        self.arm_idle()

    def arm_idle(self):
        if self.idle_timer:
            self.idle_timer.cancel()
        self.idle_timer = self.loop.call_later(self.idle, self.idle_close) if self.idle > 0 else None

    def idle_close(self):
        self.idle_timer = None
        if not self.busy and not self.closed:
            self.transport.close()

    def connection_lost(self, exc):
        self.closed = True
        UpStats.connections -= 1
        for t in (self.timer, self.idle_timer):
            if t:
                t.cancel()
        if self.busy:
            self.end_job("peer_closed")

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.busy and self.job["mode"] in ("flood", "bomb") and self.timer is None:
            self.timer = self.loop.call_soon(self.flood if self.job["mode"] == "flood" else self.bomb)

    def data_received(self, data):
        self.buf += data
        while not self.busy and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            try:
                method, path, _ = lines[0].split(" ", 2)
            except ValueError:
                self.transport.close()
                return
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip() or 0)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.request(method, path.split("?")[0], body)

    def request(self, method, path, body):
        if self.idle_timer:
            self.idle_timer.cancel()
            self.idle_timer = None
        if method == "GET" and path == "/v1/models":
            self.transport.write(simple_response("200 OK", MODELS))
        elif method == "GET" and path == "/stats":
            self.transport.write(simple_response("200 OK", json.dumps(UpStats.snapshot()).encode()))
        elif method == "POST" and path == "/v1/chat/completions":
            self.start(prompt_params(body))
            return
        else:
            self.transport.write(simple_response("404 Not Found", b'{"error":{"message":"not found"}}'))
        self.arm_idle()

    # -- one answer -------------------------------------------------------------------
    def start(self, p):
        mode = p.get("mode", "paced")
        self.job = {"mode": mode, "t0": time.monotonic(), "sent": 0, "chars": 0,
                    "tokens": int(p.get("tokens", 100)), "interval": 1.0 / float(p.get("rate", 20)),
                    "pad": int(p.get("pad", 0)), "after": int(p.get("after", 20)), "first": int(p.get("first", 5)),
                    "every": float(p.get("every", 2)), "limit": int(p.get("chars", 5_000_000)),
                    "size": max(1, int(p.get("size", 32))), "char": p.get("char", "x")[:1] or "x",
                    "pattern": p.get("pattern", ""), "total": int(p.get("total", 200_000_000)),
                    "line": int(p.get("line", 65536)), "trickle_i": 0}
        self.busy = True
        UpStats.modes[mode]["started"] += 1
        if mode == "hang":
            # Never answer: no status line, no headers. Held until the peer gives up (bounded at 900 s).
            self.timer = self.loop.call_later(900, self.transport.close)
            return
        self.transport.write(HEAD_SSE + http_chunk(ROLE))
        if mode == "flood":
            self.timer = self.loop.call_soon(self.flood)
        elif mode == "bomb":
            # One event that never ends: `data:` lines of `line` bytes (0: one endless line), never a blank
            # line, up to `total` bytes, written as fast as chat.py reads, a 64 KB piece at a time.
            line = self.job["line"]
            piece = (b"data: " + b"x" * line + b"\n") * max(1, 65536 // (line + 7)) if line > 0 else b"x" * 65536
            self.job["piece"] = http_chunk(piece)
            self.job["piece_len"] = len(piece)
            if line <= 0:
                self.transport.write(http_chunk(b"data: "))
            self.timer = self.loop.call_soon(self.bomb)
        else:
            self.job["start"] = self.loop.time()
            self.timer = self.loop.call_at(self.job["start"] + self.job["interval"], self.paced)

    def send_text(self, text):
        self.transport.write(http_chunk(content_event(text)))
        self.job["sent"] += 1
        self.job["chars"] += len(text)
        UpStats.modes[self.job["mode"]]["chars"] += len(text)

    def paced(self):
        self.timer = None
        if self.closed:
            return
        job = self.job
        # The stamp: when this token was handed to the kernel (monotonic_ns is system-wide on Linux).
        self.send_text(" t%d" % time.monotonic_ns() + "x" * job["pad"])
        if job["mode"] == "drop" and job["sent"] >= job["after"]:
            self.drop()
        elif job["mode"] == "trickle" and job["sent"] >= job["first"]:
            self.timer = self.loop.call_later(job["every"], self.trickle)
        elif job["sent"] >= job["tokens"] and job["mode"] not in ("drop", "trickle"):
            self.finish()
        else:
            self.timer = self.loop.call_at(job["start"] + (job["sent"] + 1) * job["interval"], self.paced)

    def trickle(self):
        """One byte of a real token event every `every` s: never silent long enough for a read timeout."""
        self.timer = None
        if self.closed:
            return
        job = self.job
        frame = content_event(" trickle")
        byte = frame[job["trickle_i"] % len(frame):job["trickle_i"] % len(frame) + 1]
        job["trickle_i"] += 1
        self.transport.write(http_chunk(byte))
        if time.monotonic() - job["t0"] > 900:
            self.finish()
        else:
            self.timer = self.loop.call_later(job["every"], self.trickle)

    def flood(self):
        """As fast as the reader drains: `size`-character tokens up to `chars` characters."""
        self.timer = None
        if self.closed or self.paused:
            return
        job = self.job
        token = (job["pattern"] * job["size"])[:job["size"]] if job["pattern"] else job["char"] * job["size"]
        event = http_chunk(content_event(token))
        n = max(1, min(256, (job["limit"] - job["chars"]) // job["size"]))
        self.transport.write(event * n)
        job["sent"] += n
        job["chars"] += n * job["size"]
        UpStats.modes["flood"]["chars"] += n * job["size"]
        if job["chars"] >= job["limit"]:
            self.finish()
        elif not self.paused:
            self.timer = self.loop.call_soon(self.flood)

    def bomb(self):
        """The endless event: pieces written while the transport takes them, the same bytes each time."""
        self.timer = None
        if self.closed or self.paused:
            return
        job = self.job
        for _ in range(16):
            self.transport.write(job["piece"])
            job["chars"] += job["piece_len"]
            UpStats.modes["bomb"]["chars"] += job["piece_len"]
            if job["chars"] >= job["total"]:
                self.transport.write(b"0\r\n\r\n")  # the end of the body, still without a blank line
                self.end_job("completed")
                self.arm_idle()
                return
            if self.paused:
                return
        self.timer = self.loop.call_soon(self.bomb)

    def drop(self):
        """Break off mid-answer: alternately a FIN and a RST, never the last chunk."""
        stats = UpStats.modes["drop"]
        rst = stats["dropped"] % 2 == 1
        self.end_job("dropped")
        if rst:
            sock = self.transport.get_extra_info("socket")
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()
        else:
            self.transport.close()

    def finish(self):
        self.timer = None
        if self.closed or not self.busy:
            return
        self.transport.write(end_bytes(self.job["sent"]))
        self.end_job("completed")
        self.arm_idle()
        if self.buf:
            self.data_received(b"")

    def end_job(self, how):
        if not self.busy:
            return
        self.busy = False
        job = self.job
        stats = UpStats.modes[job["mode"]]
        stats[how] += 1
        if how == "peer_closed" and len(stats["lifetimes"]) < 5000:
            stats["lifetimes"].append(round(time.monotonic() - job["t0"], 3))
            stats["chars_at_close"].append(job["chars"])
        if self.timer:
            self.timer.cancel()
            self.timer = None


def role_upstream(args):
    loop = new_loop()
    server = loop.run_until_complete(loop.create_server(lambda: FakeUpstream(loop, args.idle), HOST, args.port,
                                                        backlog=4096))
    UpStats.lag = LagMonitor()
    loop.create_task(UpStats.lag.run())
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


# ---------------------------------------------------------------------------
# Role: the well-behaved load (its own process)
# ---------------------------------------------------------------------------

class Load:
    """N users, each logged in once from its own address, chatting in a closed loop until told to stop."""

    def __init__(self, args):
        self.a = args
        self.port = args.port
        self.records = []
        self.logins = []
        self.tokens = array.array("q")  # receipt ns, latency ns, pairs
        self.stop = False
        self.ready = 0
        self.lag = LagMonitor()
        self.control_tokens = array.array("q")  # the same pairs for the control chats (no chat.py in the path)

    async def user(self, i):
        xff, jar = f"203.0.113.{i + 1}", Jar()
        await asyncio.sleep(i * 2.0 / max(1, self.a.users))  # a staggered start
        if not await self.log_in(i, xff, jar):
            return
        with contextlib.suppress(*NETERR):
            await http(self.port, "GET", "/", xff=xff, jar=jar)  # the page: sets the owner cookie
        conversation, turns, n = None, 0, 0
        counted = False
        while not self.stop:
            rec = await self.chat(i, xff, jar, conversation, n)
            n += 1
            if not counted and rec["post_status"] == 200:
                # Ready once a send was taken: a user's first send is a new owner, and all of them
                # together start within the new-owner budget (a burst of 20, then 1 a second).
                self.ready += 1
                counted = True
            if rec["post_status"] == 401:
                await self.log_in(i, xff, jar)
            if rec.get("conv") and rec["stream"]:
                conversation, turns = rec["conv"], turns + 1
            if turns >= self.a.turns:
                conversation, turns = None, 0
            if rec["status"] != "done":
                await asyncio.sleep(1.0)  # a person waits a moment before sending again
            await asyncio.sleep(random.uniform(0.3, 1.2))

    async def log_in(self, i, xff, jar):
        jar.pop("chat_session", None)
        for _ in range(60):
            if self.stop:
                return False
            try:
                status = await login(self.port, jar, xff)
            except NETERR as exc:
                status = type(exc).__name__
            self.logins.append((time.monotonic_ns(), i, status))
            if "chat_session" in jar:
                return True
            await asyncio.sleep(1.0)
        return False

    async def chat(self, i, xff, jar, conversation, n):
        t0 = time.monotonic_ns()
        rec = {"user": i, "n": n, "conv": conversation, "t_post": t0, "post_status": None, "post_ms": None,
               "stream": None, "tth_ms": None, "t_first": None, "t_last": None, "t_end": None, "status": None,
               "tokens": 0, "seen": "", "breaks": 0, "t_break": None, "t_back": None, "missing": False}
        self.records.append(rec)
        form = {"prompt": f"soak user={i} n={n} {self.a.params}"}
        if conversation:
            form["conversation"] = conversation
        try:
            status, headers, body = await http(self.port, "POST", "/streaming", xff=xff, jar=jar, form=form,
                                               headers=HTMX, timeout=60)
        except NETERR as exc:
            rec.update(status="post-" + type(exc).__name__, t_end=time.monotonic_ns())
            return rec
        rec["post_ms"] = (time.monotonic_ns() - t0) / 1e6
        rec["post_status"] = status
        text = body.decode("utf-8", "replace")
        m = SSE_CONNECT.search(text)
        if status != 200 or not m:
            rec.update(status=f"post-{status}", t_end=time.monotonic_ns())
            return rec
        rec["stream"] = m.group(1)
        push = dict(headers).get("hx-push-url")
        hidden = HIDDEN_CONVERSATION.search(text)
        if push:
            rec["conv"] = push.rsplit("/", 1)[-1]
        elif hidden:
            rec["conv"] = hidden.group(1)
        seen = []

        def on_token(now, token):
            stamp = STAMP.match(token)
            if stamp:
                self.tokens.append(now)
                self.tokens.append(now - int(stamp.group(1)))
            seen.append(token)
            rec["tokens"] += 1
            if rec["t_first"] is None:
                rec["t_first"] = now
            rec["t_last"] = now

        last_id = 0
        for attempt in range(120):  # reconnects about 1 s apart, as the page does (retry: 1000)
            r = await read_events(self.port, rec["stream"], jar, xff, last_id, on_token)
            if attempt == 0:
                rec["tth_ms"] = r["tth_ms"]
            last_id = r["last_id"]
            if r["end"] == "done":
                rec.update(status="missing" if r["missing"] else r["done"], missing=r["missing"],
                           t_end=r["t_done"])
                if rec["breaks"]:
                    rec["t_back"] = r["t_done"]
                break
            if r["end"] == "http":
                rec["status"] = f"events-{r['http']}"
                break
            rec["breaks"] += 1
            rec["t_break"] = rec["t_break"] or time.monotonic_ns()
            await asyncio.sleep(1.0)
        else:
            rec["status"] = "events-gave-up"
        rec["seen"] = "".join(seen)
        rec["t_end"] = rec["t_end"] or time.monotonic_ns()
        return rec

    async def control(self, k):
        """A chat read straight from the fake upstream: the floor of this machine, phase by phase."""
        body = json.dumps({"model": "soak", "stream": True,
                           "messages": [{"role": "user", "content": f"control {self.a.params}"}]}).encode()
        req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{self.a.upstream_port}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        stamp = re.compile(rb'"content":" t(\d+)')
        await asyncio.sleep(k * 0.7)
        while not self.stop:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.a.upstream_port), 10)
            except NETERR:
                await asyncio.sleep(1)
                continue
            try:
                writer.write(req)
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                for _ in range(100_000):
                    size = int((await asyncio.wait_for(reader.readuntil(b"\r\n"), 30)).split(b";")[0] or b"0", 16)
                    if size == 0:
                        break
                    data = await asyncio.wait_for(reader.readexactly(size + 2), 30)
                    now = time.monotonic_ns()
                    for m in stamp.finditer(data):
                        self.control_tokens.append(now)
                        self.control_tokens.append(now - int(m.group(1)))
                    if b"[DONE]" in data:
                        break
            except NETERR:
                pass
            finally:
                writer.close()
            await asyncio.sleep(random.uniform(0.3, 1.2))

    async def main(self):
        loop = asyncio.get_running_loop()
        lag = asyncio.create_task(self.lag.run())
        users = [asyncio.create_task(self.user(i)) for i in range(self.a.users)]
        users += [asyncio.create_task(self.control(k)) for k in range(self.a.control)]
        stdin_line = loop.run_in_executor(None, sys.stdin.readline)
        announced = False
        end = time.monotonic() + self.a.deadline
        while time.monotonic() < end and not stdin_line.done():
            if not announced and self.ready >= self.a.users:
                print("ready", flush=True)
                announced = True
            await asyncio.sleep(0.2)
        self.stop = True
        # The chats in flight finish (each is bounded); then nothing is left running.
        done, pending = await asyncio.wait(users, timeout=60)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.lag.running = False
        await lag

    def dump(self, path):
        with open(path + ".tokens", "wb") as f:
            self.tokens.tofile(f)
        with open(path + ".control", "wb") as f:
            self.control_tokens.tofile(f)
        with open(path, "w") as f:
            json.dump({"chats": self.records, "logins": self.logins, "tokens_file": path + ".tokens",
                       "control_file": path + ".control",
                       "stalls": self.lag.stalls}, f)


def role_load(args):
    loop = new_loop()
    load = Load(args)
    try:
        loop.run_until_complete(load.main())
    finally:
        load.dump(args.out)
        print("dumped", flush=True)
        os._exit(0)  # the stdin reader thread may still block; nothing else is left to do


# ---------------------------------------------------------------------------
# Role: the process that locks the database
# ---------------------------------------------------------------------------

def role_locker(args):
    db = sqlite3.connect(args.db, timeout=30, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", time.monotonic_ns(), flush=True)
    time.sleep(args.hold)
    db.execute("COMMIT")
    print("released", time.monotonic_ns(), flush=True)
    db.close()


# ---------------------------------------------------------------------------
# /proc readings
# ---------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_status(pid):
    """(VmRSS KiB, threads) from /proc/PID/status."""
    rss = threads = None
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"Threads:"):
                    threads = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, threads


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fds_under(pid, folder):
    """The files under folder that a process holds open (deleted ones too: /proc shows their old path)."""
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{name}")
            if target.startswith(folder):
                out.add(target)
    return out


def db_bytes(path):
    """Bytes of an SQLite database with its WAL."""
    return sum(os.path.getsize(f) for f in (path, path + "-wal") if os.path.exists(f))


def proc_cpu_s(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def proc_runqueue_wait_s(pid, seen):
    """Time a process's threads spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat); `seen`
    keeps each thread's last value, so threads that ended still count."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                seen[(pid, tid)] = int(f.read().split()[1])
    return sum(v for (p, _), v in seen.items() if p == pid) / 1e9


def tcp_kernel_kb():
    """Memory the kernel holds in TCP buffers, all sockets (KiB), from /proc/net/sockstat."""
    try:
        with open("/proc/net/sockstat") as f:
            for line in f:
                if line.startswith("TCP:"):
                    words = line.split()
                    return int(words[words.index("mem") + 1]) * PAGE // 1024
    except (OSError, ValueError):
        pass
    return None


def core_busy():
    """{core: busy seconds} from /proc/stat."""
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("cpu") and line[3:4].isdigit():
                    v = [int(x) for x in line.split()[1:9]]
                    out[int(line[3:].split()[0])] = (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK
    except (OSError, ValueError):
        pass
    return out


def server_side_states(port):
    """{client port: TCP state} of the server's end of every connection to port (/proc/net/tcp)."""
    suffix = ":%04X" % port
    out = {}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[1].endswith(suffix):
                    out[int(parts[2].rsplit(":", 1)[1], 16)] = int(parts[3], 16)
    except (OSError, ValueError, IndexError):
        pass
    return out


TCP_ESTABLISHED = 1


# ---------------------------------------------------------------------------
# The orchestrator
# ---------------------------------------------------------------------------

class Child:
    """A process started here: in its own session, logging to a file, killed by its own id."""

    def __init__(self, name, cmd, log_path, core=None, env=None, cwd=None, stdin=None, stdout=None):
        self.name = name
        self.log = open(log_path, "ab")
        pin = ["taskset", "-c", str(core)] if core is not None and shutil.which("taskset") else []
        self.proc = subprocess.Popen(pin + cmd, stdout=stdout if stdout is not None else self.log, stderr=self.log,
                                     stdin=stdin if stdin is not None else subprocess.DEVNULL, env=env, cwd=cwd,
                                     start_new_session=True)
        self.pid = self.proc.pid  # taskset execs the command: the same pid

    def alive(self):
        return self.proc.poll() is None

    def kill(self, timeout=5.0):
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, sig)
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(OSError):
            self.log.close()


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Soak:
    def __init__(self, args):
        self.a = args
        self.children = []
        self.tmp = tempfile.mkdtemp(prefix="chat-soak-")
        self.chat_tmpdir = os.path.join(self.tmp, "chat-tmpdir")  # chat.py's TMPDIR: it must stay empty
        os.makedirs(self.chat_tmpdir)
        self.logdir = os.path.join(RESULTS, "soak-logs")
        os.makedirs(self.logdir, exist_ok=True)
        for name in os.listdir(self.logdir):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.logdir, name))
        self.mount = None
        self.mount_note = None
        self.chat = None
        self.upstream = None
        self.load = None
        self.port = free_port()
        self.samples = []
        self.phases = []
        self.notes = []
        self.chat_log = os.path.join(self.logdir, "chat.log")
        self.attacker_chats = []  # every attacker chat that got a stream: checked against the store too
        self.sampling = True
        self.cpu_seen = {}  # pid -> CPU seconds, for every process the soak started
        self.rq_seen = {}   # (pid, tid) -> ns chat.py's thread waited for a CPU

    # -- set-up and tear-down --------------------------------------------------------
    def setup_db_dir(self):
        if self.a.no_tmpfs:
            self.mount_note = "--no-tmpfs given"
        elif os.geteuid() != 0:
            self.mount_note = "not root: no tmpfs, the full-disk fault is skipped"
        else:
            path = os.path.join(self.tmp, "tmpfs")
            os.makedirs(path)
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.a.tmpfs_mb}m,mode=0700", "soak", path],
                               capture_output=True, text=True, timeout=20)
            if r.returncode == 0:
                self.mount = path
            else:
                self.mount_note = f"mount failed ({r.stderr.strip() or r.returncode}): the full-disk fault is skipped"
        base = self.mount or self.tmp
        self.db = os.path.join(base, "soak.db")

    def spawn(self, *args, **kwargs):
        child = Child(*args, **kwargs)
        self.children.append(child)
        return child

    def start_upstream(self):
        child = self.spawn("upstream", [PY, __file__, "--role", "upstream", "--port", "0",
                                        "--idle", str(self.a.upstream_idle)],
                           os.path.join(self.logdir, "upstream.log"), core=1, stdout=subprocess.PIPE)
        line = b""
        end = time.monotonic() + 15
        while time.monotonic() < end and not line.startswith(b"listening"):
            line = child.proc.stdout.readline()
            if not line and not child.alive():
                break
        if not line.startswith(b"listening"):
            raise RuntimeError("the fake upstream did not start; see " + child.log.name)
        child.port = int(line.split()[1])
        self.upstream = child

    def start_redis(self):
        """--redis: a redis-server of the soak's own (no persistence, a free port) for CHAT_REDIS_URL."""
        with socket.socket() as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1]
        self.redis = self.spawn("redis", ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                                          "--appendonly", "no", "--dir", self.tmp],
                                os.path.join(self.logdir, "redis.log"))  # not pinned: it serves chat.py, not the harness
        self.redis.url = f"redis://{HOST}:{port}/0"
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection((HOST, port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start; see " + os.path.join(self.logdir, "redis.log"))

    def chat_env(self):
        env = dict(os.environ)
        for name in list(env):
            if name.startswith("CHAT_") or name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "HOST", "PORT"):
                del env[name]
        env.update(SERVER_ENV)
        env.update({"OPENAI_BASE_URL": f"http://{HOST}:{self.upstream.port}/v1", "CHAT_DB": self.db,
                    "PYTHONUNBUFFERED": "1", "TMPDIR": self.chat_tmpdir})
        if self.a.redis:
            # A short lease: after kill -9, the restarted process finishes the dead one's answers
            # from Redis within the kill phase.
            env.update({"CHAT_REDIS_URL": self.redis.url, "CHAT_LEASE_SECONDS": "3"})
        if self.a.monitor_hub:
            # gevent's own monitor thread: logs the stack of anything that blocks the hub for longer.
            env.update({"GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": str(self.a.monitor_hub)})
        return env

    def snapshot_code(self):
        """Copy chat.py with its chat_*.py modules, templates/ and static/: a restart runs the same code even if the
        working tree changes meanwhile, and the JSON says which code was soaked (sha256)."""
        import hashlib
        src = os.path.dirname(os.path.abspath(self.a.chat_py))
        dst = os.path.join(self.tmp, "code")
        os.makedirs(dst)
        shutil.copy2(self.a.chat_py, os.path.join(dst, "chat.py"))
        for name in os.listdir(src):  # its modules (chat_scale.py: Redis and PostgreSQL, imported when configured)
            if name.startswith("chat_") and name.endswith(".py"):
                shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
        for sub in ("templates", "static"):
            if os.path.isdir(os.path.join(src, sub)):
                shutil.copytree(os.path.join(src, sub), os.path.join(dst, sub))
        with open(self.a.chat_py, "rb") as f:
            self.code_sha256 = hashlib.sha256(f.read()).hexdigest()
        r = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        d = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", os.path.basename(self.a.chat_py)],
                           capture_output=True, text=True, timeout=10)
        self.code_version = (r.stdout.strip() or "?") + (" + uncommitted changes" if d.stdout.strip() else "")
        self.code = os.path.join(dst, "chat.py")

    def start_chat(self):
        """chat.py on the soak's port and database; waits (bounded) until /healthz answers."""
        t0 = time.monotonic()
        child = self.spawn("chat.py", [PY, self.code, "--port", str(self.port)], self.chat_log, core=0,
                           env=self.chat_env(), cwd=self.tmp)
        self.chat = child
        end = time.monotonic() + 30
        while time.monotonic() < end:
            if not child.alive():
                raise RuntimeError(f"chat.py exited at start; see {self.chat_log}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as s:
                    s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
                              "Connection: close\r\n\r\n".encode())
                    if s.recv(64).startswith(b"HTTP/1.1 200"):
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"chat.py did not answer /healthz within 30 s; see {self.chat_log}")

    def start_load(self):
        self.load_out = os.path.join(self.logdir, "load.json")
        self.load = self.spawn("load", [PY, __file__, "--role", "load", "--port", str(self.port),
                                        "--users", str(self.a.users), "--turns", "4",
                                        "--control", str(self.a.control), "--upstream-port", str(self.upstream.port),
                                        "--params", self.a.params, "--deadline", str(self.budget() + 60),
                                        "--out", self.load_out],
                               os.path.join(self.logdir, "load.log"), core=1, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)

    def planned_seconds(self):
        """The phases as planned (faults that take longer to resolve add to it)."""
        a = self.a
        return (a.warmup + a.baseline_seconds + len(self.faults()) * a.repeat * (a.fault_seconds + a.quiet_seconds)
                + a.recovery_seconds)

    def budget(self):
        """An upper bound on the whole run (s): phases, plus what faults may add while they resolve."""
        n = len(self.faults()) * self.a.repeat
        return (self.a.warmup + self.a.baseline_seconds + n * (self.a.fault_seconds + self.a.quiet_seconds + 40)
                + self.a.recovery_seconds + 120)

    def faults(self):
        names = [f for f, _ in FAULTS]
        if not self.a.faults:
            return names
        wanted = [f.strip() for f in self.a.faults.split(",") if f.strip()]
        unknown = [f for f in wanted if f not in names]
        if unknown:
            sys.exit(f"unknown fault(s): {', '.join(unknown)}; known: {', '.join(names)}")
        return [f for f in names if f in wanted]

    def cleanup(self):
        for child in reversed(self.children):
            child.kill(timeout=3.0)
        self.children.clear()
        if self.mount:
            for attempt in range(5):
                r = subprocess.run(["umount", self.mount], capture_output=True, text=True, timeout=20)
                if r.returncode == 0:
                    break
                time.sleep(0.5)
            else:
                subprocess.run(["umount", "-l", self.mount], capture_output=True, timeout=20)
                self.notes.append(f"the tmpfs at {self.mount} was busy: unmounted lazily")
            self.mount = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- sampling --------------------------------------------------------------------
    async def sampler(self):
        """Every 0.5 s: chat.py's RSS, fds, threads and CPU; kernel TCP memory; the log's size; core 1."""
        while self.sampling:
            pid = self.chat.pid if self.chat else None
            rss, threads = proc_status(pid) if pid else (None, None)
            try:
                log_size = os.path.getsize(self.chat_log)
            except OSError:
                log_size = None
            for c in self.children:  # a process that ended keeps the CPU it was last seen with
                cpu = proc_cpu_s(c.pid)
                if cpu is not None and c.alive():
                    self.cpu_seen[c.pid] = cpu
            ours = sum(self.cpu_seen.values()) + sum(os.times()[:2])
            self.samples.append({"t": time.monotonic_ns(), "pid": pid, "rss_kb": rss, "threads": threads,
                                 "ours_cpu_s": ours,
                                 "fds": proc_fds(pid) if pid else None, "cpu_s": proc_cpu_s(pid) if pid else None,
                                 "rq_wait_s": proc_runqueue_wait_s(pid, self.rq_seen) if pid else None,
                                 "tcp_kernel_kb": tcp_kernel_kb(), "log": log_size, "cores": core_busy()})
            await asyncio.sleep(0.5)

    async def upstream_stats(self):
        with contextlib.suppress(*NETERR):
            _, _, body = await http(self.upstream.port, "GET", "/stats", timeout=5)
            return json.loads(body)
        return None

    # -- the timeline ----------------------------------------------------------------
    async def phase(self, name, kind, seconds=None, run=None):
        """Record a phase: either a quiet wait of `seconds`, or a fault `run()` (which returns its effect)."""
        t0 = time.monotonic_ns()
        log(f"{name} ({kind})" + (f", {seconds:g} s" if seconds else ""))
        effect = None
        if run is not None:
            try:
                effect = await run()
            except Exception as exc:  # noqa: BLE001 — a broken fault is reported, the soak goes on
                effect = {"ok": False, "summary": f"the fault itself failed: {exc!r}"}
                import traceback
                traceback.print_exc()
        else:
            await asyncio.sleep(seconds)
        p = {"name": name, "kind": kind, "t0": t0, "t1": time.monotonic_ns(), "effect": effect}
        self.phases.append(p)
        return p

    async def run(self):
        self.setup_db_dir()
        self.snapshot_code()
        self.start_upstream()
        if self.a.redis:
            self.start_redis()
        self.start_chat()
        self.started_wall = time.time()
        sampler = asyncio.create_task(self.sampler())
        self.start_load()
        loop = asyncio.get_running_loop()
        # Wait (bounded) until every user has logged in and is chatting.
        ready = loop.run_in_executor(None, self.load.proc.stdout.readline)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready), 90)
        log(f"load: {self.a.users} users chatting; warm-up {self.a.warmup:g} s")
        await asyncio.sleep(self.a.warmup)
        await self.phase("baseline", "baseline", self.a.baseline_seconds)
        for round_ in range(1, self.a.repeat + 1):
            for name in self.faults():
                fn = dict(FAULTS)[name]
                label = name if round_ == 1 else f"{name}#{round_}"
                await self.phase(label, "fault", run=lambda fn=fn: fn(self, self.a.fault_seconds))
                await self.phase(f"quiet after {label}", "quiet", self.a.quiet_seconds)
        await self.phase("recovery", "recovery", self.a.recovery_seconds)
        # Stop the load: users finish the chat in flight, then dump what they saw.
        self.load.proc.stdin.write(b"stop\n")
        self.load.proc.stdin.flush()
        for _ in range(900):
            if not self.load.alive():
                break
            await asyncio.sleep(0.1)
        self.sampling = False
        await sampler
        with open(self.load_out) as f:
            self.load_result = json.load(f)
        self.final_upstream = await self.upstream_stats()
        # Graceful stop: SIGTERM, timed (chat.py saves what is streaming and closes the database).
        t = time.monotonic()
        os.kill(self.chat.pid, signal.SIGTERM)
        for _ in range(150):
            if not self.chat.alive():
                break
            await asyncio.sleep(0.1)
        self.shutdown = {"seconds": round(time.monotonic() - t, 2), "exit": self.chat.proc.poll()}
        self.check_store()
        self.save_state()

    STATE = ("phases", "samples", "attacker_chats", "load_out", "shutdown", "final_upstream", "notes", "code_version",
             "code_sha256", "mount_note", "db", "chat_log", "logdir", "started_wall", "port")

    def save_state(self):
        """Everything the report needs (the store's verdicts included), to rebuild it with --report-from."""
        with open(os.path.join(self.logdir, "state.json"), "w") as f:
            json.dump({k: getattr(self, k) for k in self.STATE} | {"load_result": self.load_result}, f)

    @classmethod
    def from_state(cls, path, args):
        soak = cls.__new__(cls)
        soak.a = args
        with open(path) as f:
            state = json.load(f)
        for k, v in state.items():
            setattr(soak, k, v)
        for sample in soak.samples:
            sample["cores"] = {int(c): v for c, v in sample["cores"].items()}
        # The files of that run are next to its state.json (the directory may have been copied).
        here = os.path.dirname(os.path.abspath(path))
        soak.logdir = here
        soak.chat_log = os.path.join(here, os.path.basename(soak.chat_log))
        for key in ("tokens_file", "control_file"):
            if key in soak.load_result:
                soak.load_result[key] = os.path.join(here, os.path.basename(soak.load_result[key]))
        soak.mount = None
        return soak

    # -- the well-behaved results --------------------------------------------------------
    def check_store(self):
        """Every answer text a client saw must be in the store: stored text starts with what was seen."""
        db = sqlite3.connect(self.db, timeout=30)
        by_conv = collections.defaultdict(list)
        for conv, mid, content, status in db.execute(
                "SELECT conversation_id, id, content, status FROM messages WHERE role = 'assistant' ORDER BY id"):
            by_conv[conv].append((content, status))
        db.close()
        for rec in self.load_result["chats"] + self.attacker_chats:
            rec["stored"] = judge(rec, by_conv)

    def window(self, p):
        return p["t0"], p["t1"]

    def samples_in(self, t0, t1):
        return [s for s in self.samples if t0 <= s["t"] <= t1]

    def log_text(self, t0, t1):
        """What chat.py logged between two moments (by the log size sampled every 0.5 s)."""
        before = [s["log"] for s in self.samples if s["t"] <= t0 and s["log"] is not None]
        after = [s["log"] for s in self.samples if s["t"] >= t1 and s["log"] is not None]
        start = before[-1] if before else 0
        end = after[0] if after else None
        try:
            with open(self.chat_log, "rb") as f:
                f.seek(start)
                data = f.read((end - start) if end is not None else -1)
        except OSError:
            return ""
        return data.decode("utf-8", "replace")


def floor_limit(typical_floor_ms=None):
    """The control chats' p99 above which a window counts as disturbed: 3 x their typical p99 (the median over
    the quiet windows), within 1-10 ms; 10 ms when that is not known."""
    return min(10.0, max(1.0, 3 * typical_floor_ms)) if typical_floor_ms else 10.0


def noisy(floor_p99_ms, foreign_cpu, typical_floor_ms=None):
    """True when this machine's other work disturbed a window: the control chats (no chat.py in the path)
    had a p99 over floor_limit(), or other processes used more than a whole core of the two."""
    return (floor_p99_ms or 0) > floor_limit(typical_floor_ms) or (foreign_cpu or 0) > 1.0


def judge(rec, by_conv):
    """ok | lost (with how much of what was seen is missing) | empty (saw no text)."""
    seen = rec.get("seen") or ""
    if not seen:
        return {"verdict": "empty"}
    stored = by_conv.get(rec.get("conv"), [])
    for content, status in stored:
        if content.startswith(seen):
            return {"verdict": "ok", "status": status}
    best = max((c for c, _ in stored if seen.startswith(c)), key=len, default=None)
    out = {"verdict": "lost", "stored_chars": len(best) if best is not None else None, "seen_chars": len(seen)}
    if best is not None:
        missing = seen[len(best):]
        stamps = [int(x) for x in STAMP.findall(missing)]
        out["missing_tokens"] = len(stamps) or None
        out["first_missing_stamp"] = stamps[0] if stamps else None
    return out


def log(message):
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------
# The faults. Each runs for about `seconds`, then waits (bounded) for what it started to resolve,
# and returns its effect: what it did, what chat.py did, and "ok" if chat.py's defence worked.
# ---------------------------------------------------------------------------

async def attacker_session(soak, xff, owner=True):
    """A logged-in attacker (the shared password leaked, or an abusive user) with its own owner cookie."""
    jar = Jar()
    for _ in range(10):
        with contextlib.suppress(*NETERR):
            await login(soak.port, jar, xff)
        if "chat_session" in jar:
            break
        await asyncio.sleep(1)
    if owner:
        with contextlib.suppress(*NETERR):
            await http(soak.port, "GET", "/", xff=xff, jar=jar)
    return jar


async def fault_slowloris(soak, seconds):
    """Hundreds of connections that never finish a request: a head trickled a byte a second, a body
    trickled after its head, or nothing at all. Each is reopened when chat.py closes it."""
    n = soak.a.slowloris
    limits = {"head": float(SERVER_ENV["CHAT_HEADER_TIMEOUT"]), "body": float(SERVER_ENV["CHAT_HEADER_TIMEOUT"]),
              "silent": float(SERVER_ENV["CHAT_WRITE_TIMEOUT"])}
    results = {k: [] for k in limits}
    end = time.monotonic() + seconds
    state = {"open": 0, "max_open": 0, "connect_failed": 0}

    async def one(kind, k):
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, soak.port), 5)
        except NETERR:
            state["connect_failed"] += 1
            await asyncio.sleep(0.5)
            return
        state["open"] += 1
        state["max_open"] = max(state["max_open"], state["open"])
        xff = f"198.51.100.{1 + k % 49}"
        if kind == "head":
            first = f"GET / HTTP/1.1\r\nHost: {HOST}:{soak.port}\r\n"
            trickle = f"X-Forwarded-For: {xff}\r\nX-Slow: " + "a" * 200
        elif kind == "body":
            first = (f"POST /streaming HTTP/1.1\r\nHost: {HOST}:{soak.port}\r\nX-Forwarded-For: {xff}\r\n"
                     f"Origin: http://{HOST}:{soak.port}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                     "Content-Length: 1000\r\n\r\n")
            trickle = "prompt=" + "a" * 993
        else:
            first = trickle = ""
        response, closed_by, i = b"", None, 0
        try:
            if first:
                writer.write(first.encode())
            read = asyncio.ensure_future(reader.read(4096))
            hard_end = t0 + limits[kind] + 10
            while True:
                done, _ = await asyncio.wait({read}, timeout=1.0)
                if done:
                    try:
                        data = read.result()
                    except OSError:
                        data, closed_by = b"", "reset"
                    if data:
                        response += data
                        read = asyncio.ensure_future(reader.read(4096))
                        continue
                    closed_by = closed_by or "server"
                    break
                if time.monotonic() > hard_end:
                    closed_by = "us (chat.py never closed it)"
                    read.cancel()
                    break
                if i < len(trickle):
                    writer.write(trickle[i].encode())
                    i += 1
        except OSError:
            closed_by = closed_by or "reset"
        finally:
            writer.close()
            state["open"] -= 1
        status = parse_head(response.split(b"\r\n\r\n")[0])[0] if response else None
        results[kind].append({"life": round(time.monotonic() - t0, 2), "status": status, "by": closed_by})

    async def slot(k):
        kind = ("head", "silent", "body")[k % 3]
        for _ in range(10_000):
            if time.monotonic() >= end:
                break
            await one(kind, k)

    await asyncio.gather(*(slot(k) for k in range(n)))
    out = {"connections": sum(len(v) for v in results.values()), "max_open": state["max_open"],
           "connect_failed": state["connect_failed"], "kinds": {}}
    ok = True
    for kind, rows in results.items():
        lives = [r["life"] for r in rows]
        statuses = collections.Counter(str(r["status"]) for r in rows)
        never = sum(1 for r in rows if r["by"].startswith("us"))
        p99 = percentile(lives, 0.99)
        out["kinds"][kind] = {"n": len(rows), "life_p50": percentile(lives, 0.5), "life_p99": p99,
                              "life_max": max(lives) if lives else None, "statuses": dict(statuses),
                              "closed_by": dict(collections.Counter(r["by"] for r in rows)), "limit": limits[kind]}
        if never or p99 is None or p99 > limits[kind] + 2.0:
            ok = False
    k = out["kinds"]
    out["ok"] = ok
    out["summary"] = (f"{out['connections']} connections, up to {out['max_open']} open at once; chat.py closed "
                      f"slow heads after p50 {fmt(k['head']['life_p50'])} s (limit 3; answers "
                      f"{k['head']['statuses']}), "
                      f"silent ones after {fmt(k['silent']['life_p50'])} s (limit 5), slow bodies after "
                      f"{fmt(k['body']['life_p50'])} s with {k['body']['statuses']}")
    return out


async def fault_stuck(soak, seconds, huge=False):
    """Readers that never read. stuck: 16 on each of 4 streams per owner, of long answers (100 tokens/s of
    51 characters until CHAT_MAX_ANSWER_SECONDS) that the kernel's socket buffers can absorb. stuckhuge:
    16 on one answer of 2-character tokens that escape to 8 bytes each (~5 MB of frames for 200,000
    characters, more than a loopback socket's autotuned ~3 MB send buffer), so chat.py's writes block
    and CHAT_WRITE_TIMEOUT must drop them."""
    owners = 1 if huge else soak.a.stuck_owners
    per_stream = int(os.environ.get("SOAK_READERS_PER_STREAM", "16"))
    long_prompt = "stuck mode=paced rate=100 tokens=5000 pad=40"
    huge_prompt = "stuck-huge mode=flood chars=1000000 size=2 char=<"
    tracked = []  # {"sock", "port", "t_open", "released", "state", "kind", "stream"}
    posts = collections.Counter()
    extra = []
    end = time.monotonic() + seconds
    polling = True
    tcp_peak = 0

    async def poll():
        nonlocal tcp_peak
        while polling:
            states = server_side_states(soak.port)
            now = time.monotonic()
            for t in tracked:
                if t["released"] is None:
                    st = states.get(t["port"])
                    if st != TCP_ESTABLISHED:
                        t["released"], t["state"] = now, st
            tcp_peak = max(tcp_peak, tcp_kernel_kb() or 0)
            await asyncio.sleep(0.5)

    async def stuck_reader(stream_id, jar, xff, kind):
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(s, (HOST, soak.port)), 5)
            req = (f"GET /events?stream={stream_id} HTTP/1.1\r\nHost: {HOST}:{soak.port}\r\n"
                   f"Accept: text/event-stream\r\nX-Forwarded-For: {xff}\r\nCookie: {jar.header()}\r\n\r\n")
            await loop.sock_sendall(s, req.encode())
        except NETERR:
            s.close()
            return
        tracked.append({"sock": s, "port": s.getsockname()[1], "t_open": time.monotonic(), "released": None,
                        "state": None, "kind": kind, "stream": stream_id})

    async def answered(socks, deadline=10.0):
        # Until each socket has the start of a response (or the deadline): peeked, so the reader still never reads.
        end_wait = time.monotonic() + deadline
        for s in socks:
            while time.monotonic() < end_wait:
                try:
                    s.recv(1, socket.MSG_PEEK)  # a byte, or b"" once closed: either way it was answered
                    break
                except BlockingIOError:
                    pass
                except OSError:
                    break
                await asyncio.sleep(0.01)

    async def start_stream(jar, xff, prompt):
        try:
            status, _, body = await http(soak.port, "POST", "/streaming", xff=xff, jar=jar,
                                         form={"prompt": prompt}, headers=HTMX, timeout=30)
        except NETERR as exc:
            posts[type(exc).__name__] += 1
            return None
        posts[status] += 1
        m = SSE_CONNECT.search(body.decode("utf-8", "replace"))
        return m.group(1) if status == 200 and m else None

    async def owner_loop(o):
        xff = f"198.51.100.{(60 if huge else 50) + o}"
        jar = await attacker_session(soak, xff)
        wave = 0
        while time.monotonic() < end and wave < 20:
            ids = []
            for _ in range(1 if huge else 4):
                sid = await start_stream(jar, xff, huge_prompt if huge else long_prompt)
                if sid:
                    ids.append(sid)
            for sid in ids:
                await asyncio.gather(*(stuck_reader(sid, jar, xff, "huge" if huge else "long")
                                       for _ in range(per_stream)))
            if o == 0 and wave == 0 and ids:
                # One reader more than CHAT_READERS_PER_STREAM: refused. Sent once the others have their
                # response heads, so that it is the 17th to reach chat.py, not only the 17th to be sent.
                await answered([t["sock"] for t in tracked if t["stream"] == ids[0]])
                r = await read_events(soak.port, ids[0], jar, xff, idle=5)
                extra.append(r["http"])
            wave += 1
            await asyncio.sleep(max(0.0, min(end - time.monotonic(), 12.0)))

    poller = asyncio.create_task(poll())
    await asyncio.gather(*(owner_loop(o) for o in range(owners)))
    # Resolve: chat.py lets go of every stuck reader (stream ends + idle timeout, or write timeout), bounded.
    for _ in range(80):
        if all(t["released"] is not None for t in tracked):
            break
        await asyncio.sleep(0.5)
    polling = False
    await poller
    statuses = collections.Counter()
    for t in tracked:
        with contextlib.suppress(OSError):
            head = t["sock"].recv(12, socket.MSG_PEEK)
            statuses[head[9:12].decode("latin-1") if head.startswith(b"HTTP/1.1 ") else "none"] += 1
        with contextlib.suppress(OSError):
            t["sock"].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t["sock"].close()
    held = {k: [t["released"] - t["t_open"] for t in tracked if t["kind"] == k and t["released"]]
            for k in (("huge",) if huge else ("long",))}
    never = sum(1 for t in tracked if t["released"] is None)
    out = {"readers": len(tracked), "statuses": dict(statuses), "posts": {str(k): v for k, v in posts.items()},
           "extra_reader_status": extra, "never_released": never, "tcp_kernel_peak_mb": round(tcp_peak / 1024, 1),
           "held_s": {k: {"n": len(v), "p50": percentile(v, 0.5), "max": max(v) if v else None}
                      for k, v in held.items()}}
    out["ok"] = never == 0 and (not extra or extra[0] == 429)
    h = out["held_s"]["huge" if huge else "long"]
    out["summary"] = (f"{len(tracked)} stuck readers ({dict(statuses)})"
                      + (f"; the 17th reader of a stream got {extra}" if extra else "")
                      + f"; chat.py let go of them after p50 {fmt(h['p50'])} / max {fmt(h['max'])} s "
                      f"(answers last <= {SERVER_ENV['CHAT_MAX_ANSWER_SECONDS']} s, then "
                      f"{SERVER_ENV['CHAT_WRITE_TIMEOUT']} s "
                      f"idle or write timeout); never released {never}; kernel TCP buffers peaked at "
                      f"{out['tcp_kernel_peak_mb']} MB")
    return out


async def fault_sendflood(soak, seconds):
    """POST /streaming without the owner cookie, so that every send is a new browser: from 20 addresses
    with a session (a logged-in abuser), a tenth with no cookie at all; plus two addresses that mint a
    fresh owner cookie with GET / before each send."""
    rate = soak.a.flood_rate
    addresses = [f"198.51.100.{100 + i}" for i in range(20)]
    minters = [f"198.51.100.{140 + i}" for i in range(2)]
    session = await attacker_session(soak, "198.51.100.99", owner=False)
    session_only = {"chat_session": session.get("chat_session", "")}
    results = collections.defaultdict(collections.Counter)  # kind/address -> statuses
    end = time.monotonic() + seconds
    sem = asyncio.Semaphore(64)
    prompt = "sendflood mode=paced rate=20 tokens=20"

    async def send(kind, xff, jar):
        async with sem:
            try:
                if kind == "mint":
                    await http(soak.port, "GET", "/", xff=xff, jar=jar, timeout=15)
                status, _, _ = await http(soak.port, "POST", "/streaming", xff=xff, jar=jar,
                                          form={"prompt": prompt}, headers=HTMX, timeout=15)
                if status == 303:
                    status = 200  # the no-JavaScript path: accepted all the same
            except NETERR as exc:
                status = type(exc).__name__
        results[(kind, xff)][status] += 1

    tasks = []
    i = 0
    t0 = time.monotonic()
    next_mint = t0
    while time.monotonic() < end and i < rate * seconds + 10:
        xff = addresses[i % len(addresses)]
        if i % 10 == 9:
            tasks.append(asyncio.create_task(send("anonymous", xff, Jar())))
        else:
            tasks.append(asyncio.create_task(send("cookieless", xff, Jar(session_only))))
        if time.monotonic() >= next_mint:
            for m in minters:
                tasks.append(asyncio.create_task(send("mint", m, Jar(session_only))))
            next_mint += 0.5
        i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    await asyncio.gather(*tasks)
    per_kind = collections.defaultdict(collections.Counter)
    accepted_per_address = []
    for (kind, xff), counter in results.items():
        per_kind[kind].update(counter)
        if kind == "cookieless":
            accepted_per_address.append(counter.get(200, 0))
    per_minute = float(os.environ.get("CHAT_NEW_OWNERS_PER_MINUTE", 10))
    allowed = min(3, int(per_minute)) + per_minute / 60 * seconds + 1
    out = {"requests": sum(sum(c.values()) for c in per_kind.values()),
           "by_kind": {k: {str(s): n for s, n in c.items()} for k, c in per_kind.items()},
           "accepted_per_cookieless_address_max": max(accepted_per_address, default=0),
           "allowed_per_address": round(allowed, 1)}
    mint = per_kind["mint"]
    out["mint_accepted"] = f"{mint.get(200, 0)}/{sum(mint.values())}"
    out["ok"] = (out["accepted_per_cookieless_address_max"] <= allowed and per_kind["cookieless"].get(429, 0) > 0
                 and per_kind["anonymous"].get(200, 0) == 0)
    out["summary"] = (f"{out['requests']} sends: cookie-less {dict(per_kind['cookieless'])} (at most "
                      f"{out['accepted_per_cookieless_address_max']} accepted per address, limit ~{allowed:.0f}); "
                      f"no cookie at all {dict(per_kind['anonymous'])}; owner cookie minted by GET / first: "
                      f"{out['mint_accepted']} accepted")
    return out


async def fault_login(soak, seconds):
    """Wrong passwords from 50 addresses as fast as answers come; meanwhile a real person logs in every
    second (a new address each time) and the operator every 2 s from this machine (no X-Forwarded-For)."""
    guessers = [f"198.51.100.{150 + i}" for i in range(50)]
    rate = soak.a.guess_rate
    statuses = collections.Counter()
    checked_at = []  # when a 401 (a password actually checked) came back
    legit = collections.Counter()
    legit_local = collections.Counter()
    end = time.monotonic() + seconds
    count = {"n": 0}
    t_start = time.monotonic()

    async def guesser(k):
        # Worker k sends guesses k, k+16, ...: together `rate` a second, on a schedule.
        async for n in on_schedule(k, int(rate * seconds), 16, rate, t_start, end):
            count["n"] += 1
            try:
                st = await login(soak.port, Jar(), guessers[n % len(guessers)], password=f"guess-{n}", timeout=10)
            except NETERR as exc:
                st = type(exc).__name__
            statuses[st] += 1
            if st == 401:
                checked_at.append(time.monotonic())

    async def person():
        k = 0
        while time.monotonic() < end:
            jar = Jar()
            try:
                await login(soak.port, jar, f"203.0.113.{200 + k % 50}", timeout=10)
                legit["ok" if "chat_session" in jar else "refused"] += 1
            except NETERR as exc:
                legit[type(exc).__name__] += 1
            if k % 2 == 0:
                jar = Jar()
                try:
                    await login(soak.port, jar, None, timeout=10)
                    legit_local["ok" if "chat_session" in jar else "refused"] += 1
                except NETERR as exc:
                    legit_local[type(exc).__name__] += 1
            k += 1
            await asyncio.sleep(1.0)

    t0 = time.monotonic()
    await asyncio.gather(person(), *(guesser(k) for k in range(16)))
    span = max(1e-6, time.monotonic() - t0)
    per_second = collections.Counter(int(t - t0) for t in checked_at)
    out = {"guesses": sum(statuses.values()), "statuses": {str(k): v for k, v in statuses.items()},
           "checked_per_s_avg": round(len(checked_at) / span, 1),
           "checked_per_s_max": max(per_second.values(), default=0),
           "legit_logins": dict(legit), "operator_logins": dict(legit_local)}
    out["ok"] = out["checked_per_s_max"] <= 20 and statuses.get(303, 0) == 0 and statuses.get(429, 0) > 0
    out["summary"] = (f"{out['guesses']} wrong passwords: {out['statuses']}; checked {out['checked_per_s_avg']}/s "
                      f"(max {out['checked_per_s_max']} in one second); real people logging in meanwhile: "
                      f"{dict(legit)}, the operator from this machine: {dict(legit_local)}")
    return out


async def attack_chats(soak, seconds, name, prompt, concurrency, first_octet, think=0.2):
    """Attacker chats whose upstream misbehaves: each slot its own logged-in owner, reading /events to `done`.
    prompt: the words for the fake upstream, or a function of (slot, n) that returns them."""
    before = await soak.upstream_stats()
    rows = []
    end = time.monotonic() + seconds

    async def slot(k):
        xff = f"198.51.100.{first_octet + k}"
        jar = await attacker_session(soak, xff)
        n = 0
        while time.monotonic() < end and n < 2000:
            n += 1
            t0 = time.monotonic_ns()
            words = prompt(k, n) if callable(prompt) else prompt
            rec = {"who": name, "t_post": t0, "conv": None, "seen": "", "status": None, "elapsed": None,
                   "prompt": words, "alert": None}
            try:
                status, headers, body = await http(soak.port, "POST", "/streaming", xff=xff, jar=jar,
                                                   form={"prompt": f"{name} n={n} {words}"}, headers=HTMX,
                                                   timeout=30)
            except NETERR as exc:
                rec["status"] = "post-" + type(exc).__name__
                rows.append(rec)
                await asyncio.sleep(1)
                continue
            m = SSE_CONNECT.search(body.decode("utf-8", "replace"))
            if status != 200 or not m:
                rec["status"] = f"post-{status}"
                rows.append(rec)
                await asyncio.sleep(1)
                continue
            push = dict(headers).get("hx-push-url")
            rec["conv"] = push.rsplit("/", 1)[-1] if push else None
            seen = []
            r = await read_events(soak.port, m.group(1), jar, xff, on_token=lambda now, t: seen.append(t), idle=60)
            rec.update(status=r["done"] if r["end"] == "done" else f"events-{r['end']}", seen="".join(seen),
                       elapsed=(time.monotonic_ns() - t0) / 1e9, alert=r.get("alert"))
            rows.append(rec)
            await asyncio.sleep(think)

    await asyncio.gather(*(slot(k) for k in range(concurrency)))
    after = await soak.upstream_stats()
    soak.attacker_chats.extend(r for r in rows if r["conv"])
    mode_before = (before or {}).get("modes", {})
    mode_after = (after or {}).get("modes", {})
    up = {}
    for mode, stats in mode_after.items():
        b = mode_before.get(mode, {})
        up[mode] = {k: stats[k] - b.get(k, 0) for k in ("started", "completed", "peer_closed", "dropped", "chars")}
        up[mode]["lifetimes"] = stats["lifetimes"][len(b.get("lifetimes", [])):]
        up[mode]["chars_at_close"] = stats["chars_at_close"][len(b.get("chars_at_close", [])):]
    return rows, up


def chat_summary(rows):
    statuses = collections.Counter(r["status"] for r in rows)
    elapsed = [r["elapsed"] for r in rows if r["elapsed"] is not None]
    chars = [len(r["seen"]) for r in rows if r["elapsed"] is not None]
    return statuses, elapsed, chars


async def fault_drop(soak, seconds):
    rows, up = await attack_chats(soak, seconds, "drop", "mode=drop rate=50 after=20", 4, 200)
    statuses, elapsed, chars = chat_summary(rows)
    u = up.get("drop", {})
    out = {"chats": len(rows), "statuses": dict(statuses), "elapsed_p50": percentile(elapsed, 0.5),
           "upstream": {k: v for k, v in u.items() if k not in ("lifetimes", "chars_at_close")}}
    out["ok"] = u.get("dropped", 0) > 0 and set(statuses) == {"error"}
    out["summary"] = (f"{len(rows)} chats, the upstream broke off {u.get('dropped', 0)} of them after 20 tokens "
                      f"(FIN and RST alternately); chat.py ended them {dict(statuses)} after p50 "
                      f"{fmt(percentile(elapsed, 0.5))} s")
    return out


async def fault_trickle(soak, seconds):
    rows, up = await attack_chats(soak, seconds, "trickle", "mode=trickle first=5 rate=20 every=2", 4, 210)
    statuses, elapsed, chars = chat_summary(rows)
    u = up.get("trickle", {})
    limit = float(SERVER_ENV["CHAT_MAX_ANSWER_SECONDS"])
    out = {"chats": len(rows), "statuses": dict(statuses), "elapsed": elapsed,
           "upstream_closed_after": u.get("lifetimes")}
    out["ok"] = bool(rows) and set(statuses) == {"limit"} and max(elapsed) <= limit + 3
    out["summary"] = (f"{len(rows)} chats whose upstream sent 5 tokens, then one byte every 2 s (never silent "
                      f"for CHAT_READ_TIMEOUT=5); chat.py ended them {dict(statuses)} after "
                      f"{fmt(min(elapsed, default=None))}-{fmt(max(elapsed, default=None))} s "
                      f"(CHAT_MAX_ANSWER_SECONDS={limit:g}); the upstream saw its connection closed after "
                      f"{fmt(percentile(u.get('lifetimes') or [], 0.5))} s")
    return out


async def fault_flood(soak, seconds):
    rows, up = await attack_chats(soak, seconds, "flood", "mode=flood chars=5000000 size=32", 2, 220)
    statuses, elapsed, chars = chat_summary(rows)
    u = up.get("flood", {})
    limit = int(SERVER_ENV["CHAT_MAX_ANSWER_CHARS"])
    closed = u.get("chars_at_close") or []
    out = {"chats": len(rows), "statuses": dict(statuses), "chars_seen_max": max(chars, default=None),
           "elapsed_p50": percentile(elapsed, 0.5), "upstream_chars_at_close_max": max(closed, default=None),
           "upstream_completed": u.get("completed")}
    out["ok"] = bool(rows) and set(statuses) == {"limit"} and max(chars) <= limit + 64 and not u.get("completed")
    out["summary"] = (f"{len(rows)} chats whose upstream sends 5,000,000 characters as fast as it can; chat.py "
                      f"ended them {dict(statuses)} after p50 {fmt(percentile(elapsed, 0.5))} s with at most "
                      f"{max(chars, default=0):,} characters shown (limit {limit:,}); the upstream had sent at most "
                      f"{max(closed, default=0):,} when chat.py closed it; answers it finished: {u.get('completed')}")
    return out


async def fault_hang(soak, seconds):
    rows, up = await attack_chats(soak, seconds, "hang", "mode=hang", 4, 230)
    statuses, elapsed, chars = chat_summary(rows)
    u = up.get("hang", {})
    limit = float(SERVER_ENV["CHAT_FIRST_BYTE_TIMEOUT"])
    out = {"chats": len(rows), "statuses": dict(statuses), "elapsed": elapsed,
           "upstream_closed_after": u.get("lifetimes")}
    out["ok"] = bool(rows) and set(statuses) == {"error"} and max(elapsed) <= limit + 3
    out["summary"] = (f"{len(rows)} chats whose upstream never answers; chat.py ended them {dict(statuses)} after "
                      f"{fmt(min(elapsed, default=None))}-{fmt(max(elapsed, default=None))} s "
                      f"(CHAT_FIRST_BYTE_TIMEOUT={limit:g}); the upstream saw the request given up after "
                      f"{fmt(percentile(u.get('lifetimes') or [], 0.5))} s")
    return out


async def fault_dblock(soak, seconds):
    """Another process opens the SQLite file and holds BEGIN EXCLUSIVE for ~10 s."""
    hold = 10.0
    child = soak.spawn("locker", [PY, __file__, "--role", "locker", "--db", soak.db, "--hold", str(hold)],
                       os.path.join(soak.logdir, "locker.log"), core=1, stdout=subprocess.PIPE)
    loop = asyncio.get_running_loop()
    got = {}
    for _ in range(2):
        try:
            line = await asyncio.wait_for(loop.run_in_executor(None, child.proc.stdout.readline), hold + 40)
        except asyncio.TimeoutError:
            break
        words = line.decode().split()
        if len(words) == 2:
            got[words[0]] = int(words[1])
    child.kill()
    rest = seconds - hold
    if rest > 0:
        await asyncio.sleep(rest)
    out = {"locked_at": got.get("locked"), "released_at": got.get("released")}
    if got.get("locked") and got.get("released"):
        out["held_s"] = round((got["released"] - got["locked"]) / 1e9, 2)
    out["ok"] = "held_s" in out  # the effect on chat.py is judged from the load's records (report)
    out["summary"] = f"BEGIN EXCLUSIVE held by another process for {out.get('held_s')} s"
    return out


async def fault_diskfull(soak, seconds):
    """Fill the tmpfs under CHAT_DB with a file, hold it full, free it.

    SQLite writes into its WAL file, which keeps its size between checkpoints: a disk that fills
    up is only noticed when the WAL must grow, which at this load takes minutes. So, as a backup
    tool might, another connection first checkpoints the WAL and truncates it to 0 bytes; then
    chat.py's very next write needs space that is not there."""
    if not soak.mount:
        return {"ok": None, "skipped": True, "summary": f"skipped: {soak.mount_note}"}
    path = os.path.join(soak.mount, "filler")
    hold = max(1.0, seconds * 0.7)

    def truncate_wal():
        db = sqlite3.connect(soak.db, timeout=10, isolation_level=None)
        try:
            for _ in range(10):
                busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                if not busy:
                    return True
                time.sleep(0.2)
            return False
        finally:
            db.close()

    def fill():
        written = 0
        with open(path, "wb", buffering=0) as f:
            for block in (1 << 20, 4096, 1):
                data = b"\0" * block
                for _ in range(1 << 20):
                    try:
                        f.write(data)
                        written += block
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    loop = asyncio.get_running_loop()
    truncated = await loop.run_in_executor(None, truncate_wal)
    wal = soak.db + "-wal"
    wal_size = os.path.getsize(wal) if os.path.exists(wal) else None
    t_full = time.monotonic_ns()
    written = await loop.run_in_executor(None, fill)
    free = os.statvfs(soak.mount)
    await asyncio.sleep(hold)
    os.remove(path)
    t_free = time.monotonic_ns()
    await asyncio.sleep(max(0.0, seconds - hold))
    out = {"wal_truncated": truncated, "wal_bytes_before_fill": wal_size, "filled_mb": round(written / 2**20, 1),
           "free_after_fill_bytes": free.f_bavail * free.f_frsize,
           "full_s": round((t_free - t_full) / 1e9, 1), "t_full": t_full, "t_free": t_free}
    out["ok"] = True  # judged in the report from chat.py's log and the sends refused
    out["summary"] = (f"WAL checkpointed and truncated ({'ok' if truncated else 'BUSY'}), then the tmpfs filled with "
                      f"{out['filled_mb']} MB: full for {out['full_s']} s, then freed")
    return out


async def fault_kill(soak, seconds):
    """kill -9 chat.py mid-load, then start it again on the same port and database."""
    pid = soak.chat.pid
    t_kill = time.monotonic_ns()
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not soak.chat.alive():
            break
        await asyncio.sleep(0.05)
    soak.children.remove(soak.chat)
    soak.chat.kill()
    await asyncio.sleep(soak.a.down_seconds)
    loop = asyncio.get_running_loop()
    t_start = time.monotonic_ns()
    restart_s = await loop.run_in_executor(None, soak.start_chat)
    t_up = time.monotonic_ns()
    await asyncio.sleep(max(0.0, seconds - (t_up - t_kill) / 1e9))
    out = {"t_kill": t_kill, "t_up": t_up, "down_s": round((t_up - t_kill) / 1e9, 2),
           "restart_s": round(restart_s, 2), "old_pid": pid, "new_pid": soak.chat.pid,
           "start_to_healthz_s": round((t_up - t_start) / 1e9, 2)}
    out["ok"] = soak.chat.alive()
    out["summary"] = (f"kill -9 of pid {pid}; restarted on the same port and database, answering again "
                      f"{out['down_s']} s after the kill ({out['restart_s']} s from start to /healthz)")
    return out


async def fault_chunked(soak, seconds):
    """Chunked request bodies before logging in (the audit's repro): GET /login with Transfer-Encoding:
    chunked and either a 1 MB chunk-size line (hex digits, no line ending) or a 1 MiB chunk, from --chunked
    clients at once, each sending again as soon as it is answered. chat.py must answer 411 as soon as the
    head is in and close the connection without reading the body, and never write to its TMPDIR."""
    results = []
    end = time.monotonic() + seconds
    seen = {"files": set(), "fds": set()}
    polling = True
    bodies = {"sizeline": b"f" * (1 << 20),
              "chunk": b"100000\r\n" + b"a" * (1 << 20) + b"\r\n0\r\n\r\n"}

    async def poll():
        while polling:
            with contextlib.suppress(OSError):
                seen["files"].update(os.listdir(soak.chat_tmpdir))
            seen["fds"].update(fds_under(soak.chat.pid, soak.chat_tmpdir))
            await asyncio.sleep(0.1)

    async def one(kind, k):
        xff = f"198.51.100.{1 + k % 49}"
        head = (f"GET /login HTTP/1.1\r\nHost: {HOST}:{soak.port}\r\nX-Forwarded-For: {xff}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n").encode()
        body = bodies[kind]
        r = {"kind": kind, "status": None, "t_status": None, "closed": None, "sent": 0}
        t0 = time.monotonic()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, soak.port), 5)
        except NETERR as exc:
            r["status"] = "connect-" + type(exc).__name__
            results.append(r)
            await asyncio.sleep(0.5)
            return

        async def send():
            with contextlib.suppress(*NETERR):
                writer.write(head)
                for i in range(0, len(body), 65536):
                    writer.write(body[i:i + 65536])
                    await writer.drain()
                    r["sent"] = min(len(body), i + 65536)

        sender = asyncio.ensure_future(send())
        try:
            async with asyncio.timeout(10):
                data = await reader.readuntil(b"\r\n\r\n")
                r["status"], r["t_status"] = parse_head(data[:-4])[0], time.monotonic() - t0
                while await reader.read(65536):  # the connection must be closed after the answer
                    pass
                r["closed"] = time.monotonic() - t0
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if r["status"] is None:
                # chat.py closed with the body unread, so its kernel sent a RST, which can overtake the 411:
                # a reset on the read, or a broken pipe on the write (asyncio then ends the read with it).
                r["status"] = "reset" if isinstance(exc, ConnectionError) else "closed before an answer"
                r["t_status"] = time.monotonic() - t0
            r["closed"] = time.monotonic() - t0
        except NETERR as exc:
            r["status"] = r["status"] or type(exc).__name__
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, *NETERR):
                await sender
            writer.close()
        results.append(r)

    async def slot(k):
        n = 0
        while time.monotonic() < end and n < 10_000:
            await one(("sizeline", "chunk")[(k + n) % 2], k)
            n += 1
            await asyncio.sleep(0.05)

    poller = asyncio.create_task(poll())
    await asyncio.gather(*(slot(k) for k in range(soak.a.chunked)))
    await asyncio.sleep(0.5)
    polling = False
    await poller
    with contextlib.suppress(OSError):
        seen["files"].update(os.listdir(soak.chat_tmpdir))
    statuses = collections.Counter(str(r["status"]) for r in results)
    answered = [r["t_status"] for r in results if r["t_status"] is not None]
    unclosed = sum(1 for r in results if r["closed"] is None)
    sent = [r["sent"] for r in results]
    out = {"requests": len(results), "statuses": dict(statuses),
           "answered_s": {"p50": percentile(answered, 0.5), "p99": percentile(answered, 0.99),
                          "max": max(answered, default=None)},
           "left_open": unclosed, "body_bytes_sent_p50": percentile(sent, 0.5),
           "tmpdir_files": sorted(seen["files"])[:20], "tmpdir_fds": sorted(seen["fds"])[:20]}
    out["ok"] = (bool(results) and set(statuses) <= {"411", "reset"} and statuses.get("411", 0) > 0
                 and not unclosed and not seen["files"] and not seen["fds"]
                 and (percentile(answered, 0.99) or 99) <= 1.0)
    out["summary"] = (f"{len(results)} GET /login with a chunked body (a 1 MB chunk-size line or a 1 MiB chunk), "
                      f"{soak.a.chunked} at once: answers {dict(statuses)} (reset: chat.py closed with the body "
                      f"unread, and the RST overtook the 411) after p50 "
                      f"{fmt(out['answered_s']['p50'] and out['answered_s']['p50'] * 1e3)} / p99 "
                      f"{fmt(out['answered_s']['p99'] and out['answered_s']['p99'] * 1e3)} ms, each connection then "
                      f"closed by chat.py ({unclosed} left open); the clients got p50 "
                      f"{(out['body_bytes_sent_p50'] or 0) // 1024} KB of the body into the socket before that; "
                      f"chat.py's TMPDIR: {len(seen['files'])} files, {len(seen['fds'])} open files seen")
    return out


async def fault_hog(soak, seconds):
    """One client address (X-Forwarded-For through the trusted proxy) tries to hold every connection:
    --hog connections, each sending GET /healthz and keeping its connection alive with another request
    every 2 s (within CHAT_WRITE_TIMEOUT), reconnecting when refused. Meanwhile another address probes."""
    share = int(SERVER_ENV.get("CHAT_CONNECTIONS_PER_ADDRESS") or int(SERVER_ENV["CHAT_MAX_CONNECTIONS"]) // 10)
    xff = "198.51.100.77"
    state = {"held": 0, "max_held": 0}
    statuses = collections.Counter()
    refused_closed, refused_open = [], 0
    probe = collections.Counter()
    end = time.monotonic() + seconds
    req = (f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{soak.port}\r\nX-Forwarded-For: {xff}\r\n\r\n").encode()

    async def slot(k):
        nonlocal refused_open
        await asyncio.sleep(k * 0.002)
        while time.monotonic() < end:
            held = False
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, soak.port), 5)
            except NETERR as exc:
                statuses["connect-" + type(exc).__name__] += 1
                await asyncio.sleep(1)
                continue
            try:
                while time.monotonic() < end:
                    writer.write(req)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    status, headers = parse_head(head[:-4])
                    await asyncio.wait_for(read_body(reader, headers, 1 << 16), 10)
                    statuses[status] += 1
                    if status != 200:
                        t = time.monotonic()
                        try:
                            await asyncio.wait_for(reader.read(1), 3)  # b"": closed by chat.py
                            refused_closed.append(time.monotonic() - t)
                        except NETERR:
                            refused_open += 1
                        break
                    if not held:
                        held = True
                        state["held"] += 1
                        state["max_held"] = max(state["max_held"], state["held"])
                    await asyncio.sleep(2.0)
            except NETERR as exc:
                statuses[type(exc).__name__] += 1
            finally:
                if held:
                    state["held"] -= 1
                writer.close()
            if not held:
                await asyncio.sleep(1.0)

    async def prober():
        while time.monotonic() < end:
            try:
                status, _, _ = await http(soak.port, "GET", "/healthz", xff="198.51.100.78", timeout=5)
            except NETERR as exc:
                status = type(exc).__name__
            probe[status] += 1
            await asyncio.sleep(0.5)

    await asyncio.gather(prober(), *(slot(k) for k in range(soak.a.hog)))
    out = {"connections_tried": soak.a.hog, "share": share, "max_held_at_once": state["max_held"],
           "statuses": {str(k): v for k, v in statuses.items()}, "refused_closed_s_max": max(refused_closed, default=None),
           "refused_left_open": refused_open, "other_address": {str(k): v for k, v in probe.items()}}
    out["ok"] = (state["max_held"] <= share and statuses.get(429, 0) > 0 and not refused_open
                 and set(probe) == {200})
    out["summary"] = (f"one address opened {soak.a.hog} keep-alive connections (its share: {share}): it held at most "
                      f"{state['max_held']} at once; answers {out['statuses']}; every refused connection closed by "
                      f"chat.py within {fmt(out['refused_closed_s_max'] and out['refused_closed_s_max'] * 1e3)} ms "
                      f"({refused_open} left open); another address meanwhile: {out['other_address']}")
    return out


async def fault_owners(soak, seconds):
    """Sends without the owner cookie (each a new browser) from --owner-addresses rotating addresses, with a
    session (a logged-in abuser), --owner-rate a second: only the total new-owner budget can stop them."""
    rate = soak.a.owner_rate
    addresses = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(soak.a.owner_addresses)]
    session = await attacker_session(soak, "198.51.100.98", owner=False)
    session_only = {"chat_session": session.get("chat_session", "")}
    loop = asyncio.get_running_loop()

    def conversations():
        """The attacker's conversations stored, and the bytes of their messages (the users' own chats apart)."""
        db = sqlite3.connect(f"file:{soak.db}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute("SELECT COUNT(DISTINCT conversation_id), COALESCE(SUM(LENGTH(content)), 0) "
                              "FROM messages WHERE conversation_id IN (SELECT conversation_id FROM messages "
                              "WHERE role = 'user' AND content LIKE 'owners mode=%')").fetchone()
        finally:
            db.close()

    conv_before = await loop.run_in_executor(None, conversations)
    bytes_before = db_bytes(soak.db)
    results = collections.Counter()
    accepted_by = collections.Counter()
    sem = asyncio.Semaphore(64)
    end = time.monotonic() + seconds

    async def send(xff):
        async with sem:
            try:
                status, _, _ = await http(soak.port, "POST", "/streaming", xff=xff, jar=Jar(session_only),
                                          form={"prompt": "owners mode=paced rate=20 tokens=20"}, headers=HTMX,
                                          timeout=15)
            except NETERR as exc:
                status = type(exc).__name__
        results[status] += 1
        if status == 200:
            accepted_by[xff] += 1

    tasks, i, t0 = [], 0, time.monotonic()
    while time.monotonic() < end and i < rate * seconds + 10:
        tasks.append(asyncio.create_task(send(addresses[i % len(addresses)])))
        i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    await asyncio.gather(*tasks)
    span = time.monotonic() - t0
    await asyncio.sleep(2.0)  # the accepted answers (20 tokens at 20/s) end and are saved
    conv_after = await loop.run_in_executor(None, conversations)
    total = float(SERVER_ENV.get("CHAT_NEW_OWNERS_PER_MINUTE_TOTAL", 60))
    allowed = max(1, min(20, int(total))) + total / 60 * span + 1
    accepted = results.get(200, 0)
    out = {"sends": sum(results.values()), "addresses": len(addresses), "statuses": {str(k): v for k, v in results.items()},
           "accepted": accepted, "allowed": round(allowed, 1), "accepted_max_per_address": max(accepted_by.values(), default=0),
           "new_conversations": conv_after[0] - conv_before[0],
           "their_text_kb": round((conv_after[1] - conv_before[1]) / 1024, 1),
           "db_growth_kb": round((db_bytes(soak.db) - bytes_before) / 1024)}
    out["ok"] = accepted <= allowed and results.get(429, 0) > 0 and out["new_conversations"] <= allowed + 2
    out["summary"] = (f"{out['sends']} cookie-less sends from {len(addresses)} rotating addresses: {out['statuses']}; "
                      f"{accepted} new owners taken in {span:.0f} s (the total budget allows <= {allowed:.0f}: a burst "
                      f"of 20, then {total:g}/min), at most {out['accepted_max_per_address']} per address; "
                      f"{out['new_conversations']} conversations of theirs stored ({out['their_text_kb']} KB of text); "
                      f"the database grew {out['db_growth_kb']} KB meanwhile, the users' own chats included")
    return out


async def fault_guessrotate(soak, seconds):
    """Wrong passwords (--guess-rate a second) from a new address each time: half IPv4 (198.18.x.y, a fresh one
    per guess), half IPv6 addresses within one /64. Meanwhile, every second, a browser that logged in here
    before (its chat_device cookie, no session) logs in again, and a browser that never did tries too."""
    rate = soak.a.guess_rate
    net6 = "2001:db8:5:7"
    device_jar = Jar()
    with contextlib.suppress(*NETERR):
        await login(soak.port, device_jar, "203.0.113.251")
    device = device_jar.get("chat_device")
    statuses = {"ipv4": collections.Counter(), "ipv6": collections.Counter()}
    checked = {"ipv4": [], "ipv6": []}
    known, new, retry_after = collections.Counter(), collections.Counter(), []
    end = time.monotonic() + seconds
    t_start = time.monotonic()

    async def guesser(k):
        async for n in on_schedule(k, int(rate * seconds), 16, rate, t_start, end):
            if n % 2:
                family, xff = "ipv6", f"{net6}:{random.getrandbits(16):x}:{random.getrandbits(16):x}:" \
                                      f"{random.getrandbits(16):x}:{random.getrandbits(16):x}"
            else:
                family, xff = "ipv4", f"198.18.{(n // 2) // 250 % 250}.{(n // 2) % 250 + 1}"
            try:
                st = await login(soak.port, Jar(), xff, password=f"guess-{n}", timeout=10)
            except NETERR as exc:
                st = type(exc).__name__
            statuses[family][st] += 1
            if st == 401:
                checked[family].append(time.monotonic())

    async def browsers():
        await asyncio.sleep(min(2.0, seconds / 4))  # the guesses have emptied the shared budget by then
        k = 0
        while time.monotonic() < end:
            form = {"password": PASSWORD, "next": "/"}
            try:
                st, _, _ = await http(soak.port, "POST", "/login", xff="203.0.113.251",
                                      jar=Jar({"chat_device": device} if device else {}), form=form, timeout=10)
            except NETERR as exc:
                st = type(exc).__name__
            known[st] += 1
            try:
                st, headers, _ = await http(soak.port, "POST", "/login", xff=f"203.0.113.{230 + k % 20}", jar=Jar(),
                                            form=form, timeout=10)
                if st == 429:
                    retry_after.append(dict(headers).get("retry-after"))
            except NETERR as exc:
                st = type(exc).__name__
            new[st] += 1
            k += 1
            await asyncio.sleep(1.0)

    t0 = time.monotonic()
    await asyncio.gather(browsers(), *(guesser(k) for k in range(16)))
    span = max(1e-6, time.monotonic() - t0)
    every = checked["ipv4"] + checked["ipv6"]
    per_second = collections.Counter(int(t - t0) for t in every)
    allowed6 = 5 + span / 6 + 1
    out = {"guesses": {f: sum(c.values()) for f, c in statuses.items()},
           "statuses": {f: {str(k): v for k, v in c.items()} for f, c in statuses.items()},
           "checked_per_s_avg": round(len(every) / span, 1), "checked_per_s_max": max(per_second.values(), default=0),
           "checked_in_the_64": len(checked["ipv6"]), "allowed_in_the_64": round(allowed6, 1),
           "known_browser_logins": {str(k): v for k, v in known.items()},
           "new_browser_logins": {str(k): v for k, v in new.items()},
           "retry_after": dict(collections.Counter(retry_after)), "device_cookie": bool(device)}
    out["allowed_checked"] = round(10 + 10 * span + 1, 1)  # the shared budget: a burst of 10, then 10 a second
    out["ok"] = (bool(device) and len(every) <= out["allowed_checked"] and out["checked_per_s_max"] <= 20
                 and len(checked["ipv6"]) <= allowed6 and set(known) <= {302, 303} and known
                 and new.get(429, 0) > 0 and None not in retry_after
                 and not any(s.get(303) for s in statuses.values()))
    out["summary"] = (f"{sum(out['guesses'].values())} wrong passwords from rotating addresses ({out['guesses']['ipv4']} "
                      f"IPv4, each new; {out['guesses']['ipv6']} IPv6 within one /64): IPv4 {out['statuses']['ipv4']}, "
                      f"IPv6 {out['statuses']['ipv6']}; {len(every)} checked in {span:.0f} s (the shared budget: <= "
                      f"{out['allowed_checked']:.0f}), {out['checked_per_s_avg']}/s (max "
                      f"{out['checked_per_s_max']} in one second), {len(checked['ipv6'])} of them in the /64 (its "
                      f"budget: <= {allowed6:.0f}); meanwhile a browser with its device cookie logged in "
                      f"{out['known_browser_logins']}, a new browser got {out['new_browser_logins']} "
                      f"(Retry-After {out['retry_after']})")
    return out


async def fault_search(soak, seconds):
    """GET /search without the owner cookie (so each is a new owner with a fresh per-owner budget), with a
    session, --search-rate a second from each of 3 addresses: only the per-address budget stops them."""
    addresses = [f"198.51.100.{120 + i}" for i in range(3)]
    rate = soak.a.search_rate
    session = await attacker_session(soak, "198.51.100.97", owner=False)
    session_only = {"chat_session": session.get("chat_session", "")}
    results = {a: collections.Counter() for a in addresses}
    end = time.monotonic() + seconds
    t0 = time.monotonic()

    async def searcher(xff, k):
        n, tasks = 0, []
        sem = asyncio.Semaphore(16)

        async def one(n):
            async with sem:
                try:
                    st, _, _ = await http(soak.port, "GET", f"/search?q=soak+word{n}+t{n % 7}", xff=xff,
                                          jar=Jar(session_only), headers=HTMX, timeout=10)
                except NETERR as exc:
                    st = type(exc).__name__
            results[xff][st] += 1

        while time.monotonic() < end and n < rate * seconds + 10:
            tasks.append(asyncio.create_task(one(n)))
            n += 1
            await asyncio.sleep(max(0.0, t0 + k * 0.01 + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)

    await asyncio.gather(*(searcher(a, k) for k, a in enumerate(addresses)))
    span = time.monotonic() - t0
    allowed = 20 + 5 * span + 1
    accepted = {a: c.get(200, 0) for a, c in results.items()}
    out = {"searches": sum(sum(c.values()) for c in results.values()),
           "statuses": {a: {str(k): v for k, v in c.items()} for a, c in results.items()},
           "accepted_per_address_max": max(accepted.values()), "allowed_per_address": round(allowed, 1)}
    out["ok"] = out["accepted_per_address_max"] <= allowed and all(c.get(429, 0) for c in results.values())
    merged = collections.Counter()
    for c in results.values():
        merged.update(c)
    out["summary"] = (f"{out['searches']} cookie-less searches, {rate:g}/s from each of {len(addresses)} addresses: "
                      f"{ {str(k): v for k, v in merged.items()} }; at most {out['accepted_per_address_max']} answered "
                      f"per address in {span:.0f} s (budget: a burst of 20, then 5/s: <= {allowed:.0f})")
    return out


BOMB_SHAPES = ("line=65536", "line=8", "line=0")  # 64 KB lines, 8-byte lines, one endless line


async def fault_bomb(soak, seconds):
    """Attacker chats whose upstream answers 200 MB of `data:` lines and never a blank line: one event that
    never ends, in three shapes (long lines, short lines, one endless line), streamed as fast as chat.py reads."""
    rows, up = await attack_chats(soak, seconds, "bomb",
                                  lambda k, n: f"mode=bomb total=200000000 {BOMB_SHAPES[(k + n) % 3]}", 2, 240)
    statuses, elapsed, chars = chat_summary(rows)
    u = up.get("bomb", {})
    closed = u.get("chars_at_close") or []
    alerts = collections.Counter((r["alert"] or "(none)")[:90] for r in rows if r["elapsed"] is not None)
    out = {"chats": len(rows), "statuses": dict(statuses), "alerts": dict(alerts),
           "elapsed_p50": percentile(elapsed, 0.5), "elapsed_max": max(elapsed, default=None),
           "upstream_bytes_at_close_max": max(closed, default=None), "upstream_completed": u.get("completed")}
    with_alert = sum(1 for r in rows if r["elapsed"] is not None and r["alert"] and "MiB" in r["alert"])
    out["ok"] = (bool(rows) and set(statuses) == {"error"} and with_alert == len(rows)
                 and not u.get("completed"))
    out["summary"] = (f"{len(rows)} chats whose upstream sends 200 MB of `data:` lines with no blank line; chat.py "
                      f"ended them {dict(statuses)} after p50 {fmt(out['elapsed_p50'], 2)} / max "
                      f"{fmt(out['elapsed_max'], 2)} s, {with_alert} with the alert {list(alerts)}; the upstream had "
                      f"sent at most {(max(closed, default=0)) / 2**20:.1f} MB when chat.py closed it; answers it "
                      f"finished: {u.get('completed')}")
    return out


RENDER_PATTERNS = ("\\(", "![", "*_", "[", "\\[")


async def fault_render(soak, seconds):
    """Attacker chats whose upstream answers pathological Markdown/TeX just under CHAT_MAX_ANSWER_CHARS, as fast
    as chat.py reads: one pattern repeated (\\( with no closer, ![, *_, [, \\[), 64 characters a token."""
    limit = int(SERVER_ENV["CHAT_MAX_ANSWER_CHARS"])
    rows, up = await attack_chats(
        soak, seconds, "render",
        lambda k, n: f"mode=flood chars={limit - 1024} size=64 pattern={RENDER_PATTERNS[(2 * n + k) % len(RENDER_PATTERNS)]}",
        2, 245)
    statuses, elapsed, chars = chat_summary(rows)
    by_pattern = collections.defaultdict(list)
    for r in rows:
        if r["elapsed"] is not None:
            by_pattern[r["prompt"].rsplit("pattern=", 1)[-1]].append(r["elapsed"])
    out = {"chats": len(rows), "statuses": dict(statuses), "chars_seen_max": max(chars, default=None),
           "elapsed_by_pattern": {p: {"n": len(v), "max": max(v)} for p, v in by_pattern.items()}}
    out["ok"] = bool(rows)  # judged with the well-behaved chats' done delay (judge_faults)
    out["summary"] = (f"{len(rows)} chats of ~{(limit - 1024) // 1000} K characters of one pattern repeated; they "
                      f"ended {dict(statuses)}, post to `done` by pattern (max s): "
                      f"{ {p: round(v['max'], 1) for p, v in out['elapsed_by_pattern'].items()} }")
    return out


FAULTS = [
    ("slowloris", fault_slowloris),
    ("chunked", fault_chunked),
    ("hog", fault_hog),
    ("stuck", fault_stuck),
    ("stuckhuge", lambda soak, seconds: fault_stuck(soak, seconds, huge=True)),
    ("sendflood", fault_sendflood),
    ("owners", fault_owners),
    ("login", fault_login),
    ("guessrotate", fault_guessrotate),
    ("search", fault_search),
    ("drop", fault_drop),
    ("trickle", fault_trickle),
    ("flood", fault_flood),
    ("bomb", fault_bomb),
    ("render", fault_render),
    ("hang", fault_hang),
    ("dblock", fault_dblock),
    ("diskfull", fault_diskfull),
    ("kill", fault_kill),
]


def fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

LOG_PATTERNS = {
    "database is locked": re.compile(r"database is locked"),
    "disk full": re.compile(r"disk is full|database or disk is full"),
    "slow heads closed (logged)": re.compile(r"its request head took over"),
    "write timeouts": re.compile(r"TimeoutError: timed out|socket.timeout|took no data for"),  # one rate-limited line
    "tracebacks": re.compile(r"^Traceback", re.M),
    "failed logins (logged)": re.compile(r"failed login"),
    "saving failed": re.compile(r"saving (the answer|partial answers) failed"),
    "storing a message failed": re.compile(r"storing a message failed"),
    "upstream broke off": re.compile(r"upstream broke off"),
    "connections over an address's share": re.compile(r"holds its share of the connections"),
    "new visitors over the total": re.compile(r"CHAT_NEW_OWNERS_PER_MINUTE_TOTAL reached"),
    "logins refused (logged)": re.compile(r"refused a login from"),
    "bad request heads": re.compile(r"refused a request head"),
    "411 answers (access log)": re.compile(r'" 411 \d'),
}


FOLDED = re.compile(r"\(and (\d+) more like it\)")


def log_counts(text):
    out = {}
    lines = text.splitlines()
    for name, pattern in LOG_PATTERNS.items():
        n = 0
        for line in lines:
            if pattern.search(line):
                # log_limited() folds repeats into "(and N more like it)".
                folded = FOLDED.search(line)
                n += 1 + (int(folded.group(1)) if folded else 0)
        if n:
            out[name] = n
    return out


def build_report(soak):
    chats = soak.load_result["chats"]
    tokens = array.array("q")
    with open(soak.load_result["tokens_file"], "rb") as f:
        tokens.frombytes(f.read())
    control = array.array("q")
    with contextlib.suppress(OSError, KeyError):
        with open(soak.load_result["control_file"], "rb") as f:
            control.frombytes(f.read())
    c_pairs = sorted(zip(control[0::2], control[1::2]))
    c_recv = [a for a, _ in c_pairs]
    c_lat = [b / 1e6 for _, b in c_pairs]

    def floor_ms(t0, t1):
        return c_lat[bisect.bisect_left(c_recv, t0):bisect.bisect_right(c_recv, t1)]

    recv, lat = tokens[0::2], tokens[1::2]
    order = sorted(range(len(recv)), key=recv.__getitem__)
    recv = [recv[i] for i in order]
    lat = [lat[i] for i in order]

    # Tokens the load client read late because its own process was descheduled (a stall of its
    # event loop: the machine is shared) are left out of p99*: that delay is not chat.py's.
    stalls = sorted((t - int((ms + 5) * 1e6), t + 20_000_000) for t, ms in soak.load_result.get("stalls", []))
    starts = [a for a, _ in stalls]

    def stalled(t):
        i = bisect.bisect_right(starts, t) - 1
        return i >= 0 and t <= stalls[i][1]

    def lat_ms(t0, t1, clean=False):
        a, b = bisect.bisect_left(recv, t0), bisect.bisect_right(recv, t1)
        if clean:
            return [lat[i] / 1e6 for i in range(a, b) if not stalled(recv[i])]
        return [x / 1e6 for x in lat[a:b]]

    baseline = next(p for p in soak.phases if p["kind"] == "baseline")
    # The reference: p99* of the tokens of every quiet window taken together (baseline, the quiet
    # after each fault, recovery), all under the same steady load, interleaved with the faults, so
    # it sees the machine's hiccups as often as a fault phase does. (The median of each window's
    # own p99* is kept for comparison: quiet windows are short, most hold no hiccup at all, so it
    # is lower than the p99* of a longer phase with no fault in it: of the baseline, for one.)
    # Only windows this machine's other work left alone count (see noisy()); if fewer than two were, all count.
    quiet = []
    for p in soak.phases:
        if p["kind"] not in ("baseline", "quiet", "recovery"):
            continue
        t0, t1 = soak.window(p)
        smp = [x for x in soak.samples_in(t0, t1) if x.get("rq_wait_s") is not None]
        smp = [x for x in smp if x["pid"] == smp[-1]["pid"]] if smp else []
        rq = (smp[-1]["rq_wait_s"] - smp[0]["rq_wait_s"]) / ((t1 - t0) / 1e9) * 1e3 if len(smp) > 1 else None
        fl = percentile(floor_ms(t0, t1), 0.99)
        allsmp = soak.samples_in(t0, t1)
        busy = [sum(x["cores"].values()) for x in allsmp]
        ours = [x["ours_cpu_s"] for x in allsmp]
        foreign = (max(0.0, (busy[-1] - busy[0]) - (ours[-1] - ours[0])) / ((t1 - t0) / 1e9)
                   if len(busy) > 1 else None)
        window = lat_ms(t0, t1, clean=True)
        quiet.append({"phase": p["name"], "p99_clean_ms": percentile(window, 0.99), "tokens": window,
                      "runqueue_wait_ms_per_s": rq, "floor_p99_ms": fl, "foreign_cpu": foreign})
    floors = [q["floor_p99_ms"] for q in quiet if q["floor_p99_ms"] is not None]
    soak.typical_floor = statistics.median(floors) if floors else None
    for q in quiet:
        q["clean"] = q["floor_p99_ms"] is not None and not noisy(q["floor_p99_ms"], q["foreign_cpu"],
                                                                 soak.typical_floor)
    clean_windows = [q for q in quiet if q["clean"] and q["tokens"]]
    every_window = [q for q in quiet if q["tokens"]]
    use = clean_windows if len(clean_windows) >= 2 else every_window
    base_p99 = percentile([x for q in use for x in q["tokens"]], 0.99) if use else None
    for q in quiet:
        del q["tokens"]
    soak.reference = {"windows": quiet, "pooled": base_p99, "from": "clean" if use is clean_windows else "all",
                      "median_of_windows": statistics.median(q["p99_clean_ms"] for q in use) if use else None,
                      "baseline_window": percentile(lat_ms(*soak.window(baseline), clean=True), 0.99)}
    base_samples = soak.samples_in(*soak.window(baseline))
    base_rss = max((s["rss_kb"] for s in base_samples if s["rss_kb"]), default=None)
    base_fds = max((s["fds"] for s in base_samples if s["fds"]), default=None)
    base_done_delay = [(c["t_end"] - c["t_last"]) / 1e6 for c in chats
                       if c["status"] == "done" and c["t_last"] and baseline["t0"] <= c["t_end"] <= baseline["t1"]]

    rows = []
    for i, p in enumerate(soak.phases):
        t0, t1 = soak.window(p)
        in_phase = [c for c in chats if c["t_end"] and t0 <= c["t_end"] <= t1]
        posted = [c for c in chats if t0 <= c["t_post"] <= t1]
        done = [c for c in in_phase if c["status"] == "done"]
        failed = [c for c in in_phase if c["status"] != "done"]
        lost = [c for c in in_phase if c.get("stored", {}).get("verdict") == "lost"]
        ls = lat_ms(t0, t1)
        clean = lat_ms(t0, t1, clean=True)
        smp = soak.samples_in(t0, t1)
        cpu = [s["cpu_s"] for s in smp if s["cpu_s"] is not None and s["pid"] == smp[-1]["pid"]] if smp else []
        rq = ([s["rq_wait_s"] for s in smp if s.get("rq_wait_s") is not None and s["pid"] == smp[-1]["pid"]]
              if smp else [])
        dt = (t1 - t0) / 1e9
        cores1 = [s["cores"].get(1) for s in smp if s["cores"].get(1) is not None]
        busy = [sum(s["cores"].values()) for s in smp]
        ours = [s["ours_cpu_s"] for s in smp]
        row = {
            "phase": p["name"], "kind": p["kind"], "seconds": round(dt, 1), "t0": t0, "t1": t1,
            "chats_done": len(done), "chats_failed": len(failed),
            "failed_by": dict(collections.Counter(c["status"] for c in failed)),
            "answers_lost": len(lost),
            "lost_detail": [c["stored"] | {"user": c["user"], "status": c["status"]} for c in lost][:50],
            "tokens": len(ls), "p50_ms": percentile(ls, 0.5), "p99_ms": percentile(ls, 0.99),
            "p99_clean_ms": percentile(clean, 0.99), "tokens_left_out": len(ls) - len(clean),
            "floor_p99_ms": percentile(floor_ms(t0, t1), 0.99), "floor_tokens": len(floor_ms(t0, t1)),
            "p99_ratio": (percentile(clean, 0.99) / base_p99) if clean and base_p99 else None,
            "max_ms": max(ls) if ls else None,
            "events_headers_p99_ms": percentile([c["tth_ms"] for c in posted if c["tth_ms"] is not None], 0.99),
            "post_p99_ms": percentile([c["post_ms"] for c in posted if c["post_ms"] is not None], 0.99),
            "post_statuses": dict(collections.Counter(str(c["post_status"]) for c in posted)),
            "done_delay_p99_ms": percentile([(c["t_end"] - c["t_last"]) / 1e6 for c in done if c["t_last"]], 0.99),
            "done_delay_max_ms": max([(c["t_end"] - c["t_last"]) / 1e6 for c in done if c["t_last"]], default=None),
            "peak_rss_mb": max((s["rss_kb"] for s in smp if s["rss_kb"]), default=0) / 1024 or None,
            "peak_fds": max((s["fds"] for s in smp if s["fds"]), default=None),
            "peak_threads": max((s["threads"] for s in smp if s["threads"]), default=None),
            "peak_tcp_kernel_mb": max((s["tcp_kernel_kb"] or 0 for s in smp), default=0) / 1024,
            "server_cpu_util": ((cpu[-1] - cpu[0]) / dt) if len(cpu) > 1 and dt > 0 else None,
            # ms per second that chat.py was ready to run but waited for a CPU (other work on this machine).
            "runqueue_wait_ms_per_s": ((rq[-1] - rq[0]) / dt * 1e3) if len(rq) > 1 and dt > 0 else None,
            "core1_util": ((cores1[-1] - cores1[0]) / dt) if len(cores1) > 1 and dt > 0 else None,
            # CPU used by processes that are not the soak's (other work on this machine), in cores.
            "foreign_cpu": (max(0.0, (busy[-1] - busy[0]) - (ours[-1] - ours[0])) / dt
                            if len(busy) > 1 and dt > 0 else None),
            "log": log_counts(soak.log_text(t0, t1)),
            "effect": p["effect"],
        }
        if p["kind"] in ("fault", "baseline", "recovery"):
            # Back: the last 3 s of the quiet period after the fault (the recovery: its own end), against
            # the level just before the fault (RSS: CPython keeps freed arenas, so the question is whether
            # this fault left memory behind) and against the baseline (fds: they must all come back).
            nxt = soak.phases[i + 1] if p["kind"] == "fault" and i + 1 < len(soak.phases) else p
            tail = soak.samples_in(nxt["t1"] - 3_000_000_000, nxt["t1"])
            head = soak.samples_in(p["t0"] - 3_000_000_000, p["t0"])
            rss_after = statistics.median([s["rss_kb"] for s in tail if s["rss_kb"]]) / 1024 if tail else None
            rss_before = statistics.median([s["rss_kb"] for s in head if s["rss_kb"]]) / 1024 if head else None
            fds_after = statistics.median([s["fds"] for s in tail if s["fds"]]) if tail else None
            restarted = len({s["pid"] for s in smp + tail}) > 1
            row.update(rss_before_mb=rss_before, rss_after_mb=rss_after, fds_after=fds_after, restarted=restarted,
                       rss_drift_vs_baseline_mb=(rss_after - base_rss / 1024) if rss_after and base_rss else None)
            ref = base_rss / 1024 if p["kind"] == "recovery" or rss_before is None or restarted else rss_before
            row["rss_back"] = rss_after is not None and ref is not None and rss_after <= ref + max(10, 0.10 * ref)
            row["fds_back"] = fds_after is not None and base_fds is not None and fds_after <= base_fds + 10
        rows.append(row)

    judge_faults(soak, rows, chats, base_done_delay)
    weaknesses(soak, rows, base_p99)
    return rows, base_p99


def judge_faults(soak, rows, chats, base_done_delay):
    """Fill in the effects that only the load's records and chat.py's log can show."""
    by_name = {r["phase"]: r for r in rows}
    base_delay_p99 = percentile(base_done_delay, 0.99)
    for p in soak.phases:
        e = p["effect"]
        if not e or e.get("skipped"):
            continue
        row = by_name[p["name"]]
        logs = row["log"]
        base_name = p["name"].split("#")[0]
        if base_name == "dblock" and e.get("locked_at"):
            a, b = e["locked_at"], e["released_at"] or p["t1"]
            hit = [c for c in chats if c["t_last"] and c["status"] == "done" and a <= c["t_end"] and c["t_last"] <= b]
            delays = [(c["t_end"] - c["t_last"]) / 1e9 for c in hit]
            posts = [c for c in chats if a <= c["t_post"] <= b and c["post_ms"] is not None]
            e["done_delay_s_max"] = max(delays, default=None)
            e["done_delay_s_p50"] = percentile(delays, 0.5)
            e["post_s_max"] = max((c["post_ms"] / 1e3 for c in posts), default=None)
            e["post_statuses"] = dict(collections.Counter(str(c["post_status"]) for c in posts))
            e["log"] = logs
            longest = e["done_delay_s_max"] or 0
            delayed = longest > 1.0 and longest > 5 * (base_delay_p99 or 0) / 1e3
            e["ok"] = bool(e.get("held_s")) and delayed
            e["summary"] += (f"; answers finishing meanwhile waited up to {fmt(e['done_delay_s_max'])} s for their "
                             f"`done` (saved first; baseline p99 {fmt((base_delay_p99 or 0) / 1e3, 3)} s); sends took "
                             f"up to {fmt(e['post_s_max'])} s, statuses {e['post_statuses']}; chat.py logged {logs}")
            if not delayed:
                e["summary"] += "; NO EFFECT SEEN (the lock did not delay saves)"
        elif base_name == "diskfull":
            a, b = e["t_full"], e["t_free"]
            posts = [c for c in chats if a <= c["t_post"] <= b + 1_000_000_000]
            e["post_statuses"] = dict(collections.Counter(str(c["post_status"]) for c in posts))
            e["log"] = logs
            hit = logs.get("disk full", 0) or e["post_statuses"].get("507", 0)
            e["ok"] = bool(hit)
            e["summary"] += (f"; sends meanwhile {e['post_statuses']}; chat.py logged {logs}"
                             + ("" if hit else "; NO EFFECT SEEN (chat.py never hit the full disk)"))
        elif base_name == "kill":
            broken = [c for c in chats if c["t_break"] and p["t0"] <= c["t_break"] <= p["t1"]]
            back = [(c["t_back"] - e["t_kill"]) / 1e9 for c in broken if c["t_back"]]
            stored = collections.Counter(c.get("stored", {}).get("verdict") for c in broken)
            tails = []
            for c in broken:
                st = c.get("stored", {})
                if st.get("verdict") == "lost" and st.get("first_missing_stamp"):
                    tails.append((e["t_kill"] - st["first_missing_stamp"]) / 1e9)
            e["broken_chats"] = len(broken)
            e["reconnected_s"] = {"p50": percentile(back, 0.5), "max": max(back, default=None), "n": len(back)}
            e["stored_verdicts"] = dict(stored)
            e["unsaved_tail_s_max"] = max(tails, default=None)
            e["ok"] = e["ok"] and len(back) == len(broken) and all(t <= 1.6 for t in tails)
            e["summary"] += (f"; {len(broken)} chats were streaming: every one reconnected and got its `done` after "
                             f"p50 {fmt(e['reconnected_s']['p50'])} / max {fmt(e['reconnected_s']['max'])} s; "
                             f"stored text vs seen: {dict(stored)}"
                             + (f" (the tokens missing from the store were sent at most "
                                f"{fmt(e['unsaved_tail_s_max'], 2)} s "
                                "before the kill: the partial save runs once a second)" if tails else ""))
        elif base_name == "slowloris":
            e["log"] = logs
        elif base_name == "stuck":
            e["log"] = logs
            e["summary"] += f"; write timeouts logged: {logs.get('write timeouts', 0)}"
        elif base_name == "stuckhuge":
            e["log"] = logs
            e["summary"] += f"; write timeouts logged: {logs.get('write timeouts', 0)}"
            if not logs.get("write timeouts"):
                e["summary"] += " (NO write timeout seen: the fault did not happen)"
                e["ok"] = False
        elif base_name == "login":
            e["log"] = logs
        elif base_name in ("drop", "trickle", "flood", "hang", "bomb", "render"):
            attack = [c for c in soak.attacker_chats if c["who"] == base_name and p["t0"] <= c["t_post"] <= p["t1"]]
            verdicts = collections.Counter(c.get("stored", {}).get("verdict") for c in attack)
            e["stored_verdicts"] = dict(verdicts)
            e["summary"] += f"; the attacker's partial answers in the store: {dict(verdicts)}"
            if verdicts.get("lost"):
                e["ok"] = False
        if base_name == "bomb":
            before = row.get("rss_before_mb")
            growth = (row["peak_rss_mb"] - before) if row["peak_rss_mb"] and before else None
            e["rss_peak_over_before_mb"] = growth
            e["summary"] += (f"; chat.py's RSS peaked at {fmt(row['peak_rss_mb'])} MB, {fmt(growth)} MB over its "
                             "level before the phase")
            if growth is None or growth > 50:
                e["ok"] = False
        elif base_name == "render":
            delay_p99, delay_max = row["done_delay_p99_ms"], row["done_delay_max_ms"]
            base = base_delay_p99 or 0
            e["users_done_delay_ms"] = {"p99": delay_p99, "max": delay_max, "baseline_p99": base}
            prompt_ = delay_p99 is not None and delay_p99 <= base + 500
            # And their tokens: p99* within 2 x the reference, unless the machine disturbed the window.
            held = not (row["p99_ratio"] and row["p99_ratio"] > 2
                        and not noisy(row["floor_p99_ms"], row["foreign_cpu"], soak.typical_floor))
            e["ok"] = e["ok"] and prompt_ and held
            e["summary"] += (f"; the well-behaved chats' `done` came p99 {fmt(delay_p99)} / max {fmt(delay_max)} ms "
                             f"after their last token (baseline p99 {fmt(base)} ms; promptly: <= baseline + 500 ms), "
                             f"their tokens p99* {fmt(row['p99_clean_ms'], 2)} ms ({fmt(row['p99_ratio'], 2)} x)")
            if not prompt_:
                e["summary"] += "; DONE BUBBLES DELAYED"
            if not held:
                e["summary"] += "; THEIR P99 DID NOT HOLD (a clean window)"
        elif base_name in ("chunked", "hog", "owners", "guessrotate", "search"):
            e["log"] = logs
            if base_name == "chunked":
                e["summary"] += (f"; chat.py's access log has {logs.get('411 answers (access log)', 0)} answers 411 "
                                 f"in the phase's window for {e.get('requests')} requests sent")
            e["summary"] += (f"; the well-behaved chats meanwhile: {row['chats_done']} done, {row['chats_failed']} "
                             f"failed, tokens p99* {fmt(row['p99_clean_ms'], 2)} ms ({fmt(row['p99_ratio'], 2)} x)")


def weaknesses(soak, rows, base_p99):
    """What the numbers say chat.py could do better, fault by fault (only what was observed)."""
    base_tcp = next(r for r in rows if r["kind"] == "baseline")["peak_tcp_kernel_mb"]
    for r in rows:
        e, w = r["effect"], []
        if r["kind"] != "fault" or not e or e.get("skipped"):
            continue
        name = r["phase"].split("#")[0]
        if r["p99_ratio"] and r["p99_ratio"] > 2:
            rq = r["runqueue_wait_ms_per_s"]
            detail = (f"p99* {fmt(r['p99_clean_ms'])} ms = {fmt(r['p99_ratio'])} x the reference (p50 "
                      f"{fmt(r['p50_ms'], 2)} ms; chat.py CPU {fmt((r['server_cpu_util'] or 0) * 100, 0)} %, waited "
                      f"{fmt(rq, 0)} ms/s for a CPU; floor p99 {fmt(r['floor_p99_ms'])} ms; other processes "
                      f"{fmt((r['foreign_cpu'] or 0) * 100, 0)} % of a core)")
            if r["p99_clean_ms"] - (base_p99 or 0) < 5:
                e.setdefault("notes", []).append("above 2 x, but by less than 5 ms: " + detail)
            elif not noisy(r["floor_p99_ms"], r["foreign_cpu"], soak.typical_floor):
                w.append("well-behaved chats slowed: " + detail)
            else:
                e.setdefault("notes", []).append("slower, but the machine interfered: " + detail)
        if name in ("stuck", "stuckhuge") and e.get("readers") and e.get("tcp_kernel_peak_mb", 0) > base_tcp + 20:
            each = (e["tcp_kernel_peak_mb"] - base_tcp) / e["readers"]
            w.append(f"the kernel held up to {e['tcp_kernel_peak_mb']} MB of unsent answers for {e['readers']} stuck "
                     f"readers (~{each:.2f} MB each)"
                     + (": chat.py does not cap a socket's send buffer (SO_SNDBUF), so each stuck reader costs up to "
                        "tcp_wmem's maximum (4 MB) of kernel memory before CHAT_WRITE_TIMEOUT even starts"
                        if each > 1 else ": the whole answer waits in the kernel until the connection is dropped"))
        if name == "sendflood":
            ok, _, total = e.get("mint_accepted", "0/0").partition("/")
            if int(total or 0) and int(ok) > e.get("allowed_per_address", 0) * 2:
                w.append(f"CHAT_NEW_OWNERS_PER_MINUTE is bypassed by fetching a page first: GET / mints a signed owner "
                         f"cookie without any limit, and a send with it is not a new owner ({e['mint_accepted']} "
                         "sends from 2 addresses accepted, each a fresh owner with its own 4 streams)")
        if name == "login":
            refused = sum(v for k, v in e.get("legit_logins", {}).items() if k != "ok")
            total = sum(e.get("legit_logins", {}).values())
            lrefused = sum(v for k, v in e.get("operator_logins", {}).items() if k != "ok")
            ltotal = sum(e.get("operator_logins", {}).values())
            if refused or lrefused:
                w.append(f"the right password is refused while guesses come from many addresses: {refused}/{total} "
                         "people "
                         f"and {lrefused}/{ltotal} operator logins (loopback) got 429, because the global bucket "
                         "(10 wrong passwords/s) is checked before the password")
        if name in ("diskfull", "dblock") and r["answers_lost"]:
            w.append(f"{r['answers_lost']} answers the clients saw in full are stored only up to their last partial "
                     "save: a final save that fails (disk full / database locked past busy_timeout) is never retried")
        if name == "kill" and r["answers_lost"]:
            w.append(f"{r['answers_lost']} answers lost their last tokens (sent <= "
                     f"{fmt(e.get('unsaved_tail_s_max'), 2)} s before the kill), though readers are given text only "
                     "once it is in chat.py's journal (or in Redis) and the restart puts it back: check chat.log for "
                     "'put back the unsaved text'")
        tb = r["log"].get("tracebacks", 0)
        if tb >= 10:
            w.append(f"chat.py's log got {tb} tracebacks in this phase (gevent prints every exception raised in its "
                     "thread pool, on top of chat.py's own one-line error)")
        e["weaknesses"] = w


def print_table(rows, base_p99, soak):
    head = (f"{'phase':<20} {'secs':>5} {'done':>5} {'fail':>5} {'lost':>5} {'p50ms':>6} {'p99*':>7} {'x base':>7} "
            f"{'floor':>6} {'rq':>4} "
            f"{'hdr99':>6} {'post99':>7} {'cpu%':>5} {'other':>5} {'RSS MB':>7} {'fds':>5} {'back':>9} {'effect':>6}")
    print()
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["kind"] == "quiet":
            continue
        back = "-"
        if "rss_back" in r:
            back = ("rss " if r["rss_back"] else "RSS!") + (" fds" if r["fds_back"] else " FDS!")
        e = r["effect"] or {}
        effect = "-" if not e else ("skip" if e.get("skipped") else ("ok" if e.get("ok") else "NO"))
        ratio = r["p99_ratio"]
        mark = "~" if noisy(r["floor_p99_ms"], r["foreign_cpu"], soak.typical_floor) else ""
        print(f"{r['phase']:<20} {r['seconds']:>5.0f} {r['chats_done']:>5} {r['chats_failed']:>5} "
              f"{r['answers_lost']:>5} {fmt(r['p50_ms'], 2):>6} "
              f"{fmt(r['p99_clean_ms'], 2):>7} {mark + fmt(ratio, 2) + ('!' if ratio and ratio > 2 else ' '):>7} "
              f"{fmt(r['floor_p99_ms']):>6} {fmt(r['runqueue_wait_ms_per_s'], 0):>4} "
              f"{fmt(r['events_headers_p99_ms']):>6} "
              f"{fmt(r['post_p99_ms']):>7} {fmt((r['server_cpu_util'] or 0) * 100, 0):>5} "
              f"{fmt((r['foreign_cpu'] or 0) * 100, 0):>5} "
              f"{fmt(r['peak_rss_mb']):>7} {r['peak_fds'] or '-':>5} {back:>9} {effect:>6}")
    print()
    print("done/fail: well-behaved chats ending in the phase (fail: any end but a `done` bubble with status done);")
    print("lost: answers whose stored text does not start with what the client saw; p50/p99*: per-token delay,")
    print("upstream send -> client receipt, without tokens the load client read late because its")
    print("own process was descheduled; x base: p99* / reference p99* (target <= 2, ! above); floor: p99 of 3 control")
    print("chats read straight from the upstream, no chat.py in the path (what this machine adds); rq: ms per second")
    print("chat.py's threads were ready to run but waited for a CPU (/proc schedstat: other work on this machine, and")
    print("chat.py's own threads on its one core); hdr99: GET /events")
    print("time to headers; post99: POST /streaming; cpu%: chat.py; other: CPU used by processes that are not the")
    print("soak's (% of one core; this machine is shared); RSS/fds: chat.py peaks; back: RSS and fds at")
    print("the end of the quiet period after the fault: RSS vs just before the fault (<= +max(10 MB, 10 %); CPython")
    print("keeps freed memory, so this asks whether the fault left memory behind), fds vs the baseline (<= +10).")
    ref = soak.reference
    n_clean = sum(1 for q in ref["windows"] if q["clean"])
    print(f"Reference p99*: {fmt(base_p99, 2)} ms, of the tokens of "
          + (f"the {n_clean} clean quiet windows (floor <= {fmt(floor_limit(soak.typical_floor), 2)} ms:"
             f" 3 x its median {fmt(soak.typical_floor, 2)} ms, 1-10 ms; other processes <= one core)"
             if ref["from"] == "clean" else f"all {len(ref['windows'])} quiet windows (fewer than 2 were clean)")
          + f" taken together; the median of their own p99*: {fmt(ref['median_of_windows'], 2)} ms; the baseline"
          f" window alone: {fmt(ref['baseline_window'], 2)} ms. ~: this phase was not clean either.")
    print()
    for r in rows:
        e = r["effect"]
        if r["kind"] == "fault" and e:
            mark = "skip" if e.get("skipped") else ("ok" if e.get("ok") else "NOT OK")
            print(f"- {r['phase']} [{mark}]: {e.get('summary')}")
            if r["failed_by"]:
                print(f"    well-behaved chats that did not end `done`: {r['failed_by']}")
            for w in e.get("weaknesses", []):
                print(f"    weakness: {w}")
            for n in e.get("notes", []):
                print(f"    note: {n}")
    base = next(r for r in rows if r["kind"] == "baseline")
    if (base["foreign_cpu"] or 0) > 0.25:
        print(f"note: other processes used {base['foreign_cpu'] * 100:.0f} % of a core during the baseline: "
              "the ratios compare against a noisy baseline")
    for note in soak.notes:
        print(f"note: {note}")


def write_json(soak, rows, base_p99, path):
    chats = soak.load_result["chats"]
    out = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(soak.started_wall)),
        "command": " ".join([os.path.basename(PY)] + sys.argv),
        "args": vars(soak.a),
        "server_env": SERVER_ENV | {"CHAT_PASSWORD": "(set)"},
        "chat_py": {"path": soak.a.chat_py, "version": soak.code_version, "sha256": soak.code_sha256},
        "db": soak.db, "tmpfs": bool(soak.mount_note is None), "tmpfs_note": soak.mount_note,
        "reference_p99_clean_ms": base_p99, "reference": soak.reference,
        "phases": rows,
        "totals": {
            "chats": len(chats),
            "done": sum(1 for c in chats if c["status"] == "done"),
            "answers_checked": sum(1 for c in chats if c.get("stored", {}).get("verdict") in ("ok", "lost")),
            "answers_lost": sum(1 for c in chats if c.get("stored", {}).get("verdict") == "lost"),
            "statuses": dict(collections.Counter(c["status"] for c in chats)),
            "logins": dict(collections.Counter(str(s) for _, _, s in soak.load_result["logins"])),
        },
        "shutdown": soak.shutdown,
        "upstream_stalls": (soak.final_upstream or {}).get("stalls"),
        "load_stalls": soak.load_result.get("stalls"),
        "upstream_final": {k: {kk: vv for kk, vv in v.items() if kk not in ("lifetimes", "chars_at_close")}
                           for k, v in ((soak.final_upstream or {}).get("modes") or {}).items()},
        "notes": soak.notes,
        "samples": [{k: v for k, v in s.items() if k != "cores"} for s in soak.samples],
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description="chat.py fault soak (see the module docstring and bench/README.md)")
    p.add_argument("--quick", action="store_true", help="about 3 minutes: shorter phases, 20 users")
    p.add_argument("--faults", help="comma-separated subset of: " + ",".join(f for f, _ in FAULTS))
    p.add_argument("--repeat", type=int, default=1, help="run the faults this many times (a leak grows each time)")
    p.add_argument("--users", type=int, help="well-behaved users chatting at once (default 30; quick 20)")
    p.add_argument("--control", type=int, default=3,
                   help="control chats read straight from the fake upstream (the machine's floor; 3)")
    p.add_argument("--params", default="mode=paced rate=20 tokens=100",
                   help="what the well-behaved chats ask the fake upstream for")
    p.add_argument("--warmup", type=float, help="s of load before the baseline (default 5)")
    p.add_argument("--baseline-seconds", type=float, help="default 30 (quick 10)")
    p.add_argument("--fault-seconds", type=float, help="how long each fault is applied (default 20; quick 5)")
    p.add_argument("--quiet-seconds", type=float, help="quiet period after each fault (default 12; quick 3)")
    p.add_argument("--recovery-seconds", type=float, help="default 20 (quick 6)")
    p.add_argument("--slowloris", type=int, default=300, help="slowloris connections held open at once (300)")
    p.add_argument("--stuck-owners", type=int, default=3, help="owners holding stuck readers (3: 3 x 4 streams x 16)")
    p.add_argument("--flood-rate", type=float, default=40, help="cookie-less sends per second (40)")
    p.add_argument("--guess-rate", type=float, default=100, help="wrong passwords per second (100)")
    p.add_argument("--down-seconds", type=float, default=2, help="kill: seconds chat.py stays down (2)")
    p.add_argument("--chunked", type=int, default=20, help="clients sending chunked bodies at once (20)")
    p.add_argument("--hog", type=int, default=300,
                   help="connections one address tries to hold (300; its share is 200 of CHAT_MAX_CONNECTIONS=2000)")
    p.add_argument("--owner-rate", type=float, default=40, help="cookie-less sends per second from rotating addresses (40)")
    p.add_argument("--owner-addresses", type=int, default=400, help="how many addresses they rotate over (400)")
    p.add_argument("--search-rate", type=float, default=30, help="cookie-less searches per second and address (30)")
    p.add_argument("--upstream-idle", type=float, default=5, help="s the fake upstream keeps an idle connection (5)")
    p.add_argument("--tmpfs-mb", type=int, default=128, help="size of the tmpfs holding CHAT_DB (128)")
    p.add_argument("--no-tmpfs", action="store_true", help="keep CHAT_DB in a temporary directory (no full disk)")
    p.add_argument("--redis", action="store_true", help="chat.py with CHAT_REDIS_URL (a redis-server of its own)")
    p.add_argument("--monitor-hub", type=float, default=0,
                   help="diagnosis: run chat.py with gevent's monitor thread, logging what blocks its hub longer "
                        "than this many seconds (0: off)")
    p.add_argument("--chat-py", default=os.path.join(ROOT, "chat.py"), help="the chat.py to soak")
    p.add_argument("--out", default=os.path.join(RESULTS, "soak-latest.json"))
    p.add_argument("--report-from", metavar="STATE",
                   help="rebuild the table and JSON from a run's soak-logs/state.json")
    # internal: the other processes of the soak
    p.add_argument("--role", choices=("main", "upstream", "load", "locker"), default="main", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--idle", type=float, default=5, help=argparse.SUPPRESS)
    p.add_argument("--turns", type=int, default=4, help=argparse.SUPPRESS)
    p.add_argument("--upstream-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=1800, help=argparse.SUPPRESS)
    p.add_argument("--db", help=argparse.SUPPRESS)
    p.add_argument("--hold", type=float, default=10, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    defaults = {"users": 20 if q else 30, "warmup": 3 if q else 5, "baseline_seconds": 10 if q else 30,
                "fault_seconds": 5 if q else 20, "quiet_seconds": 3 if q else 12, "recovery_seconds": 6 if q else 20}
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.role == "upstream":
        return role_upstream(a)
    if a.role == "load":
        return role_load(a)
    if a.role == "locker":
        return role_locker(a)
    with contextlib.suppress(OSError, AttributeError):
        os.sched_setaffinity(0, {1} if os.cpu_count() and os.cpu_count() > 1 else {0})
    if a.report_from:
        soak = Soak.from_state(a.report_from, a)
        rows, base_p99 = build_report(soak)
        print_table(rows, base_p99, soak)
        write_json(soak, rows, base_p99, a.out)
        return 0
    soak = Soak(a)
    loop = new_loop()
    task = loop.create_task(asyncio.wait_for(soak.run(), soak.budget()))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    log(f"chat.py on port {soak.port}; faults: {', '.join(soak.faults())}; about "
        f"{soak.planned_seconds() / 60:.1f} min")
    try:
        loop.run_until_complete(task)
        rows, base_p99 = build_report(soak)
        print_table(rows, base_p99, soak)
        write_json(soak, rows, base_p99, a.out)
        log(f"wrote {a.out}; logs in {soak.logdir}")
    except asyncio.CancelledError:
        log("interrupted: stopping everything")
        return 130
    except asyncio.TimeoutError:
        log(f"the soak overran its budget of {soak.budget():.0f} s: stopped")
        return 1
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        soak.cleanup()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
