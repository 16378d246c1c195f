"""Accounts and media (issue 22): user names and passwords, sign-in through an authenticating proxy, a browser's
history adopted at sign-in, import of exported conversations, images for vision models and text files.

Everything talks to chat.app through WebTest or to a real `python chat.py`, with the fake upstream on loopback."""
import base64
import json
import logging
import struct
import subprocess
import sys
import zlib

import pytest
import webtest

import chat
from testkit import HERE, elements, read_events, send, wait_until

PASSWORD = "correct horse battery"


def png(width=2, height=2, seed=0):
    """A real PNG of width × height pixels (its colour from seed)."""
    def part(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\x00" + bytes([seed % 256, 80, 160]) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + part(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + part(b"IDAT", zlib.compress(rows)) + part(b"IEND", b""))


def browser(address="127.0.0.1", htmx=True, **headers):
    """A WebTest client as one browser (its own cookies) from address."""
    environ = {"REMOTE_ADDR": address, **{f"HTTP_{k.upper().replace('-', '_')}": v for k, v in headers.items()}}
    if htmx:
        environ["HTTP_HX_REQUEST"] = "true"
    return webtest.TestApp(chat.app, extra_environ=environ)


@pytest.fixture
def accounts(monkeypatch):
    """CHAT_AUTH=accounts with the users alice and bob."""
    monkeypatch.setattr(chat.settings, "auth", "accounts")
    for name in ("alice", "bob"):
        chat.store.add_user(name, chat.password_hash(PASSWORD + name))
    return monkeypatch


def sign_in(client, name, password=None, status=302):
    """Post the login form; return the response."""
    return client.post("/login", {"username": name, "password": password or PASSWORD + name, "next": "/"},
                       status=status)


def converse(client, prompt):
    """Send a prompt and read the answer to its end; return the conversation id."""
    stream_id = send(client, prompt)
    read_events(client, stream_id)
    return next(row["conversation_id"] for row in chat.store.db.execute(
        "SELECT conversation_id FROM messages WHERE content = ?", (prompt,)).fetchall())


def cli(tmp_path, *words, stdin=""):
    """Run `python chat.py WORDS --db tmp_path/cli.db`; return the finished process."""
    return subprocess.run([sys.executable, str(HERE / "chat.py"), *words, "--db", str(tmp_path / "cli.db")],
                          input=stdin, capture_output=True, text=True, timeout=60, cwd=tmp_path)


# ---------------------------------------------------------------------------
# Accounts: the command line, sign-in, sessions and revocation
# ---------------------------------------------------------------------------

def test_users_are_kept_from_the_command_line(tmp_path):
    """user add / passwd / del / list on the --db database, the password piped as one line; scrypt, salted."""
    assert cli(tmp_path, "user", "add", "Alice", stdin="first password\n").returncode == 0
    assert cli(tmp_path, "user", "add", "bob", stdin="first password\n").returncode == 0
    again = cli(tmp_path, "user", "add", "alice", stdin="x\n")
    assert again.returncode == 1 and "already" in again.stderr
    listed = cli(tmp_path, "user", "list")
    assert listed.returncode == 0 and [line.split("\t")[0] for line in listed.stdout.splitlines()] == ["alice", "bob"]
    store = chat.Store(str(tmp_path / "cli.db"))
    try:
        hashes = {row["name"]: row["password_hash"] for row in store.db.execute("SELECT * FROM users").fetchall()}
        assert all(h.startswith("scrypt$") for h in hashes.values())
        assert hashes["alice"] != hashes["bob"]  # the same password, each with its own salt
        assert chat.password_ok(hashes["alice"], "first password") and not chat.password_ok(hashes["alice"], "x")
        assert cli(tmp_path, "user", "passwd", "alice", stdin="second password\n").returncode == 0
        new_hash = store.db.execute("SELECT password_hash FROM users WHERE name = 'alice'").fetchone()[0]
        assert chat.password_ok(new_hash, "second password")
        assert cli(tmp_path, "user", "del", "bob").returncode == 0
        assert [r["name"] for r in store.users()] == ["alice"]
    finally:
        store.close()
    assert cli(tmp_path, "user", "del", "nobody").returncode == 1
    assert cli(tmp_path, "user", "passwd", "nobody", stdin="x\n").returncode == 1
    assert cli(tmp_path, "user", "frobnicate").returncode == 2
    assert cli(tmp_path, "user", "add", "has space", stdin="x\n").returncode == 2
    assert cli(tmp_path, "user", "add", "carol", stdin="\n").returncode == 1  # no empty password


@pytest.mark.both_databases
def test_each_account_sees_its_own_history_on_every_device(accounts, upstream):
    """Two people, two browsers each: each sees exactly their own conversations on both."""
    laptop_a, phone_a, laptop_b, phone_b = browser(), browser(), browser(), browser()
    for client, name in ((laptop_a, "alice"), (phone_a, "alice"), (laptop_b, "bob"), (phone_b, "bob")):
        sign_in(client, name)
    alice_chat = converse(laptop_a, "Alice asks on her laptop")
    bob_chat = converse(phone_b, "Bob asks on his phone")
    for client, mine, theirs in ((laptop_a, alice_chat, bob_chat), (phone_a, alice_chat, bob_chat),
                                 (laptop_b, bob_chat, alice_chat), (phone_b, bob_chat, alice_chat)):
        page = client.get("/").text
        assert f"/c/{mine}" in page and f"/c/{theirs}" not in page
        client.get(f"/c/{mine}", status=200)
        client.get(f"/c/{theirs}", status=404)
    # Alice's phone goes on with the conversation her laptop started.
    phone_a.post("/streaming", {"prompt": "and from the phone", "conversation": alice_chat}, status=200)


def test_without_a_session_accounts_ask_to_log_in(accounts, upstream):
    """Every page but /login, /static and a bare /healthz wants a signed-in user; the login form asks for a name."""
    anonymous = browser(htmx=False)
    assert "/login?next=" in anonymous.get("/", status=302).headers["Location"]
    browser().post("/streaming", {"prompt": "hi"}, status=401)
    assert anonymous.get("/healthz").text == "ok\n"
    form = anonymous.get("/login").text
    assert 'name="username"' in form and 'name="password"' in form


def test_wrong_passwords_and_unknown_names_are_refused_alike(accounts, upstream):
    """401 with one sentence for a wrong password and an unknown user; a user name is compared without case."""
    client = browser(htmx=False)
    for name, password in (("alice", "wrong"), ("nobody", "whatever"), ("alice", PASSWORD + "bob")):
        assert "Wrong user name or password" in sign_in(client, name, password, status=401).text
    sign_in(client, " ALICE ", PASSWORD + "alice")
    assert "alice" in client.get("/").text


def test_logging_in_is_limited_per_account_too(accounts, monkeypatch):
    """Guesses at one account from many addresses run into the account's own budget; a known device still
    gets in, and another account is not held back."""
    for n in range(5):
        sign_in(browser(f"198.51.100.{n}", htmx=False), "alice", "wrong", status=401)
    refused = sign_in(browser("198.51.100.77", htmx=False), "alice", "wrong", status=429)
    assert "Wait" in refused.text and refused.headers["Retry-After"]
    sign_in(browser("198.51.100.78", htmx=False), "bob")  # another account: not limited by alice's
    sign_in(browser("198.51.100.79", htmx=False), "alice", status=429)  # a new browser waits too


def test_a_known_device_gets_in_while_its_account_is_attacked(accounts):
    """The device cookie of an earlier sign-in has its own budget."""
    mine = browser(htmx=False)
    sign_in(mine, "alice")
    mine.post("/logout", status=302)
    for n in range(6):
        sign_in(browser(f"198.51.100.{n}", htmx=False), "alice", "wrong", status=(401 if n < 5 else 429))
    sign_in(mine, "alice")
    assert mine.get("/", status=200)


def test_sessions_are_listed_and_end_everywhere(accounts, upstream):
    """/account lists the account's sessions; Sign out everywhere ends every one of them at once."""
    laptop, phone = browser(htmx=False, user_agent="Laptop/1.0"), browser(htmx=False, user_agent="Phone/2.0")
    sign_in(laptop, "alice")
    sign_in(phone, "alice")
    page = laptop.get("/account").text
    assert "Laptop/1.0 (this one)" in page and "Phone/2.0" in page and "Sign out everywhere" in page
    assert "Signed in as alice" in page
    laptop.post("/account/sign-out-everywhere", status=303)
    for client in (laptop, phone):
        assert "/login" in client.get("/", status=302).headers["Location"]


def test_logout_password_change_and_deletion_end_sessions(accounts, upstream, monkeypatch):
    """A session ends at logout, when its password changes, and when its user is deleted."""
    monkeypatch.setattr(chat, "SESSION_SEEN_EVERY", 0)

    def session():
        client = browser(htmx=False)
        sign_in(client, "alice")
        client.get("/", status=200)
        return client

    def ended(client):
        chat.limits.sessions.clear()  # other workers learn within 5 s; here at once
        return client.get("/", status=302)
    client = session()
    client.post("/logout", status=302)
    ended(client)
    client = session()
    chat.store.set_password("alice", chat.password_hash("a new one"))
    ended(client)
    sign_in(browser(htmx=False), "alice", "a new one")
    client = browser(htmx=False)
    sign_in(client, "alice", "a new one")
    assert chat.store.delete_user("alice") == 0
    ended(client)
    sign_in(browser(htmx=False), "alice", "a new one", status=401)


def test_a_browsers_conversations_are_adopted_at_sign_in(upstream, monkeypatch):
    """Turning accounts on loses nothing: at sign-in, the conversations of the browser's anonymous cookie become
    the account's (search included), and the anonymous cookie is dropped."""
    client = browser()
    earlier = converse(client, "written before accounts existed")
    monkeypatch.setattr(chat.settings, "auth", "accounts")
    chat.store.add_user("alice", chat.password_hash(PASSWORD))
    response = sign_in(client, "alice", PASSWORD)
    assert any(h.startswith("chat_owner=") and "1970" in h for h in response.headers.getall("Set-Cookie"))
    assert f"/c/{earlier}" in client.get("/").text
    phone = browser()
    sign_in(phone, "alice", PASSWORD)
    assert f"/c/{earlier}" in phone.get("/").text
    assert "before accounts" in phone.get("/search", {"q": "accounts existed"}).text
    other = chat.store.add_user("bob", chat.password_hash(PASSWORD))
    assert chat.store.conversations(other["owner"]) == []


# ---------------------------------------------------------------------------
# Sign-in through the reverse proxy (CHAT_AUTH_HEADER)
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
def test_the_proxys_user_header_signs_in_from_a_trusted_proxy(upstream, monkeypatch):
    """From an address of CHAT_TRUSTED_PROXIES the header names the user, made on first sight."""
    monkeypatch.setattr(chat.settings, "auth_header", "Remote-User")
    alice = browser("127.0.0.1", remote_user="alice@example.com")
    conversation = converse(alice, "through the proxy")
    assert chat.store.user("alice@example.com") is not None
    again = browser("127.0.0.1", remote_user="Alice@Example.com")
    assert f"/c/{conversation}" in again.get("/").text
    assert f"/c/{conversation}" not in browser("127.0.0.1", remote_user="bob").get("/").text
    assert "alice@example.com" in again.get("/account").text


def test_the_users_header_is_ignored_from_anywhere_else(upstream, monkeypatch, caplog):
    """From an untrusted address the header counts for nothing (401), and that is logged once."""
    monkeypatch.setattr(chat.settings, "auth_header", "Remote-User")
    monkeypatch.setattr(chat, "_LOG_LIMITED", {})
    forger = browser("203.0.113.9", remote_user="alice")
    with caplog.at_level(logging.WARNING, logger="chat"):
        for _ in range(3):
            forger.post("/streaming", {"prompt": "hi"}, status=401)
    assert chat.store.user("alice") is None
    assert len([r for r in caplog.records if "Remote-User" in r.getMessage()]) == 1
    browser("127.0.0.1").get("/", status=401)  # no header from the proxy: nobody
    browser("127.0.0.1", remote_user="has space").get("/", status=400)


# ---------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------

def comparable(exported):
    """An export without what an import must renew: ids (kept as the tree's shape) and the last-used time."""
    ids = {m["id"]: n for n, m in enumerate(exported["messages"])}
    messages = [dict(m, id=ids[m["id"]], parent_id=ids.get(m["parent_id"])) for m in exported["messages"]]
    return dict(exported, id=None, updated=None, shown_leaf_id=ids.get(exported["shown_leaf_id"]), messages=messages)


@pytest.mark.both_databases
def test_an_exported_conversation_imports_identical(client, upstream):
    """export → import → export keeps every message, branch, reasoning, status and attachment."""
    upstream.serve("openai-basic.sse")
    stream_id = client.post("/streaming", {"prompt": "look at this", "temperature": "0.5"},
                            upload_files=[("attachment", "dot.png", png()), ("attachment", "notes.md", b"# notes\n")]
                            ).text
    stream_id = stream_id.split("/events?stream=")[1].split('"')[0]
    read_events(client, stream_id)
    conversation = chat.store.conversations(client.get("/healthz") and chat.store.db.execute(
        "SELECT owner FROM conversations").fetchone()[0])[0]["id"]
    client.post(f"/c/{conversation}/regenerate", status=200)
    wait_until(lambda: not chat.streams.by_id or all(s.finished for s in chat.streams.by_id.values()), 5)
    chat.store.db.execute("UPDATE messages SET reasoning = 'thought about it', status = 'stopped' "
                          "WHERE role = 'assistant' AND id = (SELECT MIN(id) FROM messages WHERE role = 'assistant')")
    first = client.get(f"/c/{conversation}/export.json").json
    assert len(first["messages"]) == 3 and first["messages"][0]["attachments"][0]["name"] == "dot.png"
    answer = client.post("/import", upload_files=[("file", "export.json", json.dumps(first).encode())],
                         status=200)
    new_id = answer.headers["HX-Redirect"].removeprefix("/c/")
    assert new_id != conversation
    second = client.get(f"/c/{new_id}/export.json").json
    assert comparable(second) == comparable(first)
    page = client.get(f"/c/{new_id}").text
    assert "dot.png" in page and "notes.md" in page


def test_import_without_javascript_goes_to_the_new_conversation(upstream):
    """A plain form gets 303 to the imported conversation."""
    plain = browser(htmx=False)
    exported = {"title": "From elsewhere", "messages": [
        {"id": 1, "parent_id": None, "role": "user", "content": "hello"},
        {"id": 2, "parent_id": 1, "role": "assistant", "content": "hi there", "status": "done"}]}
    answer = plain.post("/import", upload_files=[("file", "c.json", json.dumps(exported).encode())], status=303)
    page = plain.get(answer.headers["Location"]).text
    assert "From elsewhere" in page and "hi there" in page


@pytest.mark.parametrize("body, says", [
    (b"not json at all", "not JSON"),
    (b'{"title": "no messages"}', "no list of messages"),
    (b'{"messages": [{"id": 1, "role": "wizard", "content": "x"}]}', "no role"),
    (b'{"messages": [{"id": 1, "parent_id": 7, "role": "user", "content": "x"}]}', "parent_id"),
    (b'{"messages": [{"id": 1, "role": "user", "content": "x", "status": "exploded"}]}', "status"),
    (b'{"messages": [{"id": 1, "role": "user", "content": "x", '
     b'"attachments": [{"name": "a.bin", "data": "AAEC"}]}]}', "neither an image"),
], ids=["not-json", "no-messages", "bad-role", "orphan", "bad-status", "binary-attachment"])
def test_import_refuses_anything_else_with_a_clear_400(client, body, says):
    """Anything but a chat.py export gets 400 and a sentence; nothing is stored."""
    answer = client.post("/import", upload_files=[("file", "x.json", body)], status=(415 if "neither" in says else 400))
    assert says in answer.text
    assert chat.store.db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0] == 0
    client.post("/import", status=400)  # no file at all


