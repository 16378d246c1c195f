"""chat.py — a self-hosted chat page that streams LLM answers token by token.

One file: Bottle for the routes, gevent for the server, requests for the upstream,
htmx + its SSE extension in the browser. Talks to any OpenAI-compatible server
(OpenAI, Ollama, llama.cpp, vLLM, LM Studio, OpenRouter...) or, with no
configuration, to its own built-in demo model.

Run:    python chat.py            then open http://127.0.0.1:8080
Help:   python chat.py --help

Environment: OPENAI_BASE_URL (upstream ".../v1"; unset = built-in demo model),
OPENAI_API_KEY, CHAT_MODEL, HOST, PORT, CHAT_DB.

How a token travels: upstream bytes -> relay_upstream() greenlet (split lines, parse
SSE, parse JSON chunk) -> Stream.publish() frames it once and appends it to the
stream's log and to each reader's Queue -> the /events generator drains everything
queued into one write -> htmx-ext-sse swaps the <span> into the bubble.
"""

# gevent must patch the standard library before anything imports socket, ssl or
# threading (requests does): a greenlet blocked on an unpatched socket would block
# every other stream in the process.
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import html  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

import bottle  # noqa: E402
import gevent  # noqa: E402
import requests  # noqa: E402
import urllib3.exceptions  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from gevent.queue import Queue  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402
from pygments import highlight as pygments_highlight  # noqa: E402
from pygments.formatters import HtmlFormatter  # noqa: E402
from pygments.lexers import get_lexer_by_name  # noqa: E402
from pygments.util import ClassNotFound  # noqa: E402

log = logging.getLogger("chat")

HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
bottle.TEMPLATE_PATH.insert(0, os.path.join(HERE, "templates"))


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

class Settings:
    """Everything configurable, read once from the environment; flags override in main()."""

    def __init__(self, env):
        self.base_url = (env.get("OPENAI_BASE_URL") or "").rstrip("/") or None
        self.api_key = env.get("OPENAI_API_KEY") or None
        self.model = env.get("CHAT_MODEL") or None
        self.host = env.get("HOST") or "127.0.0.1"
        self.port = int(env.get("PORT") or 8080)
        self.db = env.get("CHAT_DB") or "chat.db"
        self.max_prompt = int(env.get("CHAT_MAX_PROMPT") or 32_000)
        self.max_streams = int(env.get("CHAT_MAX_STREAMS") or 25_000)
        self.connect_timeout = float(env.get("CHAT_CONNECT_TIMEOUT") or 10)
        # Longer than any keep-alive interval (llama.cpp pings every 30 s, DeepSeek
        # may queue for minutes but sends comments meanwhile): silence this long is dead.
        self.read_timeout = float(env.get("CHAT_READ_TIMEOUT") or 120)
        self.ping_interval = float(env.get("CHAT_PING_INTERVAL") or 10)
        self.grace = float(env.get("CHAT_STREAM_GRACE") or 10)
        self.demo_delay = float(env.get("CHAT_DEMO_DELAY") or 0.03)

    @property
    def demo(self):
        """True when no upstream is configured and the built-in demo model answers."""
        return self.base_url is None

    def upstream(self):
        """The base URL requests go to: the configured one, or our own demo endpoint."""
        if self.base_url:
            return self.base_url
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/demo/v1"

    def upstream_label(self):
        """The upstream for people to read: no credentials, no query string."""
        if self.demo:
            return "built-in demo model"
        parts = urllib.parse.urlsplit(self.base_url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


settings = Settings(os.environ)


# ---------------------------------------------------------------------------
# Upstream client: bytes -> lines -> SSE events -> chunks (WIRE.md §5)
# ---------------------------------------------------------------------------

def redact(text):
    """Text from the upstream with our API key blanked out (some proxies echo it back)."""
    if text and settings.api_key and settings.api_key in text:
        return text.replace(settings.api_key, "[redacted]")
    return text


class UpstreamError(Exception):
    """The model server refused, failed or broke off; the message is for the user."""


class StopRequested(Exception):
    """Raised inside a relay greenlet when the user pressed Stop."""


class UpstreamTimeout(Exception):
    """Raised inside a relay greenlet by the watchdog when the upstream went silent."""


BOM = b"\xef\xbb\xbf"


class LineSplitter:
    """Split a byte stream into lines on CR, LF and CRLF only, whatever the read boundaries."""

    def __init__(self):
        self.pending = b""
        self.started = False
        self.skip_lf = False  # the last read ended in CR: a LF that follows belongs to it

    def feed(self, data):
        """Return the complete lines in data (without their endings)."""
        if self.skip_lf and data:
            self.skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        buf = self.pending + data if self.pending else data
        if not self.started:
            if len(buf) < 3 and BOM.startswith(buf):
                self.pending = buf
                return []
            self.started = True
            if buf.startswith(BOM):
                buf = buf[3:]
        # bytes.splitlines() splits on \r, \n and \r\n only, unlike str.splitlines().
        lines = buf.splitlines(True)
        if lines and lines[-1][-1:] not in (b"\n", b"\r"):
            self.pending = lines.pop()
        else:
            self.pending = b""
        if lines and lines[-1][-1:] == b"\r":
            self.skip_lf = True
        return [line.rstrip(b"\r\n") for line in lines]

    def close(self):
        """Return the last line if the stream ended without a line ending."""
        rest, self.pending = self.pending, b""
        return [rest] if rest else []


class SSEParser:
    """The WHATWG event-stream field rules, fed one line at a time."""

    def __init__(self):
        self.event = ""
        self.data = None  # None: no data line seen, so a blank line dispatches nothing

    def feed(self, line):
        """Take one line (bytes); return (event, data) when it completes an event."""
        if not line:
            if self.data is None:
                self.event = ""
                return None
            event = (self.event or "message", "\n".join(self.data))
            self.event, self.data = "", None
            return event
        if line[:1] == b":":
            return None  # comment / keep-alive
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            (self.data if self.data is not None else self._start()).append(value.decode("utf-8", "replace"))
        elif field == b"event":
            self.event = value.decode("utf-8", "replace")
        elif field == b"error":
            # llama.cpp before 2025-09 sent errors as a non-standard "error:" field.
            self.event = "error"
            self._start().append(value.decode("utf-8", "replace"))
        return None

    def _start(self):
        """Begin (or continue) the data buffer of the pending event."""
        if self.data is None:
            self.data = []
        return self.data

    def close(self):
        """At EOF, dispatch a pending event that lacked its blank line (lenient)."""
        return self.feed(b"") if self.data is not None else None


def error_text(obj):
    """The human message in a JSON error body of any known shape, or None."""
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict):
        msg = err.get("message")
        if isinstance(msg, str) and msg:
            return msg
        return json.dumps(err)[:500]
    if isinstance(err, str) and err:
        return err
    for key in ("message", "detail"):
        if isinstance(obj.get(key), str) and obj[key]:
            return obj[key]
    return None


