from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# The page in a real browser: Playwright driving Debian's Chromium against `python chat.py` as a
# subprocess and the fake upstream (the `live_chat` and `browser` fixtures start once for this module),
# and the page people expect: Markdown and math while streaming, no JavaScript needed, history.

import base64  # noqa: E402
import datetime  # noqa: E402
import html  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
from gevent.server import StreamServer  # noqa: E402

from testkit import (  # noqa: E402
    DONE, FINISH, HERE, ChatProcess, PageWatch, ROLE, after_event, answer, choice, data, wait_until, words)


# ---------------------------------------------------------------------------
# The page in a real browser: Playwright driving Debian's Chromium, against
# `python chat.py` as a subprocess and the fake upstream
# ---------------------------------------------------------------------------

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


def shown(scope=""):
    """JavaScript for the unfinished part of a live answer as shown (null if none): its rendered tail (which holds
    the tokens since its last render) or its plain tokens, trimmed; `scope` narrows to one bubble."""
    return (f"(l => l && [...l.children].filter(c => !c.matches('.blocks')).map(c => c.textContent).join('')"
            f".trim())(document.querySelector('{scope} .live'))")


def record_streamed_tokens(page):
    """From now on, keep every message payload the page receives (window.__tokens)."""
    page.evaluate("""() => { window.__tokens = [];
      document.body.addEventListener('htmx:sseBeforeMessage', e => {
        if (e.detail.type === 'message') window.__tokens.push(e.detail.data); }); }""")


def streamed_text(page):
    """The text of every message token the page received, in order."""
    return "".join(html.unescape(re.fullmatch(r"<span>(.*)</span>", t, re.S).group(1))
                   for t in page.evaluate("window.__tokens"))


@pytest.mark.both_deployments
def test_page_shows_tokens_while_the_upstream_streams(open_page, page_upstream):
    """A prefix of the answer is on the page before the upstream finishes, spaces between tokens intact."""
    body = answer("Hello", " there", ",", " my", " friend", "!")
    reply = page_upstream.serve(body, pause_at=after_event(body, b'" there"'))
    page = open_page().page
    stream_id = type_and_send(page, "Say hello")
    page.wait_for_function(f"() => {shown()} === 'Hello there'")
    assert not page_upstream.last.answered.is_set() and not reply.gate.is_set()
    page_upstream.release()
    bubble = finished_bubble(page, stream_id)
    assert bubble.locator(".content").inner_text() == "Hello there, my friend!"


@pytest.mark.both_deployments
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
        page.wait_for_function(f"() => {shown()}?.endsWith(' w19')")
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


@pytest.mark.both_deployments
def test_stop_closes_the_upstream_and_keeps_the_partial_answer(open_page, page_upstream):
    """Stop mid-answer: the upstream sees its connection closed within a second; the bubble says stopped."""
    body = answer("Partial", " answer", " then", " more")
    page_upstream.serve(body, hang_at=after_event(body, b'" answer"'))
    page = open_page().page
    stream_id = type_and_send(page, "go")
    page.wait_for_function(f"() => {shown()} === 'Partial answer'")
    page.get_by_role("button", name="Stop generating").click()
    wait_until(page_upstream.last.client_closed.is_set, timeout=1.0, what="the upstream to see its connection closed")
    bubble = finished_bubble(page, stream_id)
    assert bubble.locator(".content").inner_text() == "Partial answer"
    assert bubble.locator(".note").inner_text() == "Stopped."


@pytest.mark.both_deployments
def test_send_becomes_stop_while_an_answer_streams(open_page, page_upstream):
    """One answer at a time: while it streams Send is Stop, Enter sends nothing, Escape stops it; then Send is back."""
    body = answer("Alpha", " beta", " gamma.")
    page_upstream.serve(body, pause_at=after_event(body, b'" beta"'))
    page = open_page().page
    first = type_and_send(page, "one")
    page.wait_for_function(f"() => {shown()} === 'Alpha beta'")
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
        tab.wait_for_function(f"() => {shown()} === 'Tab answer'")
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
    page.wait_for_function(f"() => {shown()}?.includes('line 039')")
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
        page.wait_for_function(f"() => {shown()}?.endsWith('roots are')")
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

@pytest.mark.both_deployments
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
    page.wait_for_function(f"() => {shown()}?.endsWith(' r14')")
    before = page.evaluate(shown())
    assert re.search(r"/c/[\w-]+$", page.url), "the new conversation's URL was pushed"
    page.reload()
    page.wait_for_function(f"() => {shown()}?.endsWith(' r14')")
    assert page.evaluate(shown()) == before
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
    page.wait_for_function(f"() => {shown()} === 'Mine'")
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


