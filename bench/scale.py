"""chat.py scaling benchmark: one process vs two, in-process streams vs Redis, resume across processes.

    pip install -r requirements.txt -r requirements-scale.txt -r bench/requirements.txt
    python bench/scale.py            # ~4 minutes on 2 cores
    python bench/scale.py --quick    # ~1.5 minutes, smaller sizes

Needs Debian's redis-server (and, for the PostgreSQL figures, its postgresql: skipped when
missing). Starts its own fake upstream (bench/upstream.py), redis-server and PostgreSQL on
free loopback ports in a temporary folder, a fresh chat.py per scenario, and the load
client (bench/client.py). Prints one table and writes bench/results/scale.json.

Pinning: a single chat.py process runs on core 0 and the harness (client, upstream) on
core 1, as in run.py. Two workers run on both cores, sharing core 1 with the harness: on a
2-core machine that is what "every core" means, and the harness's share is printed.

    python bench/scale.py --workers max  # only tokens/s of --workers 1, 2, 4 … half the cores; offline, needs redis-server
On 2 cores this shows little: it is meant for a quiet many-core machine, carried there with its wheels (pip download
-r requirements.txt -r requirements-scale.txt -r bench/requirements.txt -d wheels; pip install --no-index --find-links
wheels -r …) and Debian's redis-server.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import run  # bench/run.py: spawn, kill, free_port, wait_http, start_upstream, machine
from client import percentiles

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PY = sys.executable
STREAM_RE = re.compile(rb'sse-connect="/events\?stream=([\w-]+)"')
COOKIE_RE = re.compile(rb"Set-Cookie: (chat_owner=[^;]+)", re.I)
ID_RE = re.compile(rb"^id: (\d+)$", re.M)


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------

def start_redis(folder, logdir):
    """redis-server with no persistence on a free port; returns the process (with .port, .url)."""
    port = run.free_port()
    proc = run.spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                      "--dir", folder], 1, os.path.join(logdir, "redis.log"))
    proc.port, proc.url = port, f"redis://127.0.0.1:{port}/0"
    end = time.monotonic() + 10
    while redis_command(port, "PING") != "PONG":
        if time.monotonic() > end or proc.poll() is not None:
            raise RuntimeError("redis-server did not start; see " + os.path.join(logdir, "redis.log"))
        time.sleep(0.05)
    return proc


def redis_command(port, *words):
    """One command over a fresh connection; the reply as text (bulk and simple strings only)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"*{len(words)}\r\n".encode() + b"".join(
                f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words))
            data = b""
            while True:
                chunk = sock.recv(1 << 20)
                data += chunk
                if not chunk or (data[:1] in b"+-:" and data.endswith(b"\r\n")) or (
                        data[:1] == b"$" and len(data) >= int(data[1:data.index(b"\r\n")]) + data.index(b"\r\n") + 4):
                    break
    except OSError:
        return None
    head, _, rest = data.partition(b"\r\n")
    return rest[:-2].decode() if head[:1] == b"$" else head[1:].decode()


def redis_info(port, field):
    """One numeric field of INFO."""
    match = re.search(rf"^{field}:(\d+)", redis_command(port, "INFO") or "", re.M)
    return int(match.group(1)) if match else None


