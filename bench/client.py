"""The benchmark's load client (its own process, not a browser).

Each chat goes through the real HTTP contract, as htmx would: POST /streaming (form
field `prompt`), parse `sse-connect="/events?stream=ID"` from the HTML fragment, then
GET /events?stream=ID and parse the SSE frames (`event: message` / `data: <span>TOKEN
</span>`, finally `event: done`). The fake upstream stamps every token ` t<ns>` with
its send time, so for every token: added latency = receipt time - stamp.

Raw asyncio protocols (uvloop when installed): one process holds 1,000 streams at
20 tokens/s or ~20,000 idle connections on one core.

Scenario kinds:
  stream   N concurrent chats, closed loop (a finished chat is replaced at once);
           ramp, settle, then a measured window (tokens/s, latency, server CPU and RSS).
  idle     N chats whose upstream says nothing; hold them, measure RSS per stream.
  vanish   N chats; after --vanish-after s every socket is closed mid-answer, then
           /healthz (`streams: N`) and the upstream's /stats are polled every second.

Results are one JSON object, written to --out. Every wait is bounded.
"""

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import time
import urllib.parse
from array import array

from fastloop import new_loop

CLK_TCK = os.sysconf("SC_CLK_TCK")
SPAN_RE = re.compile(rb"<span> t(\d+)</span>")
DONE_RE = re.compile(rb"event: ?done")
# --direct: the client reads the fake upstream itself (the harness's own latency floor)
DIRECT_SPAN_RE = re.compile(rb'"content":" t(\d+)"')
DIRECT_DONE_RE = re.compile(rb"data: \[DONE\]")
SSE_CONNECT_RE = re.compile(r'sse-connect="/events\?stream=([^"&]+)"')
STREAMS_RE = re.compile(rb"streams: (\d+)")


# ---------------------------------------------------------------------------
# /proc readings
# ---------------------------------------------------------------------------

