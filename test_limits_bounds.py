from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see test_chat.py)

# Issue 20 "Hardened": every buffer on the upstream read path is capped (a hostile or broken model
# server costs a few MB, and the answer ends with a clear note, its text so far kept), the database
# has a size quota (CHAT_MAX_DB_MB), and a journal folder others may write to is refused at start.

import base64  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

import chat  # noqa: E402
from test_chat import (  # noqa: E402,F401 — fixtures (isolated, database, postgres_url, client, upstream) by name
    HERE, HX, ROLE, ChatProcess, FakeUpstream, Transcript, after_event, alerts, answer, choice, clean_env, client, data,
    database, db_rows, free_port, isolated, notes, postgres_url, read_events, reasoning_text, send_in, source_text,
    upstream, wait_until)


# ---------------------------------------------------------------------------
# The parsers' caps, piece by piece
# ---------------------------------------------------------------------------

def test_line_splitter_gives_up_on_a_line_over_the_cap_holding_no_more():
    """An endless line is refused once it passes MAX_LINE; what is held never outgrows the cap plus one read."""
    lines, piece, fed = chat.LineSplitter(), b"x" * 65536, 0
    with pytest.raises(chat.UpstreamError, match="longer than 1 MiB"):
        while True:
            assert lines.feed(piece) == []
            fed += len(piece)
            assert lines.held == fed <= chat.MAX_LINE
    assert fed <= chat.MAX_LINE < fed + len(piece)


def test_line_splitter_holds_a_line_sent_in_tiny_reads_in_linear_time():
    """A line arriving a few bytes a read is kept as its reads and joined once: it used to be copied whole
    on every read (quadratic, minutes of CPU for one line); now it reaches the cap in well under the deadline."""
    lines = chat.LineSplitter()
    piece = b"y" * 16
    with gevent.Timeout(20, AssertionError("feeding the line took quadratic time")):
        with pytest.raises(chat.UpstreamError, match="longer than"):
            for _ in range(chat.MAX_LINE // len(piece) + 1):
                lines.feed(piece)
    lines = chat.LineSplitter()
    for _ in range(1000):
        lines.feed(piece)
    assert lines.feed(b"z\r\nnext") == [piece * 1000 + b"z"]
    assert lines.close() == [b"next"]


def test_line_splitter_takes_a_line_just_under_the_cap():
    """A line one byte under the cap, sent in reads, comes out whole."""
    lines = chat.LineSplitter()
    line = b"data: " + b"x" * (chat.MAX_LINE - 7)
    out = []
    for at in range(0, len(line), 65536):
        out += lines.feed(line[at:at + 65536])
    out += lines.feed(b"\n")
    assert out == [line]


def test_sse_parser_gives_up_on_an_event_over_the_size_cap():
    """data: lines with no blank line: refused once their bytes pass MAX_EVENT, before dispatch."""
    sse, line, fed = chat.SSEParser(), b"data: " + b"x" * 1018, 0
    with pytest.raises(chat.UpstreamError, match="an event of more than 1 MiB"):
        while True:
            assert sse.feed(line) is None
            fed += len(line) - 6 + 1
    assert fed <= chat.MAX_EVENT and sse.data is None


def test_sse_parser_gives_up_on_an_event_over_the_line_cap():
    """Empty data: lines cost a string each: refused at MAX_EVENT_LINES however short they are."""
    sse = chat.SSEParser()
    for _ in range(chat.MAX_EVENT_LINES):
        assert sse.feed(b"data:") is None
    with pytest.raises(chat.UpstreamError, match="10,000 lines"):
        sse.feed(b"data:")


def test_sse_parser_dispatches_an_event_just_under_the_caps_and_starts_afresh():
    """An event at the limits is dispatched whole; the next one has the whole budget again."""
    sse = chat.SSEParser()
    value = b"x" * (chat.MAX_EVENT // 2 - 1)
    sse.feed(b"data: " + value)
    sse.feed(b"error: " + value)
    assert sse.feed(b"") == ("error", "\n".join([value.decode()] * 2))
    for _ in range(chat.MAX_EVENT_LINES - 1):
        sse.feed(b"data:")
    assert sse.feed(b"") == ("message", "\n" * (chat.MAX_EVENT_LINES - 2))


def test_think_splitter_holds_only_a_tag_prefix_through_an_endless_think_block():
    """Reasoning with no </think> is released as it comes: at most a possible tag start is held."""
    think = chat.ThinkSplitter()
    shown = think.feed("<think>")
    for n in range(2000):
        shown += think.feed("x" * 499 + "</thi"[: n % 6])
        assert len(think.held) < len(chat.THINK_CLOSE)
    assert {kind for kind, _ in shown} == {"reasoning"}
    assert chat.partial_suffix("a" * 1_000_000 + "</th", chat.THINK_CLOSE) == 4


def test_think_splitter_holds_little_of_endless_leading_blank_space():
    """Blank space before the answer is layout: a flood of it keeps only a little."""
    think = chat.ThinkSplitter()
    for _ in range(10_000):
        assert think.feed(" \n" * 100) == []
        assert len(think.held) <= 256
    assert think.feed("<think>r</think>a") == [("reasoning", "r"), ("message", "a")]


def test_completion_ends_endless_tool_call_arguments_at_the_answer_limit(monkeypatch):
    """Tool-call arguments are shown under the answer, so they count as text: past the limit, AnswerLimit."""
    monkeypatch.setattr(chat.settings, "max_answer_chars", 10_000)
    completion = chat.Completion(keep_text=False)
    chunk = json.dumps(choice({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "a" * 1000}}]}))
    with pytest.raises(chat.AnswerLimit, match="tool calls reached"):
        for _ in range(11):
            completion.apply("message", chunk)
    assert len(completion.tool_calls[0]["arguments"]) <= 10_000


