"""Build dist/chat.pyz (shiv zipapp) and dist/chat (PyInstaller one-file) from the installed packages.

    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r ship/requirements.txt && .venv/bin/python ship/build.py

Run from the repository root with a venv's Python (the README's Deploy command makes one). Nothing is downloaded: both artifacts are
made from the distributions installed in this interpreter's environment, so they hold
exactly the versions that were tested. Options: --out DIR (default ./dist), --only pyz|exe.
"""

import argparse
import compileall
import py_compile
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from packaging.requirements import Requirement  # installed with PyInstaller (ship/requirements.txt)
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
# The server reads only these next to chat.py; the screenshots and the vendoring script stay out.
LEFT_OUT = ("screenshot-*.png", "vendor.py", "__pycache__")
# Test suites shipped inside gevent, greenlet and zope.interface: megabytes nobody imports.
TEST_DIRS = {"tests", "testing"}
# What PyInstaller would follow optional or delayed imports into (gevent._util imports
# gevent.testing for its own test runner); the server never imports them.
EXCLUDED_MODULES = ("tkinter", "unittest", "doctest", "pydoc", "lib2to3", "test", "gevent.testing")
# Packages that open data files of their own at import time (latex2mathml: its symbol table).
DATA_PACKAGES = ("latex2mathml",)
# PyInstaller's own gevent hook, with its submodule filter fixed: it means to leave out gevent's
# test suite, but its filter keeps everything (and excluding the modules instead warns about each).
GEVENT_HOOK = """\
from PyInstaller.utils.hooks import collect_all, copy_metadata

datas, binaries, hiddenimports = collect_all(
    "gevent", filter_submodules=lambda name: not name.startswith(("gevent.testing", "gevent.tests")),
    include_py_files=False, exclude_datas=["**/tests"])
datas += copy_metadata("gevent", recursive=True)
"""


def commit():
    """The short hash of HEAD, which `--version` prints; "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        print("warning: not a git checkout; COMMIT says unknown", file=sys.stderr)
        return "unknown"
    return out.stdout.strip()


def stage_app(dest):
    """Copy chat.py and chat_scale.py with templates/, static/ and COMMIT beside them: chat.py finds them next to
    itself (chat_scale.py is imported only with CHAT_REDIS_URL or CHAT_DATABASE_URL, whose drivers the artifacts
    leave out)."""
    dest.mkdir(parents=True)
    shutil.copy2(ROOT / "chat.py", dest)
    shutil.copy2(ROOT / "chat_scale.py", dest)
    ignore = shutil.ignore_patterns(*LEFT_OUT)
    shutil.copytree(ROOT / "templates", dest / "templates", ignore=ignore)
    shutil.copytree(ROOT / "static", dest / "static", ignore=ignore)
    (dest / "COMMIT").write_text(commit() + "\n", encoding="ascii")


def installed(requirement):
    """The installed distribution for a requirement; refuse one that does not match its pin."""
    try:
        dist = importlib.metadata.distribution(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"{requirement.name} is not installed: pip install -r requirements.txt first")
    if not requirement.specifier.contains(dist.version, prereleases=True):
        sys.exit(f"{requirement.name} {dist.version} is installed, but {requirement} is required")
    return dist


def dependencies():
    """requirements.txt's distributions and everything they require here, by canonical name."""
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    todo = [(Requirement(line), ("",)) for line in lines if line]
    found = {}
    while todo:
        requirement, wanted_by = todo.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in wanted_by):
            continue  # for another platform, Python or extra
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = dist = installed(requirement)
        extras = ("", *requirement.extras)
        todo.extend((Requirement(r), extras) for r in dist.requires or ())
    return found


def foreign_modules(needed):
    """Top-level modules of the installed distributions that the app does not need."""
    # bottle, requests and urllib3 import some optionally when present; kept out, the
    # executable holds the same packages as the pyz, whatever else this environment has.
    return sorted(top for top, dists in importlib.metadata.packages_distributions().items()
                  if top.isidentifier() and top not in sys.stdlib_module_names
                  and not {canonicalize_name(d) for d in dists} & needed.keys())


