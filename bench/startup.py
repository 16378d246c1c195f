"""Startup benchmark: artifact sizes, and cold start to the first HTTP 200 on GET /.

    pip install -r requirements.txt -r ship/requirements.txt && python bench/startup.py

Measures `python chat.py`, dist/chat.pyz on its first run (an empty SHIV_ROOT: it unpacks
its packages) and on later runs, and dist/chat; builds dist/ with ship/build.py first when
it lacks either artifact. The pyz runs as `python3 -I chat.pyz` on a venv made with
--without-pip: a Python with nothing but its standard library, as on a bare server.

Each start is a new process on a free loopback port with an empty temporary working folder
(its chat.db goes there) and the built-in demo model; it is stopped with SIGTERM once GET /
answers 200. The figure is the median of --runs starts, timed from spawn to that 200. The
operating system's file cache stays warm (nothing here drops it): "cold" is a new process,
not a cold disk.
"""

import argparse
import http.client
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 1e6


def free_port():
    """A loopback port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bare_env(home, **extra):
    """This environment without Python, venv, upstream or chat.py settings, with its own HOME."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "OPENAI_", "CHAT_")) and k not in ("VIRTUAL_ENV", "HOST", "PORT")}
    return {**env, "HOME": home, **extra}


def answers_200(port):
    """True if GET / on the port answers 200 right now."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def time_to_200(command, env, timeout=60.0):
    """Start command in an empty temporary folder; seconds from spawn to the first 200 on GET /."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="chat-start-") as tmp:
        cwd = os.path.join(tmp, "cwd")
        os.mkdir(cwd)
        with open(os.path.join(tmp, "log"), "w+b") as log:
            started = time.perf_counter()
            proc = subprocess.Popen([*command, "--port", str(port)], cwd=cwd, env=env, stdout=log, stderr=log)
            try:
                while not answers_200(port):
                    if proc.poll() is not None or time.perf_counter() - started > timeout:
                        log.seek(0)
                        sys.exit(f"{' '.join(command)} did not answer GET / (exit code {proc.poll()}):\n"
                                 f"{log.read().decode(errors='replace')}")
                    time.sleep(0.005)
                return time.perf_counter() - started
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def measure(runs, command, env_for_run):
    """Median, min and max of time_to_200 over runs starts; env_for_run(i) gives each start's environment."""
    times = [time_to_200(command, env_for_run(i)) for i in range(runs)]
    return statistics.median(times), min(times), max(times)


def main():
    """Build the artifacts if needed, measure, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", default=os.path.join(ROOT, "dist"), help="artifact folder (default dist/)")
    parser.add_argument("--runs", type=int, default=5, help="starts per measurement (default 5)")
    parser.add_argument("--rebuild", action="store_true", help="run ship/build.py even if dist/ has both")
    args = parser.parse_args()
    pyz, exe = os.path.join(args.dist, "chat.pyz"), os.path.join(args.dist, "chat")
    if args.rebuild or not (os.path.exists(pyz) and os.path.exists(exe)):
        subprocess.run([sys.executable, os.path.join(ROOT, "ship", "build.py"), "--out", args.dist],
                       cwd=ROOT, check=True)

    with tempfile.TemporaryDirectory(prefix="chat-bench-") as tmp:
        home = os.path.join(tmp, "home")
        os.mkdir(home)
        bare = os.path.join(tmp, "bare")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", bare], check=True, env=bare_env(home))
        python = os.path.join(bare, "bin", "python3")
        shared_root = os.path.join(tmp, "shiv-shared")
        time_to_200([python, "-I", pyz], bare_env(home, SHIV_ROOT=shared_root))  # unpack once for "later runs"
        rows = [
            ("dist/chat size", os.path.getsize(exe) / MB, "MB", 40),
            ("dist/chat.pyz size", os.path.getsize(pyz) / MB, "MB", None),
            ("python chat.py", measure(args.runs, [sys.executable, os.path.join(ROOT, "chat.py")],
                                       lambda i: bare_env(home)), "s", 1.5),
            ("chat.pyz, first run (empty SHIV_ROOT)", measure(
                args.runs, [python, "-I", pyz],
                lambda i: bare_env(home, SHIV_ROOT=os.path.join(tmp, f"shiv-{i}"))), "s", 1.5),
            ("chat.pyz, later runs", measure(args.runs, [python, "-I", pyz],
                                             lambda i: bare_env(home, SHIV_ROOT=shared_root)), "s", 1.0),
            ("./chat", measure(args.runs, [os.path.abspath(exe)], lambda i: bare_env(home)), "s", 1.5),
        ]

    # The load average says whether something else shared the machine meanwhile.
    print(f"\nstartup to the first 200 on GET / (median of {args.runs}; min–max); {sys.platform}, "
          f"Python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}\n")
    print("| what | measured | target | |")
    print("|---|---|---|---|")
    for name, value, unit, target in rows:
        if isinstance(value, tuple):
            median, low, high = value
            shown = f"{median:.2f} s ({low:.2f}–{high:.2f})"
        else:
            median, shown = value, f"{value:.1f} MB"
        verdict = "" if target is None else ("met" if median <= target else "**missed**")
        print(f"| {name} | {shown} | {'' if target is None else f'≤ {target:g} {unit}'} | {verdict} |")


if __name__ == "__main__":
    main()