def test_completion_ends_an_answer_with_too_many_tool_calls():
    """A new tool call index per chunk would grow the table of calls forever: past MAX_TOOL_CALLS, AnswerLimit."""
    completion = chat.Completion(keep_text=False)
    with pytest.raises(chat.AnswerLimit, match="128 calls"):
        for index in range(chat.MAX_TOOL_CALLS + 1):
            completion.apply("message", json.dumps(choice({"tool_calls": [{"index": index, "function": {}}]})))
    assert len(completion.tool_calls) == chat.MAX_TOOL_CALLS + 1


def test_completion_skips_json_nested_deeper_than_the_parser_goes():
    """'[[[[…' raises RecursionError in json.loads: the event is skipped like any non-JSON one, not a crash."""
    completion = chat.Completion()
    assert completion.apply("message", "[" * 200_000) == ()
    assert completion.apply("message", json.dumps(choice({"content": "still here"}))) == [("content", "still here")]


def test_a_whole_json_answer_over_the_cap_ends_with_a_note(client, upstream):
    """A server that ignores stream:true and sends more than MAX_JSON_BODY: a clear alert, not a silent cut."""
    body = json.dumps({"choices": [{"index": 0, "message": {"content": "x" * (chat.MAX_JSON_BODY + 10)}}]})
    upstream.serve(body.encode(), content_type="application/json", transfer="length")
    stream_id, _ = send_in(client, "big")
    (alert,) = alerts(read_events(client, stream_id).done)
    assert "whole answer of more than 2 MiB" in alert


def test_a_whole_json_answer_under_the_cap_is_shown(client, upstream):
    """A whole completion of 1.5 MiB (under the cap) is still shown."""
    text = "word " * (300 << 10)
    body = json.dumps({"choices": [{"index": 0, "message": {"content": text}, "finish_reason": "stop"}]})
    upstream.serve(body.encode(), content_type="application/json", transfer="length")
    stream_id, _ = send_in(client, "big")
    done = read_events(client, stream_id).done
    assert alerts(done) == [] and any("reached chat.py's limit" in n for n in notes(done))  # 1.5 MB > 400,000 chars


# ---------------------------------------------------------------------------
# Hostile upstreams against a real `python chat.py`: capped memory, a clear end, others still served
# ---------------------------------------------------------------------------

