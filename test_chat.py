from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# Tests for chat.py: a real loopback fake upstream replays the sample streams of
# testdata/streams byte for byte (whole, one byte per chunk, random chunk boundaries;
# chunked and close-delimited; with and without a charset), WIRE.md variations built as
# bytes here, SSE framing against SPEC §4, escaping, input limits, a real gevent server for
# everything that depends on timing, the built-in demo model, conversations and real model servers' quirks.
# The page in a browser, deployment, limits and scale-out have files of their own (docs/testing.md);
# the shared fakes are in conftest.py (fixtures) and testkit.py (classes and functions).
#
# Random chunk boundaries use a seed printed by each test (shown on failure); rerun with
# CHAT_TEST_SEED=<seed> to replay the same boundaries.

import contextlib  # noqa: E402
import html  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

import chat  # noqa: E402
from testkit import (  # noqa: E402
    API_KEY, ChatProcess, DONE, EXPECTED, Event, FINISH, FIRST, FakeUpstream, HERE, HTTP_FILES, HX, ROLE, SLOW_ANSWER,
    SSEReader, SSE_FILES, STREAMS_DIR, Transcript, after_event, alerts, answer, assert_no_active_markup,
    assert_resume_without_loss, assert_still_serving, choice, clean_env, cut_points, cuts_after, data, db_rows,
    elements, footer, free_port, htmx_app, notes, parse_sse, parse_stream, plain_app, post_prompt, read_events,
    reasoning_text, relay, send, send_in, shown_answer, source_text, wait_until, web)


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
    assert '<pre tabindex="0"><code class="language-python">' in bubble
    assert elements(bubble, "span", cls="k")  # pygments token classes: really highlighted
    assert alerts(bubble) == []
    assert "finish: stop" in footer(bubble)