# ---------------------------------------------------------------------------
# Conversations people expect: edit, branches, search, parameters
# ---------------------------------------------------------------------------

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
    page.wait_for_function(f"() => {shown(f'#answer-{stream_id}')} === 'More te'")
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
    page.wait_for_function(f"() => {shown(f'#answer-{stream_id}')}?.endsWith('few tokens.')")
    page.wait_for_timeout(200)  # nothing more is coming before done: let the last events settle
    live = page.locator(f"#answer-{stream_id}.streaming .content")
    before_text, before_height = live.inner_text(), live.bounding_box()["height"]
    tail = page.evaluate(shown(f"#answer-{stream_id}"))
    page_upstream.release()
    done = finished_bubble(page, stream_id).locator(".content")
    after_text, after_height = done.inner_text(), done.bounding_box()["height"]
    assert tail == "The last paragraph is plain text, and it streams in a few tokens.", \
        "only the unfinished last paragraph is outside the finished blocks"
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
        page.wait_for_url(re.compile(r"/\?deleted=[\w-]+$"))  # a new chat offering Undo (issue 23): a form too
        assert page.locator("#conversation-list a").all_inner_texts() == ["a newer one"]
        page.get_by_role("button", name="Undo").click()
        page.wait_for_url(conversation_url)
        assert page.locator("#conversation-list a").all_inner_texts() == ["a newer one", "Renamed without scripts"]
        page.get_by_role("link", name="Delete conversation").click()
        page.get_by_role("button", name="Delete it").click()
        page.wait_for_url(re.compile(r"/\?deleted=[\w-]+$"))
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
    page.locator(".msg.assistant.streaming .live").filter(has_text="Second").wait_for()
    page.reload()
    page.locator(".msg.assistant").wait_for()
    assert page.locator(".msg.assistant.streaming .live").filter(has_text="Second").count() == 1, \
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
    page.wait_for_url(re.compile(r"/\?deleted=[\w-]+$"))  # a new chat, offering Undo (issue 23)
    body = answer("Fresh", " start.")
    page_upstream.serve(body, pause_at=after_event(body, b'"Fresh"'))
    type_and_send(page, "a new one")
    page.locator(".msg.assistant.streaming .live").filter(has_text="Fresh").wait_for()
    page.reload()
    page.locator(".msg.assistant").wait_for()
    assert page.locator(".msg.assistant.streaming .live").filter(has_text="Fresh").count() == 1, \
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
    page.wait_for_function(f"() => {shown()}?.endsWith(' b5')")
    conversation_url = page.url
    page.get_by_role("link", name="New chat").click()
    page.wait_for_url(live_chat.url + "/")
    page.locator(".msg").first.wait_for(state="detached")
    page.go_back()
    page.wait_for_url(conversation_url)
    page.wait_for_function(f"() => {shown()}?.endsWith(' b5')")
    page.wait_for_timeout(300)  # an observation window for a second copy arriving
    assert page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg.user").count() == 1
    assert page.evaluate(shown()) == "".join(parts[:6]).strip()
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
    assert page.evaluate("() => document.activeElement.id === 'stop-answer'"), \
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
# Attachments: picked, pasted or dropped files, previewed, sent and shown again
# ---------------------------------------------------------------------------

