from gevent import monkey; monkey.patch_all()  # noqa: E702 — must run before anything imports socket
"""The suite's shared fakes and helpers (plain classes and functions; the fixtures are in conftest.py).

Test files import what they use from here by name. gevent patches the standard library first:
the fake upstream, chat.py's relay greenlets, the gevent server and the test's own HTTP clients
all share one hub, so one unpatched blocking call would freeze every one of them (and the test
would hang instead of failing)."""

import hashlib  # noqa: E402
import html  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import namedtuple  # noqa: E402
from html.parser import HTMLParser  # noqa: E402
from http import HTTPStatus  # noqa: E402
from pathlib import Path  # noqa: E402

import bottle  # noqa: E402
import gevent  # noqa: E402
import gevent.event  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
import webtest  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

import chat  # noqa: E402


HERE = Path(__file__).resolve().parent
STREAMS_DIR = HERE / "testdata" / "streams"
EXPECTED = {f["file"]: f for f in json.loads((STREAMS_DIR / "expected.json").read_text())["files"]}
SSE_FILES = sorted(name for name in EXPECTED if name.endswith(".sse"))
HTTP_FILES = sorted(name for name in EXPECTED if name.endswith(".http"))
BASE_SEED = int(os.environ.get("CHAT_TEST_SEED") or random.randrange(1 << 31))

# The test's own browser-like HTTP client: it keeps chat.py's owner cookie, like a browser.
web = requests.Session()
web.trust_env = False
HX = {"HX-Request": "true"}  # what htmx sends with every request of the page
web.headers.update(HX)

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
API_KEY = "sk-secret-123"


# ---------------------------------------------------------------------------
# Talking to chat.py: WebTest clients, free ports, `python chat.py` as a subprocess
# ---------------------------------------------------------------------------

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


def htmx_app():
    """A WebTest client that speaks like the page: from this machine, every request marked HX-Request."""
    return webtest.TestApp(chat.app, extra_environ={"REMOTE_ADDR": "127.0.0.1", "HTTP_HX_REQUEST": "true"})


def plain_app():
    """A WebTest client like a browser without JavaScript: plain forms and links, no HX-Request."""
    return webtest.TestApp(chat.app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})


SERVERS = {}  # base URL -> the chat.Server the server fixture started


def free_port():
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def clean_env(**extra):
    """The environment without upstream, key, model, listen or proxy settings."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "OPENAI_BASE_URL", "OPENAI_API_KEY", "CHAT_MODEL", "HOST", "PORT", *PROXY_VARS)}
    return {**env, **extra}


def terminate(process, timeout=5):
    """SIGTERM a server process and wait for it; SIGKILL it if it does not go within timeout seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class ChatProcess:
    """`python chat.py --port <free port>` (the README's run command) as a subprocess, with its log."""

    def __init__(self, log_path, *args, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "chat.py", "--port", str(self.port), *args], cwd=HERE, stdout=log_file,
                stderr=subprocess.STDOUT,
                env=clean_env(PYTHONUNBUFFERED="1", **{"CHAT_DB": str(log_path.parent / "chat.db"), **env}))
        try:
            wait_until(self.answering, timeout=15, what=f"/healthz of `python chat.py --port {self.port}`")
        except BaseException:
            self.stop()
            raise

    def answering(self):
        """True once /healthz answers; fails at once if the process died."""
        assert self.process.poll() is None, f"chat.py exited: {self.log_path.read_text()}"
        try:
            return requests.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def events_requests(self, stream_id):
        """How many /events requests for this stream the server logged (each is logged when it ends)."""
        return self.log_path.read_text().count(f"GET /events?stream={stream_id} ")

    def stop(self):
        """Terminate the server (kill it if it does not go)."""
        terminate(self.process)


# ---------------------------------------------------------------------------
# The fake upstream: a raw-socket OpenAI-compatible server that replays bytes exactly
# ---------------------------------------------------------------------------

class RecordedRequest:
    """One request the fake upstream received, and what became of its connection."""

    def __init__(self, method, path, headers, body):
        self.method, self.path, self.headers, self.body = method, path, headers, body
        self.client_closed = gevent.event.Event()   # the client hung up before we were done
        self.answered = gevent.event.Event()        # we wrote the whole reply

    @property
    def json(self):
        """The request body parsed as JSON."""
        return json.loads(self.body)


