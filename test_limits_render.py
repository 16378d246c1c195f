from gevent import monkey; monkey.patch_all()  # noqa: E702 — as in test_chat.py, before anything imports socket

# Rendering is fair and bounded (issue 20, item 5): no answer of the answer limit's size holds the
# renderer for more than about a second, whatever its Markdown or TeX; one answer's render never
# holds up another's; and a short block rendered on the hub stays short there.

import gc  # noqa: E402
import html  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

import chat  # noqa: E402
from test_chat import (FakeUpstream, ChatProcess, HX, answer, after_event, database, isolated,  # noqa: E402,F401
                       Transcript, wait_until)


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


def test_an_ordinary_answer_renders_promptly_while_a_pathological_one_renders():
    """A 20 KB answer finishing while a 400 KB hostile one renders is not held up by it: it is done long before
    the hostile one, in a few times its time alone (the hostile render is stopped at its slice in the shared
    lane, then goes on in the long lane)."""
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
        if hostile_lane == "RENDER_LANE":  # it has its whole budget in the long lane still ahead of it
            assert not hostile.ready(), "the hostile answer finished first"
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

def browser_session():
    """A browser-like client of its own (its own owner cookie), as the page's htmx speaks."""
    session = requests.Session()
    session.trust_env = False
    session.headers.update(HX)
    return session


def post(session, base, prompt):
    """POST a prompt; return the new stream id."""
    response = session.post(f"{base}/streaming", data={"prompt": prompt}, timeout=5)
    assert response.status_code == 200, response.text
    return re.search(r'sse-connect="/events\?stream=([A-Za-z0-9_-]+)"', response.text).group(1)


def test_a_hostile_400_kb_answer_leaves_other_chats_and_healthz_fast(tmp_path):
    """A real chat.py relays a 400 KB answer of pathological Markdown while another browser's ordinary answer
    finishes: the ordinary one is done well before the hostile one's bubble (shown as plain text), and
    /healthz answers quickly all along."""
    upstream = FakeUpstream()
    app = poller = None
    hostile_browser, ordinary_browser = browser_session(), browser_session()
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
        hostile_id = post(hostile_browser, app.url, "Say something hostile")
        wait_until(lambda: len(chats()) == 1, timeout=5, what="the hostile answer's request")
        reply = upstream.serve(ordinary, pause_at=after_event(ordinary, b"Last words."))
        ordinary_id = post(ordinary_browser, app.url, "Say something ordinary")
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