def tiny_png(width=2, height=2):
    """A valid PNG of width × height red pixels, made here (no file, no library)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# In the page: a DataTransfer holding one File made from base64 bytes (as a clipboard or a drag carries it).
TRANSFER_JS = """([b64, name, type]) => { const dt = new DataTransfer();
  dt.items.add(new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type}));
  return dt; }"""


def image_loaded(page, selector, width):
    """Wait until the image at selector has loaded, width pixels wide."""
    page.wait_for_function("([s, w]) => { const i = document.querySelector(s); "
                           "return i && i.complete && i.naturalWidth === w; }", arg=[selector, width])


def test_a_pasted_image_and_a_dropped_file_show_before_and_after_a_reload(open_page, page_upstream):
    """A pasted screenshot and a dropped text file are previewed, sent with the question, and shown in the bubble,
    the image loaded, also after a reload; the composer lights up while the file is dragged over it."""
    import base64
    page_upstream.serve(answer("Seen."))
    watch = open_page()
    page = watch.page
    png = base64.b64encode(tiny_png()).decode()
    text = "line one\nline two <b>not bold</b>\n"
    page.focus("#prompt")
    pasted = page.evaluate(f"""([b64]) => {{ const dt = ({TRANSFER_JS})([b64, 'pixel.png', 'image/png']);
        const e = new ClipboardEvent('paste', {{clipboardData: dt, bubbles: true, cancelable: true}});
        document.getElementById('prompt').dispatchEvent(e); return e.defaultPrevented; }}""", [png])
    assert pasted is True  # files and no text: nothing else to paste
    over = page.evaluate(f"""([b64]) => {{ window.__drag = ({TRANSFER_JS})([b64, 'notes.txt', 'text/plain']);
        const target = document.querySelector('#composer .row');
        const events = ['dragenter', 'dragover'].map(name =>
          new DragEvent(name, {{dataTransfer: window.__drag, bubbles: true, cancelable: true}}));
        events.forEach(e => target.dispatchEvent(e));
        return {{accepted: events.every(e => e.defaultPrevented),
                 lit: document.getElementById('composer').classList.contains('dropping')}}; }}""",
                         [base64.b64encode(text.encode()).decode()])
    assert over == {"accepted": True, "lit": True}
    dropped = page.evaluate("""() => { const e = new DragEvent('drop', {dataTransfer: window.__drag, bubbles: true,
        cancelable: true}); document.querySelector('#composer .row').dispatchEvent(e); return e.defaultPrevented; }""")
    assert dropped is True
    assert not page.evaluate("document.getElementById('composer').classList.contains('dropping')")
    previews = page.locator("#attachment-previews .preview")
    assert previews.count() == 2
    image_loaded(page, "#attachment-previews img", 2)
    assert previews.nth(0).locator("img").get_attribute("alt") == "pixel.png"
    assert previews.nth(1).inner_text().startswith("notes.txt")
    assert page.get_by_role("button", name="Remove pixel.png").is_visible()
    assert page.get_by_role("button", name="Remove notes.txt").is_visible()
    assert page.evaluate("[...document.getElementById('attachment').files].map(f => f.name)") == \
        ["pixel.png", "notes.txt"]
    stream_id = type_and_send(page, "What is in these?")
    bubble = page.locator(".msg.user").last
    assert bubble.locator(".bubble").inner_text() == "What is in these?"
    assert page.evaluate("document.getElementById('attachment').files.length") == 0
    assert previews.count() == 0
    finished_bubble(page, stream_id)
    for when in ("sent", "reloaded"):
        bubble = page.locator(".msg.user").last
        thumb = bubble.locator(".attachments a.thumb")
        assert thumb.count() == 1, when
        assert thumb.locator("img").get_attribute("alt") == "pixel.png"
        image_loaded(page, ".msg.user .attachments .thumb img", 2)
        file = bubble.locator(".attachments details.file")
        assert file.locator(".file-name").inner_text() == "notes.txt"
        assert file.get_attribute("open") is None  # collapsed
        assert file.locator("pre").text_content() == text
        assert file.locator("b").count() == 0
        if when == "sent":
            assert re.search(r"/c/[\w-]+$", page.url)
            page.reload()
            page.wait_for_function("() => window.htmx && htmx.version")
    assert page.locator("#attachment-previews .preview").count() == 0
    assert watch.unexpected_errors() == []


def test_remove_in_the_attachment_previews_and_a_message_of_files_alone(open_page, page_upstream):
    """Remove drops one file from the input and moves the focus on; text still pastes as text; a message with a file
    and no words is sent; the hidden file input is reached by keyboard, its focus shown on its label."""
    page_upstream.serve(answer("A file."))
    watch = open_page()
    page = watch.page
    # The picker, by keyboard: Shift+Tab from the message box reaches the file input, and the label shows it.
    page.focus("#prompt")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "attachment"
    assert page.evaluate("getComputedStyle(document.querySelector('label.attach')).outlineStyle") == "solid"
    page.set_input_files("#attachment", [
        {"name": "a.txt", "mimeType": "text/plain", "buffer": b"first file\n"},
        {"name": "b.txt", "mimeType": "text/plain", "buffer": b"second file\n"}])
    previews = page.locator("#attachment-previews .preview")
    previews.nth(1).wait_for()
    page.get_by_role("button", name="Remove a.txt").click()
    page.wait_for_function("() => document.querySelectorAll('#attachment-previews .preview').length === 1")
    assert page.evaluate("[...document.getElementById('attachment').files].map(f => f.name)") == ["b.txt"]
    assert page.evaluate("document.activeElement.getAttribute('aria-label')") == "Remove b.txt"
    assert previews.inner_text().startswith("b.txt")
    # A real text paste still pastes its text, and attaches nothing.
    page.evaluate("navigator.clipboard.writeText('pasted words')")
    page.focus("#prompt")
    page.keyboard.press("Control+V")
    page.wait_for_function("() => document.getElementById('prompt').value === 'pasted words'")
    assert previews.count() == 1
    page.fill("#prompt", "")
    page.press("#prompt", "Enter")
    bubble = page.locator(".msg.user")
    bubble.wait_for()
    assert bubble.locator(".bubble").is_hidden()  # no words, only the file
    assert bubble.locator(".attachments .file-name").inner_text() == "b.txt"
    assert bubble.locator(".attachments pre").text_content() == "second file\n"
    assert previews.count() == 0
    assert page.locator(".msg.assistant.done .content").inner_text() == "A file."
    assert watch.posts("/streaming") == 1


# ---------------------------------------------------------------------------
# Shared links (issue 23)
# ---------------------------------------------------------------------------

DOT_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_a_shared_link_opens_without_cookies_and_revoke_makes_it_404(browser, open_page, page_upstream, live_chat,
                                                                     watches):
    """Share from one browser; another, with no cookie, opens the link: the answer rendered, the picture shown, no
    composer and no conversation list. Copy link copies it; after Revoke the other browser gets 404."""
    page_upstream.serve(answer("A **shared** answer"))
    page = open_page().page
    page.set_input_files("#attachment", [{"name": "dot.png", "mimeType": "image/png", "buffer": DOT_PNG}])
    finished_bubble(page, type_and_send(page, "Share this"))
    page.get_by_role("button", name="Share").click()
    link = page.locator(".shares a")
    link.wait_for()
    url = link.get_attribute("href")
    assert url.startswith(live_chat.url + "/s/")
    page.get_by_role("button", name="Copy link").click()
    page.wait_for_function("() => document.activeElement.textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == url
    visitor = browser.new_context(viewport={"width": 1000, "height": 700})
    try:
        watch = PageWatch(visitor.new_page())
        watches.append(watch)
        watch.allowed_errors.append("status of 404")  # Chromium logs the 404 it was asked to show
        shared = watch.page
        response = shared.goto(url)
        assert response.status == 200 and response.headers["x-robots-tag"] == "noindex"
        assert shared.locator(".msg.assistant strong").inner_text() == "shared"
        assert shared.locator(".msg.user .bubble").inner_text() == "Share this"
        shared.wait_for_function("() => document.querySelector('.msg.user img').naturalWidth > 0")
        assert shared.locator("#prompt, #composer, nav, form, .conversation-actions").count() == 0
        assert visitor.cookies() == []
        page.get_by_role("button", name="Revoke").click()
        page.locator(".shares").wait_for(state="detached")
        assert shared.reload().status == 404
        assert "revoked" in shared.locator("main").inner_text()
    finally:
        visitor.close()


# ---------------------------------------------------------------------------
# Times and the sidebar (issue 23): local times, the reader's days, search by keyboard
# ---------------------------------------------------------------------------

def test_times_are_shown_in_the_readers_zone_and_so_are_the_sidebars_days(browser, open_page, page_upstream):
    """In Kathmandu (UTC+5:45) a new message says "just now", its tooltip the local time of its <time datetime>;
    the page tells the server the zone (tz=345), and the sidebar's "Today" heading precedes the link."""
    ctx = browser.new_context(timezone_id="Asia/Kathmandu", locale="en-GB", viewport={"width": 1000, "height": 700})
    try:
        page = open_page(ctx).page
        page_upstream.serve(answer("It is late here."))
        finished_bubble(page, type_and_send(page, "what time is it"))
        times = page.locator("#chat-messages time")
        assert times.count() == 2 and times.all_inner_texts() == ["just now", "just now"]
        kathmandu = datetime.timezone(datetime.timedelta(hours=5, minutes=45))
        for n in range(2):
            utc = datetime.datetime.fromisoformat(times.nth(n).get_attribute("datetime").replace("Z", "+00:00"))
            assert utc.astimezone(kathmandu).strftime("%H:%M") in times.nth(n).get_attribute("title")
        assert {c["name"]: c["value"] for c in ctx.cookies()}["tz"] == "345"
        page.reload()
        assert page.locator("#conversation-list h2, #conversation-list a").all_inner_texts() == [
            "Today", "what time is it"]
        assert page.locator("#chat-messages time").all_inner_texts() == ["just now", "just now"]  # after a load too
    finally:
        ctx.close()


