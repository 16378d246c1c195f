# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "bottle==0.13.4",
#     "gevent==26.9.0",
#     "requests==2.34.2",
#     "markdown-it-py==4.3.0",
#     "pygments==2.21.0",
#     "mdit-py-plugins==0.7.0",
#     "latex2mathml==3.81.1",
#     "linkify-it-py==2.2.0",
# ]
# ///
"""chat.py — a self-hosted chat page that streams LLM answers token by token.

One file: Bottle for the routes, gevent for the server, requests for the upstream, htmx + its SSE extension in the
browser. Talks to any OpenAI-compatible server (OpenAI, Ollama, llama.cpp, vLLM, LM Studio, OpenRouter...) or, with no
configuration, to its own built-in demo model.

Run:    python chat.py            then open http://127.0.0.1:8080
Help:   python chat.py --help

Environment: OPENAI_BASE_URL (upstream ".../v1"; unset = built-in demo model), OPENAI_API_KEY, CHAT_MODEL, HOST, PORT,
CHAT_DB (SQLite file), CHAT_PASSWORD, CHAT_DATABASE_URL (PostgreSQL instead), and the limits `--help` lists.

How a token travels: upstream bytes -> relay_upstream() greenlet (split lines, parse SSE, parse JSON chunk) ->
Stream.token() logs its text once (AnswerLog), frames it once and writes it to each reader that keeps up (Outlet; a
reader behind gets it from its queue, drained into one write), and renders each Markdown block it completes
(MarkdownBlocks) -> htmx-ext-sse appends the <span> (and the rendered block) to the bubble.

Sections, in dependency order (each uses what is above it; a few calls reach later ones at run time):
helpers used everywhere (rate-limited logs, token buckets, taking turns on the loop); configuration (SETTINGS); the
upstream client; models and their context; <think> reasoning; SSE framing; rendering; storage (SQLite); streams and the
relay, with the journal; the demo model; routes (request checks, errors, who is asking, the chat); main.

Two seams, each one small interface written down where it begins, its default here and its scale-out one in
chat_scale.py (loaded only when configured): Streams / RedisStreams (CHAT_REDIS_URL) and SQLiteDatabase /
PostgresDatabase (CHAT_DATABASE_URL).
"""

# gevent must patch the standard library before anything imports socket, ssl or threading (requests does): a greenlet
# blocked on an unpatched socket would block every other stream in the process.
from gevent import monkey

monkey.patch_all()

import argparse, array, base64, binascii, bisect, collections, contextlib, fcntl, functools, gc, hashlib  # noqa: E402
import hmac, html, io, ipaddress, json, logging, math, os, random, re, resource, secrets, signal, socket  # noqa: E402
import sqlite3, struct, sys, termios, time, urllib.parse, zlib  # noqa: E402
from http.client import HTTPException, IncompleteRead  # noqa: E402
from xml.etree import ElementTree  # noqa: E402

import bottle, latex2mathml.converter, requests, urllib3.exceptions  # noqa: E402
import gevent, gevent.event, gevent.local, gevent.lock, gevent.queue, gevent.threadpool  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402
from markdown_it import MarkdownIt  # noqa: E402
from markdown_it.common.utils import escapeHtml  # noqa: E402
from mdit_py_plugins.dollarmath import dollarmath_plugin  # noqa: E402
from pygments import highlight as pygments_highlight  # noqa: E402
from pygments.formatters import HtmlFormatter  # noqa: E402
from pygments.lexers import get_lexer_by_name  # noqa: E402
from pygments.util import ClassNotFound  # noqa: E402

log = logging.getLogger("chat")
sys.modules.setdefault("chat", sys.modules[__name__])  # as a script: chat_scale's `import chat` must get this module

VERSION = "1.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))
STATIC = os.path.join(HERE, "static")
bottle.TEMPLATE_PATH.insert(0, os.path.join(HERE, "templates"))


# ---------------------------------------------------------------------------
# Helpers used everywhere: rate-limited logs, token buckets, taking turns on the loop
# ---------------------------------------------------------------------------

_LOG_LIMITED = {}


def log_limited(kind, message, *args, every=10.0):
    """Log a warning at most once every `every` seconds per kind, with how many were left out."""
    now = time.monotonic()
    last, skipped = _LOG_LIMITED.get(kind, (-every, 0))
    if now - last < every:
        _LOG_LIMITED[kind] = (last, skipped + 1)
        return
    _LOG_LIMITED[kind] = (now, 0)
    log.warning(message + (f" (and {skipped} more like it)" if skipped else ""), *args)


class TokenBuckets:
    """Token buckets by key (a client address, or one global key): rate tokens a second, up to burst."""

    def __init__(self, rate, burst, max_keys=100_000):
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self.buckets = {}  # key -> (tokens, when counted)

    def tokens(self, key, now=None):
        """The tokens this key has now."""
        now = time.monotonic() if now is None else now
        tokens, at = self.buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def wait(self, key):
        """Seconds until this key has a token again (0 if it has one)."""
        return max(0.0, (1 - self.tokens(key)) / self.rate) if self.rate else 0.0

    def take(self, key):
        """Take a token; False (and nothing taken) if the bucket is empty."""
        now = time.monotonic()
        tokens = self.tokens(key, now)
        if tokens < 1:
            return False
        if len(self.buckets) >= self.max_keys:  # forget the full ones: they are as good as new
            self.buckets = {k: v for k, v in self.buckets.items() if self.tokens(k, now) < self.burst}
        self.buckets[key] = (tokens - 1, now)
        return True

    def give(self, key):
        """Give back a token taken for something that turned out to cost nothing."""
        if key in self.buckets:
            now = time.monotonic()
            self.buckets[key] = (min(self.burst, self.tokens(key, now) + 1), now)


class LoopTurn:
    """When the event loop last polled for I/O: a prepare watcher stamps every turn."""

    def __init__(self):
        self.at, self.watcher = time.monotonic(), None

    def now(self):
        """The time, with the watcher running (started on first use, in the hub of the caller)."""
        if self.watcher is None:
            self.watcher = gevent.get_hub().loop.prepare(ref=False)
            self.watcher.start(self.stamp)
        return time.monotonic()

    def stamp(self):
        """Called by the loop before every poll."""
        self.at = time.monotonic()


loop_turn = LoopTurn()


class TurnShare:
    """One greenlet's run in this turn of the loop: work that never blocks (a flood, a replay) gives way when due."""

    __slots__ = ("turn", "since")

    def __init__(self):
        self.turn, self.since = None, 0.0

    def give_way_if_due(self, limit=0.0003):
        """Give way if this greenlet has run more than limit seconds and the loop has not polled for 0.5 ms."""
        now = loop_turn.now()
        if self.turn != loop_turn.at:  # the loop turned since we last looked: our run starts now
            self.turn, self.since = loop_turn.at, now
        elif now - self.since > limit and now - loop_turn.at > 0.0005:
            give_way()


give_way_queue = gevent.lock.Semaphore()


def give_way():
    """Let everything else that is ready run first; such greenlets take turns, one per turn of the loop when idle."""
    with give_way_queue:
        gevent.idle()


LARGE_WRITE = 16384  # bytes: a write to a reader this big (a long answer's bubble) waits for its turn


def in_turn(data):
    """Before writing data to a reader: if it is large, give way first, so that big writes cannot hold every stream."""
    if len(data) > LARGE_WRITE:
        give_way()
    return data


def in_background(fn, *args):
    """fn(*args) in a worker thread, the calling greenlet waiting cooperatively (the store, long renders)."""
    return gevent.get_hub().threadpool.apply(fn, args)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def listed(text):
    """A comma-separated setting as a set of lower-case names."""
    return {item.strip().lower() for item in text.split(",") if item.strip()}


def networks(text):
    """A comma-separated setting of addresses and CIDR ranges."""
    return [ipaddress.ip_network(item.strip(), strict=False) for item in text.split(",") if item.strip()]


def auth_mode(text):
    """CHAT_AUTH: "accounts", or empty for anonymous owners."""
    if text.strip().lower() not in ("", "accounts"):
        raise ValueError(f"CHAT_AUTH must be `accounts` or empty, not {text!r}")
    return text.strip().lower()


def auto_int(text):
    """An integer where 0 means "work it out" (None)."""
    return int(text) or None


def auto_float(text):
    """A number where 0 means "none" (None)."""
    return float(text) or None


class Setting(collections.namedtuple("Setting", "name env parse default shown help flag common")):
    """One setting: attribute, variable, parser, default (or a function of those read so far), shown, help, flag."""

    def value(self, env, settings):
        """Its value from the environment, or its default."""
        raw = env.get(self.env)
        value = self.parse(raw) if raw else None  # unset, empty, or 0 where 0 means auto: the default
        if value is None:
            value = self.default(settings) if callable(self.default) else self.default
        return value


def setting(name, env, parse, default, shown, text, flag=None, common=False):
    """A row of SETTINGS."""
    return Setting(name, env, parse, default, shown, text, flag, common)


# Every setting, once: Settings reads them, --help lists them, the docs and README (`common`) show them; a test checks.
SETTINGS = (
    setting("base_url", "OPENAI_BASE_URL", lambda v: v.rstrip("/") or None, None, "the built-in demo model",
            'upstream base URL ending in /v1: http://localhost:11434/v1 (Ollama), http://localhost:8081/v1 '
            '(llama.cpp), http://localhost:8000/v1 (vLLM), http://localhost:1234/v1 (LM Studio), '
            'https://openrouter.ai/api/v1, https://api.openai.com/v1', "--base-url", True),
    setting("api_key", "OPENAI_API_KEY", str, None, "none", "API key, sent as `Authorization: Bearer`; never logged or shown",
            common=True),
    setting("model", "CHAT_MODEL", str, None, "the upstream's first model", "model name (the upstream's first in `/v1/models` order, or `demo`)", "--model", True),
    setting("host", "HOST", str, "127.0.0.1", "127.0.0.1", "listen address (0.0.0.0: every address)", "--host", True),
    setting("port", "PORT", int, 8080, "8080", "listen port", "--port", True),
    setting("db", "CHAT_DB", str, "chat.db", "chat.db", "SQLite database file (in the working directory)", "--db", True),
    setting("password", "CHAT_PASSWORD", str, None, "none", "puts the whole app behind a login page (unset: open to whoever reaches the port)", common=True),
    setting("auth", "CHAT_AUTH", auth_mode, "", "none: each browser is its own anonymous owner",
            "`accounts`: people sign in with a user name and password, kept with `python chat.py user add NAME`"),
    setting("auth_header", "CHAT_AUTH_HEADER", str, None, "none", "the header an authenticating proxy names the "
            "user in (`Remote-User`, `X-Forwarded-User`, `Tailscale-User-Login`); believed only from "
            "CHAT_TRUSTED_PROXIES"),
    setting("workers", "CHAT_WORKERS", int, 1, "1", "worker processes sharing the port (more need `CHAT_REDIS_URL`; see docs/scale-out.md)",
            "--workers", True),
    setting("redis_url", "CHAT_REDIS_URL", str, None, "none: answers live in the process",
            "redis://… to share answers between processes and hosts", common=True),
    setting("database_url", "CHAT_DATABASE_URL", str, None, "none: the SQLite file",
            "postgresql://… to keep conversations in PostgreSQL", common=True),
    setting("allowed_hosts", "CHAT_ALLOWED_HOSTS", listed, set(), "none", 'host names to answer for beyond IP addresses, `localhost` and '
            'this machine\'s names, comma-separated (`*`: any)'),
    setting("trusted_proxies", "CHAT_TRUSTED_PROXIES", networks, networks("127.0.0.0/8,::1"), "127.0.0.0/8,::1",
            "proxies whose `X-Forwarded-For` names the client, comma-separated addresses or CIDR ranges"),
    setting("temperature", "CHAT_TEMPERATURE", float, None, "the server's", "sampling default; a conversation's own value wins"),
    setting("top_p", "CHAT_TOP_P", float, None, "the server's", "sampling default; a conversation's own value wins"),
    setting("max_tokens", "CHAT_MAX_TOKENS", int, None, "the server's", "sampling default; a conversation's own value wins"),
    setting("image_hosts", "CHAT_IMAGE_HOSTS", listed, set(), "none",
            "hosts whose https images answers may show, comma-separated; any other image is a link"),
    # -- the upstream
    setting("connect_timeout", "CHAT_CONNECT_TIMEOUT", float, 10.0, "10", "seconds to connect to the model server"),
    # Before its first byte a server may queue the request or read a long prompt (no headers): waiting, not silence.
    setting("first_byte_timeout", "CHAT_FIRST_BYTE_TIMEOUT", float, 600.0, "600",
            "seconds to wait for the server's first byte: its queue and prompt processing"),
    # Longer than any keep-alive interval (llama.cpp pings every 30 s): silence this long is dead.
    setting("read_timeout", "CHAT_READ_TIMEOUT", float, 120.0, "120", "seconds of upstream silence once it has started (keep-alive comments count as life)"),
    setting("context_tokens", "CHAT_CONTEXT_TOKENS", auto_int, None, "ask the server",
            "the model's context in tokens, for servers that do not say it (Ollama)"),
    setting("max_context", "CHAT_MAX_CONTEXT", int, 100_000, "100000",
            "characters of conversation sent upstream; older turns are left out beyond it, and the answer says so"),
    setting("ping_interval", "CHAT_PING_INTERVAL", float, 10.0, "10", "seconds between `: ping` comments to readers"),
    setting("grace", "CHAT_STREAM_GRACE", float, 10.0, "10", "seconds a finished answer stays replayable"),
    setting("demo_delay", "CHAT_DEMO_DELAY", float, 0.03, "0.03", "seconds between the demo model's tokens"),
    setting("lease_seconds", "CHAT_LEASE_SECONDS", float, 15.0, "15",
            "with Redis or PostgreSQL: an answer whose writer stops renewing it this long is interrupted"),
    # -- limits: every resource an outsider can make the server spend has one (docs/security.md)
    setting("max_prompt", "CHAT_MAX_PROMPT", int, 32_000, "32000", "characters in one message"),
    # A prompt at the limit, every character 4 UTF-8 bytes, %-encoded (x3), plus the other fields.
    setting("max_body", "CHAT_MAX_BODY", int, lambda s: s.max_prompt * 12 + 65536, "prompt limit × 12 + 64 KiB",
            "bytes in one request body"),
    setting("header_timeout", "CHAT_HEADER_TIMEOUT", float, 15.0, "15", "seconds to receive a request's head or body"),
    setting("write_timeout", "CHAT_WRITE_TIMEOUT", float, 30.0, "30",
            "seconds a client may take no data, or sit idle between requests"),
    setting("max_connections", "CHAT_MAX_CONNECTIONS", auto_int, lambda s: default_max_connections(),
            "45 % of the fd limit", "open connections per process"),
    setting("connections_per_address", "CHAT_CONNECTIONS_PER_ADDRESS", auto_int, None, "10 % of the above",
            "open connections per client address (IPv6: per /64)"),
    setting("max_answer_chars", "CHAT_MAX_ANSWER_CHARS", int, 400_000, "400000", "characters in one answer"),
    setting("max_answer_seconds", "CHAT_MAX_ANSWER_SECONDS", float, 900.0, "900", "seconds one answer may take"),
    # The fastest models send a few thousand tokens a second: a flood is read at this pace, so no answer takes the CPU.
    setting("max_tokens_per_second", "CHAT_MAX_TOKENS_PER_SECOND", float, 2000.0, "2000",
            "how fast one answer is read from a flooding upstream (0: no limit)"),
    setting("streams_per_owner", "CHAT_STREAMS_PER_OWNER", int, 4, "4", "answers streaming at once per browser"),
    setting("max_streams", "CHAT_MAX_STREAMS", int, 25_000, "25000", "answers open at once in all"),
    setting("readers_per_stream", "CHAT_READERS_PER_STREAM", int, 16, "16", "connections reading one answer"),
    setting("readers_per_owner", "CHAT_READERS_PER_OWNER", int, 64, "64", "connections reading one browser's answers"),
    setting("new_owners_per_minute", "CHAT_NEW_OWNERS_PER_MINUTE", float, 10.0, "10",
            "new browsers one address (IPv6: one /64) may start chatting from in a minute"),
    setting("new_owners_per_minute_total", "CHAT_NEW_OWNERS_PER_MINUTE_TOTAL", float, 60.0, "60",
            "new browsers from all addresses but this machine in a minute"),
    setting("max_image_mb", "CHAT_MAX_IMAGE_MB", float, 10.0, "10", "MB in one attached image"),
    setting("max_file_kb", "CHAT_MAX_FILE_KB", float, 256.0, "256", "KB in one attached text file"),
    setting("max_attachments", "CHAT_MAX_ATTACHMENTS", int, 10, "10", "files attached to one message"),
    setting("max_attachments_mb", "CHAT_MAX_ATTACHMENTS_MB", float, 20.0, "20",
            "MB of attachments in one message"),
    setting("uploads_mb", "CHAT_UPLOADS_MB", float, 256.0, "256",
            "MB of uploads held in memory at once, all clients together (past it: 503, try again)"),
    setting("owner_quota", "CHAT_OWNER_QUOTA", int, 100 << 20, "104857600", "bytes of stored text and files per browser (or account)"),
    setting("max_db_mb", "CHAT_MAX_DB_MB", float, 2048.0, "2048",
            "MB of database (pages in use, WAL included) past which new messages get 507"),
    setting("retention_days", "CHAT_RETENTION_DAYS", auto_float, None, "keep",
            "delete conversations untouched this many days"),
    # Our own demo endpoint answers only this process (it may sit behind CHAT_PASSWORD); --workers sets it for all.
    setting("demo_key", "CHAT_DEMO_KEY", str, lambda s: secrets.token_urlsafe(24), "random",
            "the key of the built-in demo model's endpoint (set by --workers for every worker)"),
)


class Settings:
    """Everything configurable (SETTINGS), read once from the environment; flags override in main()."""

    def __init__(self, env):
        for entry in SETTINGS:
            setattr(self, entry.name, entry.value(env, self))

    @property
    def address_share(self):
        """Connections one client address may hold at once."""
        return self.connections_per_address or max(1, self.max_connections // 10)

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


def default_max_connections():
    """Connections one process may hold: under half the file descriptors (a streaming answer uses two)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        soft = 1024
    return max(64, min(10_000, int(soft * 0.45)))


settings = Settings(os.environ)


# ---------------------------------------------------------------------------
# Upstream client: bytes -> lines -> SSE events -> chunks (docs/WIRE.md §5)
# ---------------------------------------------------------------------------

def redact(text):
    """Text from the upstream with our API key blanked out (some proxies echo it back)."""
    if text and settings.api_key and settings.api_key in text:
        return text.replace(settings.api_key, "[redacted]")
    return text


class UpstreamError(Exception):
    """The model server refused, failed or broke off; the message is for the user."""

    def __init__(self, message, status=None, body=None):
        super().__init__(message)
        self.status, self.body = status, body  # the refusal as the server sent it, if it answered


class StopRequested(Exception):
    """Raised inside a relay greenlet when the user pressed Stop."""


class UpstreamTimeout(Exception):
    """Raised inside a relay greenlet by the watchdog when the upstream went silent."""


class ServerStopping(Exception):
    """Raised inside a relay greenlet when chat.py itself is shutting down."""


class AnswerLimit(Exception):
    """Raised inside a relay greenlet when an answer outgrows CHAT_MAX_ANSWER_CHARS or _SECONDS."""


BOM = b"\xef\xbb\xbf"
# What the upstream may send at once before the answer ends with an error: a hostile server costs MBs, not the machine.
MAX_LINE = 1 << 20         # bytes in one line
MAX_EVENT = 1 << 20        # bytes of data in one event, its lines together
MAX_EVENT_LINES = 10_000   # data lines in one event (each costs ~60 bytes however short)
MAX_JSON_BODY = 2 << 20    # a whole completion, from a server that ignores stream:true
MAX_TOOL_CALLS = 128       # in one answer (parallel tool calls are a handful); their text counts as the answer's


class LineSplitter:
    """Split a byte stream into lines on CR, LF and CRLF only, whatever the read boundaries."""

    def __init__(self):
        self.pending = b""
        self.more = []        # reads with no line ending that continue pending: joined once the line ends
        self.held = 0         # bytes in pending and more
        self.started = False
        self.skip_lf = False  # the last read ended in CR: a LF that follows belongs to it

    def feed(self, data):
        """Return the complete lines in data (without their endings)."""
        if self.skip_lf and data:
            self.skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if self.pending and b"\n" not in data and b"\r" not in data:
            self.more.append(data)  # the line goes on: pending + data would copy it at each read (quadratic)
            self._hold(len(data))
            return []
        if self.more:
            self.pending, self.more = b"".join([self.pending, *self.more]), []
        buf = self.pending + data if self.pending else data
        if not self.started:
            if len(buf) < 3 and BOM.startswith(buf):
                self.pending = buf
                return []
            self.started = True
            if buf.startswith(BOM):
                buf = buf[3:]
        lines = buf.splitlines(True)  # bytes split on \r, \n and \r\n only, unlike str.splitlines()
        if lines and lines[-1][-1:] not in (b"\n", b"\r"):
            self.pending = lines.pop()
            self.held = 0
            self._hold(len(self.pending))
        else:
            self.pending, self.held = b"", 0
        if lines and lines[-1][-1:] == b"\r":
            self.skip_lf = True
        return [line.rstrip(b"\r\n") for line in lines]

    def _hold(self, size):
        """Count bytes of an unfinished line; past MAX_LINE, give up."""
        self.held += size
        if self.held > MAX_LINE:
            raise UpstreamError(f"The model server sent a line longer than {MAX_LINE >> 20} MiB; gave up reading it.")

    def close(self):
        """Return the last line if the stream ended without a line ending."""
        rest, self.pending, self.more, self.held = b"".join([self.pending, *self.more]), b"", [], 0
        return [rest] if rest else []


class SSEParser:
    """The WHATWG event-stream field rules, fed one line at a time."""

    def __init__(self):
        self.event = ""
        self.data = None  # None: no data line seen, so a blank line dispatches nothing
        self.size = 0     # bytes in data, a line ending each

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
            self._add(value)
        elif field == b"event":
            self.event = value.decode("utf-8", "replace")
        elif field == b"error":
            self.event = "error"  # llama.cpp before 2025-09 sent errors as a non-standard "error:" field
            self._add(value)
        return None

    def _add(self, value):
        """Add a data line to the pending event, within the limits (counted here: an event may never end)."""
        if self.data is None:
            self.data, self.size = [], 0
        self.size += len(value) + 1
        if self.size > MAX_EVENT or len(self.data) >= MAX_EVENT_LINES:
            self.data = None
            raise UpstreamError(f"The model server sent an event of more than {MAX_EVENT >> 20} MiB or "
                                f"{MAX_EVENT_LINES:,} lines; gave up reading it.")
        self.data.append(value.decode("utf-8", "replace"))

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


_TAGS = re.compile(r"<[^<>]*>")  # [^<>]: linear on a page of "<<<<" (a broken or hostile server)


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
        lower = text.lower()
        start = lower.find("<title")
        start = text.find(">", start) + 1 if start >= 0 else 0
        end = lower.find("</title>", start) if start else -1
        text = text[start:end] if start and end > start else _TAGS.sub(" ", text[:8192])
        text = " ".join(html.unescape(text).split())
    text = text.strip()
    return (text[:4000] + "…") if len(text) > 4000 else (text or "(empty response)")


class Completion:
    """Everything an upstream has said about one answer, parsed from its chunks."""

    def __init__(self, keep_text=True):
        self.keep_text = keep_text  # the relay keeps the text in its stream's log instead
        self.content, self.reasoning, self.finish_reason, self.usage, self.tool_calls = [], [], None, None, {}
        self.tool_chars = 0  # of the tool calls' names and arguments: they are shown, so they count as text
        self.error, self.done_marker, self.model = None, False, None

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
        except (ValueError, RecursionError):  # RecursionError: "[[[[…" nested deeper than the parser goes
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
        if event == "error" or obj.get("error") or obj.get("object") == "error":  # its content went first (OpenRouter)
            self.error = error_text(obj) or "The model server reported an error during streaming."
        return deltas

    def _apply_choice(self, choice):
        """Take one choice of a chunk: text, reasoning, tool calls, finish reason, usage."""
        deltas = []
        delta = choice.get("delta") or choice.get("message") or {}
        if isinstance(delta, dict):
            for key in ("reasoning_content", "reasoning"):  # both may hold the same text: take one
                text = delta.get(key)
                if isinstance(text, str) and text:
                    if self.keep_text:
                        self.reasoning.append(text)
                    deltas.append(("reasoning", text))
                    break
            else:
                for detail in delta.get("reasoning_details") or ():
                    text = detail.get("text") if isinstance(detail, dict) else None
                    if isinstance(text, str) and text:
                        if self.keep_text:
                            self.reasoning.append(text)
                        deltas.append(("reasoning", text))
            for key in ("content", "refusal"):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    if self.keep_text:
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
        name, args = function.get("name") or "", function.get("arguments")
        args = args if isinstance(args, str) else json.dumps(args) if args else ""
        self.tool_chars += len(name) + len(args) + 1  # + 1: each call counts, even an empty one
        if self.tool_chars > settings.max_answer_chars or len(self.tool_calls) > MAX_TOOL_CALLS:
            raise AnswerLimit(f"The model's tool calls reached chat.py's limit of {settings.max_answer_chars:,} "
                              f"characters or {MAX_TOOL_CALLS} calls and were cut off there.")
        slot["name"] += name
        slot["arguments"] += args


def open_completion(session, messages, model, params=None):
    """POST the conversation to the upstream; return the streaming response or raise UpstreamError."""
    url = settings.upstream() + "/chat/completions"
    body = {"messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    if model:
        body["model"] = model
    body.update({name: value for name, value in (params or {}).items() if value is not None})
    headers = {"Accept": "text/event-stream", **auth_headers()}
    try:  # no read timeout: one watchdog per stream (Streams.sweep) watches for silence, not a timer per read
        response = session.post(url, json=body, headers=headers, stream=True, timeout=(settings.connect_timeout, None))
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
                            f"{response.reason or ''}: {body_message(body)}".replace("  ", " "),
                            response.status_code, body)
    return response


def connection_problem(exc):
    """A short cause for a connection error: refused, name not found, reset..."""
    text = str(exc)
    for needle, words in (("BadStatusLine", "it did not answer with HTTP"),
                          ("RemoteDisconnected", "it closed the connection without answering"),
                          ("refused", "connection refused"), ("Name or service", "unknown host"),
                          ("getaddrinfo", "unknown host"), ("timed out", "timed out"), ("reset", "connection reset")):
        if needle in text:
            return words
    return "connection failed"


def read_completion(response, completion, on_read=None):
    """Yield (kind, text) deltas from a streaming response as soon as their bytes arrive; closes the response."""
    ctype = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
    if ctype in ("application/json", "text/html"):
        with response:
            yield from whole_completion(response, ctype, completion)
        return
    body = SocketBody.reader(response)  # it takes the socket and closes the response when it can
    del response  # which goes, with its request's body (the whole conversation): KBs an answer
    lines, sse, busy = LineSplitter(), SSEParser(), TurnShare()
    with contextlib.closing(body):
        while not completion.finished:
            data = body.read(65536)
            if on_read:
                on_read()  # keep-alive comments count as life too
            busy.give_way_if_due()  # lines that make no event (comments, unknown fields) flood as well
            for line in lines.feed(data) if data else lines.close() + [b""]:  # at EOF: an unended line and event
                event = sse.feed(line)
                if event:
                    busy.give_way_if_due()  # an upstream that always has data ready (hundreds of events a read)
                    yield from completion.apply(*event)
                    if completion.finished:
                        return
            if not data:
                return


def whole_completion(response, ctype, completion):
    """The deltas of a server that ignored stream:true (one JSON completion), or the error of one that sent a page."""
    if ctype == "text/html":
        raise UpstreamError("The model server answered with a web page instead of a stream: "
                            + body_message(response.raw.read(65536, decode_content=True)))
    body = response.raw.read(MAX_JSON_BODY + 1, decode_content=True)
    if len(body) > MAX_JSON_BODY:
        raise UpstreamError(f"The model server sent a whole answer of more than {MAX_JSON_BODY >> 20} MiB; "
                            "gave up reading it.")
    yield from completion.apply("message", body.decode("utf-8", "replace"))
    completion.done_marker = completion.error is None


class SocketBody:
    """A response body read straight from its socket and de-chunked here: one recv per read, no Python layers
    between, and a shallow stack for a waiting relay (through http.client, a greenlet waiting for the next token
    keeps C frames of BufferedReader calling back into Python: KBs of saved stack per idle stream)."""

    __slots__ = ("sock", "chunked", "left", "data", "crlf", "done", "wait")
    MAX_SIZE_LINE = 4096  # a chunk-size line, its extensions included

    def __init__(self, sock, chunked, length, data):
        self.sock, self.chunked, self.data, self.done = sock, chunked, data, False
        self.wait = getattr(sock, "_wait", None) if hasattr(sock, "_read_event") else None  # gevent's, if it is one
        self.left = None if chunked else length  # chunked: bytes left in this chunk, None: a size line is next
        self.crlf = False  # chunked: the CRLF after a chunk's data is next

    @classmethod
    def reader(cls, response):
        """A SocketBody with its own handle on the response's socket, when http.client has read nothing of the body
        yet and nothing needs decoding; else a reader through urllib3 (with read and close)."""
        raw = response.raw
        fp = getattr(raw, "_fp", None)
        sock = getattr(getattr(getattr(fp, "fp", None), "raw", None), "_sock", None)
        if sock is None or response.headers.get("Content-Encoding") or getattr(fp, "chunk_left", 0) is not None:
            return UrllibBody(response)
        # Our own descriptor: closing the response (its 8 KB buffer, its request's copy of the conversation) closes
        # its own, which http.client may already count closed (Connection: close), and nothing goes back to the pool.
        try:
            own = sock.dup()
        except (AttributeError, NotImplementedError, OSError):  # TLS: read through http.client
            return UrllibBody(response)
        buffered = fp.fp.read1(1 << 16) if fp.length != 0 else b""  # what came with the headers (or one read)
        response.close()
        return cls(own, fp.chunked, fp.length, buffered)

    def close(self):
        """Close the socket (the upstream sees the answer was abandoned, if it was)."""
        self.sock.close()

    def read(self, size):
        """The body bytes that have arrived (waiting for some), b"" at its end."""
        while True:
            if self.data or self.done:
                out = self.decode()
                if out or self.done:
                    return out
            if self.wait is not None:
                self.wait(self.sock._read_event)  # then recv: no failed recv (and its exception) per token
            more = self.sock.recv(size)
            if not more:
                if self.chunked or self.left:
                    raise IncompleteRead(b"")  # as http.client says it: the answer broke off
                self.done = True
            self.data = self.data + more if self.data else more

    def decode(self):
        """Take the body bytes out of what was received (all of it unless chunked)."""
        data, self.data = self.data, b""
        if not self.chunked:
            if self.left is not None:
                data = data[:self.left]
                self.left -= len(data)
                self.done = self.done or not self.left
            return data
        out, at = [], 0
        while at < len(data) and not self.done:
            if self.crlf:
                if len(data) - at < 2:
                    break
                if data[at:at + 2] != b"\r\n":
                    raise IncompleteRead(b"")
                at, self.crlf = at + 2, False
            elif self.left is None:
                end = data.find(b"\n", at, at + self.MAX_SIZE_LINE)
                if end < 0:
                    if len(data) - at >= self.MAX_SIZE_LINE:
                        raise IncompleteRead(b"")
                    break
                self.left = int(data[at:end].split(b";", 1)[0].strip() or b"x", 16)  # ValueError: broke off
                if self.left < 0:
                    raise IncompleteRead(b"")
                at = end + 1
                self.done = self.left == 0  # trailers are not read: nothing follows the last chunk for us
            else:
                piece = data[at:at + self.left]
                out.append(piece)
                at += len(piece)
                self.left -= len(piece)
                if not self.left:
                    self.left, self.crlf = None, True
        self.data = data[at:]
        return b"".join(out)


class UrllibBody:
    """A response body read through http.client, or urllib3 when it must be decoded (gzip...): what SocketBody does
    not take (TLS)."""

    __slots__ = ("response", "read1")

    def __init__(self, response):
        self.response, fp = response, getattr(response.raw, "_fp", None)
        plain = fp is not None and not response.headers.get("Content-Encoding")
        self.read1 = fp.read1 if plain else None  # http.client's: urllib3's costs ~10 % more CPU

    def read(self, size):
        """What has arrived, decoded; b"" at the end."""
        return self.read1(size) if self.read1 else self.response.raw.read1(size, decode_content=True)

    def close(self):
        """Close the response."""
        self.response.close()


def auth_headers():
    """The Authorization header for the upstream: the API key, or our demo endpoint's own key."""
    key = settings.demo_key if settings.demo else settings.api_key
    return {"Authorization": f"Bearer {key}"} if key else {}


def make_session():
    """A requests session whose pool holds as many upstream connections as we have streams."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=1024)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


http = make_session()


# ---------------------------------------------------------------------------
# Models and their context: what the server says, learned in the background
# ---------------------------------------------------------------------------

MODELS_TTL, MODELS_RETRY = 60.0, 5.0   # a failed list is asked again soon: the server may be starting
MODELS_DEADLINE, MODELS_MAX_BYTES = 5.0, 1 << 20
ANSWER_ROOM = (256, 4096)  # tokens kept free for the answer: a quarter of the context, within these
CHARS_PER_TOKEN = 3.0      # until the server's usage says otherwise (English is ~4; code and CJK fewer)
MESSAGE_TOKENS = 8         # what a chat template adds around each message


class ModelCatalog:
    """The upstream's model ids and context sizes, fetched in the background one request at a time."""

    def __init__(self):
        self.ids = []
        self.context = {}          # model id -> context size in tokens, as the server states it
        self.chars_per_token = {}  # model id -> characters per prompt token, from the server's usage
        self.fetched_at, self.ok = None, False
        self.down = None           # why the server cannot be reached (refused, timed out, 5xx), or None
        self.fetching = None       # the greenlet asking the server now, if any

    def models(self):
        """The model ids known now, maybe none yet; starts a refresh when stale, never waits for it."""
        if settings.demo:
            return ["demo"]
        ttl = MODELS_TTL if self.ok else MODELS_RETRY
        stale = self.fetched_at is None or time.monotonic() - self.fetched_at >= ttl
        if stale and self.fetching is None:
            self.fetching = gevent.spawn(self.refresh)
        return self.ids

    def wait(self, timeout=MODELS_DEADLINE):
        """The model ids, after waiting up to timeout for the first answer if none is known yet."""
        if not self.models() and self.fetching is not None:
            self.fetching.join(timeout)
        return self.ids

    def default(self, timeout=MODELS_DEADLINE):
        """The model to ask for when a conversation names none: configured, else the server's first."""
        if settings.model or settings.demo:
            return settings.model
        ids = self.wait(timeout)
        return ids[0] if ids else None

    def refresh(self):
        """Greenlet body: GET /models (and llama.cpp's /props) within a total deadline and a size cap."""
        try:
            with gevent.Timeout(MODELS_DEADLINE):
                listing = get_json(settings.upstream() + "/models")
                entries = [m for m in (listing.get("data") or []) if isinstance(m, dict) and m.get("id")]
                self.ids = list(dict.fromkeys(str(m["id"]) for m in entries))  # its order: the first is the default
                for entry in entries:
                    size = stated_context(entry)
                    if size:
                        self.context[str(entry["id"])] = size
                if self.ids and not any(m in self.context for m in self.ids):
                    self.learn_from_props()
            self.ok, self.down = True, None
        except (gevent.Timeout, requests.RequestException, urllib3.exceptions.HTTPError, OSError,
                ValueError, AttributeError, TypeError) as exc:
            log.warning("could not list models at %s; asking again in %g s", settings.upstream_label(), MODELS_RETRY)
            status = getattr(getattr(exc, "response", None), "status_code", None) or 0
            self.ok, self.down = False, (  # a 401 or a server without /models is there: it is not down
                "timed out" if isinstance(exc, (gevent.Timeout, requests.Timeout))
                else connection_problem(exc) if isinstance(exc, requests.ConnectionError)
                else f"it answered {status}" if status >= 500 else None)
        finally:
            self.fetched_at = time.monotonic()
            self.fetching = None

    def learn_from_props(self, *models):
        """llama.cpp states its context in /props (beside /v1, not under it); other servers answer 404."""
        try:
            props = get_json(settings.upstream().rsplit("/v1", 1)[0] + "/props")
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, ValueError):
            return
        generation = props.get("default_generation_settings") or {}
        size = positive_int(generation.get("n_ctx") if isinstance(generation, dict) else None) \
            or positive_int(props.get("n_ctx"))
        if size:
            for model in models or self.ids:
                self.context.setdefault(model, size)

    def context_size(self, model):
        """The model's context in tokens if known: the setting, else what the server said."""
        if settings.context_tokens:
            return settings.context_tokens
        if model in self.context:
            return self.context[model]
        return self.context.get(None)  # learned from an error before the model's name was known

    def learn_context(self, model, size):
        """Remember a context size stated in a context-overflow error."""
        if size:
            self.context[model] = size

    def calibrate(self, model, messages, prompt_tokens):
        """Learn characters per token from the prompt_tokens the server counted for messages."""
        tokens = (prompt_tokens or 0) - MESSAGE_TOKENS * len(messages)
        chars = sum(content_length(m["content"]) for m in messages)
        if tokens > 16 and chars > 64:
            self.chars_per_token[model] = max(1.0, min(8.0, chars / tokens))

    def estimate(self, model, messages):
        """Tokens these messages will take, estimated from characters (no tokenizer dependency)."""
        per_token = self.chars_per_token.get(model, CHARS_PER_TOKEN)
        return int(sum(content_length(m["content"]) / per_token + MESSAGE_TOKENS for m in messages)) + 16

    def prompt_budget(self, model, room=None):
        """How many prompt tokens fit with room left for an answer (max_tokens, if set), or None when unknown."""
        size = self.context_size(model)
        if not size:
            return None
        room = min(room, size // 2) if room else min(max(size // 4, ANSWER_ROOM[0]), ANSWER_ROOM[1])
        return int((size - room) * 0.95)  # the estimate is rough: keep a margin


def get_json(url):
    """GET a JSON document from the upstream, refusing one over MODELS_MAX_BYTES."""
    with http.get(url, headers=auth_headers(), stream=True, timeout=(settings.connect_timeout, MODELS_DEADLINE)) as r:
        r.raise_for_status()
        body = r.raw.read(MODELS_MAX_BYTES + 1, decode_content=True)
    if len(body) > MODELS_MAX_BYTES:
        raise ValueError("the model list is too large")
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def positive_int(value):
    """value if it is a positive whole number (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def stated_context(entry):
    """The context size a /models entry states: vLLM, llama.cpp, OpenRouter and Groq each name it."""
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    for value in (entry.get("max_model_len"), meta.get("n_ctx"), entry.get("context_length"),
                  entry.get("context_window")):
        if positive_int(value):
            return value
    return None


def model_label(model_id):
    """A model id for people: llama.cpp names a model by its file path, so show the file's name."""
    if model_id and (model_id[:1] in "/~\\" or re.match(r"[A-Za-z]:[\\/]", model_id)
                     or model_id.lower().endswith((".gguf", ".bin", ".safetensors"))):
        return re.split(r"[\\/]", model_id.rstrip("/\\"))[-1] or model_id
    return model_id


catalog = ModelCatalog()


# Context-overflow errors in every shape we know: llama.cpp, OpenAI, vLLM, TGI and LM Studio each word it differently.
_OVERFLOW = re.compile(r"context[ _](length|size|window)|maximum context|exceed_context|"
                       r"must be <= \d+|must have less than \d+ tokens", re.I)
_CONTEXT_SIZE = re.compile(r"maximum context length is (\d+)|context size \((\d+) tokens\)|"
                           r"limit of (\d+) tokens|must be <= (\d+)|less than (\d+) tokens", re.I)
_PROMPT_SIZE = re.compile(r"\((\d+) tokens\) exceeds|resulted in (\d+) tokens|requested (\d+) tokens|"
                          r"request has (\d+) input tokens|Given: (\d+)", re.I)


class ContextOverflow:
    """What a context-overflow error says: the context size and the prompt's tokens, when stated."""

    def __init__(self, size=None, prompt_tokens=None):
        self.size, self.prompt_tokens = size, prompt_tokens


def context_overflow(status, body):
    """A ContextOverflow if this error response says the prompt did not fit, else None."""
    if status not in (400, 413, 422, 500) or not body:
        return None
    text = body.decode("utf-8", "replace")
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict) and (err.get("type") == "exceed_context_size_error"
                                  or err.get("code") == "context_length_exceeded"):
        size, prompt = positive_int(err.get("n_ctx")), positive_int(err.get("n_prompt_tokens"))
    elif _OVERFLOW.search(text):
        size = prompt = None
    else:
        return None
    size = size or first_number(_CONTEXT_SIZE, text)
    prompt = prompt or first_number(_PROMPT_SIZE, text)
    return ContextOverflow(size, prompt)


