#!/usr/bin/env python3
"""TEST FIXTURE: local stand-ins for Flower's images, for machines that cannot pull them.

Never used by the product: `Dockerfile` builds on Flower's real images
``flwr/superlink``, ``flwr/supernode`` and ``flwr/superexec`` (Docker Hub). Where
Docker Hub is out of reach (CI, offline machines) and those images are not already
in the engine, this script builds images of the same layout under the same tags,
so that ``docker-compose build`` and ``up`` run unchanged:

* Debian bookworm (``debootstrap --variant=minbase``, then ``docker import``: no base
  image has to be pulled either), the system Python 3.11;
* a venv at ``/python/venv`` owned by uid 49999 ``app`` (home and ``WORKDIR /app``,
  owned by ``app``), ``USER app``, the venv first on ``PATH``;
* Flower of the pinned version, torch 2.13.0 (CPU) and the project's other
  dependencies, installed from wheels that the host's own pip resolves (its
  configured indexes and wheel directories), so that the Dockerfile's torch step
  finds torch satisfied instead of reaching the CPU wheel index;
* the host's CA bundle, as ``PIP_CERT``, so pip inside a build reaches PyPI the way
  the host does (the build isolation of ``pip install .`` fetches setuptools);
* the label ``org.fedsoup.test-standin=1``, and one ENTRYPOINT per role.

And ``debian:bookworm-slim``, the base of the reverse proxy's image (``proxy/Dockerfile``):
``debootstrap --variant=minbase bookworm``, imported under that tag with the same label;
the proxy's Dockerfile then installs nginx from Debian's mirror as it would on Debian's
real image.

Usage (root, a running Docker engine, ``debootstrap`` installed)::

    tests/docker_standins/build_flower_standins.py [--flwr-version X.Y.Z] [--force]

``--flwr-version`` defaults to the Dockerfile's ``ARG FLWR_VERSION`` (the pinned version).

Prints the wall time of each step. Exit code 0 when the four images exist afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STANDIN_LABEL = "org.fedsoup.test-standin"
BASE_TAG = "fedsoup-test/flower-standin-base:{version}"
ROLES = {"superlink": "flower-superlink", "supernode": "flower-supernode", "superexec": "flower-superexec"}
APP_UID = 49999
TORCH_VERSION = "2.13.0"
# What the venv holds: Flower (with its simulation extra, as the project's `flower`
# extra asks), torch as the Makefile installs it, the project's other dependencies,
# and the build backend that `pip install .` needs.
PROJECT_REQUIREMENTS = [
    "flwr-datasets>=0.5", "scikit-learn>=1.3", "matplotlib>=3.7", "numpy>=1.24",
    "safetensors>=0.8", "tqdm>=4.60",
]
BUILD_REQUIREMENTS = ["setuptools>=77", "wheel"]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_TAG = "debian:bookworm-slim"  # the base of proxy/Dockerfile
DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


class StandinError(RuntimeError):
    """A step of the stand-in build failed; ``step`` names it."""

    def __init__(self, step: str, detail: str):
        super().__init__(f"{step}: {detail}")
        self.step = step


def pinned_flwr_version(dockerfile: Path = DOCKERFILE) -> str:
    """The Flower version the product's Dockerfile builds on (its ``ARG FLWR_VERSION=``)."""
    found = re.search(r"^ARG FLWR_VERSION=(\S+)$", dockerfile.read_text(), flags=re.M)
    if found is None:
        raise StandinError("Dockerfile", f"no `ARG FLWR_VERSION=` line in {dockerfile}")
    return found.group(1)


def image_tags(version: str) -> dict[str, str]:
    return {role: f"flwr/{role}:{version}" for role in ROLES}


def run(step: str, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise StandinError(step, f"`{' '.join(argv)}` exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def is_standin(tag: str) -> bool:
    out = subprocess.run(["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{STANDIN_LABEL}"}}}}', tag],
                         capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() == "1"


def try_pull(tags: list[str], timeout: float = 120) -> bool:
    """Flower's real images, when Docker Hub answers."""
    for tag in tags:
        try:
            if subprocess.run(["docker", "pull", "-q", tag], capture_output=True, timeout=timeout).returncode != 0:
                return False
        except subprocess.TimeoutExpired:
            return False
    return True


def download_wheels(version: str, dest: Path) -> None:
    """Every wheel the venv needs, resolved by the host's pip and its configuration."""
    run("pip download", [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", str(dest),
                         f"torch=={TORCH_VERSION}", f"flwr[simulation]=={version}", *PROJECT_REQUIREMENTS,
                         *BUILD_REQUIREMENTS])