_TAGS = re.compile(r"<[^>]*>")
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)


def body_message(body):
    """A readable message from an error body: JSON error, HTML title, or the text itself."""
    text = body.decode("utf-8", "replace").strip()
    try:
        msg = error_text(json.loads(text))
    except ValueError:
        msg = None
    if msg:
        return msg
    if text.lstrip()[:1] == "<":
        title = _TITLE.search(text)
        text = title.group(1) if title else _TAGS.sub(" ", text)
        text = html.unescape(text)
    text = " ".join(text.split())
    return (text[:300] + "…") if len(text) > 300 else (text or "(empty response)")


class Completion:
    """Everything an upstream has said about one answer, parsed from its chunks."""

    def __init__(self):
        self.content = []
        self.reasoning = []
        self.finish_reason = None
        self.usage = None
        self.tool_calls = {}
        self.error = None
        self.done_marker = False
        self.model = None

    @property
    def finished(self):
        """True once no more text will come: [DONE], or an error."""
        return self.done_marker or self.error is not None

    def apply(self, event, data):
        """Take one SSE event; return the (kind, text) deltas it carries."""
        if self.finished or not data.strip():
            return ()
        if data.strip() == "[DONE]":
            self.done_marker = True
            return ()
        try:
            obj = json.loads(data)
        except ValueError:
            if event == "error":
                self.error = data.strip()[:500]
            else:
                log.warning("skipping an upstream event that is not JSON: %.200r", data)
            return ()
        if not isinstance(obj, dict):
            return ()
        deltas = []
        self.model = obj.get("model") or self.model
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) not in (0, None):
                continue
            deltas.extend(self._apply_choice(choice))
        usage = obj.get("usage")
        if not usage and isinstance(obj.get("x_groq"), dict):
            usage = obj["x_groq"].get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        # Content on the same chunk as the error (OpenRouter) was appended first.
        if event == "error" or obj.get("error") or obj.get("object") == "error":
            self.error = error_text(obj) or "The model server reported an error during streaming."
        return deltas

    def _apply_choice(self, choice):
        """Take one choice of a chunk: text, reasoning, tool calls, finish reason, usage."""
        deltas = []
        delta = choice.get("delta") or choice.get("message") or {}
        if isinstance(delta, dict):
            # Servers may send two reasoning fields with the same text: take one.
            for key in ("reasoning_content", "reasoning"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    self.reasoning.append(text)
                    deltas.append(("reasoning", text))
                    break
            else:
                for detail in delta.get("reasoning_details") or ():
                    text = detail.get("text") if isinstance(detail, dict) else None
                    if isinstance(text, str) and text:
                        self.reasoning.append(text)
                        deltas.append(("reasoning", text))
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    self.content.append(text)
                    deltas.append(("content", text))
            for call in delta.get("tool_calls") or ():
                self._add_tool_call(call)
        if isinstance(choice.get("usage"), dict):
            self.usage = choice["usage"]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        return deltas

    def _add_tool_call(self, call):
        """Accumulate a streamed tool call by its index (arguments come in fragments)."""
        if not isinstance(call, dict):
            return
        slot = self.tool_calls.setdefault(call.get("index", len(self.tool_calls)),
                                          {"id": None, "name": "", "arguments": ""})
        slot["id"] = call.get("id") or slot["id"]
        function = call.get("function") or {}
        slot["name"] += function.get("name") or ""
        args = function.get("arguments")
        slot["arguments"] += args if isinstance(args, str) else json.dumps(args) if args else ""


def open_completion(session, messages):
    """POST the conversation to the upstream; return the streaming response or raise UpstreamError."""
    url = settings.upstream() + "/chat/completions"
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    model = current_model(session)
    if model:
        body["model"] = model
    headers = {"Accept": "text/event-stream"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    try:
        # No read timeout here: one watchdog per stream (Streams.sweep) watches for
        # silence, instead of a timer armed around every single socket read.
        response = session.post(url, json=body, headers=headers, stream=True,
                                timeout=(settings.connect_timeout, None))
    except requests.ConnectionError as exc:
        log.warning("upstream %s unreachable: %s", settings.upstream_label(), exc)
        raise UpstreamError(f"Could not reach the model server at {settings.upstream_label()} "
                            f"({connection_problem(exc)}).") from None
    except requests.RequestException as exc:
        log.warning("upstream request failed: %s", exc)
        raise UpstreamError(f"The request to the model server failed ({type(exc).__name__}).") from None
    if response.status_code >= 300:
        with response:
            body = response.raw.read(65536, decode_content=True) or b""
        raise UpstreamError(f"The model server answered {response.status_code} "
                            f"{response.reason or ''}: {body_message(body)}".replace("  ", " "))
    return response


def connection_problem(exc):
    """A short cause for a connection error: refused, name not found, reset..."""
    text = str(exc)
    for needle, words in (("BadStatusLine", "it did not answer with HTTP"),
                          ("RemoteDisconnected", "it closed the connection without answering"),
                          ("refused", "connection refused"), ("Name or service", "unknown host"),
                          ("getaddrinfo", "unknown host"), ("timed out", "timed out"),
                          ("reset", "connection reset")):
        if needle in text:
            return words
    return "connection failed"


def read_completion(response, completion, on_read=None):
    """Yield (kind, text) deltas from a streaming response as soon as their bytes arrive."""
    ctype = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype == "application/json":
        # The server ignored stream:true and answered one whole completion.
        body = response.raw.read(8 << 20, decode_content=True)
        yield from completion.apply("message", body.decode("utf-8", "replace"))
        completion.done_marker = completion.error is None
        return
    if ctype == "text/html":
        raise UpstreamError("The model server answered with a web page instead of a stream: "
                            + body_message(response.raw.read(65536, decode_content=True)))
    lines, sse = LineSplitter(), SSEParser()
    raw = response.raw
    while not completion.finished:
        # read1() returns whatever has arrived, chunked or close-delimited alike;
        # iter_lines()/iter_content() would hold tokens back on a close-delimited body.
        data = raw.read1(65536, decode_content=True)
        if on_read:
            on_read()  # keep-alive comments count as life too
        if not data:
            for line in lines.close():
                event = sse.feed(line)
                if event:
                    yield from completion.apply(*event)
            event = sse.close()
            if event:
                yield from completion.apply(*event)
            return
        for line in lines.feed(data):
            event = sse.feed(line)
            if event:
                yield from completion.apply(*event)
                if completion.finished:
                    return


_models_cache = {}


def current_model(session):
    """The model to ask for: configured, or the upstream's first listed one (cached)."""
    if settings.model:
        return settings.model
    if settings.demo:
        return "demo"
    base = settings.upstream()
    if base not in _models_cache:
        try:
            headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
            r = session.get(base + "/models", headers=headers, timeout=settings.connect_timeout)
            data = r.json().get("data") or [] if r.ok else []
            _models_cache[base] = data[0]["id"] if data else None
        except (requests.RequestException, ValueError, KeyError, TypeError, AttributeError):
            log.warning("could not list models at %s", settings.upstream_label())
            return None
    return _models_cache[base]


def make_session():
    """A requests session whose pool holds as many upstream connections as we have streams."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=1024)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


http = make_session()


# ---------------------------------------------------------------------------
# Inline <think> reasoning
# ---------------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ThinkSplitter:
    """Route a leading <think>…</think> block in the content to reasoning, tags split anywhere."""

    def __init__(self):
        self.state = "start"  # start -> think -> content, or start -> content
        self.held = ""
        self.trim = False     # just after a tag: newlines that follow it are layout, not text

    def feed(self, text):
        """Return the (kind, text) pieces of this content delta that can be shown now."""
        if self.state == "content" and not self.trim:
            return [("message", text)]
        self.held += text
        if self.state == "start":
            stripped = self.held.lstrip()
            if len(stripped) < len(THINK_OPEN) and THINK_OPEN.startswith(stripped):
                return []
            if not stripped.startswith(THINK_OPEN):
                self.state = "content"
                return self._release("message", len(self.held))
            self.state, self.held, self.trim = "think", stripped[len(THINK_OPEN):], True
        if self.state == "content":
            return self._release("message", len(self.held))
        end = self.held.find(THINK_CLOSE)
        if end < 0:
            return self._release("reasoning", len(self.held) - partial_suffix(self.held, THINK_CLOSE))
        out = self._release("reasoning", end)
        self.held = self.held[len(THINK_CLOSE):]
        self.state, self.trim = "content", True
        return out + self._release("message", len(self.held))

    def _release(self, kind, upto):
        """Emit held[:upto] as kind, minus the newlines right after a tag."""
        ready, self.held = self.held[:upto], self.held[upto:]
        if self.trim:
            ready = ready.lstrip("\r\n")
            self.trim = not ready
        return [(kind, ready)] if ready else []

    def close(self):
        """Return what was held back at the end of the answer."""
        held, self.held = self.held, ""
        if not held or self.trim and not held.strip("\r\n"):
            return []
        return [("reasoning" if self.state == "think" else "message", held)]


def partial_suffix(text, tag):
    """Length of the longest end of text that could be the start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------
# SSE framing
# ---------------------------------------------------------------------------

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def sse_frame(event, payload, event_id=None):
    """One SSE frame as bytes: id, event, one "data: " line per payload line, blank line."""
    head = f"id: {event_id}\nevent: {event}\n" if event_id is not None else f"event: {event}\n"
    if "\n" not in payload and "\r" not in payload:
        return f"{head}data: {payload}\n\n".encode()
    # Split on CR, LF and CRLF only: str.splitlines() would also split on U+2028 etc.
    body = "".join(f"data: {line}\n" for line in _LINE_BREAK.split(payload))
    return f"{head}{body}\n".encode()


# The first write of every /events response: sends the headers at once and makes
# the browser reconnect after 1 s (not 3) if the connection drops.
SSE_HELLO = b": connected\nretry: 1000\n\n"
SSE_PING = b": ping\n\n"


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------

class Stream:
    """One answer being generated: its event log, its readers and its relay greenlet."""

    __slots__ = ("id", "messages", "log", "readers", "text", "reasoning", "completion",
                 "started", "first_token_at", "finished_at", "last_activity", "greenlet",
                 "status", "error", "tokens")

    def __init__(self, stream_id, messages):
        self.id = stream_id
        self.messages = messages
        self.log = []          # every frame sent so far; event id N is log[N-1]
        self.readers = set()   # one Queue per connected /events response
        self.text = []         # what was shown as the answer (after <think> splitting)
        self.reasoning = []
        self.completion = Completion()
        self.started = self.last_activity = time.monotonic()
        self.first_token_at = None
        self.finished_at = None
        self.greenlet = None
        self.status = "streaming"  # -> done | stopped | error | truncated
        self.error = None
        self.tokens = 0

    @property
    def finished(self):
        """True once the done event is in the log."""
        return self.finished_at is not None

    def publish(self, event, payload):
        """Frame an event once, log it, and hand it to every connected reader."""
        frame = sse_frame(event, payload, len(self.log) + 1)
        self.log.append(frame)
        for queue in self.readers:
            queue.put_nowait(frame)

    def touch(self):
        """Note that the upstream is alive (the watchdog reads this)."""
        self.last_activity = time.monotonic()

    def token(self, kind, text):
        """Publish one piece of answer or reasoning text."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens += 1
        (self.text if kind == "message" else self.reasoning).append(text)
        self.publish(kind, "<span>" + html.escape(text, quote=False) + "</span>")

    def finish(self, status, error=None):
        """Publish the finished bubble as the last event; nothing is published after it."""
        if self.finished:
            return
        self.status, self.error = status, redact(error)
        try:
            bubble = render_answer(self)
        except Exception:  # noqa: BLE001 — a rendering bug must not leave the bubble streaming
            log.exception("rendering the answer failed")
            self.error = error or "chat.py could not render this answer."
            bubble = render_plain(self)
        self.publish("done", bubble)
        self.finished_at = time.monotonic()

    def frames_after(self, last_id):
        """The logged frames a reader that has seen event last_id still needs."""
        return self.log[max(0, last_id):]


class Streams:
    """The registry of live streams by secret id, with a janitor for pings, timeouts and cleanup."""

    def __init__(self):
        self.by_id = {}
        self.janitor = None
        self.last_ping = 0.0

    def __len__(self):
        return len(self.by_id)

    def get(self, stream_id):
        """The stream with this id, or None."""
        return self.by_id.get(stream_id)

    def start(self, messages):
        """Register a new stream and start its relay greenlet."""
        if len(self.by_id) >= settings.max_streams:
            raise bottle.HTTPError(503, "The server is at its limit of open answers; try again shortly.")
        stream = Stream(secrets.token_urlsafe(18), messages)
        self.by_id[stream.id] = stream
        stream.greenlet = gevent.spawn(relay_upstream, stream)
        # If the greenlet dies without finishing (killed before it ever ran), still end the stream.
        stream.greenlet.link(lambda _: stream.finish("stopped"))
        if self.janitor is None or self.janitor.dead:
            self.janitor = gevent.spawn(self.sweep_forever)
        return stream

    def stop(self, stream_id):
        """Stop generation: the relay greenlet unwinds and closes the upstream connection."""
        stream = self.by_id.get(stream_id)
        if stream is None:
            return False
        if not stream.finished and stream.greenlet:
            stream.greenlet.kill(StopRequested, block=False)
        return True

    def sweep(self, now):
        """Kill silent upstreams, ping readers, drop finished streams after the grace period."""
        ping = now - self.last_ping >= settings.ping_interval
        if ping:
            self.last_ping = now
        for stream_id, stream in list(self.by_id.items()):
            if stream.finished:
                if now - stream.finished_at >= settings.grace and not stream.readers:
                    del self.by_id[stream_id]
                continue
            if now - stream.last_activity > settings.read_timeout and stream.greenlet:
                stream.greenlet.kill(UpstreamTimeout, block=False)
            if ping:
                for queue in stream.readers:
                    queue.put_nowait(SSE_PING)

    def sweep_forever(self):
        """The janitor greenlet: one timer for every stream, instead of one per read."""
        while self.by_id:
            gevent.sleep(min(1.0, settings.grace, settings.ping_interval))
            self.sweep(time.monotonic())


streams = Streams()


def relay_upstream(stream):
    """Greenlet body: read the upstream answer and publish it token by token, then finish."""
    completion, think = stream.completion, ThinkSplitter()
    try:
        response = open_completion(http, stream.messages)
        with response:
            for kind, text in read_completion(response, completion, stream.touch):
                for piece in (think.feed(text) if kind == "content" else [("reasoning", text)]):
                    stream.token(*piece)
        for piece in think.close():
            stream.token(*piece)
        if completion.error:
            stream.finish("error", completion.error)
        elif completion.finished or completion.finish_reason:
            stream.finish("done")
        else:
            stream.finish("truncated")
    except StopRequested:
        stream.finish("stopped")
    except UpstreamTimeout:
        stream.finish("error", f"The model server sent nothing for {settings.read_timeout:g} seconds; "
                               "gave up waiting.")
    except UpstreamError as exc:
        stream.finish("error", str(exc))
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        # urllib3 raises ProtocolError (an HTTPError, not a RequestException) when the body breaks off.
        log.warning("upstream broke off: %r", exc)
        stream.finish("error", "The connection to the model server broke off mid-answer.")
    except Exception:  # noqa: BLE001 — the bubble must end whatever went wrong
        log.exception("relay failed")
        stream.finish("error", "chat.py hit an internal error while relaying this answer.")


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

_FORMATTER = HtmlFormatter(nowrap=True)


def highlight_code(code, lang, _attrs):
    """Pygments-highlight a fenced code block; unknown languages stay plain (markdown-it escapes)."""
    if not lang:
        return ""
    try:
        lexer = get_lexer_by_name(lang.split()[0])
    except ClassNotFound:
        return ""
    return pygments_highlight(code, lexer, _FORMATTER)


markdown = MarkdownIt("commonmark", {"html": False, "highlight": highlight_code})
markdown.enable(["table", "strikethrough"])


def render_link_open(renderer, tokens, idx, options, env):
    """Links from the model open safely: no referrer, no opener, no follow."""
    tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
    return renderer.renderToken(tokens, idx, options, env)


markdown.add_render_rule("link_open", render_link_open)


def render_fence(renderer, tokens, idx, options, env):
    """A fenced code block with its own copy button."""
    block = renderer.fence(tokens, idx, options, env)
    return ('<div class="code-block"><button type="button" class="copy" data-copy="code" '
            f'aria-label="Copy code">Copy</button>{block}</div>\n')


markdown.add_render_rule("fence", render_fence)


def render_markdown(text):
    """Answer text as safe HTML: raw HTML is escaped, javascript: links are refused."""
    return markdown.render(text)


NOTES = {
    "length": "The answer was cut off: the model reached its length limit.",
    "model_length": "The answer was cut off: the model reached its context limit.",
    "content_filter": "The model's content filter stopped the answer.",
    "truncated": "The stream ended before the model said it was finished; the answer may be incomplete.",
    "stopped": "Stopped.",
}


def answer_notes(stream):
    """The notes under a finished answer: cut off, truncated, stopped, tool calls."""
    c = stream.completion
    notes = []
    if stream.status in ("stopped", "truncated"):
        notes.append(NOTES[stream.status])
    elif c.finish_reason in NOTES:
        notes.append(NOTES[c.finish_reason])
    for call in c.tool_calls.values():
        notes.append(f"The model asked to run the tool {call['name'] or '?'}"
                     f"({call['arguments']}); chat.py runs no tools.")
    return notes


def answer_footer(stream):
    """One line of facts: model, finish reason, token counts, speed."""
    c, parts = stream.completion, []
    if c.model:
        parts.append(c.model)
    if c.finish_reason:
        parts.append(f"finish: {c.finish_reason}")
    usage = c.usage or {}
    out_tokens = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None
    if isinstance(usage.get("prompt_tokens"), int) and out_tokens is not None:
        parts.append(f"{usage['prompt_tokens']} in / {out_tokens} out tokens")
    end = stream.finished_at or time.monotonic()
    if stream.first_token_at and end - stream.first_token_at > 0.05:
        count = out_tokens or stream.tokens
        parts.append(f"{count / (end - stream.first_token_at):.1f} tokens/s")
    return " · ".join(parts)


def split_answer(stream):
    """Answer and reasoning text; a lone </think> (opening tag in the prompt) splits late."""
    text, reasoning = "".join(stream.text), "".join(stream.reasoning)
    if not reasoning and THINK_CLOSE in text and THINK_OPEN not in text:
        reasoning, _, text = text.partition(THINK_CLOSE)
    return text.lstrip("\r\n"), reasoning.strip()


def render_answer(stream):
    """The finished assistant bubble, sent as the done event."""
    text, reasoning = split_answer(stream)
    return bottle.template("answer", stream_id=stream.id, answer_html=render_markdown(text), source=text,
                           reasoning=reasoning, error=stream.error, notes=answer_notes(stream),
                           footer=answer_footer(stream), status=stream.status)


def render_plain(stream):
    """The finished bubble without Markdown: the fallback if rendering ever fails."""
    text = "".join(stream.text)
    return bottle.template("answer", stream_id=stream.id, source=text, reasoning="", notes=[],
                           answer_html=f"<pre>{html.escape(text)}</pre>" if text else "",
                           error=stream.error, footer="", status=stream.status)


def render_missing(stream_id):
    """The bubble for a stream we no longer have (finished long ago, or a restart)."""
    return bottle.template("answer", stream_id=stream_id, answer_html="", source="", reasoning="",
                           error="This answer is no longer available: the server may have restarted.",
                           notes=[], footer="", status="error")


# ---------------------------------------------------------------------------
# Built-in demo model (an OpenAI-compatible endpoint served by this same app)
# ---------------------------------------------------------------------------

def demo_reply(prompt):
    """The demo model's Markdown answer to a prompt: a quote, a list and a code block."""
    words = prompt.split()
    quoted = "\n".join("> " + line for line in prompt[:600].splitlines() if line.strip()) or "> (nothing)"
    longest = max(words, key=len) if words else ""
    return (
        "**This is the demo model built into chat.py.** It runs offline and only echoes "
        "what you write, so you can see streaming and rendering work.\n\n"
        f"You wrote {len(words)} word{'s' if len(words) != 1 else ''}:\n\n{quoted}\n\n"
        "To talk to a real model, restart chat.py with its address:\n\n"
        "1. Ollama: `OPENAI_BASE_URL=http://localhost:11434/v1 python chat.py`\n"
        "2. llama.cpp server: `OPENAI_BASE_URL=http://localhost:8080/v1 python chat.py --port 8000`\n"
        "3. OpenAI: `OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-… python chat.py`\n\n"
        "Here is your message as a tiny program:\n\n"
        "```python\n"
        f"def longest_word():\n    return {longest[:80]!r}\n\n\nprint(longest_word())\n"
        "```\n"
    )


_DEMO_TOKEN = re.compile(r"\s*\S+|\s+")


def demo_chunks(prompt, delay):
    """The demo reply as OpenAI chat.completion.chunk SSE frames, paced like a real model."""
    base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": "demo"}

    def chunk(delta, finish=None, **extra):
        data = dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}], **extra)
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    reply = demo_reply(prompt)
    yield chunk({"role": "assistant", "content": ""})
    count = 0
    for count, token in enumerate(_DEMO_TOKEN.findall(reply), 1):
        gevent.sleep(delay)
        yield chunk({"content": token})
    yield chunk({}, "stop")
    usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": count,
             "total_tokens": len(prompt.split()) + count}
    yield b"data: " + json.dumps(dict(base, choices=[], usage=usage)).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