def first_number(pattern, text):
    """The first group of pattern that matched in text, as an int, or None."""
    match = pattern.search(text)
    return int(next(g for g in match.groups() if g)) if match else None


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
            if not stripped:
                self.held = self.held[-256:]  # leading blank space is layout: keep it short, or this grows n²
                return []
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
_NEXT_DATA_LINE = "\ndata: "


def sse_frame(event, payload, event_id=None):
    """One SSE frame as bytes: id, event, one "data: " line per payload line, blank line."""
    head = f"id: {event_id}\nevent: {event}\n" if event_id is not None else f"event: {event}\n"
    if "\n" not in payload and "\r" not in payload:
        return f"{head}data: {payload}\n\n".encode()
    return f"{head}data: {_LINE_BREAK.sub(_NEXT_DATA_LINE, payload)}\n\n".encode()  # not str.splitlines(): U+2028


SSE_HELLO = b": connected\nretry: 1000\n\n"  # first write of /events: headers out at once; reconnect after 1 s, not 3
SSE_PING = b": ping\n\n"
WAITING_SHOWN_AFTER = 1.0  # seconds without text before the bubble shows the waiting clock


def waiting_frame(seconds):
    """The status event a bubble shows until the server starts answering: no id, not logged, not replayed."""
    return sse_frame("status", f'<span class="waiting">Waiting for the model server… {seconds:.0f} s</span>')


SLOW_READER_BYTES = 16384  # sent to a reader and not yet taken: it is not keeping up
SLOW_READER_PAUSE = 0.1    # seconds such a reader waits between writes
_TIOCOUTQ = getattr(termios, "TIOCOUTQ", None)  # Linux: bytes in a TCP socket not yet acknowledged


def pause_if_behind(sock):
    """After a write: wait a little if the reader has not taken what it was sent (few big writes); True if it waited."""
    if sock is None or _TIOCOUTQ is None:
        return False
    try:
        unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, ValueError):
        return False
    if unsent <= SLOW_READER_BYTES:
        return False
    gevent.sleep(SLOW_READER_PAUSE)
    return True


class TurnWrites:
    """Frames for idle readers, written once per turn of the loop: first the hook (the journal: one write for every
    token of the turn, before anyone is shown them), then one write per reader, whatever it got in the turn."""

    def __init__(self):
        self.outlets, self.before = [], None  # before: the registry's before_showing, set once it is made

    def add(self, outlet, frame):
        """Hold a frame for an idle outlet until the end of this turn of the loop."""
        if not outlet.pending:
            if not self.outlets:
                gevent.get_hub().loop.run_callback(self.write)
            self.outlets.append(outlet)
        outlet.pending.append(frame)

    def write(self):
        """In the hub, after this turn's greenlets ran: the hook, then each outlet's frames in one write."""
        outlets, self.outlets = self.outlets, []
        if self.before is not None:
            self.before()
        for outlet in outlets:
            outlet.put_pending()


turn_writes = TurnWrites()


class Outlet:
    """One reader of a live answer: a queue, and while its greenlet waits idle, its socket, written by the publisher."""

    __slots__ = ("queue", "ready", "handler", "chunked", "idle", "rest", "pending")
    SEND_REST = object()  # queued when only the rest of a frame is left to send

    def __init__(self):
        self.queue = []      # what its greenlet is to send, in order (a list and an Event: a Queue weighs 2.5 KB)
        self.ready = gevent.event.Event()  # set when the queue gets something
        self.handler = None  # gevent's handler of the response, once its headers are out
        self.chunked = False
        self.idle = False    # its greenlet waits on the queue and everything so far is sent
        self.rest = b""      # the end of a frame the socket did not take: sent first by the greenlet
        self.pending = []    # frames for this turn's one write (TurnWrites)

    def connect(self, environ):
        """After the response's first write: frames may now be written straight to its connection."""
        handler = environ.get("chat.handler")
        if handler is not None and handler.headers_sent:
            self.handler, self.chunked = handler, handler.response_use_chunked

    def send_now(self, data):
        """Write whole frames to the idle reader's socket at once; False if the connection failed (queue them then)."""
        if not data:
            return True  # (an empty chunk would end the response)
        body = b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
        try:
            sent = os.write(self.handler.socket.fileno(), body)  # -1 once closed: an error, never another's
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        self.handler.response_length += sent
        if sent < len(body):
            self.rest = body[sent:]
            self.enqueue(self.SEND_REST)
        return True

    def put(self, frame, direct=True):
        """Send a frame at the end of this turn if the reader is idle (and direct: not the done frame, which ends
        it), else queue it."""
        if direct and self.idle:
            turn_writes.add(self, frame)
        else:
            self.enqueue(frame)

    def put_pending(self):
        """Send this turn's frames in one write if the reader is still idle, else queue them."""
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            if not (self.idle and self.send_now(data)):
                self.enqueue(data)

    def enqueue(self, item):
        """Queue an item for the reader's greenlet (after this turn's frames); what follows is queued too."""
        self.idle = False
        if self.pending:
            self.queue.append(b"".join(self.pending))
            self.pending = []
        self.queue.append(item)
        self.ready.set()

    def wait(self, timeout=None):
        """In the reader's greenlet: wait for what is queued and return it all, rest sent first; Empty after timeout."""
        self.send_rest()
        if not self.queue:
            self.idle = self.handler is not None
            self.ready.clear()
            try:
                if not self.ready.wait(timeout):
                    raise gevent.queue.Empty
            finally:
                self.idle = False
        items, self.queue = self.queue, []
        self.send_rest()  # a frame cut short while this waited goes before everything queued after it
        return [item for item in items if item is not self.SEND_REST]

    def pause_if_behind(self):
        """In the reader's greenlet, after a write: pause_if_behind() on its connection (if it has one)."""
        return pause_if_behind(self.handler.socket if self.handler is not None else None)

    def send_rest(self):
        """In the reader's greenlet: send what the socket did not take of a frame, however long (CHAT_WRITE_TIMEOUT)."""
        if self.rest:
            rest, self.rest = self.rest, b""
            self.handler.socket.sendall(rest)
            self.handler.response_length += len(rest)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------

def moment(timestamp):
    """A message's <time>: ISO 8601 in UTC, which chat.js shows in the reader's zone; until then the UTC text."""
    return f'<time datetime="{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))}">{when(timestamp)}</time>'


class Template(bottle.SimpleTemplate):
    """bottle's template engine, its namespace emptied after rendering: freed at once, not by the cyclic collector."""

    defaults = {"moment": moment}  # every template may show a time

    def execute(self, _stdout, kwargs):
        """Run the template into _stdout; returns its namespace, emptied (bottle's callers ignore it)."""
        namespace = super().execute(_stdout, kwargs)
        namespace.clear()
        return namespace


def template(name, **kwargs):
    """Render templates/<name>.tpl with bottle's syntax (autoescaped {{ }}), through Template."""
    return bottle.template(name, template_adapter=Template, **kwargs)


_FORMATTER = HtmlFormatter(nowrap=True)
HIGHLIGHT_LIMIT = 30_000  # characters: Pygments takes ~5 µs a character, in one call no deadline can stop


def highlight_code(code, lang, _attrs):
    """Pygments-highlight a fenced code block; unknown languages and huge blocks stay plain (markdown-it escapes)."""
    if not lang or len(code) > HIGHLIGHT_LIMIT:
        return ""
    try:
        lexer = get_lexer_by_name(lang.split()[0])
    except ClassNotFound:
        return ""
    return pygments_highlight(code, lexer, _FORMATTER)


def bracket_math(state, silent):
    """Inline rule: \\( … \\) and \\[ … \\] as math (the dollar forms come from dollarmath)."""
    for opener, closer, kind in (("\\(", "\\)", "math_inline"), ("\\[", "\\]", "math_inline_double")):
        if state.src.startswith(opener, state.pos):
            end = next_closer(state, closer, state.pos + 2)
            if end < 0 or not state.src[state.pos + 2:end].strip():
                return False
            if not silent:
                token = state.push(kind, "math", 0)
                token.content, token.markup = state.src[state.pos + 2:end], opener
            state.pos = end + 2
            return True
    return False


def next_closer(state, closer, start):
    """Where closer next occurs from start, or -1; found once per text (searching for each opener was quadratic)."""
    places = state.__dict__.setdefault("closers", {})
    if closer not in places:
        places[closer] = [match.start() for match in re.finditer(re.escape(closer), state.src)]
    found = places[closer]
    n = bisect.bisect_left(found, start)
    return found[n] if n < len(found) else -1


# MathML the page may get: latex2mathml's output is unsafe (raw \\text{<script>}, javascript: \\href), so it is rebuilt.
MATHML_TAGS = {"math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msub", "msup", "msubsup", "munder", "mover",
               "munderover", "mfrac", "msqrt", "mroot", "mstyle", "merror", "mpadded", "mphantom", "mtable", "mtr",
               "mtd", "mmultiscripts", "mprescripts", "none", "semantics", "annotation", "menclose"}
MATHML_ATTRS = {"display", "mathvariant", "stretchy", "fence", "separator", "lspace", "rspace", "accent", "accentunder",
                "columnalign", "rowalign", "columnspacing", "rowspacing", "columnlines", "rowlines", "frame",
                "displaystyle", "scriptlevel", "linethickness", "minsize", "maxsize", "symmetric", "largeop",
                "movablelimits", "form", "width", "height", "depth", "notation", "mathsize", "encoding"}
MAX_TEX, MAX_TEX_DEPTH = 4000, 40  # characters and nested braces: beyond them TeX stays code (bounded CPU)


@functools.lru_cache(maxsize=2048)
def tex_to_mathml(tex, display):
    """TeX as safe MathML; TeX that does not convert stays visible as code, never an error."""
    depth = deepest = 0
    for char in tex:
        depth += (char == "{") - (char == "}")
        deepest = max(deepest, depth)
    try:
        if len(tex) > MAX_TEX or deepest > MAX_TEX_DEPTH:
            raise ValueError("too large or too deep")
        root = ElementTree.fromstring(latex2mathml.converter.convert(tex, display="block" if display else "inline"))
        return rebuilt_mathml(root)
    except Exception:  # noqa: BLE001 — any TeX the converter chokes on (RecursionError too) is shown as written
        return f"<code class=\"math-error\" title=\"Not valid TeX\">{html.escape(tex)}</code>"


def rebuilt_mathml(element):
    """An element and its children, keeping only allowed tags and attributes, every text escaped."""
    tag = element.tag.rsplit("}", 1)[-1]
    inner = html.escape(element.text or "", quote=False) + "".join(
        rebuilt_mathml(child) + html.escape(child.tail or "", quote=False) for child in element)
    if tag not in MATHML_TAGS:
        return inner
    attrs = "".join(f' {name}="{html.escape(value)}"' for name, value in element.attrib.items() if name in MATHML_ATTRS)
    return f"<{tag}{attrs}>{inner}</{tag}>"


def render_math(renderer, tokens, idx, options, env):
    """Inline or display math from either syntax, as MathML the browser draws itself."""
    check_deadline(env, RenderDeadline.EVERY)  # a formula can take a millisecond
    token = tokens[idx]
    display = token.type != "math_inline"
    if not token.content.strip():
        return html.escape(token.markup * 2)
    mathml = tex_to_mathml(token.content.strip(), display)
    return f'<div class="math">{mathml}</div>\n' if token.type.startswith("math_block") else mathml


def render_text_token(renderer, tokens, idx, options, env):
    """Plain text, escaped as markdown-it does; the deadline is checked here while the tokens become HTML."""
    check_deadline(env)
    return escapeHtml(tokens[idx].content)


def render_link_open(renderer, tokens, idx, options, env):
    """Links from the model open in a new tab, safely: no referrer, no opener, no follow."""
    tokens[idx].attrSet("target", "_blank")
    tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
    return renderer.renderToken(tokens, idx, options, env)


def render_image(renderer, tokens, idx, options, env):
    """Images load only from this server or CHAT_IMAGE_HOSTS; any other is a link, so an answer cannot beacon."""
    token = tokens[idx]
    src = token.attrGet("src") or ""
    alt = renderer.renderInlineAsText(token.children or [], options, env)
    parts = urllib.parse.urlsplit(src)
    if parts.scheme == "https" and (parts.hostname or "") in settings.image_hosts:
        return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" loading="lazy" referrerpolicy="no-referrer">'
    return (f'<a class="image-link" href="{html.escape(src)}" target="_blank" rel="noopener noreferrer nofollow">'
            f'[image: {html.escape(alt or "image")}]</a>')


def render_fence(renderer, tokens, idx, options, env):
    """A fenced code block under a bar with its language and a copy button (which then covers no code)."""
    check_deadline(env, RenderDeadline.EVERY)
    block = renderer.fence(tokens, idx, options, env).replace("<pre>", '<pre tabindex="0">', 1)  # keyboard scrolls it
    lang = html.escape(tokens[idx].info.split()[0]) if tokens[idx].info.strip() else "text"
    return ('<div class="code-block"><div class="code-bar"><span class="lang">' + lang + '</span>'
            '<button type="button" class="copy" data-copy="code" aria-label="Copy code">Copy</button></div>'
            f'{block}</div>\n')


def render_cell_open(renderer, tokens, idx, options, env):
    """A table column's alignment as a class: the page's CSP allows no style attribute."""
    align = tokens[idx].attrs.pop("style", "").removeprefix("text-align:")
    if align:
        tokens[idx].attrSet("class", "align-" + align)
    return renderer.renderToken(tokens, idx, options, env)


class RenderTimeout(Exception):
    """A render ran past its budget."""


class RenderDeadline:
    """The end of a render's budget in its thread's CPU time: load elsewhere does not make a render run out."""

    EVERY = 32  # calls between two readings of the clock (a system call)
    __slots__ = ("at", "calls")

    def __init__(self, seconds):
        self.at, self.calls = time.thread_time() + seconds, 0

    def check(self, weight=1):
        """Count a call (weight for a costly one); raise RenderTimeout if the budget is spent."""
        self.calls += weight
        if self.calls >= self.EVERY:
            self.calls = 0
            if time.thread_time() > self.at:
                raise RenderTimeout()


def check_deadline(env, weight=1):
    """Check the deadline of the render env belongs to, if it has one."""
    deadline = env.get("deadline")
    if deadline is not None:
        deadline.check(weight)


def hide_open_code(state, silent):
    """Inline rule, in an unfinished block only: backticks whose closing run has not arrived yet are not shown."""
    if state.src[state.pos] != "`" or not state.env.get("tail"):
        return False
    end = state.pos
    while end < state.posMax and state.src[end] == "`":
        end += 1
    if re.search(f"(?<!`){state.src[state.pos:end]}(?!`)", state.src[end:state.posMax]):
        return False  # closed: a code span
    state.pos = end
    return True


def hide_open_marks(state):
    """Inline rule, in an unfinished block only: an emphasis mark not closed yet is not shown (no stray * or _)."""
    if state.env.get("tail"):
        for delimiters in [state.delimiters] + [m["delimiters"] for m in state.tokens_meta if m and "delimiters" in m]:
            for mark in delimiters:
                if mark.open and mark.end < 0 and state.tokens[mark.token].type == "text":
                    state.tokens[mark.token].content = ""


def deadline_rule(state, *_):
    """A rule that matches nothing, tried first at every position: a render stops soon after its deadline."""
    check_deadline(state.env)
    return False


def make_markdown(linkify):
    """A Markdown renderer: CommonMark, tables, strikethrough, math, safe links, images and fences; raw HTML off."""
    md = MarkdownIt("commonmark", {"html": False, "highlight": highlight_code, "linkify": linkify})
    md.enable(["table", "strikethrough"] + (["linkify"] if linkify else []))
    if linkify:
        md.linkify.set({"fuzzy_link": False, "fuzzy_email": False})  # fuzzy would link "chat.py" (.py is a TLD)
    md.use(dollarmath_plugin, allow_space=False, allow_digits=False, double_inline=True)  # "$5 and $10" is money
    md.inline.ruler.before("escape", "bracket_math", bracket_math)
    # As a terminator too, the deadline is checked at every line of a paragraph, list, quote or table.
    md.block.ruler.before("table", "deadline", deadline_rule, {"alt": ["paragraph", "reference", "blockquote", "list"]})
    md.inline.ruler.before("text", "deadline", deadline_rule)
    md.inline.ruler.before("backticks", "open_code", hide_open_code)
    md.inline.ruler2.before("fragments_join", "open_marks", hide_open_marks)
    for rule in ("math_inline", "math_inline_double", "math_block", "math_block_label"):
        md.add_render_rule(rule, render_math)
    md.add_render_rule("text", render_text_token)
    md.add_render_rule("link_open", render_link_open)
    md.add_render_rule("image", render_image)
    md.add_render_rule("fence", render_fence)
    md.add_render_rule("th_open", render_cell_open)
    md.add_render_rule("td_open", render_cell_open)
    return md


markdown, markdown_without_linkify = make_markdown(True), make_markdown(False)  # linkify holds the GIL ~1 ms a text
LINKIFY_LIMIT = 20_000  # characters
# Seconds of CPU a render may take: on the hub (a BLOCK_IN_THREAD block takes ~10 ms), in the shared lane, the long one.
HUB_SLICE, RENDER_SLICE, RENDER_BUDGET = 0.03, 0.1, 0.9
TOO_SLOW = object()  # what safe_markdown gives for a text it could not render within its budget


def render_markdown(text, budget=None, tail=False):
    """Answer text as safe HTML (raw HTML escaped, javascript: links refused); RenderTimeout past budget CPU seconds;
    tail: the text is an unfinished block (marks not closed yet are hidden)."""
    linkify = "://" in text and len(text) <= LINKIFY_LIMIT and not tail  # a bare URL is linked once its block ends
    env = {"tail": tail, "deadline": None if budget is None else RenderDeadline(budget)}
    return (markdown if linkify else markdown_without_linkify).render(text, env)


def render_text(text):
    """Markdown as HTML, or None or TOO_SLOW: on the hub if short and within HUB_SLICE, else in a worker thread."""
    rendered = safe_markdown(text, HUB_SLICE) if len(text) <= BLOCK_IN_THREAD else TOO_SLOW
    return render_in_background(text) if rendered is TOO_SLOW else rendered


NOTES = {
    "length": "The answer was cut off: the model reached its length limit.",
    "model_length": "The answer was cut off: the model reached its context limit.",
    "content_filter": "The model's content filter stopped the answer.",
    "truncated": "The stream ended before the model said it was finished; the answer may be incomplete.",
    "empty": "The model server ended the answer without any text (llama-cpp-python does so to a request it interrupts "
             "or one too long for its context).",
    "stopped": "Stopped.",
    "interrupted": "The server stopped while this answer was being written; it may be incomplete.",
    "unsaved": "This answer was not saved completely (the server stopped, or could not write it); "
               "this is the text saved last.",
    "elsewhere": "Another chat.py process is still writing this answer; reload to see more of it.",
    "unformatted": "This answer is too long or too intricate to format in time, so it is shown as plain text.",
    "writing": "This answer is still being written; reload to see more of it.",
}


def answer_notes(stream):
    """The notes under a finished answer: cut off, truncated, stopped, tool calls, dropped turns."""
    c = stream.completion
    notes = []
    left_out = f"The {stream.dropped} oldest message{'s were' if stream.dropped > 1 else ' was'} left out"
    if stream.resent is not None:
        size = f" ({stream.resent:,} tokens)" if stream.resent else ""
        notes.append(f"The model's context{size} was full, so chat.py sent the question again: "
                     f"{left_out[0].lower()}{left_out[1:]} of what the model saw.")
    elif stream.dropped:
        notes.append(f"{left_out} of what the model saw, to fit the model's context.")
    if stream.status in ("done", "truncated") and not (stream.chars or c.finish_reason or c.tool_calls):
        notes.append(NOTES["empty"])  # not silence: an empty bubble looks like a page that stopped working
    elif stream.status in ("stopped", "truncated", "interrupted"):
        notes.append(NOTES[stream.status])
    elif c.finish_reason in NOTES:
        notes.append(NOTES[c.finish_reason])
    for call in c.tool_calls.values():
        notes.append(f"The model asked to run the tool {call['name'] or '?'}"
                     f"({call['arguments']}); chat.py runs no tools.")
    return notes + stream.notes


def answer_footer(stream):
    """One line of facts: model, finish reason, token counts, speed."""
    c, parts = stream.completion, []
    if c.model or stream.model:
        parts.append(model_label(c.model or stream.model))
    if c.finish_reason:
        parts.append(f"finish: {c.finish_reason}")
    usage = c.usage or {}
    out_tokens = usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None
    in_tokens = positive_int(usage.get("prompt_tokens"))
    if in_tokens and out_tokens is not None:
        parts.append(f"{in_tokens} in / {out_tokens} out tokens")
    context = catalog.context_size(stream.model)
    if context and in_tokens:
        parts.append(f"{in_tokens + (out_tokens or 0):,} of {context:,} tokens")
    end = stream.finished_at or time.monotonic()
    if stream.first_token_at and end - stream.first_token_at > 0.05:
        parts.append(f"{(out_tokens or stream.tokens) / (end - stream.first_token_at):.1f} tokens/s")
    return " · ".join(parts)


def split_answer(stream):
    """Answer and reasoning text; a lone </think> (opening tag in the prompt) splits late."""
    text, reasoning = stream.text(), stream.text("reasoning")
    if not reasoning and THINK_CLOSE in text and THINK_OPEN not in text:
        reasoning, _, text = text.partition(THINK_CLOSE)
    return text.lstrip("\r\n"), reasoning.strip()