def stage_site_packages(dest, needed):
    """Copy every file of every needed distribution (.dist-info included) into one site-packages."""
    for dist in needed.values():
        if dist.files is None:
            sys.exit(f"{dist.metadata['Name']} has no RECORD: reinstall it with pip")
        for file in dist.files:
            parts = file.parts
            # Console scripts live outside site-packages (../../bin); bytecode is rebuilt at run time.
            if parts[0] == ".." or "__pycache__" in parts or TEST_DIRS & set(parts[:-1]):
                continue
            target = dest / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dist.locate_file(file), target)


def build_pyz(app, work, out, needed):
    """dist/chat.pyz: shiv over a site-packages staged from this environment (shiv runs no pip then)."""
    site = work / "site-packages"
    stage_site_packages(site, needed)
    shutil.copytree(app, site, dirs_exist_ok=True)
    target = out / "chat.pyz"
    subprocess.run([sys.executable, "-m", "shiv", "--site-packages", str(site), "-e", "chat:main",
                    "-o", str(target), "-p", "/usr/bin/env python3", "--reproducible", "--compressed"],
                   check=True)
    add_bytecode(target, site)
    return target


def add_bytecode(pyz, site):
    """Append the bytecode that shiv leaves out: the first run then imports without compiling."""
    # Hash-based .pyc files stay valid whatever modification times unpacking gives the sources;
    # the temporary path is stripped (Python sets the real one at import) so builds are reproducible.
    compileall.compile_dir(site, quiet=2, workers=0, stripdir=str(site),
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    with zipfile.ZipFile(pyz, "a", zipfile.ZIP_DEFLATED) as archive:
        date_time = archive.infolist()[0].date_time  # shiv's fixed --reproducible time
        for pyc in sorted(site.rglob("*.pyc")):
            info = zipfile.ZipInfo(f"site-packages/{pyc.relative_to(site)}", date_time)
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            archive.writestr(info, pyc.read_bytes())


def build_exe(app, work, out, needed):
    """dist/chat: a PyInstaller one-file executable with its own Python; work and spec files stay in work."""
    hooks = work / "hooks"
    hooks.mkdir()
    (hooks / "hook-gevent.py").write_text(GEVENT_HOOK)
    subprocess.run([
        sys.executable, "-m", "PyInstaller", "--onefile", "--name", "chat", "--noconfirm",
        "--log-level", "WARN", "--distpath", str(out), "--workpath", str(work / "pyinstaller"),
        "--specpath", str(work), "--additional-hooks-dir", str(hooks),
        # chat.py's HERE is the unpacked bundle's root: the data goes beside it.
        "--add-data", f"{app / 'templates'}:templates", "--add-data", f"{app / 'static'}:static",
        "--add-data", f"{app / 'COMMIT'}:.",
        # Packages that read data files beside their code, which PyInstaller does not follow.
        *(arg for name in DATA_PACKAGES for arg in ("--collect-data", name)),
        # Debug symbols are most of libpython's size here; nobody debugs the shipped binary.
        "--strip",
        *(arg for name in (*EXCLUDED_MODULES, *foreign_modules(needed)) for arg in ("--exclude-module", name)),
        str(app / "chat.py"),
    ], check=True)
    return out / "chat"


def main():
    """Build the artifacts asked for and print their sizes and build times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default ./dist)")
    parser.add_argument("--only", choices=("pyz", "exe"), help="build one artifact only")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    builders = {"pyz": build_pyz, "exe": build_exe}
    needed = dependencies()
    with tempfile.TemporaryDirectory(prefix="chat-build-") as tmp:
        app = Path(tmp) / "app"
        stage_app(app)
        built = []
        for kind in [args.only] if args.only else builders:
            started = time.monotonic()
            work = Path(tmp) / kind
            work.mkdir()
            artifact = builders[kind](app, work, out, needed)
            built.append((artifact, time.monotonic() - started))
    for artifact, seconds in built:
        print(f"{artifact}  {artifact.stat().st_size / 1e6:.1f} MB  (built in {seconds:.1f} s)")


if __name__ == "__main__":
    main()