def test_search_lists_a_conversation_once_and_arrows_and_enter_open_a_result(open_page, page_upstream, live_chat):
    """A conversation found by its title and its answer is one result under "Results"; ArrowDown from the search box
    walks the results, ArrowUp goes back, Enter opens the one focused."""
    page = open_page().page
    for prompt in ("zebra facts", "more zebra facts"):
        page.get_by_role("link", name="New chat").click()
        page.wait_for_url(live_chat.url + "/")
        # The new page is swapped in after its URL changes: typed before that, the words would go with the old one.
        page.wait_for_function("() => document.activeElement.id === 'prompt' && !document.querySelector('.msg')")
        page_upstream.serve(answer(f"Zebras have stripes ({prompt})."))
        finished_bubble(page, type_and_send(page, prompt))
    page.get_by_role("link", name="New chat").click()
    page.wait_for_url(live_chat.url + "/")
    page.wait_for_function("() => document.activeElement.id === 'prompt'")
    page.keyboard.press("Control+k")
    page.keyboard.type("zebra")
    results = page.locator("#search-results a")
    page.wait_for_function("() => document.querySelectorAll('#search-results a').length === 2")
    assert page.get_by_role("heading", name="Results").is_visible()
    hrefs = [results.nth(n).get_attribute("href") for n in range(2)]
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    assert page.evaluate("document.activeElement.getAttribute('href')") == hrefs[1]
    page.keyboard.press("ArrowUp")
    assert page.evaluate("document.activeElement.getAttribute('href')") == hrefs[0]
    page.keyboard.press("Enter")
    page.wait_for_url(live_chat.url + hrefs[0])
    assert page.locator("#conversation-title").inner_text() in ("zebra facts", "more zebra facts")


# ---------------------------------------------------------------------------
# Issue 23, the front end: the phone drawer, Jump to latest, shortcuts, the console, accessibility, polish
# ---------------------------------------------------------------------------

PHONE = dict(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True)
CSP_WATCH = """window.__csp = []; document.addEventListener('securitypolicyviolation', e =>
    window.__csp.push(e.violatedDirective + ' ' + e.sourceFile + ':' + e.lineNumber + ' ' + e.sample));"""
# WCAG's contrast ratio between an element's text colour and the nearest opaque background behind it.
CONTRAST = """el => {
  const rgb = s => s.match(/[\\d.]+/g).map(Number);
  const lum = c => { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; }); return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  let bg = el; while (bg && rgb(getComputedStyle(bg).backgroundColor)[3] === 0) bg = bg.parentElement;
  const a = lum(rgb(getComputedStyle(el).color)), b = lum(rgb(getComputedStyle(bg || document.body).backgroundColor));
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); }"""


def tap_send(page, prompt):
    """Send by the button (on a touch screen Enter is a newline); wait for the answer to finish."""
    before = page.locator(".msg.assistant.done").count()
    page.fill("#prompt", prompt)
    page.locator("#send").tap()
    page.locator(".msg.assistant.done").nth(before).wait_for()


