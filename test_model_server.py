from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# The model server as the page sees it: its first listed model is the default, an answer it ends without a word says
# so, and a server that cannot be reached is shown before anything is sent, until it is back. A fake upstream on
# loopback answers /v1/models and the chat requests.

import pytest  # noqa: E402

import chat  # noqa: E402
from testkit import (  # noqa: E402
    DONE, FakeUpstream, ROLE, answer, elements, notes, read_events, relay, send_in, wait_until)

EMPTY = "The model server ended the answer without any text"


def test_the_default_model_is_the_first_the_server_lists(client, upstream, monkeypatch):
    """LiteLLM lists its models in its config's order: the first is the default, not the alphabetically first."""
    monkeypatch.setattr(chat.settings, "model", None)
    upstream.models = [{"object": "list", "data": [{"id": m, "object": "model"} for m in ("zeta", "alpha", "mid")]}]
    client.get("/")
    wait_until(lambda: chat.catalog.ids, what="the model list")
    page = client.get("/").text
    assert [o.attrs["value"] for o in elements(page, "option")] == ["zeta", "alpha", "mid"]
    assert [o.attrs["value"] for o in elements(page, "option", selected=None)] == ["zeta"]
    assert chat.catalog.default() == "zeta"
    read_events(client, send_in(client, "hi")[0])
    assert upstream.last.json["model"] == "zeta"


@pytest.mark.parametrize("body", [ROLE + DONE, ROLE, b""], ids=["done-marker", "clean-end", "nothing"])
def test_an_answer_ended_without_text_says_so_and_is_left_out_later(client, upstream, body):
    """No text, no reasoning, no finish reason ([DONE] or a clean end): a note, not a silent empty bubble; the next
    question goes upstream without it (llama-cpp-python ends an interrupted request this way)."""
    upstream.serve(body)
    stream_id, conversation = send_in(client, "first")
    transcript = read_events(client, stream_id)
    assert [n for n in notes(transcript.done) if EMPTY in n] and not any("incomplete" in n for n in notes(transcript.done))
    assert EMPTY in client.get(f"/c/{conversation}").text  # kept with the answer
    upstream.serve(answer("Hi."))
    read_events(client, send_in(client, "second", conversation)[0])
    assert upstream.last.json["messages"] == [{"role": "user", "content": "second"}]


def test_an_answer_with_text_or_a_finish_reason_has_no_such_note(client, upstream):
    """The note is for a server that said nothing at all: a normal answer, or one stopped by its length, has none."""
    assert not any(EMPTY in n for n in notes(relay(client).done))
    upstream.serve(answer(finish="length"))
    assert not any(EMPTY in n for n in notes(relay(client).done))


def notice(page):
    """The text of the model server notice in #model-server (role="status"), or None when there is none."""
    (region,) = elements(page, "div", id="model-server")
    assert region.attrs["role"] == "status"
    found = elements(page, "p", cls="down")
    return found[0].text if found else None


def page_once_listed(client):
    """The page after the background fetch of /models has answered (or failed)."""
    client.get("/")
    wait_until(lambda: chat.catalog.fetched_at is not None and chat.catalog.fetching is None, timeout=5,
               what="the model list fetch")
    return client.get("/").text


@pytest.mark.parametrize("failure, cause", [("refused", "connection refused"), (503, "it answered 503"),
                                            ("hang", "timed out")])
def test_the_page_says_when_the_model_server_cannot_be_reached(client, monkeypatch, failure, cause):
    """Refused, timed out or 5xx on /models: a visible notice names the server (no credentials) before any send."""
    monkeypatch.setattr(chat, "MODELS_DEADLINE", 0.3)
    fake = FakeUpstream()
    try:
        fake.models = [failure]
        port = 9 if failure == "refused" else fake.server.server_port  # 9: discard, nothing listens
        monkeypatch.setattr(chat.settings, "base_url", f"http://me:s3cret@127.0.0.1:{port}/v1?key=s3cret")
        page = page_once_listed(client)
    finally:
        fake.stop()
    assert notice(page) == (f"Cannot reach the model server at http://127.0.0.1:{port}/v1 ({cause}), so nothing can "
                            "be answered now. chat.py keeps trying; this notice goes away when the server is back.")
    assert "s3cret" not in page
    (shown,) = elements(page, "p", cls="down")
    assert "visually-hidden" not in page.split('id="model-server"')[1].split(">")[0]
    assert shown.attrs["hx-get"] == "/model-server" and shown.attrs["hx-trigger"] == "every 15s"


def test_the_notice_comes_with_the_model_options_when_the_first_fetch_is_slow(client, upstream, monkeypatch):
    """The page is served before the first fetch ends; its select loads /model-options, which brings the notice."""
    monkeypatch.setattr(chat, "MODELS_DEADLINE", 0.3)
    upstream.models = ["hang"]
    assert notice(client.get("/").text) is None  # not known yet, and the page does not wait
    options = client.get("/model-options").text  # waits for the fetch to give up
    (region,) = elements(options, "div", id="model-server")
    assert region.attrs["hx-swap-oob"] == "innerHTML" and "Cannot reach the model server" in region.text


def test_the_notice_clears_when_the_server_is_back(client, upstream, monkeypatch):
    """/model-server (what the notice polls) answers the notice while the server is down, then nothing."""
    monkeypatch.setattr(chat, "MODELS_RETRY", 0)
    upstream.models = [503, 503, 503, FakeUpstream.MODELS]
    assert "Cannot reach" in notice(page_once_listed(client))  # the first answer; the page asked again
    wait_until(lambda: chat.catalog.fetching is None, timeout=5, what="the page's own second fetch")
    assert "Cannot reach" in client.get("/model-server").text  # the third: still down
    assert client.get("/model-server").text == ""  # the fourth: back, and the notice goes (no trigger is left)
    assert notice(client.get("/").text) is None


@pytest.mark.parametrize("answer_", [401, 404, FakeUpstream.MODELS])
def test_no_notice_when_the_server_answers(client, upstream, answer_):
    """A server that answers /models at all (even 401, or 404 without the route) is reachable: no notice."""
    upstream.models = [answer_]
    assert notice(page_once_listed(client)) is None


def test_no_notice_for_the_demo_model(client, monkeypatch):
    """The built-in demo model is always there."""
    monkeypatch.setattr(chat.settings, "base_url", None)
    assert notice(client.get("/").text) is None and client.get("/model-server").text == ""