def start_postgres(folder):
    """A PostgreSQL cluster as in the test suite (initdb + pg_ctl as the postgres user); its URL, or None."""
    bins = sorted(p for p in (os.path.join("/usr/lib/postgresql", v, "bin") for v in
                              (os.listdir("/usr/lib/postgresql") if os.path.isdir("/usr/lib/postgresql") else []))
                  if os.path.exists(os.path.join(p, "initdb")))
    if not bins:
        return None, None
    data = os.path.join(folder, "pg")
    os.makedirs(data)
    os.chmod(folder, 0o755)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(data, "postgres")
    port = run.free_port()
    subprocess.run([*as_postgres, os.path.join(bins[-1], "initdb"), "-D", data, "-A", "trust", "-U", "chat",
                    "--no-sync"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_postgres, os.path.join(bins[-1], "pg_ctl"), "-D", data, "-w", "-l", os.path.join(data, "log"),
                    "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=60)
    stop = [*as_postgres, os.path.join(bins[-1], "pg_ctl"), "-D", data, "-m", "immediate", "stop"]
    return f"postgresql://chat@127.0.0.1:{port}/postgres", stop


def start_chat(name, upstream, logdir, tmpdir, core=0, workers=1, redis=None, database_url=None, db=None):
    """A fresh chat.py: one process, or --workers N (unpinned); in-process streams unless redis is given."""
    port = run.free_port()
    env = dict(os.environ, OPENAI_BASE_URL=f"http://127.0.0.1:{upstream.port}/v1", CHAT_MODEL="bench",
               CHAT_MAX_STREAMS="1000000", CHAT_DB=os.path.join(tmpdir, f"{db or name}.db"), PYTHONUNBUFFERED="1",
               CHAT_STREAMS_PER_OWNER="1000000", CHAT_CONNECTIONS_PER_ADDRESS="1000000")
    env.pop("OPENAI_API_KEY", None)
    for key, value in (("CHAT_REDIS_URL", redis), ("CHAT_DATABASE_URL", database_url)):
        if value:
            env[key] = value
        else:
            env.pop(key, None)
    cmd = [PY, os.path.join(ROOT, "chat.py"), "--port", str(port)] + (["--workers", str(workers)] if workers > 1 else [])
    proc = run.spawn(cmd, core if workers == 1 else None, os.path.join(logdir, f"chat-{name}.log"), env=env, cwd=tmpdir)
    proc.port = port
    if not run.wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=30):
        run.kill(proc)
        raise RuntimeError(f"chat.py did not start; see {logdir}/chat-{name}.log")
    if workers > 1:  # every worker up: each logs its own "chat.py on" line
        end = time.monotonic() + 20
        while open(os.path.join(logdir, f"chat-{name}.log")).read().count("chat.py on http") < workers:
            if time.monotonic() > end:
                raise RuntimeError(f"the workers did not all start; see {logdir}/chat-{name}.log")
            time.sleep(0.1)
    time.sleep(0.5)
    return proc


# ---------------------------------------------------------------------------
# A small blocking HTTP client for the resume, connection and storage figures
# ---------------------------------------------------------------------------

def post_prompt(port, prompt, cookie=None):
    """POST /streaming; returns (stream id, owner cookie, seconds taken)."""
    body = "prompt=" + prompt.replace(" ", "+")
    head = (f"POST /streaming HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nHX-Request: true\r\nConnection: close\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n"
            + (f"Cookie: {cookie}\r\n" if cookie else "") + "\r\n")
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + body.encode())
        data = b""
        while not STREAM_RE.search(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    took = time.perf_counter() - started
    match, owner = STREAM_RE.search(data), COOKIE_RE.search(data)
    if not match:
        raise RuntimeError(f"POST /streaming failed: {data[:300]!r}")
    return match.group(1).decode(), (owner.group(1).decode() if owner else cookie), took


def open_events(port, stream_id, cookie, last_id=None):
    """A socket with GET /events sent (the response is read by the caller)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    sock.sendall((f"GET /events?stream={stream_id} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: {cookie}\r\n"
                  + (f"Last-Event-ID: {last_id}\r\n" if last_id is not None else "") + "\r\n").encode())
    return sock


def read_events(sock, until_id=None):
    """Read an /events response until the done event (or event until_id); returns (ids, seconds to first frame)."""
    data, started, first = b"", time.perf_counter(), None
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        if first is None and b"id: " in data + chunk:
            first = time.perf_counter() - started
        data += chunk
        ids = [int(x) for x in ID_RE.findall(data)]
        if b"event: done" in data or (until_id and ids and ids[-1] >= until_id):
            break
    return [int(x) for x in ID_RE.findall(data)], first


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------

def client_cmd(name, chat, upstream, logdir, chats, params, rate, window, redis=None, ramp=None):
    """The load client's command line and its result file, for one chat.py."""
    ramp = ramp if ramp is not None else max(0.5, chats / 100)
    out = os.path.join(logdir, f"client-{name}.json")
    cmd = [PY, os.path.join(HERE, "client.py"), "--url", f"http://127.0.0.1:{chat.port}", "--kind", "stream",
           "--chats", str(chats), "--params", params, "--rate", str(rate or 0), "--ramp", str(ramp),
           "--settle", "2", "--window", str(window), "--server-pid", str(chat.pid),
           "--upstream-pid", str(upstream.pid), "--out", out, "--deadline", str(window + ramp + 60)]
    if redis is not None:
        cmd += ["--also-pid", str(redis.pid)]
    return cmd, out, ramp


def client_result(proc, out, name, logdir, wait_s):
    """Wait for a load client (killed after wait_s), then its JSON."""
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        pass
    run.kill(proc)
    try:
        with open(out) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"error": f"no result; see {logdir}/client-{name}.log"}