KEPT = "Kept so far. "
FLOOD = 200 << 20  # bytes each attack would send if chat.py kept reading
RSS_ROOM = 30 << 10  # KiB above the process's RSS at start that an attack may cost, at its peak and after


def rss_kib(pid, field="VmRSS"):
    """A process's resident memory in KiB: now (VmRSS), or its peak so far (VmHWM), from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1])


def tool_chunk(arguments, **call):
    """A chunk with one streamed tool call."""
    return data(choice({"tool_calls": [{"index": 0, "function": {"arguments": arguments}, **call}]}))


Attack = collections.namedtuple("Attack", "prefix unit pause_after ending kept content_type encoding",
                                defaults=("text/event-stream", None))
# prefix: what comes before the flood; unit: what repeats; pause_after: bytes of flood before the pause (under
# every cap); ending: "alert" (the upstream's fault) or "limit" (a note); kept: the text that must survive.
ATTACKS = {
    "data lines with no blank line": Attack(
        ROLE + data(choice({"content": KEPT})), b"data: " + b"x" * 1018 + b"\n", 512 << 10, "alert", "content"),
    "one endless line": Attack(
        ROLE + data(choice({"content": KEPT})) + b"data: ", b"x" * 1024, 512 << 10, "alert", "content"),
    "a JSON chunk split over data lines": Attack(
        ROLE + data(choice({"content": KEPT})) + b'data: {"choices":[{"index":0,"delta":{"content":"\n',
        b'data: ' + b"y" * 1018 + b"\n", 512 << 10, "alert", "content"),
    "empty data lines": Attack(
        ROLE + data(choice({"content": KEPT})), b"data:\n" * 8, 24 << 10, "alert", "content"),
    "an endless think block": Attack(
        ROLE + data(choice({"content": "<think>"})), data(choice({"content": "t" * 4000})), 200 << 10, "limit",
        "reasoning"),
    "endless tool-call arguments": Attack(
        ROLE + data(choice({"content": KEPT})) + tool_chunk("", id="call_1", type="function"),
        tool_chunk("a" * 4000), 200 << 10, "limit", "content"),
    "a gzip bomb of data lines with no blank line": Attack(  # 200 MB from 200 KB
        ROLE + data(choice({"content": KEPT})), b"data: " + b"x" * 1018 + b"\n", 512 << 10, "alert", "content",
        encoding="gzip"),
    "a whole JSON answer that never ends": Attack(
        b'{"choices":[{"index":0,"message":{"content":"x"}}],"x":[', b"{}," * 1000, 512 << 10, "alert", None,
        "application/json"),
}


def flood(prefix, unit, pause_after, paused, gate, stop):
    """The attack's bytes: prefix, then unit repeated in ~16 KB writes up to FLOOD bytes (never built whole),
    pausing once after pause_after bytes until the gate opens."""
    yield prefix
    piece = unit * max(1, (16 << 10) // len(unit))
    sent = 0
    while sent < FLOOD:
        if sent >= pause_after and not paused.is_set():
            paused.set()
            gevent.wait([gate, stop], count=1)
        yield piece
        sent += len(piece)


def gzipped(pieces):
    """The pieces gzip-compressed as they come (each flushed, so the pause point stays where it was)."""
    packer = zlib.compressobj(wbits=31)
    for piece in pieces:
        yield packer.compress(piece) + packer.flush(zlib.Z_SYNC_FLUSH)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One `python chat.py` against a fake upstream, shared by the attacks; yields (process, upstream, RSS at start)."""
    fake = FakeUpstream()
    folder = tmp_path_factory.mktemp("hostile")
    app = ChatProcess(folder / "chat.log", OPENAI_BASE_URL=fake.url, CHAT_MODEL="fake-model")
    try:
        yield app, fake, rss_kib(app.process.pid)
    finally:
        app.stop()
        fake.stop()


def browser():
    """A requests session like a page with JavaScript, with its own owner cookie."""
    session = requests.Session()
    session.trust_env = False
    session.headers.update(HX)
    return session