def make_rootfs(rootfs: Path, version: str, wheels: Path) -> None:
    """Debian bookworm + /python/venv (owned by `app`) with Flower and torch installed."""
    run("debootstrap", ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", str(rootfs), DEBIAN_MIRROR])
    inside = ["chroot", str(rootfs)]
    run("user app", [*inside, "useradd", "--uid", str(APP_UID), "--user-group", "--home-dir", "/app",
                     "--create-home", "--shell", "/bin/bash", "app"])
    run("venv", [*inside, "python3", "-m", "venv", "/python/venv"])
    shutil.copytree(wheels, rootfs / "tmp" / "wheels")
    try:
        run("pip install", [*inside, "/python/venv/bin/python", "-m", "pip", "install", "-q", "--no-index",
                            "--find-links", "/tmp/wheels", f"torch=={TORCH_VERSION}",
                            f"flwr[simulation]=={version}", *PROJECT_REQUIREMENTS])
        # Only the build backend stays as wheels: `pip install .` in a build needs it.
        (rootfs / "python" / "wheels").mkdir()
        for wheel in (rootfs / "tmp" / "wheels").iterdir():
            if wheel.name.startswith(("setuptools-", "wheel-")):
                shutil.copy2(wheel, rootfs / "python" / "wheels")
    finally:
        shutil.rmtree(rootfs / "tmp" / "wheels")
    # The host's trust store (it may hold the CA of an egress proxy), for pip.
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    run("chown", ["chown", "-R", f"{APP_UID}:{APP_UID}", str(rootfs / "python"), str(rootfs / "app")])
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (rootfs / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)


def import_base(rootfs: Path, tag: str) -> None:
    import_rootfs(rootfs, tag, [
        "ENV PATH=/python/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV HOME=/app", "ENV LANG=C.UTF-8",
        "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt", "ENV PIP_FIND_LINKS=/python/wheels",
        "USER app", "WORKDIR /app", f"LABEL {STANDIN_LABEL}=1",
    ])


def import_rootfs(rootfs: Path, tag: str, changes: list[str]) -> None:
    """``docker import`` of a root file system (a tar stream of it) with Dockerfile `changes`."""
    argv = ["docker", "import", *[x for c in changes for x in ("--change", c)], "-", tag]
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    try:
        result = subprocess.run(argv, stdin=tar.stdout, capture_output=True, text=True)
    finally:
        tar.stdout.close()
        tar.wait()
    if result.returncode != 0 or tar.returncode != 0:
        raise StandinError("docker import", result.stderr[-3000:])


def tag_roles(base: str, version: str) -> None:
    for role, command in ROLES.items():
        dockerfile = f'FROM {base}\nLABEL {STANDIN_LABEL}=1\nENTRYPOINT ["{command}"]\n'
        run(f"role {role}", ["docker", "build", "-q", "-t", f"flwr/{role}:{version}", "-"], input=dockerfile,
            env=dict(os.environ, DOCKER_BUILDKIT="0"))


def build_standins(version: str, force: bool = False, log=print) -> dict[str, float]:
    """Build (or reuse) the three stand-ins; returns the wall time of each step, in seconds."""
    times: dict[str, float] = {}
    base = BASE_TAG.format(version=version)
    if force or not image_exists(base):
        if shutil.which("debootstrap") is None:
            raise StandinError("debootstrap", "not installed (apt-get install debootstrap)")
        with tempfile.TemporaryDirectory(prefix="flower-standin-") as tmp:
            wheels, rootfs = Path(tmp) / "wheels", Path(tmp) / "rootfs"
            start = time.perf_counter()
            download_wheels(version, wheels)
            times["wheels"] = time.perf_counter() - start
            log(f"[standins] wheels resolved by the host's pip: {times['wheels']:.1f}s")
            start = time.perf_counter()
            make_rootfs(rootfs, version, wheels)
            times["rootfs"] = time.perf_counter() - start
            log(f"[standins] debootstrap bookworm + venv with flwr {version} and torch: {times['rootfs']:.1f}s")
            start = time.perf_counter()
            import_base(rootfs, base)
            times["import"] = time.perf_counter() - start
            log(f"[standins] docker import {base}: {times['import']:.1f}s")
    start = time.perf_counter()
    tag_roles(base, version)
    times["roles"] = time.perf_counter() - start
    log(f"[standins] tagged {', '.join(image_tags(version).values())}: {times['roles']:.1f}s")
    return times


def build_debian_standin(tag: str = DEBIAN_TAG, log=print) -> float:
    """A stand-in for Debian's ``debian:bookworm-slim`` (the base of ``proxy/Dockerfile``),
    where Docker Hub is out of reach: ``debootstrap --variant=minbase bookworm`` imported
    under that tag, its APT sources pointing at the Debian mirror, so that the proxy
    image's own ``apt-get install nginx-light`` runs unchanged. Returns the wall time."""
    if shutil.which("debootstrap") is None:
        raise StandinError("debootstrap", "not installed (apt-get install debootstrap)")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="debian-standin-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run("debootstrap", ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR])
        shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        (rootfs / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        import_rootfs(rootfs, tag, ["ENV LANG=C.UTF-8", 'CMD ["bash"]', f"LABEL {STANDIN_LABEL}=1"])
    seconds = time.perf_counter() - start
    log(f"[standins] debootstrap bookworm (minbase) imported as {tag}: {seconds:.1f}s")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flwr-version", default=None, help="default: the Dockerfile's pin")
    parser.add_argument("--force", action="store_true", help="rebuild the base even if it exists")
    args = parser.parse_args(argv)
    args.flwr_version = args.flwr_version or pinned_flwr_version()
    tags = list(image_tags(args.flwr_version).values())
    if not args.force and all(image_exists(t) for t in [*tags, DEBIAN_TAG]):
        print(f"[standins] present already: {', '.join(tags)}")
        return 0
    try:
        build_standins(args.flwr_version, force=args.force)
        if args.force or not (image_exists(DEBIAN_TAG) or try_pull([DEBIAN_TAG])):
            build_debian_standin()
    except StandinError as error:
        print(f"[standins] failed at {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