def make_answer(bubble_id, conversation_id, text="", reasoning="", status="done", error=None, notes=(), footer="",
                finish_reason=None, usage=None, model=None, elapsed=None, created=None, message_id=None):
    """The answer record, made here only: what a finished bubble shows (render_answer) and the store keeps."""
    return {"bubble_id": bubble_id, "conversation_id": conversation_id, "text": text, "reasoning": reasoning,
            "status": status, "error": error, "notes": list(notes), "footer": footer,
            "finish_reason": finish_reason, "usage": usage, "model": model, "elapsed": elapsed, "created": created,
            "message_id": message_id}


def answer_record(stream):
    """The answer record of a finished stream."""
    text, reasoning = split_answer(stream)
    c = stream.completion
    return make_answer(stream.id, stream.conversation_id, text, reasoning, stream.status, stream.error,
                       answer_notes(stream), answer_footer(stream), c.finish_reason, c.usage, c.model or stream.model,
                       round((stream.finished_at or time.monotonic()) - stream.started, 3),
                       created=time.time() - (time.monotonic() - stream.started), message_id=stream.message_id)


def render_answer(answer, last=True, nav=""):
    """The finished assistant bubble, never an exception: one that cannot be rendered is shown as plain text."""
    try:
        answer_html = render_text(answer["text"])
        if answer_html is None:
            raise ValueError("rendering failed")
        if answer_html is TOO_SLOW:
            answer_html = f"<pre>{html.escape(answer['text'])}</pre>"
            answer = dict(answer, notes=answer["notes"] + [NOTES["unformatted"]])
        return template("answer", answer=answer, answer_html=answer_html, last=last,
                        error=short_error(answer["error"]), nav=nav)
    except Exception:  # noqa: BLE001 — a rendering bug must not break the bubble or the page
        log.exception("rendering an answer failed")
        answer = dict(answer, error=answer["error"] or "chat.py could not render this answer.")
        return render_plain(answer)


@functools.lru_cache(maxsize=32)
def safe_markdown(text, budget=RENDER_SLICE, tail=False):
    """render_markdown(), cached, with None instead of an exception (also in a thread); TOO_SLOW past budget."""
    try:
        return render_markdown(text, budget, tail)
    except RenderTimeout:
        return TOO_SLOW
    except Exception:  # noqa: BLE001
        return None


def render_plain(answer):
    """The finished bubble without Markdown: the fallback if rendering ever fails."""
    text = answer["text"]
    return template("answer", answer=answer, last=False, error=short_error(answer["error"]), nav="",
                    answer_html=f"<pre>{html.escape(text)}</pre>" if text else "")


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_EXCEPTION_LINE = re.compile(r"^\s*[\w.]*(Error|Exception)\b[^:]*:\s*\S")
SHORT_ERROR = 400


def short_error(text):
    """The first meaningful sentence of an error, for the bubble (of a traceback: its last exception line)."""
    if not text:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0]
    if first.endswith("Traceback (most recent call last):"):
        cause = next((line for line in reversed(lines) if _EXCEPTION_LINE.match(line)), None)
        if cause:
            first = first[:-len("Traceback (most recent call last):")] + cause
    if len(first) > SHORT_ERROR:
        end = next((m.end() for m in _SENTENCE_END.finditer(first, 40) if m.end() <= SHORT_ERROR), None)
        first = first[:end] if end else first[:SHORT_ERROR].rsplit(" ", 1)[0] + "…"
    return first


def render_missing(stream_id):
    """The bubble for a stream we no longer have (finished long ago, or a restart)."""
    return render_answer(make_answer(stream_id, None, status="error",
                                     error="This answer is no longer available: the server may have restarted."))


BLOCK_IN_THREAD = 8192  # characters: a longer text is rendered off the hub


def render_block(text):
    """A finished Markdown block as HTML (see render_text); one that fails or takes too long, as escaped text."""
    rendered = render_text(text)
    return rendered if rendered not in (None, TOO_SLOW) else f"<pre>{html.escape(text)}</pre>"


RENDER_LANE = gevent.lock.BoundedSemaphore(1)  # long renders take turns: 12 threads would give the hub 1 turn in 13
LONG_LANE = gevent.lock.BoundedSemaphore(1)  # a render past its slice is redone here: a hostile one holds up no one
COLLECTOR_PAUSES = [0]  # renders running in a thread now (see collector_paused)


@contextlib.contextmanager
def collector_paused():
    """The cyclic collector waits while a render runs in a thread: its passes stalled the hub (p99 gap 13 ms, now 2)."""
    COLLECTOR_PAUSES[0] += 1
    gc.disable()
    try:
        yield
    finally:
        COLLECTOR_PAUSES[0] -= 1
        if not COLLECTOR_PAUSES[0]:
            gc.enable()


def render_in_background(text):
    """safe_markdown(text) in a worker thread, one at a time; past RENDER_SLICE, again in the long lane."""
    with RENDER_LANE, collector_paused():
        rendered = in_background(safe_markdown, text)
    if rendered is TOO_SLOW:
        with LONG_LANE, collector_paused():
            rendered = in_background(safe_markdown, text, RENDER_BUDGET)
    return rendered


# ---------------------------------------------------------------------------
# Storage: conversations in SQLite (the same Database interface over PostgreSQL is in chat_scale.py)
# ---------------------------------------------------------------------------

# The schema's history, one named step each; append, never edit (PRAGMA user_version counts them). PostgreSQL's
# scripts (chat_scale.POSTGRESQL_STEPS) go by the same names, from "leases", which creates it all there.
Migration = collections.namedtuple("Migration", "name sqlite")

MIGRATIONS = [
    Migration("conversations and messages", sqlite="""
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        system_prompt TEXT NOT NULL DEFAULT '',
        model TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX conversations_by_owner ON conversations (owner, updated DESC);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        role TEXT NOT NULL,              -- user | assistant
        content TEXT NOT NULL DEFAULT '',
        reasoning TEXT NOT NULL DEFAULT '',
        status TEXT NOT NULL DEFAULT 'done',  -- streaming | done | stopped | error | truncated | interrupted
        error TEXT,
        notes TEXT NOT NULL DEFAULT '[]',  -- JSON list of sentences shown under the answer
        footer TEXT NOT NULL DEFAULT '',
        finish_reason TEXT,
        usage TEXT,                        -- JSON, as the upstream sent it
        model TEXT,
        elapsed REAL,
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages (conversation_id, id);
    CREATE TABLE secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
    """),
    Migration("login sessions", sqlite="""
    CREATE TABLE sessions (
        token_hash TEXT PRIMARY KEY,     -- sha256 of the cookie: a stolen database holds no live cookie
        password_tag TEXT NOT NULL,      -- which password it was issued under: a new one logs everyone out
        expires REAL NOT NULL
    );
    """),
    # Branches: every message hangs from the one before it on its path; old conversations become one branch each.
    Migration("branches, parameters and search", sqlite="""
    ALTER TABLE messages ADD COLUMN parent_id INTEGER REFERENCES messages (id) ON DELETE CASCADE;
    UPDATE messages SET parent_id = (SELECT MAX(p.id) FROM messages p
                                     WHERE p.conversation_id = messages.conversation_id AND p.id < messages.id);
    CREATE INDEX messages_by_parent ON messages (parent_id);
    ALTER TABLE conversations ADD COLUMN leaf_id INTEGER;
    UPDATE conversations SET leaf_id = (SELECT MAX(m.id) FROM messages m WHERE m.conversation_id = conversations.id);
    ALTER TABLE conversations ADD COLUMN temperature REAL;
    ALTER TABLE conversations ADD COLUMN top_p REAL;
    ALTER TABLE conversations ADD COLUMN max_tokens INTEGER;
    CREATE TABLE owner_settings (owner TEXT PRIMARY KEY, system_prompt TEXT NOT NULL DEFAULT '');
    -- Full-text search, kept by triggers: message text (rowid = the message's id) and titles
    -- (rowid = the conversation's rowid). An answer is indexed once it is no longer streaming.
    CREATE VIRTUAL TABLE message_search USING fts5(body, tokenize = 'unicode61 remove_diacritics 2');
    CREATE VIRTUAL TABLE title_search USING fts5(title, tokenize = 'unicode61 remove_diacritics 2');
    INSERT INTO message_search (rowid, body) SELECT id, content FROM messages WHERE status != 'streaming';
    INSERT INTO title_search (rowid, title) SELECT rowid, title FROM conversations;
    CREATE TRIGGER message_indexed AFTER INSERT ON messages WHEN new.status != 'streaming' BEGIN
        INSERT INTO message_search (rowid, body) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER message_reindexed AFTER UPDATE OF content, status ON messages WHEN new.status != 'streaming' BEGIN
        DELETE FROM message_search WHERE rowid = old.id;
        INSERT INTO message_search (rowid, body) VALUES (new.id, new.content);
    END;
    CREATE TRIGGER message_unindexed AFTER DELETE ON messages BEGIN
        DELETE FROM message_search WHERE rowid = old.id;
    END;
    CREATE TRIGGER title_indexed AFTER INSERT ON conversations BEGIN
        INSERT INTO title_search (rowid, title) VALUES (new.rowid, new.title);
    END;
    CREATE TRIGGER title_reindexed AFTER UPDATE OF title ON conversations BEGIN
        DELETE FROM title_search WHERE rowid = old.rowid;
        INSERT INTO title_search (rowid, title) VALUES (new.rowid, new.title);
    END;
    CREATE TRIGGER title_unindexed AFTER DELETE ON conversations BEGIN
        DELETE FROM title_search WHERE rowid = old.rowid;
    END;
    """),
    # Crash recovery by lease: a streaming answer whose writer stopped renewing it is interrupted.
    Migration("leases", sqlite="""
    ALTER TABLE messages ADD COLUMN lease_until REAL;
    CREATE INDEX messages_streaming ON messages (lease_until) WHERE status = 'streaming';
    """),
    # Each word is indexed behind its owner's key (search_terms()): a search never walks, or times, others' rows.
    Migration("search by owner", sqlite="""
    DROP TRIGGER message_indexed;
    DROP TRIGGER message_reindexed;
    DROP TRIGGER message_unindexed;
    DROP TRIGGER title_indexed;
    DROP TRIGGER title_reindexed;
    DROP TRIGGER title_unindexed;
    DROP TABLE message_search;
    DROP TABLE title_search;
    CREATE VIRTUAL TABLE message_search USING fts5(body, tokenize = 'unicode61 remove_diacritics 2');
    CREATE VIRTUAL TABLE title_search USING fts5(title, tokenize = 'unicode61 remove_diacritics 2');
    INSERT INTO message_search (rowid, body) SELECT m.id, search_terms(c.owner, m.content)
        FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.status != 'streaming';
    INSERT INTO title_search (rowid, title) SELECT rowid, search_terms(owner, title) FROM conversations;
    CREATE TRIGGER message_indexed AFTER INSERT ON messages WHEN new.status != 'streaming' BEGIN
        INSERT INTO message_search (rowid, body)
            SELECT new.id, search_terms(owner, new.content) FROM conversations WHERE id = new.conversation_id;
    END;
    CREATE TRIGGER message_reindexed AFTER UPDATE OF content, status ON messages WHEN new.status != 'streaming' BEGIN
        DELETE FROM message_search WHERE rowid = old.id;
        INSERT INTO message_search (rowid, body)
            SELECT new.id, search_terms(owner, new.content) FROM conversations WHERE id = new.conversation_id;
    END;
    CREATE TRIGGER message_unindexed AFTER DELETE ON messages BEGIN
        DELETE FROM message_search WHERE rowid = old.id;
    END;
    CREATE TRIGGER title_indexed AFTER INSERT ON conversations BEGIN
        INSERT INTO title_search (rowid, title) VALUES (new.rowid, search_terms(new.owner, new.title));
    END;
    CREATE TRIGGER title_reindexed AFTER UPDATE OF title ON conversations BEGIN
        DELETE FROM title_search WHERE rowid = old.rowid;
        INSERT INTO title_search (rowid, title) VALUES (new.rowid, search_terms(new.owner, new.title));
    END;
    CREATE TRIGGER title_unindexed AFTER DELETE ON conversations BEGIN
        DELETE FROM title_search WHERE rowid = old.rowid;
    END;
    """),
    # Accounts (CHAT_AUTH=accounts, CHAT_AUTH_HEADER): a user's conversations carry the user's owner id, so
    # everything keyed by owner works unchanged. Attachments are kept with their message.
    Migration("accounts and attachments", sqlite="""
    CREATE TABLE users (
        name TEXT PRIMARY KEY,           -- lower-case: names are compared without case
        owner TEXT NOT NULL UNIQUE,      -- the owner id the user's conversations carry
        password_hash TEXT,              -- scrypt (password_hash()); NULL: signs in through the proxy only
        created REAL NOT NULL
    );
    ALTER TABLE sessions ADD COLUMN user_name TEXT REFERENCES users (name) ON DELETE CASCADE;
    ALTER TABLE sessions ADD COLUMN created REAL;
    ALTER TABLE sessions ADD COLUMN seen REAL;
    ALTER TABLE sessions ADD COLUMN agent TEXT;
    CREATE INDEX sessions_by_user ON sessions (user_name);
    CREATE TABLE attachments (
        id TEXT PRIMARY KEY,             -- unguessable, in the URL that serves it to its owner
        message_id INTEGER NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
        name TEXT NOT NULL,
        type TEXT NOT NULL,              -- image/png, image/jpeg, image/webp, image/gif or text/plain
        data BLOB NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX attachments_by_message ON attachments (message_id);
    """),
    # Read-only links. The token is kept, not its hash, so that the owner can copy a link again: it only reads a
    # conversation that the same database holds anyway (a login's token, which acts as its user, is hashed).
    Migration("shared links", sqlite="""
    CREATE TABLE shares (
        token TEXT PRIMARY KEY,          -- secrets.token_urlsafe(16): 128 random bits, the link /s/TOKEN
        conversation_id TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
        created REAL NOT NULL
    );
    CREATE INDEX shares_by_conversation ON shares (conversation_id);
    """),
    # Since when a conversation is pinned, archived (out of the list, still searched) or in the trash (deleted: gone
    # from everything at once, restorable until Store.purge_trash drops it TRASH_SECONDS later). NULL: it is not.
    Migration("pins, archive and trash", sqlite="""
    ALTER TABLE conversations ADD COLUMN pinned REAL;
    ALTER TABLE conversations ADD COLUMN archived REAL;
    ALTER TABLE conversations ADD COLUMN deleted REAL;
    CREATE INDEX conversations_trash ON conversations (deleted) WHERE deleted IS NOT NULL;
    """),
    # Named presets of the composer's options, per owner (an anonymous browser or an account).
    Migration("presets", sqlite="""
    CREATE TABLE presets (
        owner TEXT NOT NULL,
        name TEXT NOT NULL,
        model TEXT,                      -- NULL: the server's default
        system_prompt TEXT NOT NULL DEFAULT '',
        temperature REAL,                -- NULL: the default, as in conversations
        top_p REAL,
        max_tokens INTEGER,
        created REAL NOT NULL,
        PRIMARY KEY (owner, name)
    );
    """),
]

class Result:
    """What a statement returned, fetched whole inside the database thread."""

    __slots__ = ("rows", "rowcount")

    def __init__(self, rows, rowcount):
        self.rows, self.rowcount = rows, rowcount

    def fetchone(self):
        """The first row, or None."""
        return self.rows[0] if self.rows else None

    def fetchall(self):
        """Every row."""
        return self.rows


class SQLiteDatabase:
    """The Database seam's default: one SQLite connection, each call in gevent's thread pool, one caller at a time
    (SQLite blocks on another process's write lock or a slow disk: that delays only its callers, never the hub).
    chat_scale.PostgresDatabase implements the same interface, which is all the Store uses:

      execute(sql, args) -> Result   one statement (`?` placeholders), its rows fetched whole, and rowcount
      executemany(sql, rows)         one statement for each row
      transaction()                  a context: the statements inside commit together, or not at all
      search(owner, words, limit)    this owner's titles, and each conversation's best message, matching every word
                                     (reading only its rows)
      size(), close()                bytes in use (for CHAT_MAX_DB_MB); close the connection
      errors                         what a failing statement raises (for `except store.errors`)
      name, null_safe_equal, byte_length, owner_moved   the few places where the two dialects differ
    """

    name = "SQLite"
    errors = (sqlite3.Error,)  # what a failing statement raises, for `except store.errors`
    null_safe_equal = "IS"                                  # NULL = NULL is true
    byte_length = "LENGTH(CAST({} AS BLOB))"
    owner_moved = "UPDATE messages SET content = content WHERE conversation_id = ?"  # re-keys its search entries

    def __init__(self, path):
        self.path = path
        self.lock = gevent.lock.RLock()  # a greenlet's transaction spans several calls
        # A greenlet killed while it waits leaves its task running: a real lock keeps two off the connection.
        self.thread_lock = monkey.get_original("threading", "Lock")()
        self.connection = in_background(self.connect, path)

    @staticmethod
    def connect(path):
        """Open the file and migrate it to the current schema."""
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.create_function("search_terms", 2, search_terms, deterministic=True)  # the search index's triggers
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at each checkpoint, fast
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("BEGIN IMMEDIATE")  # one migration at a time across processes: the version is read under the lock
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, migration in enumerate(MIGRATIONS[version:], version + 1):
                for statement in split_sql(migration.sqlite):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return db

    def call(self, fn, *args):
        """Run fn(*args) in the thread pool while holding the lock; the calling greenlet waits cooperatively."""
        def run():
            with self.thread_lock:
                try:
                    return True, fn(*args)
                except Exception as exc:  # noqa: BLE001 — handed back to the caller, not printed by the pool
                    return False, exc
        with self.lock:
            ok, value = in_background(run)
        if not ok:
            raise value
        return value

    def execute(self, sql, args=()):
        """Run one statement; return its rows and rowcount."""
        def run():
            cursor = self.connection.execute(sql, args)
            return Result(cursor.fetchall(), cursor.rowcount)
        return self.call(run)

    def executemany(self, sql, rows):
        """Run one statement for each row."""
        return self.call(lambda: self.connection.executemany(sql, rows).rowcount)

    @contextlib.contextmanager
    def transaction(self):
        """BEGIN … COMMIT, or ROLLBACK on an error (the connection is in autocommit mode otherwise)."""
        with self.lock:  # no other greenlet's statement may land inside this transaction
            self.execute("BEGIN")
            try:
                yield
            except BaseException:
                self.execute("ROLLBACK")
                raise
            self.execute("COMMIT")

    def search(self, owner, words, limit):
        """This owner's titles and each conversation's best message matching every word (as a prefix), best first:
        FTS5."""
        # A short word as a prefix matches half the owner's words: only words of three letters or more are.
        query = " ".join('"' + search_terms(owner, word).replace('"', '""') + ('"*' if len(word) >= 3 else '"')
                         for word in words)
        key = search_key(owner)  # taken out of the snippets again
        # CROSS JOIN: the match first, so that the planner never runs it once for each of the owner's rows

        def run():
            deadline = time.monotonic() + SEARCH_SECONDS  # the database is shared: a search gets this long
            self.connection.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
            try:
                titles = self.connection.execute(
                    "SELECT c.id AS conversation_id, c.title, c.archived, NULL AS message_id, NULL AS role, "
                    "replace(highlight(title_search, 0, char(1), char(2)), ?, '') AS snippet "
                    "FROM title_search CROSS JOIN conversations c ON c.rowid = title_search.rowid "
                    "WHERE title_search MATCH ? AND c.owner = ? AND c.deleted IS NULL ORDER BY title_search.rank "
                    "LIMIT ?",
                    (key, query, owner, limit)).fetchall()
                # A conversation's best message only (MIN's row gives the other columns); snippets for those alone.
                messages = self.connection.execute(
                    "SELECT c.id AS conversation_id, c.title, c.archived, m.id AS message_id, m.role, "
                    "MIN(message_search.rank) AS score "
                    "FROM message_search CROSS JOIN messages m ON m.id = message_search.rowid "
                    "CROSS JOIN conversations c ON c.id = m.conversation_id "
                    "WHERE message_search MATCH ? AND c.owner = ? AND c.deleted IS NULL "
                    "GROUP BY c.id ORDER BY score LIMIT ?", (query, owner, limit)).fetchall()
                snippets = dict(self.connection.execute(
                    "SELECT rowid, replace(snippet(message_search, 0, char(1), char(2), '…', 16), ?, '') "
                    f"FROM message_search WHERE message_search MATCH ? AND rowid IN ({', '.join('?' * len(messages))})",
                    (key, query, *[row["message_id"] for row in messages])).fetchall())
            finally:
                self.connection.set_progress_handler(None, 0)
            return (titles + [dict(row, snippet=snippets.get(row["message_id"])) for row in messages])[:limit]
        return self.call(run)

    def size(self):
        """Bytes in use: the pages that hold data (not the free list, which new rows reuse) and the WAL."""
        def run():
            pages, free, page_size = (self.connection.execute(f"PRAGMA {name}").fetchone()[0]
                                      for name in ("page_count", "freelist_count", "page_size"))
            try:
                wal = os.path.getsize(self.path + "-wal")
            except OSError:
                wal = 0
            return (pages - free) * page_size + wal
        return self.call(run)

    def close(self):
        """Close the connection."""
        self.call(self.connection.close)


def split_sql(script):
    """The statements of a migration script (trigger bodies keep their inner semicolons)."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and sqlite3.complete_statement(text):
            statements.append(text)
            current = []
    if "\n".join(current).strip():
        statements.append("\n".join(current))
    return statements


SEARCH_SECONDS = 1.0  # the longest a search may hold the database


def search_key(owner):
    """The 8 hex digits in front of each of this owner's words in the SQLite search index (PostgreSQL's is the same)."""
    return hashlib.md5((owner or "").encode()).hexdigest()[:8]


class SearchTerms:
    """Text as the SQLite search index holds it: the owner's key in front of each word, as FTS5's tokenizer sees it."""

    def __init__(self):
        # code point -> "a": part of a word, "v": part of one but dropped (a diacritic), " ": between words
        self.kinds = {c: "a" if chr(c).isalnum() else " " for c in range(128)}
        self.lock = monkey.get_original("threading", "Lock")()
        self.probe = sqlite3.connect(":memory:", check_same_thread=False)
        self.probe.execute("CREATE VIRTUAL TABLE t USING fts5(x, tokenize = 'unicode61 remove_diacritics 2')")
        self.probe.execute("CREATE VIRTUAL TABLE v USING fts5vocab(t, 'instance')")

    def __call__(self, owner, text):
        """text with search_key(owner) in front of each of its words."""
        if text is None:
            return None
        unknown = [c for c in set(text) if ord(c) not in self.kinds]
        if unknown:
            self.learn(unknown)
        starts = [m.start() for m in re.finditer(r"[av]*a[av]*", text.translate(self.kinds))]  # a run of only
        # dropped characters is no word for FTS5, and must not become one (the key alone)
        return search_key(owner).join([text[a:b] for a, b in zip([0] + starts, starts + [len(text)])])

    def learn(self, chars):
        """Ask the tokenizer what these characters are: part of a word if "a?b" is one token, dropped if "?" is none."""
        with self.lock:
            self.probe.execute("DELETE FROM t")
            self.probe.executemany("INSERT INTO t (rowid, x) VALUES (?, ?)",
                                   [row for c in chars for row in ((2 * ord(c), f"a{c}b"), (2 * ord(c) + 1, c))])
            tokens = dict(self.probe.execute("SELECT doc, count(*) FROM v GROUP BY doc"))
            self.kinds.update({ord(c): " " if tokens.get(2 * ord(c)) != 1 else "a" if tokens.get(2 * ord(c) + 1)
                               else "v" for c in chars})


search_terms = SearchTerms()


def redact_url(text):
    """Text with the password of any postgresql:// or redis:// URL blanked out (it must never reach a log)."""
    return re.sub(r"((?:postgres(?:ql)?|rediss?)://[^:/@\s]*:)[^@\s]*@", r"\1[redacted]@", text)


def open_database(path, url):
    """The database chosen once at start-up: PostgreSQL for CHAT_DATABASE_URL, else the SQLite file."""
    if url and url.startswith(("postgresql://", "postgres://")):
        from chat_scale import PostgresDatabase  # only when configured: it needs psycopg (requirements-scale.txt)
        return PostgresDatabase(url)
    return SQLiteDatabase(path)


Upload = collections.namedtuple("Upload", "name type data")  # one attached file, checked (check_upload)

DB_SIZE_EVERY = 5.0  # seconds: how often the database's size is measured again, for CHAT_MAX_DB_MB
OWNER_USAGE_EVERY = 10.0  # seconds an owner's measured usage may stand, for CHAT_OWNER_QUOTA (see Store.under_quota)
TRASH_SECONDS = 3600  # a deleted conversation can be restored (Undo) this long; then the next delete or the
# hourly housekeeping purges it