app = bottle.Bottle()
# Room for a prompt at the limit even when every character is 4 UTF-8 bytes, %-encoded.
bottle.BaseRequest.MEMFILE_MAX = 512 * 1024


def form_error(status, message):
    """A readable error for the form; htmx is configured to show 4xx bodies in #form-error."""
    bottle.response.status = status
    return bottle.template("form_error", message=message)


@app.get("/")
def index():
    """The chat page."""
    return bottle.template("page", demo=settings.demo, upstream=settings.upstream_label(),
                           max_prompt=settings.max_prompt)


@app.post("/streaming")
def start_streaming():
    """Start an answer: the user's bubble plus an assistant bubble that connects to /events."""
    prompt = bottle.request.forms.getunicode("prompt", default="") or ""
    if not prompt.strip():
        return form_error(400, "Type a message first: the prompt is empty.")
    if len(prompt) > settings.max_prompt:
        return form_error(413, f"Your message is {len(prompt):,} characters long; the limit is "
                               f"{settings.max_prompt:,}. Shorten it and send again.")
    stream = streams.start([{"role": "user", "content": prompt}])
    return bottle.template("exchange", prompt=prompt, stream_id=stream.id)


@app.get("/events")
def events():
    """The answer as server-sent events; always 200, since any error status makes htmx reconnect forever."""
    stream_id = bottle.request.query.getunicode("stream", default="") or ""
    try:
        last_id = int(bottle.request.get_header("Last-Event-ID") or 0)
    except ValueError:
        last_id = 0
    bottle.response.content_type = "text/event-stream"
    bottle.response.set_header("Cache-Control", "no-cache")
    bottle.response.set_header("X-Accel-Buffering", "no")
    stream = streams.get(stream_id)
    if stream is None:
        return [SSE_HELLO + sse_frame("done", render_missing(stream_id), 1)]
    return stream_events(stream, last_id)


