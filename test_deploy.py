from gevent import monkey; monkey.patch_all()  # noqa: E702 — before anything imports socket (see conftest.py)

# Deploying chat.py: the README's and the docs' commands work as pasted, docs/deploy.md's nginx
# configuration in front of a real chat.Server, and the shipped single-file artifacts.

import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tomllib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import requests  # noqa: E402

import chat  # noqa: E402
from testkit import (  # noqa: E402
    FIRST, HERE, Nginx, SLOW_ANSWER, Transcript, alerts, assert_resume_without_loss, bare_env, choice, clean_env, data,
    deploy_nginx_block, doc_section, free_port, notes, post_prompt, proxy_sign_in_block, source_text, substitute,
    wait_until, web)


# ---------------------------------------------------------------------------
# The README run command, as a subprocess
# ---------------------------------------------------------------------------

def test_readme_run_command_serves_the_page_and_the_demo(chat_process):
    """The page, the vendored htmx files, /healthz and a demo answer from `python chat.py --port N`."""
    base = chat_process
    healthz = requests.get(f"{base}/healthz", timeout=5)
    assert healthz.text.startswith("ok") and "demo" in healthz.text
    page = requests.get(f"{base}/", timeout=5)
    assert page.status_code == 200
    assert '<textarea name="prompt"' in page.text and 'id="chat-messages"' in page.text
    for path in ("/static/htmx.min.js", "/static/htmx-ext-sse.js"):
        assert requests.get(base + path, timeout=5).status_code == 200, path

    stream_id = post_prompt(base, "hello from the smoke test")
    events = web.get(f"{base}/events", params={"stream": stream_id}, timeout=15)

    transcript = Transcript(events.content)
    assert "demo model" in transcript.message
    assert alerts(transcript.done) == []


def test_chat_scale_gets_the_running_script_as_chat():
    """Run as a script, chat.py is __main__: chat_scale.py's `import chat` must get that module (aliased in
    sys.modules), not load chat.py a second time, which would import chat_scale again half-way and fail."""
    result = subprocess.run([sys.executable, "chat.py", "--version"], cwd=HERE, capture_output=True, text=True,
                            timeout=30, env=clean_env(CHAT_REDIS_URL="redis://127.0.0.1:9/0"))
    assert result.returncode == 0 and result.stdout.startswith("chat.py "), result.stderr
    assert "chat_scale" in subprocess.run(
        [sys.executable, "-c", "import sys, chat; print(' '.join(sorted(sys.modules)))"], cwd=HERE,
        capture_output=True, text=True, timeout=30, env=clean_env(CHAT_REDIS_URL="redis://127.0.0.1:9/0")).stdout
    plain = subprocess.run([sys.executable, "-c", "import sys, chat; print('chat_scale' in sys.modules)"], cwd=HERE,
                           capture_output=True, text=True, timeout=30, env=clean_env())
    assert plain.stdout.strip() == "False", "the defaults must not load chat_scale.py"


