from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see test_chat.py)

# The hardening tests: each attack of the second audit against a real `python chat.py` on loopback (or the
# app in process where only its answer matters), measuring that other people are still served meanwhile:
# a /healthz probe on a fresh connection and a normal chat's first token, both timed.

import re  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402

import chat  # noqa: E402
from test_chat import (  # noqa: E402, F401 — fixtures are found by name
    HX, ChatProcess, client, database, isolated, plain_app, send_in, upstream, wait_until)

PASSWORD = "correct horse battery staple"


def session():
    """A browser-like HTTP client of its own (cookies kept, no proxy from the environment)."""
    browser = requests.Session()
    browser.trust_env = False
    return browser


class Bystander:
    """Someone else using the server during an attack: /healthz on a fresh connection and a chat's first token,
    timed, over and over in a greenlet of its own until stopped."""

    def __init__(self, base, password=None, source=None):
        self.base, self.source = base, source
        self.cookies = requests.cookies.RequestsCookieJar()
        if password:
            response = self.call("POST", "/login", data={"password": password}, allow_redirects=False)
            assert response.status_code in (302, 303), response.text
        self.healthz_times, self.token_times = [], []
        self.running = None

    def call(self, method, path, **kwargs):
        """One request on a connection of its own, with this person's cookies (a pooled connection that the
        server has just closed would fail a POST, which requests does not retry)."""
        with session() as browser:
            browser.cookies = self.cookies
            if self.source:  # from another loopback address: another client to chat.py
                browser.mount("http://", SourceAdapter(self.source))
            response = browser.request(method, f"{self.base}{path}", timeout=10, **kwargs)
            response.content  # noqa: B018 — read it whole before the connection goes
            return response

    def healthz(self):
        """Seconds for /healthz."""
        started = time.monotonic()
        response = self.call("GET", "/healthz")
        assert response.status_code == 200, response.text
        return time.monotonic() - started

    def first_token(self):
        """Seconds from sending a prompt to its first token on /events."""
        started = time.monotonic()
        response = self.call("POST", "/streaming", data={"prompt": "Hello there"}, headers=HX)
        assert response.status_code == 200, response.text
        stream_id = re.search(r'sse-connect="/events\?stream=([A-Za-z0-9_-]+)"', response.text).group(1)
        with session() as browser:
            browser.cookies = self.cookies
            if self.source:
                browser.mount("http://", SourceAdapter(self.source))
            with browser.get(f"{self.base}/events", params={"stream": stream_id}, stream=True,
                             timeout=10) as events:
                raw = b""
                while b"<span>" not in raw:
                    data = events.raw.read1(65536)
                    assert data, f"the answer ended without a token: {raw!r}"
                    raw += data
                elapsed = time.monotonic() - started
                # Stop it and read it to its end: the next round's answer must not meet the per-owner limit.
                self.call("POST", "/stop", params={"stream": stream_id}, headers=HX)
                while events.raw.read1(65536):
                    pass
        return elapsed

    def probe(self):
        """One round: a /healthz and a first token."""
        self.healthz_times.append(self.healthz())
        self.token_times.append(self.first_token())

    def start(self):
        """Probe until stopped."""
        def loop():
            while True:
                self.probe()
                gevent.sleep(0.05)
        self.running = gevent.spawn(loop)
        return self

    def stop(self, healthz_limit=0.5, token_limit=3.0):
        """Stop probing; every probe must have been served within the limits, and at least one must have run."""
        if self.running is not None:
            self.running.kill()
            assert self.running.exception is None or isinstance(self.running.exception, gevent.GreenletExit), \
                self.running.exception
        self.probe()  # and once more, after the attack
        assert max(self.healthz_times) < healthz_limit, self.healthz_times
        assert max(self.token_times) < token_limit, self.token_times


class SourceAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter, connecting from a chosen loopback address."""

    def __init__(self, source):
        self.source = source
        super().__init__()

    def init_poolmanager(self, *args, **kwargs):
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


def connect(base, source=None):
    """A raw connection to the server, optionally from another loopback address."""
    host, port = base.rsplit("/", 1)[1].split(":")
    return socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0) if source else None)


def read_all(sock, timeout=5.0):
    """Whatever the server sends until it closes the connection."""
    sock.settimeout(timeout)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    return answer


def exchange(sock, request):
    """Send one request on a kept-alive connection; return the response head and body (Content-Length framed)."""
    sock.sendall(request)
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.fixture
def open_chat(tmp_path):
    """`python chat.py` on the demo model, with no password; yields it."""
    process = ChatProcess(tmp_path / "chat.log", CHAT_DEMO_DELAY="0.001")
    yield process
    process.stop()


@pytest.fixture
def guarded(tmp_path):
    """`python chat.py` behind CHAT_PASSWORD on the demo model, with a temporary folder of its own; yields it."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    process = ChatProcess(tmp_path / "chat.log", CHAT_PASSWORD=PASSWORD, CHAT_DEMO_DELAY="0.001",
                          TMPDIR=str(tmpdir))
    process.tmpdir = tmpdir
    yield process
    process.stop()


# -- 1. no request body where none belongs -----------------------------------------------------------------