def start_chat(session, base, prompt):
    """POST a prompt; return (stream id, conversation id)."""
    response = session.post(f"{base}/streaming", data={"prompt": prompt}, timeout=10)
    assert response.status_code == 200, response.text
    stream_id = re.search(r'sse-connect="/events\?stream=([\w-]+)"', response.text).group(1)
    return stream_id, response.headers["HX-Push-Url"].removeprefix("/c/")


def read_stream(session, base, stream_id, until, timeout=30.0, what="the events"):
    """Read /events until until(transcript) holds; return the transcript."""
    raw = b""
    with session.get(f"{base}/events", params={"stream": stream_id}, stream=True, timeout=10) as response, \
            gevent.Timeout(timeout, AssertionError(f"timed out waiting for {what}")):
        while not until(Transcript(raw)):
            chunk = response.raw.read1(65536)
            assert chunk, f"the stream ended before {what}: {raw[-500:]!r}"
            raw += chunk
    return Transcript(raw)


def healthz_seconds(base):
    """How long /healthz takes to answer 200."""
    started = time.monotonic()
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
    return time.monotonic() - started


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_hostile_upstream_costs_bounded_memory_and_ends_the_answer_with_a_note(hostile, attack):
    """Each shape of endless upstream output (200 MB streamed, never built): the answer ends with a clear note
    and its text so far is kept and saved; chat.py's RSS stays within RSS_ROOM of its start at its peak (the
    high-water mark, over every attack so far) and after; meanwhile /healthz answers promptly and another
    browser's chat gets its first token."""
    app, fake, rss_start = hostile
    shape = ATTACKS[attack]
    paused, gate = gevent.event.Event(), gevent.event.Event()
    reply = fake.serve(b"", content_type=shape.content_type,
                       headers=[("Content-Encoding", shape.encoding)] if shape.encoding else ())
    reply.pieces = flood(shape.prefix, shape.unit, shape.pause_after, paused, gate, fake.shutdown)
    if shape.encoding:
        reply.pieces = gzipped(reply.pieces)
    attacker, other = browser(), browser()
    stream_id, conversation = start_chat(attacker, app.url, "attack")
    slowest, watching = [0.0], gevent.event.Event()

    def watch():
        while not watching.wait(0.02):  # every 20 ms until the attack is over
            slowest.append(healthz_seconds(app.url))
    watcher = gevent.spawn(watch)
    try:
        wait_until(paused.is_set, timeout=20, what="the attack to be under way")
        fake.serve(answer("Hello", " from the other browser"))
        other_id, _ = start_chat(other, app.url, "hello")
        first = read_stream(other, app.url, other_id, lambda t: t.message, timeout=10, what="the other's first token")
        assert first.message.startswith("Hello")
        gate.set()
        done = read_stream(attacker, app.url, stream_id, lambda t: t.finished, timeout=60, what="the attack's end")
    finally:
        gate.set()
        watching.set()
        watcher.join(timeout=10)
    rss_after, peak = rss_kib(app.process.pid), rss_kib(app.process.pid, "VmHWM")
    print(f"{attack}: RSS at start {rss_start / 1024:.0f} MB, peak {peak / 1024:.0f} MB, "
          f"after {rss_after / 1024:.0f} MB; slowest /healthz {max(slowest) * 1000:.0f} ms")
    bubble = done.done
    if shape.ending == "alert":
        (alert,) = alerts(bubble)
        assert "gave up reading it" in alert
    else:
        assert any("limit of 400,000 characters" in note for note in notes(bubble))
    with contextlib.closing(sqlite3.connect(app.log_path.parent / "chat.db")) as db:
        content, reasoning, status = db.execute("SELECT content, reasoning, status FROM messages "
                                                "WHERE conversation_id = ? AND role = 'assistant'",
                                                (conversation,)).fetchone()
    assert status == ("error" if shape.ending == "alert" else "limit")
    if shape.kept == "content":
        assert KEPT.strip() in source_text(bubble) and content.startswith(KEPT.strip())
    elif shape.kept == "reasoning":
        assert reasoning_text(bubble).startswith("tttt") and reasoning.startswith("tttt")
    assert peak - rss_start < RSS_ROOM and rss_after - rss_start < RSS_ROOM, (rss_start, peak, rss_after)
    assert max(slowest) < 1.0
    assert healthz_seconds(app.url) < 1.0


