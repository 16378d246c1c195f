from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# Shared links (issue 23, item 5): a read-only link to the branch a conversation shows, for anyone who has it,
# without a cookie or a login; listed on the conversation's head, revoked by its owner only (then 404), gone with
# the conversation; noindex, no Referer, and nothing on it that names the owner, the conversation or a message.

import re  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

import chat  # noqa: E402
from test_accounts import PASSWORD, png, sign_in  # noqa: E402
from testkit import (  # noqa: E402
    HX, after_event, answer, db_rows, elements, htmx_app, plain_app, read_events, send_in, wait_until)


def converse(client, prompt, conversation=None, **fields):
    """Send a prompt and read its answer to the end; return the conversation id."""
    stream_id, conversation = send_in(client, prompt, conversation, **fields)
    read_events(client, stream_id)
    return conversation


def share(client, conversation):
    """Press Share (htmx); return the new link's path, /s/TOKEN, from the conversation's head it answers."""
    before = set(links(client.get(f"/c/{conversation}").text))
    head = client.post(f"/c/{conversation}/share", headers=HX).text
    [new] = set(links(head)) - before
    return new


def links(html_text):
    """The paths of the shared links a page or fragment lists."""
    return [re.sub(r"^https?://[^/]+", "", a.attrs["href"]) for a in elements(html_text, "a")
            if "/s/" in a.attrs.get("href", "")]


def stranger():
    """Another browser without any cookie and without JavaScript."""
    return plain_app()


# ---------------------------------------------------------------------------
# Sharing: what the link shows, and to whom
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
def test_a_shared_link_shows_the_branch_rendered_to_anyone_without_controls(client, upstream):
    """Without a cookie: the questions (with their image) and answers, rendered and escaped, noindex and no
    Referer, with no composer, no controls, no other conversations and no id of the owner's."""
    other = converse(client, "Another conversation of mine")
    upstream.serve(answer("**Bold** answer <script>alert(1)</script>"))
    image = png(3, 2, seed=5)
    response = client.post("/streaming", {"prompt": "Look <img src=x onerror=alert(1)>"},
                           upload_files=[("attachment", "dot.png", image)])
    conversation = response.headers["HX-Push-Url"].removeprefix("/c/")
    read_events(client, re.search(r"stream=([\w-]+)", response.text).group(1))
    client.post(f"/c/{conversation}/rename", {"title": "Title <b>x</b>"})
    link = share(client, conversation)
    token = link.removeprefix("/s/")
    assert len(token) >= 22 and re.fullmatch(r"[A-Za-z0-9_-]+", token)  # 16 random bytes or more: 128 bits

    visitor = stranger()
    shared = visitor.get(link, status=200)

    assert shared.headers["X-Robots-Tag"] == "noindex" and shared.headers["Referrer-Policy"] == "no-referrer"
    assert shared.headers["Cache-Control"] == "no-store" and "Set-Cookie" not in shared.headers
    page = shared.text
    assert '<meta name="robots" content="noindex">' in page
    assert "<strong>Bold</strong> answer" in page and "Title &lt;b&gt;x&lt;/b&gt;" in page
    assert "<script>alert" not in page and "<img src=x" not in page and "Look &lt;img src=x" in page
    assert not elements(page, "form") and not elements(page, "textarea") and not elements(page, "input")
    for word in ("Rename", "Delete", "Edit", "Regenerate", "Stop", "Share", "Revoke", "Another conversation"):
        assert word not in page, word
    owner_id = chat.cookie_owner(client.cookies["chat_owner"])
    for secret in (owner_id, client.cookies["chat_owner"], conversation, other, "/c/"):
        assert secret not in page
    assert not re.search(r'id="[^"]*-m\d+"|value="\d+"', page)  # no message id either
    [img] = elements(page, "img")
    assert img.attrs["alt"] == "dot.png" and img.attrs["src"].startswith(f"{link}/attachments/")
    served = visitor.get(img.attrs["src"], status=200)
    assert served.body == image and served.headers["Content-Type"] == "image/png"
    assert served.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    assert "Set-Cookie" not in served.headers
    attachment_id = img.attrs["src"].rsplit("/", 1)[1]
    visitor.get(f"/attachments/{attachment_id}", status=404)  # the owner's own route stays the owner's
    other_link = share(client, other)
    visitor.get(f"{other_link}/attachments/{attachment_id}", status=404)  # another share's file: no


@pytest.mark.both_databases
def test_a_shared_link_shows_the_branch_shown_as_it_is_now(client, upstream):
    """Edit the question after sharing: the link shows the new branch, never the hidden one; a follow-up shows
    while it is written (what is saved so far, saying so), then whole."""
    upstream.serve(answer("First answer"))
    conversation = converse(client, "First question")
    link = share(client, conversation)
    question = db_rows("SELECT id FROM messages WHERE content = 'First question'")[0][0]
    upstream.serve(answer("Answer to the edit"))
    client.post(f"/c/{conversation}/edit", {"message": question, "prompt": "Edited question"})
    wait_until(lambda: all(s.finished for s in chat.streams.by_id.values()), what="the answer to the edit")
    page = stranger().get(link).text.split('id="chat-messages"')[1]  # the title is still the first question
    assert "Edited question" in page and "Answer to the edit" in page
    assert "First question" not in page and "First answer" not in page and "1/2" not in page
    body = answer("Later", " answer")  # a follow-up: shown while it is written, then whole
    upstream.serve(body, pause_at=after_event(body, b'"Later"'))
    stream_id, _ = send_in(client, "Follow-up", conversation)
    page = stranger().get(link).text
    assert "Follow-up" in page and "This answer is still being written" in page and "streaming" not in page
    upstream.release()
    read_events(client, stream_id)
    page = stranger().get(link).text
    assert "Later answer" in page and "still being written" not in page