def stream_events(stream, last_id):
    """Yield the frames after last_id, then live ones, draining the reader's queue into one write each time."""
    backlog = stream.frames_after(last_id)
    if stream.finished:
        # A reader that already has everything still gets done again: an empty
        # response would only make the browser reconnect, again and again.
        yield SSE_HELLO + b"".join(backlog or stream.log[-1:])
        return
    queue = Queue()
    stream.readers.add(queue)
    try:
        yield SSE_HELLO + b"".join(backlog)
        while True:
            frames = [queue.get()]
            while queue.qsize():
                frames.append(queue.get_nowait())
            yield b"".join(frames)
            # The done frame was in this batch if the stream finished and nothing came after.
            if stream.finished and not queue.qsize():
                return
    finally:
        stream.readers.discard(queue)


@app.post("/stop")
def stop():
    """Stop an answer; the done bubble follows on the event stream."""
    stream_id = bottle.request.query.getunicode("stream", default="") or ""
    if not streams.stop(stream_id):
        bottle.abort(404, "No such answer.")
    bottle.response.status = 204
    return ""


@app.get("/healthz")
def healthz():
    """Liveness: ok and the upstream in use."""
    bottle.response.content_type = "text/plain; charset=utf-8"
    return f"ok\nupstream: {settings.upstream_label()}\nstreams: {len(streams)}\n"