def load(name, chat, upstream, logdir, chats, params, rate, window, redis=None, ramp=None):
    """Run the load client against a chat.py; its window figures."""
    cmd, out, ramp = client_cmd(name, chat, upstream, logdir, chats, params, rate, window, redis, ramp)
    proc = run.spawn(cmd, 1, os.path.join(logdir, f"client-{name}.log"))
    return client_result(proc, out, name, logdir, window + ramp + 90)


def resume_across(a, b, trials):
    """Read the first 20 events on A, hang up, resume on B with Last-Event-ID: time to the first frame there, and
    whether every event arrived exactly once."""
    firsts, exact = [], 0
    for _ in range(trials):
        stream_id, cookie, _ = post_prompt(a.port, "bench mode=paced rate=200 tokens=60")
        with open_events(a.port, stream_id, cookie) as sock:
            seen, _ = read_events(sock, until_id=20)
        with open_events(b.port, stream_id, cookie, last_id=seen[-1]) as sock:
            rest, first = read_events(sock)
        firsts.append(first * 1000)
        exact += seen + rest == list(range(1, len(seen) + len(rest) + 1)) and len(seen + rest) >= 61
    return {"first_frame_ms": percentiles(firsts), "exactly_once": exact, "trials": trials}


def connections_per_process(chat, redis, upstream, counts):
    """Redis connections while N readers of idle answers are connected to one process."""
    held, out = [], {}
    try:
        for count in counts:
            while len(held) < count:
                stream_id, cookie, _ = post_prompt(chat.port, "bench mode=idle hold=120")
                sock = open_events(chat.port, stream_id, cookie)
                sock.recv(4096)  # the headers and the hello: the reader is attached
                held.append(sock)
            time.sleep(1.5)
            clients = redis_command(redis.port, "CLIENT", "LIST") or ""
            out[count] = clients.count(f"name=chat.py-{chat.pid} ")  # chat.py names its connections
    finally:
        for sock in held:
            sock.close()
    return out


def memory_per_answer(chat, redis, answers):
    """Redis memory per finished answer of 200 tokens, while its log is kept for reconnects."""
    redis_command(redis.port, "FLUSHALL")
    time.sleep(0.5)
    before = redis_info(redis.port, "used_memory")
    cookie = None
    for _ in range(answers):
        stream_id, cookie, _ = post_prompt(chat.port, "bench mode=paced rate=5000 tokens=200", cookie)
        with open_events(chat.port, stream_id, cookie) as sock:
            read_events(sock)
    after = redis_info(redis.port, "used_memory")
    usage = redis_command(redis.port, "MEMORY", "USAGE", f"chat:{stream_id}:log")
    return {"per_answer_bytes": (after - before) / answers, "one_log_bytes": int(usage) if usage else None}


def storage_time(chat, requests_count):
    """POST /streaming and GET /c/ID (the requests that write and read the database), in ms."""
    posts, cookie = [], None
    for _ in range(requests_count):
        stream_id, cookie, took = post_prompt(chat.port, "bench mode=paced rate=5000 tokens=5", cookie)
        posts.append(took * 1000)
        with open_events(chat.port, stream_id, cookie) as sock:
            read_events(sock)
    return {"post_ms": percentiles(posts)}