def test_on_a_phone_the_menu_button_opens_the_list_as_a_drawer(browser, open_page, page_upstream, live_chat):
    """≤ 700 px: a header button (aria-controls, aria-expanded) opens the list over the page, links in view;
    Escape, a tap beside it or a link close it, the focus goes in and back; New chat is in the header."""
    ctx = browser.new_context(**PHONE)
    try:
        page = open_page(ctx=ctx).page
        for n in range(3):
            page_upstream.serve(answer(f"Answer {n}."))
            tap_send(page, f"phone question {n}")
            if n < 2:
                page.locator(".top .new-top").tap()
                page.wait_for_url(live_chat.url + "/")
        header = page.locator("header.top")
        menu = header.locator("button[aria-controls]")
        assert menu.is_visible() and menu.get_attribute("aria-expanded") == "false"
        drawer = page.locator("#" + menu.get_attribute("aria-controls"))
        assert drawer.locator("a[href^='/c/']").count() == 3
        assert not drawer.is_visible()  # the chat comes first
        assert header.get_by_role("link", name="New chat").is_visible()
        placeholder = page.locator("#prompt").get_attribute("placeholder")
        assert "button" in placeholder and "Enter" not in placeholder

        menu.tap()
        expect_attr = "() => document.querySelector('header .menu').getAttribute('aria-expanded')"
        assert page.evaluate(expect_attr) == "true"
        assert drawer.evaluate("e => getComputedStyle(e).position") == "fixed"
        page.wait_for_function("() => document.getElementById('sidebar').contains(document.activeElement)")
        for link in drawer.locator("#conversation-list a").all():
            box = link.bounding_box()
            assert link.is_visible() and 0 <= box["y"] and box["y"] + box["height"] <= 844, box
        page.keyboard.press("Escape")
        page.wait_for_function(expect_attr + " === 'false'")
        assert not drawer.is_visible()
        page.wait_for_function("() => document.activeElement.matches('header .menu')")
        # A tap beside the drawer closes it and does nothing else.
        menu.tap()
        drawer.wait_for()
        page.mouse.click(380, 600)
        drawer.wait_for(state="hidden")
        assert page.evaluate(expect_attr) == "false"
        # A conversation link opens that conversation; the drawer is gone with the old page.
        menu.tap()
        first = drawer.locator("#conversation-list a").last
        href = first.get_attribute("href")
        page.evaluate("""() => { const old = document.getElementById('sidebar'); window.__reopened = false;
          new MutationObserver(() => { const nav = document.getElementById('sidebar');
            if (nav && nav !== old && nav.classList.contains('open')) window.__reopened = true; })
          .observe(document.body, {subtree: true, childList: true, attributes: true}); }""")
        first.tap()
        page.wait_for_url(live_chat.url + href)
        page.locator(".msg.user .bubble", has_text="phone question 0").wait_for()
        page.locator("#sidebar").wait_for(state="hidden")
        assert page.evaluate(expect_attr) == "false"
        assert page.evaluate("window.__reopened") is False  # not even while htmx settles the new page
        assert page.evaluate("document.scrollingElement.scrollWidth") <= 390
    finally:
        ctx.close()


def test_without_javascript_the_phone_list_stays_and_no_placeholder_promises_enter(browser, live_chat, watches):
    """No script on a phone: no dead menu button, the folded list is there; the placeholder says nothing of Enter."""
    watch, ctx = no_js_page(browser, live_chat, watches, viewport={"width": 390, "height": 844})
    try:
        page = watch.page
        assert not page.locator("header .menu").is_visible()
        assert page.locator("#sidebar summary", has_text="Conversations").is_visible()
        assert page.locator("#prompt").get_attribute("placeholder") == "Message"
    finally:
        ctx.close()


def test_desktop_placeholder_says_enter_sends_and_the_menu_button_is_hidden(open_page):
    """A mouse and keyboard: Enter sends, Shift+Enter is a newline; the sidebar is beside the chat, no menu button."""
    page = open_page().page
    page.wait_for_function("() => document.getElementById('prompt').placeholder.includes('Enter to send')")
    assert "Shift+Enter" in page.locator("#prompt").get_attribute("placeholder")
    assert not page.locator("header .menu").is_visible() and page.locator("#sidebar").is_visible()


def test_jump_to_latest_shows_a_screen_above_the_end(open_page, page_upstream):
    """Scrolled up more than a screen: a "Jump to latest" button takes the reader down and hides at the bottom;
    while an answer streams it appears and the reader stays where they scrolled."""
    page = open_page().page
    page.set_viewport_size({"width": 800, "height": 400})
    page_upstream.serve(answer(*LONG_ANSWER))
    finished_bubble(page, type_and_send(page, "long"))
    jump = page.get_by_role("button", name=re.compile("latest"))
    page.wait_for_function(AT_BOTTOM)
    assert not jump.is_visible()
    page.mouse.wheel(0, -100_000)
    jump.wait_for()
    jump.click()
    page.wait_for_function(AT_BOTTOM)
    jump.wait_for(state="hidden")
    # Less than a screen up: no button yet.
    page.mouse.wheel(0, -200)
    page.wait_for_function("() => { const e = document.scrollingElement; "
                          "return e.scrollHeight - e.scrollTop - e.clientHeight > 100; }")
    assert not jump.is_visible()
    # Streaming: the reader who scrolled up stays put, and the button takes them down.
    page.mouse.wheel(0, 100_000)
    page.wait_for_function(AT_BOTTOM)
    body = answer(*LONG_ANSWER)
    reply = page_upstream.serve(body, pause_at=after_event(body, b'"line 039'))
    second = type_and_send(page, "again")
    page.wait_for_function("() => document.querySelector('.streaming .live').textContent.includes('line 039')")
    page.mouse.wheel(0, -100_000)
    page.wait_for_function("() => document.scrollingElement.scrollTop === 0")
    jump.wait_for()
    reply.gate.set()
    finished_bubble(page, second)
    assert page.evaluate("document.scrollingElement.scrollTop") == 0
    jump.click()
    page.wait_for_function(AT_BOTTOM)
    jump.wait_for(state="hidden")


