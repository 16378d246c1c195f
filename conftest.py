from gevent import monkey; monkey.patch_all()  # noqa: E702 — must run before anything imports socket
"""The suite's fixtures: chat.py isolated from the real world for every test, the databases, the fake
upstream, in-process and real servers, the browser, nginx, Redis and the shipped artifacts; and the
markers both_databases and both_deployments, which run a test on each database or deployment.

The plain classes and functions the fixtures use are in testkit.py."""

import importlib.util  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

import chat  # noqa: E402
from testkit import (  # noqa: E402
    BASE_SEED, Built, CHROMIUM, CHROMIUM_ARGS, ChatProcess, FakeUpstream, HERE, Nginx, PG_BIN, PROXY_VARS, PageWatch,
    RedisServer, SERVERS, SSEReader, Seen, bare_env, build_key, deploy_nginx_block, free_port, head_commit, htmx_app,
    prune_builds, scaled_nginx_block, web)


def pytest_configure(config):
    """The markers that run a test more than once."""
    config.addinivalue_line("markers", "both_databases: run the test once on SQLite and once on the suite's PostgreSQL")
    config.addinivalue_line("markers", "both_deployments: run the page test against one `python chat.py` and against "
                                       "two behind nginx sharing Redis (live_chat, once per module and deployment)")


def pytest_generate_tests(metafunc):
    """Run the storage tests once on SQLite and once on PostgreSQL, and some page tests on two processes."""
    if metafunc.definition.get_closest_marker("both_databases"):
        metafunc.parametrize("database", ["sqlite", "postgresql"], indirect=True)
    if metafunc.definition.get_closest_marker("both_deployments"):
        metafunc.parametrize("live_chat", ["one process", "two behind nginx"], indirect=True, scope="module")


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """Point chat.py at nothing real (no env upstream, key, proxy or database) and leave no stream running."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setattr(chat.settings, "base_url", "http://127.0.0.1:9/v1")  # discard port: refused
    monkeypatch.setattr(chat.settings, "api_key", None)
    monkeypatch.setattr(chat.settings, "model", "test-model")
    monkeypatch.setattr(chat.settings, "password", None)
    monkeypatch.setattr(chat, "store", chat.Store(str(tmp_path / "chat.db")))
    monkeypatch.setattr(chat, "catalog", chat.ModelCatalog())
    monkeypatch.setattr(chat, "limits", chat.Limits())
    web.cookies.clear()
    yield
    for stream in list(chat.streams.by_id.values()):
        if stream.greenlet:
            stream.greenlet.kill(block=True, timeout=2)
    chat.streams.by_id.clear()
    chat.streams.by_owner.clear()
    chat.streams.unsaved.clear()
    chat.store.close()


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL cluster of the suite's own: initdb and pg_ctl as the postgres user, fsync off, a free port."""
    if PG_BIN is None or importlib.util.find_spec("psycopg") is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL or psycopg is missing under CI (apt-get install postgresql; "
                        "pip install -r requirements-scale.txt)")
        pytest.skip("no PostgreSQL here (apt-get install postgresql; pip install -r requirements-scale.txt)")
    root = Path(tempfile.mkdtemp(prefix="chat-pg-"))
    root.chmod(0o755)
    data = root / "data"
    data.mkdir()
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    if as_postgres:
        shutil.chown(data, "postgres")
    port = free_port()
    subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "chat", "-E", "UTF8",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off", "start"], check=True, capture_output=True, timeout=60)
    try:
        yield f"postgresql://chat@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def database(request, monkeypatch, isolated):
    """chat.py's store: the SQLite file of `isolated`, or (parametrized) a fresh schema in the suite's PostgreSQL."""
    if getattr(request, "param", "sqlite") == "postgresql":
        import psycopg
        url = request.getfixturevalue("postgres_url")
        with psycopg.connect(url, autocommit=True) as connection:
            connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        monkeypatch.setattr(chat, "store", chat.Store(url=url))
        monkeypatch.setattr(chat.settings, "database_url", url)
    return getattr(request, "param", "sqlite")


@pytest.fixture
def upstream(monkeypatch):
    """A fake upstream on a random loopback port, with chat.py configured to use it."""
    fake = FakeUpstream()
    fake.serve("openai-basic.sse")  # a plain answer until the test serves something else
    monkeypatch.setattr(chat.settings, "base_url", fake.url)
    yield fake
    fake.stop()


@pytest.fixture
def client():
    """chat.app in process through WebTest (lint on), as a browser on this machine."""
    return htmx_app()


@pytest.fixture
def server():
    """chat.app on a real gevent chat.Server on a random loopback port; yields its base URL."""
    srv = chat.Server(("127.0.0.1", 0), chat.app, log=None)
    srv.start()
    url = f"http://127.0.0.1:{srv.server_port}"
    SERVERS[url] = srv
    yield url
    srv.stop(timeout=2)
    del SERVERS[url]