class Store:
    """Conversations and messages: the same statements on SQLite or PostgreSQL (the database says where they differ)."""

    def __init__(self, path=None, url=None):
        self.path, self.url = path, url
        self._db = None
        self.opening = gevent.lock.Semaphore()
        self.secrets = {}
        self.db_size, self.measured_at = 0, None  # the database's size in bytes, and when it was measured
        self.usage = {}  # owner -> (when measured, bytes, sends since): see under_quota

    @property
    def db(self):
        """The database, opened and migrated on first use (SQLite, or PostgreSQL with CHAT_DATABASE_URL)."""
        if self._db is None:
            with self.opening:  # the first requests arrive together: one of them opens and migrates
                if self._db is None:
                    self._db = open_database(self.path or settings.db, self.url or settings.database_url)
        return self._db

    @property
    def errors(self):
        """What a failing database raises, for `except`: the open database's (SQLite's until one is open)."""
        return self._db.errors if self._db is not None else SQLiteDatabase.errors

    def close(self):
        """Close the connection (a later use reopens it)."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def secret(self, name):
        """A random secret kept in the database (for signing cookies), made on first use."""
        if name not in self.secrets:
            self.db.execute("INSERT INTO secrets VALUES (?, ?) ON CONFLICT DO NOTHING", (name, secrets.token_hex(32)))
            self.secrets[name] = self.db.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0]
        return self.secrets[name]

    def owner_usage(self, owner):
        """Bytes of text and attachments this owner's conversations hold (for the per-owner quota; the trash's are
        not counted: deleting makes room at once)."""
        size = self.db.byte_length
        text = self.db.execute(f"SELECT COALESCE(SUM({size.format('m.content')} + {size.format('m.reasoning')}), 0) "
                               "FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                               "WHERE c.owner = ? AND c.deleted IS NULL", (owner,)).fetchone()[0]
        files = self.db.execute(f"SELECT COALESCE(SUM({size.format('a.data')}), 0) FROM attachments a "
                                "JOIN messages m ON m.id = a.message_id JOIN conversations c ON c.id = m.conversation_id "
                                "WHERE c.owner = ? AND c.deleted IS NULL", (owner,)).fetchone()[0]
        return text + files

    def under_quota(self, owner, quota, allowance):
        """True if this owner's conversations hold less than quota bytes. A measurement (it reads every byte the owner
        has: ~30 ms at 100 MB, on the connection everyone shares) stands for OWNER_USAGE_EVERY seconds while it would
        stay under even if every send since added allowance bytes; else the owner is measured again."""
        now = time.monotonic()
        at, used, sends = self.usage.get(owner, (None, 0, 0))
        if at is None or now - at >= OWNER_USAGE_EVERY or used + (sends + 1) * allowance >= quota:
            at, used, sends = now, self.owner_usage(owner), 0
        if len(self.usage) >= 10_000:
            self.usage.clear()  # a bound, not a cache policy: everyone is measured again
        self.usage[owner] = (at, used, sends + 1)
        return used < quota

    def full(self):
        """True when the database has outgrown CHAT_MAX_DB_MB (measured at most every DB_SIZE_EVERY seconds)."""
        now = time.monotonic()
        if self.measured_at is None or now - self.measured_at >= DB_SIZE_EVERY:
            self.measured_at = now  # first: the sends arriving meanwhile use the last size, not measure again
            self.db_size = self.db.size()
        return self.db_size >= settings.max_db_mb * 2**20

    def owner_exists(self, owner):
        """True if this owner has any conversation."""
        return self.db.execute("SELECT 1 FROM conversations WHERE owner = ? LIMIT 1", (owner,)).fetchone() is not None

    def add_session(self, token_hash, tag, expires, user_name=None, agent=None):
        """Remember a login (an account's, with user_name: it keeps its newest MAX_USER_SESSIONS)."""
        now = time.time()
        self.db.execute("INSERT INTO sessions (token_hash, password_tag, expires, user_name, created, seen, agent) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (token_hash, tag, expires, user_name, now, now, agent))
        if user_name is not None:
            self.db.execute("DELETE FROM sessions WHERE user_name = ? AND token_hash NOT IN (SELECT token_hash FROM "
                            "sessions WHERE user_name = ? ORDER BY created DESC LIMIT ?)",
                            (user_name, user_name, MAX_USER_SESSIONS))

    def session_valid(self, token_hash, tag):
        """True if this login exists, is unexpired, and was made under the current password."""
        return self.db.execute("SELECT 1 FROM sessions WHERE token_hash = ? AND password_tag = ? AND expires > ?",
                               (token_hash, tag, time.time())).fetchone() is not None

    def delete_session(self, token_hash):
        """Forget a login (log out)."""
        self.db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash,))

    # -- accounts (CHAT_AUTH=accounts, CHAT_AUTH_HEADER)

    def user(self, name):
        """The account of this (lower-case) name, or None."""
        return self.db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()

    def is_account_owner(self, owner):
        """True if this owner id is an account's (an anonymous browser's is not)."""
        return self.db.execute("SELECT 1 FROM users WHERE owner = ?", (owner,)).fetchone() is not None

    def add_user(self, name, password_hash):
        """Make an account (the caller checked that the name is free); returns it."""
        self.db.execute("INSERT INTO users (name, owner, password_hash, created) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT DO NOTHING", (name, secrets.token_urlsafe(24), password_hash, time.time()))
        return self.user(name)

    def users(self):
        """Every account with its number of conversations, by name."""
        return self.db.execute("SELECT u.name, u.created, u.password_hash IS NOT NULL AS has_password, "
                               "(SELECT COUNT(*) FROM conversations c WHERE c.owner = u.owner) AS conversations "
                               "FROM users u ORDER BY u.name").fetchall()

    def set_password(self, name, password_hash):
        """Change an account's password and end all of its sessions."""
        with self.transaction():
            self.db.execute("UPDATE users SET password_hash = ? WHERE name = ?", (password_hash, name))
            self.db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))

    def delete_user(self, name):
        """Delete an account, its sessions and its conversations; returns how many conversations went."""
        user = self.user(name)
        if user is None:
            return None
        with self.transaction():
            gone = self.db.execute("DELETE FROM conversations WHERE owner = ?", (user["owner"],)).rowcount
            self.db.execute("DELETE FROM owner_settings WHERE owner = ?", (user["owner"],))
            self.db.execute("DELETE FROM presets WHERE owner = ?", (user["owner"],))
            self.db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))
            self.db.execute("DELETE FROM users WHERE name = ?", (name,))
        return gone

    def account_session(self, token_hash):
        """(user name, owner, last seen) of a live account session, or None."""
        return self.db.execute("SELECT u.name, u.owner, s.seen FROM sessions s JOIN users u ON u.name = s.user_name "
                               "WHERE s.token_hash = ? AND s.expires > ?", (token_hash, time.time())).fetchone()

    def session_seen(self, token_hash):
        """Note that a session was just used (shown in its user's list)."""
        self.db.execute("UPDATE sessions SET seen = ? WHERE token_hash = ?", (time.time(), token_hash))

    def user_sessions(self, name):
        """An account's live sessions, most recently used first."""
        return self.db.execute("SELECT token_hash, created, seen, agent FROM sessions WHERE user_name = ? "
                               "AND expires > ? ORDER BY seen DESC", (name, time.time())).fetchall()

    def end_sessions(self, name):
        """Sign an account out everywhere."""
        self.db.execute("DELETE FROM sessions WHERE user_name = ?", (name,))

    def adopt(self, old_owner, new_owner):
        """Give an anonymous owner's conversations to an account (its first sign-in); returns how many moved."""
        with self.transaction():
            ids = [row[0] for row in self.db.execute("SELECT id FROM conversations WHERE owner = ?",
                                                     (old_owner,)).fetchall()]
            if ids:  # `title = title` re-keys the title's search entry for the new owner (SQLite's trigger)
                self.db.execute("UPDATE conversations SET owner = ?, title = title WHERE owner = ?",
                                (new_owner, old_owner))
                self.db.executemany(self.db.owner_moved, [(conversation_id,) for conversation_id in ids])
            self.db.execute("INSERT INTO owner_settings (owner, system_prompt) SELECT ?, system_prompt "
                            "FROM owner_settings WHERE owner = ? ON CONFLICT (owner) DO NOTHING",
                            (new_owner, old_owner))
            self.db.execute("DELETE FROM owner_settings WHERE owner = ?", (old_owner,))
            self.db.execute("INSERT INTO presets SELECT ?, name, model, system_prompt, temperature, top_p, max_tokens, "
                            "created FROM presets WHERE owner = ? ON CONFLICT (owner, name) DO NOTHING",
                            (new_owner, old_owner))
            self.db.execute("DELETE FROM presets WHERE owner = ?", (old_owner,))
        return len(ids)

    # -- attachments

    def add_attachments(self, message_id, files):
        """Keep a message's attachments (Upload each); returns their ids."""
        rows = [(secrets.token_urlsafe(16), message_id, f.name, f.type, f.data, time.time()) for f in files]
        if rows:
            self.db.executemany("INSERT INTO attachments (id, message_id, name, type, data, created) "
                                "VALUES (?, ?, ?, ?, ?, ?)", rows)
        return [row[0] for row in rows]

    def attachments(self, message_ids, data=False):
        """The attachments of these messages, in the order attached: {message id: [rows]}; with their bytes
        when data is True, only text files' when it is "text"."""
        found = {}
        ids = list(message_ids)
        column = {True: "data", False: "NULL AS data", "text": "CASE WHEN type = 'text/plain' THEN data END AS data"}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self.db.execute(
                f"SELECT id, message_id, name, type, {column[data]}, "
                f"{self.db.byte_length.format('data')} AS size FROM attachments "
                f"WHERE message_id IN ({', '.join('?' * len(chunk))}) ORDER BY created, id", chunk).fetchall()
            for row in rows:
                found.setdefault(row["message_id"], []).append(
                    {name: row[name] for name in ("id", "message_id", "name", "type", "data", "size")})
        return found

    def attachment_data(self, attachment_ids):
        """(id, data) of these attachments."""
        ids = list(attachment_ids)
        return self.db.execute(f"SELECT id, data FROM attachments WHERE id IN ({', '.join('?' * len(ids))})",
                               ids).fetchall()

    def import_conversation(self, owner, c):
        """Store a conversation checked by imported(), as a new one of this owner; returns its id."""
        conversation_id, ids = secrets.token_urlsafe(12), {}
        with self.transaction():
            self.db.execute("INSERT INTO conversations (id, owner, title, system_prompt, model, created, updated, "
                            "temperature, top_p, max_tokens) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (conversation_id, owner, c["title"], c["system_prompt"], c["model"], c["created"],
                             time.time(), c["temperature"], c["top_p"], c["max_tokens"]))
            for m in c["messages"]:
                ids[m["id"]] = self.db.execute(
                    "INSERT INTO messages (conversation_id, parent_id, role, content, reasoning, status, error, notes, "
                    "footer, finish_reason, usage, model, elapsed, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                    (conversation_id, ids.get(m["parent_id"]), m["role"], m["content"], m["reasoning"], m["status"],
                     m["error"], m["notes"], m["footer"], m["finish_reason"], m["usage"], m["model"], m["elapsed"],
                     m["created"])).fetchone()[0]
                self.add_attachments(ids[m["id"]], m["files"])
            tree = Tree(self.messages(conversation_id))
            self.db.execute("UPDATE conversations SET leaf_id = ? WHERE id = ?",
                            (ids.get(c["leaf"]) or tree.newest_leaf(), conversation_id))
        return conversation_id

    def copy_attachments(self, from_message, to_message):
        """Give an edited question the attachments of the one it replaces."""
        for row in self.attachments([from_message], data=True).get(from_message, []):
            self.add_attachments(to_message, [Upload(row["name"], row["type"], bytes(row["data"]))])

    def attachment(self, attachment_id, owner=None, conversation_id=None):
        """One attachment with its bytes, if this owner's conversation (or this shared one) holds it; else None."""
        return self.db.execute("SELECT a.name, a.type, a.data FROM attachments a "
                               "JOIN messages m ON m.id = a.message_id JOIN conversations c ON c.id = m.conversation_id "
                               "WHERE a.id = ? AND (c.owner = ? OR c.id = ?) AND c.deleted IS NULL",  # = NULL: never
                               (attachment_id, owner, conversation_id)).fetchone()

    # -- shared links

    def add_share(self, conversation_id):
        """A new read-only link to a conversation; returns its token."""
        token = secrets.token_urlsafe(16)
        self.db.execute("INSERT INTO shares (token, conversation_id, created) VALUES (?, ?, ?)",
                        (token, conversation_id, time.time()))
        return token

    def shares(self, conversation_id):
        """The tokens of a conversation's links, oldest first."""
        return [row[0] for row in self.db.execute("SELECT token FROM shares WHERE conversation_id = ? "
                                                  "ORDER BY created, token", (conversation_id,)).fetchall()]

    def revoke_share(self, token, conversation_id):
        """Delete one of a conversation's links."""
        self.db.execute("DELETE FROM shares WHERE token = ? AND conversation_id = ?", (token, conversation_id))

    def shared_conversation(self, token):
        """The conversation a link shows (not one in the trash), or None."""
        return self.db.execute("SELECT c.* FROM shares s JOIN conversations c ON c.id = s.conversation_id "
                               "WHERE s.token = ? AND c.deleted IS NULL", (token,)).fetchone()

    def expire(self, now, keep_seconds=None):
        """Delete expired sessions, the trash's old conversations and, with a retention period, those untouched
        for longer."""
        self.db.execute("DELETE FROM sessions WHERE expires <= ?", (now,))
        self.purge_trash(now)
        if keep_seconds:
            return self.db.execute("DELETE FROM conversations WHERE updated < ?", (now - keep_seconds,)).rowcount
        return 0

    def create_conversation(self, owner, title, system_prompt="", model=None):
        """A new conversation; returns its id."""
        conversation_id, now = secrets.token_urlsafe(12), time.time()
        self.db.execute("INSERT INTO conversations (id, owner, title, system_prompt, model, created, updated) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (conversation_id, owner, title, system_prompt, model, now, now))
        return conversation_id

    def conversation(self, conversation_id, owner, trashed=False):
        """The conversation if this owner has it (in the trash with trashed=True), else None."""
        return self.db.execute(f"SELECT * FROM conversations WHERE id = ? AND owner = ? "
                               f"AND deleted IS {'NOT ' if trashed else ''}NULL", (conversation_id, owner)).fetchone()

    def conversations(self, owner):
        """This owner's conversations but those in the trash, newest first."""
        return self.db.execute("SELECT id, title, updated, pinned, archived FROM conversations WHERE owner = ? "
                               "AND deleted IS NULL ORDER BY updated DESC", (owner,)).fetchall()

    def update_conversation(self, conversation_id, **fields):
        """Change the title, system prompt, model, parameters or leaf shown, and mark the conversation as just used."""
        assert set(fields) <= {"title", "system_prompt", "model", "leaf_id", *PARAMETERS}
        columns = "".join(f"{name} = ?, " for name in fields)
        self.db.execute(f"UPDATE conversations SET {columns}updated = ? WHERE id = ?",
                        (*fields.values(), time.time(), conversation_id))

    def mark(self, conversation_id, column, on):
        """Pin, archive or trash a conversation (since now), or undo that; it keeps its place in time (`updated`)."""
        assert column in ("pinned", "archived", "deleted")
        self.db.execute(f"UPDATE conversations SET {column} = ? WHERE id = ?",
                        (time.time() if on else None, conversation_id))

    def delete_conversation(self, conversation_id):
        """Put a conversation in the trash, and empty the trash of what has been there long enough."""
        self.mark(conversation_id, "deleted", True)
        self.purge_trash(time.time())

    def purge_trash(self, now):
        """Delete for good the conversations (their messages too) put in the trash TRASH_SECONDS ago or more."""
        return self.db.execute("DELETE FROM conversations WHERE deleted <= ?", (now - TRASH_SECONDS,)).rowcount

    def messages(self, conversation_id):
        """Every message of a conversation, every branch, in order of writing."""
        return self.db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY id",
                               (conversation_id,)).fetchall()

    def add_message(self, conversation_id, role, content="", status="done", parent_id=None):
        """Add a message under parent_id (None: first) and show its branch; streaming gets a lease. Returns its id."""
        now = time.time()
        lease = now + settings.lease_seconds if status == "streaming" else None
        message_id = self.db.execute(
            "INSERT INTO messages (conversation_id, role, content, status, created, parent_id, lease_until) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (conversation_id, role, content, status, now, parent_id, lease)).fetchone()[0]
        self.update_conversation(conversation_id, leaf_id=message_id)
        return message_id

    def renew_leases(self, message_ids, until):
        """Renew the leases of the answers this process is writing."""
        if message_ids:
            self.db.executemany("UPDATE messages SET lease_until = ? WHERE id = ? AND status = 'streaming'",
                                [(until, message_id) for message_id in message_ids])

    def expire_leases(self, now):
        """Mark interrupted the answers whose writer stopped renewing their lease (it died); their text stays."""
        return self.db.execute("UPDATE messages SET status = 'interrupted', notes = ? WHERE status = 'streaming' "
                               "AND (lease_until IS NULL OR lease_until < ?)",
                               (json.dumps([NOTES["interrupted"]]), now)).rowcount

    def siblings(self, message_id):
        """The ids of a message and its alternatives (same parent), oldest first."""
        return [row[0] for row in self.db.execute(
            "SELECT s.id FROM messages m JOIN messages s ON s.conversation_id = m.conversation_id "
            f"AND s.parent_id {self.db.null_safe_equal} m.parent_id WHERE m.id = ? ORDER BY s.id",
            (message_id,)).fetchall()]

    def owner_system_prompt(self, owner):
        """The system prompt this browser saved for new chats ('' if none)."""
        row = self.db.execute("SELECT system_prompt FROM owner_settings WHERE owner = ?", (owner,)).fetchone()
        return row[0] if row else ""

    def save_owner_system_prompt(self, owner, system_prompt):
        """Remember a system prompt for this browser's new chats."""
        self.db.execute("INSERT INTO owner_settings (owner, system_prompt) VALUES (?, ?) "
                        "ON CONFLICT (owner) DO UPDATE SET system_prompt = excluded.system_prompt",
                        (owner, system_prompt))

    def presets(self, owner):
        """This owner's presets by name."""
        return self.db.execute("SELECT * FROM presets WHERE owner = ? ORDER BY name", (owner,)).fetchall()

    def save_preset(self, owner, name, fields):
        """Save (or replace) a named preset: model, system_prompt and the PARAMETERS."""
        self.db.execute("INSERT INTO presets (owner, name, model, system_prompt, temperature, top_p, max_tokens, "
                        "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (owner, name) DO UPDATE SET "
                        "model = excluded.model, system_prompt = excluded.system_prompt, temperature = "
                        "excluded.temperature, top_p = excluded.top_p, max_tokens = excluded.max_tokens",
                        (owner, name, fields["model"], fields["system_prompt"], *(fields[n] for n in PARAMETERS),
                         time.time()))

    def delete_preset(self, owner, name):
        """Delete one of this owner's presets."""
        self.db.execute("DELETE FROM presets WHERE owner = ? AND name = ?", (owner, name))

    def reopen_answer(self, message_id, conversation_id):
        """Mark a stored answer streaming again (Continue writes on into it), with a lease."""
        self.db.execute("UPDATE messages SET status = 'streaming', lease_until = ? WHERE id = ? AND conversation_id = ?",
                        (time.time() + settings.lease_seconds, message_id, conversation_id))
        self.update_conversation(conversation_id)

    def search(self, owner, words, limit=20):
        """This owner's titles, then each conversation's best message, containing every word (as a prefix), best
        first."""
        return self.db.search(owner, words, limit) if words else []

    def answer_text(self, message_id, conversation_id):
        """(content, reasoning, status) of an answer, or None."""
        return self.db.execute("SELECT content, reasoning, status FROM messages WHERE id = ? AND conversation_id = ?",
                               (message_id, conversation_id)).fetchone()

    def save_partials(self, partials):
        """Save the text of answers still streaming and renew their leases: (text, reasoning, lease, id, conv. id)."""
        if partials:
            self.db.executemany("UPDATE messages SET content = ?, reasoning = ?, lease_until = ? "
                                "WHERE id = ? AND conversation_id = ? AND status = 'streaming'", partials)

    def transaction(self):
        """A transaction: the statements inside commit together, or not at all."""
        return self.db.transaction()

    def finish_answer(self, message_id, answer):
        """Save a finished answer with everything its bubble shows."""
        if message_id is None:
            return
        self.db.execute(
            "UPDATE messages SET content = ?, reasoning = ?, status = ?, error = ?, notes = ?, footer = ?, "
            "finish_reason = ?, usage = ?, model = ?, elapsed = ? WHERE id = ? AND conversation_id = ?",
            (answer["text"], answer["reasoning"], answer["status"], answer["error"], json.dumps(answer["notes"]),
             answer["footer"], answer["finish_reason"], json.dumps(answer["usage"]) if answer["usage"] else None,
             answer["model"], answer["elapsed"], message_id, answer["conversation_id"]))


store = Store()


def stored_answer(row):
    """A stored assistant message as its answer record."""
    return make_answer(f"m{row['id']}", row["conversation_id"], row["content"], row["reasoning"], row["status"],
                       row["error"], json.loads(row["notes"] or "[]"), row["footer"], row["finish_reason"],
                       created=row["created"], message_id=row["id"])


PARAMETERS = ("temperature", "top_p", "max_tokens")  # per conversation: None means the default


class Tree:
    """A conversation's messages as a tree: each hangs from the one before it on its branch."""

    def __init__(self, rows):
        self.rows = {row["id"]: row for row in rows}
        self.children = {}  # parent id (None: first messages) -> child ids, oldest first
        for row in rows:
            self.children.setdefault(row["parent_id"], []).append(row["id"])

    def newest_leaf(self, message_id=None):
        """The leaf reached from message_id (None: the top) by always taking the newest child."""
        while self.children.get(message_id):
            message_id = self.children[message_id][-1]
        return message_id

    def path(self, leaf_id):
        """The messages from the first one down to leaf_id."""
        path = []
        while leaf_id in self.rows:
            path.append(self.rows[leaf_id])
            leaf_id = self.rows[leaf_id]["parent_id"]
        return path[::-1]

    def siblings(self, row):
        """The ids of this message and its alternatives (edits, regenerations), oldest first."""
        return self.children.get(row["parent_id"], [row["id"]])


def branch(conversation, at=None):
    """(tree, path) of the branch shown: the one through message `at` if given, else the conversation's leaf."""
    tree = Tree(store.messages(conversation["id"]))
    if at in tree.rows:
        leaf = tree.newest_leaf(at)
    elif conversation["leaf_id"] in tree.rows:
        leaf = conversation["leaf_id"]
    else:
        leaf = tree.newest_leaf()
    return tree, tree.path(leaf)


def sibling_nav(conversation_id, message_id):
    """‹ n/m › for a message with other versions ('' if it has none, or is not stored)."""
    if message_id is None:
        return ""
    ids = store.siblings(message_id)
    if len(ids) < 2:
        return ""
    return template("siblings", conversation_id=conversation_id, ids=ids, position=ids.index(message_id))


def conversation_params(conversation):
    """The sampling parameters to send: the conversation's own, else the environment's defaults."""
    return {name: (conversation[name] if conversation and conversation[name] is not None
                   else getattr(settings, name)) for name in PARAMETERS}


IMAGE_CHARS = 4000  # what an image counts for against the context (about 1,000 tokens, as vision models bill it)


def content_length(content):
    """Characters a message's content counts for: its text, and IMAGE_CHARS for each image part."""
    if isinstance(content, str):
        return len(content)
    return sum(len(part.get("text", "")) if part.get("type") == "text" else IMAGE_CHARS for part in content)


def with_files(text, files):
    """A question's content as sent upstream: text files appended to its text, images as content parts."""
    for f in files:
        if f["type"] == "text/plain":
            body = bytes(f["data"]).decode("utf-8", "replace")
            fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", body)), default=0))
            text += f"\n\n{f['name']}:\n{fence}\n{body}\n{fence}"
    images = [f for f in files if f["type"] != "text/plain"]
    if not images:
        return text
    return [{"type": "text", "text": text}] + [
        {"type": "image_url", "image_url": {"url": f"data:{f['type']};base64,{base64.b64encode(bytes(f['data'])).decode()}"}}
        if f["data"] is not None else {"type": "text", "text": f"(an earlier image, {f['name']}, not sent again)"}
        for f in images]


def upstream_history(conversation, rows, files=None):
    """What goes upstream: the system prompt, then user and assistant strictly alternating, ending with a question."""
    turns = []  # strictly alternating: Mistral's, Gemma's and Llama 2's templates refuse one role twice in a row
    for row in rows:
        if row["role"] == "user":
            if turns and turns[-1]["role"] == "user":
                turns.pop()  # unanswered: the next question usually repeats it
            turns.append({"role": "user", "content": with_files(row["content"], files.get(row["id"], []) if files else [])})
        elif row["role"] == "assistant" and row["content"].strip() and turns and turns[-1]["role"] == "user":
            turns.append({"role": "assistant", "content": row["content"]})
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    system = [{"role": "system", "content": conversation["system_prompt"]}] if conversation["system_prompt"] else []
    return system + turns


def export_markdown(conversation, rows):
    """A conversation as a Markdown document."""
    out = [f"# {conversation['title']}", ""]
    if conversation["system_prompt"]:
        out += ["**System prompt**", "", conversation["system_prompt"], ""]
    for row in rows:
        out += [f"## {'You' if row['role'] == 'user' else 'Assistant'}", "", row["content"], ""]
        if row["role"] == "assistant" and row["status"] not in ("done", "streaming"):
            out += [f"*({row['status']}{': ' + row['error'] if row['error'] else ''})*", ""]
    return "\n".join(out)


def export_json(conversation, rows, files):
    """A conversation as plain data: every message of every branch (id and parent_id make the tree), attachments in
    base64; POST /import reads it back."""
    return {"format": "chat.py conversation", "id": conversation["id"], "title": conversation["title"],
            "system_prompt": conversation["system_prompt"], "model": conversation["model"],
            "created": conversation["created"], "updated": conversation["updated"],
            "shown_leaf_id": conversation["leaf_id"], **{name: conversation[name] for name in PARAMETERS},
            "messages": [{"id": r["id"], "parent_id": r["parent_id"], "role": r["role"], "content": r["content"],
                          "reasoning": r["reasoning"], "status": r["status"], "error": r["error"],
                          "finish_reason": r["finish_reason"], "usage": json.loads(r["usage"]) if r["usage"] else None,
                          "model": r["model"], "created": r["created"], "notes": json.loads(r["notes"] or "[]"),
                          "footer": r["footer"], "elapsed": r["elapsed"],
                          "attachments": [{"name": f["name"], "type": f["type"],
                                           "data": base64.b64encode(bytes(f["data"])).decode()}
                                          for f in files.get(r["id"], [])]} for r in rows]}


# ---------------------------------------------------------------------------
# Streams and the relay: the registry of answers, the journal, and the greenlet that reads the upstream
# ---------------------------------------------------------------------------

BUSY_CONVERSATION = "An answer is still being written in this conversation; wait for it, or stop it."
TOO_MANY_READERS = "Too many open readers for this answer; close a tab and reload."


def too_many_streams():
    """The sentence for a send past CHAT_STREAMS_PER_OWNER."""
    return (f"You already have {settings.streams_per_owner} answers streaming; "
            "wait for one to finish or stop one.")


class Refused(Exception):
    """A send the limits refuse: an HTTP status and a sentence for the person."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


CONTROL = dict.fromkeys([*range(0, 9), 11, 12, *range(14, 32), 127])  # C0 controls but tab, LF and CR

_FENCE = re.compile(r" {0,3}(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r" {0,3}([-+*]|\d{1,9}[.)])([ \t]|$)")
_HEADING = re.compile(r" {0,3}#{1,6}([ \t]|$)")
_LIST_START = re.compile(r"\d{1,9}[.)]?|[-+*]")  # what could still become a list item


class MarkdownBlocks:
    """Where the streamed answer's top-level Markdown blocks end, so that each is rendered once, when complete."""

    def __init__(self):
        self.partial = []    # pieces of the line being received
        self.lines = []      # the complete lines of the block being built
        self.kind = None     # "list", "fence" or "text" once the block has its first line
        self.fence = None    # the opening marker, inside a fenced block
        self.ended = False   # a blank line came: the next non-blank line decides
        self.text = False    # the block being built has a non-blank line
        self.head = ""       # the first few characters of the partial line (what decides a blank's fate)
        self.offset = 0      # UTF-8 bytes of the answer covered by the blocks so far

    def feed(self, text):
        """Take a piece of answer text; return the texts of the blocks it completed (often none)."""
        done = []
        *complete, rest = text.split("\n")
        for piece in complete:
            self.partial.append(piece)
            line, self.partial, self.head = "".join(self.partial) + "\n", [], ""
            done.extend(self.line(line))
        if rest:
            self.partial.append(rest)
            if len(self.head) < 4:
                self.head = (self.head + rest)[:4]
            head = self.head  # after a blank line, the first characters decide whether the block ended
            if self.ended and self.kind != "fence" and head.strip() and head[:1] not in " \t" and not (
                    self.kind == "list" and (_LIST_ITEM.match(head) or _LIST_START.fullmatch(head))):
                done.append(self.flush())
        return done

    def line(self, line):
        """Take one complete line; return the blocks it completed."""
        done = []
        if self.kind == "fence":
            self.lines.append(line)
            marker = _FENCE.match(line)
            if marker and marker.group(1)[0] == self.fence[0] and len(marker.group(1)) >= len(self.fence) \
                    and not line.strip()[len(marker.group(1)):]:
                done.append(self.flush())
            return done
        blank = not line.strip()
        if self.ended and not blank:
            if not (line[:1] in " \t" or (self.kind == "list" and _LIST_ITEM.match(line))):
                done.append(self.flush())
            self.ended = False
        fence = None if blank or self.kind == "list" else _FENCE.match(line)
        heading = not blank and self.kind != "list" and _HEADING.match(line)
        if (fence or heading) and self.text:
            done.append(self.flush())  # both may interrupt a paragraph: the paragraph is complete
        self.lines.append(line)
        if blank:
            self.ended = self.text
        else:
            self.text = True
        if not blank and self.kind is None:
            self.kind = "fence" if fence else "list" if _LIST_ITEM.match(line) else "text"
            if fence:
                self.fence = fence.group(1)
            elif heading:
                done.append(self.flush())
        return done

    def flush(self):
        """End the block being built (the line that ended it is not part of it); return its text."""
        text = "".join(self.lines)
        self.lines, self.kind, self.fence, self.ended, self.text = [], None, None, False, False
        self.offset += len(text.encode())
        return text


class AnswerLog:
    """Every event of an answer, its text kept once as UTF-8: frames are made again for a reader that reconnects."""

    KINDS = ("message", "reasoning", "block")

    def __init__(self, stream_id):
        self.stream_id = stream_id
        self.text = {"message": bytearray(), "reasoning": bytearray()}
        self.kinds = bytearray()    # event N's kind is KINDS[kinds[N-1]]
        self.ends = array.array("I")  # event N ends at ends[N-1] in its text (a block: in the message text)
        self.done = None            # the final frame, once the answer is finished

    def __len__(self):
        return len(self.kinds) + (self.done is not None)

    def append(self, kind, text):
        """Log one token; returns its event id."""
        buffer = self.text[kind]
        buffer += text.encode()
        self.kinds.append(self.KINDS.index(kind))
        self.ends.append(len(buffer))
        return len(self.kinds)

    def append_block(self, end):
        """Log a finished Markdown block ending at byte end of the message text; returns its event id."""
        self.kinds.append(2)
        self.ends.append(end)
        return len(self.kinds)

    def joined(self, kind):
        """All the text of one kind so far."""
        return self.text[kind].decode()

    def entries(self, after, upto, starts=None):
        """Yield (event id, kind, text, tail) after..upto; starts: where each kind's text stood after `after`."""
        if starts is None:
            starts, first = {"message": 0, "reasoning": 0, "block": 0}, 0
        else:
            first = after
        for index in range(first, upto):
            kind, end = self.KINDS[self.kinds[index]], self.ends[index]
            start, starts[kind] = starts[kind], end
            if index < after:
                continue
            if kind == "block":
                message = self.text["message"]
                yield index + 1, kind, message[start:end].decode(), message[end:starts["message"]].decode()
            else:
                yield index + 1, kind, self.text[kind][start:end].decode(), None

    def frames(self, after, upto, batch=1 << 16):
        """Yield the frames of events after..upto in writes of about batch bytes (blocks are rendered again)."""
        pending, size, busy = [], 0, TurnShare()
        for event_id, kind, text, tail in self.entries(after, upto):
            busy.give_way_if_due()  # a long replay gives way to live tokens
            if kind == "block":
                frame = block_frame(self.stream_id, render_block(text), tail, event_id)
            else:
                frame = token_frame(kind, text, event_id)
            pending.append(frame)
            size += len(frame)
            if size >= batch:
                yield b"".join(pending)
                pending, size = [], 0
        if pending:
            yield b"".join(pending)


def token_frame(kind, text, event_id):
    """The frame of one token: its text escaped in a <span>."""
    return sse_frame(kind, "<span>" + html.escape(text, quote=False) + "</span>", event_id)


def block_frame(stream_id, block_html, tail, event_id):
    """The frame of a finished block: appended rendered, while the plain-text tail is replaced (out of band)."""
    return sse_frame("block", f'<div class="md-block" hx-disable>{block_html}</div>'
                              f'<div hx-swap-oob="innerHTML:#tail-{stream_id}"><span>'
                              f'{html.escape(tail, quote=False)}</span></div>', event_id)


# The unfinished block is sent rendered too ("tail" events, no id: not logged, never replayed) when a token may change
# its Markdown (a mark, a new line), up to TAIL_LIMIT bytes (past that it stays plain until it ends), at most every
# TAIL_EVERY seconds or TAIL_SHARE times what the last render took. An open fence is rendered by its first line: its
# code goes on as plain text inside the code box until the fence closes.
TAIL_LIMIT, TAIL_EVERY, TAIL_SHARE = 2048, 0.2, 50
TAIL_MARKS = re.compile(r"[*_`~$\\)\n]")  # what may open or close Markdown (one class: 0.1 µs, alternatives 0.7)
_TAIL_END = re.compile(r"(?:</code>(?=</pre>))?(?:</(?:p|li|h\d|blockquote|[ou]l|t[dhr]|t(?:head|body)|table|pre|div)>"
                       r"\s*)*$")
_BARE_MARKER = re.compile(r"[ \t]*(?:[-+*>#=_|`~]+|\d{1,9}[.)]?)?[ \t]*")  # a line that is no more than a mark yet


def tail_frame(text, fence=None):
    """The tail event of an unfinished block (fence: its opening marker, if it is one): its HTML, ending in a
    "tail-end" span, inside the last paragraph, item or code box, where the tokens after it go on; or None."""
    if fence:
        cut = text.index("\n", text.index(fence)) + 1
        source, rest = text[:cut], text[cut:]
    else:  # a last line that is a mark alone, or an opening fence, waits: "1." or "```py" is not shown raw
        line = text.rfind("\n") + 1
        cut = line if _FENCE.match(text, line) or _BARE_MARKER.fullmatch(text, line) else len(text)
        source = text[:cut].rstrip()
        rest = text[len(source):cut]  # the spaces Markdown drops at the end, which the next token follows
    rendered = safe_markdown.__wrapped__(source, HUB_SLICE, True)  # not cached: every tail is new
    if rendered is None or rendered is TOO_SLOW:
        return None
    at = _TAIL_END.search(rendered).start()
    head = rendered[:at].removesuffix("\n") if fence else rendered[:at].rstrip("*_~`")  # no stray mark at its end
    return sse_frame("tail", f'{head}<span class="tail-end">{html.escape(rest, quote=False)}</span>{rendered[at:]}')


def storage_note(exc):
    """The sentence under an answer the store could not save."""
    if is_disk_full(exc):
        return "The server's disk is full: this answer could not be saved, and will not be there after a reload."
    return "This answer could not be saved."


def is_disk_full(exc):
    """True if a database error means the disk (or the database's size limit) is full."""
    return isinstance(exc, store.errors) and ("full" in str(exc).lower() or "no space" in str(exc).lower())


class UnsafeJournal(Exception):
    """The journal's folder is writable by others: refused at start."""


class Journal:
    """The text readers were shown but the store may not have yet, in a file (no fsync): kill -9 loses none of it."""

    RECORD = struct.Struct("<QBIIB")  # message id, kind, where the bytes go in that text, their length, len(conv id)
    KINDS = ("message", "reasoning")
    FLUSH_AT = 1 << 16  # bytes buffered before writing even with no reader waiting

    def __init__(self):
        self.folder = None
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.lock = None          # our lock file, held for our whole life; None: not open (or failed)
        self.fd = None            # the segment being written
        self.number = 0           # its number
        self.ids = set()          # message ids with records in it
        self.closed = []          # [(number, path, message ids)] of earlier segments, oldest first
        self.buffer, self.size = [], 0
        self.unsettled = set()    # finishing answers whose final save has not committed yet
        self.committed = 0        # the last segment a committed save covers

    def open(self, folder):
        """Make the folder (ours only) and take our lock, else run without a journal; refuse one others may write to."""
        self.folder = folder
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            info = os.stat(self.folder)
            if info.st_uid != os.geteuid():
                raise UnsafeJournal(f"the journal folder {self.folder} belongs to another user (uid {info.st_uid}), "
                                    "who could put text into stored answers. Fix it with: "
                                    f"chown {os.geteuid()} {self.folder} && chmod 700 {self.folder}")
            if info.st_mode & 0o022:
                raise UnsafeJournal(f"the journal folder {self.folder} can be written by other users (mode "
                                    f"{info.st_mode & 0o777:o}), who could put text into stored answers. "
                                    f"Fix it with: chmod 700 {self.folder}")
            self.lock = os.open(os.path.join(self.folder, self.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.begin_segment()
        except OSError as exc:
            log.warning("cannot keep the journal of unsaved text in %s (%s): a kill -9 may lose the last second "
                        "of answers", self.folder, exc)
            self.lock = self.fd = None

    def begin_segment(self):
        """Open the next segment file."""
        self.number += 1
        self.fd = os.open(self.segment_path(self.name, self.number), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600)

    def segment_path(self, name, number):
        """The file of one segment of a journal."""
        return os.path.join(self.folder, f"{name}.{number}")

    def write(self, stream, kind, text):
        """Log one token of a stored answer (buffered: flush() writes it before anyone is shown it)."""
        if self.fd is None or stream.message_id is None:
            return
        data, conv = text.encode(), stream.conversation_id.encode()
        end = len(stream.log.text[kind])
        self.buffer.append(self.RECORD.pack(stream.message_id, kind != "message", end - len(data), len(data),
                                            len(conv)) + conv + data)  # kind: KINDS[0] or KINDS[1]
        self.ids.add(stream.message_id)
        self.size += len(data) + 40
        if self.size >= self.FLUSH_AT:
            self.flush()

    def flush(self):
        """Write what is buffered (called before a reader is given anything)."""
        if self.buffer:
            data, self.buffer, self.size = b"".join(self.buffer), [], 0
            try:
                if os.write(self.fd, data) < len(data):
                    raise OSError("the disk filled during the write")
            except OSError as exc:  # a full disk: the answers go on, only this safety net has a hole
                log_limited("journal", "writing the journal of unsaved text failed: %s", exc)
                self.next_segment()  # a record may be cut short: the ones after it go to a new file

    def next_segment(self):
        """Close the segment being written and open the next (if even that fails, run without a journal)."""
        os.close(self.fd)
        self.closed.append((self.number, self.segment_path(self.name, self.number), self.ids))
        self.ids = set()
        try:
            self.begin_segment()
        except OSError as exc:
            log.warning("the journal of unsaved text stops (%s): a kill -9 may lose the last second of answers", exc)
            self.fd = None

    def cut(self):
        """Start a new segment as the janitor takes the text to save; returns the number of the last one."""
        if self.fd is None:
            return 0
        self.flush()
        if self.ids and self.fd is not None:
            self.next_segment()
        return self.number - 1

    def hold(self, message_id):
        """An answer is finishing: keep its text until its final save commits."""
        if self.fd is not None:
            self.unsettled.add(message_id)

    def settle(self, message_id):
        """An answer's final save committed: its text here is no longer needed."""
        if message_id in self.unsettled:
            self.unsettled.discard(message_id)
            self.saved(self.committed)

    def saved(self, upto):
        """Saves up to segment `upto` committed: delete those segments, oldest first, unless an answer is unsettled."""
        self.committed = max(self.committed, upto)
        while self.closed and self.closed[0][0] <= upto and not self.closed[0][2] & self.unsettled:
            with contextlib.suppress(OSError):
                os.unlink(self.closed.pop(0)[1])

    def take_over(self, save):
        """Hand the text of journals whose process died (lock free) to save(id, conversation id, parts); delete them."""
        if self.lock is None:
            return
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for entry in names:
            name, _, ext = entry.rpartition(".")
            if ext != "lock" or name == self.name:
                continue
            path = os.path.join(self.folder, entry)
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if os.fstat(fd).st_ino != os.stat(path).st_ino:
                    continue  # another process took it over and deleted it meanwhile
                segments = sorted((int(n.rpartition(".")[2]), n) for n in names
                                  if n.startswith(name + ".") and n.rpartition(".")[2].isdigit())
                answers = {}
                for _, segment in segments:
                    with open(os.path.join(self.folder, segment), "rb") as file:
                        self.parse(file.read(), answers)
                for (message_id, conversation_id), parts in answers.items():
                    save(message_id, conversation_id, parts)
                for _, segment in segments:
                    os.unlink(os.path.join(self.folder, segment))
                os.unlink(path)
                log.info("put back the unsaved text of %d answers from a process that died (journal %s)",
                         len(answers), name)
            except BlockingIOError:
                continue  # alive
            except (OSError, ValueError) as exc:
                log_limited("journal", "taking over the journal %s failed: %s", name, exc)
            finally:
                os.close(fd)

    def parse(self, data, answers):
        """Add a segment's records to answers {(id, conversation id): {kind: [(offset, bytes)]}}; a cut one ends it."""
        at, head = 0, self.RECORD.size
        while at + head <= len(data):
            message_id, kind, offset, length, conv_length = self.RECORD.unpack_from(data, at)
            at += head
            if at + conv_length + length > len(data) or kind >= len(self.KINDS):
                return
            conversation_id = data[at:at + conv_length].decode()
            at += conv_length
            parts = answers.setdefault((message_id, conversation_id), {})
            parts.setdefault(self.KINDS[kind], []).append((offset, data[at:at + length]))
            at += length

    def close(self, live=()):
        """At a clean exit: delete what saves made useless, keep the rest (live: answers still unsaved) for later."""
        if self.fd is not None:
            self.unsettled.update(live)
            self.cut()
            self.saved(self.number)
            if self.fd is not None:  # the segment just begun: empty
                os.close(self.fd)
                with contextlib.suppress(OSError):
                    os.unlink(self.segment_path(self.name, self.number))
            if not self.closed:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.folder, self.name + ".lock"))
            self.fd = None


def apply_records(text, parts):
    """A stored text with journal records applied: each record's bytes replace everything from its offset."""
    data = bytearray(text.encode())
    for offset, chunk in parts:
        if offset > len(data):
            break  # a gap: what follows cannot be placed (never expected: segments go oldest first)
        del data[offset:]
        data += chunk
    return data.decode(errors="replace")


PACE_EVERY = 32  # tokens between two checks of an answer's pace
PACE_BURST = 0.25  # seconds' worth of tokens an answer may relay at once (servers send in bursts too)


class Stream:
    """One answer being generated: its event log, its readers and its relay greenlet."""

    __slots__ = ("id", "history", "messages", "model", "owner", "conversation_id", "message_id", "dropped",
                 "log", "readers", "completion", "saved", "started", "first_byte_at", "first_token_at",
                 "finished_at", "last_activity", "left_at", "greenlet", "status", "error", "tokens", "resent",
                 "chars", "notes", "blocks", "bubble", "params", "told_at", "renewed_at", "budget", "budget_at", "seed",
                 "tail_at", "tail_due", "tail_timer")

    local = True  # written by this process (RemoteAnswer: by another one)

    def __init__(self, stream_id, history, model=None, owner=None, conversation_id=None, message_id=None):
        self.id = stream_id
        self.history = history        # the whole conversation, roles alternating, ending with the question
        self.messages = history       # what is sent upstream: the history, fitted to the model's context
        self.model, self.owner, self.conversation_id = model, owner, conversation_id
        self.message_id = message_id  # the answer's row in the store, flushed while it streams
        self.dropped = 0              # older turns left out to fit the context
        self.resent = None            # the context size, when the server refused and we sent again
        self.saved = 0                # how many events the store has seen
        self.log, self.blocks = AnswerLog(stream_id), MarkdownBlocks()
        self.readers = set()          # one Outlet per connected /events response (or page)
        self.completion = Completion(keep_text=False)  # the log keeps the text
        self.started = self.last_activity = self.left_at = time.monotonic()
        self.first_byte_at = None     # the upstream's first body byte: waiting ends, silence counts
        self.first_token_at = None
        self.finished_at = None       # set when finishing starts; the done frame follows
        self.greenlet = None
        self.status = "streaming"     # -> done | stopped | error | truncated | interrupted | limit
        self.error, self.tokens, self.chars = None, 0, 0
        self.notes = []               # extra sentences for the finished bubble (limits, storage)
        self.bubble = None            # the finished bubble's HTML
        self.params = {}              # temperature, top_p, max_tokens: only those set are sent
        self.told_at = 0.0            # when readers were last told how long the wait has been
        self.renewed_at = 0.0         # when the lease was last renewed without new text
        self.budget = settings.max_tokens_per_second * PACE_BURST  # tokens it may relay at once (refilled at the rate)
        self.budget_at = self.started
        self.seed = ()                # Continue: (kind, text) of the answer so far, replayed first into the log
        self.tail_at, self.tail_due, self.tail_timer = 0.0, False, None  # the next tail render; one waiting; its timer

    @property
    def finished(self):
        """True once the done event is in the log."""
        return self.log.done is not None

    def text(self, kind="message"):
        """The text shown so far of one kind (message or reasoning)."""
        return self.log.joined(kind)

    def touch(self):
        """Note that the upstream is alive (the watchdog reads this)."""
        self.last_activity = time.monotonic()
        if self.first_byte_at is None:
            self.first_byte_at = self.last_activity

    def token(self, kind, text):
        """Log one piece of answer or reasoning text and hand its frame to every connected reader."""
        text = text.translate(CONTROL)  # invisible, and they would collide with the search's own markers
        if not text:
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.tokens += 1
        self.chars += len(text)
        event_id = self.log.append(kind, text)
        streams.publish(self, event_id, kind, text)  # frames it only if someone reads
        if kind == "message":
            blocks, kind_was, head = self.blocks, self.blocks.kind, self.blocks.head
            fresh = len(head) < 4 or head[0] in " `~" and _FENCE.match(head)  # a line begins: an item, a fence...
            for block in blocks.feed(text):
                self.publish_block(block)
            if self.tail_due or blocks.kind != kind_was or blocks.kind != "fence" and (
                    fresh or TAIL_MARKS.search(text)):
                self.show_tail()
        if self.chars > settings.max_answer_chars:
            raise AnswerLimit(f"The answer reached chat.py's limit of {settings.max_answer_chars:,} "
                              "characters and was cut off there.")
        if self.tokens % PACE_EVERY == 0 and settings.max_tokens_per_second:
            self.pace(settings.max_tokens_per_second)

    def pace(self, rate):
        """Wait if the last PACE_EVERY tokens came faster than rate allows (PACE_BURST bucket): a flood waits on TCP."""
        now = time.monotonic()
        self.budget = min(rate * PACE_BURST, self.budget + (now - self.budget_at) * rate) - PACE_EVERY
        self.budget_at = now
        if self.budget < 0:
            gevent.sleep(-self.budget / rate)

    def show_tail(self, later=False):
        """Send readers the unfinished block rendered, unless too long; if one was sent just now, a bit later."""
        if later:
            self.tail_timer = None
            if not self.tail_due:
                return
        now = time.monotonic()
        if self.finished_at is not None or not streams.anyone_reading(self):
            self.tail_due = False
        elif now < self.tail_at:
            self.tail_due = True
            if self.tail_timer is None:
                self.tail_timer = gevent.spawn_later(self.tail_at - now, self.show_tail, True)
        else:
            self.tail_due = False
            frame = self.tail()
            self.tail_at = now + max(TAIL_EVERY, TAIL_SHARE * (time.monotonic() - now))
            if frame is not None:
                streams.publish(self, None, "tail", frame)

    def tail(self):
        """The tail frame of the unfinished block now, or None (too long, or it cannot be rendered)."""
        message, start, fence = self.log.text["message"], self.blocks.offset, self.blocks.kind == "fence"
        if not (fence or 0 < len(message) - start <= TAIL_LIMIT):
            return None
        return tail_frame(message[start:].decode(), fence and self.blocks.fence)

    def publish_block(self, block):
        """Render a finished Markdown block once, log where it ends, and send it with the new tail."""
        self.tail_at = 0.0  # the next block's first render goes at once
        rendered = render_block(block)
        event_id = self.log.append_block(self.blocks.offset)
        if streams.anyone_reading(self):
            tail = self.log.text["message"][self.blocks.offset:].decode()
            streams.publish(self, event_id, "block", block_frame(self.id, rendered, tail, event_id))

    def finish(self, status, error=None):
        """Publish the finished bubble as the last event; nothing is published after it."""
        if self.finished_at is not None:
            return
        self.status, self.error = status, redact(error)
        self.finished_at = time.monotonic()
        answer = answer_record(self)
        nav = ""
        streams.journal.hold(self.message_id)
        try:
            store.finish_answer(self.message_id, answer)
            streams.journal.settle(self.message_id)
            nav = sibling_nav(self.conversation_id, self.message_id)
        except store.errors as exc:
            log.error("saving the answer failed: %s; trying again every second", exc)
            streams.unsaved[self.message_id] = dict(answer)  # the janitor tries again until it is stored
            answer["notes"].append(storage_note(exc))
        self.bubble = render_answer(answer, True, nav)  # a long one in a worker thread: other streams go on
        self.log.done = sse_frame("done", self.bubble, len(self.log.kinds) + 1)
        streams.publish(self, len(self.log.kinds) + 1, "done", self.log.done)

    def partial(self, lease_until):
        """(text, reasoning, lease, message id, conversation id) if the answer grew since last saved, else None."""
        size = len(self.log.kinds)
        if self.message_id is None or size == self.saved or self.finished_at is not None:
            return None
        self.saved = size
        return self.text(), self.text("reasoning"), lease_until, self.message_id, self.conversation_id


class Streams:
    """The registry of live answers by secret id, with a janitor for pings, timeouts and cleanup: the seam between one
    process and many. This class keeps every answer in this process (and journals what readers were shown);
    chat_scale.RedisStreams shares them through Redis (CHAT_REDIS_URL), overriding what differs. Callers use this
    interface and nothing else:

      open()                         at start-up: make ready (the journal here; reach Redis there)
      reserve(owner, conversation)   hold a stream within the per-owner and global limits, or raise Refused
      begin(stream, history, ...)    start its relay greenlet; forget(stream) drops a reserved one unused
      publish(stream, id, kind, x)   hand an event to its readers; anyone_reading(stream) says if any would get one
      before_showing()               called before a reader is given text (here: flush the journal)
      events(stream_id, owner, id)   the body of GET /events: frames after id, then live ones until done
      stop_for(stream_id, owner)     Stop; stop_conversation(id) stops whatever writes that conversation
      for_message(message, conv)     the stream writing a stored answer, here or elsewhere
      readers_of(owner), open_for(owner), len(streams), get(stream_id); sweep_forever(), drain(), close()
    """

    stream_class = Stream  # what reserve() makes (RedisStreams: one that also keeps what Redis has not got yet)

    def __init__(self):
        self.by_id = {}
        self.by_owner = {}  # owner -> ids of that owner's registered streams
        self.janitor = None
        self.saving = None  # the greenlet saving partial answers, if one is under way
        self.unsaved = {}   # message id -> a finished answer whose final save failed (a full disk, a lock)
        self.journal = Journal()  # opened by check() at start: the text shown since the last save
        self.last_ping = 0.0

    def __len__(self):
        return len(self.by_id)

    def get(self, stream_id):
        """The stream with this id, or None."""
        return self.by_id.get(stream_id)

    def anyone_reading(self, stream):
        """True if a block event would reach anyone now (here: a connected reader): worth knowing before framing it."""
        return bool(stream.readers)

    def publish(self, stream, event_id, kind, payload):
        """Hand an event to the readers: a token's text (framed here) or a whole frame (block, done, status, ping)."""
        if kind in Journal.KINDS:
            self.journal.write(stream, kind, payload)
        if stream.readers:
            frame = token_frame(kind, payload, event_id) if kind in ("message", "reasoning") else payload
            for reader in stream.readers:  # idle ones at the end of the turn, after before_showing()
                reader.put(frame, kind != "done")  # done goes through the queue: it ends the reader

    def before_showing(self):
        """Called before a reader is given text: make what was published survive a kill -9 (the journal)."""
        self.journal.flush()

    def events(self, stream_id, owner, last_id):
        """The response body of GET /events: the frames after last_id, then live ones until done."""
        stream = self.by_id.get(stream_id)
        if stream is not None and stream.owner != owner:
            bottle.abort(404, "No such answer.")  # someone else's: not even a done bubble
        if stream is None:
            return [SSE_HELLO + sse_frame("done", render_missing(stream_id), 1)]
        if not stream.finished and (len(stream.readers) >= settings.readers_per_stream
                                    or self.readers_of(stream.owner) >= settings.readers_per_owner):
            bottle.abort(429, TOO_MANY_READERS)
        return stream_events(stream, last_id, bottle.request.environ)

    def stop_for(self, stream_id, owner):
        """Stop this owner's answer (404 if there is none); returns its conversation's id."""
        stream = self.by_id.get(stream_id)
        if stream is None or stream.owner != owner:
            bottle.abort(404, "No such answer.")
        self.stop(stream.id)
        return stream.conversation_id

    def stop_conversation(self, conversation_id):
        """Stop every answer being written in a conversation (it is being deleted)."""
        for stream in list(self.by_id.values()):
            if stream.conversation_id == conversation_id:
                self.stop(stream.id)

    def readers_of(self, owner):
        """How many /events readers this owner has connected to live answers."""
        return sum(len(self.by_id[i].readers) for i in self.by_owner.get(owner, ()))

    def open_for(self, owner):
        """How many unfinished streams this owner has."""
        return sum(1 for i in self.by_owner.get(owner, ()) if not self.by_id[i].finished)

    def for_message(self, message_id, conversation_id):
        """The stream writing this stored answer, if any; an unfinished one first (SQLite reuses deleted rows' ids)."""
        candidates = [s for s in self.by_id.values()
                      if s.message_id == message_id and s.conversation_id == conversation_id]
        return next((s for s in candidates if not s.finished), candidates[0] if candidates else None)

    def reserve(self, owner, conversation_id=None):
        """Register a stream within the limits, or raise Refused (no switch between the check and the registration)."""
        if conversation_id and any(s.conversation_id == conversation_id and s.owner == owner and not s.finished
                                   for s in self.by_id.values()):
            raise Refused(409, BUSY_CONVERSATION)
        if self.open_for(owner) >= settings.streams_per_owner:
            raise Refused(429, too_many_streams())
        return self.register(owner, conversation_id)

    def register(self, owner, conversation_id):
        """Add a new stream to the registry, within the limit of open answers in all."""
        if len(self.by_id) >= settings.max_streams:
            raise Refused(503, "The server is at its limit of open answers; try again shortly.")
        stream = self.stream_class(secrets.token_urlsafe(18), [], owner=owner, conversation_id=conversation_id)
        self.by_id[stream.id] = stream
        self.by_owner.setdefault(owner, set()).add(stream.id)
        return stream

    def begin(self, stream, history, **fields):
        """Start a reserved stream's relay greenlet."""
        stream.history = stream.messages = history
        for name, value in fields.items():
            setattr(stream, name, value)
        stream.started = stream.last_activity = stream.left_at = time.monotonic()
        stream.greenlet = gevent.spawn(relay_upstream, stream)
        # One killed before it ran still ends the stream (from a greenlet: link callbacks run in the hub).
        stream.greenlet.link(lambda _: stream.finished_at is None and gevent.spawn(stream.finish, "stopped"))
        if self.janitor is None or self.janitor.dead:
            self.janitor = gevent.spawn(self.sweep_forever)
        return stream

    def stop(self, stream_id):
        """Stop generation: the relay greenlet unwinds and closes the upstream connection."""
        stream = self.by_id.get(stream_id)
        if stream is None:
            return False
        if not stream.finished and stream.greenlet:  # one not yet run just goes (its link finishes it as stopped)
            stream.greenlet.kill(StopRequested if stream.greenlet.gr_frame is not None else gevent.GreenletExit,
                                 block=False)
        return True

    def sweep(self, now):
        """Kill silent upstreams, ping readers, drop finished streams after the grace period."""
        ping = now - self.last_ping >= settings.ping_interval
        if ping:
            self.last_ping = now
        can_save = self.saving is None or self.saving.ready()  # a slow store: one save at a time, in a greenlet
        partials, growing, idle, now_wall = [], [], [], time.time()
        for stream in list(self.by_id.values()):
            if stream.finished:  # kept for reconnects until unwatched for the grace period (the answer is stored)
                if not stream.readers and now - stream.left_at >= settings.grace:
                    self.forget(stream)
                continue
            if stream.finished_at is not None:
                continue  # finishing: saving and rendering its bubble
            if stream.greenlet and now - stream.started > settings.max_answer_seconds:
                stream.greenlet.kill(AnswerLimit(f"The answer reached chat.py's limit of "
                                                 f"{settings.max_answer_seconds:g} seconds and was cut off "
                                                 "there."), block=False)
            elif stream.greenlet and (now - stream.started > settings.first_byte_timeout if stream.first_byte_at is None
                                      else now - stream.last_activity > settings.read_timeout):
                stream.greenlet.kill(UpstreamTimeout, block=False)
            partial = stream.partial(now_wall + settings.lease_seconds) if can_save else None
            if partial:
                partials.append(partial)  # saving the text renews the lease too
                growing.append(stream)
                stream.renewed_at = now
            elif can_save and stream.message_id and now - stream.renewed_at >= settings.lease_seconds / 3:
                idle.append(stream.message_id)  # a third of the lease: two renewals may fail before it runs out
                stream.renewed_at = now
            waited = now - stream.started
            # Ticks every second for ten seconds, then every five: thousands waiting must not cost thousands of writes.
            if stream.first_token_at is None and waited >= WAITING_SHOWN_AFTER and \
                    now - stream.told_at >= (1 if waited < 10 else 5) * min(1.0, settings.ping_interval):
                stream.told_at = now
                self.publish(stream, None, "status", waiting_frame(waited))
            elif ping:
                self.publish(stream, None, "ping", SSE_PING)
        if can_save:  # one transaction a second: the text that grew and every lease (the journal's segment after)
            segment = self.journal.cut()
            if partials or idle or self.unsaved:
                self.saving = gevent.spawn(save_progress, partials, idle, growing, segment)
            else:
                self.journal.saved(segment)
        self.tend_shared_answers(now)

    def tend_shared_answers(self, now):
        """The janitor's extra work when answers are shared (nothing here)."""

    def open(self):
        """At start: open the journal of shown but unsaved text (beside the database); put back what dead ones left."""
        if settings.db != ":memory:":
            self.journal.open(settings.db + ".unsaved")
            self.take_over()

    def take_over(self):
        """Put back the text a dead process had shown but not saved; those answers are then marked interrupted."""
        self.journal.take_over(self.put_back)

    @staticmethod
    def put_back(message_id, conversation_id, parts):
        """Save a dead process's answer with its journal's text, if it is still marked streaming."""
        row = store.answer_text(message_id, conversation_id)
        if row is not None and row[2] == "streaming":
            text = apply_records(row[0], parts.get("message", ()))
            reasoning = apply_records(row[1], parts.get("reasoning", ()))
            if (text, reasoning) != (row[0], row[1]):
                store.save_partials([(text, reasoning, 0, message_id, conversation_id)])  # lease 0: ends now

    def close(self):
        """At a clean exit: the journal keeps only the text of answers that are still unsaved."""
        self.journal.close({s.message_id for s in self.by_id.values() if s.finished_at is None} | set(self.unsaved))

    def drain(self, timeout=3.0):
        """Wait until every event is where readers get it: here it already is."""

    def forget(self, stream):
        """Drop a finished (or never started) stream from the registry."""
        if self.by_id.pop(stream.id, None) is None:
            return
        ids = self.by_owner[stream.owner]
        ids.discard(stream.id)
        if not ids:
            del self.by_owner[stream.owner]

    def sweep_forever(self):
        """The janitor greenlet: one timer for every stream, instead of one per read."""
        while self.by_id or self.unsaved:
            gevent.sleep(min(1.0, settings.grace, settings.ping_interval))
            self.sweep(time.monotonic())


def stream_events(stream, last_id, environ=None):
    """Yield the frames after last_id, then live ones, what is queued in one write each (environ: the request's)."""
    environ = environ or {}
    logged = len(stream.log.kinds)  # token events; a reader's queue takes everything after these
    if stream.finished:
        yield SSE_HELLO  # even a reader that has everything gets done again: an empty response reconnects forever
        streams.before_showing()
        yield from stream.log.frames(min(last_id, logged), logged)
        yield in_turn(stream.log.done)
        return
    reader = Outlet()
    stream.readers.add(reader)
    try:
        tail = stream.tail()  # the unfinished block as it stands at `logged`
        yield SSE_HELLO
        reader.connect(environ)
        streams.before_showing()
        yield from stream.log.frames(last_id, logged)
        if tail is not None:
            yield tail
        while True:
            frames = b"".join(reader.wait())
            streams.before_showing()
            yield in_turn(frames)
            if stream.finished and not reader.queue:  # then the done frame was in this batch
                return
            reader.pause_if_behind()
    finally:
        stream.readers.discard(reader)
        stream.left_at = time.monotonic()


def relay_upstream(stream):
    """Greenlet body: read the upstream answer and publish it token by token, then finish."""
    completion, think = stream.completion, ThinkSplitter()
    try:
        for piece in stream.seed:  # the bubble (and the stored answer) start with the text so far, then grow
            stream.token(*piece)
        stream.model = stream.model or catalog.default()
        stream.messages, stream.dropped = fit_history(stream.history, stream.model, room=stream.params.get("max_tokens"))
        deltas = read_completion(open_fitted(stream), completion, stream.touch)  # it owns (and closes) the response
        with contextlib.closing(deltas):
            for kind, text in deltas:
                for piece in (think.feed(text) if kind == "content" else [("reasoning", text)]):
                    stream.token(*piece)
        for piece in think.close():
            stream.token(*piece)
        catalog.calibrate(stream.model, stream.messages, positive_int((completion.usage or {}).get("prompt_tokens")))
        if completion.error:
            stream.finish("error", completion.error)
        elif completion.finished or completion.finish_reason:
            stream.finish("done")
        else:
            stream.finish("truncated")
    except StopRequested:
        stream.finish("stopped")
    except ServerStopping:
        stream.finish("interrupted")
    except AnswerLimit as exc:
        stream.notes.append(str(exc))
        stream.finish("limit")
    except UpstreamTimeout:
        if stream.first_byte_at is None:
            stream.finish("error", f"The model server did not start answering within "
                                   f"{settings.first_byte_timeout:g} seconds (it may be busy with other "
                                   "requests or still reading a long prompt); gave up waiting.")
        else:
            stream.finish("error", f"The model server sent nothing for {settings.read_timeout:g} seconds; "
                                   "gave up waiting.")
    except UpstreamError as exc:
        stream.finish("error", str(exc))
    except (requests.RequestException, urllib3.exceptions.HTTPError, HTTPException, OSError, ValueError) as exc:
        log.warning("upstream broke off: %r", exc)  # urllib3's ProtocolError is an HTTPError, not a RequestException
        stream.finish("error", "The connection to the model server broke off mid-answer.")
    except Exception:  # noqa: BLE001 — the bubble must end whatever went wrong
        log.exception("relay failed")
        stream.finish("error", "chat.py hit an internal error while relaying this answer.")


def open_fitted(stream):
    """Open the completion; if the server says the prompt overflows its context, trim and send once more."""
    try:
        return open_completion(http, stream.messages, stream.model, stream.params)
    except UpstreamError as exc:
        overflow = context_overflow(exc.status, exc.body)
        if overflow is None and exc.status == 400 and stream.history[-1]["role"] == "assistant":
            # Continue: OpenAI-style servers refuse a trailing assistant message; ask in a user turn instead.
            stream.history = stream.history + [{"role": "user", "content": CONTINUE_PROMPT}]
            stream.messages, stream.dropped = fit_history(stream.history, stream.model,
                                                          room=stream.params.get("max_tokens"))
            return open_fitted(stream)
        if overflow is None:
            raise
        sent = stream.messages
        catalog.learn_context(stream.model, overflow.size)
        if not catalog.context_size(stream.model):
            with gevent.Timeout(MODELS_DEADLINE, False):
                catalog.learn_from_props(stream.model)
        if overflow.prompt_tokens:
            catalog.calibrate(stream.model, sent, overflow.prompt_tokens)
        messages, dropped = fit_history(stream.history, stream.model, below=sent, room=stream.params.get("max_tokens"))
        if len(messages) >= len(sent):
            raise UpstreamError(str(exc) + " Your message alone does not fit the model's context; "
                                "shorten it.", exc.status, exc.body) from None
        log.info("context overflow (%s tokens); sending again without %d older messages", overflow.size or "?", dropped)
        stream.messages, stream.dropped = messages, dropped
        stream.resent = overflow.size or 0
        return open_completion(http, stream.messages, stream.model, stream.params)


CONTINUE_PROMPT = "Continue exactly where you stopped."


def fit_history(history, model, below=None, room=None):
    """The history without its oldest turns until it fits the model's context; also how many were left out."""
    system = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(system):]
    chars = settings.max_context - sum(content_length(m["content"]) for m in system)
    budget = catalog.prompt_budget(model, room)
    if below is not None and budget is None:
        turns = turns[-1:]  # below, and no size known: only the question, so that the one retry works
    while len(turns) > 1 and (sum(content_length(t["content"]) for t in turns) > chars or (
            budget is not None and catalog.estimate(model, system + turns) > budget)
            or (below is not None and len(system) + len(turns) >= len(below))):
        turns = turns[2:]
    return system + turns, (len(history) - len(system) - len(turns))