def test_keyboard_shortcuts(open_page, page_upstream, live_chat):
    """? lists the shortcuts (not while typing); ArrowUp in the empty box edits the last message;
    Ctrl+K searches; Ctrl+Shift+O starts a new chat."""
    page = open_page().page
    for n in range(2):
        page_upstream.serve(answer(f"Answer {n}."))
        finished_bubble(page, type_and_send(page, f"question {n}"))
    page.locator("#prompt").focus()
    page.keyboard.type("why?")
    assert page.locator("#prompt").input_value() == "why?"
    assert not page.locator("#shortcuts").is_visible()
    page.locator("#prompt").fill("")
    page.evaluate("document.activeElement.blur()")
    page.keyboard.press("?")
    dialog = page.get_by_role("dialog", name="Keyboard shortcuts")
    dialog.wait_for()
    for shortcut in ("Ctrl + Shift + O", "Ctrl + K", "Escape", "↑", "Shift + Enter"):
        assert shortcut in dialog.inner_text(), shortcut
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")
    # ArrowUp in the empty box opens Edit on the last message of yours, its text ready.
    page.locator("#prompt").focus()
    page.keyboard.press("ArrowUp")
    edits = page.locator("#chat-messages .msg.user details.edit")
    page.wait_for_function("() => document.activeElement.matches('details.edit[open] textarea')")
    assert edits.last.evaluate("e => e.open") and not edits.first.evaluate("e => e.open")
    assert page.evaluate("document.activeElement.value") == "question 1"
    # Not in a box with text: the caret moves as usual.
    page.locator("#prompt").fill("a\nb")
    page.locator("#prompt").press("ArrowUp")
    assert page.evaluate("document.activeElement.id") == "prompt"
    page.keyboard.press("Control+k")
    page.wait_for_function("() => document.activeElement.id === 'search'")
    page.keyboard.press("Control+Shift+O")
    page.wait_for_url(live_chat.url + "/")
    page.wait_for_function("() => !document.querySelector('#chat-messages .msg')")


def test_follow_ups_log_no_console_errors_or_csp_violations(browser, open_page, page_upstream):
    """Several follow-ups with a table (its alignment), code, math, then Regenerate and Edit: no CSP violation."""
    ctx = browser.new_context(viewport={"width": 1000, "height": 700})
    ctx.add_init_script(CSP_WATCH)
    try:
        page = open_page(ctx=ctx).page
        table = "| left | right | centre |\n|:--|--:|:-:|\n| 1 | 2 | 3 |\n\n"
        for n in range(3):
            page_upstream.serve(answer(f"Answer {n}\n\n", table, "$x^2$ and **bold**\n\n```python\na or b\n```\n"))
            finished_bubble(page, type_and_send(page, f"follow-up {n}"))
        cell = page.locator(".msg.assistant.done td").nth(1)
        assert cell.evaluate("e => getComputedStyle(e).textAlign") == "right"
        page_upstream.serve(answer("Regenerated ", table))
        page.get_by_role("button", name="Regenerate this answer").click()
        page.locator(".msg.assistant.done .content", has_text="Regenerated").wait_for()
        page.reload()
        page.wait_for_function("() => window.htmx && htmx.version")
        page_upstream.serve(answer("After a reload ", table))
        finished_bubble(page, type_and_send(page, "one more"))
        assert page.evaluate("window.__csp") == []
    finally:
        ctx.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_code_contrast_scrollable_code_landmarks_and_roles(browser, open_page, page_upstream, scheme):
    """axe-core's rules of issue 23 by hand: highlighted code (operators too) reaches 4.5:1, code that scrolls
    sideways takes the keyboard focus, the composer is a landmark, the messages are a feed."""
    ctx = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme=scheme)
    try:
        page = open_page(ctx=ctx).page
        code = ("```python\n# a comment\n@decorator\ndef f(a, b):\n    return a or b and not a in [1, 2.5, 'x', \"y\"]"
                "  # " + "a very long line " * 8 + "\n```\n")
        page_upstream.serve(answer("Code:\n\n", code))
        finished_bubble(page, type_and_send(page, "code please"))
        spans = page.locator(".msg.assistant.done pre code span")
        assert page.locator(".msg.assistant.done pre code .ow").count() >= 3
        low = [(s.get_attribute("class"), s.inner_text(), round(s.evaluate(CONTRAST), 2)) for s in spans.all()
               if s.inner_text().strip() and s.evaluate(CONTRAST) < 4.5]
        assert low == []
        pre = page.locator(".msg.assistant.done pre")
        assert pre.evaluate("e => e.scrollWidth > e.clientWidth")  # it scrolls sideways on a phone
        assert pre.get_attribute("tabindex") == "0"
        pre.focus()
        page.keyboard.press("ArrowRight")
        page.wait_for_function("() => document.querySelector('.msg.assistant.done pre').scrollLeft > 0")
        assert page.get_by_role("form", name="Message").locator("textarea[name=prompt]").count() == 1
        assert page.locator("#chat-messages").get_attribute("role") == "feed"
        roles = page.locator("#chat-messages > .msg").evaluate_all("els => els.map(e => e.getAttribute('role'))")
        assert roles == ["article", "article"]
    finally:
        ctx.close()


def test_polish_sidebar_headings_math_and_dark_code(browser, open_page, page_upstream):
    """The sidebar is wider with no gutter beside the chat; an answer's h1 ranks below the conversation title;
    math is in the text's font; in dark the code background is grey like the bubble, not monokai's olive."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 800}, color_scheme="dark")
    try:
        page = open_page(ctx=ctx).page
        page_upstream.serve(answer("# A heading\n\nThe square $x^2$ here.\n\n```python\nx = 1\n```\n"))
        finished_bubble(page, type_and_send(page, "a long title for this conversation, long enough"))
        sidebar, main = page.locator("#sidebar").bounding_box(), page.locator("main").bounding_box()
        assert sidebar["width"] >= 18 * 16
        assert abs(main["x"] - (sidebar["x"] + sidebar["width"])) <= 1, (sidebar, main)
        title = page.locator("#conversation-list a").first
        assert title.evaluate("e => getComputedStyle(e).textOverflow") == "ellipsis"
        size = "e => parseFloat(getComputedStyle(e).fontSize)"
        assert page.locator(".msg.assistant h1").evaluate(size) < page.locator("#conversation-title").evaluate(size)
        math, text = page.locator(".msg.assistant math"), page.locator(".msg.assistant p", has=page.locator("math"))
        family = "e => getComputedStyle(e).fontFamily"
        assert math.evaluate(family) == text.evaluate(family)
        assert math.evaluate(size) >= text.evaluate(size)
        r, g, b = page.locator(".msg.assistant pre").evaluate(
            "e => getComputedStyle(e).backgroundColor.match(/\\d+/g).map(Number)")
        assert max(r, g, b) - min(r, g, b) <= 12, (r, g, b)  # grey, not olive
    finally:
        ctx.close()


def test_the_login_button_is_solid(browser, page_upstream, tmp_path, watches):
    """The login page's button is filled with the accent colour, not a thin outline."""
    app = ChatProcess(tmp_path / "chat.log", OPENAI_BASE_URL=page_upstream.url, CHAT_PASSWORD="secret",
                      NO_PROXY="127.0.0.1")
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        watches.append(PageWatch(page))
        page.goto(app.url + "/login")
        button = page.get_by_role("button", name="Log in")
        fill = button.evaluate("e => getComputedStyle(e).backgroundColor")
        page_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert fill != page_bg and fill not in ("rgba(0, 0, 0, 0)", "transparent"), fill
        assert button.evaluate(CONTRAST) >= 4.5
    finally:
        ctx.close()
        app.stop()