def test_the_docs_show_the_settings_table_itself():
    """docs/configuration.md holds every setting as chat.py's SETTINGS renders it, and the README its short list:
    one source, so a setting added, renamed or re-defaulted in chat.py cannot be documented differently."""
    configuration = (HERE / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert chat.settings_table() in configuration, "regenerate: python -c \"import chat; print(chat.settings_table())\""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    assert chat.settings_table(common=True) in readme
    assert len(chat.settings_table(common=True).splitlines()) == 2 + 10  # the ten settings people change most
    assert {entry.env for entry in chat.SETTINGS} == set(re.findall(r"^\| `([A-Z_]+)`", configuration, re.M))


def test_help_documents_every_setting():
    """`python chat.py --help` exits 0 and names every environment variable."""
    result = subprocess.run([sys.executable, "chat.py", "--help"], cwd=HERE, capture_output=True, text=True,
                            timeout=30, env=clean_env(COLUMNS="100"))
    assert result.returncode == 0, result.stderr
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CHAT_MODEL", "HOST", "PORT", "CHAT_DB"):
        assert name in result.stdout, name


# ---------------------------------------------------------------------------
# The README is a first screen whose commands work as pasted; the docs' links lead somewhere
# ---------------------------------------------------------------------------

# On stock Debian 12 and Ubuntu 24.04 there is python3 but no python, and pip refuses to install into the
# system's Python (PEP 668): each command makes a venv and runs the venv's Python.
README_COMMANDS = {
    "## Run it": "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt && .venv/bin/python chat.py",
    "## Test it": "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r requirements-scale.txt"
                  " -r ship/requirements.txt pytest==9.2.0 webtest==3.0.7 playwright==1.65.2"
                  " && .venv/bin/python -m pytest -q",
    "## Deploy": "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r ship/requirements.txt"
                 " && .venv/bin/python ship/build.py",
}


def test_readme_is_a_first_screen_whose_commands_work_as_pasted():
    """README.md fits 250 lines; the first block under Run it, Test it and Deploy is its command, exactly; and
    .ci/run runs the Test it command, exactly."""
    readme = (HERE / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250, f"README.md has {len(readme.splitlines())} lines"
    for heading, command in README_COMMANDS.items():
        block = re.search(r"^```[^\n]*\n(.*?)^```$", doc_section("README.md", heading), re.M | re.S)
        assert block and block.group(1).strip() == command, f"the first block under {heading}"
    ci_lines = (HERE / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert README_COMMANDS["## Test it"] in ci_lines


def test_docs_links_lead_to_files_that_exist():
    """Every relative link and image in README.md, docs/*.md and bench/README.md names a file or folder that
    exists, without an #anchor (a heading can be renamed unnoticed; a file cannot)."""
    pages = [HERE / "README.md", HERE / "bench" / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S)  # code blocks and spans hold no links
        text = re.sub(r"`[^`\n]*`", "", text)
        targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)
        for target in targets:
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            name = page.relative_to(HERE)
            assert "#" not in target, f"{name}: {target} has an anchor"
            assert (page.parent / target).exists(), f"{name}: {target} does not exist"
            checked += 1
    assert checked >= 20, checked


def test_chat_py_carries_its_requirements_inline():
    """chat.py opens with PEP 723 metadata, so `uv run chat.py` and `pipx run chat.py` work: requirements.txt's
    pins, exactly, and the Python the suite runs on."""
    source = (HERE / "chat.py").read_text(encoding="utf-8")
    assert source.startswith("# /// script\n")
    # PEP 723's reference regular expression.
    blocks = list(re.finditer(r"(?m)^# /// (?P<type>[a-zA-Z0-9-]+)$\s(?P<content>(^#(| .*)$\s)+)^# ///$", source))
    assert [block.group("type") for block in blocks] == ["script"]
    content = "".join(line[2:] if line.startswith("# ") else line[1:]
                      for line in blocks[0].group("content").splitlines(keepends=True))
    pins = [line.split("#")[0].strip() for line in (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    assert tomllib.loads(content) == {"requires-python": ">=3.11", "dependencies": [pin for pin in pins if pin]}


# ---------------------------------------------------------------------------
# Behind nginx: docs/deploy.md's configuration, exactly, in front of a real chat.Server
# ---------------------------------------------------------------------------

def post_from_page(front, path, origin=None, **data):
    """POST like the page does: through nginx, with the page's own Origin (or the one given)."""
    return web.post(f"{front.url}{path}", data=data, headers={"Origin": origin or front.origin}, timeout=5)


def prompt_via(front, prompt="Hi"):
    """POST a prompt from the page through nginx; return the stream id."""
    response = post_from_page(front, "/streaming", prompt=prompt)
    assert response.status_code == 200, response.text
    return re.search(r'sse-connect="/events\?stream=([A-Za-z0-9_-]+)"', response.text).group(1)


def test_nginx_passes_a_token_on_while_the_upstream_still_streams(upstream, via_nginx, sse_via_nginx):
    """Through nginx the first token arrives while the upstream is blocked mid-body, not when it finishes."""
    reply = upstream.serve(SLOW_ANSWER, pause_at=FIRST)
    reader = sse_via_nginx(prompt_via(via_nginx))

    reader.read_until(lambda t: t.message == "Hello", what="the first token through nginx")

    assert not upstream.last.answered.is_set() and not reply.gate.is_set()
    upstream.release()
    assert reader.read_until(lambda t: t.finished, what="done").message == "Hello there, friend."


def test_nginx_sends_event_stream_headers_before_the_first_token(upstream, via_nginx, sse_via_nginx):
    """/events through nginx: 200, text/event-stream, no-cache, before the upstream sent any body."""
    upstream.serve(SLOW_ANSWER, pause_at=0)
    reader = sse_via_nginx(prompt_via(via_nginx))

    headers = reader.response.headers
    assert reader.response.status_code == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache"
    assert headers["Server"].startswith("nginx")  # really through nginx
    assert reader.read_until(lambda t: "connected" in t.comments, what="the hello comment").events == []
    upstream.release()
    assert reader.read_until(lambda t: t.finished).message == "Hello there, friend."


@pytest.mark.parametrize("reconnect", ["while-streaming", "after-done"])
def test_nginx_last_event_id_resumes_without_loss_or_repeat(upstream, via_nginx, sse_via_nginx, reconnect):
    """Disconnect from nginx after one token, reconnect with Last-Event-ID: all events once, ids 1..n."""
    upstream.serve(SLOW_ANSWER, pause_at=data(choice({"content": ","})))
    assert_resume_without_loss(upstream, prompt_via(via_nginx), sse_via_nginx, reconnect)


def test_nginx_stop_closes_upstream_and_keeps_partial_answer(upstream, via_nginx, sse_via_nginx):
    """POST /stop through nginx: 204, the upstream connection closes, the bubble keeps the text and says Stopped."""
    upstream.serve(SLOW_ANSWER, pause_at=data(choice({"content": " there"})))
    stream_id = prompt_via(via_nginx)
    reader = sse_via_nginx(stream_id)
    reader.read_until(lambda t: t.message == "Hello there", what="the first tokens")

    response = web.post(f"{via_nginx.url}/stop", params={"stream": stream_id},
                        headers={"Origin": via_nginx.origin}, timeout=5)

    assert response.status_code == 204
    wait_until(lambda: upstream.last.client_closed.is_set(), what="the upstream to see its connection closed")
    bubble = reader.read_until(lambda t: t.finished, what="done").done
    assert source_text(bubble) == "Hello there"
    assert "Stopped." in notes(bubble)
    assert alerts(bubble) == []
    assert not upstream.last.answered.is_set()


def test_nginx_keeps_the_pages_own_posts_same_origin(upstream, via_nginx):
    """Through nginx the page's own Origin (host:port) is accepted and another site's is refused."""
    assert post_from_page(via_nginx, "/streaming", prompt="Hi").status_code == 200
    assert post_from_page(via_nginx, "/streaming", origin="https://evil.example", prompt="Hi").status_code == 403
    assert via_nginx.seen[0]["host"] == f"127.0.0.1:{via_nginx.port}"


def test_nginx_host_without_port_would_refuse_the_pages_own_posts(nginx, upstream, tmp_path):
    """With `Host $host` (port dropped) instead of docs/deploy.md's `$http_host`, chat.py refuses the page's POST."""
    block = substitute(deploy_nginx_block(), "proxy_set_header Host $http_host;", "proxy_set_header Host $host;")
    front = Nginx(tmp_path, nginx.chat_port, block)
    try:
        response = web.post(f"{front.url}/streaming", data={"prompt": "Hi"}, headers={"Origin": front.origin},
                            verify=str(front.cert), timeout=5)
    finally:
        front.stop()
    assert response.status_code == 403


def test_nginx_tells_chat_py_the_host_scheme_and_client(via_nginx, monkeypatch):
    """chat.py sees the browser's Host with its port, https, and the real client (a forged X-Forwarded-For is replaced)."""
    monkeypatch.setattr(chat.settings, "password", "correct horse")
    response = web.get(f"{via_nginx.url}/", headers={"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "http",
                                                     "HX-Request": None},
                       allow_redirects=False, timeout=5)

    assert response.status_code in (302, 303)
    assert response.headers["Location"] == f"{via_nginx.url}/login?next=%2F"
    (seen,) = [r for r in via_nginx.seen if r["path"] == "/"]
    assert seen["host"] == f"127.0.0.1:{via_nginx.port}"
    assert seen["forwarded_proto"] == "https"
    assert seen["forwarded_for"] == seen["remote_addr"] == "127.0.0.1"


def test_nginx_reuses_its_connection_to_chat_py(via_nginx):
    """keepalive + HTTP/1.1 + empty Connection: requests one after another share one connection to chat.py."""
    for _ in range(3):
        assert web.get(f"{via_nginx.url}/healthz", timeout=5).status_code == 200
    assert len({r["peer_port"] for r in via_nginx.seen}) == 1


def test_nginx_lets_a_prompt_at_the_limit_through(upstream, via_nginx):
    """A prompt at the limit in 4-byte characters passes nginx; one more character gets chat.py's own 413."""
    at_limit = "😀" * chat.settings.max_prompt
    assert post_from_page(via_nginx, "/streaming", prompt=at_limit).status_code == 200

    response = post_from_page(via_nginx, "/streaming", prompt=at_limit + "😀")
    assert response.status_code == 413
    assert f"the limit is {chat.settings.max_prompt:,}" in response.text


def test_nginx_lets_a_message_with_attachments_at_their_limit_through(upstream, via_nginx):
    """client_max_body_size leaves room for CHAT_MAX_ATTACHMENTS_MB of files; a bigger image gets chat.py's own
    sentence, not nginx's page."""
    gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
    files = [("attachment", (f"{n}.gif", gif + b"\x00" * (4 << 20), "image/gif")) for n in range(2)]
    headers = {"Origin": via_nginx.origin, "HX-Request": "true"}
    assert web.post(via_nginx.url + "/streaming", data={"prompt": "two pictures"}, files=files, headers=headers,
                    timeout=30).status_code == 200
    big = [("attachment", ("big.gif", gif + b"\x00" * (11 << 20), "image/gif"))]
    refused = web.post(via_nginx.url + "/streaming", data={"prompt": "one"}, files=big, headers=headers, timeout=30)
    assert refused.status_code == 413 and "the limit for an image is 10.0 MB" in refused.text


def test_nginx_signs_people_in_with_the_documented_user_header(upstream, tmp_path, monkeypatch):
    """docs/deploy.md's sign-in block: whoever gives nginx a password chats as that user; no password gets nginx's
    401; a Remote-User the client makes up is replaced by nginx's."""
    monkeypatch.setattr(chat.settings, "auth_header", "Remote-User")
    (tmp_path / "htpasswd").write_text("alice:{PLAIN}alice's secret\nbob:{PLAIN}bob's secret\n")
    srv = chat.Server(("127.0.0.1", 0), chat.app, log=None)
    srv.start()
    front = None
    try:
        front = Nginx(tmp_path, srv.server_port, proxy_sign_in_block(),
                      replace=[("/etc/nginx/chat.htpasswd", str(tmp_path / "htpasswd"))])
        alice, bob = requests.Session(), requests.Session()
        for session, name in ((alice, "alice"), (bob, "bob")):
            session.auth, session.verify = (name, f"{name}'s secret"), str(front.cert)
            session.trust_env = False  # else REQUESTS_CA_BUNDLE wins over session.verify (requests #3829)
            session.headers.update({"Origin": front.origin, "HX-Request": "true"})
        assert alice.post(front.url + "/streaming", data={"prompt": "from alice"}, timeout=10).status_code == 200
        conversation = chat.store.conversations(chat.store.user("alice")["owner"])[0]["id"]
        assert alice.get(f"{front.url}/c/{conversation}", timeout=10).status_code == 200
        forged = bob.get(f"{front.url}/c/{conversation}", headers={"Remote-User": "alice"}, timeout=10)
        assert forged.status_code == 404  # bob stays bob
        assert requests.get(f"{front.url}/", verify=str(front.cert), timeout=10).status_code == 401
        assert requests.get(f"{front.url}/healthz", verify=str(front.cert), timeout=10).text == "ok\n"
        assert "Signed in as alice" in alice.get(front.url + "/account", timeout=10).text
    finally:
        if front:
            front.stop()
        srv.stop(timeout=2)


def test_nginx_redirects_plain_http_to_https(via_nginx):
    """The port-80 server answers every request with a permanent redirect to the same URL over https."""
    response = requests.get(f"http://127.0.0.1:{via_nginx.http_port}/c/abc?x=1", allow_redirects=False, timeout=5)
    assert response.status_code == 301
    assert response.headers["Location"] == "https://127.0.0.1/c/abc?x=1"


def nginx_seconds(value):
    """An nginx time ("90", "90s", "15m", "1h", "1h 30m") in seconds."""
    units = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)([smhd]?)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), f"not an nginx time: {value!r}"
    return sum(int(n) * units[u] for n, u in parts)


def test_nginx_event_streams_outlast_the_longest_answer():
    """docs/deploy.md's /events location buffers nothing and waits longer than a 15-minute answer between reads."""
    events = re.search(r"location = /events \{(.*?)\}", deploy_nginx_block(), re.S)
    assert events, "docs/deploy.md's nginx block has no `location = /events`"
    assert re.search(r"^\s*proxy_buffering off;", events.group(1), re.M)
    timeout = re.search(r"^\s*proxy_read_timeout ([^;]+);", events.group(1), re.M)
    assert timeout and nginx_seconds(timeout.group(1)) >= 15 * 60


# ---------------------------------------------------------------------------
# The shipped artifacts: dist/chat.pyz and dist/chat, each alone in an empty folder
# ---------------------------------------------------------------------------

def without_python(path):
    """PATH without any folder that holds a python or python3."""
    return os.pathsep.join(d for d in path.split(os.pathsep)
                           if not any(os.access(os.path.join(d, name), os.X_OK) for name in ("python", "python3")))


def place(request, tmp_path, kind, isolated=True):
    """Copy one artifact alone into an empty folder; return that folder, the command to run there and its env."""
    artifact = getattr(request.getfixturevalue("artifacts"), kind)
    folder = tmp_path / "alone"
    folder.mkdir()
    shutil.copy2(artifact, folder / artifact.name)
    home = tmp_path / "home"
    home.mkdir()
    env = bare_env(home, CHAT_DEMO_DELAY="0.001")
    if kind == "pyz":
        env["SHIV_ROOT"] = str(tmp_path / "shiv")  # shiv unpacks its packages here on the first run
        python = request.getfixturevalue("bare_python")
        return folder, [str(python), *(["-I"] if isolated else []), artifact.name], env
    env["PATH"] = without_python(env["PATH"])
    assert shutil.which("python3", path=env["PATH"]) is None and shutil.which("python", path=env["PATH"]) is None
    return folder, ["./" + artifact.name], env


class ArtifactProcess:
    """An artifact serving on a free loopback port from its folder, in a session of its own (for Ctrl-C)."""

    def __init__(self, command, folder, env, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen([*command, "--port", str(self.port)], cwd=folder, env=env,
                                            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(self.answering, timeout=60, what=f"GET / of {' '.join(command)}")
        except BaseException:
            self.kill()
            raise

    @property
    def output(self):
        """What it printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def answering(self):
        """True once GET / answers 200; fails at once if the process died."""
        assert self.process.poll() is None, f"it exited with {self.process.returncode}: {self.output}"
        try:
            return web.get(self.url + "/", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def stop(self, signum):
        """SIGTERM to the process (as docker does) or SIGINT to its group (as Ctrl-C does); return the exit code."""
        if signum == signal.SIGINT:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout=15)
        finally:
            self.kill()

    def kill(self):
        """Kill whatever is left of its process group."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


@pytest.mark.parametrize("kind, isolated, signum", [
    ("pyz", True, signal.SIGTERM), ("pyz", False, signal.SIGINT),
    ("exe", None, signal.SIGTERM), ("exe", None, signal.SIGINT),
], ids=["pyz-isolated-sigterm", "pyz-ctrl-c", "exe-sigterm", "exe-ctrl-c"])
def test_artifact_alone_serves_the_page_and_the_demo_and_stops_cleanly(request, tmp_path, kind, isolated, signum):
    """Alone with no Python packages about: the page, htmx, a streamed demo answer, chat.db there, a clean stop."""
    folder, command, env = place(request, tmp_path, kind, isolated)
    app = ArtifactProcess(command, folder, env, tmp_path / "chat.log")
    try:
        page = web.get(app.url + "/", timeout=5)
        assert '<textarea name="prompt"' in page.text and 'src="/static/htmx.min.js"' in page.text
        for name in ("htmx.min.js", "htmx-ext-sse.js", "chat.css"):
            served = web.get(f"{app.url}/static/{name}", timeout=5)
            assert served.status_code == 200 and served.content == (HERE / "static" / name).read_bytes(), name

        stream_id = post_prompt(app.url, "hello from the shipped artifact")
        transcript = Transcript(web.get(f"{app.url}/events", params={"stream": stream_id}, timeout=30).content)
        assert "demo model" in transcript.message
        done = transcript.done
        assert alerts(done) == []
        assert "<strong>" in done and "<ol>" in done  # markdown-it rendered it
        assert '<span class="k">def</span>' in done  # Pygments found its Python lexer
        assert (folder / "chat.db").exists()
    finally:
        code = app.stop(signum)
    output = app.output
    assert code == 0, output
    assert "Traceback" not in output and not re.search(r"\w+Warning:", output), output
    assert "shutting down" in output

    with sqlite3.connect(folder / "chat.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("SELECT count(*) FROM conversations").fetchone() == (1,)
        rows = db.execute("SELECT role, status, content FROM messages ORDER BY id").fetchall()
    assert [(role, status) for role, status, _ in rows] == [("user", "done"), ("assistant", "done")]
    assert rows[0][2] == "hello from the shipped artifact" and "demo model" in rows[1][2]


@pytest.mark.parametrize("kind, isolated", [("pyz", True), ("pyz", False), ("exe", None)],
                         ids=["pyz-isolated", "pyz", "exe"])
def test_artifact_help_and_version(request, artifacts, tmp_path, kind, isolated):
    """--version names the version and the commit built; --help documents the flags and settings; both exit 0."""
    folder, command, env = place(request, tmp_path, kind, isolated)
    version = subprocess.run([*command, "--version"], cwd=folder, env=env, capture_output=True, text=True,
                             timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout == f"chat.py {chat.VERSION} ({artifacts.commit})\n"
    helped = subprocess.run([*command, "--help"], cwd=folder, env={**env, "COLUMNS": "100"},
                            capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    for name in ("--port", "--db", "--base-url", "OPENAI_BASE_URL", "CHAT_DB", "CHAT_PASSWORD"):
        assert name in helped.stdout, name
    assert version.stderr == helped.stderr == ""  # no warnings
    assert sorted(os.listdir(folder)) == [Path(command[-1]).name]  # nothing written beside it