def save_progress(partials, idle, growing, segment):
    """Save streaming answers and renew idle leases in one transaction (a commit a second); retry failed final saves."""
    try:
        with store.transaction():
            store.save_partials(partials)
            store.renew_leases(idle, time.time() + settings.lease_seconds)
    except store.errors as exc:
        log_limited("save", "saving answers failed: %s", exc)
        for stream in growing:
            stream.saved = -1  # not saved: the next pass saves them again, grown or not
        return
    streams.journal.saved(segment)
    try:
        for message_id, answer in list(streams.unsaved.items()):
            store.finish_answer(message_id, answer)
            del streams.unsaved[message_id]
            streams.journal.settle(message_id)
            log.info("saved an answer whose first save had failed")
    except store.errors as exc:
        log_limited("save", "saving answers failed: %s", exc)


def housekeeping_forever(every=3600.0):
    """Interrupt answers whose writer died (every few seconds); hourly, drop expired logins and old conversations."""
    last_hourly = -every
    while True:
        try:
            streams.take_over()  # a process sharing the database died: its shown text first, then its leases
            store.expire_leases(time.time())
            if time.monotonic() - last_hourly >= every:
                last_hourly = time.monotonic()
                deleted = store.expire(time.time(), settings.retention_days and settings.retention_days * 86400)
                if deleted:
                    log.info("deleted %d conversations untouched for %g days (CHAT_RETENTION_DAYS)", deleted,
                             settings.retention_days)
        except store.errors as exc:
            log.error("housekeeping failed: %s", exc)
        gevent.sleep(min(5.0, settings.lease_seconds / 3))


def open_streams(url):
    """The registry of answers: in this process, or shared through Redis when CHAT_REDIS_URL is set."""
    if not url:
        return Streams()
    from chat_scale import RedisStreams  # only when configured: it needs redis-py (requirements-scale.txt)
    return RedisStreams(url)


streams = open_streams(settings.redis_url)
turn_writes.before = lambda: streams.before_showing()  # late-bound: the registry serving now (tests swap it)


# ---------------------------------------------------------------------------
# Built-in demo model (an OpenAI-compatible endpoint served by this same app)
# ---------------------------------------------------------------------------