class Reply:
    """A scripted answer: the bytes, how they are framed and cut, and where to pause, hang or drop."""

    def __init__(self, head, body, *, chunked, cuts, action=None, action_at=None):
        self.head, self.body, self.chunked = head, body, chunked
        self.action, self.action_at = action, action_at
        points = sorted({c for c in cuts if 0 < c < len(body)} | ({action_at} - {None, 0, len(body)}))
        bounds = [0, *points, len(body)]
        self.pieces = [body[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
        self.gate = gevent.event.Event()  # set it to let a paused reply go on


def cut_points(length, chunking, seed=0):
    """Offsets to cut a body at: none (whole), after every byte, random (seeded), or given."""
    if chunking == "whole":
        return []
    if chunking == "bytes":
        return list(range(1, length))
    if chunking == "random":
        rng, points, at = random.Random(seed), [], 0
        while True:
            at += rng.randint(1, 48)
            if at >= length:
                return points
            points.append(at)
    return list(chunking)


def cuts_after(body, needle):
    """Cut points right after every occurrence of needle (to split CR from LF, say)."""
    return [m.end() for m in re.finditer(re.escape(needle), body)]


def offset_in(body, at):
    """A byte offset: an int as is, or the end of the first occurrence of a bytes marker."""
    if at is None or isinstance(at, int):
        return at
    index = body.find(at)
    assert index >= 0, f"marker {at!r} not in the body"
    return index + len(at)


def content_type_header(content_type, charset):
    """The Content-Type to send: as given, or with the charset forced on (True) or off (False)."""
    if content_type is None or charset is None:
        return content_type
    base = content_type.split(";")[0].strip()
    return base + "; charset=utf-8" if charset else base


class FakeUpstream:
    """An OpenAI-compatible server on a random loopback port that writes exactly the bytes it is told to."""

    DEFAULT = object()

    MODELS = b'{"object":"list","data":[{"id":"fake-model","object":"model"}]}'

    def __init__(self):
        self.requests = []
        self.reply = None
        # GET /models answers: each a JSON body (200), an int status, or "hang"; the last one repeats.
        self.models = [self.MODELS]
        self.props = None          # GET /props body (llama.cpp), or None for 404
        self.refuse = None         # (characters, raw response or f(characters)): refuse longer prompts
        self.strict_roles = False  # answer 400 like a strict chat template when roles do not alternate
        self.no_trailing_assistant = False  # answer 400 like OpenAI to a request that ends with an assistant message
        self.shutdown = gevent.event.Event()
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def serve(self, source, *, status=200, content_type=DEFAULT, charset=None, transfer="chunked",
              chunking="whole", seed=0, raw=None, headers=(), pause_at=None, hang_at=None, drop_at=None):
        """Answer the following chat requests with source (a streams/ file name or bytes); return the Reply.

        transfer: "chunked", "close" (close-delimited) or "length"; raw (default for .http files):
        source is a whole HTTP response written verbatim. chunking cuts the writes: "whole",
        "bytes", "random" (seeded) or a list of offsets; each piece is one write and, when
        chunked, one HTTP chunk. pause_at / hang_at / drop_at (an offset or a bytes marker
        whose end is the offset) pause until reply.gate is set, stall until the client hangs
        up, or close the socket mid-body.
        """
        if isinstance(source, str):
            name, body = source, (STREAMS_DIR / source).read_bytes()
            raw = name.endswith(".http") if raw is None else raw
            if content_type is self.DEFAULT and not raw:
                content_type = EXPECTED[name]["http"]["content_type"]
        else:
            body = source
        if content_type is self.DEFAULT:
            content_type = "text/event-stream"
        head = b""
        if not raw:
            lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
            ctype = content_type_header(content_type, charset)
            if ctype is not None:
                lines.append(f"Content-Type: {ctype}")
            if transfer == "chunked":
                lines.append("Transfer-Encoding: chunked")
            elif transfer == "length":
                lines.append(f"Content-Length: {len(body)}")
            lines += ["Connection: close", *(f"{k}: {v}" for k, v in headers)]
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        action, action_at = next(((a, offset_in(body, at)) for a, at in
                                  (("pause", pause_at), ("hang", hang_at), ("drop", drop_at)) if at is not None),
                                 (None, None))
        self.reply = Reply(head, body, chunked=transfer == "chunked" and not raw,
                           cuts=cut_points(len(body), chunking, seed), action=action, action_at=action_at)
        return self.reply

    def release(self):
        """Let the current reply go on past its pause."""
        self.reply.gate.set()

    @property
    def last(self):
        """The most recent chat request."""
        chats = [r for r in self.requests if r.path.endswith("/chat/completions")]
        assert chats, "the fake upstream received no chat request"
        return chats[-1]

    def stop(self):
        """Wake every paused or hanging reply and stop listening."""
        self.shutdown.set()
        self.server.stop(timeout=1)

    # -- connection handling ------------------------------------------------

    def _handle(self, sock, _address):
        """Serve one request on one connection, then close it."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one write, one segment
        request = self._read_request(sock)
        if request is None:
            return
        self.requests.append(request)
        watcher = gevent.spawn(self._watch_for_hangup, sock, request)
        try:
            if request.method == "POST" and request.path.endswith("/chat/completions"):
                self._send(sock, self._refusal(request) or self.reply, request)
            elif request.path.endswith("/models"):
                answer_ = self.models.pop(0) if len(self.models) > 1 else self.models[0]
                if answer_ == "hang":
                    gevent.wait([request.client_closed, self.shutdown], count=1)
                elif isinstance(answer_, int):
                    sock.sendall(b"HTTP/1.1 %d Oops\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % answer_)
                else:
                    sock.sendall(json_response(answer_))
            elif request.path == "/props" and self.props is not None:
                sock.sendall(json_response(self.props))
            else:
                sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except OSError:
            request.client_closed.set()
        finally:
            watcher.kill()
            sock.close()

    def _refusal(self, request):
        """A raw error Reply if this chat request breaks the refuse / strict_roles rules, else None."""
        messages = request.json.get("messages") or []
        chars = sum(len(m["content"]) for m in messages)
        if self.refuse and chars > self.refuse[0]:
            response = self.refuse[1](chars) if callable(self.refuse[1]) else self.refuse[1]
            return Reply(b"", response, chunked=False, cuts=[], action=None, action_at=None)
        roles = [m["role"] for m in messages if m["role"] != "system"]
        if self.no_trailing_assistant and roles[-1:] == ["assistant"]:
            body = json.dumps({"error": {"type": "invalid_request_error", "message": "The last message must be "
                               "from the user."}}).encode()
            return Reply(b"", b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close"
                              b"\r\n\r\n" + body, chunked=False, cuts=[], action=None, action_at=None)
        if self.strict_roles and (roles[:1] != ["user"] or any(a == b for a, b in zip(roles, roles[1:]))):
            body = json.dumps({"error": {"code": 400, "type": "invalid_request_error", "message":
                               "Conversation roles must alternate user/assistant/user/assistant/..."}})
            return Reply(b"", b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                              b"Connection: close\r\n\r\n" + body.encode(), chunked=False, cuts=[],
                         action=None, action_at=None)
        return None

    def _send(self, sock, reply, request):
        """Write the head, then each piece (framed as a chunk if chunked), acting at action_at."""
        assert reply is not None, "call upstream.serve() before chat.py asks the fake upstream"
        if reply.head:
            sock.sendall(reply.head)
        offset = 0
        for piece in reply.pieces:
            if offset == reply.action_at and not self._act(reply, request):
                return
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if reply.chunked else piece)
            offset += len(piece)
        if offset == reply.action_at and not self._act(reply, request):
            return
        if reply.chunked:
            sock.sendall(b"0\r\n\r\n")
        request.answered.set()

    def _act(self, reply, request):
        """Pause, hang or drop at the scripted offset; return True to go on writing."""
        if reply.action == "pause":
            gevent.wait([reply.gate, request.client_closed, self.shutdown], count=1)
            return reply.gate.is_set() and not request.client_closed.is_set()
        if reply.action == "hang":
            gevent.wait([request.client_closed, self.shutdown], count=1)
        return False  # drop: the socket closes mid-body

    @staticmethod
    def _read_request(sock):
        """Read one HTTP request (head and Content-Length body); None if the client went away."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        first, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = first.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
        while len(body) < int(headers.get("content-length") or 0):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return RecordedRequest(method, path, headers, body)

    @staticmethod
    def _watch_for_hangup(sock, request):
        """Notice the client closing its end while we are still writing (or paused)."""
        try:
            while sock.recv(4096):
                pass
        except OSError:
            pass
        request.client_closed.set()


def json_response(body):
    """A whole HTTP 200 response carrying a JSON body (bytes, or an object to encode)."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


# ---------------------------------------------------------------------------
# Helpers: waiting, SSE parsing, HTML inspection, talking to chat.py
# ---------------------------------------------------------------------------

def wait_until(condition, timeout=2.0, what="the condition"):
    """Poll condition (cooperatively) until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        gevent.sleep(0.01)


Event = namedtuple("Event", "id event data")


def parse_sse(raw):
    """The complete events and comments in an SSE body (LF framing, as chat.py writes it)."""
    events, comments = [], []
    blocks = raw.decode("utf-8").split("\n\n")
    for block in blocks[:-1]:  # the last piece is an incomplete frame (or empty)
        event_id, name, data = None, "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                comments.append(line[1:].removeprefix(" "))
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value
            elif field == "id":
                event_id = int(value)
        if data:
            events.append(Event(event_id, name, "\n".join(data)))
    return events, comments


def token_text(events, kind):
    """The concatenated, unescaped text of the <span> tokens of one event kind."""
    parts = []
    for event in events:
        if event.event == kind:
            match = re.fullmatch(r"<span>(.*)</span>", event.data, re.S)
            assert match, f"a {kind} event is not one <span>: {event.data!r}"
            parts.append(html.unescape(match.group(1)))
    return "".join(parts)


class Transcript:
    """The parsed frames of an /events response body."""

    def __init__(self, raw, headers=None):
        self.raw, self.headers = raw, headers or {}
        events, self.comments = parse_sse(raw)
        # The unfinished block rendered (no id, not replayed): apart, so the logged events read as they always did.
        self.tails = [e for e in events if e.event == "tail"]
        self.events = [e for e in events if e.event != "tail"]

    @property
    def message(self):
        """The answer text as relayed token by token."""
        return token_text(self.events, "message")

    @property
    def reasoning(self):
        """The reasoning text as relayed token by token."""
        return token_text(self.events, "reasoning")

    @property
    def ids(self):
        """The event ids in order."""
        return [event.id for event in self.events]

    @property
    def finished(self):
        """True once the done event arrived."""
        return any(event.event == "done" for event in self.events)

    @property
    def done(self):
        """The finished bubble's HTML; it must be the one and last event."""
        assert self.events, "no events at all"
        assert [e.event for e in self.events].count("done") == 1, "not exactly one done event"
        assert self.events[-1].event == "done", "done is not the last event"
        return self.events[-1].data


class SSEReader:
    """An /events client over a real socket that collects frames as they arrive."""

    def __init__(self, base, stream_id, last_event_id=None, session=None):
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        self.response = (session or web).get(f"{base}/events", params={"stream": stream_id}, headers=headers,
                                     stream=True, timeout=10)
        self.raw = b""
        self.eof = False

    @property
    def transcript(self):
        """What has arrived so far, parsed."""
        return Transcript(self.raw, self.response.headers)

    def read_until(self, condition, timeout=5.0, what="the events"):
        """Read whatever arrives until condition(transcript) holds; return the transcript."""
        with gevent.Timeout(timeout, AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                                    f"got {self.raw[-600:]!r}")):
            while not condition(self.transcript):
                assert not self.eof, f"the stream ended before {what}: {self.raw[-600:]!r}"
                data = self.response.raw.read1(65536)
                self.eof = not data
                self.raw += data
        return self.transcript

    def read_to_end(self, timeout=5.0):
        """Read until the server closes the response."""
        return self.read_until(lambda _: self.eof, timeout, "the end of the response")

    def close(self):
        """Hang up, like a closed browser tab."""
        self.response.close()


def send(client, prompt="Hi", status=200):
    """POST a prompt through WebTest; return the new stream id (or the response, for errors)."""
    response = client.post("/streaming", {"prompt": prompt}, status=status)
    if status != 200:
        return response
    match = re.search(r'sse-connect="/events\?stream=([A-Za-z0-9_-]+)"', response.text)
    assert match, f"no sse-connect in {response.text!r}"
    return match.group(1)


def read_events(client, stream_id, last_event_id=None, timeout=10):
    """GET /events through WebTest and read the (finite) stream to its end."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    with gevent.Timeout(timeout, AssertionError("/events did not finish")):
        response = client.get("/events", {"stream": stream_id}, headers=headers)
    return Transcript(response.body, response.headers)


def relay(client, prompt="Hi"):
    """Send a prompt and read its whole event stream."""
    return read_events(client, send(client, prompt))


def post_prompt(base, prompt="Hi"):
    """POST a prompt to the real server; return the stream id."""
    response = web.post(f"{base}/streaming", data={"prompt": prompt}, timeout=5)
    assert response.status_code == 200, response.text
    return re.search(r'sse-connect="/events\?stream=([A-Za-z0-9_-]+)"', response.text).group(1)


VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Element:
    """One HTML element: tag, attributes and the text inside it."""

    def __init__(self, tag, attrs):
        self.tag, self.attrs, self.parts = tag, dict(attrs), []

    @property
    def text(self):
        """Its text content (entities decoded)."""
        return "".join(self.parts)

    @property
    def classes(self):
        """Its class names."""
        return (self.attrs.get("class") or "").split()


class _ElementCollector(HTMLParser):
    """Collects every element of a fragment with its text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.elements, self.open = [], []

    def handle_starttag(self, tag, attrs):
        element = Element(tag, attrs)
        self.elements.append(element)
        if tag not in VOID_TAGS:
            self.open.append(element)

    def handle_endtag(self, tag):
        for i in range(len(self.open) - 1, -1, -1):
            if self.open[i].tag == tag:
                del self.open[i:]
                break

    def handle_data(self, data):
        for element in self.open:
            element.parts.append(data)


def elements(fragment, tag=None, cls=None, **attrs):
    """The elements of an HTML fragment with this tag, class and attributes (role="alert"...)."""
    parser = _ElementCollector()
    parser.feed(fragment)
    parser.close()
    return [e for e in parser.elements if (tag is None or e.tag == tag) and (cls is None or cls in e.classes)
            and all(k in e.attrs and e.attrs[k] == v for k, v in attrs.items())]


def alerts(fragment):
    """The texts of the role="alert" elements."""
    return [e.text for e in elements(fragment, role="alert")]


def notes(fragment):
    """The texts of the notes under an answer."""
    return [e.text for e in elements(fragment, "p", cls="note")]


def footer(fragment):
    """The footer line of a finished bubble."""
    (span,) = elements(fragment, "span", cls="footer")
    return span.text


def source_text(fragment):
    """The answer's Markdown source kept in the finished bubble."""
    found = elements(fragment, "template", cls="source")
    return found[0].text if found else ""


def reasoning_text(fragment):
    """The text of the finished bubble's reasoning block ("" if it has none)."""
    found = elements(fragment, "div", cls="reasoning-text")
    return found[0].text if found else ""


def assert_no_active_markup(fragment):
    """Nothing in the fragment can run script or act as htmx: no script/img, no on*/hx-get/src attributes."""
    for element in elements(fragment):
        assert element.tag not in ("script", "img", "iframe"), f"<{element.tag}> in {fragment!r}"
        if element.tag == "form" and re.fullmatch(r"/c/[\w-]+/(regenerate|edit|branch)|/stop\?stream=[\w-]+",
                                                  element.attrs.get("hx-post", "")):
            continue  # chat.py's own forms: Regenerate, Edit, ‹ ›, Stop
        bad = [a for a in element.attrs if a.startswith("on") or a in ("hx-get", "hx-post", "src")]
        assert not bad, f"attribute {bad} on <{element.tag}> in {fragment!r}"


def assert_still_serving(client, upstream):
    """After an error, the next request relays a normal answer."""
    upstream.serve("openai-basic.sse")
    transcript = relay(client, "again")
    assert transcript.message == "Hello, World!"
    assert alerts(transcript.done) == []


def shown_answer(expect):
    """The (answer, reasoning) the page shows for an expected parse: a leading <think> block is reasoning."""
    content, reasoning = expect["content"], expect["reasoning"]
    if content.lstrip().startswith("<think>"):
        thought, _, content = content.lstrip()[len("<think>"):].partition("</think>")
        content, reasoning = content.lstrip("\r\n"), thought.strip()
    return content, reasoning


def parse_stream(body, cuts=()):
    """Feed a body through LineSplitter, SSEParser and Completion in pieces cut at cuts."""
    lines, sse, completion = chat.LineSplitter(), chat.SSEParser(), chat.Completion()
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    for start, end in zip(bounds, bounds[1:]):
        for line in lines.feed(body[start:end]):
            event = sse.feed(line)
            if event:
                completion.apply(*event)
    for line in lines.close():
        event = sse.feed(line)
        if event:
            completion.apply(*event)
    event = sse.close()
    if event:
        completion.apply(*event)
    return completion


def data(obj, *, prefix=b"data: ", end=b"\n\n"):
    """One SSE data event carrying obj as JSON (raw UTF-8, like pydantic and llama.cpp)."""
    return prefix + json.dumps(obj, ensure_ascii=False).encode() + end


def choice(delta=None, finish=None, **extra):
    """A chunk with one choice (index 0)."""
    c = {"index": 0, "finish_reason": finish, **extra}
    if delta is not None:
        c["delta"] = delta
    return {"object": "chat.completion.chunk", "model": "fake-model", "choices": [c]}


ROLE = data(choice({"role": "assistant", "content": ""}))
FINISH = data(choice({}, "stop"))
DONE = b"data: [DONE]\n\n"


def answer(*parts, finish="stop", done=True, reasoning=None, usage_tokens=None, model=None):
    """A streamed answer: role chunk, reasoning, one chunk per part, finish chunk, usage, [DONE]."""
    body = ROLE + (data(choice({"reasoning_content": reasoning})) if reasoning else b"")
    body += b"".join(data(choice({"content": p})) for p in parts)
    if finish:
        body += data(choice({}, finish))
    if usage_tokens:
        prompt, completion = usage_tokens
        body += data({"object": "chat.completion.chunk", "model": "fake-model", "choices": [], "usage": {
            "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}})
    if model:
        body = body.replace(b'"model": "fake-model"', b'"model": ' + json.dumps(model).encode())
    return body + (DONE if done else b"")


# ---------------------------------------------------------------------------
# Over a real gevent server on loopback (timing matters)
# ---------------------------------------------------------------------------

FIRST = data(choice({"content": "Hello"}))
SLOW_ANSWER = answer("Hello", " there", ",", " friend", ".")


def assert_resume_without_loss(upstream, stream_id, open_reader, reconnect):
    """Read one token, drop the connection, reconnect with Last-Event-ID (while streaming or after done):
    every event arrives exactly once, ids 1..n. The upstream must be serving SLOW_ANSWER paused at ","."""
    first = open_reader(stream_id)
    seen = first.read_until(lambda t: t.message.startswith("Hello"), what="the first token").events
    seen = seen[:[e.event for e in seen].index("message") + 1]  # the connection "dropped" after that event
    first.close()
    stream = chat.streams.get(stream_id)
    wait_until(lambda: stream.text() == "Hello there,", what="the tokens before the pause")
    if reconnect == "after-done":
        upstream.release()
        wait_until(lambda: stream.finished, what="the stream to finish")

    second = open_reader(stream_id, last_event_id=seen[-1].id)
    if reconnect == "while-streaming":
        second.read_until(lambda t: t.events, what="the backlog")
        upstream.release()
    rest = second.read_until(lambda t: t.finished, what="done").events

    events = seen + rest
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert token_text(events, "message") == "Hello there, friend."
    assert [e.event for e in events].count("done") == 1


# ---------------------------------------------------------------------------
# The README is a first screen whose commands work as pasted; the docs' links lead somewhere
# ---------------------------------------------------------------------------

def doc_section(path, heading):
    """The text under a ## heading of a Markdown file of the repository, up to the next ## heading."""
    text = (HERE / path).read_text(encoding="utf-8")
    section = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f"{path} has no {heading} section"
    return section.group(1)


# ---------------------------------------------------------------------------
# The page in a real browser: Playwright driving Debian's Chromium, against
# `python chat.py` as a subprocess and the fake upstream
# ---------------------------------------------------------------------------

CHROMIUM = os.environ.get("CHAT_CHROMIUM") or "/usr/bin/chromium"
# Running as root in a closed network: no sandbox, and none of Chromium's background
# connections (the network refuses them, many at a time).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


class PageWatch:
    """What a page did: console errors, dialogs and requests."""

    def __init__(self, page):
        self.page, self.errors, self.dialogs, self.requests = page, [], [], []
        self.allowed_errors = []  # substrings of console errors a test expects
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("request", lambda r: self.requests.append((r.method, r.url)))

    def unexpected_errors(self):
        """Console errors no test asked for."""
        return [e for e in self.errors if not any(a in e for a in self.allowed_errors)]

    def posts(self, path):
        """How many POSTs to path the page made."""
        return sum(1 for method, url in self.requests if method == "POST" and url.split("?")[0].endswith(path))


def after_event(body, marker):
    """The offset just past the whole SSE event that contains marker (a pause point between tokens)."""
    return body.index(b"\n\n", body.index(marker)) + 2


# ---------------------------------------------------------------------------
# Conversations: multi-turn, SQLite, owners, password (issue 4)
# ---------------------------------------------------------------------------

def send_in(client, prompt, conversation=None, **fields):
    """POST a prompt (into a conversation, if given); return (stream id, conversation id)."""
    form = {"prompt": prompt, **fields}
    if conversation:
        form["conversation"] = conversation
    response = client.post("/streaming", form, headers=HX)
    stream_id = re.search(r'sse-connect="/events\?stream=([\w-]+)"', response.text).group(1)
    pushed = response.headers.get("HX-Push-Url")
    return stream_id, conversation or pushed.removeprefix("/c/")


def db_rows(sql, *args):
    """Rows straight from chat.py's database (SQLite or PostgreSQL), as tuples."""
    return [tuple(row) for row in chat.store.db.execute(sql, args).fetchall()]


# ---------------------------------------------------------------------------
# Behind nginx: docs/deploy.md's configuration, exactly, in front of a real chat.Server
# ---------------------------------------------------------------------------

def deploy_nginx_block():
    """The one ```nginx block of docs/deploy.md's ## Behind nginx section."""
    blocks = re.findall(r"^```nginx\n(.*?)^```$", doc_section("docs/deploy.md", "## Behind nginx"), re.M | re.S)
    assert len(blocks) == 1, f"expected one ```nginx block under ## Behind nginx, found {len(blocks)}"
    return blocks[0]


def proxy_sign_in_block():
    """The ```nginx block of docs/deploy.md's ## Sign-in through the proxy section."""
    blocks = re.findall(r"^```nginx\n(.*?)^```$", doc_section("docs/deploy.md", "## Sign-in through the proxy"),
                        re.M | re.S)
    assert len(blocks) == 1, f"expected one ```nginx block under ## Sign-in through the proxy, found {len(blocks)}"
    return blocks[0]


def scaled_nginx_block(second_port):
    """The Deploy block with docs/scale-out.md's upstream block: its first server becomes the port Nginx fills
    in, its second one second_port."""
    scale_out = (HERE / "docs" / "scale-out.md").read_text(encoding="utf-8")
    (upstream,) = re.findall(r"^```nginx\n(.*?)^```$", scale_out, re.M | re.S)
    upstream = substitute(upstream, "server 10.0.0.11:8080;", "server 127.0.0.1:8080;")
    upstream = substitute(upstream, "server 10.0.0.12:8080;", f"server 127.0.0.1:{second_port};")
    deploy = deploy_nginx_block()
    (original,) = re.findall(r"^upstream chat \{.*?^\}\n", deploy, re.M | re.S)
    return deploy.replace(original, upstream)


def substitute(text, old, new):
    """text with old replaced by new; old must be there exactly once, so the docs cannot drift from the test."""
    assert text.count(old) == 1, f"the documented nginx block should contain {old!r} exactly once"
    return text.replace(old, new)


def required_tool(name, *fallbacks):
    """The path of a program the nginx tests need; without it they skip locally and fail under CI."""
    path = shutil.which(name) or next((p for p in fallbacks if os.access(p, os.X_OK)), None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing under CI (apt-get install {name})")
        pytest.skip(f"no {name} here (apt-get install {name})")
    return path


class Seen:
    """chat.app as is, noting what each request looked like when it reached chat.py."""

    def __init__(self, app):
        self.app, self.requests = app, []

    def __call__(self, environ, start_response):
        request = bottle.BaseRequest(environ)
        self.requests.append({"path": request.path, "host": environ.get("HTTP_HOST"),
                              "forwarded_for": environ.get("HTTP_X_FORWARDED_FOR"),
                              "forwarded_proto": environ.get("HTTP_X_FORWARDED_PROTO"),
                              "remote_addr": request.remote_addr, "peer_port": environ.get("REMOTE_PORT")})
        return self.app(environ, start_response)


class Nginx:
    """/usr/sbin/nginx running an nginx block in front of chat_port, on loopback ports, with a self-signed certificate."""

    def __init__(self, folder, chat_port, block, replace=()):
        executable = required_tool("nginx", "/usr/sbin/nginx")
        openssl = required_tool("openssl")
        self.folder, self.chat_port, self.port, self.http_port = folder, chat_port, free_port(), free_port()
        self.url = self.origin = f"https://127.0.0.1:{self.port}"
        self.cert, key = folder / "cert.pem", folder / "key.pem"
        subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(self.cert)], check=True, capture_output=True, timeout=30)
        # Only what cannot run on loopback as is changes; each must be found exactly once.
        block = substitute(block, "server 127.0.0.1:8080;", f"server 127.0.0.1:{chat_port};")
        block = substitute(block, "listen 443 ssl", f"listen 127.0.0.1:{self.port} ssl")
        block = substitute(block, "listen 80;", f"listen 127.0.0.1:{self.http_port};")
        block = substitute(block, "/etc/letsencrypt/live/chat.example.com/fullchain.pem", str(self.cert))
        block = substitute(block, "/etc/letsencrypt/live/chat.example.com/privkey.pem", str(key))
        for old, new in replace:
            block = substitute(block, old, new)
        self.error_log = folder / "error.log"
        # user root: workers must reach the temp folders in a root-only tmp dir (ignored when not root).
        (folder / "nginx.conf").write_text(f"""
daemon off;
user root;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{block}
}}
""")
        with open(folder / "stderr.log", "wb") as stderr:
            self.process = subprocess.Popen([executable, "-p", str(folder), "-c", str(folder / "nginx.conf")],
                                            stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_until(self.answering, timeout=10, what=f"nginx on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def log(self):
        """nginx's error log and stderr, for failure messages."""
        return "".join(p.read_text() for p in (self.folder / "stderr.log", self.error_log) if p.exists())

    def answering(self):
        """True once /healthz answers through nginx over TLS; fails at once if nginx exited."""
        assert self.process.poll() is None, f"nginx exited: {self.log()}"
        try:
            return requests.get(f"{self.url}/healthz", verify=str(self.cert), timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self):
        """Fast shutdown (SIGTERM), waited for; SIGKILL if it lingers."""
        terminate(self.process)


# ---------------------------------------------------------------------------
# Bounded under abuse and faults: each attack hurts nobody but the attacker
# ---------------------------------------------------------------------------

def owner_cookie_header():
    """The test browser's owner cookie as a Cookie header value."""
    return f"chat_owner={web.cookies['chat_owner']}"


# ---------------------------------------------------------------------------
# The shipped artifacts: dist/chat.pyz and dist/chat, each alone in an empty folder
# ---------------------------------------------------------------------------

# Everything the artifacts are made of; a change to any of them means a new build.
BUILD_INPUTS = ("chat.py", "chat_scale.py", "templates", "static", "requirements.txt", "ship")


def head_commit():
    """The short hash of HEAD, which both artifacts' --version must print."""
    return subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()


def build_key(commit):
    """A cached build's name: a hash of its inputs, the Python and packages that build it, and the commit."""
    # Every installed version counts: requirements.txt pins only the direct dependencies.
    installed = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    digest = hashlib.sha256(f"{sys.version}|{platform.machine()}|{sys.prefix}|{commit}|{installed}".encode())
    for name in BUILD_INPUTS:
        path = HERE / name
        for file in sorted([path] if path.is_file() else path.rglob("*")):
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(f"\0{file.relative_to(HERE)}\0".encode() + file.read_bytes())
    return digest.hexdigest()[:16]


Built = namedtuple("Built", "pyz exe commit")


def prune_builds(folder, keep=4):
    """Delete all but the newest few cached builds (about 20 MB each); builds still in progress stay."""
    entries = sorted((p for p in folder.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name)),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def is_python_env_dir(folder):
    """True for a venv's, pyenv's or this interpreter's bin folder."""
    path = Path(folder)
    return ((path.parent / "pyvenv.cfg").exists() or ".pyenv" in path.parts or "pyenv" in path.name
            or path in (Path(sys.prefix) / "bin", Path(sys.base_prefix) / "bin"))


def bare_env(home, **extra):
    """clean_env() as on a machine without our Python setup: no PYTHON*, venv, pyenv or CHAT_* settings."""
    env = {k: v for k, v in clean_env().items() if not k.startswith(("PYTHON", "CHAT_"))
           and "PYENV" not in k and k not in ("VIRTUAL_ENV", "CONDA_PREFIX")}
    folders = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(d for d in folders if d and not is_python_env_dir(d))
    return {**env, "HOME": str(home), **extra}


# ---------------------------------------------------------------------------
# The page people expect: Markdown while streaming, math, no JavaScript, history,
# focus, phones, drafts, titles, links — in a real browser
# ---------------------------------------------------------------------------

def words(text):
    """Text with its whitespace normalised (innerText puts newlines between blocks)."""
    return " ".join(text.split())


# ---------------------------------------------------------------------------
# Scale out: several chat.py processes sharing Redis and PostgreSQL
# ---------------------------------------------------------------------------

class RedisServer:
    """Debian's redis-server of the suite's own: no persistence (a restart comes back empty), a free port."""

    def __init__(self, folder):
        self.executable = required_tool("redis-server", "/usr/bin/redis-server")
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.start()

    def start(self):
        """Start it and wait until it answers PING."""
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answering, timeout=10, what="redis-server to answer PING")

    def answering(self):
        """True once PING gets PONG."""
        assert self.process.poll() is None, "redis-server exited: " + (self.folder / "redis.log").read_text()
        return self.command(b"PING") == b"+PONG\r\n"

    def command(self, *words):
        """Send one command over a fresh connection; its raw reply (b"" when nobody answers)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
                return sock.recv(65536)
        except OSError:
            return b""

    def stop(self, kill=False):
        """Stop it (SIGKILL: at once, losing everything, as no persistence is configured)."""
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        self.process.wait(timeout=10)