@app.get("/static/<path:path>")
def static(path):
    """The vendored front end, CSS and the page script."""
    return bottle.static_file(path, root=STATIC)


@app.get("/demo/v1/models")
def demo_models():
    """The demo model's model list (only when no upstream is configured)."""
    if not settings.demo:
        bottle.abort(404)
    return {"object": "list", "data": [{"id": "demo", "object": "model", "owned_by": "chat.py"}]}


@app.post("/demo/v1/chat/completions")
def demo_completions():
    """The demo model: an OpenAI-compatible streaming endpoint answering over real HTTP."""
    if not settings.demo:
        bottle.abort(404)
    try:
        messages = bottle.request.json["messages"]
        prompt = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
    except (TypeError, KeyError, StopIteration, ValueError):
        bottle.response.status = 400
        return {"error": {"message": "expected a chat request with a user message", "type": "invalid_request"}}
    bottle.response.content_type = "text/event-stream"
    return demo_chunks(str(prompt), settings.demo_delay)


@app.error(404)
@app.error(405)
@app.error(413)
@app.error(500)
@app.error(503)
def error_page(error):
    """Short, honest error answers; tracebacks stay in the log."""
    if error.status_code == 413:
        return form_error(413, f"Your message is too large; the limit is {settings.max_prompt:,} characters.")
    bottle.response.content_type = "text/plain; charset=utf-8"
    return html.escape(f"{error.status_line}: {error.body or ''}\n")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

