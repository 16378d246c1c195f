from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# Times and the sidebar people organise (issue 23): every message's <time>, conversations grouped under headings in
# the reader's own days, pinned and archived ones, Delete with Undo (the trash and its purge), and a search that
# lists each conversation once. Server side, through WebTest with and without htmx; the page's side is in
# test_page.py.

import re  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

import chat  # noqa: E402
from testkit import (  # noqa: E402
    HX, after_event, answer, db_rows, elements, plain_app, read_events, send_in, wait_until)

DAY = 86400
PLAIN = {"HX-Request": ""}  # the htmx client's request as a browser without JavaScript sends it


def owner_of(client):
    """The owner id behind a WebTest client's cookie (made on its first request)."""
    client.get("/")
    return chat.cookie_owner(client.cookies["chat_owner"])


def conversation_at(owner, title, updated):
    """A conversation of this owner, last used at `updated` (Unix seconds), with one question; returns its id."""
    conversation_id = chat.store.create_conversation(owner, title)
    chat.store.add_message(conversation_id, "user", f"about {title}")
    chat.store.db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (updated, conversation_id))
    return conversation_id


def sidebar(page):
    """The sidebar's conversation list in order: ("h", heading) and ("a", conversation id) items."""
    found = re.search(r'<div id="conversation-list">(.*?)</div>', page, re.S)
    assert found, "no #conversation-list"
    return [("h", h) if h else ("a", a) for h, a in
            re.findall(r'<h[2-6][^>]*>([^<]*)</h[2-6]>|<a href="/c/([\w-]+)"', found.group(1))]