# ---------------------------------------------------------------------------
# Revoking, listing, deleting
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
def test_revoke_makes_the_link_404_and_only_the_owner_can(client, upstream):
    """Another browser's Revoke gets 404 and changes nothing; the owner's removes it from the list, and the link
    and its files answer 404 (not 410) from then on."""
    response = client.post("/streaming", {"prompt": "with a file"}, upload_files=[("attachment", "a.png", png())])
    conversation = response.headers["HX-Push-Url"].removeprefix("/c/")
    read_events(client, re.search(r"stream=([\w-]+)", response.text).group(1))
    link = share(client, conversation)
    token = link.removeprefix("/s/")
    image = elements(stranger().get(link).text, "img")[0].attrs["src"]
    for other in (htmx_app(), plain_app()):
        other.get("/")  # a browser of its own, with its cookie
        other.post(f"/c/{conversation}/unshare", {"token": token}, status=404)
    stranger().get(link, status=200)
    stranger().get(image, status=200)

    head = client.post(f"/c/{conversation}/unshare", {"token": token}, headers=HX).text

    assert link not in head and "Revoke" not in head and "Share" in head
    for path in (link, image, f"{link}/attachments/made-up"):
        assert stranger().get(path, status=404).status_code == 404
    assert link not in client.get(f"/c/{conversation}").text
    assert db_rows("SELECT COUNT(*) FROM shares") == [(0,)]


def test_without_javascript_share_and_revoke_are_forms(upstream):
    """Plain forms: Share and Revoke answer 303 back to the conversation, whose head lists the link with Revoke."""
    browser = plain_app()
    sent = browser.post("/streaming", {"prompt": "no script here"}, status=303)
    conversation = sent.headers["Location"].rsplit("/c/", 1)[1]
    page = browser.get(f"/c/{conversation}").text
    [form] = [f for f in elements(page, "form") if f.attrs.get("action") == f"/c/{conversation}/share"]
    assert form.attrs["method"] == "post"
    assert browser.post(form.attrs["action"], status=303).headers["Location"].endswith(f"/c/{conversation}")
    page = browser.get(f"/c/{conversation}").text
    [link] = links(page)
    [absolute] = [a.attrs["href"] for a in elements(page, "a") if link in a.attrs.get("href", "")]
    assert absolute == f"http://localhost:80{link}"  # the same origin as the page (WebTest's own)
    assert [b.text for b in elements(page, "button") if b.text == "Revoke"] == ["Revoke"]
    stranger().get(link, status=200)
    revoked = browser.post(f"/c/{conversation}/unshare", {"token": link.removeprefix("/s/")}, status=303)
    assert revoked.headers["Location"].endswith(f"/c/{conversation}")
    stranger().get(link, status=404)


@pytest.mark.both_databases
def test_links_are_listed_per_conversation_and_die_with_it(client, upstream):
    """Each conversation lists its own links; deleting it ends them at once (in the trash) and for good with the
    trash (ON DELETE CASCADE); ten at most."""
    first, second = converse(client, "first"), converse(client, "second")
    first_links = [share(client, first), share(client, first)]
    second_link = share(client, second)
    assert links(client.get(f"/c/{first}").text) == first_links
    assert links(client.get(f"/c/{second}").text) == [second_link]
    for _ in range(chat.MAX_SHARES - 1):
        share(client, second)
    refused = client.post(f"/c/{second}/share", headers=HX, status=409)
    assert "at most 10 links" in refused.text

    client.delete(f"/c/{first}")

    for link in first_links:
        stranger().get(link, status=404)
    stranger().get(second_link, status=200)
    chat.store.purge_trash(time.time() + chat.TRASH_SECONDS)
    assert db_rows("SELECT COUNT(*) FROM shares WHERE conversation_id = ?", first) == [(0,)]


# ---------------------------------------------------------------------------
# Behind a password or accounts: the link, and nothing else, opens without logging in
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("auth", ["password", "accounts"])
def test_a_shared_link_needs_no_login_and_nothing_else_opens(upstream, monkeypatch, auth):
    """With CHAT_PASSWORD or CHAT_AUTH=accounts the link reads without logging in, and gives no cookie; the rest
    of the conversation (its page, export, files, Revoke) still asks for a login."""
    owner = plain_app()
    if auth == "password":
        monkeypatch.setattr(chat.settings, "password", PASSWORD)
        owner.post("/login", {"password": PASSWORD}, status=302)
    else:
        monkeypatch.setattr(chat.settings, "auth", "accounts")
        chat.store.add_user("alice", chat.password_hash(PASSWORD + "alice"))
        sign_in(owner, "alice")
    sent = owner.post("/streaming", {"prompt": "behind the login"}, upload_files=[("attachment", "a.png", png())],
                      status=303)
    conversation = sent.headers["Location"].rsplit("/c/", 1)[1]
    owner.post(f"/c/{conversation}/share", status=303)
    [link] = links(owner.get(f"/c/{conversation}").text)

    visitor = stranger()
    shared = visitor.get(link, status=200)

    assert "behind the login" in shared.text and "Set-Cookie" not in shared.headers
    visitor.get(elements(shared.text, "img")[0].attrs["src"], status=200)
    attachment_id = elements(shared.text, "img")[0].attrs["src"].rsplit("/", 1)[1]
    for path in ("/", f"/c/{conversation}", f"/c/{conversation}/export.json", f"/attachments/{attachment_id}"):
        assert "/login" in visitor.get(path, status=302).headers["Location"], path
    visitor.post(f"/c/{conversation}/unshare", {"token": link.removeprefix("/s/")}, status=(302, 401))
    visitor.get("/s/made-up-token", status=404)
    visitor.get(link, status=200)