def test_a_chunked_get_before_login_is_refused_at_once_and_freezes_nobody(guarded):
    """The audit's repro: a chunked GET /login with a 1 MB chunk. 411 as soon as the head is in, the connection
    closed, nothing written to $TMPDIR; meanwhile other people are served."""
    bystander = Bystander(guarded.url, PASSWORD).start()
    head = b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"

    def attack(size_line):
        sock = connect(guarded.url)
        sock.sendall(head)
        started = time.monotonic()
        answer = b""
        with pytest.raises(OSError):  # the server closes the connection while the body is still being sent
            sock.sendall(size_line)
            for _ in range(200):
                sock.sendall(b"1" * 65536)
                answer += sock.recv(65536, socket.MSG_DONTWAIT) if not answer else b""
        answer += read_all(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 411 "), answer[:200]
        assert b"Content-Length" in answer and b"Refused" in answer
        return time.monotonic() - started

    attacks = [gevent.spawn(attack, line) for line in (b"100000\r\n", b"1" * (1 << 20)) * 5]
    gevent.joinall(attacks, timeout=30, raise_error=True)
    bystander.stop()
    assert list(guarded.tmpdir.iterdir()) == []
    assert "Traceback" not in guarded.log_path.read_text()


def test_a_chunked_body_is_refused_before_the_body_arrives(guarded):
    """411 with the head alone: no waiting for a body or for the body timeout."""
    sock = connect(guarded.url)
    sock.sendall(b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\n\r\n")
    started = time.monotonic()
    answer = read_all(sock, timeout=3)
    assert answer.startswith(b"HTTP/1.1 411 ") and time.monotonic() - started < 1, answer[:100]


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
def test_a_body_on_a_method_that_takes_none_is_refused_unread(guarded, method):
    """A Content-Length on a GET (or HEAD, DELETE, OPTIONS) gets 400 and a closed connection, with the body
    never read: the answer comes while the client still holds the body back."""
    sock = connect(guarded.url)
    sock.sendall(f"{method} /login?next=/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n".encode())
    answer = read_all(sock, timeout=3)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert re.search(rb"(?i)connection: close", answer)


def test_next_comes_from_the_query_alone(client, monkeypatch):
    """GET /login reads `next` from its query only; a POST's from its form."""
    monkeypatch.setattr(chat.settings, "password", PASSWORD)
    page = plain_app().get("/login?next=/c/abc", status=200)
    assert 'name="next" value="/c/abc"' in page.text
    answer = plain_app().post("/login?next=/c/query", {"password": PASSWORD, "next": "/c/form"}, status=302)
    assert answer.headers["Location"].endswith("/c/form")


# -- 2. logins: slow for attackers, open for people --------------------------------------------------------

def test_wrong_passwords_from_this_machine_count_too(client, monkeypatch):
    """Loopback without a proxy (where ssh -L and other tunnels deliver strangers) has the same budget: 5 guesses,
    then 429 with Retry-After."""
    monkeypatch.setattr(chat.settings, "password", PASSWORD)
    browser = plain_app()
    statuses = [browser.post("/login", {"password": "guess"}, expect_errors=True).status_int for _ in range(7)]
    assert statuses == [401] * 5 + [429] * 2
    assert int(browser.post("/login", {"password": PASSWORD}, status=429).headers["Retry-After"]) >= 1


def test_guesses_from_one_ipv6_64_share_one_budget(client, monkeypatch):
    """Rotating addresses within one IPv6 /64 (one subscriber) buys no more guesses; another /64 has its own."""
    monkeypatch.setattr(chat.settings, "password", PASSWORD)
    statuses = [plain_app().post("/login", {"password": "guess"}, headers={"X-Forwarded-For": f"2001:db8:1:2::{n:x}"},
                                 expect_errors=True).status_int for n in range(1, 8)]
    assert statuses == [401] * 5 + [429] * 2
    plain_app().post("/login", {"password": "guess"}, headers={"X-Forwarded-For": "2001:db8:1:3::1"}, status=401)


def test_the_device_cookie_survives_a_restart_and_gets_in_during_an_attack(tmp_path):
    """A browser that logged in before keeps its signed device cookie across a restart; while rotating
    addresses guess, a new browser gets 429 with Retry-After and the known one still logs in; a tampered
    cookie counts as none."""
    env = dict(CHAT_PASSWORD=PASSWORD, CHAT_DEMO_DELAY="0.001")
    first = ChatProcess(tmp_path / "first.log", **env)
    known = session()
    try:
        assert known.post(f"{first.url}/login", data={"password": PASSWORD}, allow_redirects=False,
                          timeout=5).status_code in (302, 303)
    finally:
        first.stop()
    device = known.cookies[chat.DEVICE_COOKIE]
    known.cookies.clear()
    known.cookies.set(chat.DEVICE_COOKIE, device)
    again = ChatProcess(tmp_path / "again.log", **env)
    try:
        bystander = Bystander(again.url, PASSWORD).start()  # logged in before the attack: it has its session

        def guess(n):
            return requests.post(f"{again.url}/login", data={"password": f"guess {n}"},
                                 headers={"X-Forwarded-For": f"198.51.100.{n}"}, timeout=10).status_code
        statuses = [job.value for job in gevent.joinall([gevent.spawn(guess, n) for n in range(60)], timeout=20)]
        assert statuses.count(429) >= 40
        stranger = requests.post(f"{again.url}/login", data={"password": PASSWORD}, allow_redirects=False,
                                 headers={"X-Forwarded-For": "203.0.113.50"}, timeout=5)
        assert stranger.status_code == 429 and int(stranger.headers["Retry-After"]) >= 1
        assert "Wait" in stranger.text
        tampered = session()
        tampered.cookies.set(chat.DEVICE_COOKIE, device[:-2] + ("AA" if not device.endswith("AA") else "BB"))
        assert tampered.post(f"{again.url}/login", data={"password": PASSWORD}, allow_redirects=False,
                             timeout=5).status_code == 429
        response = known.post(f"{again.url}/login", data={"password": PASSWORD}, allow_redirects=False, timeout=5)
        assert response.status_code in (302, 303)
        assert known.get(f"{again.url}/", timeout=5).status_code == 200
        bystander.stop()
    finally:
        again.stop()


def test_a_known_device_has_a_small_budget_of_its_own(client, monkeypatch):
    """Guessing with a stolen device cookie gets that cookie's budget alone: 5, then 429."""
    monkeypatch.setattr(chat.settings, "password", PASSWORD)
    browser = plain_app()
    browser.post("/login", {"password": PASSWORD}, status=302)
    statuses = [browser.post("/login", {"password": "guess"}, headers={"X-Forwarded-For": f"198.51.100.{n}"},
                             expect_errors=True).status_int for n in range(7)]
    assert statuses == [401] * 5 + [429] * 2
    plain_app().post("/login", {"password": "guess"}, headers={"X-Forwarded-For": "203.0.113.1"}, status=401)


# -- 3. owners have a global ceiling -----------------------------------------------------------------------

def test_new_owners_from_rotating_addresses_hit_the_global_budget(tmp_path):
    """Cookie-less sends from 200 addresses: at most the global burst (20) plus a minute's rate get in, the rest
    429; the machine itself stays exempt; someone with a conversation is served all along."""
    process = ChatProcess(tmp_path / "chat.log", CHAT_DEMO_DELAY="0.001", CHAT_NEW_OWNERS_PER_MINUTE_TOTAL="60")
    try:
        bystander = Bystander(process.url)
        bystander.probe()  # an owner with a conversation before the flood
        bystander.start()
        started = time.monotonic()

        def send(n):
            return requests.post(f"{process.url}/streaming", data={"prompt": "flood"},
                                 headers={"X-Forwarded-For": f"198.51.{n // 250}.{n % 250 + 1}", **HX},
                                 timeout=10).status_code
        statuses = [job.value for job in gevent.joinall([gevent.spawn(send, n) for n in range(200)], timeout=30)]
        elapsed = time.monotonic() - started
        bystander.stop()
        assert set(statuses) <= {200, 429}
        assert 20 <= statuses.count(200) <= 20 + elapsed + 1
        local = [requests.post(f"{process.url}/streaming", data={"prompt": "local"}, headers=HX,
                               timeout=10).status_code for _ in range(5)]
        assert local == [200] * 5
    finally:
        process.stop()


# -- 6. search sees only its owner (the timing test is in test_limits_search.py) ---------------------------

def test_a_cookieless_search_flood_is_held_to_its_address_budget_and_slows_nobody(open_chat):
    """Four connections searching without a cookie (a new owner at every request, so no per-owner budget
    applies) from one address: past the per-address budget they get 429, and other people's chats go on."""
    bystander = Bystander(open_chat.url)
    bystander.probe()
    bystander.start()
    statuses = []

    def flood(connection):
        with session() as browser:
            for n in range(60):
                statuses.append(browser.get(f"{open_chat.url}/search", params={"q": f"word{n} other"},
                                            headers={"X-Forwarded-For": "198.51.100.77", **HX}, timeout=10).status_code)
    started = time.monotonic()
    gevent.joinall([gevent.spawn(flood, c) for c in range(4)], timeout=60, raise_error=True)
    elapsed = time.monotonic() - started
    bystander.stop()
    assert len(statuses) == 240 and set(statuses) <= {200, 429}
    assert statuses.count(200) <= 20 + 5 * elapsed + 1  # a burst of 20, then 5 a second


# -- 7. connections are shared fairly ----------------------------------------------------------------------

def test_one_address_cannot_take_every_connection(tmp_path):
    """A client holding its share (10 % of CHAT_MAX_CONNECTIONS) gets further connections closed at once with
    429, while another client is still served; a slot it gives back is its own again."""
    process = ChatProcess(tmp_path / "chat.log", CHAT_DEMO_DELAY="0.001", CHAT_MAX_CONNECTIONS="50",
                          CHAT_TRUSTED_PROXIES="192.0.2.1/32")  # loopback peers are clients here, not proxies
    try:
        held = [connect(process.url, "127.0.0.2") for _ in range(5)]
        bystander = Bystander(process.url, source="127.0.0.3")
        for _ in range(3):
            refused = connect(process.url, "127.0.0.2")
            started = time.monotonic()
            answer = read_all(refused, timeout=3)
            assert answer.startswith(b"HTTP/1.1 429 ") and time.monotonic() - started < 1, answer[:100]
            refused.close()
        bystander.probe()
        bystander.stop()
        held.pop().close()
        wait_until(lambda: exchange(connect(process.url, "127.0.0.2"),
                                    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").startswith(b"HTTP/1.1 200"),
                   timeout=5, what="the freed slot")
        for sock in held:
            sock.close()
    finally:
        process.stop()


def test_a_client_behind_the_proxy_holds_only_its_share(tmp_path):
    """Through the trusted proxy a kept-alive connection counts for the client of its latest request: one client
    past its share gets 429 and a closed connection, another is served, and a connection that carries another
    client's request moves to that client."""
    process = ChatProcess(tmp_path / "chat.log", CHAT_DEMO_DELAY="0.001", CHAT_MAX_CONNECTIONS="50")
    request = "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Forwarded-For: {}\r\n\r\n"
    try:
        held = [connect(process.url) for _ in range(5)]
        for sock in held:
            assert exchange(sock, request.format("198.51.100.9").encode()).startswith(b"HTTP/1.1 200 ")
        extra = connect(process.url)
        answer = exchange(extra, request.format("198.51.100.9").encode()) + read_all(extra, timeout=3)
        assert answer.startswith(b"HTTP/1.1 429 ") and re.search(rb"(?i)connection: close", answer), answer[:200]
        other = connect(process.url)
        assert exchange(other, request.format("203.0.113.4").encode()).startswith(b"HTTP/1.1 200 ")
        assert exchange(held[0], request.format("203.0.113.4").encode()).startswith(b"HTTP/1.1 200 ")
        again = connect(process.url)
        assert exchange(again, request.format("198.51.100.9").encode()).startswith(b"HTTP/1.1 200 ")
        for sock in [*held, other, again]:
            sock.close()
    finally:
        process.stop()


# -- 8. the smaller items ----------------------------------------------------------------------------------

def test_x_forwarded_host_is_believed_only_from_a_trusted_proxy(client, monkeypatch):
    """A redirect's target ignores X-Forwarded-Host from anyone but a trusted proxy; from a trusted proxy it must
    name a host this server answers for, else 421."""
    monkeypatch.setattr(chat.settings, "password", PASSWORD)
    stranger = plain_app()
    stranger.extra_environ["REMOTE_ADDR"] = "203.0.113.9"
    answer = stranger.get("/", headers={"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}, status=302)
    assert answer.headers["Location"].startswith("http://localhost:80/login"), answer.headers["Location"]
    plain_app().get("/", headers={"X-Forwarded-Host": "evil.example"}, status=421)
    monkeypatch.setattr(chat.settings, "allowed_hosts", {"chat.example"})
    answer = plain_app().get("/", headers={"X-Forwarded-Host": "chat.example", "X-Forwarded-Proto": "https"},
                             status=302)
    assert answer.headers["Location"].startswith("https://chat.example/login"), answer.headers["Location"]


def test_a_header_that_is_not_utf8_is_a_400(client, upstream):
    """A raw Latin-1 HX-Prompt on rename (or any header that is not UTF-8) gets 400 and one plain line."""
    conversation_id = send_in(client, "Hi")
    answer = client.post(f"/c/{conversation_id}/rename", headers={"HX-Prompt": "\xe9t\xe9"}, status=400)
    assert answer.text.count("\n") == 1 and "UTF-8" in answer.text


BAD = {
    400: b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n{accept}\r\nhello",
    404: b"GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}\r\n",
    405: b"PUT /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n{accept}\r\n",
    411: b"GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n{accept}\r\n",
    413: b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 900000000\r\n{accept}\r\n",
    416: b"GET /static/chat.css HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=99999999-\r\n{accept}\r\n",
    431: b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n{accept}X-Big: " + b"a" * 70000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("status", sorted(BAD))
def test_every_client_error_gets_the_sites_answer(open_chat, status):
    """Every 4xx, Bottle's and gevent's own included: the site's page for a browser (where its headers could be
    read), one short plain line for anyone else; no exception class names, nothing HTML-escaped in plain text,
    no traceback in the log."""
    for accept in (b"", b"Accept: text/html\r\n"):
        sock = connect(open_chat.url)
        sock.sendall(BAD[status].replace(b"{accept}", accept + b"Connection: close\r\n"))
        answer = read_all(sock, timeout=3)
        sock.close()
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:200]
        head, _, body = answer.partition(b"\r\n\r\n")
        text = body.decode()
        assert not re.search(r"\w+(Error|Exception)\b", text), text
        if accept and status != 431:  # 431: the headers could not be read, so nobody knows it is a browser
            assert b"text/html" in head and "<title>" in text and "chat.py" in text, text
        else:
            assert b"text/plain" in head and text.count("\n") == 1 and "&#" not in text and "<" not in text, text
    assert "Traceback" not in open_chat.log_path.read_text()