def iso(timestamp):
    """A time as the page's <time datetime> writes it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


# ---------------------------------------------------------------------------
# Times
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
def test_every_message_carries_its_time_in_utc_for_the_script_to_make_local(client, upstream):
    """Questions and answers, streaming, finished and reloaded, carry <time datetime> in ISO 8601 UTC from their
    `created`; the text is the UTC time until chat.js rewrites it (a page without JavaScript keeps it)."""
    upstream.serve(answer("Noted."))
    before = time.time()
    response = client.post("/streaming", {"prompt": "what time is it"}, headers=HX)
    exchange = [e.attrs["datetime"] for e in elements(response.text, "time")]
    assert len(exchange) == 2 and all(iso(before - 1) <= t <= iso(time.time() + 1) for t in exchange), exchange
    stream_id = re.search(r"stream=([\w-]+)", response.text).group(1)
    done = read_events(client, stream_id).done
    (answered,) = elements(done, "time")
    conversation = response.headers["HX-Push-Url"].removeprefix("/c/")
    created = dict(db_rows("SELECT role, created FROM messages"))
    assert answered.attrs["datetime"] == iso(created["assistant"])
    page = client.get(f"/c/{conversation}", headers=PLAIN).text
    shown = elements(page, "time")
    assert [t.attrs["datetime"] for t in shown] == [iso(created["user"]), iso(created["assistant"])]
    assert [t.text for t in shown] == [time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(created[role]))
                                       for role in ("user", "assistant")]
    bubbles = re.split(r'(?=<div class="msg )', page.split('id="chat-messages"')[1])[1:]
    assert len(bubbles) == 2 and all(len(elements(bubble, "time")) == 1 for bubble in bubbles)


# ---------------------------------------------------------------------------
# The sidebar: groups in the reader's days, pinned on top, archive
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
def test_the_sidebar_groups_conversations_under_headings_pinned_on_top(client):
    """Today, Yesterday, Previous 7 days, Older, then a heading a month past a year, newest first; the pinned on top;
    each heading precedes its links."""
    owner, now = owner_of(client), time.time()
    ids = {age: conversation_at(owner, f"{age} days old", now - age * DAY) for age in (0, 1, 3, 30, 400, 800)}
    pinned = conversation_at(owner, "pinned long ago", now - 2000 * DAY)
    client.post(f"/c/{pinned}/pin", headers=HX)
    month = time.strftime("%B %Y", time.gmtime(now - 400 * DAY))
    assert sidebar(client.get("/").text) == [
        ("h", "Pinned"), ("a", pinned), ("h", "Today"), ("a", ids[0]), ("h", "Yesterday"), ("a", ids[1]),
        ("h", "Previous 7 days"), ("a", ids[3]), ("h", "Older"), ("a", ids[30]), ("h", month), ("a", ids[400]),
        ("h", time.strftime("%B %Y", time.gmtime(now - 800 * DAY))), ("a", ids[800])]
    client.post(f"/c/{pinned}/unpin", headers=HX)
    assert ("h", "Pinned") not in sidebar(client.get("/").text)  # no heading for an empty group
    assert db_rows("SELECT updated FROM conversations WHERE id = ?", pinned)[0][0] == pytest.approx(now - 2000 * DAY)


@pytest.mark.both_databases
def test_the_readers_time_zone_decides_which_day_is_today(client):
    """Two minutes ago was yesterday for a reader whose clock just passed midnight (the tz cookie: minutes east of
    UTC), and today five minutes further east; a cookie that is no number of minutes counts as UTC."""
    owner, now = owner_of(client), time.time()
    recent = conversation_at(owner, "two minutes ago", now - 120)
    offset = -int(now % DAY // 60)  # the zone where it is 00:00 now (to the minute)
    offset = (offset + 720) % 1440 - 720  # the same zone as -12 h to +12 h
    client.set_cookie("tz", str(offset))
    assert sidebar(client.get("/").text) == [("h", "Yesterday"), ("a", recent)]
    client.set_cookie("tz", str(offset + 5))
    assert sidebar(client.get("/").text) == [("h", "Today"), ("a", recent)]
    old = conversation_at(owner, "a week ago", now - 3 * DAY)
    for bad in ("abc", "99999", "1e3", "-841"):
        client.set_cookie("tz", bad)
        assert sidebar(client.get("/").text)[-2:] == [("h", "Previous 7 days"), ("a", old)], bad


@pytest.mark.both_databases
def test_pin_and_archive_work_as_plain_forms_and_with_htmx(client):
    """Pin and Archive are POST forms: a plain one lands back on the conversation (303), htmx gets the head and the
    sidebar anew. An archived conversation leaves the list for the Archived section, is still found by search and
    opens with Unarchive; nothing changes its place in time."""
    owner, now = owner_of(client), time.time()
    mine = conversation_at(owner, "Zebra notes", now - 10)
    other = conversation_at(owner, "Lunch", now)
    assert client.post(f"/c/{mine}/pin", headers=PLAIN, status=303).headers["Location"].endswith(f"/c/{mine}")
    page = client.get(f"/c/{mine}", headers=PLAIN).text
    assert sidebar(page) == [("h", "Pinned"), ("a", mine), ("h", "Today"), ("a", other)]
    (unpin,) = [f for f in elements(page, "form", cls="place") if f.attrs["action"] == f"/c/{mine}/unpin"]
    assert unpin.attrs["method"] == "post" and unpin.attrs["hx-post"] == f"/c/{mine}/unpin"

    fragment = client.post(f"/c/{mine}/archive", headers=HX).text  # with htmx: the head, and the lists out of band
    assert elements(fragment, "button", **{"aria-label": "Unarchive conversation"})
    assert elements(fragment, "div", id="conversations", **{"hx-swap-oob": "true"})
    page = client.get("/", headers=PLAIN).text
    assert sidebar(page) == [("h", "Today"), ("a", other)]
    (archived,) = elements(page, "details", cls="archived")
    assert "Archived (1)" in archived.text and f'href="/c/{mine}"' in page
    hits = elements(client.get("/search", {"q": "zebra"}).text, "a")
    assert [h.attrs["href"] for h in hits] == [f"/c/{mine}"] and "Archived" in hits[0].text
    page = client.get(f"/c/{mine}", headers=PLAIN).text
    assert "Archived" in elements(page, "p", cls="note")[0].text
    assert elements(page, "form", action=f"/c/{mine}/unarchive")
    client.post(f"/c/{mine}/unarchive", headers=PLAIN, status=303)
    assert sidebar(client.get("/").text) == [("h", "Pinned"), ("a", mine), ("h", "Today"), ("a", other)]
    assert db_rows("SELECT updated FROM conversations WHERE id = ?", mine)[0][0] == pytest.approx(now - 10)
    stranger = plain_app()
    for action in ("pin", "unpin", "archive", "unarchive"):
        stranger.post(f"/c/{mine}/{action}", status=404)
    assert db_rows("SELECT pinned IS NOT NULL, archived IS NULL FROM conversations WHERE id = ?", mine) == [
        (True, True)]


# ---------------------------------------------------------------------------
# Delete with Undo: the trash
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
def test_delete_offers_undo_and_the_deleted_conversation_is_gone_everywhere_meanwhile(client):
    """Without JavaScript: Delete lands on a new chat saying it was deleted, with an Undo form; meanwhile the
    conversation is in no list, no search, and its page, exports and attachments answer 404. Undo brings it all back;
    with htmx the same happens by HX-Redirect. Nobody else can undo it."""
    owner = owner_of(client)
    doomed = conversation_at(owner, "<b>Quokka</b> facts", time.time())
    question = db_rows("SELECT id FROM messages WHERE conversation_id = ?", doomed)[0][0]
    (attachment,) = chat.store.add_attachments(question, [chat.Upload("notes.txt", "text/plain", b"quokka notes")])
    paths = [f"/c/{doomed}", f"/c/{doomed}/export.md", f"/c/{doomed}/export.json", f"/attachments/{attachment}"]
    for path in paths:
        client.get(path)
    location = client.post(f"/c/{doomed}/delete", headers=PLAIN, status=303).headers["Location"]
    assert location.endswith(f"/?deleted={doomed}")
    page = client.get(location.removeprefix("http://localhost:80"), headers=PLAIN).text
    (undo,) = elements(page, "div", cls="undo")
    assert undo.attrs["role"] == "status" and "“<b>Quokka</b> facts” was deleted." in undo.text
    assert "<b>Quokka" not in page  # escaped
    assert elements(page, "form", action=f"/c/{doomed}/restore", method="post")
    assert f"/c/{doomed}" not in "".join(str(item) for item in sidebar(page))
    assert "Nothing found" in client.get("/search", {"q": "quokka"}).text
    for path in paths:
        client.get(path, status=404)
    plain_app().post(f"/c/{doomed}/restore", status=404)  # someone else's trash looks like nothing
    assert client.post(f"/c/{doomed}/restore", headers=PLAIN, status=303).headers["Location"].endswith(f"/c/{doomed}")
    for path in paths:
        client.get(path)
    assert sidebar(client.get("/").text) == [("h", "Today"), ("a", doomed)]
    assert "?deleted" not in client.get(f"/?deleted={doomed}").text and "was deleted" not in client.get(
        f"/?deleted={doomed}").text  # not in the trash: nothing to undo

    response = client.delete(f"/c/{doomed}")  # the page's Delete button, with htmx
    assert response.headers["HX-Redirect"] == f"/?deleted={doomed}"
    client.get(f"/c/{doomed}", status=404)
    assert client.post(f"/c/{doomed}/restore", headers=HX).headers["HX-Redirect"] == f"/c/{doomed}"
    assert client.get(f"/c/{doomed}").status_int == 200


@pytest.mark.both_databases
def test_the_trash_is_emptied_an_hour_later_at_the_next_delete_or_the_housekeeping(client):
    """A conversation in the trash for TRASH_SECONDS is purged for good (messages too) by the next delete, or by the
    hourly housekeeping; until then it can be restored."""
    owner, now = owner_of(client), time.time()
    first, second, third = (conversation_at(owner, title, now) for title in ("first", "second", "third"))
    client.delete(f"/c/{first}")
    chat.store.db.execute("UPDATE conversations SET deleted = ? WHERE id = ?", (now - chat.TRASH_SECONDS, first))
    client.delete(f"/c/{second}")
    assert db_rows("SELECT id FROM conversations ORDER BY title") == [(second,), (third,)]
    assert db_rows("SELECT count(*) FROM messages WHERE conversation_id = ?", first) == [(0,)]
    client.post(f"/c/{first}/restore", status=404)  # gone for good
    chat.store.expire(time.time() + chat.TRASH_SECONDS - 60)  # the housekeeping, before the hour is up
    assert db_rows("SELECT id FROM conversations ORDER BY title") == [(second,), (third,)]
    chat.store.expire(time.time() + chat.TRASH_SECONDS)
    assert db_rows("SELECT id FROM conversations") == [(third,)]


def test_deleting_stops_the_conversations_answer(client, upstream):
    """An answer still streaming stops when its conversation is deleted (it would be written into the trash)."""
    body = answer("Never", " finished")
    upstream.serve(body, pause_at=after_event(body, b'"Never"'))
    stream_id, conversation = send_in(client, "a long one")
    stream = chat.streams.by_id[stream_id]
    client.delete(f"/c/{conversation}")
    wait_until(lambda: stream.finished, what="the stopped answer")
    assert stream.status == "stopped"
    upstream.release()


# ---------------------------------------------------------------------------
# Search: each conversation once, under "Results"
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
def test_search_lists_each_conversation_once_under_a_results_heading(client, upstream):
    """A conversation matching in its title and in many messages is one result (its title's hit); one with many
    matching messages does not crowd out another; a message hit shows its snippet under the title, linked with ?at=
    to the branch that holds it, hidden or not; titles are escaped; deleted conversations are not found."""
    owner, now = owner_of(client), time.time()
    titled = conversation_at(owner, "Zebra <crossing>", now)
    for n in range(3):
        chat.store.add_message(titled, "user", f"zebra number {n}")
    crowded = conversation_at(owner, "Stripes", now)
    chat.store.db.executemany("INSERT INTO messages (conversation_id, role, content, created) VALUES (?, 'user', ?, ?)",
                              [(crowded, f"zebra zebra zebra {n}", now) for n in range(50)])
    quiet = conversation_at(owner, "Safari", now)
    said = chat.store.add_message(quiet, "assistant", "At dawn we saw one zebra drinking at the river, then many more.")
    client.delete(f"/c/{conversation_at(owner, 'Deleted zebra', now)}")
    results = client.get("/search", {"q": "zebra"}).text
    assert re.match(r'\s*<h2 class="group">Results</h2>\s*<ul>', results)
    hrefs = [link.attrs["href"] for link in elements(results, "a")]
    assert hrefs[0] == f"/c/{titled}" and len(hrefs) == 3  # a title's hit first; then messages' hits by rank
    assert sorted(href.split("?")[0] for href in hrefs[1:]) == sorted([f"/c/{crowded}", f"/c/{quiet}"])
    assert f"/c/{quiet}?at={said}#answer-m{said}" in hrefs and "Zebra &lt;crossing&gt;" in results
    (safari,) = [item for item in results.split("<li>") if f"/c/{quiet}?" in item]
    (snippet,) = elements(safari, "span", cls="snippet")
    assert "we saw one zebra drinking" in snippet.text and "one <mark>zebra</mark> drinking" in safari

    # A hit in a hidden branch links to that branch, which the page then shows.
    upstream.serve(answer("The okapi is a giraffid."))
    stream_id, branched = send_in(client, "Tell me about the okapi")
    read_events(client, stream_id)
    upstream.serve(answer("Something else entirely."))
    client.post(f"/c/{branched}/regenerate", headers=HX)
    wait_until(lambda: all(s.finished for s in chat.streams.by_id.values()), what="the second answer")
    assert "giraffid" not in client.get(f"/c/{branched}").text  # hidden now
    hidden = db_rows("SELECT id FROM messages WHERE content LIKE 'The okapi%'")[0][0]
    (hit,) = elements(client.get("/search", {"q": "giraffid"}).text, "a")
    assert hit.attrs["href"] == f"/c/{branched}?at={hidden}#answer-m{hidden}"
    assert "giraffid" in client.get(hit.attrs["href"].split("#")[0]).text
    page = client.get("/search", {"q": "zebra"}, headers=PLAIN).text  # without JavaScript: the page
    assert len(elements(page, "form", role="search")) == 1 and 'id="search-results"' in page
    assert len(re.findall(r'<a href="/c/', page.split('id="search-results"')[1].split('id="conversations"')[0])) == 3