# ---------------------------------------------------------------------------
# Continue, Edit's Cancel and presets (issue 23)
# ---------------------------------------------------------------------------

def test_continue_grows_the_cut_answer_and_edit_cancel_folds_in_place(open_page, page_upstream):
    """Continue on an answer cut off by max tokens streams on in the same bubble, with one Stop on the page, and is
    one answer after a reload; Edit stays at the right edge when opened, and its Cancel folds the box unchanged."""
    page = open_page().page
    page_upstream.serve(answer("Once", " upon", finish="length"))
    finished_bubble(page, type_and_send(page, "Tell a story"))
    body = answer(" a", " time.")
    page_upstream.serve(body, pause_at=after_event(body, b'" a"'))
    page.get_by_role("button", name="Continue", exact=True).click()
    page.locator(".msg.assistant.streaming").filter(has_text="Once upon a").wait_for()
    assert page.get_by_role("button", name="Stop generating").count() == 1  # the composer's; the bubble's hides
    page_upstream.release()
    page.locator(".msg.assistant.done").filter(has_text="Once upon a time.").wait_for()
    assert page.locator(".msg.assistant").count() == 1 and page.get_by_role("button", name="Continue").count() == 0
    assert page_upstream.last.json["messages"][-1] == {"role": "assistant", "content": "Once upon"}
    page.reload()
    assert page.locator(".msg.assistant .content").all_inner_texts() == ["Once upon a time."]
    edit = page.locator(".msg.user details.edit")
    summary = edit.locator("summary")
    right = summary.bounding_box()["x"] + summary.bounding_box()["width"]
    summary.click()
    edit.locator("textarea").fill("Tell another story")
    assert abs(summary.bounding_box()["x"] + summary.bounding_box()["width"] - right) < 2  # it did not jump
    edit.get_by_role("link", name="Cancel").click()
    assert not edit.evaluate("e => e.open") and edit.locator("textarea").input_value() == "Tell a story"
    assert "#user-m" not in page.url  # folded in place: the link (for pages without JavaScript) was not followed




def test_presets_are_saved_used_and_deleted_and_the_summary_follows(open_page, page_upstream):
    """Enter in the preset's name saves it (not a send); Use fills the fields; the panel takes at most 40 % of the
    window; sending folds it and its summary lists what is set, as do changes before sending; Delete removes it."""
    page = open_page().page
    page.locator("#options-summary").click()
    page.fill("input[name=temperature]", "0.3")
    page.fill("#system", "Be brief")
    page.fill("#preset-name", "Brief")
    page.press("#preset-name", "Enter")
    page.locator("#preset").wait_for()
    assert page.locator("#preset").input_value() == "Brief" and page.locator(".msg").count() == 0
    page.fill("input[name=temperature]", "")
    page.fill("#system", "")
    page.get_by_role("button", name="Use", exact=True).click()
    page.wait_for_function("() => document.querySelector('input[name=temperature]').value === '0.3'")
    assert page.locator("#system").input_value() == "Be brief"
    assert page.locator("#options").bounding_box()["height"] <= 0.41 * page.viewport_size["height"]
    page_upstream.serve(answer("ok"))
    finished_bubble(page, type_and_send(page, "hi"))  # Enter in the message box sends, after a preset was saved
    assert page_upstream.last.json["temperature"] == 0.3 and not page.locator("#options").evaluate("e => e.open")
    assert page.locator("#options-summary").inner_text() == "Model and options · system prompt, temperature"
    page.locator("#options-summary").click()
    page.fill("input[name=max_tokens]", "5")
    page.locator("#options-summary").click()
    assert page.locator("#options-summary").inner_text().endswith("system prompt, temperature, max tokens")
    page.locator("#options-summary").click()
    page.get_by_role("button", name="Delete this preset").click()
    page.locator("#preset").wait_for(state="detached")


# ---------------------------------------------------------------------------
# The README's screenshots of issue 23: the phone drawer and a shared conversation
# ---------------------------------------------------------------------------

def keep_screenshot(page, folder, name):
    """Screenshot the page into the test's folder, and over the README's static/screenshot-NAME.png with
    CHAT_UPDATE_SCREENSHOT."""
    page.screenshot(path=str(folder / f"{name}.png"))
    if os.environ.get("CHAT_UPDATE_SCREENSHOT"):
        page.screenshot(path=str(HERE / "static" / f"screenshot-{name}.png"))