def demo_reply(prompt, turns=1):
    """The demo model's Markdown answer to a prompt: a quote, a list and a code block."""
    words = prompt.split()
    quoted = "\n".join("> " + line for line in prompt[:600].splitlines() if line.strip()) or "> (nothing)"
    longest = max(words, key=len) if words else ""
    return (
        "**This is the demo model built into chat.py.** It runs offline and only echoes "
        "what you write, so you can see streaming and rendering work.\n\n"
        f"Message {turns} of this conversation; you wrote {len(words)} word{'s' if len(words) != 1 else ''}:"
        f"\n\n{quoted}\n\n"
        "To talk to a real model, restart chat.py with its address:\n\n"
        "1. Ollama: `OPENAI_BASE_URL=http://localhost:11434/v1 python chat.py`\n"
        "2. llama.cpp server (`llama-server -m model.gguf --port 8081`): `OPENAI_BASE_URL=http://localhost:8081/v1 python chat.py`\n"
        "3. OpenAI: `OPENAI_BASE_URL=https://api.openai.com/v1 OPENAI_API_KEY=sk-… python chat.py`\n\n"
        "Here is your message as a tiny program:\n\n"
        "```python\n"
        f"def longest_word():\n    return {longest[:80]!r}\n\n\nprint(longest_word())\n"
        "```\n"
    )


_DEMO_TOKEN = re.compile(r"\s*\S+|\s+")


def demo_chunks(prompt, delay, turns=1):
    """The demo reply as OpenAI chat.completion.chunk SSE frames, paced like a real model."""
    base = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": "demo"}

    def chunk(delta, finish=None, **extra):
        data = dict(base, choices=[{"index": 0, "delta": delta, "finish_reason": finish}], **extra)
        return b"data: " + json.dumps(data).encode() + b"\n\n"

    reply = demo_reply(prompt, turns)
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

DEMO_MAX_BODY = 192 << 20  # our own requests to the demo model carry a whole (fitted) conversation, images too
bottle.BaseRequest.MEMFILE_MAX = DEMO_MAX_BODY + 1  # in memory, never spooled to a file (larger: refused unread)

def security_headers():
    """Only what the page needs: scripts and styles from chat.py, images also from CHAT_IMAGE_HOSTS, no framing."""
    images = "".join(f" https://{host}" for host in sorted(settings.image_hosts))
    return [("Content-Security-Policy", f"default-src 'self'; script-src 'self'; style-src 'self'; "
                                        f"img-src 'self' data:{images}; connect-src 'self'; font-src 'self'; "
                                        "object-src 'none'; base-uri 'none'; form-action 'self'; "
                                        "frame-ancestors 'none'"),
            ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin"), ("X-Frame-Options", "DENY")]


GZIP_MIN, GZIP_MAX = 1024, 4 << 20  # bytes: smaller gains nothing; larger goes as it is (level 6: ~40 ms a MB)
GZIP_ON_HUB = 65536  # bytes: a larger body is compressed in a worker thread (zlib lets go of the GIL)
_GZIP_TYPES = re.compile(r"text/(?!event-stream)|application/(json|javascript|xml)|image/svg")  # not PNG: packed
_GZIPPED = {}  # a static file's ETag (path, mtime, size) -> its gzipped bytes


def accepts_gzip(environ):
    """True if Accept-Encoding takes gzip, by name or as * when gzip is not named, with a q above 0."""
    q = {}
    for part in (environ.get("HTTP_ACCEPT_ENCODING") or "").lower().split(","):
        name, _, params = part.partition(";")
        value = re.search(r"q=([01](\.\d*)?)", params.replace(" ", ""))
        q[name.strip()] = float(value[1]) if value else 1.0
    return q.get("gzip", q.get("x-gzip", q.get("*", 0))) > 0


def gzipped(environ, status, headers, body):
    """(headers, body) gzipped for a client that takes it: whole answers of 1 KB or more, never a stream."""
    head = {name.lower(): value for name, value in headers}
    key = None if isinstance(body, list) else head.get("etag")  # a list: one whole answer; an ETag: a static file
    if (not isinstance(body, list) and key is None) or not status.startswith("200") or "content-encoding" in head \
            or environ["REQUEST_METHOD"] == "HEAD" or not _GZIP_TYPES.match(head.get("content-type", "")) \
            or not GZIP_MIN <= int(head.get("content-length") or 0) <= GZIP_MAX:
        return headers, body  # streamed (no length: the live page, /events), small, huge, images, 206, 304
    headers = headers + [("Vary", "Accept-Encoding")]
    if not accepts_gzip(environ):
        return headers, body
    packed = _GZIPPED.get(key)
    if packed is None:
        data = b"".join(body)
        packed = zlib.compress(data, 6, 31) if len(data) <= GZIP_ON_HUB else in_background(zlib.compress, data, 6, 31)
        if key is not None:
            if len(_GZIPPED) >= 64:  # files change (a deploy): forget the old ones rather than grow
                _GZIPPED.clear()
            _GZIPPED[key] = packed
    if hasattr(body, "close"):
        body.close()
    return [(n, str(len(packed)) if n.lower() == "content-length" else v) for n, v in headers] + [
        ("Content-Encoding", "gzip")], [packed]


class App(bottle.Bottle):
    """Bottle, with the checks every request passes before any route reads it, the security headers and gzip."""

    def wsgi(self, environ, start_response):
        """Refuse a foreign Host or a body that does not belong at once; gzip what is worth it; add the headers."""
        believe_forwarded(environ)
        refusal = check_request(environ)
        if refusal:
            environ["chat.refused"] = True  # the server must not read the body it refused
            status, message = refusal
            content_type, body = error_body(environ, status, message)
            headers, body, exc_info = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                                       ("Connection", "close")], [body], None
        else:
            answer = []  # Bottle starts the response before it returns the body: start it here once both are known
            body = super().wsgi(environ, lambda *args: answer.extend(args))
            status, headers, exc_info = (answer + [None])[:3]
            headers, body = gzipped(environ, status, headers, body)
        names = {name.lower() for name, _ in headers}
        start_response(status, headers + [h for h in security_headers() if h[0].lower() not in names], exc_info)
        return body

    def default_error_handler(self, res):
        """Every error Bottle makes itself (400, 404, 405, 411, 413, 416, 431...) gets the site's error answer."""
        return error_page(res)


def htmx():
    """True for a request htmx sent (the page with JavaScript); False for a plain form or link."""
    return bottle.request.get_header("HX-Request") == "true"


def wants_page(environ):
    """True for a browser's own navigation or form (not htmx, not a script): it gets a page, others one plain line."""
    return environ.get("HTTP_HX_REQUEST") != "true" and "text/html" in (environ.get("HTTP_ACCEPT") or "")


def error_body(environ, status, message, conversation=False):
    """(Content-Type, bytes) of an error answer: the site's page for a browser, else the sentence on one line."""
    if wants_page(environ):
        if status.startswith("404") and conversation:
            return "text/html; charset=utf-8", template("not_found").encode()
        return "text/html; charset=utf-8", template("error", status=status, message=message).encode()
    return "text/plain; charset=utf-8", f"{message}\n".encode()


def error_page(error):
    """Short, honest error answers; tracebacks stay in the log. A page someone navigated to gets a page."""
    if error.status_code == 413 and htmx():  # into the form, where the words stay
        return form_error(413, error_message(error) if str(error.body).startswith("Refused") else
                          f"Your message is too large; the limit is {settings.max_prompt:,} characters.")
    content_type, body = error_body(bottle.request.environ, error.status_line, error_message(error),
                                    conversation=error.body == "No such conversation.")  # not for /c/ID/typo
    bottle.response.content_type = content_type
    return body


def error_message(error):
    """The sentence an error answer shows: ours as it is, Bottle's without class names or echoed paths."""
    if error.status_code == 500:  # an exception's text is for the log, not the client
        return "Something went wrong on the server; it has been logged."
    body = str(error.body or "").splitlines()[0] if error.body else ""
    if error.status_code == 404 and (not body or body.startswith("Not found: ") or body == "File does not exist."):
        return "Page not found."
    body = re.sub(r"^[A-Z]\w*(Error|Exception): ", "", body)
    return body[:300] or error.status_line[4:] + "."


NO_BODY = ("GET", "HEAD", "OPTIONS", "DELETE")  # these carry no body here: one that does is refused unread


def believe_forwarded(environ):
    """Keep X-Forwarded-Host and -Proto only from a trusted proxy: Bottle builds redirects from them."""
    if not trusted_proxy(environ.get("REMOTE_ADDR") or ""):
        environ.pop("HTTP_X_FORWARDED_HOST", None)
        environ.pop("HTTP_X_FORWARDED_PROTO", None)
    elif (environ.get("HTTP_X_FORWARDED_PROTO") or "").lower() not in ("", "http", "https"):
        environ.pop("HTTP_X_FORWARDED_PROTO")


def check_request(environ):
    """(status, message) if the request must be refused before routing: Host, headers, body size and shape, slowness."""
    hosts = [environ.get("HTTP_HOST") or ""] + \
        ([environ["HTTP_X_FORWARDED_HOST"]] if "HTTP_X_FORWARDED_HOST" in environ else [])
    for host in hosts:
        host = host.strip().lower()
        if not host_allowed(host):
            log_limited("host", "refused a request for the host %r (set CHAT_ALLOWED_HOSTS to allow it)", host[:100])
            return ("421 Misdirected Request", "This server does not answer for that host name. Its operator can "
                                               "allow it with CHAT_ALLOWED_HOSTS.")
    if environ.get("chat.over_share"):
        return ("429 Too Many Requests", "Refused: your address has too many connections open here; close some.")
    if not utf8_headers(environ):
        return ("400 Bad Request", "Refused: a header of this request is not UTF-8 text.")
    if environ.get("HTTP_TRANSFER_ENCODING"):  # Bottle reads these byte by byte (quadratic), spools big ones to files
        return ("411 Length Required", "Refused: this server takes request bodies with a Content-Length only.")
    length = environ.get("CONTENT_LENGTH") or ""
    if length and not length.isdigit():
        return ("400 Bad Request", "Refused: the request's Content-Length is not a number.")
    if not int(length or 0):
        return None
    if environ.get("REQUEST_METHOD") in NO_BODY:
        return ("400 Bad Request", f"Refused: a {environ.get('REQUEST_METHOD')} request takes no body here.")
    limit = settings.max_body
    if environ.get("PATH_INFO", "").startswith("/demo/") and demo_caller(environ):
        limit = DEMO_MAX_BODY
    if (environ.get("CONTENT_TYPE") or "").strip().lower().startswith("multipart/"):
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("PATH_INFO") not in UPLOAD_PATHS:
            return ("413 Payload Too Large", "Refused: files can be sent only with a message, or to import.")
        if int(length) > upload_limit(environ["PATH_INFO"]):
            return ("413 Payload Too Large", f"Refused: the files are larger than "
                                             f"{upload_limit(environ['PATH_INFO']) / 2**20:,.0f} MB in all. "
                                             "Send fewer or smaller ones.")
        environ["chat.upload"] = int(length)  # read once the request is known to be allowed (guard)
        return None
    if int(length) > limit:
        return ("413 Payload Too Large", f"Refused: the request is larger than {limit:,} bytes. "
                                         "Shorten your message and send it again.")
    try:  # read the (small) body now, within a deadline: a client that trickles it is cut off
        with gevent.Timeout(settings.header_timeout * random.uniform(1, 1.1)):  # spread, as the heads' deadlines
            data = environ["wsgi.input"].read(int(length))
    except gevent.Timeout:
        return ("408 Request Timeout", "The request body did not arrive in time.")
    environ["wsgi.input"] = io.BytesIO(data)
    return None


UPLOAD_PATHS = ("/streaming", "/import")
UPLOAD_RATE = 50_000  # bytes a second: the slowest upload a phone may make before it is cut off


def upload_limit(path="/streaming"):
    """Bytes in one multipart body: the attachments' limit and the form's; for an import, whatever one person's
    quota can export (base64 is a third larger), within CHAT_UPLOADS_MB."""
    if path == "/import":
        return int(min(settings.owner_quota * 4 / 3, settings.uploads_mb * 2**20)) + settings.max_body
    return int(settings.max_attachments_mb * 2**20 * 1.01) + settings.max_body


def read_upload(environ):
    """Read an allowed multipart body into memory as it arrives, within CHAT_UPLOADS_MB for everyone (counted as
    bytes arrive: a client that only announces a size holds nothing) and a deadline; or refuse it."""
    length, chunks, environ["chat.upload_held"] = environ.pop("chat.upload"), [], 0

    def refuse(status, message, **headers):
        environ["chat.refused"] = True
        raise bottle.HTTPError(status, message, headers=headers)
    try:
        with gevent.Timeout(settings.header_timeout + length / UPLOAD_RATE):
            while environ["chat.upload_held"] < length:
                size = min(1 << 14, length - environ["chat.upload_held"])  # counted 16 KB at a time
                if limits.uploading + size > settings.uploads_mb * 2**20:
                    log_limited("uploads", "refused an upload: CHAT_UPLOADS_MB are being read just now")
                    refuse(503, "The server is busy receiving other files; send again in a moment.", Retry_After="5")
                chunk = environ["wsgi.input"].read(size)
                if not chunk:
                    refuse(400, "The files stopped arriving; send them again.")
                chunks.append(chunk)
                limits.uploading += len(chunk)
                environ["chat.upload_held"] += len(chunk)
    except gevent.Timeout:
        refuse(408, "The files did not arrive in time; send them again.")
    except OSError:  # the client hung up
        refuse(400, "The files stopped arriving; send them again.")
    data = b"".join(chunks)
    boundary = re.search(r"boundary=\"?([^\";]{1,70})", environ.get("CONTENT_TYPE") or "")
    # Bottle parses the form on the event loop, a part at a time: a body of a million tiny parts would stop it.
    if boundary is None or data.count(b"--" + boundary[1].encode()) > settings.max_attachments + 32:
        refuse(413, f"Refused: a form with files carries at most {settings.max_attachments} files.")
    environ["wsgi.input"] = io.BytesIO(data)


def utf8_headers(environ):
    """True if every header value is UTF-8 text (WSGI hands them over as Latin-1 strings)."""
    for name, value in environ.items():
        if name.startswith("HTTP_") and not value.isascii():
            try:
                value.encode("latin-1").decode("utf-8")
            except UnicodeError:
                return False
    return True


def host_allowed(host):
    """True for a Host we answer: IP literals, localhost, our names, CHAT_ALLOWED_HOSTS (others: DNS rebinding)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").rstrip(".")
    if not name or "*" in settings.allowed_hosts or name in settings.allowed_hosts:
        return bool(name) or "*" in settings.allowed_hosts
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost") or name == settings.host.lower():
        return True
    return settings.host in ("0.0.0.0", "::", "") and name in machine_names()


@functools.lru_cache(maxsize=1)
def machine_names():
    """This machine's own host names (allowed as Host when listening on every address)."""
    names = {socket.gethostname().lower()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn().lower())
    return names


def demo_caller(environ):
    """True if the request carries this process's own demo key."""
    expected = f"Bearer {settings.demo_key}".encode()
    return settings.demo and hmac.compare_digest((environ.get("HTTP_AUTHORIZATION") or "").encode(), expected)


app = App()


def form_error(status, message, reload=None):
    """A readable error for the form (reload: a link to the page again); htmx shows 4xx bodies in #form-error."""
    bottle.response.status = status
    return template("form_error", message=message, reload=reload)


# -- who is asking: client address, owner cookie, optional password, same-origin writes

OWNER_COOKIE, SESSION_COOKIE, DEVICE_COOKIE = "chat_owner", "chat_session", "chat_device"
_OWNER_ID = re.compile(r"[A-Za-z0-9_-]{24,64}")
_DEVICE = re.compile(r"([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{22})")
_SESSION_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
PUBLIC_PATHS = ("/login", "/static/", "/demo/", "/healthz")  # reachable without logging in
SHARED = "/s/"  # read-only links (/s/TOKEN): anyone who has one reads, without logging in or getting a cookie
SESSION_DAYS = 30
DEVICE_DAYS = 400  # a browser that logged in once is known for about a year (browsers cap cookies at 400 days)


class Limits:
    """The rate limits that outlive a request: password guesses and new owners, by client address."""

    def __init__(self):
        # 10 wrong passwords/s in all; an address (/64) 5, then 1 per 6 s; a known browser its own: nobody locks it out.
        self.login_all = TokenBuckets(rate=10, burst=10)
        self.login = TokenBuckets(rate=1 / 6, burst=5)
        self.devices = TokenBuckets(rate=1 / 6, burst=5)
        self.accounts = TokenBuckets(rate=1 / 6, burst=5)  # and per account name: no account is guessed faster
        self.uploading = 0  # bytes of upload bodies in memory now (CHAT_UPLOADS_MB)
        self.new_owners = TokenBuckets(rate=settings.new_owners_per_minute / 60,
                                       burst=max(1, min(3, int(settings.new_owners_per_minute))))
        total = settings.new_owners_per_minute_total  # all but this machine's: rotating addresses buys nothing
        self.new_owners_all = TokenBuckets(rate=total / 60, burst=max(1, min(20, int(total))))
        self.sessions = {}  # token hash -> (when this process last found it valid, its account or None)
        self.proxy_users = {}  # user name -> (when, its account): the proxy's user costs no query a request
        self.searches = TokenBuckets(rate=2, burst=10)  # per owner: search holds the shared database
        self.search_addresses = TokenBuckets(rate=5, burst=20)  # per address: no cookies, a new owner each time


limits = Limits()


def trusted_proxy(address):
    """True if address is one of CHAT_TRUSTED_PROXIES."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in settings.trusted_proxies)


def client_address(environ):
    """Who is asking: the peer, or the X-Forwarded-For entry that the nearest trusted proxy added."""
    peer = environ.get("REMOTE_ADDR") or ""
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if not forwarded or not trusted_proxy(peer):
        return peer
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    # Read from the right: entries left of the first untrusted one may be made up by the client.
    return next((hop for hop in reversed(hops) if not trusted_proxy(hop)), hops[0] if hops else peer)


def address_key(address):
    """The key one client's limits are counted by: an IPv4 address, or an IPv6 address's /64 (one subscriber's)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 4:
        return address
    if ip.ipv4_mapped:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def from_this_machine(environ):
    """True for loopback with no proxy in between: the operator and local tools, exempt from per-address limits."""
    try:
        return ipaddress.ip_address(environ.get("REMOTE_ADDR") or "").is_loopback \
            and not environ.get("HTTP_X_FORWARDED_FOR")
    except ValueError:
        return False


def https(request):
    """True if the browser reached us over TLS (directly, or as a trusted proxy says)."""
    if trusted_proxy(request.environ.get("REMOTE_ADDR") or ""):
        return (request.get_header("X-Forwarded-Proto") or request.urlparts.scheme).lower() == "https"
    return request.environ.get("wsgi.url_scheme") == "https"


def set_cookie(name, value, max_age=None):
    """Set an HttpOnly, SameSite=Lax cookie (for the browser session without max_age), Secure over TLS."""
    bottle.response.set_cookie(name, value, path="/", httponly=True, samesite="lax", secure=https(bottle.request),
                               **({"max_age": max_age} if max_age is not None else {}))


def cross_origin(request):
    """True for a state-changing request that a page of another site sent."""
    if request.get_header("Sec-Fetch-Site", "") in ("cross-site", "same-site"):
        return True
    origin = request.get_header("Origin")
    if origin is None:
        return False  # not sent by a browser form or fetch (curl, tests, the load client)
    return urllib.parse.urlsplit(origin).netloc != request.get_header("Host", "")


def signed(owner_id):
    """The owner cookie's value: the id and an HMAC of it, so that no client can choose an id."""
    mac = hmac.new(store.secret("owner").encode(), owner_id.encode(), hashlib.sha256).digest()
    return f"{owner_id}.{base64.urlsafe_b64encode(mac[:16]).decode().rstrip('=')}"


def cookie_owner(value):
    """The owner id a cookie proves, or None; a valid unsigned id from before signing is re-signed."""
    owner_id, dot, _ = value.partition(".")
    if not _OWNER_ID.fullmatch(owner_id):
        return None
    if dot:
        return owner_id if hmac.compare_digest(signed(owner_id), value) else None
    return owner_id if store.owner_exists(owner_id) else None  # a browser from an older chat.py


def password_tag():
    """Which password sessions were issued under: changing CHAT_PASSWORD logs everyone out."""
    return hmac.new(store.secret("session").encode(), settings.password.encode(), hashlib.sha256).hexdigest()


def session_hash(token):
    """What the store keeps of a session cookie."""
    return hashlib.sha256(token.encode()).hexdigest()


def device_mac(device_id, name=""):
    """The device cookie's signature of its id (and of the account it signed in to: it vouches for that one only)."""
    signed_for = f"device:{device_id}" + (f":{name}" if name else "")
    mac = hmac.new(store.secret("device").encode(), signed_for.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:16]).decode().rstrip("=")


def known_device(request, name=""):
    """The id of the device cookie this browser got at an earlier login (as this account), or None."""
    match = _DEVICE.fullmatch(request.get_cookie(DEVICE_COOKIE) or "")
    if match and hmac.compare_digest(device_mac(match[1], name), match[2]):
        return match[1]
    return None


def logged_in(request):
    """True if the request carries a session cookie that the store knows and has not revoked (CHAT_PASSWORD)."""
    token = request.get_cookie(SESSION_COOKIE) or ""
    if not _SESSION_TOKEN.fullmatch(token):
        return False
    key = session_hash(token)
    if time.monotonic() - limits.sessions.get(key, (-60, None))[0] < 5:
        return True
    if not store.session_valid(key, password_tag()):
        limits.sessions.pop(key, None)
        return False
    remember_session(key, None)
    return True


# -- accounts: CHAT_AUTH=accounts (names and passwords, kept by `python chat.py user ...`) and CHAT_AUTH_HEADER
# (an authenticating proxy names the user). A user's conversations carry the user's owner id, so everything
# keyed by owner (lists, search, limits, quotas) follows the person to every device.

_USER_NAME = re.compile(r"[^\s\x00-\x1f\x7f-\x9f/\\,]{1,128}")  # an email or a login name: no spaces, and no
# commas (a proxy that appends its header to the client's would join two names with one)
SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # 16 MiB and about 50 ms a check (OWASP's minimum is n=2**17 with p=1:
# this n with r=8 costs the same memory per guess as their r=1, and the login budgets bound guesses)
MAX_USER_SESSIONS = 50  # devices one account stays signed in on: the oldest sign-in ends past it
SESSION_SEEN_EVERY = 300  # seconds: a session's "last used" is written at most this often


def accounts():
    """True when people sign in as users (with a password, or through the proxy) instead of as a browser."""
    return settings.auth == "accounts" or bool(settings.auth_header)


def user_key(name):
    """A user name as stored and compared: without surrounding spaces, in lower case."""
    return (name or "").strip().lower()


def valid_user_name(name):
    """True for 1 to 128 characters without spaces, controls or slashes."""
    return bool(_USER_NAME.fullmatch(name))


def b64(data):
    """Unpadded URL-safe base64 text."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text):
    """The bytes of b64(text)."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def password_hash(password, salt=None):
    """What the store keeps of a password: scrypt with a random salt, and its parameters."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, maxmem=64 << 20, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${b64(salt)}${b64(digest)}"


@functools.cache
def decoy_hash():
    """A hash no password matches: an unknown user name costs the same time as a wrong password."""
    return password_hash(secrets.token_urlsafe(16))


def password_ok(stored, password):
    """True if password matches a password_hash() value (constant work, also for a missing one)."""
    try:
        _, n, r, p, salt, digest = (stored or decoy_hash()).split("$")
        given = hashlib.scrypt(password.encode(), salt=unb64(salt), n=int(n), r=int(r), p=int(p),
                               maxmem=64 << 20, dklen=len(unb64(digest)))
    except ValueError:
        return False
    return stored is not None and hmac.compare_digest(given, unb64(digest))


@functools.cache
def kdf_pool():
    """Two threads of their own for scrypt: a burst of logins never holds up the database's threads."""
    return gevent.threadpool.ThreadPool(2)


def header_text(value):
    """A header's value as text (WSGI hands header bytes over as Latin-1)."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return value


def proxy_user(request):
    """The account CHAT_AUTH_HEADER names, made on first sight; believed only from CHAT_TRUSTED_PROXIES."""
    value = request.get_header(settings.auth_header) if settings.auth_header else None
    if value is None:
        return None
    peer = request.environ.get("REMOTE_ADDR") or ""
    if not trusted_proxy(peer):
        log_limited("auth-header", "ignored %s from %s, which is not in CHAT_TRUSTED_PROXIES (said once)",
                    settings.auth_header, peer, every=math.inf)
        return None
    name = user_key(header_text(value))
    if not valid_user_name(name):
        raise bottle.HTTPError(400, f"The proxy's {settings.auth_header} header is not a user name.")
    cached = limits.proxy_users.get(name)
    if cached and time.monotonic() - cached[0] < 5:
        return cached[1]
    user = store.user(name) or store.add_user(name, None)
    limits.proxy_users[name] = (time.monotonic(), user)
    return user


def remember_session(key, user):
    """Note a valid session for 5 s; the notes of sessions gone quiet are dropped once there are many."""
    now = time.monotonic()
    if len(limits.sessions) >= 10_000:
        limits.sessions = {k: v for k, v in limits.sessions.items() if now - v[0] < 5}
    limits.sessions[key] = (now, user)


def session_user(request):
    """The account whose live session cookie this request carries (CHAT_AUTH=accounts), or None."""
    token = request.get_cookie(SESSION_COOKIE) or ""
    if settings.auth != "accounts" or not _SESSION_TOKEN.fullmatch(token):
        return None
    key = session_hash(token)
    checked, user = limits.sessions.get(key, (-60, None))
    if user is not None and time.monotonic() - checked < 5:  # a revoked session ends everywhere within 5 s
        return user
    user = store.account_session(key)
    if user is None:
        limits.sessions.pop(key, None)
        return None
    if time.time() - (user["seen"] or 0) > SESSION_SEEN_EVERY:
        store.session_seen(key)
    remember_session(key, user)
    return user


def ask_to_log_in(request):
    """Send a page to the login form (coming back afterwards); refuse anything else with 401."""
    if request.method == "GET" and not request.get_header("HX-Request"):
        here = request.fullpath + ("?" + request.query_string if request.query_string else "")
        bottle.redirect("/login?" + urllib.parse.urlencode({"next": here}))
    raise bottle.HTTPError(401, "Log in first.", headers={"HX-Redirect": "/login"})


def adopt_browser(request, user):
    """At a user's first sign-in in a browser: its anonymous conversations become the account's."""
    cookie = request.get_cookie(OWNER_COOKIE)
    if cookie is None:
        return
    anonymous = cookie_owner(cookie) if "." in cookie else None  # signed by this server: never a made-up id
    if anonymous and anonymous != user["owner"] and not store.is_account_owner(anonymous):
        moved = store.adopt(anonymous, user["owner"])
        if moved:
            log.info("%d conversation(s) of a browser adopted by the account %s", moved, user["name"])
    bottle.response.delete_cookie(OWNER_COOKIE, path="/")


@app.hook("before_request")
def guard():
    """Know who asks (or refuse), then read an upload that they may send."""
    try:
        know_the_owner()
    except bottle.HTTPResponse:
        if "chat.upload" in bottle.request.environ:
            bottle.request.environ["chat.refused"] = True  # its body stays unread
        raise
    if "chat.upload" in bottle.request.environ:
        read_upload(bottle.request.environ)


@app.hook("after_request")
def release_upload():
    """Give an upload's bytes back to CHAT_UPLOADS_MB."""
    limits.uploading -= bottle.request.environ.pop("chat.upload_held", 0)


def know_the_owner():
    """Refuse cross-origin writes, ask for the password or the account when one is needed, and know the owner."""
    request = bottle.request
    if request.method not in ("GET", "HEAD", "OPTIONS") and cross_origin(request):
        raise bottle.HTTPError(403, "Refused: this request came from another site.")
    if request.path.startswith(SHARED):
        return  # no owner: its routes read only the conversation the link names
    public = request.path.startswith(PUBLIC_PATHS)
    if accounts():
        user = proxy_user(request) or session_user(request)
        if user is None and not public:
            if settings.auth != "accounts":
                raise bottle.HTTPError(401, f"Sign in first: this server learns who you are from the proxy in front "
                                            f"of it ({settings.auth_header}).")
            ask_to_log_in(request)
        if user is not None:
            adopt_browser(request, user)
        request.environ["chat.user"] = user and user["name"]
        request.environ["chat.owner"] = user and user["owner"]
        return
    if settings.password and not public and not logged_in(request):
        ask_to_log_in(request)
    owner_id = cookie_owner(request.get_cookie(OWNER_COOKIE) or "")
    if owner_id is None:
        owner_id = secrets.token_urlsafe(24)
        request.environ["chat.new_owner"] = True
    if request.get_cookie(OWNER_COOKIE) != signed(owner_id):
        set_cookie(OWNER_COOKIE, signed(owner_id), 10 * 365 * 86400)
    request.environ["chat.owner"] = owner_id


def owner():
    """The owner id of this request: its account's, or its browser's."""
    return bottle.request.environ["chat.owner"]


def owned_conversation(conversation_id):
    """This owner's conversation, or a 404 (someone else's looks exactly like a missing one)."""
    conversation = store.conversation(conversation_id, owner())
    if conversation is None:
        bottle.abort(404, "No such conversation.")
    return conversation


def next_page():
    """Where to go after logging in: the local page that asked for it, else the start page."""
    request = bottle.request
    fields = request.forms if request.method == "POST" else request.query  # never a body that does not belong
    target = fields.getunicode("next", default="") or ""
    # Browsers drop tabs and newlines from URLs and read "\\" as "/": "/\t/evil.com" would leave the site.
    if not target.startswith("/") or target.startswith("//") or re.search(r"[\x00-\x20\x7f\\]", target):
        return "/"
    parts = urllib.parse.urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/"


def password_login():
    """True when /login asks for something: CHAT_PASSWORD, or accounts' names and passwords."""
    return bool(settings.password) or settings.auth == "accounts"


@app.get("/login")
def login_page():
    """The login page (only when CHAT_PASSWORD or CHAT_AUTH=accounts is set)."""
    if not password_login():
        bottle.redirect("/")
    return template("login", error=None, next=next_page(), accounts=settings.auth == "accounts", username="")