@pytest.fixture
def open_sse(server):
    """Open /events readers on the real server; all are closed at teardown."""
    readers = []

    def open_reader(stream_id, last_event_id=None):
        reader = SSEReader(server, stream_id, last_event_id)
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


@pytest.fixture
def seed(request):
    """A per-test seed for random chunk boundaries, printed so a failure can be replayed."""
    value = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (1 << 31)
    print(f"random chunk boundaries: CHAT_TEST_SEED={BASE_SEED} (this test's seed {value})")
    return value


@pytest.fixture
def demo(server, monkeypatch):
    """chat.py on its built-in demo model, served by the real server itself."""
    monkeypatch.setattr(chat.settings, "base_url", None)
    monkeypatch.setattr(chat.settings, "model", None)
    monkeypatch.setattr(chat.settings, "port", int(server.rsplit(":", 1)[1]))
    monkeypatch.setattr(chat.settings, "demo_delay", 0)
    return server


@pytest.fixture
def chat_process(tmp_path):
    """`python chat.py --port <free port>` on the demo model, running from the repo; yields its base URL."""
    app = ChatProcess(tmp_path / "chat.log", CHAT_DB=str(tmp_path / "chat.db"), CHAT_DEMO_DELAY="0.001")
    yield app.url
    app.stop()


# ---------------------------------------------------------------------------
# The page in a real browser: Playwright driving Debian's Chromium, against
# `python chat.py` as a subprocess and the fake upstream
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page_upstream():
    """One fake upstream for the browser tests; each test serves its own answer."""
    fake = FakeUpstream()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def live_chat(request, page_upstream, tmp_path_factory):
    """python chat.py talking to the fake upstream; or (parametrized) two of them sharing Redis and their SQLite
    file, behind nginx with docs/scale-out.md's upstream block, which takes them in turn request by request."""
    folder = tmp_path_factory.mktemp("live")
    settings = dict(OPENAI_BASE_URL=page_upstream.url, CHAT_MODEL="test-model", NO_PROXY="127.0.0.1",
                    CHAT_STREAM_GRACE="30")
    if getattr(request, "param", "one process") == "one process":
        app = ChatProcess(folder / "chat.log", **settings)
        yield app
        app.stop()
        return
    redis = request.getfixturevalue("redis_server")
    # Through nginx every browser comes from nginx's address: the new-browser bucket is for the real world.
    workers = [ChatProcess(folder / f"chat-{n}.log", CHAT_REDIS_URL=redis.url, CHAT_NEW_OWNERS_PER_MINUTE="1000",
                           **settings) for n in range(2)]
    try:
        front = Nginx(tmp_path_factory.mktemp("nginx"), workers[0].port, scaled_nginx_block(workers[1].port))
    except BaseException:
        for worker in workers:
            worker.stop()
        raise
    yield front
    front.stop()
    for worker in workers:
        worker.stop()
    posts = [w.log_path.read_text().count("POST /streaming") for w in workers]
    events = [w.log_path.read_text().count("GET /events") for w in workers]
    print(f"POST /streaming per process: {posts}; GET /events per process: {events}")
    # Both took part: answers were posted on one process and read on the other.
    assert all(posts) and all(events), f"nginx sent every send or every read to one process: {posts}, {events}"


@pytest.fixture(scope="module")
def browser():
    """Headless Debian Chromium through Playwright; without it the tests skip locally and fail under CI."""
    try:
        from playwright.sync_api import sync_playwright
        if not os.path.exists(CHROMIUM):
            raise FileNotFoundError(f"{CHROMIUM} is missing (apt-get install chromium)")
        playwright = sync_playwright().start()
    except Exception as exc:  # noqa: BLE001 — any reason the browser cannot start
        if os.environ.get("CI"):
            pytest.fail(f"the browser cannot start under CI: {exc}")
        pytest.skip(f"no browser here: {exc}")
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    except Exception as exc:  # noqa: BLE001
        playwright.stop()
        if os.environ.get("CI"):
            pytest.fail(f"the browser cannot start under CI: {exc}")
        pytest.skip(f"the browser does not start here: {exc}")
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def context(browser):
    """A fresh browser context (own cookies, clipboard allowed)."""
    ctx = browser.new_context(viewport={"width": 1000, "height": 700}, ignore_https_errors=True)  # nginx's own
    ctx.grant_permissions(["clipboard-read", "clipboard-write"])
    yield ctx
    ctx.close()


@pytest.fixture
def watches():
    """Every page a test opens is checked for console errors at the end."""
    opened = []
    yield opened
    for watch in opened:
        assert watch.unexpected_errors() == [], "console errors on the page"


@pytest.fixture
def open_page(context, live_chat, watches):
    """Open the chat page in a new tab (of the test's context, or a given one); returns its PageWatch."""
    def opener(ctx=None, url=None):
        page = (ctx or context).new_page()
        page.set_default_timeout(10_000)
        watch = PageWatch(page)
        watches.append(watch)
        page.goto(url or live_chat.url + "/")
        page.wait_for_function("() => window.htmx && htmx.version")
        return watch
    return opener


