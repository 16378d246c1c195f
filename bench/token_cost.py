"""Where the microseconds of one relayed token go, layer by layer, in this process (no load client, no peer).

    python3 bench/token_cost.py      (from the repository root; about 20 s)

Each layer is timed alone over many tokens of the bench upstream's own chunk (`upstream.token_chunk`): the
body de-chunking (SocketBody), lines and SSE fields, the JSON parse (orjson beside it, when installed), the
Completion's deltas, Stream.token with one reader (log, journal record, frame, Markdown blocks; the journal in
a temporary folder), then the system calls one token costs a relay (a recv, a write to the reader, the
journal's write), and a whole gevent wake-up: a greenlet blocked on a socket, woken by one token. The sum is
what one token costs at best; bench/run.py's figure under load adds the loop's turns, the pacing of 250 chats
and everything else a chat does.
"""
from gevent import monkey; monkey.patch_all()  # noqa: E702
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gevent  # noqa: E402

import chat  # noqa: E402
import upstream  # noqa: E402

N = 50_000


def timed(label, fn, n=N):
    """Run fn(i) n times; print and return µs per call."""
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    us = (time.perf_counter() - start) / n * 1e6
    print(f"  {label:58s} {us:6.2f} µs")
    return us


def main():
    """Time each layer; print the table."""
    wire = [upstream.token_chunk(time.monotonic_ns()) for _ in range(N)]
    payloads = [w.split(b"\r\n", 1)[1][:-2] for w in wire]
    data = [p.split(b"\n", 1)[0][6:].decode() for p in payloads]
    print(f"one token = {len(wire[0])} bytes on the wire, {len(data[0])} of JSON; µs per token:")
    rows = {}

    body = chat.SocketBody(None, True, None, b"")

    def dechunk(i):
        body.data = wire[i]
        body.decode()
    rows["de-chunk"] = timed("de-chunk the HTTP body (SocketBody.decode)", dechunk)
    lines, sse = chat.LineSplitter(), chat.SSEParser()

    def parse(i):
        for line in lines.feed(payloads[i]):
            sse.feed(line)
    rows["lines+sse"] = timed("lines and SSE fields (LineSplitter, SSEParser)", parse)
    rows["json"] = timed("JSON parse of the chunk (json.loads)", lambda i: json.loads(data[i]))
    try:
        import orjson
        timed("  the same with orjson.loads (not used: see bench/README.md)", lambda i: orjson.loads(data[i]))
    except ImportError:
        print("  (orjson not installed: pip install orjson to compare)")
    completion = chat.Completion(keep_text=False)
    rows["deltas"] = timed("Completion.apply (JSON included) -> deltas", lambda i: completion.apply("message", data[i]))
    rows["deltas"] -= rows["json"]
    think = chat.ThinkSplitter()
    rows["think"] = timed("<think> splitter", lambda i: think.feed(" t123"))

    folder = tempfile.mkdtemp(prefix="chat-token-cost-")
    chat.settings.max_tokens_per_second, chat.settings.max_answer_chars = 0, 10**12
    chat.streams.journal.open(os.path.join(folder, "journal"))

    class Reader:
        """A connected reader that takes frames."""

        def put(self, frame, direct=True):
            """Take a frame."""
            self.frame = frame

    stream = chat.Stream("bench", [], message_id=1, conversation_id="c")
    stream.readers.add(Reader())
    rows["token"] = timed("Stream.token: log, journal record, frame, Markdown blocks", lambda i: stream.token(
        "message", f" t{i}"))
    rows["frame"] = timed("  of which the frame (token_frame)", lambda i: chat.token_frame("message", " t1", i))
    frames = [chat.token_frame("message", f" t{i}", i) for i in range(N)]

    a, b = socket.socketpair()
    b.setblocking(False)

    def write(i):
        os.write(a.fileno(), frames[i])
        if i % 64 == 63:
            while True:
                try:
                    b.recv(1 << 20)
                except BlockingIOError:
                    break
    rows["write"] = timed("write(2) of one frame to the reader's socket", write)
    record = b"x" * 60
    fd = os.open(os.path.join(folder, "segment"), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)
    rows["journal"] = timed("write(2) of one record to the journal (per token before; per turn now)",
                            lambda i: os.write(fd, record))
    os.close(fd)

    def recv(i):
        os.write(b.fileno(), wire[i])
        a.recv(65536)
    rows["recv"] = timed("recv(2) of one token chunk", recv) - rows["write"]

    c, d = socket.socketpair()  # gevent sockets (patched): a blocked greenlet, woken by each token
    done = gevent.event.Event()
    count = [0]

    def reader():
        while count[0] < N // 5:
            c.recv(65536)
            count[0] += 1
            if count[0] % 1 == 0:
                writer_go.set()
        done.set()
    writer_go = gevent.event.Event()

    def writer():
        for i in range(N // 5):
            writer_go.clear()
            d.send(wire[i])
            writer_go.wait()
    start = time.perf_counter()
    gevent.joinall([gevent.spawn(reader), gevent.spawn(writer)])
    wake = (time.perf_counter() - start) / (N // 5) * 1e6
    print(f"  {'a wake-up: send, epoll, switch to the blocked greenlet, recv':58s} {wake:6.2f} µs")
    total = sum(rows.values())
    print(f"  {'sum of the layers (without the wake-up)':58s} {total:6.2f} µs")


if __name__ == "__main__":
    main()
