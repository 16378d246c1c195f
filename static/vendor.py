"""Fetch the vendored front end into static/: htmx and its SSE extension, pinned and hash-checked.

Run from anywhere: ``python static/vendor.py``. It uses ``npm pack`` (so the npm registry
configured on this machine is asked, no URL is hard-coded), takes one file out of each
tarball, checks its sha256, and writes it next to this script. Bump a version by changing
the pin and the hash together; the script refuses a file whose hash differs.
"""
import hashlib
import pathlib
import subprocess
import sys
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

# (npm package@version, file inside the tarball, name in static/, sha256 of that file)
PINS = [
    ("htmx.org@2.0.11", "package/dist/htmx.min.js", "htmx.min.js",
     "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"),
    ("htmx-ext-sse@2.2.4", "package/dist/sse.js", "htmx-ext-sse.js",
     "3b5992a541619babefc4c169505af474df5c3039da51e59b96ccf9241ecd61d2"),
]


def fetch(spec, member, target, sha256, workdir):
    """Download one package tarball with npm, extract one file, verify and write it."""
    out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=workdir,
                         check=True, capture_output=True, text=True).stdout
    tarball = pathlib.Path(workdir) / out.strip().splitlines()[-1]
    with tarfile.open(tarball) as tar:
        data = tar.extractfile(member).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        sys.exit(f"{spec} {member}: sha256 {digest} does not match the pin {sha256}")
    (HERE / target).write_bytes(data)
    print(f"{target}: {spec} {member} ({len(data)} bytes, sha256 ok)")


def main():
    with tempfile.TemporaryDirectory() as workdir:
        for spec, member, target, sha256 in PINS:
            fetch(spec, member, target, sha256, workdir)


if __name__ == "__main__":
    main()
