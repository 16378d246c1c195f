from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# The tail renders too (issue 23, item 1): the Markdown block still being written reaches the page rendered
# ("tail" events: no id, never logged or replayed), with its closed marks shown and its open ones hidden, an
# open fence as a code box; bounded in size and rate; the message/block/done contract and exactly-once
# resume unchanged. Real servers on loopback and the fake upstream; tail_frame and Stream as units.

import html  # noqa: E402
import re  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402

import chat  # noqa: E402
from testkit import after_event, answer, parse_sse, post_prompt, wait_until  # noqa: E402


def tail_html(frame):
    """The HTML of a tail frame, and the text of its tail-end span (where the tokens after it go on)."""
    (event,), _ = parse_sse(frame)
    assert event.event == "tail" and event.id is None  # never logged: a reconnect does not count it
    end = re.search(r'<span class="tail-end">(.*?)</span>', event.data, re.S)
    return event.data, html.unescape(end.group(1))


def rendered(text, fence=None):
    """tail_frame(text) as (HTML, text left for the tokens)."""
    return tail_html(chat.tail_frame(text, fence))


@pytest.mark.parametrize("text, shown, hidden", [
    ("Some **bold** and *em* and `code`", "<strong>bold</strong> and <em>em</em> and <code>code</code>", "`"),
    ("See [the docs](https://example.org) now", '<a href="https://example.org"', "]("),
    ("An open **bol", "An open bol", "**"),   # the opening mark waits for its closer, unseen
    ("Ends on a mark **", "Ends on a mark ", "**"),
    ("Open `cod", "Open cod", "`"),
    ("Intro\n- first\n- sec", "<li>sec", "- sec"),
    ("Intro\n1.", "<p>Intro", "1."),         # a list marker alone waits for its item
    ("Intro\n```pyth", "<p>Intro", "```"),   # so does a fence's opening line
    ("## A head", "<h2>A head", "##"),
    ("<script>alert(1)</script> & [x](javascript:alert(1))", "&lt;script&gt;", "<script>"),
])
def test_the_unfinished_block_renders_closed_marks_and_hides_open_ones(text, shown, hidden):
    """Closed marks render; an unclosed ** or ` never shows, nor at the end; escaped as finished blocks are."""
    fragment, _ = rendered(text)
    assert shown in fragment and hidden not in fragment.split('<span class="tail-end">')[0]
    assert 'href="javascript' not in fragment


def test_the_tokens_go_on_inside_the_last_element_after_the_spaces_markdown_drops():
    """The tail-end sits inside the last paragraph, after a closed <strong>, holding the trailing space."""
    fragment, rest = rendered("Say **this** ")
    assert fragment.startswith('<p>Say <strong>this</strong><span class="tail-end"> </span></p>') and rest == " "
    fragment, rest = rendered("- a\n- b and")
    assert '<li>b and<span class="tail-end"></span></li>' in fragment


def test_an_open_fence_is_a_code_box_of_its_first_line_with_the_code_as_text():
    """Only the opening line is rendered (the bar, the language); the code so far is plain text in the box."""
    fragment, rest = rendered("```python\nx = 1 < 2\ny = ", "```")
    assert '<span class="lang">python</span>' in fragment and "```" not in fragment
    assert '<pre tabindex="0"><code class="language-python"><span class="tail-end">x = 1 &lt; 2\ny = </span></code></pre>' \
        in fragment and rest == "x = 1 < 2\ny = "


class Reader:
    """A connected reader that keeps the frames it is handed."""

    def __init__(self):
        self.frames = []

    def put(self, frame, direct=True):
        """Keep a frame."""
        self.frames.append(frame)

    def tails(self):
        """The tail frames so far."""
        return [f for f in self.frames if f.startswith(b"event: tail")]


def test_tails_are_rate_limited_and_the_last_one_follows_when_the_tokens_stop(monkeypatch):
    """A burst of marked tokens gives one tail at once, then one more, later, with the text as it ends."""
    monkeypatch.setattr(chat.settings, "max_tokens_per_second", 0)
    stream, reader = chat.Stream("s1", []), Reader()
    stream.readers.add(reader)
    for n in range(50):
        stream.token("message", f" **w{n}**")
    assert len(reader.tails()) == 1
    wait_until(lambda: len(reader.tails()) == 2, timeout=2, what="the tail after the burst")
    assert "<strong>w49</strong>" in reader.tails()[-1].decode()
    gevent.sleep(chat.TAIL_EVERY * 2)
    assert len(reader.tails()) == 2  # nothing more to send


def test_a_block_past_the_limit_stays_plain_and_a_fence_never_renders_its_code_again(monkeypatch):
    """Bounded: past TAIL_LIMIT bytes no tail is made; inside an open fence, tokens make no tails."""
    monkeypatch.setattr(chat.settings, "max_tokens_per_second", 0)
    monkeypatch.setattr(chat, "TAIL_EVERY", 0)
    monkeypatch.setattr(chat, "TAIL_SHARE", 0)
    stream, reader = chat.Stream("s2", []), Reader()
    stream.readers.add(reader)
    stream.token("message", "word " * (chat.TAIL_LIMIT // 5) + "**x**")
    assert stream.tail() is None and not reader.tails()
    stream.token("message", "\n\n```py\n")
    count = len(reader.tails())
    assert count and 'class="language-py"' in reader.tails()[-1].decode()
    for n in range(20):
        stream.token("message", f"x_{n} = `**{n}**`\n")
    assert len(reader.tails()) == count


def test_tails_stream_between_the_logged_events_and_a_reconnect_gets_one_at_once(server, upstream, open_sse):
    """Live: tails show the closed bold and an open fence's box; message, block and done events are as before.
    A reconnect with Last-Event-ID replays the logged events exactly once, then the tail as it stands."""
    parts = ["Intro **bold** here.", "\n\n", "Then **clos", "ed** and", " `cod", "e` and", " **op"]
    body = answer(*parts, "en**.", "\n\n```py\n", "x = 1\n", "y", "```\n")
    upstream.serve(body, pause_at=after_event(body, b'" **op"'))
    stream_id = post_prompt(server)
    reader = open_sse(stream_id)
    first = reader.read_until(
        lambda t: t.message.endswith(" **op") and t.tails and " op" in t.tails[-1].data, what="the tail so far")
    last = first.tails[-1].data
    assert "<strong>closed</strong> and <code>code</code> and op" in last and "**" not in last
    assert [e.event for e in first.events] == ["message"] * 3 + ["block"] + ["message"] * 4
    assert re.search(rb"\n\nevent: tail\n", first.raw) and not re.search(rb"id: \d+\nevent: tail", first.raw)

    again = open_sse(stream_id, last_event_id=3).read_until(lambda t: t.tails, what="the tail on reconnect")
    assert again.events == [e for e in first.events if e.id > 3]
    assert "<strong>closed</strong>" in again.tails[0].data

    upstream.release()
    live = reader.read_until(lambda t: t.finished, what="done")
    assert live.message == "".join(parts) + "en**.\n\n```py\nx = 1\ny```\n"
    assert '<span class="lang">py</span>' in "".join(t.data for t in live.tails)  # the open fence's box
    assert "<strong>open</strong>" in live.done