def worker_counts(spec):
    """--workers: "1,2,4" or "max" (1, 2, 4, … up to half the cores, and half the cores itself)."""
    if spec == "max":
        top, counts = max(1, (os.cpu_count() or 2) // 2), [1]
        while counts[-1] * 2 <= top:
            counts.append(counts[-1] * 2)
        return counts + ([top] if counts[-1] != top else [])
    counts = [int(x) for x in spec.split(",") if x.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("a list such as 1,2,4, or max")
    return counts


def unpin(proc):
    """Let a helper pinned to core 1 (as on 2 cores) run anywhere: on many cores, the upstream and redis-server
    sharing one core would cap the bigger runs before chat.py does."""
    cores = os.cpu_count() or 2
    if cores > 2 and shutil.which("taskset"):
        subprocess.run(["taskset", "-a", "-p", "-c", f"0-{cores - 1}", str(proc.pid)], capture_output=True)


def spread_load(name, chat, upstream, redis, logdir, chats, params, window, clients):
    """Several load clients at once, each pinned to its own core from the last one down; their window figures."""
    cores = os.cpu_count() or 2
    running = []
    for i in range(clients):
        share = chats // clients + (i < chats % clients)  # the remainder goes to the first clients
        part = f"{name}-{i + 1}"
        cmd, out, ramp = client_cmd(part, chat, upstream, logdir, share, params, None, window, redis, ramp=0.5)
        running.append((run.spawn(cmd, max(0, cores - 1 - i), os.path.join(logdir, f"client-{part}.log")), out, part))
    end = time.monotonic() + window + 0.5 + 90
    return [client_result(proc, out, part, logdir, max(1.0, end - time.monotonic())) for proc, out, part in running]


def combine(parts):
    """One row from the clients' figures: tokens/s summed, the worst p99, CPU shares averaged over their windows."""
    good = [p for p in parts if "error" not in p and p.get("tokens_per_s") is not None]
    if len(good) < len(parts):
        return {"error": "; ".join(p.get("error", "no tokens/s") for p in parts if p not in good)}
    def mean(values):
        """The mean of the known values, or None."""
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None
    p99s = [(p.get("latency_ms") or {}).get("p99") for p in good]
    row = {
        "tokens_per_s": sum(p["tokens_per_s"] for p in good),
        "p99_ms_worst_client": max((v for v in p99s if v is not None), default=None),
        # each client samples the same processes over (nearly) the same window: the mean is their CPU
        "server_cpu_cores": mean(p.get("server_cpu_util") for p in good),
        "redis_cpu_cores": mean(p["also_cpu_us_per_token"] * p["tokens_per_s"] / 1e6 if p.get("also_cpu_us_per_token")
                                is not None else None for p in good),
        # the client's harness share is its own CPU plus the upstream's
        "upstream_cpu_cores": mean(p["harness_cpu_util"] - p["client_cpu_util"] if p.get("harness_cpu_util")
                                   is not None and p.get("client_cpu_util") is not None else None for p in good),
        "busiest_client_cpu_cores": max((p.get("client_cpu_util") or 0 for p in good), default=None),
    }
    # what the cores did beyond our processes: a many-core figure means little unless the machine was quiet
    busy = mean(sum(c["busy"] for c in p["cores"].values()) if p.get("cores") else None for p in good)
    ours = [row["server_cpu_cores"], row["redis_cpu_cores"], row["upstream_cpu_cores"]]
    row["other_cpu_cores"] = (max(0.0, busy - sum(ours) - sum(p.get("client_cpu_util") or 0 for p in good))
                              if busy is not None and None not in ours else None)
    return row


def workers_scenario(args):
    """Tokens/s at saturation for chat.py --workers N on Redis, N from --workers; prints and writes the table."""
    counts, cores = args.workers, os.cpu_count() or 2
    window = 4.0 if args.quick else 8.0
    burst = "mode=burst tokens=5000 batch=10"  # as the saturation scenario: unpaced, chat.py is the bottleneck
    logdir = os.path.join(HERE, "results", "logs")
    os.makedirs(logdir, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix="chat-scale-")
    results = {"machine": run.machine(), "scenario": "workers", "workers": counts, "params": burst,
               "chats_per_worker": 40, "window": window, "runs": {}}
    try:
        upstream = run.start_upstream(logdir)
        redis = start_redis(tmpdir, logdir)
        unpin(upstream)
        unpin(redis)
        for n in counts:
            clients = max(1, min(n, cores - n))  # as many clients as workers, on the cores they leave free
            print(f"{n} worker(s), {40 * n} chats, {clients} load client(s) …", flush=True)
            # core=None: N=1 runs unpinned too, as the workers do, so every N is treated alike
            chat = start_chat(f"workers{n}", upstream, logdir, tmpdir, core=None, workers=n, redis=redis.url)
            parts = spread_load(f"workers{n}", chat, upstream, redis, logdir, 40 * n, burst, window, clients)
            run.kill(chat)
            results["runs"][str(n)] = dict(combine(parts), workers=n, chats=40 * n, clients=clients, parts=parts)
    finally:
        clean_up(tmpdir)
    publish(results, workers_report(results), args.out or os.path.join(HERE, "results", "scale-workers.json"), logdir)


def clean_up(tmpdir):
    """Stop every process the run started and delete its temporary folder."""
    for child in list(run.CHILDREN):
        run.kill(child)
    shutil.rmtree(tmpdir, ignore_errors=True)


def publish(results, table, out, logdir):
    """Print the table and write every figure to out as JSON."""
    results["table"] = table
    print()
    print(table)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n(every figure: {out}; logs: {logdir})")


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def ms(value):
    """A number of milliseconds for the table."""
    return "-" if value is None else f"{value:.1f}"


def num(value, digits=0):
    """A number for the table."""
    return "-" if value is None else f"{value:,.{digits}f}"


def report(results):
    """The table, as Markdown."""
    lines = ["| figure | in-process, 1 process | Redis, 1 process | Redis, 2 workers | target |", "|---|---|---|---|---|"]
    sat = results["saturation"]
    base = (sat.get("local") or {}).get("tokens_per_s")
    two = (sat.get("workers2") or {}).get("tokens_per_s")
    one_redis = (sat.get("redis") or {}).get("tokens_per_s")
    lines.append(f"| tokens/s at saturation ({results['sizes']['burst']} chats, unpaced) | {num(base)} | "
                 f"{num(one_redis)} | {num(two)} ({two / one_redis:.2f}× Redis, 1 process) | 2 workers ≥ 1.7× |"
                 if two and one_redis else f"| tokens/s at saturation | {num(base)} | {num(one_redis)} | {num(two)} | |")
    def cpu(result, field):
        """A CPU share in % of one core: the server's, or redis-server's (from its µs per token)."""
        result = result or {}
        if field == "redis":
            per = result.get("also_cpu_us_per_token")
            return None if per is None else per * result.get("tokens_per_s", 0) / 1e4
        value = result.get(field)
        return None if value is None else value * 100

    lines.append(f"| CPU at saturation, % of a core: chat.py / redis-server | {num(cpu(sat.get('local'), 'server_cpu_util'))} | "
                 f"{num(cpu(sat.get('redis'), 'server_cpu_util'))} / {num(cpu(sat.get('redis'), 'redis'))} | "
                 f"{num(cpu(sat.get('workers2'), 'server_cpu_util'))} / {num(cpu(sat.get('workers2'), 'redis'))} | |")
    lines.append(f"| harness CPU at saturation (shares the cores) | {num((sat.get('local') or {}).get('harness_cpu_util', 0) * 100)} % | "
                 f"{num((sat.get('redis') or {}).get('harness_cpu_util', 0) * 100)} % | "
                 f"{num((sat.get('workers2') or {}).get('harness_cpu_util', 0) * 100)} % | |")
    for chats in results["sizes"]["paced"]:
        local, redis = results["paced"][str(chats)]["local"], results["paced"][str(chats)]["redis"]
        p99l, p99r = local.get("latency_ms", {}).get("p99"), redis.get("latency_ms", {}).get("p99")
        cpul, cpur = local.get("cpu_us_per_token"), redis.get("cpu_us_per_token")
        lines.append(f"| {chats} chats × 20 tok/s: tokens/s | {num(local.get('tokens_per_s'))} | "
                     f"{num(redis.get('tokens_per_s'))} | | offered {chats * 20:,} |")
        lines.append(f"| {chats} chats: p99 added latency, ms | {ms(p99l)} | {ms(p99r)} "
                     f"(+{p99r - p99l:.1f}) | | Redis adds ≤ 5 ms |" if p99l is not None and p99r is not None else
                     f"| {chats} chats: p99 added latency, ms | {ms(p99l)} | {ms(p99r)} | | |")
        lines.append(f"| {chats} chats: chat.py CPU µs/token | {num(cpul)} | {num(cpur)} "
                     f"({(cpur / cpul - 1) * 100:+.0f} %) | | Redis adds ≤ 30 % |" if cpul and cpur else
                     f"| {chats} chats: chat.py CPU µs/token | {num(cpul)} | {num(cpur)} | | |")
        lines.append(f"| {chats} chats: redis-server CPU µs/token | | {num(redis.get('also_cpu_us_per_token'))} | | |")
    resume = results["resume"]
    lines.append(f"| resume on another process: first frame p50 / p99, ms | "
                 f"{ms(resume['local']['first_frame_ms']['p50'])} / {ms(resume['local']['first_frame_ms']['p99'])} "
                 f"(same process) | {ms(resume['redis']['first_frame_ms']['p50'])} / "
                 f"{ms(resume['redis']['first_frame_ms']['p99'])} | | |")
    lines.append(f"| resume: every event exactly once | {resume['local']['exactly_once']}/{resume['local']['trials']} | "
                 f"{resume['redis']['exactly_once']}/{resume['redis']['trials']} | | all |")
    conns = results["connections"]
    lines.append("| Redis connections of one process, by readers connected | | " +
                 ", ".join(f"{n:,}: {c}" for n, c in conns.items()) + " | | constant |")
    memory = results["memory"]
    lines.append(f"| Redis memory per finished 200-token answer (kept {results['sizes']['grace']} s) | | "
                 f"{num(memory['per_answer_bytes'] / 1024, 1)} KB (its log: {num((memory['one_log_bytes'] or 0) / 1024, 1)} KB) | | |")
    storage = results.get("storage")
    if storage:
        lines.append(f"| POST /streaming p50 / p99, ms: SQLite \\| PostgreSQL | {ms(storage['sqlite']['post_ms']['p50'])} / "
                     f"{ms(storage['sqlite']['post_ms']['p99'])} | {ms(storage['postgresql']['post_ms']['p50'])} / "
                     f"{ms(storage['postgresql']['post_ms']['p99'])} (PostgreSQL) | | |")
    return "\n".join(lines)


def workers_report(results):
    """The --workers table, as Markdown."""
    runs = results["runs"]
    base_n = 1 if "1" in runs else results["workers"][0]
    base = runs[str(base_n)].get("tokens_per_s")
    def pct(cores):
        """A CPU share in % of one core."""
        return None if cores is None else cores * 100

    lines = [f"| workers | chats | tokens/s | × {base_n} worker(s) | per worker | p99 added latency, ms (worst client) | "
             "chat.py CPU, % of a core | redis-server CPU, % | upstream CPU, % | load clients (busiest, %) | "
             "other processes' CPU, % |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in results["workers"]:
        r = runs[str(n)]
        if "error" in r:
            lines.append(f"| {n} | {r['chats']} | {r['error']} | | | | | | | | |")
            continue
        times = r["tokens_per_s"] / base if base else None
        lines.append(f"| {n} | {r['chats']:,} | {num(r['tokens_per_s'])} | {num(times, 2)}× | "
                     f"{num(times * base_n / n if times else None, 2)} | {ms(r['p99_ms_worst_client'])} | "
                     f"{num(pct(r['server_cpu_cores']))} | {num(pct(r['redis_cpu_cores']))} | "
                     f"{num(pct(r['upstream_cpu_cores']))} | {r['clients']} ({num(pct(r['busiest_client_cpu_cores']))}) | "
                     f"{num(pct(r['other_cpu_cores']))} |")
    lines.append(f"\n{results['machine']['cores']} cores, {results['params']}, 40 chats per worker, "
                 f"{results['window']:g} s window. The load is split over several client processes: tokens/s are "
                 "their sum, the p99 the worst client's. The workers run unpinned (1 too), each client on a core of "
                 "its own from the last one down" + ("; redis-server and the upstream unpinned." if
                                                     results["machine"]["cores"] > 2 else
                                                     "; redis-server and the upstream on core 1 (on 2 cores "
                                                     "everything shares the two)."))
    return "\n".join(lines)


def main():
    """Run every scenario once, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and windows (about 1.5 minutes)")
    ap.add_argument("--workers", metavar="LIST", type=worker_counts,
                    help="only the many-core scenario: chat.py --workers N for each N (1,2,4,8 or max)")
    ap.add_argument("--out", help="the JSON result (bench/results/scale.json; scale-workers.json with --workers)")
    args = ap.parse_args()
    if not shutil.which("redis-server"):
        sys.exit("redis-server is missing: apt-get install redis-server")
    if args.workers:
        return workers_scenario(args)
    args.out = args.out or os.path.join(HERE, "results", "scale.json")
    window = 4.0 if args.quick else 8.0
    sizes = {"burst": 40, "paced": [100] if args.quick else [100, 500], "resume": 10 if args.quick else 40,
             "readers": [0, 100] if args.quick else [0, 100, 500], "answers": 50 if args.quick else 200,
             "storage": 50 if args.quick else 200, "grace": 30}
    logdir = os.path.join(HERE, "results", "logs")
    os.makedirs(logdir, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix="chat-scale-")
    results = {"machine": run.machine(), "sizes": sizes, "saturation": {}, "paced": {}, "resume": {}}
    try:
        upstream = run.start_upstream(logdir)
        redis = start_redis(tmpdir, logdir)
        burst = "mode=burst tokens=5000 batch=10"
        for name, kwargs in (("local", {}), ("redis", {"redis": redis.url}),
                             ("workers2", {"redis": redis.url, "workers": 2})):
            print(f"saturation: {name} …", flush=True)
            chat = start_chat(f"sat-{name}", upstream, logdir, tmpdir, **kwargs)
            results["saturation"][name] = load(f"sat-{name}", chat, upstream, logdir, sizes["burst"], burst, None,
                                               window, redis=redis if "redis" in kwargs else None, ramp=0.5)
            run.kill(chat)
        for chats in sizes["paced"]:
            results["paced"][str(chats)] = {}
            for name, kwargs in (("local", {}), ("redis", {"redis": redis.url})):
                print(f"{chats} chats × 20 tok/s: {name} …", flush=True)
                chat = start_chat(f"c{chats}-{name}", upstream, logdir, tmpdir, **kwargs)
                results["paced"][str(chats)][name] = load(f"c{chats}-{name}", chat, upstream, logdir, chats,
                                                          "mode=paced rate=20 tokens=200", 20, window,
                                                          redis=redis if kwargs else None)
                run.kill(chat)
        print("resume across processes …", flush=True)
        one = start_chat("resume-local", upstream, logdir, tmpdir)
        results["resume"]["local"] = resume_across(one, one, sizes["resume"])
        run.kill(one)
        # Two processes on one host share the SQLite file (and with it the key that signs owner cookies).
        a = start_chat("resume-a", upstream, logdir, tmpdir, redis=redis.url, db="common")
        b = start_chat("resume-b", upstream, logdir, tmpdir, core=1, redis=redis.url, db="common")
        results["resume"]["redis"] = resume_across(a, b, sizes["resume"])
        print("Redis connections and memory …", flush=True)
        results["connections"] = connections_per_process(a, redis, upstream, sizes["readers"])
        results["memory"] = memory_per_answer(a, redis, sizes["answers"])
        run.kill(a)
        run.kill(b)
        database_url, stop_pg = start_postgres(tmpdir)
        if database_url:
            print("storage: SQLite vs PostgreSQL …", flush=True)
            results["storage"] = {}
            for name, url in (("sqlite", None), ("postgresql", database_url)):
                chat = start_chat(f"storage-{name}", upstream, logdir, tmpdir, database_url=url)
                results["storage"][name] = storage_time(chat, sizes["storage"])
                run.kill(chat)
            subprocess.run(stop_pg, capture_output=True, timeout=60)
        else:
            print("no PostgreSQL here (apt-get install postgresql): its figures are left out")
    finally:
        clean_up(tmpdir)
    publish(results, report(results), args.out, logdir)


if __name__ == "__main__":
    main()
