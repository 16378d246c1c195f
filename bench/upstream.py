"""A fast fake OpenAI-compatible upstream for the benchmark (its own process).

POST /v1/chat/completions answers `chat.completion.chunk` SSE with chunked transfer
encoding. Every token is ` t<monotonic_ns>`: the moment it was handed to the kernel,
so a client can compute the delay a relay added (time.monotonic_ns() is system-wide
on Linux and compares across processes).

The behaviour is chosen per request by `key=value` words in the last user message,
so the relays under test forward it untouched through their normal contract:

    mode=paced   rate=20 tokens=200   one token every 1/rate s (default)
    mode=burst   tokens=N batch=10    no pacing: as fast as the reader drains
    mode=idle    hold=600             headers + role chunk, then nothing for hold s
    wait=S                            (any mode) wait S s before the response headers

Also GET /v1/models and GET /stats (JSON: streams in progress, tokens sent).
Raw asyncio transports (uvloop when installed) writing pre-built bytes, so it is not
the bottleneck. Loopback only.

Run: python bench/upstream.py --port 0   (prints "listening PORT" on stdout)
"""

import argparse
import asyncio
import json
import os
import signal
import sys
import time

from fastloop import new_loop

HEAD_SSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
_CHUNK = '{"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"bench",'
TOKEN_PREFIX = ('data: ' + _CHUNK + '"choices":[{"index":0,"delta":{"content":" t').encode()
TOKEN_SUFFIX = b'"},"finish_reason":null}]}\n\n'
ROLE = ('data: ' + _CHUNK + '"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
        '"finish_reason":null}]}\n\n').encode()
FINISH = ('data: ' + _CHUNK + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n').encode()


def chunk(payload):
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def token_chunk(ns_now):
    """One token chunk stamped with its send time."""
    payload = TOKEN_PREFIX + str(ns_now).encode() + TOKEN_SUFFIX
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def end_bytes(count):
    """finish_reason, usage, [DONE] and the last chunk of the body."""
    usage = ('data: ' + _CHUNK + '"choices":[],"usage":{"prompt_tokens":8,"completion_tokens":%d,'
             '"total_tokens":%d}}\n\n' % (count, count + 8)).encode()
    return chunk(FINISH) + chunk(usage) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def simple_response(status, body, ctype="application/json"):
    return (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
            % (status.encode(), ctype.encode(), len(body))) + body


MODELS = json.dumps({"object": "list", "data": [
    {"id": "bench", "object": "model", "created": 1700000000, "owned_by": "bench"}]}).encode()


class Stats:
    active = 0       # responses started and not finished (the model is "generating")
    opened = 0
    tokens = 0
    connections = 0


def parse_params(body):
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


class Upstream(asyncio.Protocol):
    """One keep-alive connection; at most one streaming response at a time."""

    __slots__ = ("loop", "transport", "buf", "streaming", "paused", "closed", "mode", "tokens",
                 "sent", "interval", "start", "batch", "timer")

    def __init__(self, loop):
        self.loop = loop
        self.transport = None
        self.buf = b""
        self.streaming = False
        self.paused = False
        self.closed = False
        self.timer = None

    # -- connection events ------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=64 * 1024)
        Stats.connections += 1

    def connection_lost(self, exc):
        self.closed = True
        Stats.connections -= 1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.streaming:
            self.streaming = False
            Stats.active -= 1

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        if self.streaming and self.mode == "burst" and self.timer is None:
            self.timer = self.loop.call_soon(self.burst)

    def data_received(self, data):
        self.buf += data
        while not self.streaming and not self.closed:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 65536:
                    self.transport.close()
                return
            head = self.buf[:end].decode("latin-1")
            lines = head.split("\r\n")
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

    # -- requests -----------------------------------------------------------
    def request(self, method, path, body):
        if method == "GET" and path == "/v1/models":
            self.transport.write(simple_response("200 OK", MODELS))
        elif method == "GET" and path == "/stats":
            body = json.dumps({"active": Stats.active, "opened": Stats.opened, "tokens": Stats.tokens,
                               "connections": Stats.connections}).encode()
            self.transport.write(simple_response("200 OK", body))
        elif method == "POST" and path == "/v1/chat/completions":
            params = parse_params(body)
            self.mode = params.get("mode", "paced")
            self.tokens = int(params.get("tokens", 200))
            self.interval = 1.0 / float(params.get("rate", 20))
            self.batch = max(1, int(params.get("batch", 10)))
            self.sent = 0
            self.streaming = True
            Stats.active += 1
            Stats.opened += 1
            wait = float(params.get("wait", 0))
            hold = float(params.get("hold", 600))
            if wait > 0:
                self.timer = self.loop.call_later(wait, self.begin, hold)
            else:
                self.begin(hold)
        else:
            self.transport.write(simple_response("404 Not Found", b'{"error":{"message":"not found"}}'))

    def begin(self, hold):
        """Send the headers and the role chunk, then start the tokens."""
        self.timer = None
        if self.closed:
            return
        self.transport.write(HEAD_SSE + chunk(ROLE))
        if self.mode == "idle":
            self.timer = self.loop.call_later(hold, self.finish)
        elif self.mode == "burst":
            self.timer = self.loop.call_soon(self.burst)
        else:
            self.start = self.loop.time()
            self.timer = self.loop.call_at(self.start + self.interval, self.paced)

    def paced(self):
        self.timer = None
        if self.closed:
            return
        self.transport.write(token_chunk(time.monotonic_ns()))
        self.sent += 1
        Stats.tokens += 1
        if self.sent >= self.tokens:
            self.finish()
        else:
            self.timer = self.loop.call_at(self.start + (self.sent + 1) * self.interval, self.paced)

    def burst(self):
        self.timer = None
        if self.closed or self.paused:
            return
        n = min(self.batch, self.tokens - self.sent)
        ns = time.monotonic_ns()
        self.transport.write(b"".join([token_chunk(ns)] * n))
        self.sent += n
        Stats.tokens += n
        if self.sent >= self.tokens:
            self.finish()
        elif not self.paused:
            self.timer = self.loop.call_soon(self.burst)

    def finish(self):
        self.timer = None
        if self.closed or not self.streaming:
            return
        self.transport.write(end_bytes(self.sent))
        self.streaming = False
        Stats.active -= 1
        if self.buf:
            self.data_received(b"")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    loop = new_loop()
    server = loop.run_until_complete(
        loop.create_server(lambda: Upstream(loop), args.host, args.port, backlog=4096))
    port = server.sockets[0].getsockname()[1]
    print(f"listening {port}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()
    sys.exit(0)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