def test_screenshot_of_the_phone_drawer(browser, live_chat, page_upstream, tmp_path):
    """On a phone the drawer opens over a conversation, its titles under Pinned, Today, Yesterday and Previous 7 days
    (two conversations made older in chat.py's file); with CHAT_UPDATE_SCREENSHOT the README's picture is kept."""
    ctx = browser.new_context(**PHONE, device_scale_factor=1, timezone_id="UTC")
    try:
        page = ctx.new_page()
        page.set_default_timeout(10_000)
        watch = PageWatch(page)
        page.goto(live_chat.url + "/")
        page.wait_for_function("() => window.htmx && htmx.version")
        ids = []
        questions = ["Plan a three-day trip to Lisbon", "Why does my pytest fixture run twice?",
                     "A quick weeknight curry", "Summarise SQLite's WAL mode", "What does `a or b` return in Python?"]
        for n, question in enumerate(questions):
            if n:
                page.locator(".top .new-top").tap()
                page.wait_for_url(live_chat.url + "/")
            last = n == len(questions) - 1
            page_upstream.serve(answer("It returns `a` when `a` is truthy, else `b`:\n\n", "```python\n",
                                       "name = given or 'friend'\nprint(f'Hello, {name}!')\n", "```\n")
                                if last else answer(f"Answer {n}."))
            tap_send(page, question)
            ids.append(page.url.rsplit("/", 1)[1])
        now = datetime.datetime.now().timestamp()
        midnight = now // 86400 * 86400  # the browser's zone is UTC here: yesterday is yesterday whatever the hour
        with sqlite3.connect(live_chat.log_path.parent / "chat.db") as db:
            db.execute("UPDATE conversations SET pinned = ? WHERE id = ?", (now, ids[0]))
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (midnight - 86400 / 2, ids[1]))
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (midnight - 86400 * 3.5, ids[2]))
        page.reload()
        page.wait_for_function("() => window.htmx && htmx.version")
        page.locator("header .menu").click()  # a tap would leave the touch highlight in the picture
        drawer = page.locator("#sidebar")
        drawer.wait_for()
        headings = drawer.locator("#conversations").get_by_role("heading").all_inner_texts()
        assert headings == ["Pinned", "Today", "Yesterday", "Previous 7 days"], headings
        keep_screenshot(page, tmp_path, "phone-drawer")
        assert watch.unexpected_errors() == []
    finally:
        ctx.close()


def test_screenshot_of_a_shared_conversation(browser, open_page, page_upstream, tmp_path):
    """A shared link opened with no cookie at desktop width: the question and the rendered answer with code, and
    nothing else; with CHAT_UPDATE_SCREENSHOT the README's picture is kept."""
    page = open_page().page
    page_upstream.serve(answer("Count the words with a `Counter`, then take the **most common**:\n\n", "```python\n",
                               "from collections import Counter\n\n",
                               "def top_words(text, n=3):\n    words = text.lower().split()\n",
                               "    return Counter(words).most_common(n)\n", "```\n\n",
                               "| call | result |\n|:--|:--|\n| `top_words('a b a')` | `[('a', 2), ('b', 1)]` |\n"))
    finished_bubble(page, type_and_send(page, "How do I find the most common words in a text?"))
    page.get_by_role("button", name="Share").click()
    url = page.locator(".shares a").get_attribute("href")
    visitor = browser.new_context(viewport={"width": 1000, "height": 540}, device_scale_factor=1)
    try:
        shared = visitor.new_page()
        watch = PageWatch(shared)
        assert shared.goto(url).status == 200
        shared.locator(".msg.assistant pre code .kn").first.wait_for()
        assert shared.locator("#prompt, nav").count() == 0 and visitor.cookies() == []
        keep_screenshot(shared, tmp_path, "shared")
        assert watch.unexpected_errors() == []
    finally:
        visitor.close()


# ---------------------------------------------------------------------------
# The unfinished block renders too (issue 23)
# ---------------------------------------------------------------------------

def test_the_unfinished_block_renders_while_the_upstream_holds(open_page, page_upstream):
    """Held mid-paragraph: a closed **bold** is <strong> and an open ** is not shown; held in an open fence: the
    code streams in a monospace pre code box, no ``` shown; each done bubble has the same text."""
    body = answer("A paragraph with ", "**bold**", " words and an", " **op")
    page_upstream.serve(body, pause_at=after_event(body, b'" **op"'))
    page = open_page().page
    stream_id = type_and_send(page, "bold, held")
    tail = page.locator(f"#answer-{stream_id} .live .tail")
    tail.locator("p strong").filter(has_text="bold").wait_for()
    page.wait_for_function(f"() => {shown(f'#answer-{stream_id}')} === 'A paragraph with bold words and an op'")
    assert page.locator(f"#answer-{stream_id} .blocks .md-block").count() == 0  # all of it is the unfinished block
    page_upstream.release()
    finished_bubble(page, stream_id)

    body = answer("Here:\n\n", "```python\n", "x = 1\n", "y = ", "2")
    page_upstream.serve(body, pause_at=after_event(body, b'"2"'))
    stream_id = type_and_send(page, "code, held")
    code = page.locator(f"#answer-{stream_id} .live .tail pre code")
    code.filter(has_text="y = 2").wait_for()
    assert code.inner_text() == "x = 1\ny = 2"
    assert "mono" in code.evaluate("c => getComputedStyle(c).fontFamily")
    assert page.locator(f"#answer-{stream_id} .tail .code-bar .lang").inner_text() == "python"
    assert "```" not in page.locator(f"#answer-{stream_id} .content").inner_text()
    page_upstream.release()
    done = finished_bubble(page, stream_id)
    assert done.locator("pre code").inner_text() == "x = 1\ny = 2\n"