class Server(WSGIServer):
    """gevent's WSGI server with TCP_NODELAY, so small token frames are not held back by Nagle."""

    def handle(self, sock, address):
        """Set TCP_NODELAY on each accepted connection, then serve it."""
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return super().handle(sock, address)


def parse_args(argv):
    """Command-line flags; each overrides its environment variable."""
    p = argparse.ArgumentParser(
        prog="chat.py", description="A chat page that streams LLM answers token by token.",
        epilog="Environment: OPENAI_BASE_URL, OPENAI_API_KEY (sent as 'Authorization: Bearer', "
               "never logged), CHAT_MODEL, HOST, PORT, CHAT_DB. Flags override them. Without "
               "OPENAI_BASE_URL the built-in demo model answers. Examples: "
               "OPENAI_BASE_URL=http://localhost:11434/v1 (Ollama), http://localhost:8080/v1 "
               "(llama.cpp), http://localhost:8000/v1 (vLLM), http://localhost:1234/v1 (LM Studio), "
               "https://openrouter.ai/api/v1, https://api.openai.com/v1.")
    p.add_argument("--base-url", help="OpenAI-compatible base URL ending in /v1 (env OPENAI_BASE_URL; "
                                      "default: the built-in demo model)")
    p.add_argument("--model", help="model name (env CHAT_MODEL; default: the upstream's first model, or demo)")
    p.add_argument("--host", help="listen address (env HOST; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="listen port (env PORT; default 8080)")
    p.add_argument("--db", help="SQLite database file (env CHAT_DB; default chat.db)")
    p.add_argument("--debug", action="store_true", help="log tracebacks and reload templates")
    return p.parse_args(argv)


def main(argv=None):
    """Parse flags, bind the server and serve forever."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for name in ("base_url", "model", "host", "port", "db"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if settings.base_url:
        settings.base_url = settings.base_url.rstrip("/")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    bottle.debug(args.debug)
    server = Server((settings.host, settings.port), app, log=logging.getLogger("chat.access"),
                    error_log=logging.getLogger("chat.error"))
    server.init_socket()
    settings.port = server.server_port  # --port 0 picks a free port; the demo needs the real one
    log.info("chat.py on http://%s:%d/ — upstream: %s", settings.host, settings.port,
             settings.upstream_label())
    # Everything loaded so far lives for the whole process: keep it out of the collector's way.
    gc.collect()
    gc.freeze()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