# ---------------------------------------------------------------------------
# Attachments: images for vision models, text files
# ---------------------------------------------------------------------------

@pytest.mark.both_databases
def test_an_image_reaches_the_model_as_a_content_part_byte_exact(client, upstream):
    """The image goes upstream as an image_url data: URL of its exact bytes, after the text; a text file is
    appended to the text; both show in the bubble and on reload, and the image is served to its owner only."""
    image = png(3, 2, seed=7)
    answer = client.post("/streaming", {"prompt": "What is in this picture?"},
                         upload_files=[("attachment", "screen.png", image),
                                       ("attachment", "data.csv", b"a,b\n1,2\n")])
    stream_id = answer.text.split("/events?stream=")[1].split('"')[0]
    read_events(client, stream_id)
    sent = upstream.requests[-1].json["messages"][-1]
    assert sent["role"] == "user"
    assert sent["content"][0]["type"] == "text"
    assert sent["content"][0]["text"].startswith("What is in this picture?\n\ndata.csv:\n```\na,b\n1,2\n")
    assert sent["content"][1] == {"type": "image_url",
                                  "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}
    thumbs = elements(answer.text, "img")
    assert [t.attrs["alt"] for t in thumbs] == ["screen.png"]
    src = thumbs[0].attrs["src"]
    served = client.get(src)
    assert served.body == image and served.headers["Content-Type"] == "image/png"
    assert served.headers["X-Content-Type-Options"] == "nosniff"
    conversation = chat.store.db.execute("SELECT id FROM conversations").fetchone()[0]
    page = client.get(f"/c/{conversation}").text
    assert src in page and "data.csv" in page and "a,b" in page
    stranger = browser()
    stranger.get(src, status=404)
    stranger.get("/attachments/made-up", status=404)


def test_a_picture_alone_is_a_question(client, upstream):
    """A message with an image and no text is sent; the conversation is named after the file."""
    answer = client.post("/streaming", {"prompt": ""}, upload_files=[("attachment", "cat.webp",
                                                                      b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x00" * 8)])
    assert "cat.webp" in answer.text
    assert chat.store.db.execute("SELECT title FROM conversations").fetchone()[0] == "cat.webp"


@pytest.mark.parametrize("files, status, says", [
    ([("attachment", "big.png", png() + b"\x00" * (2 << 20))], 413, "the limit for an image is 1.0 MB"),
    ([("attachment", "big.txt", b"x" * 5000)], 413, "the limit for a text file is 4 KB"),
    ([("attachment", f"{n}.png", png()) for n in range(4)], 413, "the limit is 3 a message"),
    ([("attachment", "prog.exe", b"MZ\x90\x00\x03\x00\x00\x00")], 415, "neither an image"),
], ids=["image", "text", "count", "binary"])
def test_attachments_over_the_limits_are_refused_with_a_clear_message(client, upstream, monkeypatch, files,
                                                                       status, says):
    """413 (415 for what is neither) with a sentence naming the file and the limit; nothing is stored."""
    monkeypatch.setattr(chat.settings, "max_image_mb", 1.0)
    monkeypatch.setattr(chat.settings, "max_file_kb", 4.0)
    monkeypatch.setattr(chat.settings, "max_attachments", 3)
    answer = client.post("/streaming", {"prompt": "keep my words"}, upload_files=files, status=status)
    assert says in answer.text
    assert chat.store.db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 0
    plain = browser(htmx=False)
    page = plain.post("/streaming", {"prompt": "keep my words"}, upload_files=files, status=status).text
    assert says in page and "keep my words" in page  # without JavaScript the words stay in the box


def test_an_upload_over_the_body_limit_is_refused_unread(server, monkeypatch):
    """A multipart body larger than the attachments' limit gets 413 before a byte of it is read; uploads go only
    to /streaming and /import; and a visitor who must log in first is refused before the body is read."""
    import socket
    monkeypatch.setattr(chat.settings, "max_attachments_mb", 1.0)
    host, port = server.removeprefix("http://").split(":")

    def head(path, length, cookie=""):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x"
                         f"\r\nContent-Length: {length}\r\n{cookie}\r\n".encode())
            return sock.recv(65536)
    assert head("/streaming", 5 << 20).startswith(b"HTTP/1.1 413 ")
    assert head("/c/x/rename", 100).startswith(b"HTTP/1.1 413 ")
    monkeypatch.setattr(chat.settings, "auth", "accounts")
    assert head("/streaming", 100_000).startswith(b"HTTP/1.1 401 ")


def test_an_edited_question_keeps_its_attachments(client, upstream):
    """Edit sends the new words with the same files."""
    answer = client.post("/streaming", {"prompt": "first words"},
                         upload_files=[("attachment", "dot.png", png())])
    read_events(client, answer.text.split("/events?stream=")[1].split('"')[0])
    conversation, question = chat.store.db.execute(
        "SELECT conversation_id, id FROM messages WHERE role = 'user'").fetchone()
    client.post(f"/c/{conversation}/edit", {"message": question, "prompt": "better words"}, status=200)
    wait_until(lambda: len(upstream.requests) >= 2, 5)
    content = upstream.requests[-1].json["messages"][-1]["content"]
    assert content[0]["text"] == "better words" and content[1]["type"] == "image_url"


def test_the_demo_model_answers_a_picture(demo):
    """The built-in demo model takes content parts too (it says how many images it got)."""
    import requests
    session = requests.Session()
    answer = session.post(f"{demo}/streaming", data={"prompt": "what is this"}, headers={"HX-Request": "true"},
                          files=[("attachment", ("dot.png", png(), "image/png"))], timeout=5)
    assert answer.status_code == 200
    stream_id = answer.text.split("/events?stream=")[1].split('"')[0]
    events = session.get(f"{demo}/events", params={"stream": stream_id}, timeout=10).text
    assert "1 image" in events


def test_without_javascript_the_forms_file_input_attaches(upstream):
    """A plain multipart form (no HX-Request) sends the file; the conversation's page shows the thumbnail."""
    plain = browser(htmx=False)
    answer = plain.post("/streaming", {"prompt": "plain form"}, upload_files=[("attachment", "dot.png", png())],
                        status=303)
    page = plain.get(answer.headers["Location"]).text
    thumbs = elements(page, "img")
    assert [t.attrs["alt"] for t in thumbs] == ["dot.png"]
    assert plain.get(thumbs[0].attrs["src"]).body == png()


# ---------------------------------------------------------------------------
# Found in review: bounds under attack
# ---------------------------------------------------------------------------

def test_guesses_arriving_together_each_spend_a_token(accounts, server):
    """100 wrong passwords for one account at once: only its budget's worth are checked, the rest get 429."""
    import gevent.pool
    import requests

    def guess(n):
        return requests.post(server + "/login", data={"username": "alice", "password": f"wrong {n}"},
                             headers={"X-Forwarded-For": "198.51.100.9"}, allow_redirects=False, timeout=30).status_code
    statuses = gevent.pool.Pool(100).map(guess, range(100))
    assert statuses.count(401) <= 6 and statuses.count(429) >= 94, statuses


def test_a_device_cookie_vouches_only_for_the_account_it_signed_in_to(accounts):
    """Mallory's own device cookies buy no guesses at alice: those count against alice's budget."""
    mallory = browser(htmx=False)
    sign_in(mallory, "bob")  # mallory is bob here: a device cookie of his own
    for _ in range(5):
        sign_in(mallory, "alice", "wrong", status=401)
    assert sign_in(mallory, "alice", "wrong", status=429).headers["Retry-After"]
    sign_in(browser("203.0.113.50", htmx=False), "alice", status=429)  # alice's budget is spent for new browsers
    sign_in(mallory, "bob")  # and his own account still lets him in


def test_an_account_keeps_its_newest_sessions(accounts, monkeypatch):
    """Past MAX_USER_SESSIONS sign-ins the oldest session ends."""
    monkeypatch.setattr(chat, "MAX_USER_SESSIONS", 3)
    clients = [browser(htmx=False) for _ in range(4)]
    for client in clients:
        sign_in(client, "alice")
    assert len(chat.store.user_sessions("alice")) == 3
    chat.limits.sessions.clear()
    clients[0].get("/", status=302)
    clients[3].get("/", status=200)


def test_adoption_takes_only_a_signed_cookie_of_an_anonymous_browser(accounts, upstream):
    """A made-up owner cookie, or one naming an account, adopts nothing."""
    alice = browser()
    sign_in(alice, "alice")
    kept = converse(alice, "alice's own")
    alice_owner = chat.store.user("alice")["owner"]
    for forged in (alice_owner, chat.signed(alice_owner)):
        mallory = browser()
        mallory.set_cookie("chat_owner", forged)
        sign_in(mallory, "bob")
        assert f"/c/{kept}" not in mallory.get("/").text
    assert f"/c/{kept}" in alice.get("/").text


def test_a_name_with_a_comma_is_refused_from_the_proxy(upstream, monkeypatch):
    """Two Remote-User headers joined by a comma are no user."""
    monkeypatch.setattr(chat.settings, "auth_header", "Remote-User")
    browser("127.0.0.1", remote_user="alice,bob").get("/", status=400)
    assert chat.store.user("alice,bob") is None


def test_imports_are_new_visitors_and_stop_at_a_full_database(client, monkeypatch):
    """An import is a new visitor's first conversation (the per-address budget), and a full database refuses it."""
    exported = json.dumps({"messages": [{"id": 1, "role": "user", "content": "x"}]}).encode()
    for n in range(3):
        browser("198.51.100.20", htmx=False).post("/import", upload_files=[("file", "c.json", exported)], status=303)
    refused = browser("198.51.100.20").post("/import", upload_files=[("file", "c.json", exported)], status=429)
    assert "new visitors" in refused.text
    monkeypatch.setattr(chat.settings, "max_db_mb", 0.001)
    assert "database is full" in client.post("/import", upload_files=[("file", "c.json", exported)], status=507).text


def test_an_import_of_a_long_chain_in_any_order_and_of_too_many_objects(client):
    """10,000 messages in one chain given children first import (placed in one pass); a file of more objects and
    lists than a conversation can hold gets 413 before it is parsed."""
    chain = [{"id": n, "parent_id": n - 1 if n else None, "role": "user" if n % 2 == 0 else "assistant",
              "content": f"m{n}"} for n in range(10_000)]
    answer = client.post("/import", upload_files=[("file", "c.json", json.dumps(
        {"messages": chain[::-1], "shown_leaf_id": 9_999}).encode())], status=200)
    exported = client.get(answer.headers["HX-Redirect"] + "/export.json").json
    assert [m["content"] for m in exported["messages"]] == [f"m{n}" for n in range(10_000)]
    flood = b'{"messages": [' + b",".join([b"[]"] * (chat.MAX_IMPORT_NODES + 1)) + b"]}"
    assert "more than a conversation" in client.post("/import", upload_files=[("file", "x.json", flood)],
                                                     status=413).text


def test_a_form_of_many_tiny_parts_is_refused_before_it_is_parsed(client):
    """Bottle parses a form's parts on the event loop: past the attachments' count (and a margin) it is 413."""
    fields = [(f"f{n}", "x") for n in range(chat.settings.max_attachments + 40)]
    answer = client.post("/streaming", fields, upload_files=[("attachment", "a.txt", b"hi")], status=413)
    assert "at most" in answer.text
