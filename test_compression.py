from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# gzip: pages, htmx fragments and static files of 1 KB or more go compressed to a client that accepts gzip, and
# as they are to one that does not; an event stream, a page that streams a live answer and images never are.
# Checked on a real gevent server on loopback, by the bytes on the wire.

import gzip  # noqa: E402
import os  # noqa: E402
import urllib.parse  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

import chat  # noqa: E402
from testkit import SLOW_ANSWER, answer, choice, data, db_rows, post_prompt, wait_until, web  # noqa: E402


def fetch(url, encoding, method="GET", **kwargs):
    """(response, the body's bytes as sent) for a request with this Accept-Encoding (None: the header left out)."""
    response = web.request(method, url, headers={"Accept-Encoding": encoding, **kwargs.pop("headers", {})},
                           stream=True, timeout=10, **kwargs)
    return response, response.raw.read(decode_content=False)


def assert_gzipped(url, method="GET", **kwargs):
    """The answer is gzipped for gzip, the same bytes uncompressed for identity, and says it varies; its bytes."""
    plain, body = fetch(url, "identity", method, **kwargs)
    packed, raw = fetch(url, "gzip, deflate, br", method, **kwargs)
    assert plain.status_code == packed.status_code == 200 and len(body) >= 1024, (plain.status_code, len(body))
    assert "Content-Encoding" not in plain.headers and plain.headers["Vary"] == "Accept-Encoding"
    assert packed.headers["Content-Encoding"] == "gzip" and packed.headers["Vary"] == "Accept-Encoding"
    assert int(packed.headers["Content-Length"]) == len(raw) < len(body)
    assert gzip.decompress(raw) == body
    return body


def finished_conversation(server):
    """A new conversation with its one answer finished; its id."""
    stream_id = post_prompt(server, "hi")
    stream = chat.streams.get(stream_id)
    wait_until(lambda: stream.finished, timeout=10, what="the answer")
    web.get(f"{server}/", timeout=5)  # asks for the model list: the page is the same each time once it is known
    wait_until(lambda: chat.catalog.ok, what="the model list")
    return stream.conversation_id


def test_pages_fragments_and_static_files_are_gzipped_when_accepted(server, upstream):
    """A conversation's page, an htmx fragment (its messages) and htmx.min.js go gzipped; the bytes are the same."""
    upstream.serve(answer("A long answer, word after word. " * 60))
    conversation = finished_conversation(server)
    assert "A long answer" in assert_gzipped(f"{server}/c/{conversation}").decode()
    (answer_id,) = db_rows("SELECT id FROM messages WHERE role = 'assistant'")[0]
    fragment = assert_gzipped(f"{server}/c/{conversation}/branch", "POST", data={"to": answer_id}).decode()
    assert "<html" not in fragment and "A long answer" in fragment
    with open(os.path.join(chat.STATIC, "htmx.min.js"), "rb") as script:
        assert assert_gzipped(f"{server}/static/htmx.min.js") == script.read()


@pytest.mark.parametrize("header, takes", [
    (None, False), ("", False), ("identity", False), ("br, deflate", False), ("gzip;q=0", False),
    ("gzip; q=0.0, deflate", False), ("*;q=0", False), ("gzip;q=0, *", False),
    ("gzip", True), ("GZIP", True), ("deflate, gzip;q=0.5", True), ("*", True), ("x-gzip", True),
    ("br;q=1.0, gzip;q=0.8, *;q=0.1", True)])
def test_accept_encoding_is_read_with_its_q_values(header, takes):
    """Unit: gzip is used when the header names it (or *, if it does not name gzip) with a q above 0."""
    assert chat.accepts_gzip({} if header is None else {"HTTP_ACCEPT_ENCODING": header}) is takes


def test_nothing_is_gzipped_for_a_client_that_refuses_it(server):
    """q=0 (or no gzip at all) gets the page as it is, still with Vary, so that a cache keeps both."""
    for header in ("gzip;q=0", "identity", "br"):
        response, body = fetch(f"{server}/", header)
        assert "Content-Encoding" not in response.headers and b"</html>" in body, header
        assert response.headers["Vary"] == "Accept-Encoding"