@app.post("/login")
def login():
    """Check the password (and user name) in constant time, within the guessing budgets (docs/security.md)."""
    if not password_login():
        bottle.redirect("/")
    request = bottle.request
    account = settings.auth == "accounts"
    name = user_key(request.forms.getunicode("username", default="") or "")[:200] if account else ""
    device = known_device(request, name)
    address = address_key(client_address(request.environ))
    # A browser that has logged in here before (as this account) spends its own budget; any other, its
    # address's, the account's and everyone's.
    buckets = [(limits.devices, device)] if device else \
        [(limits.login, address), (limits.login_all, "all")] + ([(limits.accounts, name)] if account else [])
    wait = max(bucket.wait(key) for bucket, key in buckets)

    def page(status, error):
        bottle.response.status = status
        return template("login", error=error, next=next_page(), accounts=account, username=name)
    if wait > 0:
        seconds = max(1, math.ceil(wait))
        bottle.response.set_header("Retry-After", str(seconds))
        log_limited("login-busy", "refused a login from %s: too many wrong passwords", address)
        return page(429, f"Too many wrong passwords have been tried just now. Wait {seconds} "
                         f"second{'s' if seconds > 1 else ''} and try again.")
    for bucket, key in buckets:  # now, before the check yields: guesses arriving together each spend one
        bucket.take(key)
    given = request.forms.getunicode("password", default="") or ""
    if account:
        user = store.user(name) if valid_user_name(name) else None
        ok = kdf_pool().apply(password_ok, (user and user["password_hash"], given[:1024]))
    else:
        user, ok = None, hmac.compare_digest(hashlib.sha256(given.encode()).digest(),
                                             hashlib.sha256(settings.password.encode()).digest())
    if not ok:
        log_limited("login", "failed login from %s", address)
        return page(401, "Wrong user name or password." if account else "Wrong password.")
    for bucket, key in buckets:  # the right password costs nothing
        bucket.give(key)
    token = secrets.token_urlsafe(32)
    store.add_session(session_hash(token), "account" if account else password_tag(),
                      time.time() + SESSION_DAYS * 86400, user_name=user and user["name"],
                      agent=(request.get_header("User-Agent") or "")[:300])
    if user is not None:
        adopt_browser(request, user)
    set_cookie(SESSION_COOKIE, token, SESSION_DAYS * 86400)
    device = device or secrets.token_urlsafe(16)
    set_cookie(DEVICE_COOKIE, f"{device}.{device_mac(device, name)}", DEVICE_DAYS * 86400)
    bottle.redirect(next_page())


@app.post("/logout")
def logout():
    """End the session here and in the store, so the cookie is worthless even if it was copied."""
    token = bottle.request.get_cookie(SESSION_COOKIE) or ""
    if _SESSION_TOKEN.fullmatch(token):
        limits.sessions.pop(session_hash(token), None)
        store.delete_session(session_hash(token))
    bottle.response.delete_cookie(SESSION_COOKIE, path="/")
    bottle.redirect("/login" if password_login() else "/")


def signed_in_user():
    """This request's account (a row of users), or a 404 when people do not sign in as users."""
    name = bottle.request.environ.get("chat.user")
    if not name:
        bottle.abort(404, "There are no accounts on this server.")
    return store.user(name)


@app.get("/account")
def account():
    """Who is signed in, and where: the account's sessions, with a button that ends them all."""
    no_store()
    user = signed_in_user()
    token = bottle.request.get_cookie(SESSION_COOKIE) or ""
    here = session_hash(token) if _SESSION_TOKEN.fullmatch(token) else None
    return template("account", user=user, sessions=store.user_sessions(user["name"]), here=here,
                    proxy=settings.auth != "accounts" or not user["password_hash"], when=when)


@app.post("/account/sign-out-everywhere")
def sign_out_everywhere():
    """End every session of this account (every device), this one too."""
    user = signed_in_user()
    store.end_sessions(user["name"])
    limits.sessions.clear()  # this process forgets them now; other workers within 5 s
    bottle.response.delete_cookie(SESSION_COOKIE, path="/")
    bottle.redirect("/login" if settings.auth == "accounts" else "/", 303)


def when(timestamp):
    """A time for people to read, in UTC."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp)) if timestamp else "—"


# -- the chat ------------------------------------------------------------------

LIVE_ANSWER = "<!-- the live answer streams here -->"


def no_store():
    """Pages with conversations are never cached: Back after Log out must not show them."""
    bottle.response.set_header("Cache-Control", "no-store")


def render_page(conversation=None, draft="", error=None, at=None, results=None, query="", deleted=None):
    """The chat page, empty or with one branch of a conversation; without JavaScript a live answer streams as HTML."""
    no_store()
    plain = bool(bottle.request.get_cookie(PLAIN_COOKIE)) and not htmx()
    bubbles, live, leaf, answering = render_bubbles(conversation, at=at, plain=plain)
    presets = store.presets(owner())
    models = catalog.models()
    model = (conversation and conversation["model"]) or settings.model or (models[0] if models else None)
    system = conversation["system_prompt"] if conversation else store.owner_system_prompt(owner())
    params = {name: conversation[name] if conversation else None for name in PARAMETERS}
    chosen = bottle.request.query.getunicode("preset", default="") or ""  # ?preset=NAME fills the fields with it
    preset = next((p for p in presets if p["name"] == chosen), None)
    if preset is not None:
        model, system, params = preset["model"] or model, preset["system_prompt"], {n: preset[n] for n in PARAMETERS}
    # Folded unless a preset was just chosen (also after a form error): its summary lists what is set.
    options = template("options", models=models, model=model, label=model_label, system=system, params=params,
                       defaults={n: getattr(settings, n) for n in PARAMETERS}, presets=presets, chosen=chosen,
                       opened=preset is not None, active_options=active_options)
    page = template("page", demo=settings.demo, upstream=settings.upstream_label(), conversation=conversation,
                    lists=conversation_lists(conversation and conversation["id"]), deleted=deleted, bubbles=bubbles,
                    options=options, password=password_login(), user=bottle.request.environ.get("chat.user"),
                    draft=draft, error=error, leaf=leaf, notice=model_notice(), here=page_path(conversation),
                    results=results, query=query, answering=answering,
                    shares=share_links(conversation["id"]) if conversation else [])
    if live is None:
        return page
    before, _, after = page.partition(LIVE_ANSWER)
    return streamed_page(before, live, after)


def reader_offset():
    """The reader's time zone in minutes east of UTC, from the tz cookie chat.js sets; UTC without one."""
    raw = bottle.request.get_cookie("tz") or ""
    return int(raw) if re.fullmatch(r"-?\d{1,3}", raw) and abs(int(raw)) <= 14 * 60 else 0


def conversation_lists(current=None):
    """The sidebar's conversations under headings in the reader's time zone (Pinned, Today, Yesterday, Previous 7
    days, Older, then one a month past a year), and the archived ones apart."""
    offset, groups, archived = reader_offset() * 60, {}, []
    today = (time.time() + offset) // 86400
    for row in store.conversations(owner()):  # newest first: so are the groups
        local = row["updated"] + offset
        days = today - local // 86400
        heading = ("Pinned" if row["pinned"] else "Today" if days < 1 else "Yesterday" if days < 2 else
                   "Previous 7 days" if days <= 7 else "Older" if days <= 365 else
                   time.strftime("%B %Y", time.gmtime(local)))
        (archived if row["archived"] else groups.setdefault(heading, [])).append(row)
    return template("conversation_list", groups=sorted(groups.items(), key=lambda group: group[0] != "Pinned"),
                    archived=archived, current=current)


def active_options(system, params):
    """What the options panel's folded summary lists: the options set, by name."""
    return (["system prompt"] if system else []) + [PARAMETER_RANGES[n][3].lower() for n in PARAMETERS
                                                    if params[n] is not None]


def page_path(conversation):
    """The path of the page that shows a conversation (None: a new chat)."""
    return f"/c/{conversation['id']}" if conversation else "/"


def render_bubbles(conversation, at=None, plain=False):
    """(bubbles, live stream for a plain page or None, leaf id, whether a bubble streams) of the branch shown."""
    if conversation is None:
        return [], None, None, False
    tree, path = branch(conversation, at)
    bubbles, live, answering = [], None, False
    files = store.attachments([row["id"] for row in path if row["role"] == "user"], data="text")
    last_assistant = max((r["id"] for r in path if r["role"] == "assistant"), default=None)
    for row in path:
        siblings = tree.siblings(row)
        nav = template("siblings", conversation_id=conversation["id"], ids=siblings,
                       position=siblings.index(row["id"])) if len(siblings) > 1 else ""
        if row["role"] == "user":
            bubbles.append(template("user", prompt=row["content"], message_id=row["id"], created=row["created"],
                                    conversation_id=conversation["id"], nav=nav, files=files.get(row["id"], [])))
            continue
        stream = streams.for_message(row["id"], conversation["id"]) if row["status"] == "streaming" else None
        if stream is not None and not stream.finished and (stream.local or not plain):  # plain pages: local only
            if plain and live is None and len(stream.readers) < settings.readers_per_stream:
                live = stream  # a page reading an answer counts against the readers' cap too
                bubbles.append(LIVE_ANSWER)
            else:  # reloaded mid-answer: the new bubble replays the stream's log from the start
                bubbles.append(template("streaming", stream_id=stream.id, nav=nav, created=row["created"]))
                answering = True
            continue
        answer = stored_answer(row)
        if row["status"] == "streaming" and (stream is None or not stream.local):
            # Not written here: by another process while its lease lasts, else by no one. Show what was saved, say so.
            elsewhere = (row["lease_until"] or 0) > time.time() and (settings.database_url or settings.redis_url)
            answer.update(status="interrupted",
                          notes=answer["notes"] + [NOTES["elsewhere" if elsewhere else "unsaved"]])
        bubbles.append(render_answer(answer, last=row["id"] == last_assistant, nav=nav))
    return bubbles, live, (path[-1]["id"] if path else None), answering


def messages_fragment(conversation):
    """The branch shown, for htmx to swap into #chat-messages, and the composer's parent kept in step."""
    bubbles, _, leaf, _ = render_bubbles(store.conversation(conversation["id"], owner()))
    return "".join(bubbles) + template("parent", leaf=leaf)


def streamed_page(before, stream, after):
    """Yield the page with a live answer that grows as HTML (chunked: the browser paints as it arrives)."""
    yield before
    yield from plain_answer(stream)
    yield after


def plain_answer(stream):
    """A live answer as HTML without JavaScript: finished blocks rendered, the rest as text (CSS hides the stale)."""
    reader = Outlet()  # never written to directly: its frames only wake it; the log says what is new
    stream.readers.add(reader)
    try:
        yield template("plain_answer", stream_id=stream.id)
        seen, starts = 0, {"message": 0, "reasoning": 0, "block": 0}
        while True:
            upto, parts = len(stream.log.kinds), []
            for _, kind, text, tail in stream.log.entries(seen, upto, starts):
                if kind == "message":
                    parts.append(f"<span>{html.escape(text, quote=False)}</span>")
                elif kind == "block":
                    parts.append(f'</div><div class="md-block" hx-disable>{render_block(text)}</div>'
                                 f'<div class="tokens"><span>{html.escape(tail, quote=False)}</span>')
            seen = upto
            streams.before_showing()
            if stream.finished:
                yield "".join(parts) + "</div></div></div>\n" + stream.bubble
                return
            yield "".join(parts) or "\n"  # a newline keeps proxies from timing out while the model thinks
            reader.wait()
    finally:
        stream.readers.discard(reader)
        stream.left_at = time.monotonic()


@app.get("/")
def index():
    """The chat page with a new, empty conversation; after a delete (?deleted=ID) it offers Undo."""
    deleted = bottle.request.query.getunicode("deleted") or ""
    return render_page(deleted=deleted and store.conversation(deleted, owner(), trashed=True))


@app.get("/model-options")
def model_options():
    """The model picker's options, once the background fetch of /models has answered (or given up)."""
    models = catalog.wait()
    notice = model_notice()  # the first fetch has answered now: if the server is down, the page says so at once
    return template("model_options", models=models, model=settings.model or (models[0] if models else None),
                    label=model_label) + (notice and f'<div id="model-server" hx-swap-oob="innerHTML">{notice}</div>')


def model_notice():
    """The notice that the model server cannot be reached, as last heard (never waits), or ""."""
    down = None if settings.demo else catalog.down
    return template("model_server", upstream=settings.upstream_label(), down=down) if down else ""


@app.get("/model-server")
def model_server():
    """The notice, polled while it shows: asks the server again if due and waits for it, then shows what it says."""
    catalog.models()
    if catalog.fetching is not None:
        catalog.fetching.join(MODELS_DEADLINE)  # what the server says now, not what it said 15 s ago
    return model_notice()


PRESETS_PER_OWNER = 50


@app.post("/presets")
def save_preset():
    """Save the composer's options under a name: htmx gets the preset picker again, a plain form the page with it."""
    forms = bottle.request.forms
    name = " ".join((forms.getunicode("preset_name") or "").translate(CONTROL).split())[:80]
    try:
        if not name:
            raise Refused(400, "Give the preset a name first.")
        fields = {"model": (forms.getunicode("model") or "").strip() or None, "system_prompt": form_system(forms),
                  **{n: None for n in PARAMETERS}, **form_params(forms)}
        names = [p["name"] for p in store.presets(owner())]
        if name not in names and len(names) >= PRESETS_PER_OWNER:
            raise Refused(409, f"You have {PRESETS_PER_OWNER} presets, the most kept; delete one first.")
        admit_new_owner()
        store.save_preset(owner(), name, fields)
    except Refused as refused:
        return form_error(refused.status, str(refused))
    return presets_reply(name)


@app.post("/presets/delete")
def delete_preset():
    """Delete one of this browser's presets."""
    store.delete_preset(owner(), bottle.request.forms.getunicode("preset") or "")
    return presets_reply("")


def presets_reply(chosen):
    """After a preset was saved or deleted: htmx gets the picker; a plain form goes back to its page, choosing it."""
    if not htmx():
        conversation_id = bottle.request.forms.getunicode("conversation") or ""
        path = page_path(conversation_id and store.conversation(conversation_id, owner()))
        plain_redirect(path + (f"?preset={urllib.parse.quote(chosen)}" if chosen else ""))
    return template("presets", presets=store.presets(owner()), chosen=chosen)


@app.get("/c/<conversation_id>")
def conversation_page(conversation_id):
    """One conversation at its own URL; ?at=ID shows the branch through that message (a search hit)."""
    try:
        at = int(bottle.request.query.getunicode("at", default="") or 0) or None
    except ValueError:
        at = None
    return render_page(owned_conversation(conversation_id), at=at)


def reserve_stream(conversation_id=None):
    """Hold a stream for this browser if the limits allow, before anything is written; or raise Refused."""
    admit_new_owner()
    return streams.reserve(owner(), conversation_id)


def admit_new_owner():
    """Charge a browser that stores its first conversation to the new-visitor budgets; or raise Refused."""
    environ = bottle.request.environ
    new = environ.get("chat.new_owner") or not store.owner_exists(owner())  # a GET's fresh cookie must not dodge this
    if new and not from_this_machine(environ):
        address = address_key(client_address(environ))
        if limits.new_owners.tokens(address) < 1:
            raise Refused(429, "Too many new visitors from your address in the last minute. Allow cookies for "
                               "this site, or wait a minute and send again.")
        if not limits.new_owners_all.take("all"):
            log_limited("new-owners", "refused a new visitor from %s: CHAT_NEW_OWNERS_PER_MINUTE_TOTAL reached",
                        address)
            raise Refused(429, "This server is taking in too many new visitors just now. Wait a minute and "
                               "send again.")
        limits.new_owners.take(address)


def files_to_send(path):
    """The attachments of a branch's questions, with the bytes of its text files and of its newest images, as many
    as one message may carry (CHAT_MAX_ATTACHMENTS, _MB): older ones are named, not sent again (an answer's memory)."""
    files = store.attachments([row["id"] for row in path if row["role"] == "user"], data="text")
    wanted, room = set(), settings.max_attachments_mb * 2**20
    for f in (f for message_id in sorted(files, reverse=True) for f in reversed(files[message_id])):
        if f["type"] != "text/plain" and len(wanted) < settings.max_attachments and f["size"] <= room:
            wanted.add(f["id"])
            room -= f["size"]
    data = {row["id"]: row["data"] for row in store.attachment_data(wanted)} if wanted else {}
    return {message_id: [dict(f, data=data[f["id"]]) if f["id"] in wanted else f for f in found]
            for message_id, found in files.items()}


def start_answer(stream, conversation, question_id):
    """Store an empty answer to a question and stream it into a reserved stream, with the branch up to it."""
    tree = Tree(store.messages(conversation["id"]))
    path = tree.path(question_id)
    history = upstream_history(conversation, path, files_to_send(path))
    message_id = store.add_message(conversation["id"], "assistant", status="streaming", parent_id=question_id)
    return streams.begin(stream, history, model=conversation["model"], conversation_id=conversation["id"],
                         message_id=message_id, params=conversation_params(conversation))


@contextlib.contextmanager
def sending(conversation_id=None):
    """Reserve a stream for a send; if anything refuses or fails before it starts, release it and say why."""
    stream = reserve_stream(conversation_id)
    try:
        if store.full():  # any new message; answers already streaming still finish and are saved
            raise Refused(507, f"The server's database is full (its limit is {settings.max_db_mb:,g} MB): new "
                               "messages cannot be saved. Tell whoever runs this server; answers already being "
                               "written are still saved.")
        if not store.under_quota(owner(), settings.owner_quota, send_allowance()):
            raise Refused(507, f"Your conversations use the {settings.owner_quota / 2**20:,.0f} MB this server "
                               "keeps for each person. Delete some to go on.")
        yield stream
    except store.errors as exc:
        log.error("storing a message failed: %s", exc)
        raise Refused(507, "The server's disk is full: your message was not saved. Try again later."
                      if is_disk_full(exc) else "The server could not save your message. Try again.") from None
    finally:
        if stream.greenlet is None:
            streams.forget(stream)


def send_allowance():
    """The most bytes one send may add to its owner's conversations: a message and a system prompt (4 bytes a
    character at most), its attachments, and the answer."""
    return (2 * settings.max_prompt + settings.max_answer_chars) * 4 + int(settings.max_attachments_mb * 2**20)


PLAIN_COOKIE = "chat_plain"  # this browser sends plain forms: it has no JavaScript


def plain_redirect(location):
    """Answer a plain form with 303 See Other; remember that this browser runs no JavaScript."""
    set_cookie(PLAIN_COOKIE, "1")
    bottle.redirect(location, 303)


def go_to(location):
    """Leave the page for another: htmx by HX-Redirect, a plain form by 303 See Other."""
    if htmx():
        bottle.response.set_header("HX-Redirect", location)
        return ""
    bottle.redirect(location, 303)


def make_title(prompt, limit=60):
    """A conversation title from its first message: no Markdown syntax, cut at a word, with an ellipsis."""
    prompt = prompt[:limit * 8]  # a title needs only the start (and the regexes stay linear on a huge prompt)
    text = re.sub(r"!?\[([^\[\]]{0,200})\]\([^()\s]{0,500}\)", r"\1", prompt)  # links: their text
    text = re.sub(r"^\s{0,3}(?:#{1,6}|>|[-+*]|\d{1,9}[.)])\s+", "", text, flags=re.M)  # line markers
    text = re.sub(r"`+|~~|(?<!\w)[*_]+|[*_]+(?!\w)|\$+", "", text)               # emphasis, code, math
    words = " ".join(text.split())
    if len(words) <= limit:
        return words or "New conversation"
    cut = words[:limit + 1].rsplit(" ", 1)[0] if " " in words[:limit + 1] else words[:limit]
    return cut.rstrip(" ,.;:!?-") + "…"


PARAMETER_RANGES = {"temperature": (float, 0.0, 2.0, "Temperature"), "top_p": (float, 0.0, 1.0, "Top p"),
                    "max_tokens": (int, 1, 1_000_000, "Max tokens")}


def form_system(forms):
    """The form's system prompt, or Refused (413) past CHAT_MAX_PROMPT."""
    system = (forms.getunicode("system") or "").strip()
    if len(system) > settings.max_prompt:
        raise Refused(413, f"The system prompt is {len(system):,} characters long; the limit is "
                           f"{settings.max_prompt:,}.")
    return system


def form_params(forms):
    """The sampling parameters a form sets (blank: None, the default); a field left out changes nothing."""
    params = {}
    for name, (kind, low, high, label) in PARAMETER_RANGES.items():
        if name not in forms:
            continue
        raw = (forms.getunicode(name) or "").strip()
        try:
            value = kind(raw) if raw else None
        except ValueError:
            raise Refused(400, f"{label} must be a {'whole ' if kind is int else ''}number from {low} to {high}, "
                               "or blank for the default.") from None
        if value is not None and not low <= value <= high:
            raise Refused(400, f"{label} must be from {low} to {high}, or blank for the default.")
        params[name] = value
    return params


def check_prompt(prompt):
    """Refuse an empty prompt or one over the limit, with a sentence that says so."""
    if not prompt.strip():
        raise Refused(400, "Type a message first: the prompt is empty.")
    if len(prompt) > settings.max_prompt:
        raise Refused(413, f"Your message is {len(prompt):,} characters long; the limit is "
                           f"{settings.max_prompt:,}. Shorten it and send again.")


IMAGE_TYPES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg", b"GIF87a": "image/gif",
               b"GIF89a": "image/gif"}


def image_type(data):
    """The type an image's first bytes say it is (PNG, JPEG, GIF, WebP), or None: never what the client claims."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in IMAGE_TYPES.items() if data.startswith(magic)), None)


def file_name(raw, default):
    """A file's name to show and store: its last path part, without controls, at most 200 characters."""
    name = re.split(r"[/\\]", (raw or "").translate(CONTROL))[-1].strip()[:200]
    return name or default


def attached_files(field="attachment"):
    """The files a form carries, checked; or Refused."""
    uploads = [f for f in bottle.request.files.getall(field) if f.raw_filename or f.content_length]
    return checked_files([(f.raw_filename, f.file.read()) for f in uploads])


def checked_files(files):
    """(name, bytes) pairs as Uploads: images known by their bytes, text files as UTF-8, within the limits;
    or Refused saying which file is wrong and why."""
    if len(files) > settings.max_attachments:
        raise Refused(413, f"You attached {len(files)} files; the limit is {settings.max_attachments} a message.")
    checked, total = [], 0
    for raw_name, data in files:
        name, kind = file_name(raw_name if isinstance(raw_name, str) else "", "file"), image_type(data)
        if kind:
            limit, what = settings.max_image_mb * 2**20, "an image"
        else:
            data = data.removeprefix(b"\xef\xbb\xbf")
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                data = None
            if data is None or b"\x00" in data:
                raise Refused(415, f"{name} is neither an image (PNG, JPEG, WebP or GIF) nor a text file.")
            kind, limit, what = "text/plain", settings.max_file_kb * 1024, "a text file"
        if len(data) > limit:
            raise Refused(413, f"{name} is {size_label(len(data))}; the limit for {what} is {size_label(limit)}.")
        total += len(data)
        checked.append(Upload(name, kind, data))
    if total > settings.max_attachments_mb * 2**20:
        raise Refused(413, f"The files are {size_label(total)} in all; the limit is "
                           f"{settings.max_attachments_mb:,g} MB a message.")
    return checked


def size_label(size):
    """A size for people to read: 12 KB, 3.4 MB."""
    return f"{size / 2**20:,.1f} MB" if size >= 2**20 else f"{max(1, round(size / 1024)):,} KB"


@app.post("/streaming")
def start_streaming():
    """Start an answer: the user's bubble and one that connects to /events; a plain form goes to the page."""
    forms = bottle.request.forms
    prompt = (forms.getunicode("prompt", default="") or "").translate(CONTROL)
    conversation_id = forms.getunicode("conversation") or ""
    conversation = None
    try:
        files = attached_files()
        check_prompt(prompt or ("…" if files else ""))  # a picture alone is a question too
        changes = {"model": (forms.getunicode("model") or "").strip() or None}
        if forms.get("system") is not None:
            changes["system_prompt"] = form_system(forms)
        params = form_params(forms)
        created = not conversation_id
        with sending(conversation_id or None) as stream:
            if created:
                conversation_id = store.create_conversation(owner(), make_title(prompt or files[0].name))
            parent = form_parent(forms, owned_conversation(conversation_id))  # refused before anything changes
            if forms.get("save_system") and "system_prompt" in changes:
                store.save_owner_system_prompt(owner(), changes["system_prompt"])
            store.update_conversation(conversation_id, **{k: v for k, v in changes.items() if v is not None}, **params)
            conversation = store.conversation(conversation_id, owner())
            question = store.add_message(conversation_id, "user", prompt, parent_id=parent)
            store.add_attachments(question, files)
            start_answer(stream, conversation, question)
    except Refused as refused:
        if not htmx():  # the words stay in the box of a page that says what went wrong
            bottle.response.status = refused.status
            conversation = store.conversation(conversation_id, owner()) if conversation_id else None
            return render_page(conversation, draft=prompt, error=str(refused))
        return form_error(refused.status, str(refused), str(refused) == BEHIND and f"/c/{conversation_id}")
    if not htmx():
        plain_redirect(f"/c/{conversation_id}")
    if bottle.request.get_cookie(PLAIN_COOKIE):
        bottle.response.delete_cookie(PLAIN_COOKIE, path="/")  # JavaScript is on again
    if created:
        bottle.response.set_header("HX-Push-Url", f"/c/{conversation_id}")
    return template("exchange", prompt=prompt, stream_id=stream.id, conversation=conversation, asked=time.time(),
                    active=active_options(conversation["system_prompt"], conversation),
                    created=created, question_id=question, leaf=stream.message_id,
                    lists=conversation_lists(conversation_id) if created else "",
                    files=store.attachments([question], data="text").get(question, []) if files else [])


BEHIND = "This conversation has new messages from another tab. Reload to see them, then send."


def form_parent(forms, conversation):
    """The message a new question follows: the end of the branch the page shows, else the conversation's leaf;
    refused (409) if turns were added after it on the branch shown now (another tab): that would fork unseen."""
    tree = Tree(store.messages(conversation["id"]))
    try:
        parent = int(forms.getunicode("parent") or 0)
    except ValueError:
        parent = 0
    if parent in tree.rows:  # ‹ ›, Edit and Regenerate move the leaf and the page's parent with it: no refusal
        if parent != conversation["leaf_id"] and any(r["id"] == parent for r in tree.path(conversation["leaf_id"])):
            raise Refused(409, BEHIND)
        return parent
    return conversation["leaf_id"] if conversation["leaf_id"] in tree.rows else tree.newest_leaf()


def branch_reply(conversation_id):
    """After a change of branch: htmx gets the branch shown; a plain form goes back to the page."""
    if not htmx():
        plain_redirect(f"/c/{conversation_id}")
    return messages_fragment(owned_conversation(conversation_id))


@app.post("/c/<conversation_id>/regenerate")
def regenerate(conversation_id):
    """Answer a question again (the last one shown, or `message`'s): a new answer beside the earlier ones."""
    conversation = owned_conversation(conversation_id)
    tree, path = branch(conversation)
    target = message_field(tree) or (path[-1] if path else None)
    question = target if target is None or target["role"] == "user" else tree.rows.get(target["parent_id"])
    if question is None:
        return form_error(409, "There is no question to answer again.")
    try:
        with sending(conversation_id) as stream:  # refused: nothing changes
            start_answer(stream, conversation, question["id"])
    except Refused as refused:
        return form_error(refused.status, str(refused))
    return branch_reply(conversation_id)


@app.post("/c/<conversation_id>/continue")
def continue_answer(conversation_id):
    """Go on with an answer max tokens cut off: it goes back as the last assistant message, and the continuation
    streams into the same stored answer (one message, one bubble that replays the text so far, then grows)."""
    conversation = owned_conversation(conversation_id)
    tree = Tree(store.messages(conversation_id))
    target = message_field(tree)
    if target is None or target["role"] != "assistant" or target["finish_reason"] != "length" or \
            target["status"] != "done":
        return form_error(409, "Only an answer cut off by its length limit can be continued.")
    try:
        with sending(conversation_id) as stream:
            path = tree.path(target["parent_id"])
            history = upstream_history(conversation, path, files_to_send(path))
            store.reopen_answer(target["id"], conversation_id)
            seed = [(kind, target[column]) for kind, column in (("reasoning", "reasoning"), ("message", "content"))
                    if target[column]]
            streams.begin(stream, history + [{"role": "assistant", "content": target["content"]}],
                          model=conversation["model"], conversation_id=conversation_id, message_id=target["id"],
                          params=conversation_params(conversation), seed=seed)
    except Refused as refused:
        return form_error(refused.status, str(refused))
    return branch_reply(conversation_id)


@app.post("/c/<conversation_id>/edit")
def edit(conversation_id):
    """Send an edited question: a new question beside the old one, answered; the old branch stays."""
    conversation = owned_conversation(conversation_id)
    original = message_field(Tree(store.messages(conversation_id)))
    prompt = (bottle.request.forms.getunicode("prompt", default="") or "").translate(CONTROL)
    try:
        if original is None or original["role"] != "user":
            raise Refused(400, "Only your own messages can be edited.")
        check_prompt(prompt)
        with sending(conversation_id) as stream:
            question = store.add_message(conversation_id, "user", prompt, parent_id=original["parent_id"])
            store.copy_attachments(original["id"], question)
            start_answer(stream, conversation, question)
    except Refused as refused:
        return form_error(refused.status, str(refused))
    return branch_reply(conversation_id)


@app.post("/c/<conversation_id>/branch")
def switch_branch(conversation_id):
    """Show another version of a message (‹ ›): its branch, down its newest messages, becomes the one shown."""
    owned_conversation(conversation_id)
    tree = Tree(store.messages(conversation_id))
    target = message_field(tree, "to")
    if target is None:
        bottle.abort(404, "No such message.")
    store.update_conversation(conversation_id, leaf_id=tree.newest_leaf(target["id"]))
    return branch_reply(conversation_id)


def message_field(tree, name="message"):
    """The message of this conversation a form names, or None."""
    try:
        return tree.rows.get(int(bottle.request.forms.getunicode(name) or 0))
    except ValueError:
        return None


@app.get("/search")
def search():
    """This browser's conversations by title and content: a list for the sidebar, or a page without JavaScript."""
    query = (bottle.request.query.getunicode("q", default="") or "")[:200]
    words = re.findall(r"\w+", query)[:6]  # words only: no query syntax reaches the database
    environ = bottle.request.environ
    if words and not (limits.searches.take(owner()) and (  # this machine (no proxy): the per-owner budget only
            from_this_machine(environ) or limits.search_addresses.take(address_key(client_address(environ))))):
        bottle.response.status = 429
        return "<p class=\"no-results\">Too many searches at once; wait a moment.</p>"
    try:
        best = {}
        for row in store.search(owner(), words):  # titles first: a title's hit is a conversation's best
            best.setdefault(row["conversation_id"], row)
        results = [search_result(row) for row in best.values()]
    except store.errors as exc:  # over its time limit, most likely: say so, and the database is free again
        log_limited("search", "a search failed: %s", exc)
        results = []
    if htmx():
        return template("search_results", results=results, query=query)
    return render_page(results=results, query=query)


def search_result(row):
    """A conversation's best hit: its link (at a matching message, ?at= shows the branch holding it, hidden or not),
    its title and, for a message, the text found (HTML, the words marked)."""
    anchor = "" if row["message_id"] is None else \
        f"?at={row['message_id']}#{'user' if row['role'] == 'user' else 'answer'}-m{row['message_id']}"
    marked = html.escape(row["snippet"] or "", quote=False).replace("\x01", "<mark>").replace("\x02", "</mark>")
    return {"href": f"/c/{row['conversation_id']}{anchor}", "title": row["title"], "snippet": marked if anchor else "",
            "archived": row["archived"]}


@app.post("/c/<conversation_id>/rename")
def rename(conversation_id):
    """Rename a conversation (the new title comes from the rename form, or htmx's HX-Prompt)."""
    owned_conversation(conversation_id)
    title = " ".join((bottle.request.forms.getunicode("title") or prompt_header() or "").split())[:120]
    if not title:
        return form_error(400, "A title cannot be empty.")
    store.update_conversation(conversation_id, title=title)
    if not htmx():
        plain_redirect(f"/c/{conversation_id}")
    return template("title", conversation=store.conversation(conversation_id, owner()))


