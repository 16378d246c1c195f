from gevent import monkey; monkey.patch_all()  # noqa: E702 — must run before anything imports socket
# gevent must patch socket, ssl, select and threading before requests, urllib3 or chat.py
# import them: the fake upstream, chat.py's relay greenlets, the gevent server and the
# test's own HTTP clients all share one hub, so one unpatched blocking call would freeze
# every one of them (and the test would hang instead of failing).

# Tests for chat.py: a real loopback fake upstream replays the sample streams of
# testdata/streams byte for byte (whole, one byte per chunk, random chunk boundaries;
# chunked and close-delimited; with and without a charset), WIRE.md variations built as
# bytes here, SSE framing against SPEC §4, escaping, input limits, a real gevent server for
# everything that depends on timing, the built-in demo model, and the README run command.
#
# Random chunk boundaries use a seed printed by each test (shown on failure); rerun with
# CHAT_TEST_SEED=<seed> to replay the same boundaries.

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import html  # noqa: E402
import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tomllib  # noqa: E402
import urllib.parse  # noqa: E402
import zlib  # noqa: E402
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
import chat_scale  # noqa: E402

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
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Point chat.py at nothing real (no env upstream, key, proxy or database) and leave no stream running."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(chat.settings, "base_url", "http://127.0.0.1:9/v1")  # discard port: refused
    monkeypatch.setattr(chat.settings, "api_key", None)
    monkeypatch.setattr(chat.settings, "model", "test-model")
    monkeypatch.setattr(chat.settings, "password", None)
    monkeypatch.setattr(chat, "store", chat.Store(str(tmp_path / "chat.db")))
    monkeypatch.setattr(chat, "catalog", chat.ModelCatalog())
    monkeypatch.setattr(chat, "limits", chat.Limits())
    web.cookies.clear()
    yield
    for stream in list(chat.streams.by_id.values()):
        if stream.greenlet:
            stream.greenlet.kill(block=True, timeout=2)
    chat.streams.by_id.clear()
    chat.streams.by_owner.clear()
    chat.streams.unsaved.clear()
    chat.store.close()


PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)), None)


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL cluster of the suite's own: initdb and pg_ctl as the postgres user, fsync off, a free port."""
    if PG_BIN is None or importlib.util.find_spec("psycopg") is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL or psycopg is missing under CI (apt-get install postgresql; "
                        "pip install -r requirements-scale.txt)")
        pytest.skip("no PostgreSQL here (apt-get install postgresql; pip install -r requirements-scale.txt)")
    root = Path(tempfile.mkdtemp(prefix="chat-pg-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    if as_postgres:
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "chat", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off", "start"], check=True, capture_output=True, timeout=60)
    try:
        yield f"postgresql://chat@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_closing_postgresql_waits_for_the_statement_running_on_it(postgres_url):
    """Closing the database while another greenlet's statement runs (the janitor's save at shutdown) waits for it:
    closing the connection under it freed what libpq still used, and the process crashed. Later statements fail
    with a database error instead of waiting forever."""
    db = chat_scale.PostgresDatabase(postgres_url, size=2)
    running = gevent.spawn(db.execute, "SELECT pg_sleep(0.3) AS slept")
    wait_until(lambda: db.pool.qsize() == 1, what="the statement to take a connection")
    db.close()
    assert running.get(timeout=5).fetchall() == [("",)]
    assert all(connection.closed for connection in db.connections)
    with pytest.raises(db.psycopg.OperationalError):
        db.execute("SELECT 1")


# The storage tests run against both databases (pytest_generate_tests below parametrizes them).
BOTH_DATABASES = {
    "test_every_request_sends_the_conversation_so_far", "test_new_conversation_gets_a_url_a_title_and_a_sidebar_entry",
    "test_answer_is_stored_with_its_facts", "test_user_message_is_stored_before_the_upstream_answers",
    "test_partial_answer_is_flushed_while_streaming", "test_killed_server_restarts_with_the_partial_answer",
    "test_other_owner_gets_404_for_conversation_stream_and_export", "test_export_round_trip",
    "test_rename_changes_the_title", "test_delete_removes_the_rows", "test_regenerate_keeps_the_earlier_answer",
    "test_streams_per_owner_are_limited", "test_concurrent_streams_leave_the_database_consistent",
    "test_edit_makes_a_sibling_and_sends_the_branch_shown",
    "test_switching_versions_shows_that_branch_and_survives_a_reload",
    "test_exports_hold_every_branch_in_json_and_the_shown_one_in_markdown",
    "test_search_finds_titles_and_content_of_this_owner_only", "test_a_search_hit_in_another_branch_opens_that_branch",
    "test_parameters_reach_the_upstream_only_when_set", "test_a_saved_system_prompt_starts_new_chats",
    "test_a_stranger_cannot_switch_or_edit_branches", "test_logout_revokes_the_session_on_the_server",
    "test_the_storage_quota_refuses_and_writes_nothing", "test_cookieless_sends_are_limited_per_address",
    "test_password_guards_everything_but_login_and_static", "test_roles_alternate_after_an_empty_answer",
    "test_an_unsigned_owner_cookie_from_an_older_version_keeps_its_conversations",
}


# The page's streaming, reload and Stop checks run also through nginx in front of two processes sharing Redis.
BOTH_DEPLOYMENTS = {
    "test_page_shows_tokens_while_the_upstream_streams", "test_done_bubble_renders_markdown_code_and_crlf",
    "test_reload_mid_answer_shows_everything_once", "test_stop_closes_the_upstream_and_keeps_the_partial_answer",
    "test_send_becomes_stop_while_an_answer_streams",
}


def pytest_generate_tests(metafunc):
    """Run the storage tests once on SQLite and once on PostgreSQL, and some page tests on two processes."""
    if metafunc.function.__name__ in BOTH_DATABASES:
        metafunc.parametrize("database", ["sqlite", "postgresql"], indirect=True)
    if metafunc.function.__name__ in BOTH_DEPLOYMENTS:
        metafunc.parametrize("live_chat", ["one process", "two behind nginx"], indirect=True, scope="module")


@pytest.fixture(autouse=True)
def database(request, monkeypatch, isolated):
    """chat.py's store: the SQLite file of `isolated`, or (parametrized) a fresh schema in the suite's PostgreSQL."""
    if getattr(request, "param", "sqlite") == "postgresql":
        import psycopg
        url = request.getfixturevalue("postgres_url")
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        monkeypatch.setattr(chat, "store", chat.Store(url=url))
        monkeypatch.setattr(chat.settings, "database_url", url)
    return getattr(request, "param", "sqlite")


@pytest.fixture
def upstream(monkeypatch):
    """A fake upstream on a random loopback port, with chat.py configured to use it."""
    fake = FakeUpstream()
    fake.serve("openai-basic.sse")  # a plain answer until the test serves something else
    monkeypatch.setattr(chat.settings, "base_url", fake.url)
    yield fake
    fake.stop()


@pytest.fixture
def client():
    """chat.app in process through WebTest (lint on), as a browser on this machine."""
    return htmx_app()


def htmx_app():
    """A WebTest client that speaks like the page: from this machine, every request marked HX-Request."""
    return webtest.TestApp(chat.app, extra_environ={"REMOTE_ADDR": "127.0.0.1", "HTTP_HX_REQUEST": "true"})


def plain_app():
    """A WebTest client like a browser without JavaScript: plain forms and links, no HX-Request."""
    return webtest.TestApp(chat.app, extra_environ={"REMOTE_ADDR": "127.0.0.1"})


@pytest.fixture
def server():
    """chat.app on a real gevent chat.Server on a random loopback port; yields its base URL."""
    srv = chat.Server(("127.0.0.1", 0), chat.app, log=None)
    srv.start()
    url = f"http://127.0.0.1:{srv.server_port}"
    SERVERS[url] = srv
    yield url
    srv.stop(timeout=2)
    del SERVERS[url]


SERVERS = {}  # base URL -> the chat.Server the server fixture started


@pytest.fixture
def open_sse(server):
    """Open /events readers on the real server; all are closed at teardown."""
    readers = []

    def open_reader(stream_id, last_event_id=None):
        reader = SSEReader(server, stream_id, last_event_id)
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


@pytest.fixture
def seed(request):
    """A per-test seed for random chunk boundaries, printed so a failure can be replayed."""
    value = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (1 << 31)
    print(f"random chunk boundaries: CHAT_TEST_SEED={BASE_SEED} (this test's seed {value})")
    return value


@pytest.fixture
def demo(server, monkeypatch):
    """chat.py on its built-in demo model, served by the real server itself."""
    monkeypatch.setattr(chat.settings, "base_url", None)
    monkeypatch.setattr(chat.settings, "model", None)
    monkeypatch.setattr(chat.settings, "port", int(server.rsplit(":", 1)[1]))
    monkeypatch.setattr(chat.settings, "demo_delay", 0)
    return server


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
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def chat_process(tmp_path):
    """`python chat.py --port <free port>` on the demo model, running from the repo; yields its base URL."""
    app = ChatProcess(tmp_path / "chat.log", CHAT_DB=str(tmp_path / "chat.db"), CHAT_DEMO_DELAY="0.001")
    yield app.url
    app.stop()


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
        self.events, self.comments = parse_sse(raw)

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

    def __init__(self, base, stream_id, last_event_id=None):
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        self.response = web.get(f"{base}/events", params={"stream": stream_id}, headers=headers,
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
# The sample streams: parsed directly, and relayed end to end
# ---------------------------------------------------------------------------

CHUNKINGS = ("whole", "bytes", "random")


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("name", SSE_FILES)
def test_sample_stream_parses_as_expected(name, chunking, seed):
    """LineSplitter + SSEParser + Completion extract what expected.json says, whatever the read boundaries."""
    body, expect = (STREAMS_DIR / name).read_bytes(), EXPECTED[name]["expect"]
    completion = parse_stream(body, cut_points(len(body), chunking, seed))
    assert "".join(completion.content) == expect["content"]
    assert "".join(completion.reasoning) == expect["reasoning"]
    assert completion.finish_reason == expect["finish_reason"]
    if not expect["error"]:
        # After an error the parser stops (WIRE.md §5.5), so a [DONE] that follows is never read.
        assert completion.done_marker == expect["done_marker"]
    assert (completion.usage is not None) == expect["usage_present"]
    assert [completion.tool_calls[i] for i in sorted(completion.tool_calls)] == expect["tool_calls"]
    assert completion.error == (expect["error"] and expect["error"]["message"])


@pytest.mark.parametrize("name", HTTP_FILES)
def test_sample_error_body_gives_its_message(name):
    """body_message() finds the human message in each sample error response."""
    body = (STREAMS_DIR / name).read_bytes().partition(b"\r\n\r\n")[2]
    assert chat.body_message(body) == EXPECTED[name]["expect"]["error_message"]


@pytest.mark.parametrize("charset", (True, False), ids=("charset", "no-charset"))
@pytest.mark.parametrize("transfer", ("chunked", "close"))
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("name", SSE_FILES)
def test_sample_stream_is_relayed(client, upstream, name, chunking, transfer, charset, seed):
    """Each sample, replayed over loopback, reaches the browser token by token and ends in the right bubble."""
    expect = EXPECTED[name]["expect"]
    content, reasoning = shown_answer(expect)
    upstream.serve(name, transfer=transfer, chunking=chunking, seed=seed, charset=charset)

    transcript = relay(client)

    assert transcript.raw.startswith(b": connected\nretry: 1000\n\n")
    assert b"\r" not in transcript.raw
    assert transcript.ids == list(range(1, len(transcript.events) + 1))
    assert transcript.message == content
    # Inline <think>: the newline before </think> is part of the relayed thought; the bubble trims it.
    assert (transcript.reasoning.rstrip("\r\n") if content != expect["content"] else transcript.reasoning) == reasoning
    bubble = transcript.done
    assert source_text(bubble) == content
    assert reasoning_text(bubble) == reasoning
    if content:
        assert elements(bubble, "div", cls="markdown", **{"hx-disable": None})
    if reasoning:
        (details,) = elements(bubble, "details", cls="reasoning")
        assert "open" not in details.attrs
    if expect["error"]:
        assert len(alerts(bubble)) == 1
        assert expect["error"]["message"] in alerts(bubble)[0]
        assert html.escape(expect["error"]["message"]) in bubble
    else:
        assert alerts(bubble) == []
    expected_notes = [f"The model asked to run the tool {call['name']}({call['arguments']}); chat.py runs no tools."
                      for call in expect["tool_calls"]]
    if expect.get("truncation"):
        expected_notes.insert(0, chat.NOTES["truncated"])
    assert notes(bubble) == expected_notes
    if expect["finish_reason"]:
        assert f"finish: {expect['finish_reason']}" in footer(bubble)
    if expect["usage_present"]:
        assert re.search(r"\d+ in / \d+ out tokens", footer(bubble))


@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("name", HTTP_FILES)
def test_sample_error_response_is_shown(client, upstream, name, chunking, seed):
    """Each sample error response, written verbatim, ends the bubble with its message in an alert."""
    upstream.serve(name, chunking=chunking, seed=seed)
    status = int((STREAMS_DIR / name).read_bytes().split(b" ", 2)[1])

    transcript = relay(client)

    assert transcript.message == ""
    (alert,) = alerts(transcript.done)
    assert str(status) in alert
    assert EXPECTED[name]["expect"]["error_message"] in alert
    assert_still_serving(client, upstream)


def test_read_completion_yields_deltas_from_a_live_response(upstream):
    """read_completion() over a real requests response yields the reasoning and content deltas in order."""
    upstream.serve("vllm-reasoning.sse", transfer="close", chunking="bytes")
    response = requests.post(upstream.url + "/chat/completions", json={}, stream=True, timeout=5)
    completion = chat.Completion()

    deltas = list(chat.read_completion(response, completion))

    assert "".join(t for k, t in deltas if k == "reasoning") == "Okay, 9.11 vs 9.8."
    assert "".join(t for k, t in deltas if k == "content") == "9.8 is greater."
    assert [k for k, _ in deltas] == sorted((k for k, _ in deltas), key=("reasoning", "content").index)
    assert completion.done_marker and completion.finish_reason == "stop"


def test_request_to_upstream_is_a_streaming_chat_completion(client, upstream):
    """chat.py POSTs the prompt to /chat/completions with stream, include_usage and the model."""
    upstream.serve("openai-basic.sse")
    relay(client, "What is 2+2?")
    request = upstream.last
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.json["stream"] is True
    assert request.json["stream_options"] == {"include_usage": True}
    assert request.json["model"] == "test-model"
    assert request.json["messages"][-1] == {"role": "user", "content": "What is 2+2?"}


# ---------------------------------------------------------------------------
# WIRE.md variations the sample files do not cover
# ---------------------------------------------------------------------------

# A CRLF stream whose JSON spans two data: lines (to be cut between every CR and its LF).
_MULTILINE_CRLF = (ROLE + b'data: {"choices":[{"index":0,\ndata: "delta":{"content":"Hi"}}]}\n\n'
                   + data(choice({"content": " there"})) + FINISH + DONE).replace(b"\n", b"\r\n")
_BARE_CR = answer("Hi", " there").replace(b"\n", b"\r")
_OPENROUTER_ERROR = {"choices": [{"index": 0, "delta": {"content": " world"}, "finish_reason": "error"}],
                     "error": {"message": "Provider returned error", "code": 502}}

WIRE_VARIATIONS = [
    pytest.param(_BARE_CR, {}, dict(content="Hi there"), id="bare-cr-line-endings"),
    pytest.param(_BARE_CR, {"chunking": "bytes"}, dict(content="Hi there"), id="bare-cr-one-byte-per-chunk"),
    pytest.param(_MULTILINE_CRLF, {"chunking": cuts_after(_MULTILINE_CRLF, b"\r")}, dict(content="Hi there"),
                 id="crlf-split-between-cr-and-lf"),
    pytest.param(ROLE + data(choice({"content": "Kimi"}), prefix=b"data:") + FINISH + b"data:[DONE]\n\n", {},
                 dict(content="Kimi"), id="data-without-space"),
    pytest.param(ROLE + data(choice({"content": "Hel"})) + b'event: error\ndata: {"error":{"message":'
                 b'"Overloaded, try later"}}\n\n', {}, dict(content="Hel", alert="Overloaded, try later"),
                 id="event-error-json"),
    pytest.param(ROLE + data(choice({"content": "Hel"})) + b"event: error\ndata: upstream exploded\n\n", {},
                 dict(content="Hel", alert="upstream exploded"), id="event-error-text"),
    pytest.param(ROLE + data(choice({"content": "Hel"})) + b'error: {"code":500,"message":"llama legacy '
                 b'failure","type":"server_error"}\n\n' + DONE, {},
                 dict(content="Hel", alert="llama legacy failure"), id="legacy-llamacpp-error-field"),
    pytest.param(ROLE + data({"choices": None, "id": "x"}) + data(choice({"content": "Hel"}))
                 + data({"id": "no-choices-at-all"}) + data({"choices": []}) + data(choice({"content": "lo"}))
                 + FINISH + DONE, {}, dict(content="Hello"), id="choices-null-missing-empty"),
    pytest.param(ROLE + data(choice(None, content_filter_results={"hate": {"filtered": False}}))
                 + data(choice({"content": "Azure"})) + FINISH + DONE, {}, dict(content="Azure"),
                 id="choice-without-delta"),
    pytest.param(ROLE + data(choice({"content": "Kimi"})) + data(choice({}, "stop", usage={
                 "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7})) + DONE, {},
                 dict(content="Kimi", footer="5 in / 2 out tokens"), id="usage-inside-choice"),
    pytest.param(ROLE + data(choice({"content": "Groq"})) + data({**choice({}, "stop"), "x_groq": {"usage": {
                 "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}}) + DONE, {},
                 dict(content="Groq", footer="7 in / 3 out tokens"), id="usage-under-x-groq"),
    pytest.param(ROLE + data(choice({"reasoning_content": "Think.", "reasoning": "Think."}))
                 + data(choice({"content": "Answer."})) + FINISH + DONE, {},
                 dict(content="Answer.", reasoning="Think."), id="reasoning-content-and-reasoning-taken-once"),
    pytest.param(ROLE + data(choice({"reasoning_details": [{"type": "reasoning.text", "text": "Deep."}]}))
                 + data(choice({"content": "Answer."})) + FINISH + DONE, {},
                 dict(content="Answer.", reasoning="Deep."), id="reasoning-details"),
    pytest.param(ROLE + data(choice({"reasoning": "Hmm.", "reasoning_details": [
                 {"type": "reasoning.text", "text": "Hmm."}]})) + data(choice({"content": "Ok."})) + FINISH + DONE,
                 {}, dict(content="Ok.", reasoning="Hmm."), id="reasoning-and-reasoning-details-taken-once"),
    pytest.param(answer("Done.") + data(choice({"content": " JUNK"})) + b"garbage line\n\n" + DONE, {},
                 dict(content="Done."), id="done-followed-by-junk"),
    pytest.param(answer("Fin.", done=False), {}, dict(content="Fin.", footer="finish: stop"),
                 id="finish-reason-without-done"),
    pytest.param(answer("Half an", finish=None, done=False), {},
                 dict(content="Half an", note=chat.NOTES["truncated"]), id="eof-without-done-or-finish"),
    pytest.param(answer("Long", finish="length"), {}, dict(content="Long", note="cut off"), id="finish-length"),
    pytest.param(answer("Bad", finish="content_filter"), {}, dict(content="Bad", note="content filter"),
                 id="finish-content-filter"),
    pytest.param(ROLE + data(choice({"content": "Hello"})) + data(_OPENROUTER_ERROR), {},
                 dict(content="Hello world", alert="Provider returned error"), id="openrouter-error-with-content"),
    pytest.param(ROLE + data(choice({"content": "Par"})) + b'data: {"error":"Input validation error: tgi"}\n\n'
                 + DONE, {}, dict(content="Par", alert="Input validation error: tgi"), id="data-error-string"),
    pytest.param(ROLE + data(choice({"content": "Par"})) + b'data: {"object":"error","message":"flat failure",'
                 b'"type":"BadRequestError","param":null,"code":400}\n\n' + DONE, {},
                 dict(content="Par", alert="flat failure"), id="flat-object-error-midstream"),
    pytest.param(ROLE + data(choice({"content": None, "refusal": "I can't help with that."})) + FINISH + DONE,
                 {}, dict(content="I can't help with that."), id="refusal-shown-as-content"),
    pytest.param(ROLE + data(choice({"content": "a\u2028b c\u0085d \u2029e"})) + FINISH + DONE, {},
                 dict(content="a\u2028b c\u0085d \u2029e"), id="raw-u2028-u0085-u2029-in-json"),
    pytest.param(b":\n\n: keep-alive\n\n: OPENROUTER PROCESSING\n\n: ping - 2025-01-01 00:00:00\n\n"
                 + ROLE + b"data:\n\ndata: \n\n" + data(choice({"content": "Ok"})) + FINISH + DONE, {},
                 dict(content="Ok"), id="comments-and-empty-data-skipped"),
    pytest.param(b"id: 7\nretry: 100\n" + ROLE + b"foo: bar\n" + data(choice({"content": "Ok"})) + FINISH + DONE,
                 {}, dict(content="Ok"), id="id-retry-and-unknown-fields-ignored"),
    pytest.param(ROLE + b"data: not json at all\n\n" + data(choice({"content": "Ok"})) + FINISH + DONE, {},
                 dict(content="Ok"), id="non-json-event-skipped"),
    pytest.param(ROLE + data({"choices": [{"index": 1, "delta": {"content": "other"}},
                                          {"index": 0, "delta": {"content": "mine"}}]}) + FINISH + DONE, {},
                 dict(content="mine"), id="only-choice-index-0"),
    pytest.param(answer("No", " header"), {"content_type": None}, dict(content="No header"),
                 id="no-content-type-header"),
    pytest.param(answer("Hi", " there"), {"transfer": "close", "chunking": "bytes"}, dict(content="Hi there"),
                 id="close-delimited-one-byte-writes"),
    pytest.param(json.dumps({"id": "x", "object": "chat.completion", "model": "fake-model", "choices": [
                 {"index": 0, "message": {"role": "assistant", "content": "Whole answer."}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode(),
                 {"content_type": "application/json", "transfer": "length"},
                 dict(content="Whole answer.", footer="3 in / 2 out tokens"), id="application-json-200-not-streamed"),
    pytest.param(b"<!doctype html><html><head><title>Site maintenance</title></head><body><h1>Back soon"
                 b"</h1></body></html>", {"content_type": "text/html; charset=utf-8", "transfer": "length"},
                 dict(alert="Site maintenance"), id="text-html-200"),
]


@pytest.mark.parametrize("body, reply, expect", WIRE_VARIATIONS)
def test_wire_variation(client, upstream, body, reply, expect):
    """Each WIRE.md variation: the right tokens, reasoning, alert, note and footer; serving goes on."""
    upstream.serve(body, **reply)

    transcript = relay(client)

    assert transcript.message == expect.get("content", "")
    assert transcript.reasoning == expect.get("reasoning", "")
    bubble = transcript.done
    if expect.get("alert"):
        (alert,) = alerts(bubble)
        assert expect["alert"] in alert
    else:
        assert alerts(bubble) == []
    if expect.get("note"):
        (note,) = notes(bubble)
        assert expect["note"] in note
    else:
        assert notes(bubble) == []
    if expect.get("footer"):
        assert expect["footer"] in footer(bubble)
    if expect.get("alert"):
        assert_still_serving(client, upstream)


ERROR_RESPONSES = [
    pytest.param(401, "application/json", b'{"error":{"message":"Incorrect API key provided.","type":'
                 b'"invalid_request_error","param":null,"code":"invalid_api_key"}}', "Incorrect API key provided.",
                 id="401-json"),
    pytest.param(404, "application/json", b'{"error":{"message":"The model `nope` does not exist","type":'
                 b'"invalid_request_error","code":"model_not_found"}}', "The model `nope` does not exist", id="404-json"),
    pytest.param(429, "application/json", b'{"error":{"message":"Rate limit reached for requests","type":'
                 b'"requests","code":"rate_limit_exceeded"}}', "Rate limit reached for requests", id="429-json"),
    pytest.param(500, "application/json", b'{"error":{"message":"Internal server error","code":500}}',
                 "Internal server error", id="500-json"),
    pytest.param(422, "application/json", b'{"error":"Input validation error: `inputs` tokens + `max_new_tokens`'
                 b' must be <= 4096","error_type":"validation"}',
                 "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096", id="422-tgi-string"),
    pytest.param(400, "application/json", b'{"object":"error","message":"The model `x` does not exist.","type":'
                 b'"NotFoundError","param":null,"code":404}', "The model `x` does not exist.", id="400-vllm-flat"),
    pytest.param(502, "text/plain", b"upstream connect error or disconnect/reset before headers\n",
                 "upstream connect error or disconnect/reset before headers", id="502-plain-text"),
    pytest.param(502, "text/html", b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center>"
                 b"<h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n",
                 "502 Bad Gateway", id="502-nginx-html"),
    pytest.param(503, "text/plain", b"", "(empty response)", id="503-empty-body"),
]


@pytest.mark.parametrize("status, content_type, body, message", ERROR_RESPONSES)
def test_upstream_error_status_is_shown(client, upstream, status, content_type, body, message):
    """A non-2xx answer ends the bubble with the status and the body's message, no markup; serving goes on."""
    upstream.serve(body, status=status, content_type=content_type, transfer="length")

    transcript = relay(client)

    assert transcript.message == ""
    (alert,) = alerts(transcript.done)
    assert str(status) in alert
    assert message in alert
    if body.startswith(b"<"):
        assert "<" not in alert  # the page's text, not its markup
    assert_still_serving(client, upstream)


def test_garbage_instead_of_http_is_an_error(client, upstream):
    """Bytes that are not HTTP at all end the bubble with an alert; serving goes on."""
    upstream.serve(b"this is not HTTP\r\n\r\n", raw=True)
    transcript = relay(client)
    assert transcript.message == ""
    assert len(alerts(transcript.done)) == 1
    assert_still_serving(client, upstream)


def test_connection_refused_is_an_error(client, monkeypatch):
    """An upstream port nobody listens on: the bubble says the server could not be reached (refused)."""
    port = free_port()
    monkeypatch.setattr(chat.settings, "base_url", f"http://127.0.0.1:{port}/v1")

    (alert,) = alerts(relay(client).done)

    assert "Could not reach the model server" in alert
    assert f"127.0.0.1:{port}" in alert
    assert "refused" in alert


def test_upstream_silence_times_out_and_keeps_partial_text(client, upstream, monkeypatch):
    """An upstream that stops sending: after read_timeout the bubble gives up, keeping the text so far."""
    monkeypatch.setattr(chat.settings, "read_timeout", 0.3)
    monkeypatch.setattr(chat.settings, "ping_interval", 0.05)
    body = answer("Partial", " rest")
    upstream.serve(body, hang_at=data(choice({"content": "Partial"})))

    transcript = relay(client)

    assert transcript.message == "Partial"
    assert source_text(transcript.done) == "Partial"
    (alert,) = alerts(transcript.done)
    assert "gave up waiting" in alert
    wait_until(lambda: upstream.last.client_closed.is_set(), what="chat.py to close the silent upstream")
    assert_still_serving(client, upstream)


def test_upstream_silent_before_headers_times_out(client, upstream, monkeypatch):
    """An upstream that accepts but never answers: the bubble gives up after first_byte_timeout."""
    monkeypatch.setattr(chat.settings, "read_timeout", 0.1)
    monkeypatch.setattr(chat.settings, "first_byte_timeout", 0.4)
    monkeypatch.setattr(chat.settings, "ping_interval", 0.05)
    upstream.serve(b"HTTP/1.1 200 OK\r\n", raw=True, hang_at=0)

    started = time.monotonic()
    (alert,) = alerts(relay(client).done)

    assert time.monotonic() - started >= 0.4  # not the (shorter) silence limit
    assert "did not start answering within 0.4 seconds" in alert and "gave up waiting" in alert
    assert_still_serving(client, upstream)


def test_drop_mid_chunked_stream_keeps_partial_answer_and_alerts(client, upstream):
    """The upstream closes in the middle of a chunked body: the partial answer stays, with one alert."""
    upstream.serve(answer("Partial", " rest"), drop_at=data(choice({"content": "Partial"})))

    transcript = relay(client)

    assert transcript.message == "Partial"
    assert source_text(transcript.done) == "Partial"
    assert len(alerts(transcript.done)) == 1
    assert_still_serving(client, upstream)


def test_drop_mid_chunked_stream_says_the_connection_broke_off(client, upstream, caplog):
    """The alert for a broken-off body says so, and it is a warning in the log, not a traceback."""
    upstream.serve(answer("Partial", " rest"), drop_at=data(choice({"content": "Partial"})))

    (alert,) = alerts(relay(client).done)

    assert "broke off" in alert
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def test_drop_mid_close_delimited_stream_is_a_truncated_answer(client, upstream):
    """Without chunked framing an early close looks like EOF: the partial answer gets the truncation note."""
    upstream.serve(answer("Partial", " rest"), transfer="close", drop_at=data(choice({"content": "Partial"})))

    transcript = relay(client)

    assert transcript.message == "Partial"
    assert notes(transcript.done) == [chat.NOTES["truncated"]]
    assert alerts(transcript.done) == []


MULTIBYTE = "进入 ✅ naïve 😀"
_MULTIBYTE_BODY = answer("A", MULTIBYTE)


def test_multibyte_characters_survive_every_split_point():
    """A UTF-8 body cut into two reads at every possible offset parses to the same text."""
    for cut in range(1, len(_MULTIBYTE_BODY)):
        completion = parse_stream(_MULTIBYTE_BODY, [cut])
        assert "".join(completion.content) == "A" + MULTIBYTE, f"cut at byte {cut}"


@pytest.mark.parametrize("char", ["😀", "入", "✅", "ï"])
def test_multibyte_character_split_across_reads_is_relayed_intact(client, upstream, char):
    """Each interior boundary of a multibyte character, split across two separate upstream reads."""
    encoded = char.encode()
    for split in range(1, len(encoded)):
        body = answer("A", f"x{char}y")
        cut = body.index(encoded) + split
        upstream.serve(body, pause_at=cut)
        stream_id = send(client)
        stream = chat.streams.get(stream_id)
        wait_until(lambda: stream.text() == "A", what="the bytes before the split to be relayed")
        upstream.release()
        transcript = read_events(client, stream_id)
        assert transcript.message == f"Ax{char}y", f"split after byte {split} of {char!r}"


def test_crlf_split_across_reads_does_not_break_a_multiline_event():
    """A CR at the end of one read and its LF at the start of the next do not cut a data: event in two."""
    for cut in cuts_after(_MULTILINE_CRLF, b"\r"):
        completion = parse_stream(_MULTILINE_CRLF, [cut])
        assert "".join(completion.content) == "Hi there", f"cut at byte {cut}"
        assert completion.done_marker


def test_line_splitter_splits_on_cr_lf_crlf_only():
    """LineSplitter splits on CR, LF and CRLF, never on U+0085, U+2028 or form feeds."""
    splitter = chat.LineSplitter()
    raw = "a\u0085b\u2028c\x0cd".encode()
    assert splitter.feed(raw + b"\r" + b"e\n" + b"f\r\n" + b"g") == [raw, b"e", b"f"]
    assert splitter.close() == [b"g"]


def test_line_splitter_strips_bom_split_across_reads():
    """A UTF-8 BOM at the start is dropped even when it arrives one byte at a time."""
    splitter = chat.LineSplitter()
    lines = []
    for byte in b"\xef\xbb\xbfdata: x\n\n":
        lines += splitter.feed(bytes([byte]))
    assert lines == [b"data: x", b""]


def test_sse_parser_follows_the_field_rules():
    """SSEParser: one space stripped, data lines joined with LF, comments ignored, event names kept."""
    parser = chat.SSEParser()
    got = [parser.feed(line) for line in
           [b": comment", b"event: delta", b"data:  two spaces", b"data:x", b"id: 4", b""]]
    assert got[-1] == ("delta", " two spaces\nx")
    assert got[:-1] == [None] * 5
    assert parser.feed(b"") is None  # a blank line with no data dispatches nothing
    assert parser.feed(b"data") is None and parser.close() == ("message", "")


def test_completion_ignores_everything_after_done():
    """Events after [DONE] (content, errors, garbage) change nothing."""
    body = answer("Done.") + data(choice({"content": " JUNK"}, "length")) + b'data: {"error":{"message":"x"}}\n\n'
    completion = parse_stream(body)
    assert "".join(completion.content) == "Done."
    assert (completion.finish_reason, completion.error, completion.done_marker) == ("stop", None, True)


def test_completion_takes_finish_reason_only_after_content():
    """Content on the chunk that also carries finish_reason is kept (Gemini, TGI, old Ollama, vLLM)."""
    completion = chat.Completion()
    deltas = completion.apply("message", json.dumps(choice({"content": "last words"}, "stop")))
    assert list(deltas) == [("content", "last words")]
    assert completion.finish_reason == "stop"


def test_completion_accumulates_streamed_tool_call_arguments():
    """Tool-call fragments are joined by index: id and name from the first, arguments from all."""
    completion = chat.Completion()
    completion.apply("message", json.dumps(choice({"tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]})))
    for fragment in ('{"ci', 'ty":"Pa', 'ris"}'):
        completion.apply("message", json.dumps(choice({"tool_calls": [
            {"index": 0, "function": {"arguments": fragment}}]})))
    assert completion.tool_calls == {0: {"id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}}


def test_think_splitter_moves_leading_think_block_to_reasoning():
    """A <think> block split anywhere across deltas becomes reasoning; what follows is the answer."""
    text = "<think>Let me see.</think>The answer."
    for cut in range(1, len(text)):
        splitter = chat.ThinkSplitter()
        pieces = splitter.feed(text[:cut]) + splitter.feed(text[cut:]) + splitter.close()
        assert "".join(t for k, t in pieces if k == "reasoning") == "Let me see.", f"cut at {cut}"
        assert "".join(t for k, t in pieces if k == "message") == "The answer.", f"cut at {cut}"


def test_think_splitter_leaves_text_without_think_alone():
    """Content that does not start with <think> is all answer, even if it mentions the tag later."""
    splitter = chat.ThinkSplitter()
    pieces = splitter.feed("Use <think>") + splitter.feed(" tags.") + splitter.close()
    assert pieces == [("message", "Use <think>"), ("message", " tags.")]


def test_think_tags_split_across_deltas_leave_no_stray_newlines():
    """Newlines after <think> and </think> in their own deltas are not relayed as text."""
    splitter = chat.ThinkSplitter()
    pieces = []
    for delta in ("<think>", "\n", "Okay.", "\n", "</think>", "\n\n", "Hello!"):
        pieces += splitter.feed(delta)
    pieces += splitter.close()
    assert "".join(t for k, t in pieces if k == "message") == "Hello!"
    assert "".join(t for k, t in pieces if k == "reasoning").strip("\n") == "Okay."
    assert not "".join(t for k, t in pieces if k == "reasoning").startswith("\n")


# ---------------------------------------------------------------------------
# SSE framing (SPEC §4) and escaping
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("payload, data_lines", [
    ("one line", ["one line"]),
    ("a\nb", ["a", "b"]),
    ("a\rb", ["a", "b"]),
    ("a\r\nb", ["a", "b"]),
    ("a\n\nb", ["a", "", "b"]),
    ("a\r\n\r\nb", ["a", "", "b"]),
    ("trailing\n", ["trailing", ""]),
    ("", [""]),
    ("x\u2028y\u0085z\u2029w\x0cv", ["x\u2028y\u0085z\u2029w\x0cv"]),
], ids=["single", "lf", "cr", "crlf", "empty-line", "empty-line-crlf", "trailing-newline", "empty", "unicode-breaks"])
def test_sse_frame_data_lines(payload, data_lines):
    """One "data: " line (with its space) per payload line, split on CR, LF and CRLF only; a blank line ends it."""
    frame = chat.sse_frame("message", payload)
    expected = "event: message\n" + "".join(f"data: {line}\n" for line in data_lines) + "\n"
    assert frame == expected.encode()


def test_sse_frame_with_id():
    """The id line comes first when an id is given."""
    assert chat.sse_frame("done", "<p>x</p>", 12) == b"id: 12\nevent: done\ndata: <p>x</p>\n\n"


def test_sse_frame_round_trips_through_a_parser():
    """A multi-line payload framed and parsed again is the same text (with LF line breaks)."""
    payload = "<div>\n  <p>a</p>\r\n\n<p>b</p>\n</div>"
    events, _ = parse_sse(chat.sse_frame("done", payload, 3))
    assert events == [Event(3, "done", payload.replace("\r\n", "\n"))]


HOSTILE = ["<script>alert(1)</script>", " <img src=x onerror=alert(1)>", ' <b hx-get="/x">click</b>',
           " & </span><i>"]


def test_hostile_model_output_is_escaped_in_tokens_and_bubble(client, upstream):
    """Markup from the model is text: never a tag or attribute in message frames or the done bubble."""
    upstream.serve(answer(*HOSTILE))

    transcript = relay(client)

    assert transcript.message == "".join(HOSTILE)
    assert b"<script" not in transcript.raw and b"<img" not in transcript.raw and b"<b " not in transcript.raw
    for event in transcript.events:
        if event.event == "message":
            (span,) = elements(event.data)
            assert (span.tag, span.attrs) == ("span", {})
    assert_no_active_markup(transcript.done)
    assert "".join(HOSTILE).strip() in elements(transcript.done, "div", cls="markdown")[0].text


def test_hostile_reasoning_is_escaped(client, upstream):
    """Markup in reasoning tokens is text too, live and in the finished bubble."""
    upstream.serve(ROLE + data(choice({"reasoning_content": "<script>alert(1)</script>"}))
                   + data(choice({"content": "ok"})) + FINISH + DONE)
    transcript = relay(client)
    assert transcript.reasoning == "<script>alert(1)</script>"
    assert b"<script" not in transcript.raw
    assert reasoning_text(transcript.done) == "<script>alert(1)</script>"


def test_script_in_prompt_is_escaped_in_user_bubble(client, upstream):
    """The user's own markup is shown as text in their bubble and sent to the model unchanged."""
    upstream.serve("openai-basic.sse")
    prompt = '<script>alert(1)</script> <img src=x onerror=alert(1)> hx-get="/x"'
    response = client.post("/streaming", {"prompt": prompt})
    user_bubble = response.text.split('<div class="msg assistant')[0]
    assert "<script" not in user_bubble and "<img" not in user_bubble
    assert_no_active_markup(user_bubble)
    assert elements(user_bubble, "div", cls="bubble")[0].text == prompt
    wait_until(lambda: upstream.requests, what="the upstream request")
    assert upstream.last.json["messages"][-1]["content"] == prompt


def test_non_ascii_prompt_arrives_intact(client, upstream):
    """Non-ASCII form input is intact in the user bubble and in the body the upstream received."""
    upstream.serve("openai-basic.sse")
    prompt = "Grüße 进入 ✅ a\u2028b"
    response = client.post("/streaming", {"prompt": prompt})
    assert elements(response.text, "div", cls="bubble")[0].text == prompt
    wait_until(lambda: upstream.requests, what="the upstream request")
    assert upstream.last.json["messages"][-1]["content"] == prompt


def test_u2028_token_stays_on_one_data_line(client, upstream):
    """A token with raw U+2028 and U+0085 is one data line; CR/LF in a token become separate data lines."""
    upstream.serve(answer("a\u2028b\u0085c", "x\r\ny"))
    transcript = relay(client)
    assert "data: <span>a\u2028b\u0085c</span>\n".encode() in transcript.raw
    assert b"data: <span>x\ndata: y</span>\n" in transcript.raw
    assert transcript.message == "a\u2028b\u0085cx\ny"


def test_streaming_bubble_connects_to_its_events(client, upstream):
    """POST /streaming answers the user bubble and an assistant bubble wired to /events with htmx SSE."""
    upstream.serve("openai-basic.sse")
    response = client.post("/streaming", {"prompt": "Hi"})
    stream_id = re.search(r"stream=([A-Za-z0-9_-]+)", response.text).group(1)
    (bubble,) = elements(response.text, **{"hx-ext": "sse"})
    assert bubble.attrs["sse-connect"] == f"/events?stream={stream_id}"
    assert (bubble.attrs["sse-swap"], bubble.attrs["hx-swap"]) == ("done", "outerHTML")
    (tokens,) = elements(response.text, **{"sse-swap": "message"})
    assert tokens.attrs["hx-swap"] == "beforeend"
    assert len(stream_id) >= 16


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", "   \n\t  "], ids=["empty", "whitespace"])
def test_empty_prompt_is_refused(client, prompt):
    """An empty or blank prompt: 400 with a readable message in an alert, and no stream starts."""
    response = send(client, prompt, status=400)
    (alert,) = alerts(response.text)
    assert "empty" in alert
    assert len(chat.streams) == 0


def test_missing_prompt_field_is_refused(client):
    """A form without a prompt field is refused like an empty one."""
    response = client.post("/streaming", {"other": "x"}, status=400)
    assert len(alerts(response.text)) == 1


def test_prompt_over_the_limit_is_refused(client):
    """32,001 characters: 413 with the length and the limit in a readable alert."""
    response = send(client, "x" * 32_001, status=413)
    (alert,) = alerts(response.text)
    assert "32,001" in alert and "32,000" in alert
    assert len(chat.streams) == 0


def test_prompt_at_the_limit_is_accepted(client, upstream):
    """Exactly 32,000 characters (multibyte, even) is accepted and sent whole."""
    prompt = "é" * 31_999 + "x"
    transcript = relay(client, prompt)
    upstream_prompt = upstream.last.json["messages"][-1]["content"]
    assert len(upstream_prompt) == 32_000 and upstream_prompt == prompt
    assert transcript.finished


def test_healthz_says_ok_and_names_the_upstream(client, upstream):
    """GET /healthz: 200 text starting with ok, naming the upstream it uses."""
    response = client.get("/healthz")
    assert response.content_type == "text/plain"
    assert response.text.startswith("ok")
    assert upstream.url in response.text


def test_stop_unknown_stream_is_404(client):
    """POST /stop for an id we do not have: 404."""
    client.post("/stop?stream=nope", status=404)


def test_unknown_stream_in_process_gets_one_done_event(client):
    """GET /events for an unknown id: 200 and exactly one done event with an error bubble."""
    transcript = read_events(client, "no-such-stream")
    assert transcript.headers["Content-Type"].startswith("text/event-stream")
    assert [(e.id, e.event) for e in transcript.events] == [(1, "done")]
    assert "no longer available" in alerts(transcript.done)[0]


# ---------------------------------------------------------------------------
# Over a real gevent server on loopback (timing matters)
# ---------------------------------------------------------------------------

FIRST = data(choice({"content": "Hello"}))
SLOW_ANSWER = answer("Hello", " there", ",", " friend", ".")


def test_token_reaches_client_while_upstream_still_streams(server, upstream, open_sse):
    """The first token arrives while the upstream is blocked mid-body, not when it finishes."""
    reply = upstream.serve(SLOW_ANSWER, pause_at=FIRST)
    reader = open_sse(post_prompt(server))

    reader.read_until(lambda t: t.message == "Hello", what="the first token")

    assert not upstream.last.answered.is_set() and not reply.gate.is_set()
    upstream.release()
    transcript = reader.read_until(lambda t: t.finished, what="done")
    assert transcript.message == "Hello there, friend."


def test_token_reaches_client_while_close_delimited_upstream_streams(server, upstream, open_sse):
    """Same with a close-delimited (not chunked) upstream body: read1() must not wait for EOF."""
    upstream.serve(SLOW_ANSWER, transfer="close", pause_at=FIRST)
    reader = open_sse(post_prompt(server))
    reader.read_until(lambda t: t.message == "Hello", what="the first token")
    assert not upstream.last.answered.is_set()
    upstream.release()
    assert reader.read_until(lambda t: t.finished).message == "Hello there, friend."


@pytest.mark.parametrize("reconnect", ["while-streaming", "after-done"])
def test_reconnect_with_last_event_id_resumes_without_loss_or_repeat(server, upstream, open_sse, reconnect):
    """Disconnect after one token, reconnect with Last-Event-ID: all events once, ids 1..n with no gap."""
    upstream.serve(SLOW_ANSWER, pause_at=data(choice({"content": ","})))
    assert_resume_without_loss(upstream, post_prompt(server), open_sse, reconnect)


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


def test_second_reader_gets_the_whole_answer(server, upstream, open_sse):
    """A second tab that connects mid-answer gets everything from the log, then the live rest."""
    upstream.serve(SLOW_ANSWER, pause_at=data(choice({"content": " there"})))
    stream_id = post_prompt(server)
    first = open_sse(stream_id)
    first.read_until(lambda t: t.message == "Hello there", what="the first tokens")

    second = open_sse(stream_id)
    second.read_until(lambda t: t.message == "Hello there", what="the backlog")
    upstream.release()
    one = first.read_until(lambda t: t.finished, what="done on the first tab")
    two = second.read_until(lambda t: t.finished, what="done on the second tab")

    assert one.events == two.events
    assert two.message == "Hello there, friend."
    third = open_sse(stream_id).read_until(lambda t: t.finished, what="done for a reader after the end")
    assert third.events == one.events


def test_stop_closes_upstream_and_keeps_partial_answer(server, upstream, open_sse):
    """POST /stop mid-answer: 204, the upstream connection closes, the bubble keeps the text and says Stopped."""
    upstream.serve(SLOW_ANSWER, pause_at=data(choice({"content": " there"})))
    stream_id = post_prompt(server)
    reader = open_sse(stream_id)
    reader.read_until(lambda t: t.message == "Hello there", what="the first tokens")

    response = web.post(f"{server}/stop", params={"stream": stream_id}, timeout=5)

    assert response.status_code == 204
    wait_until(lambda: upstream.last.client_closed.is_set(), timeout=2, what="the upstream to see its connection closed")
    bubble = reader.read_until(lambda t: t.finished, what="done").done
    assert source_text(bubble) == "Hello there"
    assert "Stopped." in notes(bubble)
    assert alerts(bubble) == []
    assert not upstream.last.answered.is_set()


def test_finished_stream_leaves_registry_after_grace(server, upstream, open_sse, monkeypatch):
    """With grace 0.2 s the finished stream is removed; afterwards /events answers 'no longer available'."""
    monkeypatch.setattr(chat.settings, "grace", 0.2)
    stream_id = post_prompt(server)
    open_sse(stream_id).read_to_end()

    wait_until(lambda: len(chat.streams) == 0, timeout=3, what="the registry to empty")

    again = open_sse(stream_id).read_to_end()
    assert "no longer available" in alerts(again.done)[0]


def test_disconnected_reader_is_removed(server, upstream, open_sse, monkeypatch):
    """A reader that hangs up mid-answer is dropped from stream.readers (noticed by the next ping)."""
    monkeypatch.setattr(chat.settings, "ping_interval", 0.05)
    upstream.serve(SLOW_ANSWER, pause_at=FIRST)
    stream_id = post_prompt(server)
    stream = chat.streams.get(stream_id)
    reader = open_sse(stream_id)
    reader.read_until(lambda t: t.message == "Hello", what="the first token")
    assert len(stream.readers) == 1

    reader.close()

    wait_until(lambda: not stream.readers, timeout=3, what="the reader to be removed")
    assert not stream.finished  # generation goes on without readers


def test_unknown_stream_gets_exactly_one_done_event(server):
    """GET /events?stream=<unknown> over HTTP: 200, event-stream, one done event, then the end."""
    response = requests.get(f"{server}/events", params={"stream": "does-not-exist"}, timeout=5)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    transcript = Transcript(response.content)
    assert [(e.id, e.event) for e in transcript.events] == [(1, "done")]
    assert len(alerts(transcript.done)) == 1


def test_event_headers_arrive_before_the_first_token(server, upstream, open_sse):
    """/events headers (event-stream, no-cache, no buffering) arrive while the upstream has sent no body."""
    upstream.serve(SLOW_ANSWER, pause_at=0)
    reader = open_sse(post_prompt(server))

    headers = reader.response.headers
    assert reader.response.status_code == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache"
    assert headers["X-Accel-Buffering"] == "no"
    hello = reader.read_until(lambda t: "connected" in t.comments, what="the hello comment")
    assert hello.events == []
    # The headers may even beat the relay's request to the upstream; either way no body was sent.
    wait_until(lambda: upstream.requests, what="the relay's request upstream")
    assert not upstream.last.answered.is_set()
    upstream.release()
    assert reader.read_until(lambda t: t.finished).message == "Hello there, friend."


def test_idle_reader_gets_pings(server, upstream, open_sse, monkeypatch):
    """While the upstream is quiet, the reader receives ": ping" comments."""
    monkeypatch.setattr(chat.settings, "ping_interval", 0.1)
    upstream.serve(SLOW_ANSWER, pause_at=FIRST)
    reader = open_sse(post_prompt(server))

    reader.read_until(lambda t: "ping" in t.comments, timeout=3, what="a ping")

    upstream.release()
    assert reader.read_until(lambda t: t.finished).message == "Hello there, friend."


def test_generation_goes_on_without_readers(server, upstream):
    """Nobody reading: the answer still completes and stays in the log for a later reader."""
    stream_id = post_prompt(server)
    wait_until(lambda: chat.streams.get(stream_id).finished, what="the stream to finish")
    response = web.get(f"{server}/events", params={"stream": stream_id}, timeout=5)
    assert Transcript(response.content).message == "Hello, World!"


# ---------------------------------------------------------------------------
# Built-in demo model, end to end over the real server
# ---------------------------------------------------------------------------

def test_demo_model_streams_markdown_answer(demo, open_sse):
    """The demo answer streams, says it is the demo model, and renders a list and highlighted Python."""
    transcript = open_sse(post_prompt(demo, "Say hello\nto the demo")).read_until(lambda t: t.finished)

    assert len([e for e in transcript.events if e.event == "message"]) > 10
    assert "This is the demo model built into chat.py" in transcript.message
    assert "> Say hello\n> to the demo" in transcript.message
    bubble = transcript.done
    assert "<ol>" in bubble or "<ul>" in bubble
    assert '<pre><code class="language-python">' in bubble
    assert elements(bubble, "span", cls="k")  # pygments token classes: really highlighted
    assert alerts(bubble) == []
    assert "finish: stop" in footer(bubble)


def test_demo_endpoint_is_off_when_an_upstream_is_configured(client, upstream):
    """/demo/v1/chat/completions answers 404 once a real upstream is set."""
    client.post_json("/demo/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, status=404)


# ---------------------------------------------------------------------------
# The README run command, as a subprocess
# ---------------------------------------------------------------------------

def test_readme_run_command_serves_the_page_and_the_demo(chat_process):
    """The page, the vendored htmx files, /healthz and a demo answer from `python chat.py --port N`."""
    base = chat_process
    healthz = requests.get(f"{base}/healthz", timeout=5)
    assert healthz.text.startswith("ok") and "demo" in healthz.text
    page = requests.get(f"{base}/", timeout=5)
    assert page.status_code == 200
    assert '<textarea name="prompt"' in page.text and 'id="chat-messages"' in page.text
    for path in ("/static/htmx.min.js", "/static/htmx-ext-sse.js"):
        assert requests.get(base + path, timeout=5).status_code == 200, path

    stream_id = post_prompt(base, "hello from the smoke test")
    events = web.get(f"{base}/events", params={"stream": stream_id}, timeout=15)

    transcript = Transcript(events.content)
    assert "demo model" in transcript.message
    assert alerts(transcript.done) == []


def test_chat_scale_gets_the_running_script_as_chat():
    """Run as a script, chat.py is __main__: chat_scale.py's `import chat` must get that module (aliased in
    sys.modules), not load chat.py a second time, which would import chat_scale again half-way and fail."""
    result = subprocess.run([sys.executable, "chat.py", "--version"], cwd=HERE, capture_output=True, text=True,
                            timeout=30, env=clean_env(CHAT_REDIS_URL="redis://127.0.0.1:9/0"))
    assert result.returncode == 0 and result.stdout.startswith("chat.py "), result.stderr
    assert "chat_scale" in subprocess.run(
        [sys.executable, "-c", "import sys, chat; print(' '.join(sorted(sys.modules)))"], cwd=HERE,
        capture_output=True, text=True, timeout=30, env=clean_env(CHAT_REDIS_URL="redis://127.0.0.1:9/0")).stdout
    plain = subprocess.run([sys.executable, "-c", "import sys, chat; print('chat_scale' in sys.modules)"], cwd=HERE,
                           capture_output=True, text=True, timeout=30, env=clean_env())
    assert plain.stdout.strip() == "False", "the defaults must not load chat_scale.py"


def test_the_docs_show_the_settings_table_itself():
    """docs/configuration.md holds every setting as chat.py's SETTINGS renders it, and the README its short list:
    one source, so a setting added, renamed or re-defaulted in chat.py cannot be documented differently."""
    configuration = (HERE / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert chat.settings_table() in configuration, "regenerate: python -c \"import chat; print(chat.settings_table())\""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    assert chat.settings_table(common=True) in readme
    assert len(chat.settings_table(common=True).splitlines()) == 2 + 10  # the ten settings people change most
    assert {entry.env for entry in chat.SETTINGS} == set(re.findall(r"^\| `([A-Z_]+)`", configuration, re.M))


def test_help_documents_every_setting():
    """`python chat.py --help` exits 0 and names every environment variable."""
    result = subprocess.run([sys.executable, "chat.py", "--help"], cwd=HERE, capture_output=True, text=True,
                            timeout=30, env=clean_env(COLUMNS="100"))
    assert result.returncode == 0, result.stderr
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CHAT_MODEL", "HOST", "PORT", "CHAT_DB"):
        assert name in result.stdout, name


# ---------------------------------------------------------------------------
# The README is a first screen whose commands work as pasted; the docs' links lead somewhere
# ---------------------------------------------------------------------------

# On stock Debian 12 and Ubuntu 24.04 there is python3 but no python, and pip refuses to install into the
# system's Python (PEP 668): each command makes a venv and runs the venv's Python.
README_COMMANDS = {
    "## Run it": "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python chat.py",
    "## Test it": "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r requirements-scale.txt"
                  " -r ship/requirements.txt pytest==9.2.0 webtest==3.0.7 playwright==1.65.2"
                  " && .venv/bin/python -m pytest -q",
    "## Deploy": "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r ship/requirements.txt"
                 " && .venv/bin/python ship/build.py",
}


def doc_section(path, heading):
    """The text under a ## heading of a Markdown file of the repository, up to the next ## heading."""
    text = (HERE / path).read_text(encoding="utf-8")
    section = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f"{path} has no {heading} section"
    return section.group(1)


def test_readme_is_a_first_screen_whose_commands_work_as_pasted():
    """README.md fits 250 lines; the first block under Run it, Test it and Deploy is its command, exactly; and
    .ci/run runs the Test it command, exactly."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250, f"README.md has {len(readme.splitlines())} lines"
    for heading, command in README_COMMANDS.items():
        block = re.search(r"^```[^\n]*\n(.*?)^```$", doc_section("README.md", heading), re.M | re.S)
        assert block and block.group(1).strip() == command, f"the first block under {heading}"
    ci_lines = (HERE / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert README_COMMANDS["## Test it"] in ci_lines


def test_docs_links_lead_to_files_that_exist():
    """Every relative link and image in README.md, docs/*.md and bench/README.md names a file or folder that
    exists, without an #anchor (a heading can be renamed unnoticed; a file cannot)."""
    pages = [HERE / "README.md", HERE / "bench" / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S)  # code blocks and spans hold no links
        text = re.sub(r"`[^`\n]*`", "", text)
        targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)
        for target in targets:
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            name = page.relative_to(HERE)
            assert "#" not in target, f"{name}: {target} has an anchor"
            assert (page.parent / target).exists(), f"{name}: {target} does not exist"
            checked += 1
    assert checked >= 20, checked


def test_chat_py_carries_its_requirements_inline():
    """chat.py opens with PEP 723 metadata, so `uv run chat.py` and `pipx run chat.py` work: requirements.txt's
    pins, exactly, and the Python the suite runs on."""
    source = (HERE / "chat.py").read_text(encoding="utf-8")
    assert source.startswith("# /// script\n")
    # PEP 723's reference regular expression.
    blocks = list(re.finditer(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$", source))
    assert [block.group("type") for block in blocks] == ["script"]
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in blocks[0].group("content").splitlines(keepends=True))
    pins = [line.split("#")[0].strip() for line in (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    assert tomllib.loads(content) == {"requires-python": ">=3.11", "dependencies": [pin for pin in pins if pin]}


# ---------------------------------------------------------------------------
# The API key is never rendered
# ---------------------------------------------------------------------------

def test_api_key_is_sent_but_never_shown(client, upstream, monkeypatch, caplog):
    """The key goes to the upstream as a Bearer token and appears in no page, event or log line."""
    caplog.set_level("DEBUG")
    monkeypatch.setattr(chat.settings, "api_key", API_KEY)
    upstream.serve("openai-basic.sse")
    ok = relay(client)
    assert upstream.last.headers["authorization"] == f"Bearer {API_KEY}"

    upstream.serve(b'{"error":{"message":"Incorrect API key provided: sk-secr*******123.","type":'
                   b'"invalid_request_error","code":"invalid_api_key"}}',
                   status=401, content_type="application/json", transfer="length")
    refused = relay(client)
    assert "401" in alerts(refused.done)[0]

    shown = [client.get("/").text, client.get("/healthz").text, ok.raw.decode(), refused.raw.decode(), caplog.text]
    for text in shown:
        assert API_KEY not in text


def test_credentials_in_base_url_are_never_shown(client, monkeypatch, caplog):
    """user:password in OPENAI_BASE_URL stays out of /, /healthz and error bubbles."""
    caplog.set_level("DEBUG")
    port = free_port()
    monkeypatch.setattr(chat.settings, "base_url", f"http://user:pw-secret-9@127.0.0.1:{port}/v1")
    refused = relay(client)
    assert f"127.0.0.1:{port}" in alerts(refused.done)[0]
    for text in (client.get("/").text, client.get("/healthz").text, refused.raw.decode()):
        assert "pw-secret-9" not in text


def test_api_key_echoed_by_upstream_error_is_redacted(client, upstream, monkeypatch):
    """An upstream error body that repeats the key does not put the key on the page."""
    monkeypatch.setattr(chat.settings, "api_key", API_KEY)
    upstream.serve(b'{"error":{"message":"Invalid token sk-secret-123 for this proxy"}}',
                   status=401, content_type="application/json", transfer="length")
    transcript = relay(client)
    assert len(alerts(transcript.done)) == 1
    assert API_KEY not in transcript.raw.decode()


# ---------------------------------------------------------------------------
# The page in a real browser: Playwright driving Debian's Chromium, against
# `python chat.py` as a subprocess and the fake upstream
# ---------------------------------------------------------------------------

CHROMIUM = os.environ.get("CHAT_CHROMIUM") or "/usr/bin/chromium"
# Running as root in a closed network: no sandbox, and none of Chromium's background
# connections (the network refuses them, many at a time).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
LONG_ANSWER = tuple(f"line {n:03d} of a long answer\n" for n in range(120))


class CuttableProxy:
    """A TCP proxy in front of chat.py that can cut the connections carrying /events, as a network would."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.events_requests = 0
        self.events_connections = []  # (browser side, server side) of connections that asked for /events
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def _handle(self, client, _address):
        """Pipe bytes both ways (the browser reuses keep-alive connections, so watch every request)."""
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        pump = gevent.spawn(self._pipe, upstream, client)
        self._pipe(client, upstream, watch=True)
        pump.join()

    def _pipe(self, source, sink, watch=False):
        """Copy until either side closes; count the /events requests going through."""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if watch and b"GET /events?" in data:
                    self.events_requests += 1
                    self.events_connections.append((source, sink))
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        """Drop every connection that carried /events at once."""
        for pair in self.events_connections:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        """Stop listening."""
        self.server.stop(timeout=1)


@pytest.fixture(scope="module")
def page_upstream():
    """One fake upstream for the browser tests; each test serves its own answer."""
    fake = FakeUpstream()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def live_chat(request, page_upstream, tmp_path_factory):
    """python chat.py talking to the fake upstream; or (parametrized) two of them sharing Redis and their SQLite
    file, behind nginx with docs/scale-out.md's upstream block, which takes them in turn request by request."""
    folder = tmp_path_factory.mktemp("live")
    settings = dict(OPENAI_BASE_URL=page_upstream.url, CHAT_MODEL="test-model", NO_PROXY="127.0.0.1",
                    CHAT_STREAM_GRACE="30")
    if getattr(request, "param", "one process") == "one process":
        app = ChatProcess(folder / "chat.log", **settings)
        yield app
        app.stop()
        return
    redis = request.getfixturevalue("redis_server")
    # Through nginx every browser comes from nginx's address: the new-browser bucket is for the real world.
    workers = [ChatProcess(folder / f"chat-{n}.log", CHAT_REDIS_URL=redis.url, CHAT_NEW_OWNERS_PER_MINUTE="1000",
                           **settings) for n in range(2)]
    try:
        front = Nginx(tmp_path_factory.mktemp("nginx"), workers[0].port, scaled_nginx_block(workers[1].port))
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    yield front
    front.stop()
    for worker in workers:
        worker.stop()
    posts = [w.log_path.read_text().count("POST /streaming") for w in workers]
    events = [w.log_path.read_text().count("GET /events") for w in workers]
    print(f"POST /streaming per process: {posts}; GET /events per process: {events}")
    # Both took part: answers were posted on one process and read on the other.
    assert all(posts) and all(events), f"nginx sent every send or every read to one process: {posts}, {events}"


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright; without it the tests skip locally and fail under CI."""
    try:
        from playwright.sync_api import sync_playwright
        if not os.path.exists(CHROMIUM):
            raise FileNotFoundError(f"{CHROMIUM} is missing (apt-get install chromium)")
        playwright = sync_playwright().start()
    except Exception as exc:  # noqa: BLE001 — any reason the browser cannot start
        if os.environ.get("CI"):
            pytest.fail(f"the browser cannot start under CI: {exc}")
        pytest.skip(f"no browser here: {exc}")
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as exc:  # noqa: BLE001
        playwright.stop()
        if os.environ.get("CI"):
            pytest.fail(f"the browser cannot start under CI: {exc}")
        pytest.skip(f"the browser does not start here: {exc}")
    yield chromium
    chromium.close()
    playwright.stop()


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


@pytest.fixture
def context(browser):
    """A fresh browser context (own cookies, clipboard allowed)."""
    ctx = browser.new_context(viewport={"width": 1000, "height": 700}, ignore_https_errors=True)  # nginx's own
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    yield ctx
    ctx.close()


@pytest.fixture
def watches():
    """Every page a test opens is checked for console errors at the end."""
    opened = []
    yield opened
    for watch in opened:
        assert watch.unexpected_errors() == [], "console errors on the page"


@pytest.fixture
def open_page(context, live_chat, watches):
    """Open the chat page in a new tab (of the test's context, or a given one); returns its PageWatch."""
    def opener(ctx=None, url=None):
        page = (ctx or context).new_page()
        page.set_default_timeout(10_000)
        watch = PageWatch(page)
        watches.append(watch)
        page.goto(url or live_chat.url + "/")
        page.wait_for_function("() => window.htmx && htmx.version")
        return watch
    return opener


def after_event(body, marker):
    """The offset just past the whole SSE event that contains marker (a pause point between tokens)."""
    return body.index(b"\n\n", body.index(marker)) + 2


def type_and_send(page, prompt):
    """Type a prompt and press Enter; return the new answer's stream id."""
    before = page.locator(".msg.assistant").count()
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    page.locator(".msg.assistant").nth(before).wait_for()
    return page.locator(".msg.assistant").nth(before).get_attribute("id").removeprefix("answer-")


def finished_bubble(page, stream_id, timeout=10_000):
    """Wait for the done bubble of a stream to replace the streaming one; return its locator."""
    bubble = page.locator(f"#answer-{stream_id}.done")
    bubble.wait_for(timeout=timeout)
    return bubble


def record_streamed_tokens(page):
    """From now on, keep every message payload the page receives (window.__tokens)."""
    page.evaluate("""() => { window.__tokens = [];
      document.body.addEventListener('htmx:sseBeforeMessage', e => {
        if (e.detail.type === 'message') window.__tokens.push(e.detail.data); }); }""")


def streamed_text(page):
    """The text of every message token the page received, in order."""
    return "".join(html.unescape(re.fullmatch(r"<span>(.*)</span>", t, re.S).group(1))
                   for t in page.evaluate("window.__tokens"))


def test_page_shows_tokens_while_the_upstream_streams(open_page, page_upstream):
    """A prefix of the answer is on the page before the upstream finishes, spaces between tokens intact."""
    body = answer("Hello", " there", ",", " my", " friend", "!")
    reply = page_upstream.serve(body, pause_at=after_event(body, b'" there"'))
    page = open_page().page
    stream_id = type_and_send(page, "Say hello")
    page.wait_for_function("() => document.querySelector('.tokens').textContent === 'Hello there'")
    assert not page_upstream.last.answered.is_set() and not reply.gate.is_set()
    page_upstream.release()
    bubble = finished_bubble(page, stream_id)
    assert bubble.locator(".content").inner_text() == "Hello there, my friend!"


def test_done_bubble_renders_markdown_code_and_crlf(open_page, page_upstream):
    """The done bubble replaces the streaming one with Markdown; a code block keeps blank lines, indentation, CRLF."""
    page_upstream.serve(answer("# Title\r\n\r\n", "Some **bold** and `code`.\r\n\r\n", "```python\r\n",
                               "def f():\r\n", "    x = 1\r\n", "\r\n", "    return x\r\n", "```\r\n"))
    page = open_page().page
    stream_id = type_and_send(page, "markdown please")
    bubble = finished_bubble(page, stream_id)
    assert page.locator(".msg.streaming").count() == 0
    assert bubble.locator("h1").inner_text() == "Title"
    assert bubble.locator("strong").inner_text() == "bold"
    assert bubble.locator("pre code").evaluate("e => e.textContent") == "def f():\n    x = 1\n\n    return x\n"
    assert "\r" not in bubble.locator(".content").evaluate("e => e.textContent")


def test_one_events_request_per_answer_and_none_after_done(open_page, page_upstream, live_chat):
    """Exactly one /events request per answer, counted by the server, and no stray reconnect after done."""
    page_upstream.serve(answer("One", " request", " only."))
    page = open_page().page
    ids = [type_and_send(page, "first"), None]
    finished_bubble(page, ids[0])
    ids[1] = type_and_send(page, "second")
    finished_bubble(page, ids[1])
    page.wait_for_timeout(3000)  # an observation window for stray reconnects, not a wait for a result
    assert [live_chat.events_requests(i) for i in ids] == [1, 1]


def test_cut_connection_resumes_without_loss_or_repeat(open_page, page_upstream, live_chat):
    """After the server's connection is cut mid-answer the browser resumes (Last-Event-ID): no gap, no repeat, no loop."""
    parts = [f" w{n}" for n in range(40)]
    body = answer(*parts)
    page_upstream.serve(body, pause_at=after_event(body, b'" w19"'))
    proxy = CuttableProxy(live_chat.port)
    try:
        watch = open_page(url=proxy.url + "/")
        # Cutting the connection makes Chromium log the broken request and htmx log its sseError.
        watch.allowed_errors += ["net::ERR", "[object Event]"]
        page = watch.page
        record_streamed_tokens(page)
        stream_id = type_and_send(page, "count")
        page.wait_for_function("() => document.querySelector('.tokens').textContent.endsWith(' w19')")
        proxy.cut()
        wait_until(lambda: proxy.events_requests == 2, timeout=5, what="the browser to reconnect")
        page_upstream.release()
        bubble = finished_bubble(page, stream_id)
        assert streamed_text(page) == "".join(parts)
        assert bubble.locator(".content").inner_text() == "".join(parts).strip()
        page.wait_for_timeout(3000)  # an observation window for a reconnect loop
        assert proxy.events_requests == 2
        assert live_chat.events_requests(stream_id) == 2
    finally:
        proxy.stop()


HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)"><b hx-get="/boom" hx-trigger="load">x</b>'


def test_markup_in_prompt_and_answer_is_shown_as_text(open_page, page_upstream):
    """Script, onerror and hx-get in the prompt and in the answer are text: no dialog, no request, no element."""
    page_upstream.serve(answer("Echo: ", HOSTILE, "\n\n", HOSTILE))
    watch = open_page()
    page = watch.page
    stream_id = type_and_send(page, HOSTILE)
    bubble = finished_bubble(page, stream_id)
    page.wait_for_timeout(500)  # give any injected load trigger or onerror the chance to fire
    assert watch.dialogs == []
    assert not [url for _, url in watch.requests if "/boom" in url or url.endswith("/x")]
    messages = page.locator("#chat-messages")
    assert messages.locator("script, img, [onerror], [hx-get], b").count() == 0
    assert page.locator(".msg.user .bubble").inner_text() == HOSTILE
    assert HOSTILE in bubble.locator(".content").inner_text()


def test_stop_closes_the_upstream_and_keeps_the_partial_answer(open_page, page_upstream):
    """Stop mid-answer: the upstream sees its connection closed within a second; the bubble says stopped."""
    body = answer("Partial", " answer", " then", " more")
    page_upstream.serve(body, hang_at=after_event(body, b'" answer"'))
    page = open_page().page
    stream_id = type_and_send(page, "go")
    page.wait_for_function("() => document.querySelector('.tokens').textContent === 'Partial answer'")
    page.get_by_role("button", name="Stop generating").click()
    wait_until(page_upstream.last.client_closed.is_set, timeout=1.0, what="the upstream to see its connection closed")
    bubble = finished_bubble(page, stream_id)
    assert bubble.locator(".content").inner_text() == "Partial answer"
    assert bubble.locator(".note").inner_text() == "Stopped."


def test_send_becomes_stop_while_an_answer_streams(open_page, page_upstream):
    """One answer at a time: while it streams Send is Stop, Enter sends nothing, Escape stops it; then Send is back."""
    body = answer("Alpha", " beta", " gamma.")
    page_upstream.serve(body, pause_at=after_event(body, b'" beta"'))
    page = open_page().page
    first = type_and_send(page, "one")
    page.wait_for_function("() => document.querySelector('.tokens').textContent === 'Alpha beta'")
    assert page.locator("#send").is_hidden() and page.locator("#stop-answer").is_visible()
    page.fill("#prompt", "two")
    page.press("#prompt", "Enter")
    assert page.locator(".msg.user").count() == 1 and page.input_value("#prompt") == "two"
    page.keyboard.press("Escape")
    bubble = finished_bubble(page, first)
    assert "Stopped." in bubble.inner_text()
    page.wait_for_function("() => document.getElementById('status').textContent === 'Stopped'")
    page.wait_for_function("() => !document.getElementById('composer').classList.contains('answering')")
    assert page.evaluate("document.activeElement.id") == "prompt"
    assert page.locator("#send").is_visible() and page.locator("#stop-answer").is_hidden()
    page_upstream.serve(answer("Second."))
    finished_bubble(page, type_and_send(page, "two"))


def test_three_tabs_at_once(open_page, page_upstream):
    """Three tabs streaming at once each get their own complete answer."""
    body = answer("Tab", " answer", " done.")
    page_upstream.serve(body, pause_at=after_event(body, b'" answer"'))
    tabs = [open_page().page for _ in range(3)]
    ids = [type_and_send(tab, f"tab {n}") for n, tab in enumerate(tabs)]
    for tab in tabs:
        tab.wait_for_function("() => document.querySelector('.tokens') && "
                              "document.querySelector('.tokens').textContent === 'Tab answer'")
    page_upstream.release()
    for tab, stream_id in zip(tabs, ids):
        assert finished_bubble(tab, stream_id).locator(".content").inner_text() == "Tab answer done."
        assert tab.locator(".msg.assistant").count() == 1


def test_enter_shift_enter_and_ime(open_page, page_upstream):
    """Enter sends and clears the box keeping focus; Shift+Enter is a newline; Enter mid-composition sends nothing."""
    page_upstream.serve(answer("ok"))
    watch = open_page()
    page = watch.page
    page.fill("#prompt", "line one")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#prompt") == "line one\nline two"
    page.evaluate("""() => document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown',
        {key: 'Enter', code: 'Enter', keyCode: 229, isComposing: true, bubbles: true, cancelable: true}))""")
    page.wait_for_timeout(300)  # an observation window: nothing may be sent
    assert watch.posts("/streaming") == 0
    page.press("#prompt", "Enter")
    page.locator(".msg.user").wait_for()
    assert page.locator(".msg.user .bubble").inner_text() == "line one\nline two"
    assert page.input_value("#prompt") == ""
    assert page.evaluate("document.activeElement.id") == "prompt"
    assert watch.posts("/streaming") == 1


def test_send_button_is_disabled_while_sending_and_errors_keep_the_words(open_page, live_chat):
    """An empty prompt shows the 400 message; an over-long one the 413 message and keeps the text in the box."""
    watch = open_page()
    # Chromium reports the 4xx answers in the console; they are the expected answers here.
    watch.allowed_errors += ["status of 400", "status of 413"]
    page = watch.page
    page.fill("#prompt", "   ")
    page.click("#send")
    page.locator("#form-error [role=alert]").wait_for()
    assert "empty" in page.inner_text("#form-error")
    long_text = "x" * 32_001
    page.fill("#prompt", long_text)
    page.click("#send")
    page.wait_for_function("() => document.querySelector('#form-error').textContent.includes('32,000')")
    assert page.input_value("#prompt") == long_text
    assert page.locator(".msg").count() == 0
    # hx-disabled-elt: the button is disabled while the POST is in flight.
    page.fill("#prompt", "   ")
    disabled = page.evaluate("""() => new Promise(resolve => {
        document.body.addEventListener('htmx:beforeSend',
          () => setTimeout(() => resolve(document.getElementById('send').disabled)), {once: true});
        document.getElementById('send').click(); })""")
    assert disabled is True


def test_autoscroll_follows_only_at_the_bottom(open_page, page_upstream):
    """Autoscroll follows tokens at the bottom, stops when the reader scrolls up, resumes back at the bottom."""
    body = answer(*LONG_ANSWER)
    reply = page_upstream.serve(body, pause_at=after_event(body, b'"line 039'))
    page = open_page().page
    page.set_viewport_size({"width": 800, "height": 400})
    stream_id = type_and_send(page, "long")
    at_bottom = "() => { const e = document.scrollingElement; return e.scrollHeight - e.scrollTop - e.clientHeight < 48; }"
    page.wait_for_function("() => document.querySelector('.tokens').textContent.includes('line 039')")
    page.wait_for_function(at_bottom)
    page.mouse.wheel(0, -100_000)
    page.wait_for_function("() => document.scrollingElement.scrollTop === 0")
    top_before = page.evaluate("document.scrollingElement.scrollTop")
    reply.gate.set()
    finished_bubble(page, stream_id)
    assert page.evaluate("document.scrollingElement.scrollTop") == top_before
    assert not page.evaluate(at_bottom)
    # Back at the bottom, the next answer's tokens are followed again.
    page.mouse.wheel(0, 100_000)
    page.wait_for_function(at_bottom)
    page_upstream.serve(answer(*LONG_ANSWER))
    second = type_and_send(page, "again")
    finished_bubble(page, second)
    assert page.evaluate(at_bottom)


def test_copy_buttons_and_live_region(open_page, page_upstream):
    """Copy puts the answer's Markdown or one code block on the clipboard; the live region announces start and end."""
    source = "Here:\n\n```sh\necho hi\n```\n"
    body = answer("Here:\n\n", "```sh\n", "echo hi\n", "```\n")
    page_upstream.serve(body, pause_at=after_event(body, b'"Here:'))
    page = open_page().page
    stream_id = type_and_send(page, "copy me")
    page.wait_for_function("() => document.getElementById('status').textContent === 'Answering…'")
    page_upstream.release()
    bubble = finished_bubble(page, stream_id)
    page.wait_for_function("() => document.getElementById('status').textContent === 'Answer complete'")
    bubble.get_by_role("button", name="Copy code").click()
    assert page.evaluate("navigator.clipboard.readText()") == "echo hi\n"
    bubble.get_by_role("button", name="Copy answer").click()
    wait_until(lambda: page.evaluate("navigator.clipboard.readText()") == source, what="the answer on the clipboard")
    nameless = page.evaluate("""() => [...document.querySelectorAll('button')]
        .filter(b => !(b.getAttribute('aria-label') || b.textContent).trim()).length""")
    assert nameless == 0


def test_reasoning_streams_into_its_own_collapsed_area(open_page, page_upstream):
    """Reasoning tokens go to a collapsed area apart from the answer, and stay collapsed when done."""
    body = (ROLE + data(choice({"reasoning_content": "Let me think."})) + data(choice({"content": "Answer."}))
            + FINISH + DONE)
    page_upstream.serve(body, pause_at=after_event(body, b'"Let me think."'))
    page = open_page().page
    stream_id = type_and_send(page, "think")
    page.wait_for_function("() => document.querySelector('.reasoning-text').textContent === 'Let me think.'")
    assert page.locator(".msg.streaming .tokens").inner_text() == ""
    assert page.locator(".msg.streaming details.reasoning").get_attribute("open") is None
    page_upstream.release()
    bubble = finished_bubble(page, stream_id)
    assert bubble.locator("details.reasoning").get_attribute("open") is None
    assert bubble.locator(".reasoning-text").text_content() == "Let me think."
    assert bubble.locator(".content").inner_text() == "Answer."


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_screenshot_of_a_finished_conversation(browser, live_chat, page_upstream, tmp_path, record_property, scheme):
    """A finished conversation at phone width, light and dark: no sideways scroll; the screenshot is kept."""
    page_upstream.serve(answer("Here is **Markdown**:\n\n", "- a list\n- of items\n\n", "```python\n",
                               "def greet(name):\n    return f'Hello, {name}!'  # a long comment line to wrap\n",
                               "```\n"))
    ctx = browser.new_context(viewport={"width": 375, "height": 760}, color_scheme=scheme)
    try:
        page = ctx.new_page()
        watch = PageWatch(page)
        page.goto(live_chat.url + "/")
        stream_id = type_and_send(page, "Show me a greeting function in Python")
        finished_bubble(page, stream_id)
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 375
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(255, 255, 255)") == (scheme == "light")
        shot = tmp_path / f"chat-{scheme}.png"
        page.screenshot(path=str(shot), full_page=True)
        record_property(f"screenshot_{scheme}", str(shot))
        if os.environ.get("CHAT_UPDATE_SCREENSHOT"):
            page.screenshot(path=str(HERE / "static" / f"screenshot-{scheme}.png"), full_page=True)
        assert watch.unexpected_errors() == []
    finally:
        ctx.close()


def test_screenshot_mid_stream_with_markdown_and_math(browser, live_chat, page_upstream, tmp_path):
    """Mid-answer at desktop width: finished blocks (a list, math, highlighted code) rendered, the tail still plain."""
    body = answer("The **quadratic formula** solves $ax^2+bx+c=0$:\n\n",
                  "$$x = \\frac{-b \\pm \\sqrt{b^2-4ac}}{2a}$$\n\n",
                  "Steps:\n\n", "1. compute the *discriminant* $\\Delta = b^2-4ac$\n", "2. take its root\n\n",
                  "```python\n", "import math\n\ndef roots(a, b, c):\n    d = math.sqrt(b*b - 4*a*c)\n",
                  "    return (-b + d) / (2*a), (-b - d) / (2*a)\n", "```\n\n",
                  "For $a=1$, $b=-3$", ", $c=2$ the roots are", " 1 and 2.")
    page_upstream.serve(body, pause_at=after_event(body, b'", $c=2$ the roots are"'))
    ctx = browser.new_context(viewport={"width": 900, "height": 760}, color_scheme="light")
    try:
        page = ctx.new_page()
        watch = PageWatch(page)
        page.goto(live_chat.url + "/")
        type_and_send(page, "How do I solve a quadratic equation?")
        page.wait_for_function("() => document.querySelector('.live .tokens').textContent.endsWith('roots are')")
        live = page.locator(".msg.streaming")
        assert live.locator(".blocks math").count() >= 3 and live.locator(".blocks .code-block").count() == 1
        assert live.locator(".blocks ol li").count() == 2
        shot = tmp_path / "mid-stream.png"
        page.screenshot(path=str(shot))
        if os.environ.get("CHAT_UPDATE_SCREENSHOT"):
            page.screenshot(path=str(HERE / "static" / "screenshot-streaming.png"))
        assert watch.unexpected_errors() == []
        page_upstream.release()
    finally:
        ctx.close()


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


def test_every_request_sends_the_conversation_so_far(client, upstream):
    """The upstream receives the system prompt first, then the whole history in order."""
    upstream.serve(answer("First answer."))
    stream_id, conversation = send_in(client, "First question", system="Be brief.")
    read_events(client, stream_id)
    upstream.serve(answer("Second answer."))
    stream_id, _ = send_in(client, "Second question", conversation)
    read_events(client, stream_id)
    assert upstream.last.json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Second question"}]


def test_new_conversation_gets_a_url_a_title_and_a_sidebar_entry(client, upstream):
    """A first message creates a conversation at /c/ID, titled from the prompt, newest first in the sidebar."""
    response = client.post("/streaming", {"prompt": "Plan a trip\nto Lisbon <3"})
    conversation = response.headers["HX-Push-Url"].removeprefix("/c/")
    assert f'value="{conversation}"' in response.text  # the form's hidden field, swapped out of band
    read_events(client, re.search(r"stream=([\w-]+)", response.text).group(1))
    page = client.get(f"/c/{conversation}")
    (link,) = elements(page.text, "a", id=f"conv-{conversation}")
    assert link.text == "Plan a trip to Lisbon <3"
    assert "Plan a trip" in elements(page.text, "div", cls="bubble")[0].text
    assert elements(page.text, "div", cls="markdown")  # the stored answer, rendered


def test_answer_is_stored_with_its_facts(client, upstream):
    """The finished answer is stored with status, finish reason, usage, model and timing."""
    upstream.serve("openai-usage.sse")
    stream_id, conversation = send_in(client, "Hi")
    read_events(client, stream_id)
    (row,) = db_rows("SELECT content, status, finish_reason, usage, model, elapsed FROM messages "
                     "WHERE role = 'assistant'")
    assert row[:3] == ("The question is a classic.", "done", "stop")
    assert json.loads(row[3])["completion_tokens"] > 0 and row[4] and row[5] >= 0


def test_user_message_is_stored_before_the_upstream_answers(client, upstream):
    """The user's words are in the database while the upstream has not said anything yet."""
    upstream.serve(answer("Late."), hang_at=0)
    stream_id, conversation = send_in(client, "Keep this safe")
    wait_until(lambda: upstream.requests, what="the upstream request")
    assert db_rows("SELECT role, content FROM messages ORDER BY id") == [
        ("user", "Keep this safe"), ("assistant", "")]
    assert chat.streams.stop(stream_id)


def test_partial_answer_is_flushed_while_streaming(server, upstream):
    """An answer still streaming is in the database within about a second."""
    body = answer("Saved", " while", " streaming", " and more")
    upstream.serve(body, pause_at=after_event(body, b'" streaming"'))
    post_prompt(server, "flush")
    wait_until(lambda: db_rows("SELECT content FROM messages WHERE role = 'assistant'") ==
               [("Saved while streaming",)], timeout=3, what="the partial answer in the database")
    upstream.release()


def test_killed_server_restarts_with_the_partial_answer(upstream, tmp_path):
    """SIGKILL mid-answer, restart on the same file: the conversation and the partial answer are there."""
    body = answer("Half", " an", " answer", " and", " the", " rest")
    upstream.serve(body, pause_at=after_event(body, b'" answer"'))
    settings = dict(OPENAI_BASE_URL=upstream.url, CHAT_MODEL="test-model", CHAT_DB=chat.store.path or "unused.db",
                    CHAT_DATABASE_URL=chat.store.url or "", CHAT_LEASE_SECONDS="1")
    first = ChatProcess(tmp_path / "first.log", **settings)
    try:
        response = web.post(first.url + "/streaming", data={"prompt": "Tell me everything"}, timeout=5)
        conversation = response.headers["HX-Push-Url"]

        def flushed():
            return db_rows("SELECT content FROM messages WHERE role = 'assistant'") == [("Half an answer",)]
        wait_until(flushed, timeout=5, what="the partial answer on disk")
        first.process.kill()  # SIGKILL: no cleanup at all
        first.process.wait(timeout=5)
    finally:
        first.stop()
    upstream.release()
    second = ChatProcess(tmp_path / "second.log", **settings)
    try:
        # Nobody renews the dead writer's lease: once it runs out, the answer is interrupted.
        wait_until(lambda: db_rows("SELECT status FROM messages WHERE role = 'assistant'") == [("interrupted",)],
                   timeout=10, what="the lease to run out")
        page = web.get(second.url + conversation, timeout=5).text
        assert "Tell me everything" in page
        (bubble,) = elements(page, "div", cls="interrupted")
        assert "Half an answer" in source_text(page)
        assert any("server stopped" in n for n in notes(page))
        # And after a clean stop, everything is there too.
        upstream.serve(answer("Complete", " now."))
        stream_id = re.search(r"stream=([\w-]+)", web.post(
            second.url + "/streaming", data={"prompt": "Again", "conversation": conversation.removeprefix("/c/")},
            timeout=5).text).group(1)
        events = web.get(second.url + "/events", params={"stream": stream_id}, timeout=10)
        assert "Complete now." in Transcript(events.content).done
    finally:
        second.stop()
    third = ChatProcess(tmp_path / "third.log", **settings)
    try:
        page = web.get(third.url + conversation, timeout=5).text
        assert [e.text for e in elements(page, "div", cls="bubble")] == ["Tell me everything", "Again"]
        assert "Complete now." in page
    finally:
        third.stop()


def test_other_owner_gets_404_for_conversation_stream_and_export(client, upstream):
    """Another browser (another owner cookie) cannot see, export, follow or stop someone else's answer."""
    body = answer("Private", " words")
    upstream.serve(body, pause_at=after_event(body, b'"Private"'))
    stream_id, conversation = send_in(client, "secret question")
    stranger = htmx_app()
    stranger.get(f"/c/{conversation}", status=404)
    stranger.get(f"/c/{conversation}/export.json", status=404)
    stranger.get(f"/c/{conversation}/export.md", status=404)
    stranger.get("/events", {"stream": stream_id}, status=404)
    stranger.post(f"/stop?stream={stream_id}", status=404)
    stranger.post(f"/c/{conversation}/rename", headers={"HX-Prompt": "mine"}, status=404)
    stranger.delete(f"/c/{conversation}", status=404)
    stranger.post("/streaming", {"prompt": "hijack", "conversation": conversation}, status=404)
    assert "secret question" not in stranger.get("/").text
    upstream.release()
    assert "Private words" in read_events(client, stream_id).done


def test_owner_cookie_is_httponly_and_samesite_lax(client):
    """The owner cookie is random, signed, HttpOnly and SameSite=Lax."""
    header = client.get("/").headers["Set-Cookie"]
    assert re.match(r"chat_owner=[\w-]{24,}\.[\w-]{22}; ", header)
    assert "HttpOnly" in header and "samesite=lax" in header.lower()


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "http://localhost:9999"}], ids=["origin", "fetch-site", "port"])
def test_cross_origin_writes_are_refused(client, upstream, headers):
    """POST and DELETE from another origin get 403; the same origin is fine."""
    client.post("/streaming", {"prompt": "x"}, headers=headers, status=403)
    client.delete("/c/anything", headers=headers, status=403)
    client.post("/streaming", {"prompt": "x"}, headers={"Origin": "http://localhost:80"}, status=200)


def test_password_guards_everything_but_login_and_static(client, upstream, monkeypatch):
    """With CHAT_PASSWORD nothing but /login, /static and a bare /healthz is reachable before logging in."""
    monkeypatch.setattr(chat.settings, "password", "correct horse")
    client = plain_app()  # a browser navigating: a redirect to the login page, not htmx's 401
    assert client.get("/", status=302).headers["Location"].endswith("/login?next=%2F")
    for path in ("/c/x", "/events?stream=x", "/c/x/export.json"):
        location = client.get(path, status=302).headers["Location"]
        assert "/login?next=" in location and urllib.parse.unquote(location).endswith("next=" + path), path
    assert client.get("/healthz", status=200).text == "ok\n"  # for proxies; it reveals nothing else
    client.post("/streaming", {"prompt": "hi"}, status=401)
    client.post("/stop?stream=x", status=401)
    client.get("/static/chat.css", status=200)
    client.get("/login", status=200)
    wrong = client.post("/login", {"password": "wrong"}, status=401)
    assert "Wrong password" in wrong.text
    for forged in ("99999999999.forged", "9" * 4300 + ".x", "A" * 43, "../../etc"):
        forger = plain_app()
        forger.set_cookie("chat_session", forged)
        forger.get("/", status=302)  # simply not logged in: no 500
    client.post("/login", {"password": "correct horse"}, status=302)
    assert "chat-messages" in client.get("/", status=200).text
    stream_id, _ = send_in(client, "after login")
    assert read_events(client, stream_id).message == "Hello, World!"


def test_demo_model_works_behind_the_password(demo, monkeypatch):
    """The demo endpoint stays usable by chat.py itself when a password guards the app, and by nobody else."""
    monkeypatch.setattr(chat.settings, "password", "pw")
    assert web.post(demo + "/demo/v1/chat/completions", json={"messages": []}, timeout=5).status_code == 404
    web.post(demo + "/login", data={"password": "pw"}, timeout=5)
    stream_id = post_prompt(demo, "hello behind a password")
    events = web.get(demo + "/events", params={"stream": stream_id}, timeout=10)
    assert "demo model" in Transcript(events.content).done


def test_export_round_trip(client, upstream):
    """JSON export holds every message exactly as said; the Markdown export holds the text too."""
    upstream.serve(answer("Grüße <b>&</b> 进入\n\n```py\nx = 1\n```"))
    stream_id, conversation = send_in(client, "Export me: <script>", system="sys")
    read_events(client, stream_id)
    exported = client.get(f"/c/{conversation}/export.json")
    assert exported.headers["Content-Disposition"].startswith("attachment")
    data_ = json.loads(exported.text)
    assert data_["system_prompt"] == "sys"
    assert [(m["role"], m["content"], m["status"]) for m in data_["messages"]] == [
        ("user", "Export me: <script>", "done"), ("assistant", "Grüße <b>&</b> 进入\n\n```py\nx = 1\n```", "done")]
    assert [(r, c) for r, c in db_rows("SELECT role, content FROM messages ORDER BY id")] == [
        (m["role"], m["content"]) for m in data_["messages"]]
    markdown = client.get(f"/c/{conversation}/export.md").text
    assert "Export me: <script>" in markdown and "```py\nx = 1\n```" in markdown


def test_rename_changes_the_title(client, upstream):
    """Rename takes the title from hx-prompt and updates the sidebar entry out of band."""
    stream_id, conversation = send_in(client, "old title")
    read_events(client, stream_id)
    response = client.post(f"/c/{conversation}/rename", headers={"HX-Prompt": "  New <name>  "})
    assert "New &lt;name&gt;" in response.text and f'id="conv-{conversation}"' in response.text
    assert db_rows("SELECT title FROM conversations") == [("New <name>",)]
    client.post(f"/c/{conversation}/rename", headers={"HX-Prompt": "   "}, status=400)


def test_delete_removes_the_rows(client, upstream):
    """Delete removes the conversation and its messages, and sends the page to a new chat."""
    stream_id, conversation = send_in(client, "delete me")
    read_events(client, stream_id)
    response = client.delete(f"/c/{conversation}")
    assert response.headers["HX-Redirect"] == "/"
    assert db_rows("SELECT count(*) FROM conversations") == [(0,)]
    assert db_rows("SELECT count(*) FROM messages") == [(0,)]
    client.get(f"/c/{conversation}", status=404)


def test_regenerate_keeps_the_earlier_answer(client, upstream):
    """Regenerate asks again with the history up to the last question; the earlier answer stays, as a sibling."""
    upstream.serve(answer("First try."))
    stream_id, conversation = send_in(client, "Question")
    read_events(client, stream_id)
    body = answer("Second", " try.")
    upstream.serve(body, pause_at=after_event(body, b'"Second"'))  # still streaming when the page is drawn
    response = client.post(f"/c/{conversation}/regenerate")
    new_stream = re.search(r"stream=([\w-]+)", response.text).group(1)
    upstream.release()
    assert "Second try." in read_events(client, new_stream).done
    assert upstream.last.json["messages"] == [{"role": "user", "content": "Question"}]
    assert db_rows("SELECT role, content, parent_id FROM messages ORDER BY id") == [
        ("user", "Question", None), ("assistant", "First try.", 1), ("assistant", "Second try.", 1)]
    assert "1/2" not in response.text and "2/2" in response.text  # the new answer is shown, with ‹ 2/2 ›


def test_model_picker_lists_upstream_models_and_sends_the_choice(client, upstream, monkeypatch):
    """The page offers the upstream's /v1/models; the chosen model is sent and kept for the conversation."""
    monkeypatch.setattr(chat.settings, "model", None)
    client.get("/")  # asks for the list in the background
    wait_until(lambda: chat.catalog.ids, what="the model list")
    page = client.get("/")
    assert [o.attrs["value"] for o in elements(page.text, "option")] == ["fake-model"]
    stream_id, conversation = send_in(client, "hi", model="other-model")
    read_events(client, stream_id)
    assert upstream.last.json["model"] == "other-model"
    assert elements(client.get(f"/c/{conversation}").text, "option", selected=None)[0].attrs["value"] == "other-model"
    assert sum(1 for r in upstream.requests if r.path.endswith("/models")) == 1  # cached


def test_streams_per_owner_are_limited(client, upstream, monkeypatch):
    """The fifth answer at once for one browser is refused with a clear message; others are not affected."""
    upstream.serve(answer("x"), hang_at=0)
    ids = [send_in(client, f"q{n}")[0] for n in range(4)]
    refused = client.post("/streaming", {"prompt": "one more"}, status=429)
    assert "4 answers streaming" in alerts(refused.text)[0]
    htmx_app().post("/streaming", {"prompt": "someone else"}, status=200)
    for stream_id in ids:
        chat.streams.stop(stream_id)


def test_long_conversations_drop_older_turns_and_say_so(client, upstream, monkeypatch):
    """Past the context budget the oldest turns are not sent, and the answer notes it."""
    monkeypatch.setattr(chat.settings, "max_context", 250)
    conversation = None
    for n in range(3):
        upstream.serve(answer("A" * 60))
        stream_id, conversation = send_in(client, f"question {n} " + "Q" * 60, conversation)
        transcript = read_events(client, stream_id)
    sent = upstream.last.json["messages"]
    assert sent[-1]["content"].startswith("question 2") and sent[0]["role"] == "user"
    assert sum(len(m["content"]) for m in sent) <= 250 and len(sent) < 5
    assert any("left out" in n for n in notes(transcript.done))


def test_concurrent_streams_leave_the_database_consistent(server, upstream):
    """Several answers streaming at once into several conversations are all stored; integrity_check is ok."""
    upstream.serve(answer(*[f" t{n}" for n in range(30)]), chunking="random", seed=7)
    stream_ids = [post_prompt(server, f"conversation {n}") for n in range(8)]
    readers = [SSEReader(server, stream_id) for stream_id in stream_ids]
    try:
        for reader in readers:
            reader.read_until(lambda t: t.finished, timeout=10)
    finally:
        for reader in readers:
            reader.close()
    if chat.store.db.name == "SQLite":
        assert db_rows("PRAGMA integrity_check") == [("ok",)]
    assert db_rows("SELECT count(*) FROM conversations") == [(8,)]
    contents = db_rows("SELECT content, status FROM messages WHERE role = 'assistant'")
    assert contents == [("".join(f" t{n}" for n in range(30)), "done")] * 8


def test_killed_server_keeps_every_word_a_reader_saw_though_no_save_ran(upstream, tmp_path):
    """kill -9 right after a reader was shown text the store never got (its writes were locked out): the journal
    next to the database has it, and the next start puts it back; a clean stop leaves no journal behind."""
    body = answer("Seen", " but", " never", " saved")
    upstream.serve(body, pause_at=after_event(body, b'" saved"'))
    db = tmp_path / "chat.db"
    settings = dict(OPENAI_BASE_URL=upstream.url, CHAT_MODEL="test-model", CHAT_DB=str(db), CHAT_DATABASE_URL="")
    first = ChatProcess(tmp_path / "first.log", **settings)
    other = sqlite3.connect(db, isolation_level=None)
    try:
        response = web.post(first.url + "/streaming", data={"prompt": "Remember"}, timeout=5)
        stream_id = re.search(r"stream=([\w-]+)", response.text).group(1)
        other.execute("BEGIN EXCLUSIVE")  # from now on every save of the answer fails
        reader = SSEReader(first.url, stream_id)
        reader.read_until(lambda t: t.message == "Seen but never saved", what="the four tokens")
        assert other.execute("SELECT content, status FROM messages WHERE role = 'assistant'").fetchall() == [
            ("", "streaming")]
        assert any(name.startswith(f"{first.process.pid}-") for name in os.listdir(f"{db}.unsaved"))
        first.process.kill()  # SIGKILL, with the reader's text only in the journal
        first.process.wait(timeout=5)
    finally:
        other.close()
        first.stop()
    upstream.release()
    second = ChatProcess(tmp_path / "second.log", **settings)
    try:
        rows = "SELECT content, status FROM messages WHERE role = 'assistant'"
        wait_until(lambda: db_file_rows(db, rows) == [("Seen but never saved", "interrupted")], timeout=10,
                   what="the journal's text put back and the answer interrupted")
        assert not [n for n in os.listdir(f"{db}.unsaved") if n.startswith(f"{first.process.pid}-")]
        assert "put back the unsaved text of 1 answers" in second.log_path.read_text()
        upstream.serve(answer("And", " this", " one."))
        stream_id = re.search(r"stream=([\w-]+)", web.post(
            second.url + "/streaming", data={"prompt": "Again"}, timeout=5).text).group(1)
        assert "And this one." in SSEReader(second.url, stream_id).read_to_end().done
    finally:
        second.stop()
    assert second.process.returncode == 0 and os.listdir(f"{db}.unsaved") == []


def db_file_rows(path, query):
    """The rows of a query on an SQLite file, read with a connection of its own."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(query).fetchall()


def test_journal_keeps_about_a_second_of_text_and_nothing_saved(tmp_path):
    """Journal segments go once the save covering them commits, except while an answer's final save is pending;
    take_over() puts the text of a dead process back from the first unsaved offset on."""
    journal = chat.Journal()
    journal.open(str(tmp_path / "j"))
    stream = chat.Stream("s", [], conversation_id="conv", message_id=7)
    for piece in ("Hello", " wörld"):
        stream.log.append("message", piece)
        journal.write(stream, "message", piece)
    first = journal.cut()
    stream.log.append("message", "!")
    journal.write(stream, "message", "!")
    journal.hold(7)  # finishing: its final save is under way
    second = journal.cut()
    assert sorted(os.listdir(tmp_path / "j")) == sorted([f"{journal.name}.lock", f"{journal.name}.1",
                                                          f"{journal.name}.2", f"{journal.name}.3"])
    journal.saved(second)
    assert len(os.listdir(tmp_path / "j")) == 4  # held: the final save has not committed
    journal.settle(7)
    assert sorted(os.listdir(tmp_path / "j")) == sorted([f"{journal.name}.lock", f"{journal.name}.3"])
    assert first == 1 and second == 2
    # A dead process's journal: what it logged after the stored text is put back, from its offset on.
    dead = chat.Journal()
    dead.open(str(tmp_path / "dead"))
    stream.log.append("message", " more")
    dead.write(stream, "message", " more")
    dead.flush()
    os.close(dead.lock)  # as the kernel does when a process dies
    found = []
    journal.folder = str(tmp_path / "dead")
    journal.take_over(lambda *args: found.append(args))
    assert found == [(7, "conv", {"message": [(len("Hello wörld!".encode()), b" more")]})]
    assert chat.apply_records("Hello wörld!", found[0][2]["message"]) == "Hello wörld! more"
    assert chat.apply_records("Hello", [(5, " wö".encode()), (9, "rld".encode())]) == "Hello wörld"
    assert os.listdir(tmp_path / "dead") == []
    # A record cut short (the disk filled during the write) ends its segment; the ones before it count.
    one = chat.Journal.RECORD.pack(7, 0, 0, 2, 4) + b"conv" + b"ab"
    two = chat.Journal.RECORD.pack(7, 0, 2, 2, 4) + b"conv" + b"cd"
    torn = {}
    chat.Journal().parse(one + two[:-1], torn)
    assert torn == {(7, "conv"): {"message": [(0, b"ab")]}}


def test_schema_has_a_version_and_answers_whose_lease_ran_out_are_interrupted(tmp_path):
    """A new database is at the latest schema; a streaming answer is interrupted only once its lease runs out."""
    path = str(tmp_path / "fresh.db")
    first = chat.Store(path)
    conversation = first.create_conversation("owner-" + "x" * 24, "t")
    dead = first.add_message(conversation, "assistant", status="streaming")
    alive = first.add_message(conversation, "assistant", status="streaming")
    first.save_partials([("so far", "", time.time(), dead, conversation)])
    first.renew_leases([alive], time.time() + 60)
    first.close()
    second = chat.Store(path)
    assert second.db.execute("PRAGMA user_version").fetchone()[0] == len(chat.MIGRATIONS)
    assert second.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert second.expire_leases(time.time() + chat.settings.lease_seconds + 1) == 1  # another process: alive
    rows = {row["id"]: row for row in second.messages(conversation)}
    assert (rows[dead]["content"], rows[dead]["status"]) == ("so far", "interrupted")
    assert rows[alive]["status"] == "streaming"
    second.close()


def test_reload_mid_answer_shows_everything_once(open_page, page_upstream, context):
    """Reloading /c/ID mid-answer shows the answer so far and the rest live, nothing repeated."""
    context.add_init_script("""window.__tokens = [];
      document.addEventListener('htmx:sseBeforeMessage', e => {
        if (e.detail.type === 'message') window.__tokens.push(e.detail.data); });""")
    parts = [f" r{n}" for n in range(30)]
    body = answer(*parts)
    page_upstream.serve(body, pause_at=after_event(body, b'" r14"'))
    page = open_page().page
    type_and_send(page, "reload me")
    page.wait_for_function("() => document.querySelector('.tokens').textContent.endsWith(' r14')")
    before = page.inner_text(".tokens")
    assert re.search(r"/c/[\w-]+$", page.url), "the new conversation's URL was pushed"
    page.reload()
    page.wait_for_function("() => document.querySelector('.tokens') && "
                           "document.querySelector('.tokens').textContent.endsWith(' r14')")
    assert page.inner_text(".tokens") == before
    page_upstream.release()
    page.locator(".msg.assistant.done").wait_for()
    assert streamed_text(page) == "".join(parts)
    assert page.locator(".msg.assistant.done .content").inner_text() == "".join(parts).strip()
    page.reload()  # after the end, the stored answer shows
    assert page.locator(".msg.assistant.done .content").inner_text() == "".join(parts).strip()
    assert page.locator(".msg.user .bubble").all_inner_texts() == ["reload me"]


def test_two_browsers_cannot_see_each_others_conversations(browser, open_page, page_upstream, live_chat, context):
    """Two browser contexts are two owners: 404 for the other's conversation, export, events and stop."""
    body = answer("Mine", " alone")
    page_upstream.serve(body, pause_at=after_event(body, b'"Mine"'))
    page = open_page().page
    stream_id = type_and_send(page, "private")
    page.wait_for_function("() => document.querySelector('.tokens').textContent === 'Mine'")
    conversation_url = page.url
    other = browser.new_context()
    try:
        assert other.new_page().goto(conversation_url).status == 404
        for method, path in (("get", conversation_url + "/export.json"), ("get", f"/events?stream={stream_id}"),
                             ("post", f"/stop?stream={stream_id}")):
            url = path if path.startswith("http") else live_chat.url + path
            assert getattr(other.request, method)(url).status == 404, path
        assert "private" not in other.new_page().goto(live_chat.url + "/").text()
    finally:
        other.close()
    page_upstream.release()
    assert finished_bubble(page, stream_id).locator(".content").inner_text() == "Mine alone"


def test_sidebar_navigation_and_plain_links(browser, open_page, page_upstream, live_chat):
    """Sidebar links navigate with htmx and push the URL; the same link works with JavaScript off."""
    page = open_page().page
    page_upstream.serve(answer("Answer one."))
    finished_bubble(page, type_and_send(page, "first chat"))
    first_url = page.url
    page.get_by_role("link", name="New chat").click()
    page.wait_for_url(live_chat.url + "/")
    page_upstream.serve(answer("Answer two."))
    finished_bubble(page, type_and_send(page, "second chat"))
    assert page.locator("#conversation-list a").all_inner_texts() == ["second chat", "first chat"]
    page.get_by_role("link", name="first chat").click()
    page.wait_for_url(first_url)
    assert page.locator(".msg.user .bubble").all_inner_texts() == ["first chat"]
    assert page.locator(".msg.assistant .content").inner_text() == "Answer one."
    # The conversation goes on where it was left.
    page_upstream.serve(answer("Answer three."))
    finished_bubble(page, type_and_send(page, "more"))
    assert page_upstream.last.json["messages"][-3:] == [
        {"role": "user", "content": "first chat"}, {"role": "assistant", "content": "Answer one."},
        {"role": "user", "content": "more"}]
    state = page.context.storage_state()
    no_js = browser.new_context(java_script_enabled=False, storage_state=state)
    try:
        plain = no_js.new_page()
        plain.goto(live_chat.url + "/")
        plain.get_by_role("link", name="first chat").click()
        plain.wait_for_url(first_url)
        assert plain.locator(".msg.assistant .content").all_inner_texts() == ["Answer one.", "Answer three."]
    finally:
        no_js.close()


def test_stream_nobody_watches_is_dropped_as_soon_as_it_ends(server, upstream, monkeypatch):
    """Readers gone longer than the grace period: the stream leaves the registry right after it ends, saved."""
    monkeypatch.setattr(chat.settings, "grace", 0.3)
    monkeypatch.setattr(chat.settings, "ping_interval", 0.1)
    body = answer("Nobody", " watching")
    upstream.serve(body, pause_at=after_event(body, b'"Nobody"'))
    stream_id = post_prompt(server)
    reader = SSEReader(server, stream_id)
    reader.read_until(lambda t: t.message == "Nobody")
    reader.close()
    stream = chat.streams.get(stream_id)
    wait_until(lambda: not stream.readers and time.monotonic() - stream.left_at > 0.3, timeout=3,
               what="the ping to notice the reader is gone")
    upstream.release()
    wait_until(lambda: stream.finished, what="the answer to end")
    wait_until(lambda: chat.streams.get(stream_id) is None, timeout=0.5, what="the stream to leave the registry")
    assert db_rows("SELECT content, status FROM messages WHERE role = 'assistant'") == [("Nobody watching", "done")]


# ---------------------------------------------------------------------------
# Real model servers: waiting is not silence, the history fits, roles alternate
# ---------------------------------------------------------------------------

def context_error(shape, size=2048, prompt=2081):
    """A whole HTTP context-overflow response as llama.cpp, OpenAI, vLLM or TGI sends it."""
    bodies = {
        "llama.cpp": {"error": {"code": 400, "message": f"request ({prompt} tokens) exceeds the available "
                                f"context size ({size} tokens), try increasing it",
                                "type": "exceed_context_size_error", "n_prompt_tokens": prompt, "n_ctx": size}},
        "openai": {"error": {"message": f"This model's maximum context length is {size} tokens. However, your "
                             f"messages resulted in {prompt} tokens. Please reduce the length of the messages.",
                             "type": "invalid_request_error", "param": "messages",
                             "code": "context_length_exceeded"}},
        "vllm": {"object": "error", "message": f"This model's maximum context length is {size} tokens. However, "
                 f"you requested {prompt} tokens in the messages, Please reduce the length of the messages.",
                 "type": "BadRequestError", "param": None, "code": 400},
        "tgi": {"error": f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {size}. "
                f"Given: {prompt} `inputs` tokens and 20 `max_new_tokens`", "error_type": "validation"},
        "llama.cpp-words": {"error": {"code": 400, "type": "invalid_request_error", "message":
                                      "the request exceeds the available context size, try increasing it"}},
    }
    status = b"422 Unprocessable Entity" if shape == "tgi" else b"400 Bad Request"
    body = json.dumps(bodies[shape]).encode()
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, len(body), body))


def sent_chars(request):
    """The characters of every message in a chat request."""
    return sum(len(m["content"]) for m in request.json["messages"])


def chat_requests(upstream):
    """The chat requests the fake upstream received, in order."""
    return [r for r in upstream.requests if r.path.endswith("/chat/completions")]


def test_waiting_for_the_first_byte_is_not_silence(server, upstream, open_sse, monkeypatch):
    """Headers withheld longer than read_timeout: the bubble counts the wait, then the answer streams."""
    monkeypatch.setattr(chat.settings, "read_timeout", 0.2)
    monkeypatch.setattr(chat.settings, "ping_interval", 0.05)
    monkeypatch.setattr(chat, "WAITING_SHOWN_AFTER", 0.1)
    body = b"".join(data(choice(d)) for d in ({"content": "Finally"}, {"content": " here."})) + b"data: [DONE]\n\n"
    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body)
    upstream.serve(response, raw=True, pause_at=0)  # llama-server: not even headers until the first token
    stream_id = post_prompt(server)
    reader = open_sse(stream_id)
    stream = chat.streams.get(stream_id)

    waited = reader.read_until(lambda t: any(e.event == "status" for e in t.events)
                               and time.monotonic() - stream.started > 3 * chat.settings.read_timeout,
                               what="the waiting clock to pass three read timeouts")
    status = [e for e in waited.events if e.event == "status"]
    assert "Waiting for the model server…" in status[-1].data and status[-1].id is None  # not logged
    assert not waited.finished
    upstream.release()
    transcript = reader.read_until(lambda t: t.finished, what="the answer")

    assert transcript.message == "Finally here."
    assert alerts(transcript.done) == [] and "Finally here." in source_text(transcript.done)
    assert [e.id for e in transcript.events if e.event != "status"] == [1, 2, 3]


def test_waiting_answer_can_be_stopped(server, upstream, open_sse, monkeypatch):
    """Stop while the server has not started answering: the upstream request is closed, the bubble says Stopped."""
    monkeypatch.setattr(chat.settings, "ping_interval", 0.05)
    upstream.serve(b"HTTP/1.1 200 OK\r\n", raw=True, hang_at=0)
    stream_id = post_prompt(server)
    reader = open_sse(stream_id)
    wait_until(lambda: chat_requests(upstream), what="the request to reach the server")

    assert web.post(f"{server}/stop", params={"stream": stream_id}, timeout=5).status_code == 204
    transcript = reader.read_until(lambda t: t.finished, what="the done bubble")

    assert "Stopped." in notes(transcript.done)
    wait_until(lambda: upstream.last.client_closed.is_set(), what="the upstream connection to close")


@pytest.mark.parametrize("entry", [
    pytest.param({"id": "/models/qwen2.5-0.5b-instruct-q4_k_m.gguf", "object": "model", "owned_by": "llamacpp",
                  "meta": {"n_ctx": 512, "n_ctx_train": 32768, "n_vocab": 151936}}, id="llama.cpp meta.n_ctx"),
    pytest.param({"id": "Qwen/Qwen2.5-0.5B-Instruct", "object": "model", "owned_by": "vllm",
                  "max_model_len": 512}, id="vLLM max_model_len"),
])
def test_history_is_trimmed_to_the_context_the_server_states(client, upstream, monkeypatch, entry):
    """/v1/models states a small context: older turns are left out before sending, and the answer says so."""
    monkeypatch.setattr(chat.settings, "model", None)
    upstream.models = [{"object": "list", "data": [entry]}]
    conversation = None
    for n in range(6):
        upstream.serve(answer("A" * 200, usage_tokens=(60 + 120 * n, 50)))
        stream_id, conversation = send_in(client, f"question {n} " + "Q" * 200, conversation)
        transcript = read_events(client, stream_id)
        assert alerts(transcript.done) == []
    sent = upstream.last.json["messages"]
    assert sent[-1]["content"].startswith("question 5") and sent[0]["role"] == "user"
    assert chat.catalog.estimate(entry["id"], sent) <= chat.catalog.prompt_budget(entry["id"]) < 512
    assert len(sent) < 11
    assert any("left out of what the model saw, to fit the model's context" in n for n in notes(transcript.done))
    assert len(chat_requests(upstream)) == 6  # fitted before sending: never refused, never sent twice


def test_context_size_from_llama_cpp_props(client, upstream, monkeypatch):
    """No context in /v1/models: llama.cpp's /props tells it, and the footer shows the context in use."""
    monkeypatch.setattr(chat.settings, "model", None)
    upstream.props = {"default_generation_settings": {"n_ctx": 4096}, "total_slots": 4}
    client.get("/")
    wait_until(lambda: chat.catalog.context_size("fake-model") == 4096, what="the context size from /props")
    upstream.serve(answer("Fine.", usage_tokens=(3000, 24)))

    transcript = relay(client)

    assert "3,024 of 4,096 tokens" in footer(transcript.done)


@pytest.mark.parametrize("shape", ["llama.cpp", "openai", "vllm", "tgi", "llama.cpp-words"])
def test_context_error_is_retried_once_with_the_history_trimmed(client, upstream, shape):
    """The server refuses a prompt over its context: chat.py trims the oldest turns, sends again once, says so."""
    conversation = None
    for n in range(4):
        upstream.serve(answer(f"Answer {n} " + "A" * 300))
        stream_id, conversation = send_in(client, f"question {n} " + "Q" * 300, conversation)
        read_events(client, stream_id)
    # Like a real server: it counts tokens (2 characters each here) and states the numbers.
    upstream.refuse = (1000, lambda chars: context_error(shape, size=500, prompt=chars // 2))
    upstream.serve(answer("Short enough now."))

    stream_id, _ = send_in(client, "question 4 " + "Q" * 300, conversation)
    transcript = read_events(client, stream_id)

    refused, resent = chat_requests(upstream)[-2:]
    assert sent_chars(refused) > 1000 >= sent_chars(resent)
    assert resent.json["messages"][-1]["content"].startswith("question 4")
    assert resent.json["messages"][0]["role"] == "user"
    assert transcript.message == "Short enough now." and alerts(transcript.done) == []
    (note,) = [n for n in notes(transcript.done) if "sent the question again" in n]
    assert "oldest messages were left out" in note
    if shape not in ("llama.cpp-words",):
        assert "(500 tokens)" in note
        # Learned: the next question is fitted before sending, not refused first.
        before = len(chat_requests(upstream))
        upstream.serve(answer("Fitted."))
        read_events(client, send_in(client, "question 5 " + "Q" * 300, conversation)[0])
        assert len(chat_requests(upstream)) == before + 1


def test_a_message_alone_over_the_context_says_so(client, upstream):
    """Nothing left to trim: one request, the server's message and a clear sentence, and the question is kept."""
    upstream.refuse = (100, context_error("llama.cpp"))
    transcript = relay(client, "Q" * 500)
    (alert,) = alerts(transcript.done)
    assert "exceeds the available context size" in alert and "Your message alone does not fit" in alert
    assert len(chat_requests(upstream)) == 1
    assert db_rows("SELECT role, content FROM messages WHERE role = 'user'") == [("user", "Q" * 500)]


@pytest.mark.parametrize("how", ["error", "stopped before the first token", "reasoning only"])
def test_roles_alternate_after_an_empty_answer(client, upstream, how):
    """An answer with no text never leaves two user messages in a row for a strict chat template."""
    upstream.strict_roles = True
    upstream.serve(answer("First answer."))
    stream_id, conversation = send_in(client, "one")
    read_events(client, stream_id)
    if how == "error":
        upstream.serve(b"data: {\"error\": {\"message\": \"boom\"}}\n\n")
        read_events(client, send_in(client, "two", conversation)[0])
    elif how == "reasoning only":
        upstream.serve(answer(reasoning="Let me think", finish="length"))
        read_events(client, send_in(client, "two", conversation)[0])
    else:
        upstream.serve(answer("never"), hang_at=0)
        stream_id, _ = send_in(client, "two", conversation)
        wait_until(lambda: len(chat_requests(upstream)) == 2, what="the second request")
        chat.streams.stop(stream_id)
        read_events(client, stream_id)
    upstream.serve(answer("Third answer."))

    transcript = read_events(client, send_in(client, "three", conversation)[0])

    assert transcript.message == "Third answer." and alerts(transcript.done) == []
    assert upstream.last.json["messages"] == [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "three"}]
    # The store keeps every message as it was.
    assert [r[0] for r in db_rows("SELECT role FROM messages ORDER BY id")] == [
        "user", "assistant", "user", "assistant", "user", "assistant"]
    assert db_rows("SELECT content FROM messages WHERE role = 'user' ORDER BY id") == [("one",), ("two",), ("three",)]


def test_fifty_turns_on_a_small_strict_model(client, upstream, monkeypatch):
    """A 2k-context llama.cpp-like server with a strict template: fifty turns, none stuck, none refused."""
    monkeypatch.setattr(chat.settings, "model", None)
    upstream.models = [{"object": "list", "data": [{"id": "/m/small.gguf", "meta": {"n_ctx": 2048}}]}]
    upstream.strict_roles = True
    # About 4 characters a token, like English on a real tokenizer.
    upstream.refuse = (2048 * 4, lambda chars: context_error("llama.cpp", size=2048, prompt=chars // 4))
    conversation = None
    for turn in range(50):
        if turn == 20:
            upstream.serve(b'data: {"error": {"message": "slot unavailable"}}\n\n')  # an empty answer
        else:
            upstream.serve(answer(f"Answer {turn}: " + "words and more words " * 20))
        stream_id, conversation = send_in(client, f"Question {turn}: " + "tell me more about it " * 15, conversation)
        transcript = read_events(client, stream_id)
        assert (alerts(transcript.done) == []) is (turn != 20), (turn, alerts(transcript.done))
    requests_ = chat_requests(upstream)
    assert len(requests_) == 50  # fitted every time: never refused, never sent twice
    assert all(sent_chars(r) <= 2048 * 4 for r in requests_)
    assert len(db_rows("SELECT id FROM messages")) == 100


def test_upstream_history_alternates_and_ends_with_a_question():
    """Unit: empty answers leave with their question, a trailing answer is dropped, the system prompt leads."""
    rows = [{"role": r, "content": c} for r, c in (
        ("user", "a"), ("assistant", ""), ("user", "b"), ("assistant", "B"), ("user", "c"), ("assistant", " "),
        ("user", "d"))]
    history = chat.upstream_history({"system_prompt": "Be brief."}, rows)
    assert [(m["role"], m["content"]) for m in history] == [
        ("system", "Be brief."), ("user", "b"), ("assistant", "B"), ("user", "d")]


def test_a_failed_model_list_is_asked_again_soon(client, upstream, monkeypatch):
    """/v1/models fails, then works: the picker fills in seconds, not a minute."""
    monkeypatch.setattr(chat.settings, "model", None)
    monkeypatch.setattr(chat, "MODELS_RETRY", 0.2)
    upstream.models = [503, FakeUpstream.MODELS]
    client.get("/")
    wait_until(lambda: chat.catalog.fetched_at is not None and not chat.catalog.ok, what="the failed fetch")
    assert chat.catalog.ids == []

    def listed():
        return [o.attrs["value"] for o in elements(client.get("/").text, "option")] == ["fake-model"]
    wait_until(listed, timeout=3, what="the picker to list the model")


def test_the_page_never_waits_for_the_model_list(server, upstream, monkeypatch):
    """/v1/models hangs: the page is served at once, and the picker's options come later by htmx."""
    monkeypatch.setattr(chat.settings, "model", None)
    monkeypatch.setattr(chat, "MODELS_DEADLINE", 0.5)
    upstream.models = ["hang"]
    started = time.monotonic()
    page = web.get(f"{server}/", timeout=5)
    assert page.status_code == 200 and time.monotonic() - started < 0.4
    (select,) = elements(page.text, "select", id="model")
    assert select.attrs["hx-get"] == "/model-options"
    assert select.attrs["hx-target"] == "this"  # not the form's #chat-messages, which it would inherit
    options = web.get(f"{server}/model-options", timeout=5)  # waits for the fetch's deadline, no longer
    assert "the server&#039;s default" in options.text or "the server's default" in options.text
    assert any(r.path.endswith("/models") for r in upstream.requests)


def test_path_like_model_ids_are_shown_by_file_name(client, upstream, monkeypatch):
    """llama.cpp's model id is a file path: the picker and footer show its file name; the full id is sent."""
    monkeypatch.setattr(chat.settings, "model", None)
    model_id = "/home/me/models/Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    upstream.models = [{"object": "list", "data": [{"id": model_id, "object": "model"}]}]
    client.get("/")
    wait_until(lambda: chat.catalog.ids, what="the model list")
    (option,) = elements(client.get("/").text, "option")
    assert option.attrs["value"] == model_id and option.text == "Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    upstream.serve(answer("Hi.", model=model_id))
    transcript = relay(client)
    assert upstream.last.json["model"] == model_id
    assert footer(transcript.done).startswith("Llama-3.2-1B-Instruct-Q4_K_M.gguf ·")
    assert chat.model_label("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"  # a hub name is not a path


def test_long_server_errors_are_shortened_with_the_whole_text_folded(client, upstream):
    """A Jinja stack trace: the alert shows its meaningful sentence, the whole message is in a <details>."""
    trace = ("Traceback (most recent call last):\n" + "".join(
        f'  File "/usr/lib/python3/site-packages/jinja2/environment.py", line {n}, in render\n    return x\n'
        for n in range(30)) + "jinja2.exceptions.TemplateError: Conversation roles must alternate "
        "user/assistant/user/assistant/...")
    body = json.dumps({"error": {"message": trace, "type": "BadRequestError", "code": 400}}).encode()
    upstream.serve(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                   b"Connection: close\r\n\r\n%s" % (len(body), body), raw=True)

    done = relay(client).done

    (alert,) = alerts(done)
    assert alert == ("The model server answered 400 Bad Request: jinja2.exceptions.TemplateError: "
                     "Conversation roles must alternate user/assistant/user/assistant/...")
    (details,) = elements(done, "details", cls="error-details")
    assert 'File "/usr/lib/python3/site-packages/jinja2/environment.py", line 29' in details.text


@pytest.mark.parametrize("text, short", [
    ("Short and clear.", "Short and clear."),
    ("First line.\nSecond line.", "First line."),
    ("x " * 300, None),
    ("A sentence that is long enough to count as one. " + "y" * 500, "A sentence that is long enough to count as one."),
])
def test_short_error(text, short):
    """Unit: the first meaningful sentence, at most SHORT_ERROR characters."""
    got = chat.short_error(text)
    assert len(got) <= chat.SHORT_ERROR + 1
    if short is not None:
        assert got == short
    else:
        assert got.endswith("…")


@pytest.mark.parametrize("shape, size, prompt", [
    ("llama.cpp", 2048, 2081), ("openai", 2048, 2081), ("vllm", 2048, 2081), ("tgi", 2048, 2081),
    ("llama.cpp-words", None, None)])
def test_context_overflow_shapes(shape, size, prompt):
    """Unit: every known context error is recognised, with the numbers it states."""
    head, _, body = context_error(shape).partition(b"\r\n\r\n")
    overflow = chat.context_overflow(int(head.split()[1]), body)
    assert (overflow.size, overflow.prompt_tokens) == (size, prompt)


def test_other_errors_are_not_context_overflows():
    """Unit: a plain 400, a 404 and a 503 are not mistaken for a full context."""
    for name in ("ollama-404-model-not-found.http", "llamacpp-503-loading.http", "openrouter-402.http"):
        head, _, body = (STREAMS_DIR / name).read_bytes().partition(b"\r\n\r\n")
        assert chat.context_overflow(int(head.split()[1]), body) is None, name
    for name in ("llamacpp-400-context-size.http", "openai-400-context-length.http", "vllm-400-nested.http"):
        head, _, body = (STREAMS_DIR / name).read_bytes().partition(b"\r\n\r\n")
        assert chat.context_overflow(int(head.split()[1]), body) is not None, name


# ---------------------------------------------------------------------------
# Behind nginx: docs/deploy.md's configuration, exactly, in front of a real chat.Server
# ---------------------------------------------------------------------------

def deploy_nginx_block():
    """The one ```nginx block of docs/deploy.md's ## Behind nginx section."""
    blocks = re.findall(r"^```nginx\n(.*?)^```$", doc_section("docs/deploy.md", "## Behind nginx"), re.M | re.S)
    assert len(blocks) == 1, f"expected one ```nginx block under ## Behind nginx, found {len(blocks)}"
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

    def __init__(self, folder, chat_port, block):
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
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    """chat.app on a real chat.Server (TCP on loopback) behind docs/deploy.md's nginx block; yields the Nginx."""
    seen = Seen(chat.app)
    srv = chat.Server(("127.0.0.1", 0), seen, log=None)
    srv.start()
    try:
        front = Nginx(tmp_path_factory.mktemp("nginx"), srv.server_port, deploy_nginx_block())
    except BaseException:
        srv.stop(timeout=2)
        raise
    front.seen = seen.requests
    yield front
    front.stop()
    srv.stop(timeout=2)


@pytest.fixture
def via_nginx(nginx, monkeypatch):
    """docs/deploy.md's nginx in front of chat.py; the test's browser-like client trusts its certificate."""
    monkeypatch.setattr(web, "verify", str(nginx.cert))
    nginx.seen.clear()
    return nginx


@pytest.fixture
def sse_via_nginx(via_nginx):
    """Open /events readers through nginx; all are closed at teardown."""
    readers = []

    def open_reader(stream_id, last_event_id=None):
        reader = SSEReader(via_nginx.url, stream_id, last_event_id)
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


def post_from_page(front, path, origin=None, **data):
    """POST like the page does: through nginx, with the page's own Origin (or the one given)."""
    return web.post(f"{front.url}{path}", data=data, headers={"Origin": origin or front.origin}, timeout=5)


def prompt_via(front, prompt="Hi"):
    """POST a prompt from the page through nginx; return the stream id."""
    response = post_from_page(front, "/streaming", prompt=prompt)
    assert response.status_code == 200, response.text
    return re.search(r'sse-connect="/events\?stream=([A-Za-z0-9_-]+)"', response.text).group(1)


def test_nginx_passes_a_token_on_while_the_upstream_still_streams(upstream, via_nginx, sse_via_nginx):
    """Through nginx the first token arrives while the upstream is blocked mid-body, not when it finishes."""
    reply = upstream.serve(SLOW_ANSWER, pause_at=FIRST)
    reader = sse_via_nginx(prompt_via(via_nginx))

    reader.read_until(lambda t: t.message == "Hello", what="the first token through nginx")

    assert not upstream.last.answered.is_set() and not reply.gate.is_set()
    upstream.release()
    assert reader.read_until(lambda t: t.finished, what="done").message == "Hello there, friend."


def test_nginx_sends_event_stream_headers_before_the_first_token(upstream, via_nginx, sse_via_nginx):
    """/events through nginx: 200, text/event-stream, no-cache, before the upstream sent any body."""
    upstream.serve(SLOW_ANSWER, pause_at=0)
    reader = sse_via_nginx(prompt_via(via_nginx))

    headers = reader.response.headers
    assert reader.response.status_code == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache"
    assert headers["Server"].startswith("nginx")  # really through nginx
    assert reader.read_until(lambda t: "connected" in t.comments, what="the hello comment").events == []
    upstream.release()
    assert reader.read_until(lambda t: t.finished).message == "Hello there, friend."


@pytest.mark.parametrize("reconnect", ["while-streaming", "after-done"])
def test_nginx_last_event_id_resumes_without_loss_or_repeat(upstream, via_nginx, sse_via_nginx, reconnect):
    """Disconnect from nginx after one token, reconnect with Last-Event-ID: all events once, ids 1..n."""
    upstream.serve(SLOW_ANSWER, pause_at=data(choice({"content": ","})))
    assert_resume_without_loss(upstream, prompt_via(via_nginx), sse_via_nginx, reconnect)


def test_nginx_stop_closes_upstream_and_keeps_partial_answer(upstream, via_nginx, sse_via_nginx):
    """POST /stop through nginx: 204, the upstream connection closes, the bubble keeps the text and says Stopped."""
    upstream.serve(SLOW_ANSWER, pause_at=data(choice({"content": " there"})))
    stream_id = prompt_via(via_nginx)
    reader = sse_via_nginx(stream_id)
    reader.read_until(lambda t: t.message == "Hello there", what="the first tokens")

    response = web.post(f"{via_nginx.url}/stop", params={"stream": stream_id},
                        headers={"Origin": via_nginx.origin}, timeout=5)

    assert response.status_code == 204
    wait_until(lambda: upstream.last.client_closed.is_set(), what="the upstream to see its connection closed")
    bubble = reader.read_until(lambda t: t.finished, what="done").done
    assert source_text(bubble) == "Hello there"
    assert "Stopped." in notes(bubble)
    assert alerts(bubble) == []
    assert not upstream.last.answered.is_set()


def test_nginx_keeps_the_pages_own_posts_same_origin(upstream, via_nginx):
    """Through nginx the page's own Origin (host:port) is accepted and another site's is refused."""
    assert post_from_page(via_nginx, "/streaming", prompt="Hi").status_code == 200
    assert post_from_page(via_nginx, "/streaming", origin="https://evil.example", prompt="Hi").status_code == 403
    assert via_nginx.seen[0]["host"] == f"127.0.0.1:{via_nginx.port}"


def test_nginx_host_without_port_would_refuse_the_pages_own_posts(nginx, upstream, tmp_path):
    """With `Host $host` (port dropped) instead of docs/deploy.md's `$http_host`, chat.py refuses the page's POST."""
    block = substitute(deploy_nginx_block(), "proxy_set_header Host $http_host;", "proxy_set_header Host $host;")
    front = Nginx(tmp_path, nginx.chat_port, block)
    try:
        response = web.post(f"{front.url}/streaming", data={"prompt": "Hi"}, headers={"Origin": front.origin},
                            verify=str(front.cert), timeout=5)
    finally:
        front.stop()
    assert response.status_code == 403


def test_nginx_tells_chat_py_the_host_scheme_and_client(via_nginx, monkeypatch):
    """chat.py sees the browser's Host with its port, https, and the real client (a forged X-Forwarded-For is replaced)."""
    monkeypatch.setattr(chat.settings, "password", "correct horse")
    response = web.get(f"{via_nginx.url}/", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http",
                                                     "HX-Request": None},
                       allow_redirects=False, timeout=5)

    assert response.status_code in (302, 303)
    assert response.headers["Location"] == f"{via_nginx.url}/login?next=%2F"
    (seen,) = [r for r in via_nginx.seen if r["path"] == "/"]
    assert seen["host"] == f"127.0.0.1:{via_nginx.port}"
    assert seen["forwarded_proto"] == "https"
    assert seen["forwarded_for"] == seen["remote_addr"] == "127.0.0.1"


def test_nginx_reuses_its_connection_to_chat_py(via_nginx):
    """keepalive + HTTP/1.1 + empty Connection: requests one after another share one connection to chat.py."""
    for _ in range(3):
        assert web.get(f"{via_nginx.url}/healthz", timeout=5).status_code == 200
    assert len({r["peer_port"] for r in via_nginx.seen}) == 1


def test_nginx_lets_a_prompt_at_the_limit_through(upstream, via_nginx):
    """A prompt at the limit in 4-byte characters passes nginx; one more character gets chat.py's own 413."""
    at_limit = "😀" * chat.settings.max_prompt
    assert post_from_page(via_nginx, "/streaming", prompt=at_limit).status_code == 200

    response = post_from_page(via_nginx, "/streaming", prompt=at_limit + "😀")
    assert response.status_code == 413
    assert f"the limit is {chat.settings.max_prompt:,}" in response.text


def test_nginx_redirects_plain_http_to_https(via_nginx):
    """The port-80 server answers every request with a permanent redirect to the same URL over https."""
    response = requests.get(f"http://127.0.0.1:{via_nginx.http_port}/c/abc?x=1", allow_redirects=False, timeout=5)
    assert response.status_code == 301
    assert response.headers["Location"] == "https://127.0.0.1/c/abc?x=1"


def nginx_seconds(value):
    """An nginx time ("90", "90s", "15m", "1h", "1h 30m") in seconds."""
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd]?)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), f"not an nginx time: {value!r}"
    return sum(int(n) * units[u] for n, u in parts)


def test_nginx_event_streams_outlast_the_longest_answer():
    """docs/deploy.md's /events location buffers nothing and waits longer than a 15-minute answer between reads."""
    events = re.search(r"location = /events \{(.*?)\}", deploy_nginx_block(), re.S)
    assert events, "docs/deploy.md's nginx block has no `location = /events`"
    assert re.search(r"^\s*proxy_buffering off;", events.group(1), re.M)
    timeout = re.search(r"^\s*proxy_read_timeout ([^;]+);", events.group(1), re.M)
    assert timeout and nginx_seconds(timeout.group(1)) >= 15 * 60


# ---------------------------------------------------------------------------
# Bounded under abuse and faults: each attack hurts nobody but the attacker
# ---------------------------------------------------------------------------

def quick_healthz(base, limit=0.1):
    """/healthz on a fresh connection answers 200 within limit seconds (other users are still served)."""
    started = time.monotonic()
    response = requests.get(f"{base}/healthz", timeout=5, headers={"Connection": "close"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and elapsed < limit, (response.status_code, elapsed)
    return elapsed


def raw_request(base, head, body=b"", read=True):
    """Send bytes on a fresh socket; return (socket, whatever the server answered before closing)."""
    host, port = base.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head + body)
    if not read:
        return sock, b""
    answer = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            answer += chunk
    return sock, answer


def closed_by_server(sock):
    """True once the server has closed this connection (a read returns EOF or fails)."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


FROM_AFAR = {"X-Forwarded-For": "198.51.100.7"}  # through the (trusted) loopback proxy: not this machine


@pytest.mark.parametrize("path, content_type, length, extra, status", [
    ("/login", "multipart/form-data; boundary=xx", 200 << 20, "", 413),
    ("/streaming", "application/x-www-form-urlencoded", 200 << 20, "", 413),
    ("/streaming", "multipart/form-data; boundary=xx", 2000, "", 413),
    ("/streaming", "application/x-www-form-urlencoded", None, "Transfer-Encoding: chunked\r\n", 411),
], ids=["login-200MB", "streaming-200MB", "multipart", "chunked"])
def test_bodies_over_the_limit_are_refused_before_a_byte_is_read(server, monkeypatch, path, content_type, length, extra,
                                                                  status):
    """Attack 1: 413 (411 for a chunked body) at once, while the client has sent only the head; nothing is spooled
    to disk."""
    monkeypatch.setattr(chat.bottle, "NamedTemporaryFile", lambda *a, **k: pytest.fail("a body was spooled to disk"))
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            + (f"Content-Length: {length}\r\n" if length else "") + extra + "\r\n").encode()
    sock, answer = raw_request(server, head, b"x" * 1000)
    sock.close()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
    assert b"Refused" in answer
    quick_healthz(server)


def test_a_prompt_at_the_limit_fits_the_body_limit(client, upstream):
    """The body limit leaves room for a prompt at the limit in 4-byte characters, %-encoded."""
    client.post("/streaming", {"prompt": "😀" * chat.settings.max_prompt}, status=200)


def test_a_body_that_trickles_is_cut_off(server, monkeypatch):
    """A slow body gets 408 after CHAT_HEADER_TIMEOUT; other users are served meanwhile."""
    monkeypatch.setattr(chat.settings, "header_timeout", 0.3)
    sock, _ = raw_request(server, b"POST /streaming HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
                                  b"Content-Type: application/x-www-form-urlencoded\r\n\r\nprompt=", read=False)
    quick_healthz(server)
    answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408 ")
    sock.close()


def test_password_guessing_is_limited_however_many_connections(server, monkeypatch, caplog):
    """Attack 2: 300 parallel wrong guesses: at most ~10 a second are checked, the rest get 429 at once."""
    monkeypatch.setattr(chat.settings, "password", "correct horse battery")
    caplog.set_level("WARNING", logger="chat")
    statuses = []

    def guess(n):
        headers = {"X-Forwarded-For": f"198.51.100.{n % 200}", "Connection": "close"}
        statuses.append(requests.post(f"{server}/login", data={"password": f"guess {n}"}, headers=headers,
                                      timeout=10, allow_redirects=False).status_code)
    started = time.monotonic()
    gevent.joinall([gevent.spawn(guess, n) for n in range(300)], timeout=20)
    elapsed = time.monotonic() - started
    quick_healthz(server)

    assert len(statuses) == 300 and set(statuses) <= {401, 429}
    assert statuses.count(401) <= 10 + 10 * elapsed + 1  # the burst, then 10 a second
    assert statuses.count(429) >= 250
    assert len([r for r in caplog.records if "failed login" in r.getMessage()]) <= 2  # logging is rate-limited
    # One address alone is held back sooner than the global limit.
    limits = chat.Limits()
    monkeypatch.setattr(chat, "limits", limits)
    one = [requests.post(f"{server}/login", data={"password": "no"}, headers=FROM_AFAR, timeout=5).status_code
           for _ in range(7)]
    assert one == [401] * 5 + [429] * 2


def test_the_right_password_still_works_after_guessing_elsewhere(client, monkeypatch):
    """Another address's guesses do not lock this one out while the global bucket has room."""
    monkeypatch.setattr(chat.settings, "password", "pw")
    for _ in range(6):
        client.post("/login", {"password": "x"}, headers=FROM_AFAR, expect_errors=True)
    client.post("/login", {"password": "pw"}, headers={"X-Forwarded-For": "203.0.113.5"}, status=302)


def test_logout_revokes_the_session_on_the_server(client, monkeypatch):
    """Attack 11: a copied session cookie is worthless after Log out."""
    monkeypatch.setattr(chat.settings, "password", "pw")
    client.post("/login", {"password": "pw"}, status=302)
    copied = client.cookies["chat_session"]
    client.post("/logout", status=302)
    thief = plain_app()
    thief.set_cookie("chat_session", copied)
    thief.get("/", status=302)


def test_slowloris_heads_are_closed_and_others_served(server, monkeypatch):
    """Attack 3: 100 half-sent request heads are closed after CHAT_HEADER_TIMEOUT; /healthz answers meanwhile."""
    monkeypatch.setattr(chat.settings, "header_timeout", 0.4)
    socks = [raw_request(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", read=False)[0]
             for _ in range(100)]
    quick_healthz(server)
    wait_until(lambda: all(closed_by_server(s) for s in socks), timeout=3, what="the slow heads to be closed")
    for sock in socks:
        sock.close()


def test_idle_connections_are_closed(server, monkeypatch):
    """A connection that never sends a request is closed after CHAT_WRITE_TIMEOUT (the idle limit)."""
    monkeypatch.setattr(chat.settings, "write_timeout", 0.3)
    sock, _ = raw_request(server, b"", read=False)
    wait_until(lambda: closed_by_server(sock), timeout=3, what="the idle connection to be closed")
    sock.close()


def test_connections_past_the_cap_get_a_clear_503(server, monkeypatch):
    """Past CHAT_MAX_CONNECTIONS a new connection is answered 503 at once and closed; the rest are served."""
    monkeypatch.setattr(chat.settings, "max_connections", 20)
    held = [raw_request(server, b"", read=False)[0] for _ in range(20)]
    wait_until(lambda: chat_server_connections() == 20, what="the held connections to be accepted")
    _, answer = raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 503 ") and b"connection limit" in answer
    for sock in held:
        sock.close()
    wait_until(lambda: chat_server_connections() == 0, what="the connections to close")
    quick_healthz(server)


def chat_server_connections():
    """Open connections of the in-process test server."""
    (server,) = SERVERS.values()
    return server.connections


def test_an_answer_over_the_size_limit_is_cut_off_and_kept(client, upstream, monkeypatch):
    """Attack 4: a flood of an answer stops at CHAT_MAX_ANSWER_CHARS with a note; its text is kept."""
    monkeypatch.setattr(chat.settings, "max_answer_chars", 5000)
    upstream.serve(answer(*["word " * 20] * 2000, finish=None, done=False), hang_at=None)

    transcript = relay(client)

    assert 5000 < len(transcript.message) <= 5000 + 100
    assert any("limit of 5,000 characters" in n for n in notes(transcript.done))
    (stored,) = db_rows("SELECT content, status FROM messages WHERE role = 'assistant'")
    assert stored == (transcript.message, "limit")
    wait_until(lambda: upstream.last.client_closed.is_set() or upstream.last.answered.is_set(),
               what="the upstream connection to end")


def test_an_answer_over_the_time_limit_is_cut_off_and_kept(client, upstream, monkeypatch):
    """An answer that never ends stops after CHAT_MAX_ANSWER_SECONDS with a note; its text is kept."""
    monkeypatch.setattr(chat.settings, "max_answer_seconds", 0.4)
    monkeypatch.setattr(chat.settings, "ping_interval", 0.05)
    body = answer("Forever", " and ever")
    upstream.serve(body, hang_at=data(choice({"content": "Forever"})))

    transcript = relay(client)

    assert transcript.message == "Forever"
    assert any("limit of 0.4 seconds" in n for n in notes(transcript.done))
    wait_until(lambda: upstream.last.client_closed.is_set(), what="chat.py to close the upstream")


def test_answer_log_holds_the_text_once():
    """Attack 4: per-stream memory is the text once plus five bytes an event, not a frame per token."""
    log_ = chat.AnswerLog("s")
    for n in range(20_000):
        log_.append("message", "tok ")
    assert len(log_.text["message"]) == 80_000
    assert len(log_.kinds) == 20_000 and log_.ends.itemsize * len(log_.ends) == 80_000
    frames = b"".join(log_.frames(19_998, 20_000))
    assert frames == chat.token_frame("message", "tok ", 19_999) + chat.token_frame("message", "tok ", 20_000)


def test_finishing_a_long_answer_does_not_block_other_users(server, upstream, monkeypatch):
    """Attack 4: rendering a 380,000-character answer happens off the hub: /healthz stays fast meanwhile."""
    chunk = "Some **bold** text and a list:\n\n- item one\n- item two\n\n```python\ndef f(x):\n    return x\n```\n\n"
    upstream.serve(answer(*[chunk] * 4000))
    stream_id = post_prompt(server)
    stream = chat.streams.get(stream_id)
    wait_until(lambda: stream.finished_at is not None, timeout=10, what="the answer to start finishing")
    slowest = max(quick_healthz(server, limit=0.25) for _ in range(5) if not stream.finished)
    wait_until(lambda: stream.finished, timeout=15, what="the bubble to be rendered")
    assert slowest < 0.25


def test_readers_that_never_read_are_dropped(server, upstream, monkeypatch):
    """Attack 5: stuck replays of a finished 8 MB answer are dropped after CHAT_WRITE_TIMEOUT; the stream goes."""
    monkeypatch.setattr(chat.settings, "write_timeout", 0.5)
    monkeypatch.setattr(chat.settings, "grace", 0.3)
    monkeypatch.setattr(chat.settings, "max_answer_chars", 10_000_000)
    upstream.serve(answer(*["x" * 4000] * 2000))
    stream_id = post_prompt(server)
    stream = chat.streams.get(stream_id)
    wait_until(lambda: stream.finished, timeout=20, what="the 8 MB answer")
    stuck = []
    for _ in range(5):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(server.rsplit(":", 1)[1])))
        sock.sendall(f"GET /events?stream={stream_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Cookie: {owner_cookie_header()}\r\n\r\n".encode())
        stuck.append(sock)
    wait_until(lambda: chat_server_connections() >= 5, what="the stuck readers to connect")
    quick_healthz(server)
    wait_until(lambda: chat_server_connections() == 0, timeout=5, what="the stuck readers to be dropped")
    wait_until(lambda: chat.streams.get(stream_id) is None, timeout=3, what="the stream to leave the registry")
    for sock in stuck:
        sock.close()


def test_an_upstream_that_floods_is_read_at_the_token_rate_limit(server, upstream, monkeypatch):
    """An upstream sending as fast as it can is read at CHAT_MAX_TOKENS_PER_SECOND (after a quarter second's
    burst), so one answer cannot take the whole CPU; other users are served meanwhile and no text is lost."""
    monkeypatch.setattr(chat.settings, "max_tokens_per_second", 400)
    upstream.serve(answer(*[f"t{n} " for n in range(500)]))
    started = time.monotonic()
    stream = chat.streams.get(post_prompt(server))
    wait_until(lambda: stream.tokens >= 200, timeout=5, what="the burst and the first paced tokens")
    quick_healthz(server)
    wait_until(lambda: stream.finished, timeout=10, what="the whole answer")
    assert time.monotonic() - started >= (500 - 400 * chat.PACE_BURST - chat.PACE_EVERY) / 400
    assert db_rows("SELECT content, status FROM messages WHERE role = 'assistant'") == [
        ("".join(f"t{n} " for n in range(500)), "done")]


def test_a_reader_that_stops_taking_data_is_written_in_batches_and_gets_everything(server, upstream):
    """A reader whose connection holds more than SLOW_READER_BYTES it has not taken is written a few times a
    second (pause_if_behind waits between writes); once it reads again it gets every token, in order, then done."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    peer, _ = listener.accept()
    with listener, client, peer:
        peer.sendall(b"x" * 1000)
        assert client.recv(4096) and not chat.pause_if_behind(peer)  # taken: no wait
        peer.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                peer.send(b"x" * 65536)  # until the kernel's buffers are full: nothing is being taken
        assert chat.pause_if_behind(peer)
    parts = [f"w{n} " * 10 for n in range(1500)]  # ~100 KB of frames, more than the reader's buffers take
    upstream.serve(answer(*parts))
    stream_id = post_prompt(server)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", int(server.rsplit(":", 1)[1])))
    with sock:
        sock.sendall(f"GET /events?stream={stream_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Cookie: {owner_cookie_header()}\r\n\r\n".encode())
        stream = chat.streams.get(stream_id)
        wait_until(lambda: stream.finished, timeout=15, what="the answer, read by nobody meanwhile")
        raw = b""
        with gevent.Timeout(10, AssertionError("the reader never got done")):
            while b"event: done" not in raw:
                raw += sock.recv(65536)
    body = raw.split(b"\r\n\r\n", 1)[1]
    text = "".join(re.findall(r"<span>(.*?)</span>", b"".join(
        re.sub(rb"\r\n[0-9a-f]+\r\n", b"", b"\r\n" + body).split(b"event: done")[:1]).decode()))
    assert text == "".join(parts)


def dechunk(body):
    """Strictly decode an HTTP/1.1 chunked body (AssertionError on any framing error); returns the data."""
    out, at = b"", 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        assert body[end + 2 + size:end + 4 + size] == b"\r\n", f"chunk at {at} not closed by CRLF"
        out += body[end + 2:end + 2 + size]
        at = end + 4 + size
        if size == 0:
            assert at == len(body), "bytes after the last chunk"
            return out


def read_raw_events(server, stream_id, version="HTTP/1.1", rcvbuf=None, connected=None):
    """GET /events over a plain socket; connected(sock) runs once the request is sent; returns (head, body)
    read until the done event (HTTP/1.1: the last chunk; HTTP/1.0: the server closes)."""
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", int(server.rsplit(":", 1)[1])))
    with sock:
        sock.sendall(f"GET /events?stream={stream_id} {version}\r\nHost: 127.0.0.1\r\n"
                     f"Cookie: {owner_cookie_header()}\r\n\r\n".encode())
        if connected:
            connected(sock)
        raw = b""
        with gevent.Timeout(15, AssertionError("the answer never ended")):
            while not raw.endswith(b"\r\n0\r\n\r\n"):
                data = sock.recv(65536)
                if not data:
                    break
                raw += data
    head, body = raw.split(b"\r\n\r\n", 1)
    return head, body


def count_direct_sends(monkeypatch):
    """Spy on Outlet.send_now: returns a list of (bytes given, whether the socket left a rest) per call."""
    calls, original = [], chat.Outlet.send_now

    def send_now(self, data):
        taken = original(self, data)
        calls.append((len(data), bool(self.rest)))
        return taken
    monkeypatch.setattr(chat.Outlet, "send_now", send_now)
    return calls


def read_a_waiting_reader(server, upstream, parts, version="HTTP/1.1", rcvbuf=None, unread_until_done=False):
    """Post an answer of parts, held until a raw /events reader waits with everything sent, then let it stream
    (unread_until_done: the reader takes nothing until the answer is finished); returns (head, body)."""
    body = answer(*parts)
    upstream.serve(body, pause_at=after_event(body, b'"role"'))
    stream_id = post_prompt(server)
    stream = chat.streams.get(stream_id)

    def connected(sock):
        wait_until(lambda: any(reader.idle for reader in stream.readers), what="the reader waiting, all sent")
        upstream.release()
        if unread_until_done:
            wait_until(lambda: stream.finished, timeout=15, what="the answer, read by nobody meanwhile")
    return read_raw_events(server, stream_id, version, rcvbuf=rcvbuf, connected=connected)


def span_text(events):
    """The text of the token events before the done event."""
    return "".join(re.findall(r"<span>(.*?)</span>", events.split("event: done")[0]))


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_a_reader_that_keeps_up_is_written_straight_from_the_relay(server, upstream, monkeypatch, version):
    """A reader waiting with everything sent is written each token by the relay itself, framed as its response
    is (chunked for HTTP/1.1, plain for HTTP/1.0): the bytes decode to every token in order, then done."""
    calls = count_direct_sends(monkeypatch)
    parts = [f"t{n} " for n in range(200)]
    head, raw = read_a_waiting_reader(server, upstream, parts, version)
    chunked = b"transfer-encoding: chunked" in head.lower()
    assert chunked == (version == "HTTP/1.1")
    events = (dechunk(raw) if chunked else raw).decode()
    assert span_text(events) == "".join(parts)
    assert "event: done" in events
    assert len(calls) >= len(parts)  # each token was sent by the relay, not by the reader's greenlet


def test_a_reader_whose_socket_fills_mid_frame_gets_the_rest_first_then_everything_in_order(
        server, upstream, monkeypatch):
    """When the kernel takes only part of a frame written straight to a reader, the reader's own greenlet sends
    the rest before anything queued after it: the chunked body stays well formed and nothing is lost."""
    calls = count_direct_sends(monkeypatch)
    monkeypatch.setattr(chat, "SEND_BUFFER", 4096)  # the kernel holds little for this client: it fills soon
    parts = [f"w{n} " * 10 for n in range(1500)]  # ~100 KB of frames
    _, raw = read_a_waiting_reader(server, upstream, parts, rcvbuf=4096, unread_until_done=True)
    assert span_text(dechunk(raw).decode()) == "".join(parts)
    assert any(rest for _, rest in calls), "no direct write was cut short: the test did not fill the socket"


def test_a_reader_written_straight_that_stops_reading_is_handed_to_its_greenlet_and_written_in_batches(
        server, upstream, monkeypatch):
    """A reader written straight from the relay that stops taking data refuses the relay's writes within about
    SLOW_READER_BYTES more (TCP_NOTSENT_LOWAT): from then on its own greenlet writes it, in batches (not the
    relay once a token, which a crowd of stuck readers would make the loop's main work), and it still gets
    every token in order."""
    calls = count_direct_sends(monkeypatch)
    parts = [f"w{n} " * 10 for n in range(1500)]  # ~100 KB of frames; the server's buffer (SEND_BUFFER) holds them
    _, raw = read_a_waiting_reader(server, upstream, parts, rcvbuf=4096, unread_until_done=True)
    assert span_text(dechunk(raw).decode()) == "".join(parts)
    straight = sum(size for size, _ in calls)
    # What the client's small buffer took, the bytes until the next check, and one frame: no more.
    assert straight < 2 * chat.SLOW_READER_BYTES + 16384, straight
    assert len(calls) < len(parts) / 2, len(calls)


def test_requests_leave_nothing_to_the_cyclic_garbage_collector(server, upstream, open_sse):
    """A page, a send, its answer read to the end, a 404 and a static file leave no reference cycles of the
    request (handler, environ, bottle's request, template namespaces): freed at once, so a flood of requests
    does not build up collector pauses that stop every stream."""
    import gc
    upstream.serve(answer("Hello", " there"))
    web.get(f"{server}/", timeout=5)  # warm: templates compiled, caches filled
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        assert web.get(f"{server}/", timeout=5).status_code == 200
        stream_id = post_prompt(server)
        open_sse(stream_id).read_until(lambda t: any(e.event == "done" for e in t.events), what="done")
        assert web.get(f"{server}/c/999999", timeout=5).status_code == 404
        assert web.get(f"{server}/static/chat.js", timeout=5).status_code == 200
        assert web.get(f"{server}/healthz", timeout=5).status_code == 200
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, chat.Handler)
                or isinstance(o, dict) and ("bottle.request" in o or "_stdout" in o or "wsgi.input" in o)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not left, f"{len(left)} request objects left in cycles, e.g. {sorted(map(str, left[0]))[:8] if isinstance(left[0], dict) else left[0]}"


def test_long_renders_take_turns_in_one_worker_thread(monkeypatch):
    """Many long answers finishing at once are rendered one after another in a worker thread, never two at a
    time (a dozen threads holding Python's lock in turn would leave the hub one turn in thirteen), and each
    gets its own Markdown."""
    real_sleep = monkey.get_original("time", "sleep")  # the worker threads are real threads
    running, most, guard = [0], [0], monkey.get_original("_thread", "allocate_lock")()
    original = chat.safe_markdown

    def counting(text):
        with guard:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            real_sleep(0.05)  # a render long enough for any others to overlap it
            return original(text)
        finally:
            with guard:
                running[0] -= 1
    monkeypatch.setattr(chat, "safe_markdown", counting)
    texts = [f"**answer {n}** " + "word " * (chat.BLOCK_IN_THREAD // 4) for n in range(6)]
    answers = [dict(chat.answer_record(chat.Stream(f"s{n}", [])), text=text) for n, text in enumerate(texts)]
    bubbles = [g.get(timeout=30) for g in [gevent.spawn(chat.render_answer, a) for a in answers]]
    assert most[0] == 1
    assert all(f"<strong>answer {n}</strong>" in bubble for n, bubble in enumerate(bubbles))


def test_a_large_write_to_a_reader_waits_for_its_turn_of_the_loop(monkeypatch):
    """A write bigger than LARGE_WRITE (a long answer's bubble) first lets what is ready run (give_way); a
    token's write never waits."""
    turns = []
    monkeypatch.setattr(chat, "give_way", lambda: turns.append(1))
    small, large = b"x" * 100, b"x" * (chat.LARGE_WRITE + 1)
    assert chat.in_turn(small) is small and turns == []
    assert chat.in_turn(large) is large and turns == [1]


def owner_cookie_header():
    """The test browser's owner cookie as a Cookie header value."""
    return f"chat_owner={web.cookies['chat_owner']}"


def test_readers_per_stream_are_capped(server, upstream, open_sse, monkeypatch):
    """Attack 5: past CHAT_READERS_PER_STREAM a reader of a live answer is refused with 429."""
    monkeypatch.setattr(chat.settings, "readers_per_stream", 3)
    upstream.serve(answer("x"), hang_at=0)
    stream_id = post_prompt(server)
    readers = [open_sse(stream_id) for _ in range(3)]
    wait_until(lambda: len(chat.streams.get(stream_id).readers) == 3, what="three readers")
    refused = web.get(f"{server}/events", params={"stream": stream_id}, timeout=5)
    assert refused.status_code == 429
    assert readers


def test_cookieless_sends_are_limited_per_address(server, upstream, monkeypatch):
    """Attack 6: without a cookie every send is a new owner: one address gets a small burst, then 429; nothing is stored for refused sends."""
    monkeypatch.setattr(chat.settings, "streams_per_owner", 100)
    upstream.serve(answer("ok"))
    statuses = [requests.post(f"{server}/streaming", data={"prompt": f"flood {n}"}, headers={**FROM_AFAR, **HX},
                              timeout=5).status_code for n in range(20)]
    assert statuses[:3] == [200] * 3 and statuses.count(429) == 17
    assert len(db_rows("SELECT id FROM conversations")) == 3  # refused sends wrote nothing
    # Another address, and the machine itself, are not affected.
    assert requests.post(f"{server}/streaming", data={"prompt": "hi"}, headers={"X-Forwarded-For": "203.0.113.9", **HX},
                         timeout=5).status_code == 200
    assert requests.post(f"{server}/streaming", data={"prompt": "local"}, headers=HX, timeout=5).status_code == 200


def test_concurrent_sends_cannot_pass_the_owner_limit_together(server, upstream, monkeypatch):
    """Attack 6: 20 sends at once with one cookie while /v1/models hangs: exactly 4 start, one /models request."""
    monkeypatch.setattr(chat.settings, "model", None)
    monkeypatch.setattr(chat, "MODELS_DEADLINE", 1.0)
    upstream.models = ["hang"]
    upstream.serve(answer("x"), hang_at=0)
    web.get(f"{server}/healthz", timeout=5)  # get an owner cookie
    cookie = owner_cookie_header()
    statuses = []

    def send_one(n):
        statuses.append(requests.post(f"{server}/streaming", data={"prompt": f"q{n}"}, timeout=10,
                                      headers={"Cookie": cookie, **HX}).status_code)
    gevent.joinall([gevent.spawn(send_one, n) for n in range(20)], timeout=10)

    assert sorted(statuses) == [200] * 4 + [429] * 16
    assert len(db_rows("SELECT id FROM conversations")) == 4
    assert sum(1 for r in upstream.requests if r.path.endswith("/models")) == 1


def test_the_storage_quota_refuses_and_writes_nothing(client, upstream, monkeypatch):
    """Attack 7: past CHAT_OWNER_QUOTA a send is refused with a clear message and nothing is stored."""
    monkeypatch.setattr(chat.settings, "owner_quota", 500)
    upstream.serve(answer("A" * 400))
    read_events(client, send(client, "Q" * 200))
    refused = client.post("/streaming", {"prompt": "one more"}, status=507)
    assert "Delete some" in refused.text
    assert len(db_rows("SELECT id FROM messages")) == 2


def test_a_trickling_or_huge_model_list_never_holds_the_page(server, upstream, monkeypatch):
    """Attack 8: /v1/models trickling or 2 MB: the page is served at once, the fetch gives up within its deadline and size cap."""
    monkeypatch.setattr(chat.settings, "model", None)
    monkeypatch.setattr(chat, "MODELS_DEADLINE", 0.5)
    upstream.models = [{"object": "list", "data": [{"id": "m" * 100, "object": "model"}] * 20_000}]
    page = web.get(f"{server}/", timeout=5)
    assert page.status_code == 200 and len(page.content) < 100_000
    wait_until(lambda: chat.catalog.fetched_at is not None, what="the fetch to give up")
    assert chat.catalog.ids == [] and not chat.catalog.ok  # over the size cap
    assert len(web.get(f"{server}/", timeout=5).content) < 100_000


def test_dns_rebinding_hosts_are_refused(client, monkeypatch):
    """Attack 9: a Host that is not ours gets 421; IP literals, localhost and CHAT_ALLOWED_HOSTS are fine."""
    for host in ("evil.example", "evil.example:8080", "127.0.0.1.nip.io"):
        response = client.get("/", headers={"Host": host}, status=421)
        assert "CHAT_ALLOWED_HOSTS" in response.text
    for host in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080", "localhost"):
        client.get("/healthz", headers={"Host": host}, status=200)
    monkeypatch.setattr(chat.settings, "allowed_hosts", {"chat.example.com"})
    client.get("/healthz", headers={"Host": "chat.example.com"}, status=200)


def test_a_locked_database_delays_only_who_needs_it(server, upstream, open_sse, monkeypatch):
    """Attack 10: another process holds the write lock: tokens and /healthz flow; a send waits, then succeeds."""
    body = answer(*[f" t{n}" for n in range(40)])
    upstream.serve(body, pause_at=after_event(body, b'" t0"'))
    stream_id = post_prompt(server)
    reader = open_sse(stream_id)
    reader.read_until(lambda t: t.message == " t0")
    other = sqlite3.connect(chat.store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        blocked = gevent.spawn(lambda: web.post(f"{server}/streaming", data={"prompt": "during the lock"}, timeout=10))
        upstream.release()
        reader.read_until(lambda t: t.message.endswith(" t39"), what="the tokens during the lock")
        quick_healthz(server)
        assert not blocked.ready()  # it needs the database
    finally:
        other.execute("COMMIT")
        other.close()
    assert blocked.get(timeout=10).status_code == 200
    assert reader.read_until(lambda t: t.finished).message.endswith(" t39")


def test_a_full_disk_says_so_and_keeps_the_words(client, upstream, monkeypatch):
    """Attack 11: the database cannot grow: the send is refused with a clear message; nothing half-written."""
    read_events(client, send(client, "first"))
    pages = chat.store.db.execute("PRAGMA page_count").fetchone()[0]
    chat.store.db.execute(f"PRAGMA max_page_count = {pages}")
    refused = client.post("/streaming", {"prompt": "x" * 20_000}, status=507)
    assert "disk is full" in refused.text


def test_a_full_disk_mid_answer_keeps_the_partial_answer_marked(server, upstream, open_sse, monkeypatch):
    """Attack 11: the disk fills while an answer streams: the bubble says it was not saved; a reload shows what was, marked."""
    monkeypatch.setattr(chat.settings, "grace", 0.2)
    monkeypatch.setattr(chat.settings, "ping_interval", 0.05)
    body = answer("Saved part.", " " + "y" * 20_000)
    upstream.serve(body, pause_at=after_event(body, b'"Saved part."'))
    stream_id = post_prompt(server)
    reader = open_sse(stream_id)
    reader.read_until(lambda t: t.message == "Saved part.")
    wait_until(lambda: db_rows("SELECT content FROM messages WHERE role = 'assistant'") == [("Saved part.",)],
               what="the janitor to save the partial answer")
    pages = chat.store.db.execute("PRAGMA page_count").fetchone()[0]
    chat.store.db.execute(f"PRAGMA max_page_count = {pages}")
    upstream.release()
    done = reader.read_until(lambda t: t.finished).done
    assert any("disk is full" in n for n in notes(done))
    wait_until(lambda: chat.streams.get(stream_id) is None, what="the stream to be dropped")
    conversation = db_rows("SELECT id FROM conversations")[0][0]
    page = web.get(f"{server}/c/{conversation}", timeout=5).text
    (bubble,) = elements(page, "div", cls="interrupted")
    assert "Saved part." in bubble.text and "not saved completely" in bubble.text


@pytest.mark.parametrize("typed, headers", [
    ("café", {"HX-Prompt": "café".encode().decode("latin-1")}),
    ("日本語 notes", {"HX-Prompt": urllib.parse.quote("日本語 notes"), "HX-Prompt-URI-AutoEncoded": "true"}),
    ("plain", {"HX-Prompt": "plain"}),
])
def test_rename_decodes_hx_prompt(client, upstream, typed, headers):
    """Attack 11: rename through htmx's prompt stores exactly what was typed."""
    _, conversation = send_in(client, "hello")
    client.post(f"/c/{conversation}/rename", headers=headers, status=200)
    assert db_rows("SELECT title FROM conversations") == [(typed,)]


def test_every_answer_carries_the_security_headers(client):
    """Attack 11: CSP (scripts from self, no framing), nosniff and a referrer policy, on pages and errors alike."""
    for response in (client.get("/"), client.get("/c/nope", status=404), client.get("/", headers={"Host": "x.example"},
                                                                                  status=421)):
        csp = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"


def test_a_chosen_owner_id_is_not_accepted(client, upstream):
    """Attack 11: a client cannot pick its owner id: an unsigned or forged cookie gets a fresh, signed one."""
    _, conversation = send_in(client, "mine")
    victim = client.cookies["chat_owner"].split(".")[0]
    for forged in (victim + ".forgedsignatureforged00", "x" * 30, "x" * 30 + ".forgedsignatureforged00"):
        attacker = htmx_app()
        attacker.set_cookie("chat_owner", forged)
        attacker.get(f"/c/{conversation}", status=404)
        assert attacker.cookies["chat_owner"].split(".")[0] not in (victim, "x" * 30)


def test_an_unsigned_owner_cookie_from_an_older_version_keeps_its_conversations(client, upstream):
    """Upgrading does not lock browsers out: a known unsigned owner id (set before signing) is re-signed."""
    _, conversation = send_in(client, "mine")
    old_style = client.cookies["chat_owner"].split(".")[0]
    browser = htmx_app()
    browser.set_cookie("chat_owner", old_style)
    browser.get(f"/c/{conversation}", status=200)
    assert browser.cookies["chat_owner"] == client.cookies["chat_owner"]


# ---------------------------------------------------------------------------
# The page people expect: Markdown while streaming, math, no JavaScript needed
# ---------------------------------------------------------------------------

def test_finished_blocks_are_sent_rendered_while_the_answer_streams(server, upstream, open_sse):
    """A paragraph and a closed code fence arrive rendered (block events) before the answer ends; tokens stay spans."""
    parts = ["Para", " **one**.", "\n\n", "```py", "thon\nx = 1\n", "```", "\n", "Still ", "typing"]
    body = answer(*parts, " on.")
    upstream.serve(body, pause_at=after_event(body, b'"typing"'))
    stream_id = post_prompt(server)
    reader = open_sse(stream_id)

    live = reader.read_until(lambda t: t.message.endswith("typing"))
    blocks = [e for e in live.events if e.event == "block"]
    assert len(blocks) == 2 and not live.finished
    assert "<p>Para <strong>one</strong>.</p>" in blocks[0].data
    assert 'class="code-block"' in blocks[1].data and '<span class="lang">python</span>' in blocks[1].data
    assert f'hx-swap-oob="innerHTML:#tail-{stream_id}"' in blocks[1].data
    assert blocks[1].data.endswith("<span></span></div>")  # the tail after the fence: nothing yet
    assert live.message == "".join(parts)  # the span tokens are all still there, for other clients
    upstream.release()
    done = reader.read_until(lambda t: t.finished).done
    assert "<p>Still typing on.</p>" in done


def test_a_reconnect_replays_blocks_exactly(server, upstream, open_sse):
    """Last-Event-ID after a block: the same block and tail frames again, rendered from the log."""
    body = answer("First para.", "\n\n", "Second", " para.", "\n\n", "Third")
    upstream.serve(body, pause_at=after_event(body, b'"Third"'))
    stream_id = post_prompt(server)
    second_block = lambda t: any(e.event == "block" and "Second para." in e.data for e in t.events)  # noqa: E731
    first = open_sse(stream_id).read_until(second_block)
    replay = open_sse(stream_id, last_event_id=1).read_until(second_block)
    assert replay.events == [e for e in first.events if e.id > 1]
    upstream.release()


def test_bytes_per_answer_grow_linearly(client, upstream):
    """No resending the answer so far: twice the paragraphs, about twice the bytes."""
    sizes = []
    for paragraphs in (40, 80):
        upstream.serve(answer(*[f"Paragraph {n} has **some** words in it.\n\n" for n in range(paragraphs)]))
        sizes.append(len(relay(client).raw))
    assert 1.8 < sizes[1] / sizes[0] < 2.2


def test_markdown_blocks_split_where_blocks_end():
    """Unit: paragraphs at blank lines, a list kept whole, fences and headings on their own line; nothing lost."""
    splitter = chat.MarkdownBlocks()
    text = ("Hello **world**.\n\nSecond para\ncontinues.\n\n- a\n- b\n\n- c\n\nAfter list.\n# Heading\nText\n"
            "```py\nx=1\n\n```\nTail")
    blocks = [b for ch in text for b in splitter.feed(ch)]
    assert blocks == ["Hello **world**.\n\n", "Second para\ncontinues.\n\n", "- a\n- b\n\n- c\n\n", "After list.\n",
                      "# Heading\n", "Text\n", "```py\nx=1\n\n```\n"]
    assert text.encode()[splitter.offset:] == b"Tail"


@pytest.mark.parametrize("tex, expect", [
    ("$x^2$", "<msup><mi>x</mi><mn>2</mn></msup>"),
    ("$$\\frac{1}{2}$$", '<math display="block">'),
    ("\\(a+b\\)", "<mo>+</mo>"),
    ("\\[c\\]", '<math display="block"><mrow><mi>c</mi></mrow></math>'),
])
def test_math_renders_as_mathml(tex, expect):
    """Every math syntax becomes MathML on the server."""
    assert expect in chat.render_markdown(f"Look: {tex} here.")


def test_math_is_safe_and_invalid_tex_stays_code():
    """Hostile TeX cannot inject markup; TeX that does not parse is shown as code; money is not math."""
    rendered = chat.render_markdown("$\\text{<script>alert(1)</script>}$ $\\href{javascript:alert(1)}{x}$ "
                                    "$\\style{color:red}{y}$ $\\frac{1}{$ costs $5 and $10")
    assert "<script" not in rendered and "javascript:" not in rendered and "style=" not in rendered
    assert '<code class="math-error" title="Not valid TeX">\\frac{1}{</code>' in rendered
    assert "costs $5 and $10" in rendered


def test_links_open_in_a_new_tab_and_bare_urls_are_links():
    """Links get target=_blank and rel=noopener noreferrer; https:// URLs are linked, chat.py is not."""
    rendered = chat.render_markdown("[docs](https://example.com/docs) and https://example.org/x. See chat.py.")
    assert rendered.count('target="_blank" rel="noopener noreferrer nofollow"') == 2
    assert '<a href="https://example.org/x"' in rendered and ">chat.py<" not in rendered


def test_remote_images_are_links_unless_allowed(client, monkeypatch):
    """A Markdown image from elsewhere is a link, never loaded; an allow-listed host's image loads, and CSP allows it."""
    rendered = chat.render_markdown("![chart](https://tracker.example/p.png?user=1)")
    assert "<img" not in rendered and 'class="image-link"' in rendered
    monkeypatch.setattr(chat.settings, "image_hosts", {"images.example"})
    assert '<img src="https://images.example/a.png"' in chat.render_markdown("![a](https://images.example/a.png)")
    assert "https://images.example" in client.get("/").headers["Content-Security-Policy"]
    assert "<img" not in chat.render_markdown("![a](http://images.example/a.png)")  # https only


def test_a_second_answer_in_the_same_conversation_is_refused(client, upstream):
    """409 with a clear message while the conversation is still answering; nothing is stored for it."""
    upstream.serve(answer("x"), hang_at=0)
    stream_id, conversation = send_in(client, "first")
    refused = client.post("/streaming", {"prompt": "second", "conversation": conversation}, status=409)
    assert "still being written" in refused.text
    assert db_rows("SELECT content FROM messages WHERE role = 'user'") == [("first",)]
    client.post(f"/c/{conversation}/regenerate", status=409)
    chat.streams.stop(stream_id)
    read_events(client, stream_id)
    upstream.serve(answer("ok"))
    client.post("/streaming", {"prompt": "second", "conversation": conversation}, status=200)


def test_without_javascript_a_send_redirects_to_the_conversation(client, upstream):
    """A plain form post stores the message and answers 303 to /c/ID; the prompt never goes in a URL."""
    plain = plain_app()
    response = plain.post("/streaming", {"prompt": "secret plans"}, status=303)
    conversation = response.headers["Location"].rsplit("/c/", 1)[1]
    assert "secret" not in response.headers["Location"]
    assert plain.cookies["chat_plain"] == "1"
    assert db_rows("SELECT role, content FROM messages ORDER BY id")[0] == ("user", "secret plans")
    assert db_rows("SELECT id FROM conversations") == [(conversation,)]


def test_without_javascript_an_error_keeps_the_words(client):
    """A refused plain send shows the page again with the reason and the words still in the box."""
    plain = plain_app()
    page = plain.post("/streaming", {"prompt": "x" * (chat.settings.max_prompt + 1)}, status=413)
    assert "Shorten it" in page.text
    (box,) = elements(page.text, "textarea", id="prompt")
    assert box.text == "x" * (chat.settings.max_prompt + 1)


def test_without_javascript_the_page_streams_the_answer_as_html(server, upstream):
    """/c/ID for a browser without JavaScript streams the live answer as HTML (chunked), then the finished bubble."""
    body = answer("First **para**.", "\n\n", "Second", " part")
    upstream.serve(body, pause_at=after_event(body, b'"Second"'))
    plain = requests.Session()
    plain.trust_env = False
    sent = plain.post(f"{server}/streaming", data={"prompt": "hello"}, allow_redirects=False, timeout=5)
    assert sent.status_code == 303
    page = plain.get(urllib.parse.urljoin(server, sent.headers["Location"]), stream=True, timeout=10)
    assert page.headers.get("Cache-Control") == "no-store"
    received = b""
    with gevent.Timeout(5, AssertionError(f"the first block did not stream: {received[-500:]!r}")):
        while b"<strong>para</strong>" not in received:
            received += page.raw.read1(65536)
    assert b'class="msg assistant streaming plain"' in received and b'class="msg assistant done' not in received
    assert b'action="/stop?stream=' in received  # Stop is a plain form
    upstream.release()
    while chunk := page.raw.read1(65536):
        received += chunk
    text = received.decode()
    assert text.index('class="msg assistant streaming plain"') < text.index('class="msg assistant done done"')
    assert "<p>Second part</p>" in text and text.rstrip().endswith("</html>")


def test_without_javascript_stop_rename_regenerate_and_delete_are_forms(client, upstream):
    """Each control posts a plain form and lands back on a page (303); delete asks on a page first."""
    plain = plain_app()
    upstream.serve(answer("x"), hang_at=0)
    conversation = plain.post("/streaming", {"prompt": "q"}, status=303).headers["Location"].rsplit("/", 1)[1]
    stream = next(iter(chat.streams.by_id.values()))
    assert plain.post(f"/stop?stream={stream.id}", status=303).headers["Location"].endswith(f"/c/{conversation}")
    wait_until(lambda: stream.finished, what="the stop")
    upstream.serve(answer("again"))
    plain.post(f"/c/{conversation}/regenerate", status=303)
    wait_until(lambda: db_rows("SELECT content FROM messages WHERE role = 'assistant' ORDER BY id")[-1] == ("again",),
               what="the regenerated answer")
    page = plain.get(f"/c/{conversation}")
    (title_input,) = elements(page.text, "input", name="title")
    assert title_input.attrs["value"] == "q"  # the rename box is prefilled
    plain.post(f"/c/{conversation}/rename", {"title": "Renamed"}, status=303)
    assert db_rows("SELECT title FROM conversations") == [("Renamed",)]
    confirm = plain.get(f"/c/{conversation}/delete")
    assert f'action="/c/{conversation}/delete"' in confirm.text
    assert plain.post(f"/c/{conversation}/delete", status=303).headers["Location"].endswith("/")
    assert db_rows("SELECT id FROM conversations") == []


def test_pages_with_conversations_are_not_cached(client, upstream):
    """/ and /c/ID send Cache-Control: no-store (Back after Log out must not show them)."""
    _, conversation = send_in(client, "hi")
    for path in ("/", f"/c/{conversation}"):
        assert client.get(path).headers["Cache-Control"] == "no-store", path


def test_unknown_conversation_is_an_html_page_with_a_way_home(client):
    """A browser that opens a missing /c/ID gets a page in the site's style, 404, with a link home."""
    page = plain_app().get("/c/nope", headers={"Accept": "text/html"}, status=404)
    assert page.content_type == "text/html" and '<a class="button" href="/">' in page.text
    assert 'href="/static/chat.css"' in page.text


def test_titles_are_cut_at_a_word_without_markdown(client, upstream):
    """The title is the first message without Markdown syntax, cut at a word with an ellipsis; the tab title follows."""
    prompt = "**Plan** a _trip_ to `Lisbon` with [friends](https://x.example) and then go on to Porto by train"
    response = client.post("/streaming", {"prompt": prompt})
    (title,) = db_rows("SELECT title FROM conversations")[0]
    assert title == "Plan a trip to Lisbon with friends and then go on to Porto…"
    assert f"<title>{title} — chat.py</title>" in response.text
    assert chat.make_title("short") == "short" and chat.make_title("a" * 80).endswith("…")


def test_help_and_demo_suggest_a_free_port_for_llama_cpp():
    """llama.cpp is shown on 8081, not on chat.py's own 8080."""
    result = subprocess.run([sys.executable, "chat.py", "--help"], cwd=HERE, capture_output=True, text=True,
                            timeout=30, env=clean_env())
    assert "localhost:8081/v1 (llama.cpp)" in " ".join(result.stdout.split())
    assert "localhost:8080/v1" not in result.stdout and "localhost:8080/v1" not in chat.demo_reply("hi")


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


@pytest.fixture(scope="session")
def artifacts():
    """Both artifacts, built by ship/build.py once per source state and cached; no build tools: skip, or fail in CI."""
    missing = [name for name in ("shiv", "PyInstaller") if importlib.util.find_spec(name) is None]
    if missing:
        message = f"{' and '.join(missing)} not installed (pip install -r ship/requirements.txt)"
        if os.environ.get("CI"):
            pytest.fail(f"cannot build the artifacts under CI: {message}")
        pytest.skip(message)
    commit = head_commit()
    key = build_key(commit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chat.py-build" / key
    built = Built(cache / "chat.pyz", cache / "chat", commit)
    if not (built.pyz.exists() and built.exe.exists()):
        # Build beside the cache entry and rename it into place: an interrupted build leaves no entry.
        partial = cache.with_name(f"{key}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run([sys.executable, "ship/build.py", "--out", str(partial)], cwd=HERE,
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or build_key(head_commit()) != key:
            shutil.rmtree(partial, ignore_errors=True)
            pytest.fail(f"ship/build.py failed:\n{result.stdout}\n{result.stderr}" if result.returncode else
                        "the sources or HEAD changed during the build: run the tests again")
        try:
            partial.rename(cache)
        except OSError:  # another run cached the same build meanwhile
            shutil.rmtree(partial)
        prune_builds(cache.parent)
    return built


def prune_builds(folder, keep=4):
    """Delete all but the newest few cached builds (about 20 MB each); builds still in progress stay."""
    entries = sorted((p for p in folder.iterdir() if re.fullmatch(r"[0-9a-f]{16}", p.name)),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory):
    """A venv made --without-pip: the interpreter's standard library and no package of its own."""
    bare = tmp_path_factory.mktemp("bare-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120,
                   env=bare_env(bare))
    python = bare / "bin" / "python3"
    for isolated in (["-I"], []):
        probe = subprocess.run([str(python), *isolated, "-c", "import bottle"], capture_output=True,
                               env=bare_env(bare), timeout=30)
        assert probe.returncode != 0, "the bare Python can import bottle: it is not bare"
    return python


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


def without_python(path):
    """PATH without any folder that holds a python or python3."""
    return os.pathsep.join(d for d in path.split(os.pathsep)
                           if not any(os.access(os.path.join(d, name), os.X_OK) for name in ("python", "python3")))


def place(request, tmp_path, kind, isolated=True):
    """Copy one artifact alone into an empty folder; return that folder, the command to run there and its env."""
    artifact = getattr(request.getfixturevalue("artifacts"), kind)
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy2(artifact, folder / artifact.name)
    home = tmp_path / "home"
    home.mkdir()
    env = bare_env(home, CHAT_DEMO_DELAY="0.001")
    if kind == "pyz":
        env["SHIV_ROOT"] = str(tmp_path / "shiv")  # shiv unpacks its packages here on the first run
        python = request.getfixturevalue("bare_python")
        return folder, [str(python), *(["-I"] if isolated else []), artifact.name], env
    env["PATH"] = without_python(env["PATH"])
    assert shutil.which("python3", path=env["PATH"]) is None and shutil.which("python", path=env["PATH"]) is None
    return folder, ["./" + artifact.name], env


class ArtifactProcess:
    """An artifact serving on a free loopback port from its folder, in a session of its own (for Ctrl-C)."""

    def __init__(self, command, folder, env, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen([*command, "--port", str(self.port)], cwd=folder, env=env,
                                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self.answering, timeout=60, what=f"GET / of {' '.join(command)}")
        except BaseException:
            self.kill()
            raise

    @property
    def output(self):
        """What it printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def answering(self):
        """True once GET / answers 200; fails at once if the process died."""
        assert self.process.poll() is None, f"it exited with {self.process.returncode}: {self.output}"
        try:
            return web.get(self.url + "/", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self, signum):
        """SIGTERM to the process (as docker does) or SIGINT to its group (as Ctrl-C does); return the exit code."""
        if signum == signal.SIGINT:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=15)
        finally:
            self.kill()

    def kill(self):
        """Kill whatever is left of its process group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@pytest.mark.parametrize("kind, isolated, signum", [
    ("pyz", True, signal.SIGTERM), ("pyz", False, signal.SIGINT),
    ("exe", None, signal.SIGTERM), ("exe", None, signal.SIGINT),
], ids=["pyz-isolated-sigterm", "pyz-ctrl-c", "exe-sigterm", "exe-ctrl-c"])
def test_artifact_alone_serves_the_page_and_the_demo_and_stops_cleanly(request, tmp_path, kind, isolated, signum):
    """Alone with no Python packages about: the page, htmx, a streamed demo answer, chat.db there, a clean stop."""
    folder, command, env = place(request, tmp_path, kind, isolated)
    app = ArtifactProcess(command, folder, env, tmp_path / "chat.log")
    try:
        page = web.get(app.url + "/", timeout=5)
        assert '<textarea name="prompt"' in page.text and 'src="/static/htmx.min.js"' in page.text
        for name in ("htmx.min.js", "htmx-ext-sse.js", "chat.css"):
            served = web.get(f"{app.url}/static/{name}", timeout=5)
            assert served.status_code == 200 and served.content == (HERE / "static" / name).read_bytes(), name

        stream_id = post_prompt(app.url, "hello from the shipped artifact")
        transcript = Transcript(web.get(f"{app.url}/events", params={"stream": stream_id}, timeout=30).content)
        assert "demo model" in transcript.message
        done = transcript.done
        assert alerts(done) == []
        assert "<strong>" in done and "<ol>" in done  # markdown-it rendered it
        assert '<span class="k">def</span>' in done  # Pygments found its Python lexer
        assert (folder / "chat.db").exists()
    finally:
        code = app.stop(signum)
    output = app.output
    assert code == 0, output
    assert "Traceback" not in output and not re.search(r"\w+Warning:", output), output
    assert "shutting down" in output

    with sqlite3.connect(folder / "chat.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT count(*) FROM conversations").fetchone() == (1,)
        rows = db.execute("SELECT role, status, content FROM messages ORDER BY id").fetchall()
    assert [(role, status) for role, status, _ in rows] == [("user", "done"), ("assistant", "done")]
    assert rows[0][2] == "hello from the shipped artifact" and "demo model" in rows[1][2]


@pytest.mark.parametrize("kind, isolated", [("pyz", True), ("pyz", False), ("exe", None)],
                         ids=["pyz-isolated", "pyz", "exe"])
def test_artifact_help_and_version(request, artifacts, tmp_path, kind, isolated):
    """--version names the version and the commit built; --help documents the flags and settings; both exit 0."""
    folder, command, env = place(request, tmp_path, kind, isolated)
    version = subprocess.run([*command, "--version"], cwd=folder, env=env, capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"chat.py {chat.VERSION} ({artifacts.commit})\n"
    helped = subprocess.run([*command, "--help"], cwd=folder, env={**env, "COLUMNS": "100"},
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    for name in ("--port", "--db", "--base-url", "OPENAI_BASE_URL", "CHAT_DB", "CHAT_PASSWORD"):
        assert name in helped.stdout, name
    assert version.stderr == helped.stderr == ""  # no warnings
    assert sorted(os.listdir(folder)) == [Path(command[-1]).name]  # nothing written beside it


# ---------------------------------------------------------------------------
# Conversations people expect: edit, branches, search, parameters
# ---------------------------------------------------------------------------

def conversation_rows():
    """(id, parent_id, role, content) of every message, in order."""
    return db_rows("SELECT id, parent_id, role, content FROM messages ORDER BY id")


def test_edit_makes_a_sibling_and_sends_the_branch_shown(client, upstream):
    """Editing a question adds a new version beside it; upstream gets the path to it, not the old branch."""
    upstream.serve(answer("A1"))
    stream_id, conversation = send_in(client, "Q1")
    read_events(client, stream_id)
    upstream.serve(answer("A2"))
    read_events(client, send_in(client, "Q2", conversation)[0])
    body = answer("A2", " edited")
    upstream.serve(body, pause_at=after_event(body, b'"A2"'))  # still streaming when the branch is drawn
    q2 = next(r[0] for r in conversation_rows() if r[3] == "Q2")

    response = client.post(f"/c/{conversation}/edit", {"message": q2, "prompt": "Q2 edited"}, headers=HX)

    new_stream = re.search(r'sse-connect="/events\?stream=([\w-]+)"', response.text).group(1)
    upstream.release()
    assert read_events(client, new_stream).message == "A2 edited"
    assert upstream.last.json["messages"] == [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2 edited"}]
    rows = conversation_rows()
    assert [(r[2], r[3]) for r in rows if r[1] == rows[1][0]] == [("user", "Q2"), ("user", "Q2 edited")]
    page = client.get(f"/c/{conversation}").text
    assert "Q2 edited" in page and ">Q2<" not in page and "2/2" in page  # the new branch is shown


def test_switching_versions_shows_that_branch_and_survives_a_reload(client, upstream):
    """‹ › moves between siblings; the choice is stored, so a reload lands on the same branch."""
    upstream.serve(answer("First answer"))
    stream_id, conversation = send_in(client, "Q")
    read_events(client, stream_id)
    upstream.serve(answer("Second answer"))
    client.post(f"/c/{conversation}/regenerate", headers=HX)
    wait_until(lambda: not chat.streams.by_id or all(s.finished for s in chat.streams.by_id.values()),
               what="the second answer")
    first = next(r[0] for r in conversation_rows() if r[3] == "First answer")

    fragment = client.post(f"/c/{conversation}/branch", {"to": first}, headers=HX).text

    assert "First answer" in fragment and "Second answer" not in fragment and "1/2" in fragment
    assert f'id="parent" value="{first}" hx-swap-oob="true"' in fragment  # the composer follows
    reloaded = client.get(f"/c/{conversation}").text
    assert "First answer" in reloaded and "Second answer" not in reloaded
    upstream.serve(answer("Follow-up"))
    read_events(client, send_in(client, "more", conversation, parent=str(first))[0])
    assert [m["content"] for m in upstream.last.json["messages"]] == ["Q", "First answer", "more"]


def test_a_stranger_cannot_switch_or_edit_branches(client, upstream):
    """Branch, edit and regenerate are owner-scoped: another browser gets 404."""
    _, conversation = send_in(client, "mine")
    stranger = htmx_app()
    stranger.post(f"/c/{conversation}/branch", {"to": "1"}, status=404)
    stranger.post(f"/c/{conversation}/edit", {"message": "1", "prompt": "x"}, status=404)
    stranger.post(f"/c/{conversation}/regenerate", status=404)


def test_the_schema_migration_keeps_old_conversations(tmp_path):
    """A database from before branches opens as one branch per conversation, showing all of it, searchable."""
    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.executescript(chat.MIGRATIONS[0].sqlite + chat.MIGRATIONS[1].sqlite + "PRAGMA user_version = 2;")
    old.execute("INSERT INTO conversations VALUES ('c1', 'owner1', 'Old chat', '', NULL, 1, 2)")
    for n, (role, content) in enumerate([("user", "old question"), ("assistant", "old answer"),
                                          ("user", "again"), ("assistant", "zebra crossing")], 1):
        old.execute("INSERT INTO messages (id, conversation_id, role, content, created) VALUES (?, 'c1', ?, ?, ?)",
                    (n, role, content, n))
    old.commit()
    old.close()
    store = chat.Store(path)
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == len(chat.MIGRATIONS)
        rows = store.messages("c1")
        assert [(r["id"], r["parent_id"]) for r in rows] == [(1, None), (2, 1), (3, 2), (4, 3)]
        assert store.conversation("c1", "owner1")["leaf_id"] == 4
        tree = chat.Tree(rows)
        assert [r["content"] for r in tree.path(4)] == ["old question", "old answer", "again", "zebra crossing"]
        assert [r["message_id"] for r in store.search("owner1", ["zebra"])] == [4]
    finally:
        store.close()


def test_exports_hold_every_branch_in_json_and_the_shown_one_in_markdown(client, upstream):
    """JSON has all messages with id and parent_id; Markdown is the branch on screen."""
    upstream.serve(answer("Old answer"))
    read_events(client, send_in(client, "Q")[0])
    conversation = db_rows("SELECT id FROM conversations")[0][0]
    upstream.serve(answer("New answer"))
    client.post(f"/c/{conversation}/regenerate", headers=HX)
    wait_until(lambda: all(s.finished for s in chat.streams.by_id.values()), what="the new answer")
    data_ = client.get(f"/c/{conversation}/export.json").json
    assert [(m["role"], m["content"], m["parent_id"]) for m in data_["messages"]] == [
        ("user", "Q", None), ("assistant", "Old answer", data_["messages"][0]["id"]),
        ("assistant", "New answer", data_["messages"][0]["id"])]
    assert data_["shown_leaf_id"] == data_["messages"][2]["id"]
    markdown_ = client.get(f"/c/{conversation}/export.md").text
    assert "New answer" in markdown_ and "Old answer" not in markdown_


def test_search_finds_titles_and_content_of_this_owner_only(client, upstream):
    """FTS search by title and by words in messages; another owner's words never match; the hit links to its message."""
    upstream.serve(answer("The capital of Portugal is Lisbon."))
    read_events(client, send_in(client, "Where should I travel?")[0])
    upstream.serve(answer("Unrelated."))
    stranger = htmx_app()
    stranger_stream = re.search(r"stream=([\w-]+)",
                                stranger.post("/streaming", {"prompt": "secret lisbon plans"}).text).group(1)
    read_events(stranger, stranger_stream)

    hits = elements(client.get("/search", {"q": "lisb"}).text, "a")
    assert len(hits) == 1 and "Lisbon" in hits[0].text
    message_id = db_rows("SELECT id FROM messages WHERE content LIKE 'The capital%'")[0][0]
    assert hits[0].attrs["href"].endswith(f"?at={message_id}#answer-m{message_id}")
    assert "<mark>Lisbon</mark>" in client.get("/search", {"q": "lisbon"}).text
    titles = elements(client.get("/search", {"q": "travel"}).text, "a")
    assert [h.text.strip() for h in titles][:1] == ["Where should I travel?"]
    assert elements(stranger.get("/search", {"q": "portugal"}).text, "a") == []
    assert "Nothing found" in client.get("/search", {"q": 'secret OR "plans" NEAR(x'}).text  # no FTS syntax leaks


def test_search_without_javascript_is_a_page(client, upstream):
    """A plain GET /search shows the page with the results in the sidebar."""
    upstream.serve(answer("Pelicans are birds."))
    read_events(client, send_in(client, "Tell me about pelicans")[0])
    page = plain_app().get("/search", {"q": "pelican"})
    assert page.status_int == 200  # a fresh browser: no conversations of its own
    own = client.get("/search", {"q": "pelican"}, headers={"HX-Request": ""}).text
    assert 'id="search-results"' in own and "pelicans" in own.lower()


def test_a_search_hit_in_another_branch_opens_that_branch(client, upstream):
    """?at=ID shows the branch through that message, without changing the one stored."""
    upstream.serve(answer("apple answer"))
    read_events(client, send_in(client, "Q")[0])
    conversation = db_rows("SELECT id FROM conversations")[0][0]
    upstream.serve(answer("banana answer"))
    client.post(f"/c/{conversation}/regenerate", headers=HX)
    wait_until(lambda: all(s.finished for s in chat.streams.by_id.values()), what="the second answer")
    apple = db_rows("SELECT id FROM messages WHERE content = 'apple answer'")[0][0]
    page = client.get(f"/c/{conversation}", {"at": apple}).text
    assert "apple answer" in page and "banana answer" not in page and f'id="answer-m{apple}"' in page
    assert "banana answer" in client.get(f"/c/{conversation}").text


def test_parameters_reach_the_upstream_only_when_set(client, upstream, monkeypatch):
    """Blank means the server's default (not sent); set values are sent and kept per conversation; env gives defaults."""
    upstream.serve(answer("x"))
    stream_id, conversation = send_in(client, "hi", temperature="", top_p="", max_tokens="")
    read_events(client, stream_id)
    assert not {"temperature", "top_p", "max_tokens"} & set(upstream.last.json)
    read_events(client, send_in(client, "again", conversation, temperature="0.2", top_p="0.9", max_tokens="64")[0])
    assert (upstream.last.json["temperature"], upstream.last.json["top_p"], upstream.last.json["max_tokens"]) == (
        0.2, 0.9, 64)
    read_events(client, send_in(client, "kept", conversation)[0])  # fields left out: unchanged
    assert upstream.last.json["temperature"] == 0.2
    page = client.get(f"/c/{conversation}").text
    assert elements(page, "input", name="temperature")[0].attrs["value"] == "0.2"
    assert "open" in elements(page, "details", cls="options")[0].attrs  # the panel shows what is set
    monkeypatch.setattr(chat.settings, "temperature", 0.7)
    read_events(client, send_in(client, "new chat")[0])
    assert upstream.last.json["temperature"] == 0.7 and "top_p" not in upstream.last.json


@pytest.mark.parametrize("field, value", [("temperature", "3"), ("top_p", "-0.1"), ("max_tokens", "1.5"),
                                          ("temperature", "warm")])
def test_bad_parameters_are_refused_and_nothing_is_stored(client, upstream, field, value):
    """A parameter out of range gets 400 with a clear message; the message is not stored."""
    response = client.post("/streaming", {"prompt": "hi", field: value}, headers=HX, status=400)
    assert "blank for the default" in response.text
    assert db_rows("SELECT id FROM messages") == []


def test_a_saved_system_prompt_starts_new_chats(client, upstream):
    """"Use this system prompt for new chats" prefills it on the next new chat and it is sent."""
    read_events(client, send_in(client, "hi", system="Answer in French.", save_system="1")[0])
    page = client.get("/").text
    (system,) = elements(page, "textarea", id="system")
    assert system.text == "Answer in French."
    read_events(client, send_in(client, "bonjour", system=system.text)[0])
    assert upstream.last.json["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert htmx_app().get("/").text.count("Answer in French.") == 0  # another browser's new chats: untouched


def test_edit_regenerate_and_switch_versions_in_the_browser(open_page, page_upstream, live_chat):
    """Edit a question and resend, Regenerate, move with ‹ ›, reload on the same branch."""
    page = open_page().page
    page_upstream.serve(answer("Paris is the capital."))
    finished_bubble(page, type_and_send(page, "Capital of France?"))
    # Edit the question: a second version with its own answer.
    page_upstream.serve(answer("Rome is the capital."))
    page.locator(".msg.user details.edit summary").click()
    page.locator(".msg.user details.edit textarea").fill("Capital of Italy?")
    page.locator(".msg.user details.edit button[type=submit]").click()
    page.wait_for_function("() => document.querySelector('.msg.assistant.done') && "
                           "document.querySelector('.msg.assistant.done').textContent.includes('Rome')")
    assert page.locator(".msg.user .bubble").all_inner_texts() == ["Capital of Italy?"]
    assert page.locator(".msg.user .siblings .position").inner_text() == "2/2"
    # Regenerate the answer: a second answer beside the first, both kept.
    page_upstream.serve(answer("Rome, since 1871."))
    page.locator(".msg.assistant button.regenerate").click()
    page.wait_for_function("() => [...document.querySelectorAll('.msg.assistant.done')].some("
                           "b => b.textContent.includes('since 1871'))")
    assert page.locator(".msg.assistant .siblings .position").inner_text() == "2/2"
    page.locator(".msg.assistant .siblings button.prev").click()
    page.wait_for_function("() => document.querySelector('.msg.assistant .content').textContent.trim() === 'Rome is the capital.'")
    page.locator(".msg.user .siblings button.prev").click()
    page.wait_for_function("() => document.querySelector('.msg.user .bubble').textContent.trim() === 'Capital of France?'")
    assert page.locator(".msg.assistant .content").inner_text() == "Paris is the capital."
    page.reload()
    assert page.locator(".msg.user .bubble").all_inner_texts() == ["Capital of France?"]
    assert page.locator(".msg.user .siblings .position").inner_text() == "1/2"
    # The next question continues the branch on screen.
    page_upstream.serve(answer("About 2 million."))
    finished_bubble(page, type_and_send(page, "Population?"))
    assert [m["content"] for m in page_upstream.last.json["messages"]] == [
        "Capital of France?", "Paris is the capital.", "Population?"]
    if os.environ.get("CHAT_UPDATE_SCREENSHOT"):
        page.set_viewport_size({"width": 900, "height": 520})
        page.locator(".msg.user .siblings").first.scroll_into_view_if_needed()
        page.screenshot(path=str(HERE / "static" / "screenshot-branches.png"))


def test_ctrl_k_search_opens_a_result_at_its_message(open_page, page_upstream, live_chat):
    """Ctrl+K focuses the search box; typing lists matches; a result opens its conversation at the message."""
    page = open_page().page
    page_upstream.serve(answer(*[f"Filler paragraph {n}.\n\n" for n in range(30)], "The okapi lives in Congo."))
    finished_bubble(page, type_and_send(page, "Tell me about rare animals"))
    page.get_by_role("link", name="New chat").click()
    page.wait_for_url(live_chat.url + "/")
    page.wait_for_function("() => document.activeElement.id === 'prompt'")  # the new page has settled
    page.keyboard.press("Control+k")
    assert page.evaluate("document.activeElement.id") == "search"
    page.keyboard.type("okapi")
    result = page.locator("#search-results a").first
    result.wait_for()
    assert "okapi" in result.inner_text().lower()
    result.click()
    page.wait_for_url("**/c/**#answer-m*")
    found = page.locator(".msg.found")
    found.wait_for()
    assert "okapi" in found.inner_text()
    box = found.bounding_box()
    assert box["y"] < page.viewport_size["height"] and box["y"] + box["height"] > 0  # scrolled into view


# ---------------------------------------------------------------------------
# The page people expect: Markdown while streaming, math, no JavaScript, history,
# focus, phones, drafts, titles, links — in a real browser
# ---------------------------------------------------------------------------

AT_BOTTOM = ("() => { const e = document.scrollingElement; "
             "return e.scrollHeight - e.scrollTop - e.clientHeight <= 50; }")


def words(text):
    """Text with its whitespace normalised (innerText puts newlines between blocks)."""
    return " ".join(text.split())


def no_js_page(browser, live_chat, watches, **options):
    """A new tab in a context with JavaScript off (closed with the test); returns its PageWatch and context."""
    ctx = browser.new_context(java_script_enabled=False, **options)
    page = ctx.new_page()
    page.set_default_timeout(10_000)
    watch = PageWatch(page)
    watches.append(watch)
    page.goto(live_chat.url + "/")
    return watch, ctx


def send_without_js(page, prompt):
    """Type a prompt into the plain form and click Send; wait for the 303 and the conversation's page to begin."""
    page.fill("#prompt", prompt)
    with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/streaming")) as posted:
        page.click("#send", no_wait_after=True)
    assert posted.value.status == 303
    page.wait_for_url(re.compile(r"/c/[\w-]+$"), wait_until="commit")


def test_markdown_blocks_render_while_the_answer_streams(open_page, page_upstream):
    """Finished blocks (a paragraph, highlighted code under its bar) render while the upstream waits; then the tail."""
    body = answer("Some **bold** words.\n\n", "```python\n", "def f():\n", "    return 1\n", "```\n", "More te")
    reply = page_upstream.serve(body, pause_at=after_event(body, b'"More te"'))
    page = open_page().page
    stream_id = type_and_send(page, "blocks please")
    live = page.locator(f"#answer-{stream_id}.streaming")
    live.locator(".blocks .code-block").wait_for()
    page.wait_for_function(f"() => document.getElementById('tail-{stream_id}').textContent === 'More te'")
    assert not reply.gate.is_set() and not page_upstream.last.answered.is_set()
    blocks = live.locator(".content.markdown.live .blocks")
    assert blocks.locator(".md-block").count() == 2
    assert blocks.locator(".md-block").nth(0).locator("p strong").inner_text() == "bold"
    assert blocks.locator(".code-bar .lang").inner_text() == "python"
    assert blocks.locator(".code-bar button.copy").inner_text() == "Copy"
    assert blocks.locator("pre code span").count() > 3, "the code is highlighted"
    assert blocks.locator("pre").inner_text() == "def f():\n    return 1\n"
    assert "**" not in live.locator(".content").inner_text() and "```" not in live.locator(".content").inner_text()
    page_upstream.release()
    bubble = finished_bubble(page, stream_id)
    assert page.locator(".msg.streaming").count() == 0
    assert bubble.locator(".content strong").inner_text() == "bold"
    assert bubble.locator(".code-block .lang").inner_text() == "python"
    assert bubble.locator(".content > p").last.inner_text() == "More te"


def test_no_visible_jump_when_the_answer_ends(open_page, page_upstream):
    """An answer ending in a plain paragraph: the same text, and the same height within 3 px, before and after done."""
    body = answer("## Plan\n\n", "First, a paragraph with **bold** words.\n\n", "The last paragraph is plain",
                  " text, and it streams in a few tokens.")
    page_upstream.serve(body, pause_at=body.index(FINISH))
    page = open_page().page
    stream_id = type_and_send(page, "no jump")
    page.wait_for_function(f"() => document.getElementById('tail-{stream_id}').textContent.endsWith('few tokens.')")
    page.wait_for_timeout(200)  # nothing more is coming before done: let the last events settle
    live = page.locator(f"#answer-{stream_id}.streaming .content")
    before_text, before_height = live.inner_text(), live.bounding_box()["height"]
    tail = page.locator(f"#tail-{stream_id}").inner_text()
    page_upstream.release()
    done = finished_bubble(page, stream_id).locator(".content")
    after_text, after_height = done.inner_text(), done.bounding_box()["height"]
    assert tail.strip() == "The last paragraph is plain text, and it streams in a few tokens.", \
        "only the unfinished last paragraph is plain text"
    assert words(before_text) == words(after_text)
    assert abs(before_height - after_height) <= 3, (before_height, after_height)


def test_math_renders_as_mathml_and_bad_tex_stays_visible(open_page, page_upstream):
    """$…$, $$…$$, \\(…\\), \\[…\\] become <math> (live and done); invalid TeX stays as code.math-error."""
    body = answer("Inline $x^2$ and \\(a+b\\).\n\n", "$$\\frac{1}{2}$$\n\n", "Display \\[c\\] here.\n\n",
                  "Broken $\\frac{1}{$ stays.\n\n", "tail")
    page_upstream.serve(body, pause_at=after_event(body, b'"tail"'))
    page = open_page().page
    stream_id = type_and_send(page, "math")
    live = page.locator(f"#answer-{stream_id}.streaming .blocks")
    live.locator("code.math-error").wait_for()
    assert live.locator("math").count() == 4
    page_upstream.release()
    bubble = finished_bubble(page, stream_id)
    content = bubble.locator(".content")
    assert content.locator("math").count() == 4
    assert content.locator("math[display=block]").count() == 2
    assert content.locator("math").nth(0).locator("msup").count() == 1
    assert content.locator("math mfrac").count() == 1
    assert content.locator("code.math-error").inner_text() == "\\frac{1}{"
    assert content.locator("code.math-error").is_visible()
    assert "$" not in content.inner_text().replace("\\frac{1}{", "")


def test_without_javascript_a_message_streams_as_html(browser, live_chat, page_upstream, watches):
    """No JavaScript: a real form posts, 303 to /c/ID, the page streams the answer and ends with the done bubble."""
    prompt = "zebra-quokka-7781 tell me"
    body = answer("Plain **answer** ", "streams", " here.")
    page_upstream.serve(body, pause_at=after_event(body, b'"streams"'))
    watch, ctx = no_js_page(browser, live_chat, watches)
    try:
        page = watch.page
        composer = page.locator("form#composer")
        assert (composer.get_attribute("method"), composer.get_attribute("action")) == ("post", "/streaming")
        send_without_js(page, prompt)
        page.locator(".msg.plain .tokens").filter(has_text="streams").wait_for()
        assert page.locator(".msg.assistant.done").count() == 0
        page_upstream.release()
        done = page.locator(".msg.assistant.done")
        done.wait_for(state="visible")
        page.wait_for_load_state("load")
        assert done.locator(".content strong").inner_text() == "answer"
        assert words(done.locator(".content").inner_text()) == "Plain answer streams here."
        assert page.locator(".msg.plain").is_hidden(), "the live copy gives way to the finished bubble"
        assert page.locator(".msg.user .bubble").all_inner_texts() == [prompt]
        assert page.locator("#conversation-list a").all_inner_texts() == [prompt]
        assert not [url for _, url in watch.requests if "zebra" in url or "quokka" in url]
        # The composer came with the page while the answer streamed; once it is done, Send is back.
        assert page.locator("#send").is_visible(), "after the answer, Send is there for the next message"
        assert page.locator("#stop-answer").is_hidden()
    finally:
        ctx.close()


def test_without_javascript_stop_is_a_form(browser, live_chat, page_upstream, watches):
    """No JavaScript: Stop during a paused answer is a form; the page comes back showing the partial answer, Stopped."""
    body = answer("Half", " an", " answer", " never", " sent")
    page_upstream.serve(body, hang_at=after_event(body, b'" answer"'))
    watch, ctx = no_js_page(browser, live_chat, watches)
    try:
        page = watch.page
        send_without_js(page, "stop me without scripts")
        page.locator(".msg.plain .tokens").filter(has_text="Half an answer").wait_for()
        stop = page.locator(".msg.plain form.actions")
        assert stop.get_attribute("method") == "post"
        with page.expect_response(lambda r: r.request.method == "POST" and "/stop?" in r.url) as stopped:
            stop.get_by_role("button", name="Stop generating").click(no_wait_after=True)
        assert stopped.value.status == 303
        done = page.locator(".msg.assistant.done")
        done.wait_for(state="visible")
        wait_until(page_upstream.last.client_closed.is_set, timeout=2, what="the upstream to see the stop")
        assert done.locator(".note").inner_text() == "Stopped."
        assert done.locator(".content").inner_text() == "Half an answer"
        assert page.locator(".msg.assistant:visible").count() == 1
    finally:
        ctx.close()


def test_without_javascript_regenerate_is_a_form(browser, live_chat, page_upstream, watches):
    """No JavaScript: Regenerate is a form; the page it lands on streams the new answer and ends with it."""
    page_upstream.serve(answer("First answer."))
    watch, ctx = no_js_page(browser, live_chat, watches)
    try:
        page = watch.page
        send_without_js(page, "answer twice")
        page.locator(".msg.assistant.done").wait_for()
        page.wait_for_load_state("load")
        conversation_url = page.url
        body = answer("Second", " answer.")
        page_upstream.serve(body, pause_at=after_event(body, b'"Second"'))
        regenerate = page.locator(".msg.assistant.done form").filter(has=page.locator("button.regenerate"))
        assert (regenerate.get_attribute("method"), regenerate.get_attribute("action")) == (
            "post", conversation_url.removeprefix(live_chat.url) + "/regenerate")
        with page.expect_response(lambda r: r.request.method == "POST" and r.url.endswith("/regenerate")) as posted:
            regenerate.locator("button").click(no_wait_after=True)
        assert posted.value.status == 303
        page.wait_for_url(conversation_url, wait_until="commit")
        page.locator(".msg.plain .tokens:has-text('Second'), .msg.assistant.done").first.wait_for()
        assert page.locator(".msg.plain .tokens").filter(has_text="Second").count() == 1, \
            "the new answer streams: " + page.locator(".msg.assistant").first.evaluate("e => e.outerHTML")
        page_upstream.release()
        page.locator(".msg.assistant.done .content").filter(has_text="Second answer.").wait_for()
        assert page.locator(".msg.assistant:visible .content").all_inner_texts() == ["Second answer."]
    finally:
        ctx.close()


def test_without_javascript_rename_and_delete_are_forms(browser, live_chat, page_upstream, watches):
    """No JavaScript: Rename is a <details> with a prefilled form; Delete links to a page that asks, with a form."""
    watch, ctx = no_js_page(browser, live_chat, watches)
    try:
        page = watch.page
        page_upstream.serve(answer("Kept."))
        send_without_js(page, "plain controls")
        page.locator(".msg.assistant.done").wait_for()
        page.wait_for_load_state("load")
        conversation_url = page.url
        page.locator("details.rename summary").click()
        box = page.locator("details.rename input[name=title]")
        assert box.is_visible() and box.input_value() == "plain controls"
        form = page.locator("details.rename form")
        assert (form.get_attribute("method"), form.get_attribute("action")) == (
            "post", conversation_url.removeprefix(live_chat.url) + "/rename")
        box.fill("Renamed without scripts")
        page.locator("details.rename button[type=submit]").click()
        page.wait_for_url(conversation_url)
        assert page.locator("#conversation-title").inner_text() == "Renamed without scripts"
        assert page.locator("#conversation-list a").all_inner_texts() == ["Renamed without scripts"]
        assert page.title() == "Renamed without scripts — chat.py"
        # A newer conversation, so that deleting this one leaves the newest message ids in use.
        page.get_by_role("link", name="New chat").click()
        page.wait_for_url(live_chat.url + "/")
        send_without_js(page, "a newer one")
        page.locator(".msg.assistant.done").wait_for()
        page.get_by_role("link", name="Renamed without scripts").click()
        page.wait_for_url(conversation_url)
        # Delete: a link to a page that asks first, then a form.
        page.get_by_role("link", name="Delete conversation").click()
        page.wait_for_url(conversation_url + "/delete")
        assert "Renamed without scripts" in page.locator("h2").inner_text()
        confirm = page.locator("form").filter(has=page.get_by_role("button", name="Delete it"))
        assert (confirm.get_attribute("method"), confirm.get_attribute("action")) == (
            "post", conversation_url.removeprefix(live_chat.url) + "/delete")
        confirm.get_by_role("button", name="Delete it").click()
        page.wait_for_url(live_chat.url + "/")
        assert page.locator("#conversation-list a").all_inner_texts() == ["a newer one"]
        watch.allowed_errors.append("status of 404")  # Chromium logs the 404 it was asked to show
        assert page.goto(conversation_url).status == 404
    finally:
        ctx.close()


def test_reload_after_regenerate_shows_the_new_answer_streaming(open_page, page_upstream):
    """Regenerate, then reload while the new answer streams: the page shows it live, not an empty finished bubble."""
    page_upstream.serve(answer("First."))
    page = open_page().page
    first = finished_bubble(page, type_and_send(page, "regenerate then reload"))
    body = answer("Second", " try.")
    page_upstream.serve(body, pause_at=after_event(body, b'"Second"'))
    first.get_by_role("button", name="Regenerate this answer").click()
    page.locator(".msg.assistant.streaming .tokens").filter(has_text="Second").wait_for()
    page.reload()
    page.locator(".msg.assistant").wait_for()
    assert page.locator(".msg.assistant.streaming .tokens").filter(has_text="Second").count() == 1, \
        page.locator(".msg.assistant").evaluate("e => e.outerHTML")
    page_upstream.release()
    page.locator(".msg.assistant.done .content").filter(has_text="Second try.").wait_for()
    assert page.locator(".msg.assistant").count() == 1


def test_reload_after_a_deletion_shows_the_new_answer_streaming(open_page, page_upstream, live_chat):
    """Delete the newest conversation, start another, reload mid-answer: the new answer is live, not an empty bubble."""
    page_upstream.serve(answer("Soon gone."))
    page = open_page().page
    finished_bubble(page, type_and_send(page, "delete me"))
    page.goto(page.url + "/delete")
    page.get_by_role("button", name="Delete it").click()
    page.wait_for_url(live_chat.url + "/")
    body = answer("Fresh", " start.")
    page_upstream.serve(body, pause_at=after_event(body, b'"Fresh"'))
    type_and_send(page, "a new one")
    page.locator(".msg.assistant.streaming .tokens").filter(has_text="Fresh").wait_for()
    page.reload()
    page.locator(".msg.assistant").wait_for()
    assert page.locator(".msg.assistant.streaming .tokens").filter(has_text="Fresh").count() == 1, \
        page.locator(".msg.assistant").evaluate("e => e.outerHTML")
    page_upstream.release()
    page.locator(".msg.assistant.done .content").filter(has_text="Fresh start.").wait_for()


def test_back_after_leaving_a_streaming_answer_shows_it_once(open_page, page_upstream, live_chat):
    """Leave a streaming answer for New chat, come Back: one bubble, its text once, and once again when done."""
    parts = [f" b{n}" for n in range(12)]
    body = answer(*parts)
    page_upstream.serve(body, pause_at=after_event(body, b'" b5"'))
    page = open_page().page
    type_and_send(page, "go back")
    page.wait_for_function("() => document.querySelector('.tokens').textContent.endsWith(' b5')")
    conversation_url = page.url
    page.get_by_role("link", name="New chat").click()
    page.wait_for_url(live_chat.url + "/")
    page.locator(".msg").first.wait_for(state="detached")
    page.go_back()
    page.wait_for_url(conversation_url)
    page.wait_for_function("() => [...document.querySelectorAll('.tokens')].some(t => t.textContent.endsWith(' b5'))")
    page.wait_for_timeout(300)  # an observation window for a second copy arriving
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.user").count() == 1
    assert page.locator(".msg.assistant .tokens").text_content() == "".join(parts[:6])
    page_upstream.release()
    page.locator(".msg.assistant.done").wait_for()
    page.wait_for_timeout(300)  # and for a late duplicate
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.assistant .content").inner_text() == "".join(parts).strip()


def test_opening_a_long_conversation_lands_at_its_newest_message(open_page, page_upstream, live_chat):
    """A conversation taller than the window opens at its end: from its address and from the (boosted) sidebar."""
    page = open_page().page
    page_upstream.serve(answer(*(f"Paragraph {n:02d} of a long answer.\n\n" for n in range(60))))
    finished_bubble(page, type_and_send(page, "a long one"))
    page.reload()
    page.locator(".msg.assistant.done").wait_for()
    assert page.evaluate("document.scrollingElement.scrollHeight") > 2000
    page.wait_for_function(AT_BOTTOM)
    page.get_by_role("link", name="New chat").click()
    page.wait_for_url(live_chat.url + "/")
    page.locator(".msg").first.wait_for(state="detached")
    page.get_by_role("link", name="a long one").click()
    page.locator(".msg.assistant.done").wait_for()
    page.wait_for_timeout(300)  # an observation window: scrolling settles after the swap
    assert page.evaluate(AT_BOTTOM), "scrollTop, scrollHeight: " + str(page.evaluate(
        "[document.scrollingElement.scrollTop, document.scrollingElement.scrollHeight]"))


@pytest.mark.parametrize("lang", ["python", "sh"])
def test_copy_button_never_covers_the_code(open_page, page_upstream, lang):
    """The code bar shows the fence's language and its Copy button does not overlap the code, even for one line."""
    page_upstream.serve(answer(f"```{lang}\n", "x = 1\n", "```\n"))
    page = open_page().page
    bubble = finished_bubble(page, type_and_send(page, "one line of code"))
    assert bubble.locator(".code-bar .lang").inner_text() == lang
    copy, pre = bubble.locator(".code-bar .copy").bounding_box(), bubble.locator(".code-block pre").bounding_box()
    overlap_x = min(copy["x"] + copy["width"], pre["x"] + pre["width"]) - max(copy["x"], pre["x"])
    overlap_y = min(copy["y"] + copy["height"], pre["y"] + pre["height"]) - max(copy["y"], pre["y"])
    assert overlap_x <= 0 or overlap_y <= 0, (copy, pre)
    code = bubble.locator(".code-block pre code").bounding_box()
    assert code["y"] >= copy["y"] + copy["height"], "the code begins below the bar"


def test_regenerate_focuses_stop_and_then_the_message_box(open_page, page_upstream):
    """After Regenerate the new Stop button has the focus; when the answer ends #prompt has it; #status says so."""
    page_upstream.serve(answer("First."))
    page = open_page().page
    first = finished_bubble(page, type_and_send(page, "again please"))
    page.wait_for_function("() => document.getElementById('status').textContent === 'Answer complete'")
    body = answer("Second", " try.")
    page_upstream.serve(body, pause_at=after_event(body, b'"Second"'))
    first.get_by_role("button", name="Regenerate this answer").click()
    page.locator(".msg.assistant.streaming").wait_for()  # focus moves as it is swapped in, in the same task
    assert page.evaluate("() => document.activeElement.matches('.msg.assistant.streaming button.stop')"), \
        "the focus is on " + page.evaluate("() => document.activeElement.outerHTML.slice(0, 80)")
    page_upstream.release()
    page.locator(".msg.assistant.done .content").filter(has_text="Second try.").wait_for()
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'prompt'")
    page.wait_for_function("() => document.getElementById('status').textContent === 'Answer complete'")
    assert page.locator(".msg.assistant").count() == 1


def test_skip_link_and_message_roles(open_page, page_upstream):
    """The first Tab from the top reaches the skip link, which focuses #prompt; messages are articles You / Answer."""
    page_upstream.serve(answer("Roles."))
    page = open_page().page
    finished_bubble(page, type_and_send(page, "who is who"))
    # The top of the page: focus on the document itself (the message box has autofocus).
    page.evaluate("""() => { document.activeElement.blur(); document.body.tabIndex = -1; document.body.focus();
                             document.body.removeAttribute('tabindex'); }""")
    page.keyboard.press("Tab")
    skip = page.locator(".skip-link")
    assert page.evaluate("() => document.activeElement.className") == "skip-link"
    assert skip.inner_text() == "Skip to the message box"
    assert skip.is_visible() and skip.bounding_box()["y"] >= 0
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.activeElement && document.activeElement.id === 'prompt'")
    assert page.get_by_role("article", name="You").locator(".bubble").inner_text() == "who is who"
    assert page.get_by_role("article", name="Answer").locator(".content").inner_text() == "Roles."


def test_on_a_phone_enter_is_a_newline_and_the_box_grows(browser, open_page, page_upstream):
    """Touch screen: Enter is a newline and sends nothing, Send sends; the box grows with its text up to 40 %."""
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
    try:
        watch = open_page(ctx=ctx)
        page = watch.page
        assert page.evaluate("() => matchMedia('(pointer: coarse)').matches")
        box = page.locator("#prompt")
        empty = box.bounding_box()["height"]
        box.fill("line 1")
        page.press("#prompt", "Enter")
        page.keyboard.type("line 2")
        page.wait_for_timeout(300)  # an observation window: nothing may be sent
        assert box.input_value() == "line 1\nline 2"
        assert watch.posts("/streaming") == 0
        box.fill("\n".join(f"line {n}" for n in range(1, 9)))
        eight = box.bounding_box()["height"]
        assert eight > empty + 50, (empty, eight)
        box.fill("\n".join(f"line {n}" for n in range(1, 51)))
        fifty = box.bounding_box()["height"]
        assert eight < fifty <= 0.4 * 844 + 1, (eight, fifty)
        page_upstream.serve(answer("Sent by tapping."))
        box.fill("tap to send")
        page.locator("#send").tap()
        bubble = page.locator(".msg.assistant.done")
        bubble.wait_for()
        assert bubble.locator(".content").inner_text() == "Sent by tapping."
        assert watch.posts("/streaming") == 1
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    finally:
        ctx.close()


def test_drafts_survive_navigation(open_page, page_upstream, live_chat):
    """An unsent draft stays with its conversation, and the new chat's with the new chat, across sidebar navigation."""
    page_upstream.serve(answer("Noted."))
    page = open_page().page
    finished_bubble(page, type_and_send(page, "conversation A"))
    a_url = page.url
    page.fill("#prompt", "draft for A")
    page.get_by_role("link", name="New chat").click()
    page.wait_for_url(live_chat.url + "/")
    page.locator(".msg").first.wait_for(state="detached")
    assert page.input_value("#prompt") == ""
    page.fill("#prompt", "draft for the new chat")
    page.get_by_role("link", name="conversation A").click()
    page.wait_for_url(a_url)
    page.wait_for_function("() => document.getElementById('prompt').value === 'draft for A'")
    page.get_by_role("link", name="New chat").click()
    page.wait_for_url(live_chat.url + "/")
    page.wait_for_function("() => document.getElementById('prompt').value === 'draft for the new chat'")


def test_title_from_the_first_message_and_rename(open_page, page_upstream):
    """The tab title is the first message without Markdown, cut at a word with …; Rename updates it everywhere."""
    prompt = ("**Plan** a _trip_ to Lisbon and then walk along the river to Belém, eat pastéis de nata, "
              "and watch the sunset from a miradouro")
    plain = "Plan a trip to Lisbon and then walk along the river to Belém, eat pastéis de nata, " \
            "and watch the sunset from a miradouro"
    page_upstream.serve(answer("Lovely."))
    page = open_page().page
    assert page.title() == "chat.py"
    stream_id = type_and_send(page, prompt)
    page.wait_for_function("() => document.title !== 'chat.py'")
    title = page.title().removesuffix(" — chat.py")
    assert page.title() == f"{title} — chat.py"
    assert title.endswith("…") and not re.search(r"[*_`#]", title), title
    shown = title.removesuffix("…")
    assert plain.startswith(shown) and plain[len(shown)] in " ,", f"{title!r} is not cut at a word"
    assert 20 < len(shown) < len(plain), title
    finished_bubble(page, stream_id)
    assert page.locator("#conversation-title").inner_text() == title
    conversation_id = page.input_value("#conversation")
    assert page.locator(f"#conv-{conversation_id}").inner_text() == title
    # Rename through the prefilled form.
    page.get_by_label("Rename conversation").click()
    box = page.locator("details.rename input[name=title]")
    assert box.input_value() == title
    box.fill("Lisbon in a day")
    box.press("Enter")
    page.wait_for_function("() => document.title === 'Lisbon in a day — chat.py'")
    assert page.locator("#conversation-title").inner_text() == "Lisbon in a day"
    assert page.locator(f"#conv-{conversation_id}").inner_text() == "Lisbon in a day"
    assert page.locator("#conversation-list a").count() == 1
    page.reload()
    assert page.title() == "Lisbon in a day — chat.py"


def test_links_open_safely_and_remote_images_are_links(open_page, page_upstream):
    """Links open in a new tab, noopener noreferrer; a bare URL is a link; a remote image is a link, never fetched."""
    body = answer("See [the docs](https://example.com/docs) or https://example.com/x.\n\n",
                  "![a cat](https://images.example.org/cat.png)\n\n", "tail")
    page_upstream.serve(body, pause_at=after_event(body, b'"tail"'))
    watch = open_page()
    page = watch.page
    stream_id = type_and_send(page, "links")
    live = page.locator(f"#answer-{stream_id} .blocks")
    live.locator("a.image-link").wait_for()
    assert live.locator("img").count() == 0
    page_upstream.release()
    content = finished_bubble(page, stream_id).locator(".content")
    for href in ("https://example.com/docs", "https://example.com/x"):
        link = content.locator(f'a[href="{href}"]')
        assert link.get_attribute("target") == "_blank"
        assert {"noopener", "noreferrer"} <= set(link.get_attribute("rel").split())
    assert content.locator('a[href="https://example.com/x"]').inner_text() == "https://example.com/x"
    image = content.locator("a.image-link")
    assert image.get_attribute("href") == "https://images.example.org/cat.png"
    assert "a cat" in image.inner_text()
    assert {"noopener", "noreferrer"} <= set(image.get_attribute("rel").split())
    assert content.locator("img").count() == 0
    page.wait_for_timeout(300)  # an observation window for a stray image request
    assert not [url for _, url in watch.requests if "images.example.org" in url or "example.com" in url]


def test_unknown_conversation_is_a_404_page_with_a_link_home(open_page, live_chat):
    """/c/doesnotexist in the browser: status 404, an HTML page that says so and links home."""
    watch = open_page()
    watch.allowed_errors.append("status of 404")  # Chromium logs the 404 it was asked to show
    page = watch.page
    response = page.goto(live_chat.url + "/c/doesnotexist")
    assert response.status == 404
    assert response.headers["content-type"].startswith("text/html")
    assert page.locator("h2").inner_text() == "Not found"
    page.locator('main a[href="/"]').last.click()
    page.wait_for_url(live_chat.url + "/")
    assert page.locator("#prompt").is_visible()


# ---------------------------------------------------------------------------
# Found in review: inputs that would have held the hub, or led elsewhere
# ---------------------------------------------------------------------------

def indented_words(count):
    """Feed a paragraph, a blank line, then one indented line token by token (the partial line once re-joined each time)."""
    blocks = chat.MarkdownBlocks()
    blocks.feed("a\n\n    ")
    for _ in range(count):
        blocks.feed("word")


@pytest.mark.parametrize("work", [
    pytest.param(lambda: chat.make_title("[" * 32_000), id="title of a prompt of 32,000 ["),
    pytest.param(lambda: [b for b in [chat.MarkdownBlocks()] for _ in [b.feed("# h\n" + "\n" * 30_000)]], id="30,000 blank lines"),
    pytest.param(lambda: indented_words(40_000), id="an indented line of 40,000 tokens"),
    pytest.param(lambda: [t.feed(" ") for t in [chat.ThinkSplitter()] for _ in range(40_000)], id="40,000 spaces first"),
    pytest.param(lambda: chat.body_message(b"<" * 65_536), id="an error page of 64 KiB of <"),
    pytest.param(lambda: chat.body_message(b"<title>" * 9_000), id="9,000 <title>"),
])
def test_hostile_input_takes_linear_time(work):
    """Each of these once took seconds to minutes of the hub's time (quadratic); now well under one."""
    started = time.process_time()
    work()
    assert time.process_time() - started < 1.0


def test_deeply_nested_tex_stays_code_and_the_answer_finishes(client, upstream):
    """400 nested braces: the formula is shown as code, the answer ends with its bubble, the page still renders."""
    upstream.serve(answer("Before\n\n$$" + "{" * 400 + "x" + "}" * 400 + "$$\n"))
    stream_id, conversation = send_in(client, "nest")
    done = read_events(client, stream_id).done
    assert "math-error" in done and "Before" in done
    assert "math-error" in client.get(f"/c/{conversation}").text


@pytest.mark.parametrize("target", ["/%09/evil.com", "/\t/evil.com", "/\\evil.com", "//evil.com", "/%0a/evil.com",
                                    "/%00/", "https://evil.com/", "/\x7f/x"])
def test_login_never_sends_you_off_site(client, monkeypatch, target):
    """The page a login returns to is always on this site; a crafted `next` lands on the start page."""
    monkeypatch.setattr(chat.settings, "password", "pw")
    response = plain_app().post("/login", {"password": "pw", "next": urllib.parse.unquote(target)}, status=302)
    assert urllib.parse.urlsplit(response.headers["Location"]).path == "/"
    assert urllib.parse.urlsplit(response.headers["Location"]).netloc == "localhost:80"


def test_login_returns_to_the_conversation_that_asked(client, monkeypatch):
    """A local page survives the round trip through the login form."""
    monkeypatch.setattr(chat.settings, "password", "pw")
    response = plain_app().post("/login", {"password": "pw", "next": "/c/abc?at=3"}, status=302)
    assert response.headers["Location"].endswith("/c/abc?at=3")


def test_search_is_rate_limited_and_short_words_are_not_prefixes(client, upstream):
    """A burst of searches from one browser gets 429; a one-letter word matches only itself."""
    upstream.serve(answer("a apple"))
    read_events(client, send_in(client, "fruit")[0])
    assert elements(client.get("/search", {"q": "a"}).text, "a") != []  # the word "a" itself
    assert elements(client.get("/search", {"q": "ap"}).text, "a") == []  # not every word starting with "ap"
    statuses = [client.get("/search", {"q": "apple"}, expect_errors=True).status_int for _ in range(20)]
    assert 429 in statuses and statuses[:8] == [200] * 8


def test_an_endless_upstream_line_is_cut_off(client, upstream):
    """A line over 1 MiB without an end: the answer ends with a clear alert instead of growing forever."""
    upstream.serve(b"data: " + b"x" * (2 << 20), transfer="close")
    (alert,) = alerts(relay(client).done)
    assert "longer than 1 MiB" in alert


def test_control_characters_are_dropped_from_prompts_and_answers(client, upstream):
    """C0 controls are invisible and would collide with the search's markers: they are not stored."""
    upstream.serve(answer("zebra\x01 crossing\x02"))
    stream_id, _ = send_in(client, "zebra\x01\x02 question\x7f")
    assert read_events(client, stream_id).message == "zebra crossing"
    assert db_rows("SELECT content FROM messages ORDER BY id") == [("zebra question",), ("zebra crossing",)]


def test_a_browser_that_logged_in_before_gets_in_while_others_guess(client, monkeypatch):
    """Guesses from rotating addresses use up the shared budget: a new browser, loopback included, gets 429 with
    Retry-After; a browser with the device cookie of an earlier login still gets in; a tampered one does not."""
    monkeypatch.setattr(chat.settings, "password", "pw")
    known = plain_app()
    known.post("/login", {"password": "pw"}, status=302)
    device = known.cookies[chat.DEVICE_COOKIE]
    known.post("/logout", status=302)
    for n in range(30):
        client.post("/login", {"password": "x"}, headers={"X-Forwarded-For": f"198.51.100.{n}"}, expect_errors=True)
    refused = plain_app().post("/login", {"password": "pw"}, headers={"X-Forwarded-For": "203.0.113.1"}, status=429)
    assert int(refused.headers["Retry-After"]) >= 1 and "Wait" in refused.text
    plain_app().post("/login", {"password": "pw"}, status=429)  # loopback is an address like any other
    tampered = plain_app()
    tampered.set_cookie(chat.DEVICE_COOKIE, device[:-1] + ("A" if device[-1] != "A" else "B"))
    tampered.post("/login", {"password": "pw"}, status=429)
    known.post("/login", {"password": "pw"}, status=302)
    assert known.cookies[chat.DEVICE_COOKIE] == device  # the same device, kept


def test_fresh_cookies_from_page_loads_count_as_new_owners(server, upstream, monkeypatch):
    """GET / then send, again and again from one address: a new cookie each time is still a new owner."""
    upstream.serve(answer("ok"))
    statuses = []
    for n in range(8):
        browser_ = requests.Session()
        browser_.trust_env = False
        browser_.get(f"{server}/", headers=FROM_AFAR, timeout=5)
        statuses.append(browser_.post(f"{server}/streaming", data={"prompt": f"hi {n}"},
                                      headers={**FROM_AFAR, **HX}, timeout=5).status_code)
    assert statuses[:3] == [200] * 3 and statuses.count(429) == 5


def test_a_failed_final_save_is_tried_again(server, upstream, open_sse, monkeypatch):
    """The disk is full when an answer ends: once there is room again, the janitor stores it whole."""
    monkeypatch.setattr(chat.settings, "ping_interval", 0.05)
    long_rest = " " + "y" * 20_000  # needs new pages, which the full disk refuses
    body = answer("Kept", long_rest)
    upstream.serve(body, pause_at=after_event(body, b'"Kept"'))
    stream_id = post_prompt(server)
    reader = open_sse(stream_id)
    reader.read_until(lambda t: t.message == "Kept")
    pages = chat.store.db.execute("PRAGMA page_count").fetchone()[0]
    chat.store.db.execute(f"PRAGMA max_page_count = {pages}")
    upstream.release()
    assert any("disk is full" in n for n in notes(reader.read_until(lambda t: t.finished).done))
    chat.store.db.execute("PRAGMA max_page_count = 1073741823")
    wait_until(lambda: db_rows("SELECT content, status FROM messages WHERE role = 'assistant'") ==
               [("Kept" + long_rest, "done")], timeout=5, what="the second try")
    assert chat.streams.unsaved == {}


def test_header_and_sidebar_stay_while_a_long_chat_scrolls(open_page, page_upstream):
    """The header stays at the top and the sidebar keeps its place, scrolling on its own, beside a long chat."""
    page = open_page().page
    page.set_viewport_size({"width": 1100, "height": 600})
    page_upstream.serve(answer(*[f"Line {n}.\n\n" for n in range(60)]))
    finished_bubble(page, type_and_send(page, "long"))
    page.evaluate("window.scrollTo(0, document.scrollingElement.scrollHeight)")
    page.wait_for_function("() => document.scrollingElement.scrollTop > 500")
    assert page.locator("header.top").bounding_box()["y"] == 0
    sidebar = page.locator("nav.sidebar")
    assert sidebar.bounding_box()["y"] < 100  # still in view, under the header
    assert page.evaluate("getComputedStyle(document.querySelector('nav.sidebar')).overflowY") == "auto"


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


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """The suite's redis-server; skipped without redis-server or redis-py, failing under CI."""
    if importlib.util.find_spec("redis") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-py is missing under CI (pip install -r requirements-scale.txt)")
        pytest.skip("no redis-py here (pip install -r requirements-scale.txt)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop(kill=True)


@pytest.fixture
def redis_url(redis_server):
    """The suite's Redis, emptied for this test."""
    if redis_server.process.poll() is not None:
        redis_server.start()
    assert redis_server.command(b"FLUSHALL") == b"+OK\r\n"
    return redis_server.url


@pytest.fixture
def cluster(tmp_path, upstream, redis_url, postgres_url):
    """cluster(n, **env): n `python chat.py` processes on their own ports, sharing Redis and a fresh PostgreSQL,
    all talking to the fake upstream."""
    import psycopg
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    started = []

    def start(count=3, **env):
        settings = dict(OPENAI_BASE_URL=upstream.url, CHAT_MODEL="test-model", CHAT_REDIS_URL=redis_url,
                        CHAT_DATABASE_URL=postgres_url, **env)
        for index in range(count):
            started.append(ChatProcess(tmp_path / f"chat-{len(started)}.log", **settings))
        return started[-count:]

    yield start
    for process in started:
        process.stop()
    for process in started:  # whatever a test checks, no process may have hit an error on the way
        assert "Traceback" not in process.log_path.read_text(), process.log_path.read_text()[-3000:]


def stream_of(response):
    """The stream id in a POST /streaming response."""
    assert response.status_code == 200, response.text
    return re.search(r'sse-connect="/events\?stream=([\w-]+)"', response.text).group(1)


COUNTED = [f" n{n}" for n in range(60)]


def test_an_answer_posted_on_one_process_is_read_on_a_second_and_resumed_on_a_third(cluster, upstream):
    """POST on A, read on B, cut B, resume on C with Last-Event-ID: every token exactly once, in order."""
    a, b, c = cluster(3)
    body = answer(*COUNTED)
    reply = upstream.serve(body, pause_at=after_event(body, b'" n29"'))
    stream_id = stream_of(web.post(a.url + "/streaming", data={"prompt": "count"}, timeout=5))
    first = SSEReader(b.url, stream_id)
    seen = first.read_until(lambda t: t.message.endswith(" n29"), what="the first half on B")
    first.close()
    # Resumed while the answer still streams (a reader of a finished answer gets its done bubble alone).
    second = SSEReader(c.url, stream_id, last_event_id=seen.ids[-1])
    reply.gate.set()
    rest = second.read_until(lambda t: t.finished, what="the rest on C")
    second.close()
    assert seen.ids + rest.ids == list(range(1, len(seen.ids) + len(rest.ids) + 1))
    assert seen.message + rest.message == "".join(COUNTED)
    assert source_text(rest.done).strip() == "".join(COUNTED).strip()


def test_stop_sent_to_any_process_closes_the_writers_upstream(cluster, upstream):
    """Stop on C: 204, A closes its upstream connection, and readers on B get the Stopped bubble with the text."""
    a, b, c = cluster(3)
    body = answer("Partial", " answer", " then", " more")
    upstream.serve(body, hang_at=after_event(body, b'" answer"'))
    stream_id = stream_of(web.post(a.url + "/streaming", data={"prompt": "go"}, timeout=5))
    reader = SSEReader(b.url, stream_id)
    reader.read_until(lambda t: t.message == "Partial answer", what="the first tokens on B")
    response = web.post(c.url + "/stop", params={"stream": stream_id}, timeout=5)
    assert response.status_code == 204
    wait_until(upstream.last.client_closed.is_set, timeout=3, what="A to close its upstream connection")
    bubble = reader.read_until(lambda t: t.finished, what="done on B").done
    reader.close()
    assert source_text(bubble) == "Partial answer"
    assert "Stopped." in notes(bubble)
    # A stranger cannot stop it, wherever they ask.
    assert requests.post(c.url + "/stop", params={"stream": stream_id}, timeout=5).status_code == 404


def test_the_per_owner_limit_holds_across_processes(cluster, upstream):
    """Four answers at once per browser, wherever they land: the fifth gets 429 on every process; a second answer in
    the same conversation gets 409 on another process."""
    processes = cluster(3)
    body = answer("Slow", " answer")
    reply = upstream.serve(body, pause_at=after_event(body, b'"Slow"'))
    responses = [web.post(processes[i % 3].url + "/streaming", data={"prompt": f"q{i}"}, timeout=5) for i in range(4)]
    assert [r.status_code for r in responses] == [200] * 4
    for process in processes:
        refused = web.post(process.url + "/streaming", data={"prompt": "one more"}, timeout=5)
        assert refused.status_code == 429
        assert "4 answers streaming" in refused.text
    conversation = responses[0].headers["HX-Push-Url"].removeprefix("/c/")
    reply.gate.set()
    for response in responses:
        SSEReader(processes[2].url, stream_of(response)).read_until(lambda t: t.finished, what="done")
    # Finished answers give their places back at once, in every process.
    upstream.serve(body, pause_at=after_event(body, b'"Slow"'))
    busy = web.post(processes[0].url + "/streaming", data={"prompt": "again", "conversation": conversation}, timeout=5)
    assert busy.status_code == 200
    clash = web.post(processes[1].url + "/streaming", data={"prompt": "and again", "conversation": conversation},
                     timeout=5)
    assert clash.status_code == 409
    upstream.release()
    SSEReader(processes[2].url, stream_of(busy)).read_until(lambda t: t.finished, what="done")


def test_readers_connecting_at_once_are_counted_exactly_on_every_process(cluster, upstream):
    """Attack 5 with Redis: ten readers of one live answer connect together, on the writer and on another process:
    each process lets in exactly CHAT_READERS_PER_STREAM of them (check and registration are one step) and
    refuses the rest with 429."""
    a, b = cluster(2, CHAT_READERS_PER_STREAM="4")
    body = answer("Slow", " answer")
    reply = upstream.serve(body, pause_at=after_event(body, b'"Slow"'))
    stream_id = stream_of(web.post(a.url + "/streaming", data={"prompt": "go"}, timeout=5))
    opened = []
    for process in (a, b):
        head = (f"GET /events?stream={stream_id} HTTP/1.1\r\nHost: 127.0.0.1:{process.port}\r\n"
                f"Accept: text/event-stream\r\nCookie: {owner_cookie_header()}\r\n\r\n").encode()
        socks = [socket.create_connection(("127.0.0.1", process.port), timeout=5) for _ in range(10)]
        opened += socks
        for sock in socks:  # all ten requests are in before the first is read
            sock.sendall(head)
        heads = [sock.recv(12) for sock in socks]
        assert sorted(h[9:12] for h in heads) == [b"200"] * 4 + [b"429"] * 6, process.url
        admitted = [sock for sock, h in zip(socks, heads) if h[9:12] == b"200"]
    reply.gate.set()
    received = b""
    with gevent.Timeout(10, AssertionError("no done on an admitted reader")):
        while b"event: done" not in received:
            received += admitted[0].recv(65536)
    for sock in opened:
        sock.close()


def test_a_reader_of_a_finished_answer_gets_its_bubble_without_its_log_being_read(cluster, upstream):
    """With Redis, a reader (a reconnect, a reload) of a finished answer gets the done bubble alone, on every
    process: the bubble replaces every token in the page, and reading a long answer's log would cost each such
    reader a parse of every token."""
    a, b = cluster(2)
    pieces = [f" w{n}" for n in range(600)]
    upstream.serve(answer(*pieces))
    stream_id = stream_of(web.post(a.url + "/streaming", data={"prompt": "long"}, timeout=5))
    first = SSEReader(b.url, stream_id).read_until(lambda t: t.finished, what="the whole answer")
    assert first.message == "".join(pieces)
    for process in (a, b):
        for last_event_id in (None, first.ids[10]):
            late = SSEReader(process.url, stream_id, last_event_id=last_event_id).read_until(lambda t: t.finished)
            assert [e.event for e in late.events] == ["done"]
            assert source_text(late.done).strip() == "".join(pieces).strip()


def test_a_killed_writer_s_readers_elsewhere_get_an_interrupted_bubble_with_the_text(cluster, upstream):
    """kill -9 the process writing an answer: readers on B get an interrupted done bubble within the lease, and the
    stored answer keeps every token they saw."""
    a, b = cluster(2, CHAT_LEASE_SECONDS="2")
    body = answer("Half", " an", " answer", " and", " the", " rest")
    upstream.serve(body, hang_at=after_event(body, b'" answer"'))
    response = web.post(a.url + "/streaming", data={"prompt": "Tell me everything"}, timeout=5)
    stream_id, conversation = stream_of(response), response.headers["HX-Push-Url"]
    reader = SSEReader(b.url, stream_id)
    reader.read_until(lambda t: t.message == "Half an answer", what="the first tokens on B")
    a.process.kill()
    a.process.wait(timeout=5)
    killed = time.monotonic()
    transcript = reader.read_until(lambda t: t.finished, timeout=15, what="the interrupted bubble")
    assert time.monotonic() - killed < 2 * 2 + 3  # the lease, the janitor's pass, and some slack
    reader.close()
    assert transcript.ids == list(range(1, len(transcript.ids) + 1))
    assert source_text(transcript.done) == "Half an answer"
    assert any("server stopped" in n for n in notes(transcript.done))
    page = web.get(b.url + conversation, timeout=5).text
    (bubble,) = elements(page, "div", cls="interrupted")
    assert "Half an answer" in source_text(page)


def test_more_dead_answers_than_one_pass_finishes_are_all_finished(cluster, upstream):
    """kill -9 a process writing more answers than the janitor finishes in one pass (16): the readers on B of
    every one of them get an interrupted bubble with the text they saw, a pass or two later."""
    a, b = cluster(2, CHAT_LEASE_SECONDS="2", CHAT_STREAMS_PER_OWNER="40", CHAT_READERS_PER_OWNER="100")
    body = answer("Half", " an", " answer", " and", " the", " rest")
    upstream.serve(body, hang_at=after_event(body, b'" answer"'))
    ids = [stream_of(web.post(a.url + "/streaming", data={"prompt": f"Question {n}"}, timeout=5)) for n in range(20)]
    readers = [SSEReader(b.url, stream_id) for stream_id in ids]
    for reader in readers:
        reader.read_until(lambda t: t.message == "Half an answer", what="the first tokens on B")
    a.process.kill()
    a.process.wait(timeout=5)
    for reader in readers:
        transcript = reader.read_until(lambda t: t.finished, timeout=20, what="the interrupted bubble")
        reader.close()
        assert source_text(transcript.done) == "Half an answer"
        assert any("server stopped" in n for n in notes(transcript.done))


def test_a_process_started_again_after_the_lease_ran_out_still_finishes_the_answer(cluster, upstream, redis_url):
    """kill -9 the only process and start one again late (the lease long over): the dead answer's records are
    still in Redis, so its reader gets the interrupted bubble with the text it saw, not a missing answer."""
    import redis
    (a,) = cluster(1, CHAT_LEASE_SECONDS="1")
    body = answer("Half", " an", " answer", " and", " the", " rest")
    upstream.serve(body, hang_at=after_event(body, b'" answer"'))
    stream_id = stream_of(web.post(a.url + "/streaming", data={"prompt": "Tell me everything"}, timeout=5))
    SSEReader(a.url, stream_id).read_until(lambda t: t.message == "Half an answer", what="the first tokens")
    a.process.kill()
    a.process.wait(timeout=5)
    alive = float(redis.Redis.from_url(redis_url).hget(f"chat:{stream_id}:job", "alive"))
    wait_until(lambda: time.time() > alive + 1.5, timeout=10, what="a restart slower than twice the lease")
    (b,) = cluster(1, CHAT_LEASE_SECONDS="1")
    reader = SSEReader(b.url, stream_id)
    transcript = reader.read_until(lambda t: t.finished, timeout=15, what="the interrupted bubble")
    reader.close()
    assert source_text(transcript.done) == "Half an answer"
    assert any("server stopped" in n for n in notes(transcript.done))


def test_an_answer_outlives_its_lease_while_its_writer_lives(cluster, upstream, postgres_url):
    """An answer that takes many leases' time is renewed by its writer: nobody takes it for dead, and Stop still
    reaches it through the flag the writer's janitor reads."""
    a, b = cluster(2, CHAT_LEASE_SECONDS="1")
    body = answer("Slow", " but", " alive")
    reply = upstream.serve(body, pause_at=after_event(body, b'"Slow"'))
    stream_id = stream_of(web.post(a.url + "/streaming", data={"prompt": "take your time"}, timeout=5))
    reader = SSEReader(b.url, stream_id)
    reader.read_until(lambda t: t.message == "Slow", what="the first token on B")
    gevent.sleep(4)  # the time under test: four leases, while B's janitor looks for dead writers every second
    reply.gate.set()
    transcript = reader.read_until(lambda t: t.finished, what="done")
    assert transcript.message == "Slow but alive"
    assert "interrupted" not in transcript.done and "server stopped" not in transcript.done
    import psycopg
    with psycopg.connect(postgres_url) as connection:
        assert connection.execute("SELECT status FROM messages WHERE role = 'assistant'").fetchall() == [("done",)]


def test_readers_recover_from_a_redis_restart_without_loss_or_repeat(cluster, upstream, redis_server, postgres_url):
    """Redis restarts empty mid-answer: the writer writes the log again, readers fill the gap; nothing lost, nothing
    repeated."""
    a, b = cluster(2)
    body = answer(*COUNTED)
    reply = upstream.serve(body, pause_at=after_event(body, b'" n19"'))
    stream_id = stream_of(web.post(a.url + "/streaming", data={"prompt": "count"}, timeout=5))
    near, far = SSEReader(a.url, stream_id), SSEReader(b.url, stream_id)
    for reader in (near, far):
        reader.read_until(lambda t: t.message.endswith(" n19"), what="the first part")
    redis_server.stop(kill=True)
    redis_server.start()
    reply.gate.set()
    for reader in (near, far):
        transcript = reader.read_until(lambda t: t.finished, timeout=20, what="the rest after the restart")
        reader.close()
        assert transcript.ids == list(range(1, len(transcript.ids) + 1))
        assert transcript.message == "".join(COUNTED)
        assert source_text(transcript.done).strip() == "".join(COUNTED).strip()
    # The log was written again whole, in order; a reader that comes now gets the finished bubble alone.
    log = redis_server.command(b"XRANGE", f"chat:{stream_id}:log".encode(), b"-", b"+")
    positions = [log.find(b"\r\n%s\r\n" % piece.encode()) for piece in COUNTED]
    assert -1 not in positions and positions == sorted(positions)
    late = SSEReader(b.url, stream_id).read_until(lambda t: t.finished)
    assert late.message == "" and source_text(late.done).strip() == "".join(COUNTED).strip()
    import psycopg
    with psycopg.connect(postgres_url) as connection:
        stored = connection.execute("SELECT status, content FROM messages WHERE role = 'assistant'").fetchall()
    assert stored == [("done", "".join(COUNTED))]


def worker_pids(log_text, line):
    """The worker process ids that logged a line containing `line` (workers log as chat...[pid])."""
    return {int(pid) for pid in re.findall(r"chat[.\w]*\[(\d+)\]: .*" + re.escape(line), log_text)}


def test_workers_share_one_port_and_a_dead_one_is_replaced(tmp_path, redis_url):
    """--workers 2: both workers serve the one port (the kernel spreads connections), answers of the demo model
    complete wherever their requests land, a worker killed with SIGKILL is started again, and SIGTERM ends all."""
    app = ChatProcess(tmp_path / "chat.log", "--workers", "2", CHAT_REDIS_URL=redis_url, CHAT_DEMO_DELAY="0.001")
    try:
        wait_until(lambda: len(worker_pids(app.log_path.read_text(), "chat.py on http")) == 2, timeout=15,
                   what="two workers to start")
        for _ in range(40):  # a new connection each time
            assert requests.get(app.url + "/healthz", timeout=5).status_code == 200
        log_text = app.log_path.read_text()
        assert len(worker_pids(log_text, "GET /healthz")) == 2, "one worker took every connection"
        session = requests.Session()
        session.trust_env = False
        for n in range(6):
            stream_id = stream_of(session.post(app.url + "/streaming", data={"prompt": f"hello {n}"},
                                               headers={**HX, "Connection": "close"}, timeout=5))
            done = requests.get(app.url + "/events", params={"stream": stream_id}, cookies=session.cookies,
                                timeout=10)
            assert "demo model" in source_text(Transcript(done.content).done)
        victim = min(worker_pids(log_text, "chat.py on http"))
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: len(worker_pids(app.log_path.read_text(), "chat.py on http")) == 3, timeout=15,
                   what="a new worker in place of the killed one")
        wait_until(lambda: all(requests.get(app.url + "/healthz", timeout=5).ok for _ in range(10)), timeout=10,
                   what="the port to be served again")
        app.process.terminate()
        assert app.process.wait(timeout=15) == 0
        pids = worker_pids(app.log_path.read_text(), "chat.py on http") - {victim}
        for pid in pids:
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=5, what=f"worker {pid} to exit")
    finally:
        app.stop()


def test_more_than_one_worker_needs_redis(tmp_path):
    """--workers 2 without CHAT_REDIS_URL refuses to start, saying why."""
    result = subprocess.run([sys.executable, "chat.py", "--workers", "2", "--port", str(free_port())], cwd=HERE,
                            env=clean_env(CHAT_DB=str(tmp_path / "chat.db")), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "CHAT_REDIS_URL" in result.stderr


def test_an_unreachable_redis_stops_the_start_without_showing_its_password(tmp_path):
    """CHAT_REDIS_URL pointing at nothing: chat.py says so and exits 2 at start, with the URL's password blanked."""
    result = subprocess.run([sys.executable, "chat.py", "--port", str(free_port())], cwd=HERE, timeout=60,
                            env=clean_env(CHAT_DB=str(tmp_path / "chat.db"),
                                          CHAT_REDIS_URL=f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "cannot reach Redis" in result.stderr
    assert "s3cret-pw" not in result.stdout + result.stderr