def proc_cpu_s(pid):
    """utime+stime of a whole process (all threads), in seconds, from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)
    except (OSError, IndexError, ValueError):
        return None


def proc_runtime_ns(pid):
    """On-CPU time of all threads in ns, from /proc/PID/task/*/schedstat (finer than ticks)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    except OSError:
        return None
    return total


def proc_rss_kb(pid):
    """VmRSS from /proc/PID/status, in KiB."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def proc_fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def server_pids(pid):
    """The server and its children (the workers of `chat.py --workers N`)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid] + [int(child) for child in f.read().split()]
    except OSError:
        return [pid]


def summed(reading, pids):
    """A /proc reading summed over processes (None if the first cannot be read)."""
    values = [reading(pid) for pid in pids]
    return None if values[0] is None else sum(v for v in values if v is not None)


def cores_busy_s():
    """Per-core busy and steal seconds from /proc/stat: {core: (busy, steal)}."""
    out = {}
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"cpu") and line[3:4].isdigit():
                    v = [int(x) for x in line.split()[1:9]]
                    # user nice system idle iowait irq softirq steal
                    out[int(line[3:].split()[0])] = ((v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK,
                                                     v[7] / CLK_TCK)
    except (OSError, ValueError):
        pass
    return out


def self_cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentiles(values, qs=(0.5, 0.99, 0.999)):
    """Nearest-rank percentiles of a list of numbers (sorted in place)."""
    if not values:
        return {f"p{q * 100:g}": None for q in qs} | {"max": None, "n": 0}
    values = sorted(values)
    n = len(values)
    out = {f"p{q * 100:g}": values[min(n - 1, max(0, int(q * n + 0.5) - 1))] for q in qs}
    out["max"] = values[-1]
    out["n"] = n
    return out


# ---------------------------------------------------------------------------
# HTTP helpers
# ---------------------------------------------------------------------------

def parse_head(head):
    """Status code and lower-cased header list of a response head (bytes, no blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return status, headers


async def read_body(reader, headers):
    """A whole response body: Content-Length, chunked, or until close."""
    h = dict(headers)
    if "chunked" in h.get("transfer-encoding", "").lower():
        out = []
        for _ in range(100000):
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            out.append(await reader.readexactly(size))
            await reader.readexactly(2)
        return b"".join(out)
    if "content-length" in h:
        return await reader.readexactly(int(h["content-length"]))
    return await reader.read(1 << 20)


async def http_request(host, port, method, path, body=b"", headers=(), timeout=30.0):
    """One request on its own connection; returns (status, headers, body)."""
    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in headers]
            if body or method == "POST":
                lines.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            head = await reader.readuntil(b"\r\n\r\n")
            status, hdrs = parse_head(head[:-4])
            data = await read_body(reader, hdrs)
            return status, hdrs, data
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)


# ---------------------------------------------------------------------------
# One /events connection
# ---------------------------------------------------------------------------

class Events(asyncio.Protocol):
    """GET /events?stream=ID: headers, de-chunking, SSE frames, token stamps."""

    def __init__(self, client, chat, request, span_re=SPAN_RE, done_re=DONE_RE):
        self.client, self.chat, self.request = client, chat, request
        self.span_re, self.done_re = span_re, done_re
        self.transport = None
        self.head = b""
        self.headers_done = False
        self.chunked = False
        self.cbuf = b""
        self.remaining = 0
        self.need_crlf = False
        self.sse = b""
        self.sent_at = 0
        self.finished = False

    def connection_made(self, transport):
        self.transport = transport
        self.sent_at = time.monotonic_ns()
        transport.write(self.request)

    def data_received(self, data):
        now = time.monotonic_ns()
        if not self.headers_done:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.headers_done = True
            status, headers = parse_head(self.head[:end])
            data, self.head = self.head[end + 4:], b""
            self.client.headers_received(self, status, self.sent_at, (now - self.sent_at) / 1e6)
            self.chunked = any(k == "transfer-encoding" and "chunked" in v.lower() for k, v in headers)
            if status != 200:
                self.client.event_errors += 1
        if self.chunked:
            data = self.dechunk(data)
        if not data:
            return
        buf = self.sse + data if self.sse else data
        i = buf.rfind(b"\n\n")
        j = buf.rfind(b"\n\r\n")
        end = max(i + 2 if i >= 0 else -1, j + 3 if j >= 0 else -1)
        if end < 0:
            self.sse = buf
            return
        frames, self.sse = buf[:end], buf[end:]
        stamps = self.span_re.findall(frames)
        if stamps:
            self.client.tokens_received(now, stamps)
            self.chat.tokens += len(stamps)
        if self.done_re.search(frames):
            self.finished = True
            self.transport.close()
            self.client.chat_done(self.chat)

    def dechunk(self, data):
        """Remove HTTP/1.1 chunk framing, whatever the read boundaries."""
        buf = self.cbuf + data if self.cbuf else data
        out = []
        pos, n = 0, len(buf)
        while pos < n:
            if self.remaining:
                take = min(self.remaining, n - pos)
                out.append(buf[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining:
                    break
                self.need_crlf = True
            if self.need_crlf:
                if n - pos < 2:
                    break
                pos += 2
                self.need_crlf = False
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol].split(b";")[0] or b"0", 16)
            pos = eol + 2
            if size == 0:
                pos = n
                break
            self.remaining = size
        self.cbuf = buf[pos:]
        return b"".join(out) if len(out) != 1 else out[0]

    def connection_lost(self, exc):
        self.client.events_closed(self)


class Chat:
    __slots__ = ("stream_id", "events", "tokens", "started")

    def __init__(self):
        self.stream_id = None
        self.events = None
        self.tokens = 0
        self.started = time.monotonic()


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------

class Client:
    def __init__(self, args):
        self.args = args
        u = urllib.parse.urlsplit(args.url)
        self.host, self.port = u.hostname, u.port
        self.loop = asyncio.get_event_loop()
        self.prompt = f"bench {args.params}".strip()
        self.chats = set()          # chats in progress (POST sent, no done yet)
        self.open_sem = asyncio.Semaphore(args.open_concurrency)
        self.replace = args.kind == "stream"  # closed loop
        self.running = True
        self.opening = True          # idle: False once the opening time is up
        self.measuring = False
        self.latencies = array("q")  # ns, tokens received in the window
        self.received_at = array("q") if args.dump else None  # ns, receipt time of each (--dump)
        self.tokens_total = 0
        self.tokens_window = 0
        self.tth = []                # (sent at ns, ms to response headers of GET /events)
        self.tth_probe_ms = []       # the same for the idle scenario's probe chats
        self.started = 0
        self.done = 0
        self.done_window = 0
        self.post_errors = 0
        self.post_statuses = {}
        self.event_errors = 0
        self.lost_early = 0          # /events closed before done while we still wanted it
        self.with_headers = 0
        self.pending_tasks = set()

    # -- callbacks from Events ------------------------------------------------
    def headers_received(self, events, status, sent_at, ms):
        self.tth.append((sent_at, ms))
        self.with_headers += 1

    def tokens_received(self, now, stamps):
        self.tokens_total += len(stamps)
        if self.measuring:
            self.tokens_window += len(stamps)
            self.latencies.extend([now - int(s) for s in stamps])
            if self.received_at is not None:
                self.received_at.extend([now] * len(stamps))

    def chat_done(self, chat):
        self.done += 1
        if self.measuring:
            self.done_window += 1
        self.chats.discard(chat)
        if self.replace and self.running:
            self.spawn(self.run_chat())

    def events_closed(self, events):
        if not events.finished and self.running and events.chat in self.chats:
            self.lost_early += 1
            self.chats.discard(events.chat)
            if self.replace:
                self.spawn(self.run_chat(delay=0.05))

    # -- chats ----------------------------------------------------------------
    def spawn(self, coro):
        task = self.loop.create_task(coro)
        self.pending_tasks.add(task)
        task.add_done_callback(self.pending_tasks.discard)

    async def run_chat(self, delay=0.0, prompt=None):
        """POST /streaming, then GET /events; returns once the events connection is open."""
        if delay:
            await asyncio.sleep(delay)
        if not self.running:
            return None
        chat = Chat()
        self.chats.add(chat)
        self.started += 1
        async with self.open_sem:
            if not self.running or not self.opening:
                self.chats.discard(chat)
                self.started -= 1
                return None
            if self.args.direct:
                return await self.run_direct(chat, prompt or self.prompt)
            body = urllib.parse.urlencode({"prompt": prompt or self.prompt}).encode()
            origin = f"http://{self.host}:{self.port}"
            try:
                status, headers, html = await http_request(
                    self.host, self.port, "POST", "/streaming", body,
                    [("Content-Type", "application/x-www-form-urlencoded"), ("HX-Request", "true"),
                     ("Origin", origin), ("Referer", origin + "/")], timeout=30)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                self.post_failed(chat, type(exc).__name__)
                return None
            self.post_statuses[status] = self.post_statuses.get(status, 0) + 1
            m = SSE_CONNECT_RE.search(html.decode("utf-8", "replace"))
            if status != 200 or not m:
                self.post_failed(chat, None)
                return None
            chat.stream_id = m.group(1)
            cookies = "; ".join(v.split(";")[0] for k, v in headers if k == "set-cookie")
            req = (f"GET /events?stream={chat.stream_id} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"Accept: text/event-stream\r\nCache-Control: no-cache\r\nHX-Request: true\r\n"
                   + (f"Cookie: {cookies}\r\n" if cookies else "") + "\r\n").encode()
            try:
                _, chat.events = await asyncio.wait_for(self.loop.create_connection(
                    lambda: Events(self, chat, req), self.host, self.port), 30)
            except (OSError, asyncio.TimeoutError) as exc:
                self.post_failed(chat, type(exc).__name__)
                return None
            await self.wait_headers(chat)
            return chat

    async def wait_headers(self, chat):
        """Hold the open semaphore until the headers came, so opening never floods the listener."""
        for _ in range(3000):
            if chat.events.headers_done or chat.events.transport.is_closing():
                break
            await asyncio.sleep(0.01)

    async def run_direct(self, chat, prompt):
        """--direct: POST /v1/chat/completions to the fake upstream and read it like /events."""
        u = urllib.parse.urlsplit(self.args.upstream_url)
        body = json.dumps({"model": "bench", "stream": True,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
               f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        try:
            _, chat.events = await asyncio.wait_for(self.loop.create_connection(
                lambda: Events(self, chat, req, DIRECT_SPAN_RE, DIRECT_DONE_RE), u.hostname, u.port), 30)
        except (OSError, asyncio.TimeoutError) as exc:
            self.post_failed(chat, type(exc).__name__)
            return None
        await self.wait_headers(chat)
        return chat

    def post_failed(self, chat, what):
        self.post_errors += 1
        if what:
            self.post_statuses[what] = self.post_statuses.get(what, 0) + 1
        self.chats.discard(chat)
        if self.replace and self.running:
            self.spawn(self.run_chat(delay=0.1))

    async def ramp(self, n, seconds):
        """Start n chats spread evenly over `seconds`."""
        t0 = self.loop.time()
        for i in range(n):
            at = t0 + (seconds * i / n if n else 0)
            wait = at - self.loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self.spawn(self.run_chat())

    def close_all(self):
        self.running = False
        for chat in list(self.chats):
            if chat.events is not None:
                chat.events.finished = True
                chat.events.transport.abort()
        self.chats.clear()

    # -- measurements ---------------------------------------------------------
    def sample(self):
        a = self.args
        pids = server_pids(a.server_pid)
        return {"t": time.monotonic(), "server_cpu_s": summed(proc_cpu_s, pids),
                "server_runtime_ns": summed(proc_runtime_ns, pids),
                "server_rss_kb": summed(proc_rss_kb, pids), "server_fds": summed(proc_fds, pids),
                "also_cpu_s": proc_cpu_s(a.also_pid) if a.also_pid else None,
                "client_cpu_s": self_cpu_s(), "cores": cores_busy_s(),
                "upstream_cpu_s": proc_cpu_s(a.upstream_pid) if a.upstream_pid else None}

    async def healthz_streams(self):
        try:
            _, _, body = await http_request(self.host, self.port, "GET", "/healthz", timeout=5)
            m = STREAMS_RE.search(body)
            return int(m.group(1)) if m else None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            return None

    async def upstream_active(self):
        if not self.args.upstream_url:
            return None
        u = urllib.parse.urlsplit(self.args.upstream_url)
        try:
            _, _, body = await http_request(u.hostname, u.port, "GET", "/stats", timeout=5)
            return json.loads(body)["active"]
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, KeyError):
            return None

    def window_result(self, s0, s1):
        a = self.args
        dt = s1["t"] - s0["t"]
        tokens = self.tokens_window
        cpu = (s1["server_cpu_s"] - s0["server_cpu_s"]) if s0["server_cpu_s"] is not None else None
        rt = ((s1["server_runtime_ns"] - s0["server_runtime_ns"]) / 1e9
              if s0["server_runtime_ns"] is not None and s1["server_runtime_ns"] is not None else None)
        lat = percentiles([x / 1e6 for x in self.latencies])
        harness = (s1["client_cpu_s"] - s0["client_cpu_s"])
        if s0["upstream_cpu_s"] is not None and s1["upstream_cpu_s"] is not None:
            harness += s1["upstream_cpu_s"] - s0["upstream_cpu_s"]
        cores = {}
        for core, (busy, steal) in s1["cores"].items():
            b0, st0 = s0["cores"].get(core, (busy, steal))
            cores[str(core)] = {"busy": (busy - b0) / dt, "steal": (steal - st0) / dt}
        # CPU that neither the server (core 0) nor the harness (core 1) used: other processes.
        foreign = None
        if "0" in cores and "1" in cores and cpu is not None:
            foreign = max(0.0, cores["0"]["busy"] + cores["1"]["busy"] - cpu / dt - harness / dt)
        return {
            "window_s": dt,
            "cores": cores,
            "foreign_cpu_util": foreign,
            "tokens": tokens,
            "tokens_per_s": tokens / dt if dt > 0 else None,
            "offered_tokens_per_s": (a.chats * a.rate) if a.rate else None,
            "server_cpu_s": cpu,
            "server_cpu_util": cpu / dt if cpu is not None and dt > 0 else None,
            "cpu_us_per_token": cpu / tokens * 1e6 if cpu is not None and tokens else None,
            "cpu_us_per_token_schedstat": rt / tokens * 1e6 if rt is not None and tokens else None,
            "also_cpu_us_per_token": ((s1["also_cpu_s"] - s0["also_cpu_s"]) / tokens * 1e6
                                      if s0["also_cpu_s"] is not None and s1["also_cpu_s"] is not None and tokens
                                      else None),
            "latency_ms": lat,
            "chats_done_in_window": self.done_window,
            "harness_cpu_util": harness / dt if dt > 0 else None,
            "client_cpu_util": (s1["client_cpu_s"] - s0["client_cpu_s"]) / dt if dt > 0 else None,
        }

    async def wait_for(self, cond, timeout):
        end = self.loop.time() + timeout
        while not cond() and self.loop.time() < end:
            await asyncio.sleep(0.05)
        return cond()

    async def warmup(self):
        """Two short chats before the baseline: first-request costs stay out of the figures."""
        replace, self.replace = self.replace, False
        for _ in range(2):
            chat = await self.run_chat(prompt="bench mode=paced rate=1000 tokens=5")
            await self.wait_for(lambda: chat not in self.chats, 10)
        self.replace = replace
        self.started = self.done = self.tokens_total = self.with_headers = 0
        self.tth.clear()
        await asyncio.sleep(0.3)

    def tth_between(self, t0, t1):
        """Time-to-headers percentiles of the GET /events sent between two monotonic times (s)."""
        lo, hi = int(t0 * 1e9), int(t1 * 1e9)
        return percentiles([ms for at, ms in self.tth if lo <= at <= hi], (0.5, 0.99))

    async def measure(self, seconds):
        """Record tokens for a window of this many seconds; the process samples at its two ends."""
        s0 = self.sample()
        self.measuring = True
        await asyncio.sleep(seconds)
        self.measuring = False
        return s0, self.sample()

    async def main(self):
        a = self.args
        if a.warmup:
            await self.warmup()
        base = self.sample()
        out = {"kind": a.kind, "chats": a.chats, "params": a.params, "baseline": base}
        if a.kind == "stream":
            await self.ramp(a.chats, a.ramp)
            await asyncio.sleep(a.settle)
            s0, s1 = await self.measure(a.window)
            out.update(self.window_result(s0, s1))
            out["open_chats_at_end"] = len(self.chats)
            out["rss_kb"] = s1["server_rss_kb"]
            out["rss_per_stream_kb"] = ((s1["server_rss_kb"] - base["server_rss_kb"]) / max(1, a.chats)
                                        if base["server_rss_kb"] else None)
            out["registered_streams"] = await self.healthz_streams()
            out["end"] = s1
            win = self.tth_between(s0["t"], s1["t"])
            out["tth_ms_window"] = win
            out["tth_basis"] = "window" if win["n"] >= 20 else "all"
            out["tth_ms"] = win if win["n"] >= 20 else percentiles([ms for _, ms in self.tth], (0.5, 0.99))
        elif a.kind == "idle":
            await self.ramp(a.chats, a.ramp)
            t_open = self.loop.time()
            ok = await self.wait_for(lambda: self.with_headers + self.post_errors >= a.chats
                                     and not self.pending_tasks, a.open_timeout)
            out["opening_s"] = self.loop.time() - t_open
            self.opening = False  # time is up: chats not yet started are not started
            await self.wait_for(lambda: not self.pending_tasks, 30)
            self.opening = True
            await asyncio.sleep(a.settle)
            s0, s1 = await self.measure(a.window)
            held = sum(1 for c in self.chats if c.events is not None and c.events.headers_done
                       and not c.events.transport.is_closing())
            out.update(self.window_result(s0, s1))
            out["all_opened"] = ok
            out["held"] = held
            out["registered_streams"] = await self.healthz_streams()
            out["rss_kb"] = s1["server_rss_kb"]
            out["rss_per_stream_kb"] = ((s1["server_rss_kb"] - base["server_rss_kb"]) / held
                                        if held and base["server_rss_kb"] else None)
            out["fds"] = s1["server_fds"]
            out["end"] = s1
            out["tth_ms_opening"] = percentiles([ms for _, ms in self.tth], (0.5, 0.99))
            # Probes: with every idle stream held, new chats whose model has not even sent its
            # response headers yet (wait=60): /events must still answer its headers at once.
            t_probe = time.monotonic()
            for _ in range(a.probes):
                await self.run_chat(prompt=f"bench {a.probe_params}")
            out["tth_ms"] = self.tth_between(t_probe, time.monotonic())
            out["tth_basis"] = f"{a.probes} probe chats, model silent ({a.probe_params})"
        elif a.kind == "vanish":
            await self.ramp(a.chats, a.ramp)
            await asyncio.sleep(a.vanish_after)
            s0 = self.sample()
            out["open_at_vanish"] = sum(1 for c in self.chats if c.events is not None)
            out["tokens_before_vanish"] = self.tokens_total
            self.close_all()
            t0 = self.loop.time()
            series = []
            for _ in range(int(a.observe) + 2):
                t = self.loop.time() - t0
                reg, act = await self.healthz_streams(), await self.upstream_active()
                series.append({"t": round(t, 2), "registered": reg, "upstream_active": act})
                if t >= a.observe:
                    break
                if a.stop_at_zero and reg == 0 and act == 0:
                    break
                next_t = t0 + len(series)
                await asyncio.sleep(max(0.0, next_t - self.loop.time()))
            s1 = self.sample()
            out["series"] = series
            last = series[-1]
            out["observed_s"] = last["t"]
            out["registered_at_end"] = last["registered"]
            out["upstream_active_at_end"] = last["upstream_active"]
            out["registered_at_vanish"] = series[0]["registered"]

            def first_zero(key):
                for i, row in enumerate(series):
                    if row[key] == 0 and all(r[key] == 0 for r in series[i:]):
                        return row["t"]
                return None
            out["registered_zero_after_s"] = first_zero("registered")
            out["generating_zero_after_s"] = first_zero("upstream_active")
            out["fds_baseline"], out["fds_end"] = base["server_fds"], s1["server_fds"]
            out["rss_kb_at_vanish"], out["rss_kb_end"] = s0["server_rss_kb"], s1["server_rss_kb"]
            out["end"] = s1
        self.running = False
        self.close_all()
        for task in list(self.pending_tasks):
            task.cancel()
        if "tth_ms" not in out:
            out["tth_ms"] = percentiles([ms for _, ms in self.tth], (0.5, 0.99))
            out["tth_basis"] = "all"
        out["chats_started"] = self.started
        out["chats_done"] = self.done
        out["post_errors"] = self.post_errors
        out["post_statuses"] = {str(k): v for k, v in self.post_statuses.items()}
        out["event_errors"] = self.event_errors
        out["lost_early"] = self.lost_early
        out["tokens_total"] = self.tokens_total
        return out


def main():
    p = argparse.ArgumentParser(description="chat.py benchmark load client")
    p.add_argument("--url", required=True, help="the relay, http://127.0.0.1:PORT")
    p.add_argument("--kind", choices=("stream", "idle", "vanish"), default="stream")
    p.add_argument("--chats", type=int, default=1)
    p.add_argument("--params", default="mode=paced rate=20 tokens=200",
                   help="key=value words put in the prompt for the fake upstream")
    p.add_argument("--rate", type=float, default=20, help="offered tokens/s per chat (for the report)")
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--open-concurrency", type=int, default=64)
    p.add_argument("--open-timeout", type=float, default=120)
    p.add_argument("--vanish-after", type=float, default=3.0)
    p.add_argument("--observe", type=float, default=20.0)
    p.add_argument("--stop-at-zero", action="store_true")
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--upstream-pid", type=int)
    p.add_argument("--also-pid", type=int, help="another process whose CPU per token to report (redis-server)")
    p.add_argument("--upstream-url")
    p.add_argument("--deadline", type=float, default=300, help="hard limit on the whole run, s")
    p.add_argument("--direct", action="store_true",
                   help="read the fake upstream directly (no relay): the harness's latency floor")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--probes", type=int, default=20, help="idle: probe chats timed for their headers")
    p.add_argument("--probe-params", default="mode=idle wait=60 hold=900")
    p.add_argument("--dump", help="write every window token's receipt time and latency (JSON) here")
    p.add_argument("--out")
    args = p.parse_args()
    loop = new_loop()
    client = Client(args)
    try:
        result = loop.run_until_complete(asyncio.wait_for(client.main(), args.deadline))
    except asyncio.TimeoutError:
        result = {"error": f"client deadline of {args.deadline} s reached"}
    if args.dump:
        with open(args.dump, "w") as f:
            json.dump({"received_ns": list(client.received_at), "latency_ns": list(client.latencies),
                       "tth": client.tth}, f)
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
