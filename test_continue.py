from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# Continue (issue 23, item 6): an answer that max tokens cut off goes on where it stopped, sent back as the last
# assistant message (or, to a server that refuses that, with a short user turn), streamed into the same bubble and
# stored as the same answer; resume by Last-Event-ID and the periodic saves work as for any answer.

import re  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

import chat  # noqa: E402
from testkit import (  # noqa: E402
    after_event, alerts, answer, db_rows, elements, footer, htmx_app, plain_app, read_events, send_in,
    wait_until)


def cut_answer(client, upstream, text=("Once", " upon")):
    """A conversation whose answer max tokens cut off; returns (conversation id, the answer's message id)."""
    upstream.serve(answer(*text, finish="length"))
    stream_id, conversation = send_in(client, "Tell a story", max_tokens="2")
    read_events(client, stream_id)
    (message_id,) = db_rows("SELECT id FROM messages WHERE role = 'assistant' ORDER BY id")[-1]
    return conversation, message_id


def continue_form(page):
    """The Continue forms of a page or fragment."""
    return [f for f in elements(page, "form") if f.attrs.get("action", "").endswith("/continue")]


@pytest.mark.both_databases
def test_continue_sends_the_answer_so_far_and_grows_the_same_answer(client, upstream):
    """The partial answer is the last message sent; the continuation streams into the same message id, replayed
    first, and the stored answer is one message with the whole text, its new finish reason and footer."""
    conversation, message_id = cut_answer(client, upstream)
    page = client.get(f"/c/{conversation}").text
    (form,) = continue_form(page)
    assert [b.attrs["aria-label"] for b in elements(page, "button", cls="continue")] == ["Continue"]
    assert elements(page, "input", name="message")[-1].attrs["value"] == str(message_id)
    body = answer(" a time.", usage_tokens=(9, 3))
    upstream.serve(body, pause_at=after_event(body, b'" a time."'))  # still streaming when the branch is drawn
    fragment = client.post(f"/c/{conversation}/continue", {"message": str(message_id)}).text
    stream_id = re.search(r"stream=([\w-]+)", fragment).group(1)
    assert fragment.count('class="msg assistant') == 1  # the same bubble, streaming again
    upstream.release()
    events = read_events(client, stream_id)
    assert events.message == "Once upon a time."
    assert "Once upon a time." in events.done and "finish: stop" in footer(events.done)
    assert not continue_form(events.done)
    sent = upstream.last.json["messages"]
    assert sent[-2:] == [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon"}]
    assert upstream.last.json["max_tokens"] == 2
    assert db_rows("SELECT id, role, content, status, finish_reason FROM messages WHERE role = 'assistant'") == [
        (message_id, "assistant", "Once upon a time.", "done", "stop")]
    assert "Once upon a time." in client.get(f"/c/{conversation}").text


def test_a_server_that_refuses_a_trailing_answer_gets_a_continue_turn(client, upstream):
    """OpenAI-style servers answer 400 to a request ending with an assistant message: it is sent again with the
    short user turn, and the continuation still grows the same answer."""
    conversation, message_id = cut_answer(client, upstream)
    upstream.no_trailing_assistant = True
    upstream.serve(answer(" a time."))
    client.post(f"/c/{conversation}/continue", {"message": str(message_id)})
    wait_until(lambda: db_rows("SELECT status FROM messages WHERE id = ?", message_id) == [("done",)],
               what="the continuation")
    refused, resent = [r.json["messages"] for r in upstream.requests if r.path.endswith("/chat/completions")][-2:]
    assert refused[-1]["role"] == "assistant"
    assert resent[-2:] == [{"role": "assistant", "content": "Once upon"},
                           {"role": "user", "content": chat.CONTINUE_PROMPT}]
    assert db_rows("SELECT content, finish_reason FROM messages WHERE id = ?", message_id) == [
        ("Once upon a time.", "stop")]


def test_a_continuation_resumes_by_last_event_id_and_is_saved_while_it_streams(client, upstream):
    """A reader that reconnects gets each event once (the replayed text is event 1); the periodic save writes the
    whole text so far into the same row, which stays streaming with a lease until the end."""
    conversation, message_id = cut_answer(client, upstream)
    body = answer(" a", " time.")
    upstream.serve(body, pause_at=after_event(body, b'" a"'))
    fragment = client.post(f"/c/{conversation}/continue", {"message": str(message_id)}).text
    stream = chat.streams.get(re.search(r"stream=([\w-]+)", fragment).group(1))
    wait_until(lambda: stream.text() == "Once upon a", what="the first token")
    chat.streams.sweep(time.monotonic())  # the janitor's save (which renews the lease too)
    wait_until(lambda: chat.streams.saving.ready(), what="the save")
    assert db_rows("SELECT content, status FROM messages WHERE id = ?", message_id) == [("Once upon a", "streaming")]
    upstream.release()
    after_replay = read_events(client, stream.id, last_event_id=1)
    assert after_replay.message == " a time."
    assert read_events(client, stream.id).message == "Once upon a time."


def test_continue_is_refused_for_other_answers_strangers_and_a_busy_conversation(client, upstream):
    """Only an answer cut off by its length can go on; a stranger gets 404; one answer at a time (409)."""
    upstream.serve(answer("Done."))
    stream_id, conversation = send_in(client, "Q")
    read_events(client, stream_id)
    (done_id,) = db_rows("SELECT id FROM messages WHERE role = 'assistant'")[0]
    assert not continue_form(client.get(f"/c/{conversation}").text)
    assert "length" in alerts(client.post(f"/c/{conversation}/continue", {"message": str(done_id)}, status=409).text)[0]
    conversation, message_id = cut_answer(client, upstream)
    htmx_app().post(f"/c/{conversation}/continue", {"message": str(message_id)}, status=404)
    body = answer(" more")
    upstream.serve(body, pause_at=len(body) - 1)
    client.post(f"/c/{conversation}/continue", {"message": str(message_id)})
    client.post(f"/c/{conversation}/continue", {"message": str(message_id)}, status=409)
    upstream.release()


def test_continue_works_as_a_plain_form(client, upstream):
    """Without JavaScript Continue posts a form and lands on the page, where the answer grows as HTML."""
    plain = plain_app()
    upstream.serve(answer("Once", " upon", finish="length"))
    conversation = plain.post("/streaming", {"prompt": "Tell"}, status=303).headers["Location"].rsplit("/", 1)[1]
    wait_until(lambda: db_rows("SELECT status FROM messages WHERE role = 'assistant'") == [("done",)],
               what="the answer")
    (message_id,) = db_rows("SELECT id FROM messages WHERE role = 'assistant'")[0]
    (form,) = continue_form(plain.get(f"/c/{conversation}").text)
    assert form.attrs["method"] == "post"
    upstream.serve(answer(" a time."))
    plain.post(f"/c/{conversation}/continue", {"message": str(message_id)}, status=303)
    page = plain.get(f"/c/{conversation}").text
    assert "Once upon a time." in page  # streamed as HTML into the page, then its finished bubble
    assert db_rows("SELECT id, content FROM messages WHERE role = 'assistant'") == [(message_id, "Once upon a time.")]