# ---------------------------------------------------------------------------
# The database's size quota (CHAT_MAX_DB_MB), on SQLite and PostgreSQL
# ---------------------------------------------------------------------------

BOTH = pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
FULL = "database is full"


def incompressible(chars):
    """Text that neither SQLite nor PostgreSQL's TOAST compression makes smaller (random base64)."""
    return base64.b64encode(os.urandom(chars * 3 // 4 + 3)).decode()[:chars]


def fill_to_quota(monkeypatch):
    """Set CHAT_MAX_DB_MB just under what the database holds now (measured afresh)."""
    monkeypatch.setattr(chat, "DB_SIZE_EVERY", 0.0)
    monkeypatch.setattr(chat.settings, "max_db_mb", chat.store.db.size() / 2**20 * 0.9)


@BOTH
def test_a_full_database_refuses_a_new_conversation_with_507_in_the_form(client, upstream, monkeypatch, database):
    """Past CHAT_MAX_DB_MB a new conversation gets 507 with a readable message in the form's error area,
    and nothing is stored."""
    fill_to_quota(monkeypatch)
    refused = client.post("/streaming", {"prompt": "Hi"}, status=507)
    assert f"{FULL} (its limit is" in refused.text and 'role="alert"' in refused.text
    assert db_rows("SELECT id FROM conversations") == [] and db_rows("SELECT id FROM messages") == []
    plain = client.post("/streaming", {"prompt": "Hi"}, headers={"HX-Request": ""}, status=507)
    assert FULL in plain.text and "Hi" in plain.text  # without JavaScript: the page, the words still in the box


@BOTH
def test_a_full_database_refuses_follow_ups_regenerations_and_edits(client, upstream, monkeypatch, database):
    """Every new message is refused once the database is full, not only new conversations."""
    upstream.serve(answer("First answer."))
    stream_id, conversation = send_in(client, "First question")
    read_events(client, stream_id)
    fill_to_quota(monkeypatch)
    question = db_rows("SELECT id FROM messages WHERE role = 'user'")[0][0]
    assert FULL in client.post("/streaming", {"prompt": "More", "conversation": conversation}, status=507).text
    assert FULL in client.post(f"/c/{conversation}/regenerate", status=507).text
    assert FULL in client.post(f"/c/{conversation}/edit", {"message": question, "prompt": "Other"}, status=507).text
    assert len(db_rows("SELECT id FROM messages")) == 2


@BOTH
def test_an_answer_streaming_when_the_database_fills_finishes_and_is_saved(client, upstream, monkeypatch, database):
    """The quota refuses new messages only: an answer already streaming goes on to its end and is stored whole."""
    body = answer("Started", " and finished past the quota.")
    upstream.serve(body, pause_at=after_event(body, b'"Started"'))
    stream_id, conversation = send_in(client, "Question")
    wait_until(lambda: chat.streams.get(stream_id) and chat.streams.get(stream_id).text() == "Started",
               what="the first token")
    fill_to_quota(monkeypatch)
    assert FULL in client.post("/streaming", {"prompt": "Another"}, status=507).text
    upstream.release()
    transcript = read_events(client, stream_id)
    assert transcript.message == "Started and finished past the quota." and alerts(transcript.done) == []
    assert db_rows("SELECT content, status FROM messages WHERE role = 'assistant'") == [
        ("Started and finished past the quota.", "done")]
    assert len(db_rows("SELECT id FROM conversations")) == 1


@BOTH
def test_the_database_size_is_measured_again_only_every_few_seconds(client, upstream, monkeypatch, database):
    """One measurement serves the sends of the next DB_SIZE_EVERY seconds; after that the next send measures again."""
    upstream.serve(answer("ok"))
    assert not chat.store.full()
    measured_at = chat.store.measured_at
    monkeypatch.setattr(chat.settings, "max_db_mb", chat.store.db_size / 2**20 + 1)
    conversation = chat.store.create_conversation("someone", "big")
    for _ in range(4):  # over the quota now, unmeasured
        chat.store.add_message(conversation, "user", incompressible(400_000))
    read_events(client, send_in(client, "still measured as before")[0])
    assert chat.store.measured_at == measured_at
    chat.store.measured_at -= chat.DB_SIZE_EVERY
    assert FULL in client.post("/streaming", {"prompt": "measured again"}, status=507).text


@BOTH
def test_the_database_size_counts_what_is_stored(client, upstream, database):
    """The size grows with stored text; on SQLite, deleting it frees pages that no longer count (the free list)."""
    before = chat.store.db.size()
    upstream.serve(answer(incompressible(390_000)))
    stream_id, conversation = send_in(client, "big")
    read_events(client, stream_id)
    grown = chat.store.db.size()
    assert grown - before > 400_000
    if database == "sqlite":
        pages, free, page_size = (chat.store.db.execute(f"PRAGMA {n}").fetchone()[0]
                                  for n in ("page_count", "freelist_count", "page_size"))
        wal = os.path.getsize(chat.store.path + "-wal")
        assert grown == (pages - free) * page_size + wal
        chat.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        full = chat.store.db.size()
        client.post(f"/c/{conversation}/delete", headers={"HX-Request": "true"})
        chat.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert db_rows("SELECT id FROM conversations") == []
        assert chat.store.db.size() < full - 200_000  # the text's pages (its search index keeps a tombstone)


def test_help_documents_the_database_quota():
    """`python chat.py --help` names CHAT_MAX_DB_MB with its default."""
    result = subprocess.run([sys.executable, "chat.py", "--help"], cwd=HERE, capture_output=True, text=True,
                            timeout=30, env=clean_env(COLUMNS="100"))
    assert result.returncode == 0 and re.search(r"CHAT_MAX_DB_MB\b[^\n]*\n?[^\n]*\(2048\)", result.stdout)


# ---------------------------------------------------------------------------
# The journal's folder
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_journal_folder_others_may_write_is_refused_at_start(tmp_path, mode):
    """chat.db.unsaved/ writable by group or others: chat.py exits 2 naming the folder and the fix."""
    folder = tmp_path / "chat.db.unsaved"
    folder.mkdir()
    folder.chmod(mode)
    result = subprocess.run([sys.executable, "chat.py", "--port", str(free_port())], cwd=HERE, capture_output=True,
                            text=True, timeout=30, env=clean_env(CHAT_DB=str(tmp_path / "chat.db")))
    assert result.returncode == 2
    assert f"can be written by other users (mode {mode:o})" in result.stderr
    assert f"chmod 700 {folder}" in result.stderr
    assert oct(folder.stat().st_mode & 0o777) == oct(mode)  # left as it was: the person decides


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another user")
def test_a_journal_folder_of_another_user_is_refused_at_start(tmp_path):
    """chat.db.unsaved/ owned by someone else (who could change it at will): chat.py exits 2 and says so."""
    folder = tmp_path / "chat.db.unsaved"
    folder.mkdir(mode=0o700)
    os.chown(folder, 65534, 65534)
    result = subprocess.run([sys.executable, "chat.py", "--port", str(free_port())], cwd=HERE, capture_output=True,
                            text=True, timeout=30, env=clean_env(CHAT_DB=str(tmp_path / "chat.db")))
    assert result.returncode == 2
    assert f"{folder} belongs to another user (uid 65534)" in result.stderr and "chmod 700" in result.stderr


def test_a_private_journal_folder_is_used(tmp_path):
    """The folder chat.py makes itself (0700, its own) passes the check, and the journal is open."""
    journal = chat.Journal()
    journal.open(str(tmp_path / "j"))
    assert journal.fd is not None and oct((tmp_path / "j").stat().st_mode & 0o777) == oct(0o700)
    journal.close()