def prompt_header():
    """htmx's HX-Prompt header as text: %-encoded when HX-Prompt-URI-AutoEncoded says so, else UTF-8 bytes."""
    value = bottle.request.get_header("HX-Prompt")
    if value is None:
        return None
    if (bottle.request.get_header("HX-Prompt-URI-AutoEncoded") or "").lower() == "true":
        return urllib.parse.unquote(value)
    try:  # WSGI hands header bytes over as latin-1 text
        return value.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return value


@app.delete("/c/<conversation_id>")
@app.post("/c/<conversation_id>/delete")
def delete(conversation_id):
    """Stop a conversation's answers and put it in the trash; the new chat shown next offers Undo."""
    owned_conversation(conversation_id)
    streams.stop_conversation(conversation_id)
    store.delete_conversation(conversation_id)
    return go_to(f"/?deleted={conversation_id}")


@app.get("/c/<conversation_id>/delete")
def confirm_delete(conversation_id):
    """Without JavaScript: a page that asks before deleting (a link must not delete)."""
    no_store()
    return template("confirm_delete", conversation=owned_conversation(conversation_id))


@app.post("/c/<conversation_id>/restore")
def restore(conversation_id):
    """Undo a delete: the conversation comes back from the trash as it was."""
    if store.conversation(conversation_id, owner(), trashed=True) is None:
        bottle.abort(404, "No such conversation: it was deleted for good, or it is not yours.")
    store.mark(conversation_id, "deleted", False)
    return go_to(f"/c/{conversation_id}")


@app.post("/c/<conversation_id>/<action:re:pin|unpin|archive|unarchive>")
def place(conversation_id, action):
    """Pin a conversation on top of the list or archive it out of the list (search still finds it), or undo that."""
    owned_conversation(conversation_id)
    store.mark(conversation_id, "pinned" if action.endswith("pin") else "archived", not action.startswith("un"))
    if not htmx():
        plain_redirect(f"/c/{conversation_id}")
    return template("conversation_head", conversation=owned_conversation(conversation_id),
                    shares=share_links(conversation_id)) + \
        f'<div id="conversations" hx-swap-oob="true">{conversation_lists(conversation_id)}</div>'


@app.get("/c/<conversation_id>/export.<fmt:re:md|json>")
def export(conversation_id, fmt):
    """Download a conversation as Markdown or JSON."""
    conversation = owned_conversation(conversation_id)
    rows = store.messages(conversation_id) if fmt == "json" else branch(conversation)[1]
    filename = re.sub(r"[^A-Za-z0-9_-]+", "-", conversation["title"]).strip("-")[:60] or "conversation"
    bottle.response.set_header("Content-Disposition", f'attachment; filename="{filename}.{fmt}"')
    if fmt == "json":
        bottle.response.content_type = "application/json; charset=utf-8"
        files = store.attachments([r["id"] for r in rows if r["role"] == "user"], data=True)
        return in_background(lambda: json.dumps(export_json(conversation, rows, files), ensure_ascii=False, indent=2))
    bottle.response.content_type = "text/markdown; charset=utf-8"
    return export_markdown(conversation, rows)


@app.get("/attachments/<attachment_id>")
def attachment(attachment_id):
    """An attached file, to its owner only (anyone else: 404)."""
    bottle.response.set_header("Cache-Control", "private, max-age=31536000, immutable")  # an id is never reused
    return attached_file(store.attachment(attachment_id, owner()))


def attached_file(row):
    """An attached file (None: 404), as the type its bytes were checked to be."""
    if row is None:
        bottle.abort(404, "No such file.")
    response = bottle.response
    response.content_type = row["type"] + ("; charset=utf-8" if row["type"] == "text/plain" else "")
    response.set_header("Content-Disposition", "inline; filename*=UTF-8''" + urllib.parse.quote(row["name"]))
    response.set_header("Content-Security-Policy", "default-src 'none'; sandbox")  # shown alone, it runs nothing
    return bytes(row["data"])


# -- shared links: the branch shown of a conversation, read-only, to anyone who has its link

MAX_SHARES = 10  # links a conversation has at once: its head lists them all


def share_links(conversation_id):
    """(link, token) for each of a conversation's links, the link absolute: it is meant to be sent on."""
    origin = "{0.scheme}://{0.netloc}".format(bottle.request.urlparts)
    return [(f"{origin}{SHARED}{token}", token) for token in store.shares(conversation_id)]


def shares_changed(conversation_id):
    """After Share or Revoke: the conversation's head with its links (a plain form: the conversation again)."""
    if not htmx():
        plain_redirect(f"/c/{conversation_id}")
    return template("conversation_head", conversation=store.conversation(conversation_id, owner()),
                    shares=share_links(conversation_id))


@app.post("/c/<conversation_id>/share")
def share(conversation_id):
    """Make a new read-only link to a conversation."""
    owned_conversation(conversation_id)
    if len(store.shares(conversation_id)) >= MAX_SHARES:
        return form_error(409, f"A conversation has at most {MAX_SHARES} links: revoke one first.")
    store.add_share(conversation_id)
    return shares_changed(conversation_id)


@app.post("/c/<conversation_id>/unshare")
def unshare(conversation_id):
    """Revoke one of a conversation's links (`token`): it answers 404 from now on."""
    owned_conversation(conversation_id)
    store.revoke_share(bottle.request.forms.getunicode("token") or "", conversation_id)
    return shares_changed(conversation_id)


def shared_conversation(token):
    """The conversation a link shows, else 404; the answer is for no search engine, cache or Referer."""
    conversation = store.shared_conversation(token)
    if conversation is None:
        bottle.abort(404, "No such shared conversation: its link was revoked, or never existed.")
    no_store()  # a revoked link stops showing at once
    bottle.response.set_header("X-Robots-Tag", "noindex")
    bottle.response.set_header("Referrer-Policy", "no-referrer")  # the token is in the URL
    return conversation


@app.get("/s/<token>")
def shared_page(token):
    """A shared conversation's branch shown, as it is now: the bubbles without controls or the owner's ids."""
    conversation = shared_conversation(token)
    path = branch(conversation)[1]
    files = store.attachments([row["id"] for row in path if row["role"] == "user"], data="text")
    bubbles = []
    for n, row in enumerate(path, 1):
        if row["role"] == "user":  # no conversation_id: no id, no Edit
            bubbles.append(template("user", prompt=row["content"], message_id=None, conversation_id=None, nav="",
                                    files=files.get(row["id"], []), files_at=f"{SHARED}{token}"))
            continue
        answer = dict(stored_answer(row), bubble_id=f"s{n}", conversation_id=None)  # neutral id, no Regenerate
        if row["status"] == "streaming":
            answer.update(status="interrupted", notes=answer["notes"] + [NOTES["writing"]])
        bubbles.append(render_answer(answer, last=False))
    return template("shared", conversation=conversation, bubbles=bubbles)


@app.get("/s/<token>/attachments/<attachment_id>")
def shared_attachment(token, attachment_id):
    """A file attached in a shared conversation, to anyone who has its link."""
    return attached_file(store.attachment(attachment_id, conversation_id=shared_conversation(token)["id"]))


STATUSES = ("done", "stopped", "error", "truncated", "interrupted")
MAX_IMPORTED_MESSAGES = 10_000
MAX_IMPORT_NODES = 20 * MAX_IMPORTED_MESSAGES + 10 * 1000  # objects and lists: a message has a few, a file one
IMPORT_LANE = gevent.lock.BoundedSemaphore(1)  # one import is parsed at a time: each holds the GIL a while


def imported(data):
    """An exported conversation checked field by field, its messages parents first; or Refused (400) saying what
    is wrong. Its attachments pass the same checks as attached files."""
    def wrong(what):
        return Refused(400, f"This is not a conversation exported by chat.py: {what}.")

    def text(value, name, limit, empty=""):
        if value is None:
            return empty
        if not isinstance(value, str) or len(value) > limit:
            raise wrong(f"{name} is not text of at most {limit:,} characters")
        return value.translate(CONTROL)

    def number(value, name):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise wrong(f"{name} is not a number")
        return value
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise wrong("it has no list of messages")
    if not 0 < len(data["messages"]) <= MAX_IMPORTED_MESSAGES:
        raise wrong(f"it has {len(data['messages']):,} messages (1 to {MAX_IMPORTED_MESSAGES:,} can be imported)")
    now = time.time()
    conversation = {"title": " ".join(text(data.get("title"), "the title", 1000).split())[:120] or "Imported",
                    "system_prompt": text(data.get("system_prompt"), "the system prompt", settings.max_prompt),
                    "model": text(data.get("model"), "the model", 200, None) or None,
                    "created": number(data.get("created"), "created") or now, "messages": [], "size": 0}
    for name, (kind, low, high, label) in PARAMETER_RANGES.items():
        value = number(data.get(name), label)
        if value is not None and not low <= value <= high:
            raise wrong(f"{label} is out of range")
        conversation[name] = None if value is None else kind(value)
    children = {}  # parent id -> its messages: the tree is walked from its roots, parents first
    for m in data["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or \
                not isinstance(m.get("id"), (int, str)) or not isinstance(m.get("parent_id"), (int, str, type(None))):
            raise wrong("a message has no role, or no id of its own")
        children.setdefault(m.get("parent_id"), []).append(m)
    pending, placed = list(reversed(children.get(None, []))), set()
    while pending:
        m = pending.pop()
        if m["id"] in placed:
            raise wrong("two messages have the same id")
        placed.add(m["id"])
        pending.extend(reversed(children.get(m["id"], [])))
        status = m.get("status") or "done"
        status = "interrupted" if status == "streaming" else status
        if status not in STATUSES:
            raise wrong(f"a message's status is {str(status)[:20]!r}")
        usage = m.get("usage")
        notes = m.get("notes") or []
        if not isinstance(notes, list) or not all(isinstance(n, str) and len(n) < 2000 for n in notes[:20]):
            raise wrong("a message's notes are not a list of sentences")
        files = []
        for f in m.get("attachments") or []:
            try:
                raw = base64.b64decode(f["data"], validate=True)
            except (TypeError, KeyError, ValueError, binascii.Error):
                raise wrong("an attachment's data is not base64") from None
            files.append((f.get("name"), raw))
        message = {"id": m["id"], "parent_id": m.get("parent_id"), "role": m["role"],
                   "content": text(m.get("content"), "a message", max(settings.max_prompt, settings.max_answer_chars)),
                   "reasoning": text(m.get("reasoning"), "a message's reasoning", settings.max_answer_chars),
                   "status": status, "error": text(m.get("error"), "an error", 2000, None),
                   "finish_reason": text(m.get("finish_reason"), "a finish reason", 100, None),
                   "usage": json.dumps(usage) if isinstance(usage, dict) and len(json.dumps(usage)) < 4000 else None,
                   "model": text(m.get("model"), "a model", 200, None), "notes": json.dumps(notes[:20]),
                   "footer": text(m.get("footer"), "a footer", 2000),
                   "elapsed": number(m.get("elapsed"), "elapsed"),
                   "created": number(m.get("created"), "created") or now,
                   "files": checked_files(files)}
        conversation["size"] += len(message["content"].encode()) + len(message["reasoning"].encode()) + sum(
            len(f.data) for f in message["files"])
        conversation["messages"].append(message)
    if len(placed) < len(data["messages"]):
        raise wrong("a message's parent_id names no message of the conversation")
    shown = data.get("shown_leaf_id")
    conversation["leaf"] = shown if shown in placed else None
    return conversation


@app.post("/import")
def import_conversation():
    """A conversation exported as JSON by chat.py, uploaded (field `file`), becomes a new conversation here."""
    try:
        upload = bottle.request.files.get("file")
        if upload is None:
            raise Refused(400, "Choose a conversation exported as JSON by chat.py to import.")
        raw = upload.file.read()
        # json.loads holds the GIL even in a thread, and tiny containers cost ~100 bytes each: count them first.
        if raw.count(b"{") + raw.count(b"[") > MAX_IMPORT_NODES:
            raise Refused(413, "That file holds more than a conversation of chat.py can.")
        admit_new_owner()
        if store.full():
            raise Refused(507, f"The server's database is full (its limit is {settings.max_db_mb:,g} MB): nothing "
                               "can be imported. Tell whoever runs this server.")
        with IMPORT_LANE:  # megabytes of JSON and base64, parsed and checked off the event loop, one at a time
            try:
                data = in_background(json.loads, raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise Refused(400, "That file is not JSON: import a conversation exported as JSON by chat.py.") \
                    from None
            del raw
            conversation = in_background(imported, data)
        if store.owner_usage(owner()) + conversation["size"] >= settings.owner_quota:
            raise Refused(507, f"Your conversations use the {settings.owner_quota / 2**20:,.0f} MB this server "
                               "keeps for each person. Delete some to import this one.")
        conversation_id = store.import_conversation(owner(), conversation)
    except Refused as refused:
        if htmx():
            return form_error(refused.status, str(refused))
        raise bottle.HTTPError(refused.status, str(refused)) from None
    return go_to(f"/c/{conversation_id}")


@app.get("/events")
def events():
    """The answer as server-sent events; always 200, since any error status makes htmx reconnect forever."""
    stream_id = bottle.request.query.getunicode("stream", default="") or ""
    try:
        last_id = max(0, int(bottle.request.get_header("Last-Event-ID") or 0))
    except ValueError:
        last_id = 0
    bottle.response.content_type = "text/event-stream"
    bottle.response.set_header("Cache-Control", "no-cache")
    bottle.response.set_header("X-Accel-Buffering", "no")
    return streams.events(stream_id, owner(), last_id)


@app.post("/stop")
def stop():
    """Stop an answer; the done bubble follows on the event stream."""
    stream_id = bottle.request.query.getunicode("stream", default="") or ""
    conversation_id = streams.stop_for(stream_id, owner())
    stream = streams.get(stream_id)
    if not htmx() and conversation_id:
        reader = Outlet()  # wait, like a page reading it, until it is stored as stopped: the page shows #answer-mN
        if stream is not None and not stream.finished:
            stream.readers.add(reader)
            with gevent.Timeout(5, False):
                while not stream.finished:
                    reader.wait()
            stream.readers.discard(reader)
        at = f"#answer-m{stream.message_id}" if stream is not None and stream.message_id else ""
        bottle.redirect(f"/c/{conversation_id}{at}", 303)
    bottle.response.status = 204
    return ""


@app.get("/healthz")
def healthz():
    """Liveness: ok, and for those logged in (or with no password set) the upstream in use."""
    bottle.response.content_type = "text/plain; charset=utf-8"
    if (settings.password or accounts()) and not (bottle.request.environ.get("chat.user") or (
            settings.password and not accounts() and logged_in(bottle.request))):
        return "ok\n"  # for proxies and uptime checks, which have no login
    return f"ok\nupstream: {settings.upstream_label()}\nstreams: {len(streams)}\n"


@app.get("/static/<path:path>")
def static(path):
    """The vendored front end, CSS and the page script."""
    return bottle.static_file(path, root=STATIC)


@app.get("/demo/v1/models")
def demo_models():
    """The demo model's model list (only when no upstream is configured)."""
    demo_only()
    return {"object": "list", "data": [{"id": "demo", "object": "model", "owned_by": "chat.py"}]}


@app.post("/demo/v1/chat/completions")
def demo_completions():
    """The demo model: an OpenAI-compatible streaming endpoint answering over real HTTP."""
    demo_only()
    try:
        messages = bottle.request.json["messages"]
        prompt = next(m["content"] for m in reversed(messages) if m.get("role") == "user")
        if isinstance(prompt, list):  # content parts: the text, and what the images were
            images = sum(part.get("type") == "image_url" for part in prompt)
            prompt = " ".join(part.get("text", "") for part in prompt if part.get("type") == "text") + \
                f" (and {images} image{'s' if images != 1 else ''}, which a demo cannot see)"
        turns = sum(1 for m in messages if m.get("role") == "user")
    except (TypeError, KeyError, StopIteration, ValueError):
        bottle.response.status = 400
        return {"error": {"message": "expected a chat request with a user message", "type": "invalid_request"}}
    bottle.response.content_type = "text/event-stream"
    return demo_chunks(str(prompt), settings.demo_delay, turns)


def demo_only():
    """The demo endpoint exists only without an upstream, and answers only this process."""
    if not demo_caller(bottle.request.environ):
        bottle.abort(404)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

class Handler(WSGIHandler):
    """gevent's request handler, with a deadline on each request's head (slowloris)."""

    RFILE_BUFFER = 2048  # a browser's request head fits; gevent's 8 KB buffer is held by every open stream

    def __init__(self, sock, address, server):
        super().__init__(sock, address, server)
        self.rfile.close()
        self.rfile = sock.makefile("rb", self.RFILE_BUFFER)

    def read_requestline(self):
        """Wait for a request (idle time is bounded by the socket timeout), then start the head's deadline."""
        try:
            if not self.socket.recv(1, socket.MSG_PEEK):
                return b""
        except OSError:
            return b""
        # Spread a little, so that hundreds of heads sent at once (slowloris) do not time out at once.
        self.head_deadline = gevent.Timeout.start_new(settings.header_timeout * random.uniform(1, 1.1), HeadTimeout)
        try:
            return super().read_requestline()
        except HeadTimeout:
            return b""  # closes the connection

    def read_request(self, raw_requestline):
        """Read the headers within what is left of the deadline; a late head is a 400 and a closed connection."""
        try:
            return super().read_request(raw_requestline)
        except HeadTimeout:
            log_limited("slow-head", "closed a connection from %s: its request head took over %g s",
                        self.client_address[0] if self.client_address else "?", settings.header_timeout)
            self.close_connection = True
            return False
        finally:
            self.head_deadline.close()

    def handle_one_request(self):
        """gevent's, with a line that says why for a request head it cannot read."""
        result = super().handle_one_request()
        if isinstance(result, tuple):
            return result[0], BAD_HEADS.get(result[0], result[1])
        return result

    def _handle_client_error(self, ex):
        """A malformed request head: a client's mistake, so one log line and no traceback (gevent prints one)."""
        log_limited("bad-head", "refused a request head from %s: %s", self.client_address[0] if isinstance(
            self.client_address, tuple) else "?", str(ex)[:200] or type(ex).__name__)
        self.close_connection = True
        too_large = isinstance(ex, HTTPException) or re.search(r"too long|more than", str(ex), re.I)
        return ("431" if too_large else "400"), None

    def handle_error(self, t, v, tb):
        """A client that took no data for CHAT_WRITE_TIMEOUT is dropped with one line, not a traceback."""
        if isinstance(v, TimeoutError):
            log_limited("write-timeout", "dropped a client that took no data for %g s (CHAT_WRITE_TIMEOUT)",
                        settings.write_timeout)
            self.close_connection = True
            return
        super().handle_error(t, v, tb)

    def handle(self):
        """Serve the connection if its address is within its share of the connections, counted while it lasts."""
        peer = self.client_address[0] if isinstance(self.client_address, tuple) else ""
        self.counted = None if trusted_proxy(peer) else address_key(peer)  # a proxy's counts per request (get_environ)
        if self.counted is not None and not self.server.admit(self.counted):
            log_limited("address-share", "refused a connection from %s: it holds its share of the connections "
                                         "(CHAT_CONNECTIONS_PER_ADDRESS)", self.counted)
            with contextlib.suppress(OSError):
                self.socket.sendall(OVER_SHARE)
            return None
        try:
            return super().handle()
        finally:
            self.server.release(self.counted)

    def get_environ(self):
        """The WSGI environment with this handler; a trusted proxy's connection now counts for this request's client."""
        environ = super().get_environ()
        environ["chat.handler"] = self
        key = address_key(client_address(environ))
        if key != self.counted:
            if self.server.admit(key):
                self.server.release(self.counted)
                self.counted = key
            else:
                environ["chat.over_share"] = True
                log_limited("address-share", "refused a request from %s: it holds its share of the connections "
                                             "(CHAT_CONNECTIONS_PER_ADDRESS)", key)
        return environ

    def run_application(self):
        """Run the app; after a refused body, close the connection instead of reading the body to discard it."""
        try:
            super().run_application()
        finally:
            if self.environ.get("chat.refused"):
                self.wsgi_input.content_length = self.wsgi_input.position
                self.wsgi_input.chunked_input = False
                self.close_connection = True
                self.linger()
            self.environ.clear()  # it and Bottle's request form a cycle: freed at once, not by the collector

    def linger(self):
        """After a refusal, shut our side and drop what the client sends a moment: a reset could overtake the answer."""
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_WR)
            deadline, dropped = time.monotonic() + LINGER_SECONDS, 0
            while dropped < LINGER_BYTES and time.monotonic() < deadline:
                self.socket.settimeout(max(0.01, deadline - time.monotonic()))
                data = self.socket.recv(65536)
                if not data:
                    return
                dropped += len(data)


LINGER_SECONDS, LINGER_BYTES = 1.0, 1 << 20  # after refusing a body: how long, how much of it is dropped before closing


class HeadTimeout(Exception):
    """A request's head did not arrive within CHAT_HEADER_TIMEOUT."""


def plain_response(status, message, retry_after=None):
    """A whole HTTP response that closes the connection, for refusals made before any request is read."""
    body = f"{message}\n".encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n" + \
        (f"Retry-After: {retry_after}\r\n" if retry_after else "") + f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


BUSY = plain_response("503 Service Unavailable", "The server is at its connection limit; try again soon.", 5)
OVER_SHARE = plain_response("429 Too Many Requests", "Your address has too many connections open here; close some.", 5)
# gevent answers a request head it cannot read with an empty body; these say why, in one line.
BAD_HEADS = {"400": plain_response("400 Bad Request", "The request could not be read: its head is malformed."),
             "414": plain_response("414 URI Too Long", "The request's URL is longer than 8 KB."),
             "431": plain_response("431 Request Header Fields Too Large",
                                   "The request's headers are too large (at most 100 lines of 64 KB).")}


SEND_BUFFER = 256 * 1024  # bytes the kernel holds for one client: plenty for tokens, bounded for a stuck reader


class Server(WSGIServer):
    """gevent's WSGI server with TCP_NODELAY, a cap on open connections, and timeouts on every socket."""

    handler_class = Handler
    backlog = 1024  # connections waiting (gevent: 128, which a wave of a few hundred overflowed: some were reset)
    max_accept = 1  # taken per turn of the loop (gevent: 100): a crowd one by one, tokens flowing in between

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections = 0
        self.by_address = collections.Counter()  # client address key -> connections counted for it

    def admit(self, key):
        """Count one more connection for this client address, unless it holds its share (CHAT_CONNECTIONS_PER_ADDRESS)."""
        if self.by_address[key] >= settings.address_share:
            return False
        self.by_address[key] += 1
        return True

    def release(self, key):
        """Count one connection less for this client address (None: not counted)."""
        if key is not None:
            self.by_address[key] -= 1
            if self.by_address[key] <= 0:
                del self.by_address[key]

    def handle(self, sock, address):
        """Refuse past the connection cap; otherwise set TCP_NODELAY and the write timeout, then serve."""
        if self.connections >= settings.max_connections:
            log_limited("connections", "refused a connection: %d open, the limit (CHAT_MAX_CONNECTIONS)",
                        self.connections)
            with contextlib.suppress(OSError):
                sock.sendall(BUSY)
            sock.close()
            return None
        self.connections += 1
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small token frames go out at once
            # Every blocking send or receive gives up after this: a reader that stops reading, or an idle connection.
            sock.settimeout(settings.write_timeout * random.uniform(1, 1.1))  # spread, as the heads' deadlines
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)  # else up to 4 MB for a stuck reader
            # The kernel takes more only below this unsent: a stalled reader's tokens soon go through its queue.
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, SLOW_READER_BYTES)
            return super().handle(sock, address)
        finally:
            self.connections -= 1


def build_commit():
    """The short commit hash this copy was built from (ship/build.py writes COMMIT) or runs from."""
    try:
        with open(os.path.join(HERE, "COMMIT"), encoding="ascii") as f:
            return f.read().strip() or "unknown"
    except OSError:
        pass
    import subprocess  # only here: a source checkout asks git, once, for --version
    try:
        out = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def settings_help():
    """The --help epilog: every environment variable of SETTINGS, what it does and its default."""
    import textwrap  # only for --help
    lines = ["environment (flags override them):"]
    for entry in SETTINGS:
        name = entry.env + (f" ({entry.flag})" if entry.flag else "")
        lines += textwrap.wrap(f"{entry.help} ({entry.shown})", 96, initial_indent=f"  {name:<34} ",
                               subsequent_indent=" " * 37, break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def settings_table(common=False):
    """SETTINGS as the Markdown table the docs show (common: only the README's short list)."""
    rows = ["| environment | flag | what it does | default |", "|---|---|---|---|"]
    for entry in SETTINGS:
        if entry.common or not common:
            rows.append(f"| `{entry.env}` | {f'`{entry.flag}`' if entry.flag else '—'} | {entry.help} | "
                        f"{entry.shown} |")
    return "\n".join(rows) + "\n"


class VersionAction(argparse.Action):
    """--version: asks git for the commit only when someone wants to know."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"chat.py {VERSION} ({build_commit()})")
        parser.exit()


def parse_args(argv):
    """Command-line flags; each overrides its environment variable."""
    p = argparse.ArgumentParser(prog="chat.py", description="A chat page that streams LLM answers token by token.",
                                epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    for entry in SETTINGS:
        if entry.flag:
            p.add_argument(entry.flag, dest=entry.name, type=entry.parse if entry.parse is int else None,
                           help=f"{entry.help} (env {entry.env}; default {entry.shown})")
    p.add_argument("--debug", action="store_true", help="log tracebacks and reload templates")
    p.add_argument("--version", action=VersionAction, nargs=0,
                   help="print the version and the commit it was built from, then exit")
    p.add_argument("command", nargs="*", metavar="user add|passwd|del|list [NAME]",
                   help="manage the accounts of CHAT_AUTH=accounts in the database (--db or CHAT_DATABASE_URL); "
                        "a password is read from standard input")
    return p.parse_intermixed_args(argv)


def user_command(words):
    """`chat.py user add|passwd|del|list [NAME]`: manage accounts; returns the exit status."""
    action, name = (words[1:] + [None])[:2] if len(words) <= 3 else (None, None)
    if words[0] != "user" or action not in ("add", "passwd", "del", "list") or (action != "list") != bool(name):
        print("usage: chat.py user add NAME | user passwd NAME | user del NAME | user list", file=sys.stderr)
        return 2
    if action == "list":
        for row in store.users():
            print(f"{row['name']}\t{row['conversations']} conversation(s)\t"
                  f"{'password' if row['has_password'] else 'proxy sign-in only'}")
        return 0
    name = user_key(name)
    if not valid_user_name(name):
        print(f"{name!r} is not a user name: 1 to 128 characters, no spaces or slashes", file=sys.stderr)
        return 2
    user = store.user(name)
    if action == "del":
        if user is None:
            print(f"there is no user {name}", file=sys.stderr)
            return 1
        print(f"deleted {name} and {store.delete_user(name)} conversation(s); their sessions are ended")
        return 0
    if (user is None) != (action == "add"):
        print(f"there is {'already a' if user else 'no'} user {name}", file=sys.stderr)
        return 1
    password = read_password()
    if not password:
        return 1
    if action == "add":
        store.add_user(name, password_hash(password))
        print(f"added {name}")
    else:
        store.set_password(name, password_hash(password))
        print(f"changed the password of {name}; their sessions are ended")
    return 0


def read_password():
    """A new password: asked twice at a terminal, else one line of standard input (for scripts); '' if refused."""
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass("New password: ")
        if getpass.getpass("Again: ") != password:
            print("the two passwords differ", file=sys.stderr)
            return ""
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password or len(password) > 1024:
        print("a password is 1 to 1,024 characters", file=sys.stderr)
        return ""
    if len(password) < 8:
        print("warning: a password under 8 characters is easy to guess", file=sys.stderr)
    return password


def main(argv=None):
    """Parse flags, bind the server and serve forever."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for entry in SETTINGS:
        if entry.flag and getattr(args, entry.name) is not None:
            setattr(settings, entry.name, getattr(args, entry.name))
    if settings.base_url:
        settings.base_url = settings.base_url.rstrip("/")
    worker = os.environ.get("CHAT_WORKER")
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,  # a worker says which it is
                        format="%(asctime)s %(levelname)s %(name)s" + ("[%(process)d]" if worker else "") +
                               ": %(message)s")
    bottle.debug(args.debug)
    if args.command:
        try:
            sys.exit(user_command(args.command))
        finally:
            store.close()
    if settings.workers > 1 and not worker:
        if not settings.redis_url:
            log.error("--workers %d needs CHAT_REDIS_URL: the workers share their answers through Redis",
                      settings.workers)
            sys.exit(2)
        if not settings.port:
            log.error("--workers needs a fixed --port (each worker binds it)")
            sys.exit(2)
        from chat_scale import run_workers  # several processes share their answers through Redis: scale-out
        sys.exit(run_workers(settings.workers))
    listener = (settings.host, settings.port)
    if worker:  # it binds the port with SO_REUSEPORT: the kernel spreads new connections over the workers
        from chat_scale import reuse_port_listener
        listener = reuse_port_listener(settings.host, settings.port)
    server = Server(listener, app, log=logging.getLogger("chat.access"), error_log=logging.getLogger("chat.error"))
    server.init_socket()
    try:
        store.db  # noqa: B018 — open and migrate the database now: a bad path fails at start, not at the first message
    except Exception as exc:  # noqa: BLE001 — any failure here (a path, a server, a driver) ends the start
        log.error("cannot open the database: %s", redact_url(str(exc)))
        sys.exit(2)
    try:
        streams.open()
    except UnsafeJournal as exc:
        log.error("refusing to start: %s", exc)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001
        log.error("cannot reach Redis (CHAT_REDIS_URL): %s" if settings.redis_url else
                  "cannot open the journal of unsaved text: %s", redact_url(str(exc)))
        sys.exit(2)
    if settings.password and accounts():
        log.warning("CHAT_PASSWORD is ignored: people sign in as users (CHAT_AUTH or CHAT_AUTH_HEADER)")
    if settings.auth_header:
        log.info("%s names the user when it comes from %s: anything there can sign in as anyone",
                 settings.auth_header, ", ".join(map(str, settings.trusted_proxies)))
    settings.port = server.server_port  # --port 0 picks a free port; the demo needs the real one
    log.info("chat.py on http://%s:%d/ — upstream: %s", settings.host, settings.port, settings.upstream_label())
    sys.setswitchinterval(0.0002)  # a render thread hands the GIL back this often, not every 5 ms: tokens wait for it
    gc.collect()
    gc.freeze()  # everything loaded so far lives as long as the process: out of the collector's way
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, SIGTERM (systemd, docker): quietly, answers saved
        gevent.signal_handler(signum, server.stop, 1)
    gevent.spawn(housekeeping_forever)
    server.serve_forever()
    shutdown()


def shutdown():
    """Save what is streaming, mark it interrupted, and close the database."""
    log.info("shutting down")
    live = [s.greenlet for s in streams.by_id.values() if not s.finished and s.greenlet]
    gevent.killall(live, ServerStopping, block=True, timeout=3)
    streams.drain()
    streams.close()
    store.close()


if __name__ == "__main__":
    main()