def test_demo_endpoint_is_off_when_an_upstream_is_configured(client, upstream):
    """/demo/v1/chat/completions answers 404 once a real upstream is set."""
    client.post_json("/demo/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, status=404)


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
# Conversations: multi-turn, SQLite, owners, password (issue 4)
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
def test_answer_is_stored_with_its_facts(client, upstream):
    """The finished answer is stored with status, finish reason, usage, model and timing."""
    upstream.serve("openai-usage.sse")
    stream_id, conversation = send_in(client, "Hi")
    read_events(client, stream_id)
    (row,) = db_rows("SELECT content, status, finish_reason, usage, model, elapsed FROM messages "
                     "WHERE role = 'assistant'")
    assert row[:3] == ("The question is a classic.", "done", "stop")
    assert json.loads(row[3])["completion_tokens"] > 0 and row[4] and row[5] >= 0


@pytest.mark.both_databases
def test_user_message_is_stored_before_the_upstream_answers(client, upstream):
    """The user's words are in the database while the upstream has not said anything yet."""
    upstream.serve(answer("Late."), hang_at=0)
    stream_id, conversation = send_in(client, "Keep this safe")
    wait_until(lambda: upstream.requests, what="the upstream request")
    assert db_rows("SELECT role, content FROM messages ORDER BY id") == [
        ("user", "Keep this safe"), ("assistant", "")]
    assert chat.streams.stop(stream_id)


@pytest.mark.both_databases
def test_partial_answer_is_flushed_while_streaming(server, upstream):
    """An answer still streaming is in the database within about a second."""
    body = answer("Saved", " while", " streaming", " and more")
    upstream.serve(body, pause_at=after_event(body, b'" streaming"'))
    post_prompt(server, "flush")
    wait_until(lambda: db_rows("SELECT content FROM messages WHERE role = 'assistant'") ==
               [("Saved while streaming",)], timeout=3, what="the partial answer in the database")
    upstream.release()


@pytest.mark.both_databases
def test_killed_server_restarts_with_the_partial_answer(upstream, tmp_path):
    """SIGKILL mid-answer, restart on the same file: the conversation and the partial answer are there."""
    body = answer("Half", " an", " answer", " and", " the", " rest")
    upstream.serve(body, pause_at=after_event(body, b'" answer"'))
    # A lease of 2 s: the writer renews it each second, and its own housekeeping marked a 1 s lease interrupted
    # when a renewal came late (2 of 13 full runs under load).
    settings = dict(OPENAI_BASE_URL=upstream.url, CHAT_MODEL="test-model", CHAT_DB=chat.store.path or "unused.db",
                    CHAT_DATABASE_URL=chat.store.url or "", CHAT_LEASE_SECONDS="2")
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
def test_rename_changes_the_title(client, upstream):
    """Rename takes the title from hx-prompt and updates the sidebar entry out of band."""
    stream_id, conversation = send_in(client, "old title")
    read_events(client, stream_id)
    response = client.post(f"/c/{conversation}/rename", headers={"HX-Prompt": "  New <name>  "})
    assert "New &lt;name&gt;" in response.text and f'id="conv-{conversation}"' in response.text
    assert db_rows("SELECT title FROM conversations") == [("New <name>",)]
    client.post(f"/c/{conversation}/rename", headers={"HX-Prompt": "   "}, status=400)


@pytest.mark.both_databases
def test_delete_removes_the_rows(client, upstream):
    """Delete sends the page to a new chat (which offers Undo: issue 23, test_sidebar.py); the conversation is gone
    from its URL at once, and its rows when the trash is emptied."""
    stream_id, conversation = send_in(client, "delete me")
    read_events(client, stream_id)
    response = client.delete(f"/c/{conversation}")
    assert response.headers["HX-Redirect"] == f"/?deleted={conversation}"
    client.get(f"/c/{conversation}", status=404)
    assert chat.store.purge_trash(time.time() + chat.TRASH_SECONDS) == 1
    assert db_rows("SELECT count(*) FROM conversations") == [(0,)]
    assert db_rows("SELECT count(*) FROM messages") == [(0,)]
    client.get(f"/c/{conversation}", status=404)


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
def test_concurrent_streams_leave_the_database_consistent(server, upstream, monkeypatch):
    """Several answers streaming at once into several conversations are all stored; integrity_check is ok."""
    monkeypatch.setattr(chat.settings, "streams_per_owner", 8)  # one browser sends all 8, however slow the machine
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


@pytest.mark.both_databases
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
    """No resending the answer so far: twice the paragraphs, about twice the bytes (tail events left out: they
    go at most every TAIL_EVERY seconds, so their number follows the time the relay took, not the text)."""
    sizes = []
    for paragraphs in (40, 80):
        upstream.serve(answer(*[f"Paragraph {n} has **some** words in it.\n\n" for n in range(paragraphs)]))
        frames = relay(client).raw.split(b"\n\n")
        sizes.append(sum(len(frame) + 2 for frame in frames if not frame.startswith(b"event: tail")))
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
    stopped = plain.post(f"/stop?stream={stream.id}", status=303).headers["Location"]
    assert stopped.endswith(f"/c/{conversation}#answer-m{stream.message_id}")  # lands at the answer (issue 23)
    assert stream.finished and f'id="answer-m{stream.message_id}"' in plain.get(f"/c/{conversation}").text
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
    location = plain.post(f"/c/{conversation}/delete", status=303).headers["Location"]
    assert location.endswith(f"/?deleted={conversation}")  # a new chat that offers Undo (issue 23)
    assert db_rows("SELECT deleted IS NOT NULL FROM conversations") == [(True,)]  # in the trash


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


def test_unknown_urls_say_page_not_found_and_only_conversations_say_no_such_conversation(client):
    """Two 404 texts: "Page not found." for any URL, "no such conversation" under /c/; plain text is not escaped."""
    plain = plain_app()
    for path in ("/nope", "/it's%20<here>", "/static/nope.js", "/c/x/y/z"):
        page = plain.get(path, headers={"Accept": "*/*"}, status=404)  # curl
        assert (page.content_type, page.text) == ("text/plain", "Page not found.\n"), path
        page = plain.get(path, headers={"Accept": "text/html,application/xhtml+xml"}, status=404).text  # a browser
        assert "<p>Page not found.</p>" in page and "no such conversation" not in page, path
    assert plain.get("/c/nope", headers={"Accept": "*/*"}, status=404).text == "No such conversation.\n"
    page = plain.get("/c/nope", headers={"Accept": "text/html"}, status=404).text
    assert "There is no such conversation here" in page and "Page not found" not in page


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
# Conversations people expect: edit, branches, search, parameters
# ---------------------------------------------------------------------------

def conversation_rows():
    """(id, parent_id, role, content) of every message, in order."""
    return db_rows("SELECT id, parent_id, role, content FROM messages ORDER BY id")


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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


@pytest.mark.both_databases
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
    options = elements(page, "details", cls="options")[0]  # folded (issue 23): its summary says what is set
    assert "open" not in options.attrs and elements(page, "summary", id="options-summary")[0].text.endswith(
        "· temperature, top p, max tokens")
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


@pytest.mark.both_databases
def test_a_saved_system_prompt_starts_new_chats(client, upstream):
    """"Use this system prompt for new chats" prefills it on the next new chat and it is sent."""
    read_events(client, send_in(client, "hi", system="Answer in French.", save_system="1")[0])
    page = client.get("/").text
    (system,) = elements(page, "textarea", id="system")
    assert system.text == "Answer in French."
    read_events(client, send_in(client, "bonjour", system=system.text)[0])
    assert upstream.last.json["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert htmx_app().get("/").text.count("Answer in French.") == 0  # another browser's new chats: untouched