def test_events_a_streamed_page_small_answers_and_images_are_never_gzipped(server, upstream):
    """/events and the page that streams a live answer (no JavaScript) go as they are, and so do tiny answers and PNGs."""
    upstream.serve(SLOW_ANSWER, pause_at=data(choice({"content": ","})))
    sent = requests.post(f"{server}/streaming", data={"prompt": "hello"}, allow_redirects=False, timeout=5)
    plain = {"Cookie": "; ".join(f"{k}={v}" for k, v in sent.cookies.items()), "Accept": "text/html"}
    stream = next(iter(chat.streams.by_id.values()))
    wait_until(lambda: stream.text() == "Hello there,", what="the tokens before the pause")
    events = requests.get(f"{server}/events", params={"stream": stream.id}, stream=True, timeout=10,
                          headers={"Accept-Encoding": "gzip", "Cookie": plain["Cookie"]})
    page = requests.get(urllib.parse.urljoin(server, sent.headers["Location"]), stream=True, timeout=10,
                        headers={"Accept-Encoding": "gzip", **plain})
    with gevent.Timeout(5, AssertionError("the live page did not stream")):
        received = page.raw.read1(65536)  # the page before the answer arrives at once, as it is
    assert b"<!doctype html>" in received
    for streamed in (events, page):
        assert "Content-Encoding" not in streamed.headers and "Vary" not in streamed.headers
        assert streamed.headers["Transfer-Encoding"] == "chunked"
    upstream.release()
    assert b"</html>" in received + page.raw.read()  # read to its end: the live page finished
    assert b"event: done" in events.raw.read()
    for path in ("/healthz", "/static/screenshot-light.png"):
        response, _ = fetch(f"{server}{path}", "gzip")
        assert response.status_code == 200 and "Content-Encoding" not in response.headers, path


def test_static_files_are_gzipped_once_per_version_and_keep_their_etag(server, monkeypatch, tmp_path):
    """The gzipped bytes are kept per ETag (path, size, mtime): a changed file gets new ones; 304 still answers."""
    monkeypatch.setattr(chat, "STATIC", str(tmp_path))
    monkeypatch.setattr(chat, "_GZIPPED", {})
    script = tmp_path / "big.js"
    script.write_text("console.log('one');\n" * 200)
    url = f"{server}/static/big.js"
    assert assert_gzipped(url) == script.read_bytes()
    first, raw = fetch(url, "gzip")
    etag = first.headers["ETag"]
    assert list(chat._GZIPPED) == [etag] and chat._GZIPPED[etag] == raw  # kept, and served again from there
    again, _ = fetch(url, "gzip", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.headers["ETag"] == etag
    script.write_text("console.log('two');\n" * 300)
    os.utime(script, (1_000_000_000, 1_000_000_000))
    assert assert_gzipped(url) == script.read_bytes()  # a new version: new bytes, not the old ones
    second, _ = fetch(url, "gzip", headers={"If-None-Match": etag})
    assert second.status_code == 200 and second.headers["ETag"] != etag and len(chat._GZIPPED) == 2


def test_large_bodies_are_gzipped_off_the_hub_and_huge_ones_not_at_all(server, upstream, monkeypatch):
    """A page over GZIP_ON_HUB is compressed in a worker thread, the same bytes; one over GZIP_MAX goes as it is."""
    upstream.serve(answer(*[f"Paragraph {i}: some words that make a long page.\n\n" for i in range(2000)]))
    conversation = finished_conversation(server)
    url = f"{server}/c/{conversation}"
    assert len(assert_gzipped(url)) > chat.GZIP_ON_HUB
    monkeypatch.setattr(chat, "GZIP_MAX", chat.GZIP_ON_HUB)
    response, body = fetch(url, "gzip")
    assert "Content-Encoding" not in response.headers and body.rstrip().endswith(b"</html>")
