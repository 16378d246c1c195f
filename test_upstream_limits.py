from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# Issue 20 "Hardened": every buffer on the upstream read path is capped (a hostile or broken model
# server costs a few MB, and the answer ends with a clear note, its text so far kept), and
# rendering is fair and bounded: no answer of the answer limit's size holds the renderer for
# more than about a second, whatever its Markdown or TeX.

import collections  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import html  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.server  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

import chat  # noqa: E402
from testkit import (  # noqa: E402
    ChatProcess, FakeUpstream, HX, ROLE, Transcript, after_event, alerts, answer, choice, data, notes, read_events,
    reasoning_text, send, send_in, source_text, wait_until)


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
# Rendering is fair and bounded (issue 20, item 5): no answer of the answer limit's size holds the
# renderer for more than about a second, whatever its Markdown or TeX; one answer's render never
# holds up another's; and a short block rendered on the hub stays short there.
# ---------------------------------------------------------------------------

def fill(unit, size, head="", tail=""):
    """head, unit repeated to about size characters, tail."""
    return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail


def nested_frac(size):
    """$\\frac{\\frac{…}{y}}{y}$ of about size characters."""
    depth = size // 12
    return "$" + "\\frac{" * depth + "x" + "}{y}" * depth + "$"


# Inputs that took (or could take) worse than linear time, each made to about n characters.
CORPUS = {
    "\\( repeated": lambda n: fill("\\(", n),
    "\\[ repeated": lambda n: fill("\\[", n),
    "\\( x without a closer": lambda n: fill("\\( x ", n),
    "\\( repeated, one closer at the end": lambda n: fill("\\( ", n, tail="\\)"),
    "$ run": lambda n: fill("$", n),
    "$a repeated": lambda n: fill("$a ", n),
    "$$ lines": lambda n: fill("$$\n", n),
    "![ repeated": lambda n: fill("![", n),
    "![]( repeated": lambda n: fill("![](", n),
    "*_ repeated": lambda n: fill("*_", n),
    "*a _b repeated": lambda n: fill("*a _b ", n),
    "[ repeated": lambda n: fill("[", n),
    "[ repeated, one ] at the end": lambda n: fill("[", n, tail="]"),
    "[a]( repeated": lambda n: fill("[a](", n),
    "backtick run": lambda n: fill("`", n),
    "backtick pairs": lambda n: fill("`` x ", n),
    "> run": lambda n: fill(">", n),
    "> - nested": lambda n: fill("> - ", n),
    "- nested lists": lambda n: "".join("  " * (i % 60) + "- x\n" for i in range(n // 70)),
    "< run": lambda n: fill("<", n),
    "<a: repeated": lambda n: fill("<a:", n),
    "linkify-able run": lambda n: fill("a", n, head="https://"),
    "huge code fence": lambda n: fill("x = [1, 'a', {b: 2}]  # c\n", n, head="```python\n", tail="```\n"),
    "many highlighted code blocks": lambda n: fill("```python\n" + "x = [1, 'a', {b: 2}]\n" * 1000 + "```\n\n", n),
    "deeply nested \\frac": nested_frac,
    "deeply nested braces": lambda n: "$$" + "{" * (n // 2) + "x" + "}" * (n // 2) + "$$",
    "many long formulas": lambda n: fill("$" + "x+" * 1900 + "x$\n\n", n),
    "many short formulas": lambda n: "".join(f"$x^{{{i}}}_i$ " for i in range(n // 12)),
    "long table": lambda n: fill("| 1 | 2 |\n", n, head="| a | b |\n|---|---|\n"),
    "wide table": lambda n: fill("|" + "1|" * 500 + "\n", n, head="|" + "a|" * 500 + "\n|" + "-|" * 500 + "\n"),
    "lines of one letter": lambda n: fill("x\n", n),
    "headings": lambda n: fill("# h\n", n),
    "reference uses": lambda n: fill("[a] ", n, head="[a]: /u\n\n"),
    "entities": lambda n: fill("&#", n),
    "backslashes": lambda n: fill("\\", n),
}

BIG = 400_000  # the answer limit, CHAT_MAX_ANSWER_CHARS


def ordinary_text(size, seed=""):
    """Ordinary Markdown of about size characters (seed makes it a text the render cache has not seen)."""
    return fill(f"Some **bold** text with `code`, a [link](https://example.com) and $x^2$.{seed}\n\n", size)


def cpu_time_of_render(text, runs=1):
    """CPU seconds render_markdown takes on text with no budget (what the parser itself does), the least of runs;
    the cyclic collector waits (its passes over the whole test process would land in one run or another)."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(runs):
            started = time.process_time()
            chat.render_markdown(text)
            times.append(time.process_time() - started)
    finally:
        gc.enable()
    return min(times)


def bubble_of(text):
    """The finished bubble for an answer of text, rendered as the relay renders it at the end (render_answer)."""
    return chat.render_answer(dict(chat.answer_record(chat.Stream("s-render", [])), text=text))


@pytest.fixture(autouse=True)
def fresh_render_cache():
    """Every test renders for real: no text is remembered from an earlier test."""
    chat.safe_markdown.cache_clear()
    chat.tex_to_mathml.cache_clear()
    yield
    chat.safe_markdown.cache_clear()


@pytest.mark.parametrize("name", CORPUS)
def test_pathological_markdown_takes_linear_time(name):
    """From 50 to 200 KB, the parser's time grows about linearly (quadratic would be 16 times)."""
    small, large = CORPUS[name](50_000), CORPUS[name](200_000)
    cpu_time_of_render(small[:1000])  # lexers and caches loaded
    bound = 6 * cpu_time_of_render(small, runs=2) + 0.05
    # Other processes sharing the cores slow a run now and then: a second run has to be over the bound too.
    assert cpu_time_of_render(large) <= bound or cpu_time_of_render(large) <= bound


@pytest.mark.parametrize("name", CORPUS)
def test_an_answer_of_the_limits_size_takes_about_a_second_of_cpu_and_stays_escaped(name):
    """Any 400 KB answer comes back after about a second of CPU (its slice in the shared lane, then its budget in
    the long lane), as Markdown or (past the budget) as escaped plain text with a note, inside the usual bubble."""
    text = CORPUS[name](BIG)
    started, cpu_started = time.monotonic(), time.process_time()  # the process's CPU: worker threads count too
    bubble = bubble_of(text)
    assert time.process_time() - cpu_started < 2.5
    assert time.monotonic() - started < 15.0  # however loaded the machine is
    assert 'class="content markdown"' in bubble and "<script" not in bubble
    if "too long or too intricate" in bubble:
        assert f"<pre>{html.escape(text[:200])}" in bubble
    assert "<<" not in bubble and "<a:" not in bubble  # what the answer wrote reaches the page escaped


def test_a_render_past_its_budget_stops_soon_after_it():
    """render_markdown with a budget raises RenderTimeout about when the budget is spent, not when the parser
    is done (seconds later for these inputs)."""
    for name in ("![ repeated", "lines of one letter", "wide table", "many highlighted code blocks"):
        text = CORPUS[name](BIG)
        started = time.thread_time()
        with pytest.raises(chat.RenderTimeout):
            chat.render_markdown(text, 0.2)
        assert time.thread_time() - started < 0.2 + 0.3, name


@pytest.mark.parametrize("name", CORPUS)
def test_a_short_pathological_block_takes_little_of_the_hub(name):
    """A block short enough to be rendered on the hub gives way to a worker thread once it outruns HUB_SLICE:
    the hub's own CPU time stays a few hundredths of a second, and the block still comes out."""
    text = CORPUS[name](chat.BLOCK_IN_THREAD)[:chat.BLOCK_IN_THREAD]
    gc.collect()  # the suite's heap, a thousand tests big, is no render's: its collection must not land in here
    started = time.thread_time()  # the test's thread is the hub's: worker threads do not count
    rendered = chat.render_block(text)
    assert time.thread_time() - started < chat.HUB_SLICE + 0.1  # a machine under load adds some
    assert rendered and "<script" not in rendered and "<<" not in rendered


def test_an_ordinary_short_block_renders_on_the_hub():
    """An ordinary block within BLOCK_IN_THREAD is rendered on the hub, as Markdown, without a worker thread."""
    threads = []
    original = chat.in_background
    chat.in_background = lambda fn, *args: threads.append(fn) or original(fn, *args)
    try:
        rendered = chat.render_block(ordinary_text(chat.BLOCK_IN_THREAD - 100))
    finally:
        chat.in_background = original
    assert "<strong>bold</strong>" in rendered and not threads


def test_a_render_over_its_slice_moves_to_the_long_lane_and_past_the_budget_is_plain_text():
    """A text that outruns RENDER_SLICE in the shared lane is rendered again in LONG_LANE; past RENDER_BUDGET
    the bubble shows the text escaped in a <pre>, with a note, and keeps its regenerate button."""
    slow = CORPUS["![ repeated"](BIG)
    lanes = []
    original = chat.in_background
    chat.in_background = lambda fn, *args: lanes.append(
        [lane for lane in ("RENDER_LANE", "LONG_LANE") if getattr(chat, lane).locked()]) or original(fn, *args)
    try:
        record = dict(chat.answer_record(chat.Stream("s-slow", [])), text=slow, conversation_id="c1")
        bubble = chat.render_answer(record)
    finally:
        chat.in_background = original
    assert lanes == [["RENDER_LANE"], ["LONG_LANE"]]
    assert f"<pre>{html.escape(slow[:100])}" in bubble and "too long or too intricate" in bubble
    assert 'class="regenerate"' in bubble and 'class="error"' not in bubble


def test_the_cyclic_collector_waits_while_a_render_runs_in_a_thread():
    """A render in a worker thread makes some 100,000 objects; a collector pass over them would hold the
    interpreter, and every stream, for tens of milliseconds: the collector is off while it runs, and on after."""
    assert gc.isenabled()
    render = gevent.spawn(chat.render_in_background, CORPUS["*_ repeated"](BIG))
    wait_until(chat.RENDER_LANE.locked, timeout=10, what="the render in its lane")
    assert not gc.isenabled()
    render.get(timeout=30)
    assert gc.isenabled() and chat.COLLECTOR_PAUSES == [0]


def test_an_ordinary_answer_renders_promptly_while_a_pathological_one_renders():
    """A 20 KB answer finishing while a 400 KB hostile one renders is not held up by it: it is done in a few times
    its time alone, not after the hostile render's second of CPU (the hostile render is stopped at its slice in the
    shared lane, then goes on in the long lane). Before, it waited for the whole hostile render: a minute."""
    started = time.monotonic()
    alone = bubble_of(ordinary_text(20_000, "alone"))
    alone_seconds = time.monotonic() - started
    assert "<strong>bold</strong>" in alone
    for hostile_lane in ("RENDER_LANE", "LONG_LANE"):
        chat.safe_markdown.cache_clear()
        hostile = gevent.spawn(bubble_of, CORPUS["![ repeated"](BIG))
        lane = getattr(chat, hostile_lane)
        wait_until(lane.locked, timeout=10, what=f"the hostile render in {hostile_lane}")
        started = time.monotonic()
        ordinary = gevent.spawn(bubble_of, ordinary_text(20_000, hostile_lane))
        wait_until(ordinary.ready, timeout=10, what="the ordinary answer's bubble")
        took = time.monotonic() - started
        assert "<strong>bold</strong>" in ordinary.get()
        assert took < 4 * alone_seconds + 10 * chat.RENDER_SLICE, (took, alone_seconds)
        assert "too long or too intricate" in hostile.get(timeout=10)


def test_bracket_math_still_finds_its_closer():
    """Remembering where the closers are changes nothing: each opener takes the next closer after it, empty and
    unclosed ones stay text."""
    rendered = chat.render_markdown("\\(a\\) and \\(b\\) and \\[c\\] but \\( \\) and \\(open")
    assert rendered.count("<math") == 3 and " ( ) and (open" in rendered  # as escaped characters


# ---------------------------------------------------------------------------
# End to end: a real `python chat.py` and two browsers
# ---------------------------------------------------------------------------

def test_a_hostile_400_kb_answer_leaves_other_chats_and_healthz_fast(tmp_path):
    """A real chat.py relays a 400 KB answer of pathological Markdown while another browser's ordinary answer
    finishes: the ordinary one is done well before the hostile one's bubble (shown as plain text), and
    /healthz answers quickly all along."""
    upstream = FakeUpstream()
    app = poller = None
    hostile_browser, ordinary_browser = browser(), browser()
    try:
        hostile_text = CORPUS["![ repeated"](BIG - 20_000)
        hostile = answer(*(hostile_text[i:i + 4000] for i in range(0, len(hostile_text), 4000)), " the end")
        ordinary = answer(*[ordinary_text(20_000)[i:i + 500] for i in range(0, 20_000, 500)], "Last words.")
        app = ChatProcess(tmp_path / "chat.log", OPENAI_BASE_URL=upstream.url, CHAT_MODEL="test-model",
                          NO_PROXY="127.0.0.1")
        slowest = [0.0]
        polling = [True]

        def poll_healthz():
            while polling[0]:
                started = time.monotonic()
                assert requests.get(f"{app.url}/healthz", timeout=5).status_code == 200
                slowest[0] = max(slowest[0], time.monotonic() - started)
                gevent.sleep(0.02)
        poller = gevent.spawn(poll_healthz)

        chats = lambda: [r for r in upstream.requests if r.path.endswith("/chat/completions")]  # noqa: E731
        upstream.serve(hostile)
        hostile_id, _ = start_chat(hostile_browser, app.url, "Say something hostile")
        wait_until(lambda: len(chats()) == 1, timeout=5, what="the hostile answer's request")
        reply = upstream.serve(ordinary, pause_at=after_event(ordinary, b"Last words."))
        ordinary_id, _ = start_chat(ordinary_browser, app.url, "Say something ordinary")
        wait_until(lambda: len(chats()) == 2, timeout=5, what="the ordinary answer's request")

        done_at = {}

        def read(browser, stream_id, marker=None):
            """Read a stream to its end; release the ordinary answer once the hostile text is all relayed."""
            raw, tail = [], b""
            with browser.get(f"{app.url}/events", params={"stream": stream_id}, stream=True, timeout=30) as response:
                assert response.status_code == 200
                for chunk in response.iter_content(None):
                    raw.append(chunk)
                    tail = (tail + chunk)[-1000:]
                    if marker and marker in tail:
                        marker = None
                        done_at["released"] = time.monotonic()
                        reply.gate.set()  # the hostile answer's render starts now; the ordinary one ends
            done_at[stream_id] = time.monotonic()
            return Transcript(b"".join(raw))
        hostile_reader = gevent.spawn(read, hostile_browser, hostile_id, b"the end")
        ordinary_reader = gevent.spawn(read, ordinary_browser, ordinary_id)
        hostile_bubble = hostile_reader.get(timeout=60).done
        ordinary_bubble = ordinary_reader.get(timeout=60).done
        polling[0] = False
        poller.get(timeout=10)

        assert "<strong>bold</strong>" in ordinary_bubble and "Last words." in ordinary_bubble
        assert "too long or too intricate" in hostile_bubble and "<pre>![![" in hostile_bubble
        assert done_at[ordinary_id] < done_at[hostile_id], "the ordinary answer waited for the hostile one"
        assert done_at[ordinary_id] - done_at["released"] < 5.0  # ~0.3 s: 20 s before the deadlines
        assert done_at[hostile_id] - done_at["released"] < 20.0  # ~1.5 s of the CPU
        assert slowest[0] < 1.0, f"/healthz took {slowest[0]:.2f} s"
    finally:
        if poller:
            poller.kill()
        if app:
            app.stop()
        upstream.stop()


# ---------------------------------------------------------------------------
# The body read straight from its socket (SocketBody, issue 24)
# ---------------------------------------------------------------------------

def socket_body(wire, chunked=True, length=None, pieces=1):
    """A SocketBody reading wire from a socketpair, written in `pieces` writes; returns (body, write greenlet)."""
    ours, theirs = socket.socketpair()
    cuts = sorted({len(wire) * n // pieces for n in range(1, pieces)})

    def write():
        start = 0
        for cut in [*cuts, len(wire)]:
            theirs.sendall(wire[start:cut])
            start = cut
            gevent.sleep(0)  # each piece its own read
        theirs.close()
    return chat.SocketBody(ours, chunked, length, b""), gevent.spawn(write)


def read_all(body):
    """Everything the body gives until its end."""
    out = []
    while True:
        data = body.read(65536)
        if not data:
            return b"".join(out)
        out.append(data)


@pytest.mark.parametrize("pieces", [1, 7, 10_000])
def test_a_chunked_body_read_from_its_socket_comes_out_whole_whatever_the_reads(pieces):
    """De-chunked here: sizes in either case, extensions, a zero-size last chunk with trailers; cut anywhere."""
    parts = [b"data: one\n\n", b"data: two\r\n\r\n" * 30, b"x" * 4099]
    wire = b"".join(b"%X;ext=1\r\n%s\r\n" % (len(p), p) if n % 2 else b"%x\r\n%s\r\n" % (len(p), p)
                    for n, p in enumerate(parts)) + b"0\r\nTrailer: yes\r\n\r\n"
    body, writer = socket_body(wire, pieces=min(pieces, len(wire)))
    assert read_all(body) == b"".join(parts)
    writer.join()


@pytest.mark.parametrize("wire", [b"zz\r\ndata\r\n", b"-5\r\nxx\r\n", b"5\r\nab", b"3\r\nabcX\r\n", b"5" * 5000])
def test_a_broken_chunked_body_is_an_answer_that_broke_off(wire):
    """A size that is not hex, a negative one, a body cut mid-chunk, a chunk without its CRLF, a size line without
    end: the read raises what the relay reports as "the connection broke off" (never hangs, never returns junk)."""
    body, writer = socket_body(wire)
    with pytest.raises((ValueError, chat.IncompleteRead)):
        read_all(body)
    writer.join()


def test_a_body_with_a_length_ends_there_and_one_without_at_the_close():
    """Content-Length: exactly that many bytes, whatever follows; close-delimited: everything until EOF."""
    body, writer = socket_body(b"hello world and more", chunked=False, length=11, pieces=3)
    assert read_all(body) == b"hello world"
    writer.join()
    body, writer = socket_body(b"all of it", chunked=False, length=None, pieces=3)
    assert read_all(body) == b"all of it"
    writer.join()


def test_the_relay_keeps_no_response_while_it_streams_and_reads_gzip_through_urllib3(client, upstream, monkeypatch):
    """While an answer streams, the relay holds the upstream's socket only: no requests Response (nor its request,
    a copy of the conversation) stays alive. A gzip-encoded body is read (and decoded) through urllib3."""
    body = answer("Hello", " there")
    upstream.serve(body, pause_at=after_event(body, b'"role"'))
    stream_id = send(client)
    stream = chat.streams.get(stream_id)
    wait_until(lambda: stream.first_byte_at is not None, what="the upstream's first bytes")
    gc.collect()
    live = [o for o in gc.get_objects() if isinstance(o, requests.Response)
            and (o.url or "").endswith("/chat/completions")]
    upstream.release()
    assert live == []
    assert read_events(client, stream_id).message == "Hello there"
    kinds = []
    original = chat.SocketBody.reader.__func__
    monkeypatch.setattr(chat.SocketBody, "reader", classmethod(
        lambda cls, response: kinds.append(type(body := original(cls, response)).__name__) or body))
    upstream.serve(zlib.compress(answer("Zipped", " words"), wbits=31), transfer="length",
                   headers=[("Content-Encoding", "gzip")])
    assert read_events(client, send(client)).message == "Zipped words"
    assert kinds == ["UrllibBody"]


def test_a_tls_upstream_is_read_through_http_client(client, monkeypatch, tmp_path):
    """A TLS socket cannot be duplicated: an https model server's body is read through http.client (which
    decrypts), every token arrives, and the answer is done."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    body = answer("Over", " TLS")
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
             + b"".join(b"%x\r\n%s\r\n" % (len(p + b"\n\n"), p + b"\n\n") for p in body.split(b"\n\n") if p)
             + b"0\r\n\r\n")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))

    def handle(sock, _address):
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(65536) or b"\r\n\r\n"
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        rest = head.split(b"\r\n\r\n", 1)[1]
        while len(rest) < length:
            rest += sock.recv(65536)
        sock.sendall(reply)
        sock.close()
    tls = gevent.server.StreamServer(("127.0.0.1", 0), handle, ssl_context=context)
    tls.start()
    kinds, original = [], chat.SocketBody.reader.__func__
    monkeypatch.setattr(chat.SocketBody, "reader", classmethod(
        lambda cls, response: kinds.append(type(body := original(cls, response)).__name__) or body))
    try:
        monkeypatch.setattr(chat.settings, "base_url", f"https://127.0.0.1:{tls.server_port}/v1")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
        transcript = read_events(client, send(client))
    finally:
        tls.stop()
    assert transcript.message == "Over TLS"
    assert not alerts(transcript.done)
    assert kinds == ["UrllibBody"]