# ---------------------------------------------------------------------------
# Behind nginx: docs/deploy.md's configuration, exactly, in front of a real chat.Server
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    """chat.app on a real chat.Server (TCP on loopback) behind docs/deploy.md's nginx block; yields the Nginx."""
    seen = Seen(chat.app)
    srv = chat.Server(("127.0.0.1", 0), seen, log=None)
    srv.start()
    try:
        front = Nginx(tmp_path_factory.mktemp("nginx"), srv.server_port, deploy_nginx_block())
    except BaseException:
        srv.stop(timeout=2)
        raise
    front.seen = seen.requests
    yield front
    front.stop()
    srv.stop(timeout=2)


@pytest.fixture
def via_nginx(nginx, monkeypatch):
    """docs/deploy.md's nginx in front of chat.py; the test's browser-like client trusts its certificate."""
    monkeypatch.setattr(web, "verify", str(nginx.cert))
    nginx.seen.clear()
    return nginx


@pytest.fixture
def sse_via_nginx(via_nginx):
    """Open /events readers through nginx; all are closed at teardown."""
    readers = []

    def open_reader(stream_id, last_event_id=None):
        reader = SSEReader(via_nginx.url, stream_id, last_event_id)
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


# ---------------------------------------------------------------------------
# The shipped artifacts: dist/chat.pyz and dist/chat, each alone in an empty folder
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def artifacts():
    """Both artifacts, built by ship/build.py once per source state and cached; no build tools: skip, or fail in CI."""
    missing = [name for name in ("shiv", "PyInstaller") if importlib.util.find_spec(name) is None]
    if missing:
        message = f"{' and '.join(missing)} not installed (pip install -r ship/requirements.txt)"
        if os.environ.get("CI"):
            pytest.fail(f"cannot build the artifacts under CI: {message}")
        pytest.skip(message)
    commit = head_commit()
    key = build_key(commit)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "chat.py-build" / key
    built = Built(cache / "chat.pyz", cache / "chat", commit)
    if not (built.pyz.exists() and built.exe.exists()):
        # Build beside the cache entry and rename it into place: an interrupted build leaves no entry.
        partial = cache.with_name(f"{key}.{os.getpid()}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run([sys.executable, "ship/build.py", "--out", str(partial)], cwd=HERE,
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0 or build_key(head_commit()) != key:
            shutil.rmtree(partial, ignore_errors=True)
            pytest.fail(f"ship/build.py failed:\n{result.stdout}\n{result.stderr}" if result.returncode else
                        "the sources or HEAD changed during the build: run the tests again")
        try:
            partial.rename(cache)
        except OSError:  # another run cached the same build meanwhile
            shutil.rmtree(partial)
        prune_builds(cache.parent)
    return built


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory):
    """A venv made --without-pip: the interpreter's standard library and no package of its own."""
    bare = tmp_path_factory.mktemp("bare-python")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120,
                   env=bare_env(bare))
    python = bare / "bin" / "python3"
    for isolated in (["-I"], []):
        probe = subprocess.run([str(python), *isolated, "-c", "import bottle"], capture_output=True,
                               env=bare_env(bare), timeout=30)
        assert probe.returncode != 0, "the bare Python can import bottle: it is not bare"
    return python


# ---------------------------------------------------------------------------
# Scale out: several chat.py processes sharing Redis and PostgreSQL
# ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """The suite's redis-server; skipped without redis-server or redis-py, failing under CI."""
    if importlib.util.find_spec("redis") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-py is missing under CI (pip install -r requirements-scale.txt)")
        pytest.skip("no redis-py here (pip install -r requirements-scale.txt)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop(kill=True)


@pytest.fixture
def redis_url(redis_server):
    """The suite's Redis, emptied for this test."""
    if redis_server.process.poll() is not None:
        redis_server.start()
    assert redis_server.command(b"FLUSHALL") == b"+OK\r\n"
    return redis_server.url


@pytest.fixture
def cluster(tmp_path, upstream, redis_url, postgres_url):
    """cluster(n, **env): n `python chat.py` processes on their own ports, sharing Redis and a fresh PostgreSQL,
    all talking to the fake upstream."""
    import psycopg
    with psycopg.connect(postgres_url, autocommit=True) as connection:
        connection.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    started = []

    def start(count=3, **env):
        settings = dict(OPENAI_BASE_URL=upstream.url, CHAT_MODEL="test-model", CHAT_REDIS_URL=redis_url,
                        CHAT_DATABASE_URL=postgres_url, **env)
        for index in range(count):
            started.append(ChatProcess(tmp_path / f"chat-{len(started)}.log", **settings))
        return started[-count:]

    yield start
    for process in started:
        process.stop()
    for process in started:  # whatever a test checks, no process may have hit an error on the way
        assert "Traceback" not in process.log_path.read_text(), process.log_path.read_text()[-3000:]
