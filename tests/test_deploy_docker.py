"""docker-compose.yml on a real container engine: build, up, FedSoup rounds, a killed
ServerApp container, resume from the checkpoint volume, teardown.

Skips (with the reason) where no Docker engine or no compose answers. Where Flower's
images cannot be pulled, local stand-ins of the same layout are built under their tags
(tests/docker_standins/build_flower_standins.py, a test fixture; needs root and
debootstrap). Then, for the compose file alone, with the TLS overlay, and with the TLS
and SuperNode-auth overlays (keys made by scripts/make-node-keys.sh, registered with
``flwr supernode register`` once the SuperLink is up, before the rest starts):

* ``compose build`` and ``compose up -d`` under a unique project name, the SuperLink
  published on a free port of 127.0.0.1;
* ``flwr run`` of this repository from the host (FLWR_HOME in a temporary directory),
  ``strategy="fedsoup"``, 2 rounds on the 3 SuperNodes, checkpoints on the volume;
* ``superexec-serverapp`` killed (SIGKILL) as soon as round 1 is checkpointed, started
  again, the run resubmitted with the same ``checkpoint-dir``: it resumes at round 2
  and ends with the model of the uninterrupted run, bit for bit;
* ``compose down -v`` whatever happened, then no container, network or volume of the
  project is left.

Also: the Dockerfile's two targets build with the classic builder, with BuildKit and
with podman (each where the machine has it), and every directory the image's user
writes in belongs to that user.

And the public overlay (docker-compose.tls.yml + docker-compose.public.yml; Debian's
``debian:bookworm-slim``, the proxy's base, pulled or a debootstrap stand-in): the
SuperLink's port answers on loopback only, the proxy's TLS port on the host's own
address; a SuperNode outside the compose network (a process on the host, partition 3
of 3, its compose twin not started) joins through the proxy and FedSoup runs 2 rounds
with it; the proxy answers 404 to every non-Fleet path (also `..` and ``%2F`` tricks)
and 400 to plain HTTP; ``flwr run`` and ``flwr supernode register`` through the public
port fail with the proxy's 404, and the SuperLink holds no run but the real one.

The ``[docker e2e]`` lines give the wall time of every step (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from safetensors.torch import load_file

from simulations import local_federation as lf
from simulations.local_federation.flwr_client import json_output

from deploy_helpers import NUM_SUPERNODES, RUN_CONFIG, load_module

ROOT = Path(__file__).resolve().parent.parent
FLWR_VERSION = importlib.metadata.version("flwr")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


standins = load_module("build_flower_standins", ROOT / "tests" / "docker_standins" / "build_flower_standins.py")

OVERLAYS = {"plain": [], "tls": ["docker-compose.tls.yml"],
            "auth": ["docker-compose.tls.yml", "docker-compose.auth.yml"]}
# Not in the kill-and-resume runs: the public overlay has a test of its own (the end of this file).
STACK_FILES = {**OVERLAYS, "public": ["docker-compose.tls.yml", "docker-compose.public.yml"]}


def log(message: str) -> None:
    print(f"[docker e2e] {message}", flush=True)


# --------------------------------------------------------------------------- the engine
def _probe(argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def compose_command() -> list[str] | None:
    """`docker compose` (v2) where the CLI has it, else `docker-compose` (v1)."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        probe = _probe([*argv, "version"])
        if probe is not None and probe.returncode == 0:
            return argv
    return None


def engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no `docker` CLI on PATH"
    info = _probe(["docker", "info", "--format", "{{.ServerVersion}}"])
    if info is None or info.returncode != 0:
        return f"no Docker engine answers `docker info`: {(info.stderr if info else 'timeout').strip()[:200]}"
    if compose_command() is None:
        return "neither `docker compose` nor `docker-compose` works here"
    return None


def docker(*args: str, timeout: float = 600, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        pytest.fail(f"`docker {' '.join(args)}` exited {result.returncode}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def flower_images() -> dict[str, bool]:
    """Flower's images of the installed version in the engine: pulled, or stand-ins built."""
    reason = engine_problem()
    if reason:
        pytest.skip(reason)
    tags = list(standins.image_tags(FLWR_VERSION).values())
    missing = [t for t in tags if not standins.image_exists(t)]
    if missing and not standins.try_pull(missing):
        if os.geteuid() != 0 or shutil.which("debootstrap") is None:
            pytest.skip(f"{', '.join(missing)} cannot be pulled, and building stand-ins needs root and debootstrap")
        start = time.perf_counter()
        try:
            standins.build_standins(FLWR_VERSION, log=log)
        except standins.StandinError as error:
            pytest.fail(f"building the stand-ins of Flower's images failed at {error}")
        log(f"stand-ins of {', '.join(tags)} built: {time.perf_counter() - start:.1f}s")
    kinds = {t: standins.is_standin(t) for t in tags}
    log("images: " + ", ".join(f"{t} ({'local stand-in' if s else 'Flower'})" for t, s in kinds.items()))
    return kinds


# --------------------------------------------------------------------------- builders
def _buildkit_cli() -> list[str] | str:
    """A BuildKit build command, or why there is none: `docker buildx build --load`, else any
    `docker` on PATH whose `DOCKER_BUILDKIT=1 docker build` drives the engine's BuildKit."""
    clis = []
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(directory) / "docker"
        if candidate.is_file() and os.access(candidate, os.X_OK) and candidate.resolve() not in clis:
            clis.append(candidate.resolve())
    for cli in clis:
        probe = _probe([str(cli), "buildx", "version"])
        if probe is not None and probe.returncode == 0:
            return [str(cli), "buildx", "build", "--load"]
    for cli in clis:
        probe = _probe([str(cli), "build", "--help"], timeout=10)
        if probe is None or probe.returncode != 0:
            continue
        # A CLI without buildx refuses DOCKER_BUILDKIT=1 only when asked to build: try an empty one.
        empty = subprocess.run([str(cli), "build", "-q", "-"], input="FROM scratch\nLABEL probe=1\n",
                               capture_output=True, text=True, env=dict(os.environ, DOCKER_BUILDKIT="1"))
        if empty.returncode == 0:
            return [str(cli), "build"]
    return f"no docker CLI on PATH drives BuildKit (tried {', '.join(map(str, clis)) or 'none'})"


def builder_command(builder: str) -> tuple[list[str], dict[str, str], str] | str:
    """(build argv, environment, the CLI that runs the result) for a builder, or why it is missing."""
    env = dict(os.environ)
    if builder == "classic":
        # --force-rm: not even a failed step leaves its container behind.
        return ["docker", "build", "--force-rm"], dict(env, DOCKER_BUILDKIT="0"), "docker"
    if builder == "buildkit":
        argv = _buildkit_cli()
        return argv if isinstance(argv, str) else (argv, dict(env, DOCKER_BUILDKIT="1"), "docker")
    if shutil.which("podman") is None:
        return "podman is not installed"
    for tag in (f"flwr/superexec:{FLWR_VERSION}", f"flwr/superlink:{FLWR_VERSION}"):
        probe = _probe(["podman", "image", "exists", tag])
        if probe is None or probe.returncode != 0:
            return f"podman has no {tag} (e.g. `docker save {tag} | podman load`)"
    return ["podman", "build"], env, "podman"


# Per target: the directories the image's user must own (and so can write in).
WRITABLE = {"superlink": ["/app/state"],
            "superexec": ["/app/src", "/app/src/fedsoup", "/app/checkpoints", "/app/outputs"]}
IMPORTS = {"superlink": "flwr", "superexec": "fedsoup, strategies, simulations.server_app, simulations.client_app"}


def check_dockerfile(tag: str, target: str) -> str:
    """A one-step build on `tag` that fails unless the image's user owns and can write in
    every directory of WRITABLE and the image imports its code. (A build step rather than
    a container: podman cannot start containers in every sandbox, but builds everywhere.)"""
    checks = " && ".join(
        f'{{ [ "$(stat -c %u {d})" = "$(id -u)" ] && touch {d}/.w && rm {d}/.w '
        f'|| {{ echo "{d} is not the image user\'s: $(stat -c %U {d})"; exit 1; }}; }}'
        for d in WRITABLE[target])
    return (f"FROM {tag}\n"
            f"RUN [ \"$(id -u)\" = {standins.APP_UID} ] && {checks} && python -c 'import {IMPORTS[target]}'\n")


@pytest.mark.parametrize("builder", ["classic", "buildkit", "podman"])
def test_dockerfile_builds_with(builder, flower_images, tmp_path):
    found = builder_command(builder)
    if isinstance(found, str):
        pytest.skip(found)
    argv, env, cli = found
    name = " ".join(Path(argv[0]).name if i == 0 else a for i, a in enumerate(argv))
    for target in WRITABLE:
        tag = f"fedsoup-builder-probe-{builder}-{target}:{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        # The build arguments of docker-compose.yml: the classic builder then shares its cache with `compose build`.
        built = subprocess.run([*argv, "--target", target, "--build-arg", f"FLWR_VERSION={FLWR_VERSION}", "-t", tag,
                                str(ROOT)], capture_output=True, text=True, env=env, timeout=1200)
        try:
            assert built.returncode == 0, f"{builder} build of {target}:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
            log(f"{builder} build of target {target} ({name}): {time.perf_counter() - start:.1f}s")
            checked = subprocess.run([*argv, "-t", f"{tag}-checked", "-f", "-", str(tmp_path)],
                                     input=check_dockerfile(tag, target),
                                     capture_output=True, text=True, env=env, timeout=300)
            assert checked.returncode == 0, f"{builder}/{target}:\n{checked.stdout[-3000:]}\n{checked.stderr[-3000:]}"
        finally:
            # Docker: only the tags go; their layers stay as the build cache that `compose build`
            # then hits (a pruning rmi deleted them, and compose rebuilt the torch layer again).
            keep_cache = ["--no-prune"] if Path(cli).name == "docker" else []
            subprocess.run([cli, "rmi", "-f", *keep_cache, f"{tag}-checked", tag], capture_output=True)


def test_the_ownership_check_catches_a_workdir_made_by_root(flower_images, tmp_path):
    """The bug this guards against: under the classic builder, `WORKDIR` creates a missing
    directory owned by root, and `pip install .` as `app` cannot write in it."""
    found = builder_command("classic")
    argv, env, cli = found
    tag = f"fedsoup-builder-probe-rootdir:{uuid.uuid4().hex[:8]}"
    dockerfile = f"FROM flwr/superexec:{FLWR_VERSION}\nWORKDIR /app/src\nRUN mkdir -p /app/checkpoints /app/outputs\n"
    built = subprocess.run([*argv, "-t", tag, "-f", "-", str(tmp_path)], input=dockerfile, capture_output=True,
                           text=True, env=env, timeout=300)
    try:
        assert built.returncode == 0, built.stderr
        checked = subprocess.run([*argv, "-t", f"{tag}-checked", "-f", "-", str(tmp_path)],
                                 input=check_dockerfile(tag, "superexec"), capture_output=True, text=True, env=env,
                                 timeout=300)
        assert checked.returncode != 0
        assert "/app/src is not the image user's: root" in checked.stdout + checked.stderr
    finally:
        subprocess.run([cli, "rmi", "-f", f"{tag}-checked", tag], capture_output=True)


# --------------------------------------------------------------------------- the compose stack
class Stack:
    """One compose project: unique name, its own SuperLink port, torn down with its volumes."""

    def __init__(self, overlay: str, workdir: Path, extra_sans: tuple[str, ...] = ()):
        self.overlay = overlay
        self.name = f"fedsoup-e2e-{overlay}-{uuid.uuid4().hex[:8]}"
        self.workdir = workdir
        self.compose = compose_command()
        self.files = ["docker-compose.yml", *STACK_FILES[overlay]]
        self.port, self.public_port = lf.free_ports(2)
        self.extra_sans = extra_sans
        self.certs = workdir / "certificates" if overlay in ("tls", "auth", "public") else None
        self.keys = workdir / "keys" if overlay == "auth" else None
        if self.certs is not None:
            self.files.append(str(self._material_overlay()))
        self.federation = lf.LocalFederation(workdir / "client", NUM_SUPERNODES, tls_dir=self.certs,
                                             auth_dir=self.keys, port=self.port, startup_timeout=180)

    def _material_overlay(self) -> Path:
        """Certificates (and SuperNode keys and secrets) made in the temporary directory and
        bound where the overlays bind ./certificates and ./keys (compose merges volumes by
        their path in the container, secrets by name): the test never writes into the checkout."""
        made = [subprocess.run([str(ROOT / "scripts" / "make-certs.sh"), str(self.certs), *self.extra_sans],
                               capture_output=True, text=True, timeout=120)]
        if self.keys is not None:
            made.append(subprocess.run([str(ROOT / "scripts" / "make-node-keys.sh"), str(self.keys),
                                        str(NUM_SUPERNODES)], capture_output=True, text=True, timeout=120))
        for result in made:
            assert result.returncode == 0, result.stderr
        private = [self.certs / "server.key", *(sorted(self.keys.glob("*.key")) + sorted(self.keys.glob("*.secret"))
                                                if self.keys else [])]
        for path in private:  # the images run as uid 49999, as docs/deployment.md says
            try:
                os.chown(path, standins.APP_UID, standins.APP_UID)
            except PermissionError:
                path.chmod(0o644)  # throwaway material: readable by the containers' user anyway
        services = ["superlink", "superexec-serverapp", *[f"supernode-{i}" for i in range(1, NUM_SUPERNODES + 1)]]
        lines = ["services:"]
        for service in services:
            names = ("ca.crt", "server.pem", "server.key") if service == "superlink" else ("ca.crt",)
            lines += [f"  {service}:", "    volumes:"]
            lines += [f"      - {self.certs / n}:/app/certificates/{n}:ro" for n in names]
        if self.overlay == "public":
            lines += ["  fleet-proxy:", "    volumes:"]
            lines += [f"      - {self.certs / n}:/etc/fedsoup-proxy/tls/{n}:ro" for n in ("ca.crt", "server.pem", "server.key")]
        if self.keys is not None:
            lines += ["secrets:", "  superlink-secret:", f"    file: {self.keys / 'superlink.secret'}"]
            for i in range(1, NUM_SUPERNODES + 1):
                lines += [f"  supernode-{i}-key:", f"    file: {self.keys / f'supernode-{i}.key'}",
                          f"  supernode-{i}-secret:", f"    file: {self.keys / f'supernode-{i}.secret'}"]
        path = self.workdir / "docker-compose.test-material.yml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def env(self) -> dict[str, str]:
        return dict(os.environ, COMPOSE_PROJECT_NAME=self.name, SUPERLINK_PORT=str(self.port),
                    FLEET_PUBLIC_PORT=str(self.public_port),
                    FLWR_VERSION=FLWR_VERSION)

    def run(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        argv = [*self.compose, "--project-directory", str(ROOT), "-p", self.name,
                *[x for f in self.files for x in ("-f", str(ROOT / f))], *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=self.env())
        if check and result.returncode != 0:
            pytest.fail(f"`{' '.join(argv)}` exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def container(self, service: str) -> str:
        ids = self.run("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def read(self, service: str, path: str) -> str | None:
        result = docker("exec", self.container(service), "cat", path, check=False, timeout=60)
        return result.stdout if result.returncode == 0 else None

    def checkpoint_round(self, checkpoint_dir: str) -> int | None:
        text = self.read("superexec-serverapp", f"{checkpoint_dir}/state.json")
        try:
            return int(json.loads(text)["state"]["round"])
        except (TypeError, ValueError, KeyError):
            return None

    def copy_out(self, service: str, path: str, dest: Path) -> Path:
        docker("cp", f"{self.container(service)}:{path}", str(dest))
        return dest

    def leftovers(self) -> dict[str, list[str]]:
        label = f"label=com.docker.compose.project={self.name}"
        return {kind: docker(*args, "--filter", label, "-q").stdout.split()
                for kind, args in (("containers", ["ps", "-a"]), ("networks", ["network", "ls"]),
                                   ("volumes", ["volume", "ls"]))}

    def down(self) -> None:
        start = time.perf_counter()
        self.run("down", "-v", "--remove-orphans", "--timeout", "10", check=False)
        log(f"{self.overlay}: down -v: {time.perf_counter() - start:.1f}s")


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    """Results shared between the overlays' runs (the uninterrupted model, from the first)."""
    return {}


@contextlib.contextmanager
def brought_up(stack: Stack, register_first: bool = False):
    """`compose build` and `up -d` until the SuperLink answers; logs kept, `down -v` and the
    check that nothing of the project is left, whatever happened."""
    try:
        start = time.perf_counter()
        stack.run("build", *(["--force-rm"] if stack.compose == ["docker-compose"] else []))
        log(f"{stack.overlay}: `{' '.join(stack.compose)} build` (project {stack.name}): "
            f"{time.perf_counter() - start:.1f}s")
        start = time.perf_counter()
        stack.federation.write_cli_config()
        if register_first:  # the SuperLink first, to register the SuperNodes' public keys
            stack.run("up", "-d", "superlink")
            stack.federation.wait_healthy()
            stack.federation.register_supernodes()
        stack.run("up", "-d")
        stack.federation.wait_healthy()
        log(f"{stack.overlay}: up -d until the SuperLink answers on 127.0.0.1:{stack.port}: "
            f"{time.perf_counter() - start:.1f}s")
        yield stack
    finally:
        stack.federation.stop()  # whatever the test started on the host
        # The containers' logs outlive them, for a failure's post-mortem.
        (stack.workdir / "compose.log").write_text(stack.run("logs", "--no-color", check=False, timeout=120).stdout)
        stack.down()
        left = stack.leftovers()
        assert not any(left.values()), f"left behind by project {stack.name}: {left}"


@pytest.fixture(params=list(OVERLAYS))
def stack(request, flower_images, tmp_path):
    overlay = request.param
    missing = [f for f in OVERLAYS[overlay] if not (ROOT / f).is_file()]
    if missing:
        pytest.skip(f"the repository has no {', '.join(missing)}")
    with brought_up(Stack(overlay, tmp_path), register_first=overlay == "auth") as stack:
        yield stack


def run_to_end(stack: Stack, config: dict, timeout: float = 600) -> tuple[int, str, str]:
    run_id = stack.federation.submit(ROOT, config)
    status = stack.federation.wait(run_id, timeout=timeout)
    return run_id, status, stack.federation.run_log(run_id)


def test_fedsoup_on_compose_survives_a_killed_serverapp_container(stack, references, tmp_path):
    fed = stack.federation
    overlay = stack.overlay

    if "model" not in references:
        # The reference: 2 rounds, uninterrupted, on this stack.
        config = RUN_CONFIG | {"checkpoint-dir": "/app/checkpoints/uninterrupted",
                               "output-dir": "/app/outputs/uninterrupted"}
        start = time.perf_counter()
        run_id, status, text = run_to_end(stack, config)
        log(f"{overlay}: 2 FedSoup rounds on 3 SuperNodes, uninterrupted: {time.perf_counter() - start:.1f}s")
        assert status == lf.FINISHED_OK, text[-3000:]
        assert "[ROUND 2/2]" in text and "FedSoup merged 3 replies" in text, text[-3000:]
        rounds = {r["round"]: r for r in json.loads(stack.read("superexec-serverapp",
                                                               "/app/outputs/uninterrupted/rounds.json"))["rounds"]}
        assert rounds[2]["test-accuracy"] > rounds[0]["test-accuracy"] + 0.2, rounds
        assert stack.checkpoint_round("/app/checkpoints/uninterrupted") == 2
        references["model"] = load_file(stack.copy_out("superexec-serverapp",
                                                       "/app/outputs/uninterrupted/final_model.safetensors",
                                                       tmp_path / "uninterrupted.safetensors"))
        references["test-accuracy"] = rounds[2]["test-accuracy"]

    # Run 1: the ServerApp's container is killed as soon as round 1 is on the volume.
    checkpoint_dir = "/app/checkpoints/resumed"
    config = RUN_CONFIG | {"checkpoint-dir": checkpoint_dir}
    start = time.perf_counter()
    first = fed.submit(ROOT, config | {"output-dir": "/app/outputs/killed"})
    deadline = time.monotonic() + 600
    while stack.checkpoint_round(checkpoint_dir) != 1:
        assert time.monotonic() < deadline, "round 1 was never checkpointed"
        time.sleep(0.5)
    stack.run("kill", "superexec-serverapp")  # SIGKILL: no clean shutdown
    container = stack.container("superexec-serverapp")
    assert docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "false"
    log(f"{overlay}: submitted, round 1 checkpointed, superexec-serverapp killed: {time.perf_counter() - start:.1f}s")
    restart = time.perf_counter()
    stack.run("start", "superexec-serverapp")
    assert stack.container("superexec-serverapp") == container, "a new container, not the killed one restarted"
    assert stack.checkpoint_round(checkpoint_dir) == 1, "the kill came too late: round 2 was already checkpointed"
    assert stack.read("superexec-serverapp", "/app/outputs/killed/final_model.safetensors") is None
    # Flower does not relaunch the ServerApp of a started run: stop it, freeing the SuperNodes.
    fed.flwr("stop", str(first), lf.CONNECTION)
    assert fed.status(first).startswith("finished:"), fed.status(first)

    # Run 2: the same checkpoint-dir, resubmitted to the restarted container.
    second, status, text = run_to_end(stack, config | {"output-dir": "/app/outputs/resumed"})
    log(f"{overlay}: restart + resubmit + round 2 from the checkpoint volume: {time.perf_counter() - restart:.1f}s")
    assert second != first
    assert status == lf.FINISHED_OK, text[-3000:]
    assert "Resuming at round 2/2" in text, text[-3000:]
    assert "[ROUND 1/2]" not in text and "[ROUND 2/2]" in text, text[-3000:]
    assert stack.checkpoint_round(checkpoint_dir) == 2
    resumed = load_file(stack.copy_out("superexec-serverapp", "/app/outputs/resumed/final_model.safetensors",
                                       tmp_path / "resumed.safetensors"))
    reference = references["model"]
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert (resumed[key] == reference[key]).all(), f"tensor '{key}' differs from the uninterrupted run"


# --------------------------------------------------------------------------- the public overlay
def host_address() -> str | None:
    """An address of this host beyond loopback: the one its default route leaves from."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent, only a route is chosen
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(address).is_loopback else address


def tcp_connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=3):
            return True
    except OSError:
        return False


def https_post(url: str, ca: Path) -> int:
    """The HTTP status of an empty protobuf POST (urllib; 4xx/5xx are answers too)."""
    request = urllib.request.Request(url, data=b"", method="POST",
                                     headers={"content-type": "application/protobuf"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=ssl.create_default_context(cafile=str(ca))) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def debian_image(flower_images) -> bool:
    """debian:bookworm-slim (the proxy's base) in the engine: pulled, or a stand-in built."""
    tag = standins.DEBIAN_TAG
    if not standins.image_exists(tag) and not standins.try_pull([tag]):
        try:
            standins.build_debian_standin(tag, log=log)
        except standins.StandinError as error:
            pytest.fail(f"building the stand-in of {tag} failed at {error}")
    return standins.is_standin(tag)


@pytest.fixture
def public_stack(flower_images, debian_image, tmp_path):
    """docker-compose.yml + TLS + public overlays, supernode-3 left to a SuperNode on the host."""
    address = host_address()
    if address is None:
        pytest.skip("this host has no address beyond loopback to reach the proxy on")
    stack = Stack("public", tmp_path, extra_sans=(address,))
    # Partition 2 of 3 is the remote SuperNode's: its compose twin is not started.
    remote_slot = tmp_path / "docker-compose.test-remote.yml"
    remote_slot.write_text("services:\n  supernode-3:\n    profiles: [disabled]\n"
                           "  superexec-clientapp-3:\n    profiles: [disabled]\n")
    stack.files.append(str(remote_slot))
    stack.host_address = address
    with brought_up(stack) as stack:
        yield stack


def write_public_connection(fed: lf.LocalFederation, address: str, ca: Path) -> str:
    """A `flwr` connection that dials the proxy's public port instead of the loopback one."""
    name = "through-the-proxy"
    with fed.flwr_home.joinpath("config.toml").open("a", encoding="utf-8") as config:
        config.write(f'\n[superlink.{name}]\naddress = "{address}"\nroot-certificates = {json.dumps(str(ca))}\n')
    return name


def refused_by_the_proxy(result: subprocess.CompletedProcess) -> str:
    """The error a `flwr ... --format json` command reported, checked to be the proxy's 404
    (not a TLS or connection failure, which would prove nothing about the proxy's routes)."""
    payload = json_output(result)
    assert payload.get("success") is False, result.stdout[-2000:]
    assert not {"run-id", "node-id"} & set(payload), payload
    message = str(payload.get("error-message", ""))
    assert "404" in message, f"not refused by the proxy's routes: {message}"
    return next(line for line in message.splitlines() if "404" in line).strip()


def test_public_overlay_admits_a_remote_supernode_and_refuses_the_control_api(public_stack, tmp_path):
    stack, fed = public_stack, public_stack.federation
    host, ca = stack.host_address, stack.certs / "ca.crt"
    public = f"{host}:{stack.public_port}"

    # Closed by default: the SuperLink's port answers on loopback only; the proxy's on the host's address.
    assert not tcp_connects(host, stack.port), f"the SuperLink's port {stack.port} is open on {host}"
    assert tcp_connects(host, stack.public_port)
    # The proxy forwards the Fleet API and nothing else; it speaks TLS only.
    assert https_post(f"https://{public}/v1/fleet/get-run", ca) not in (403, 404)  # the SuperLink's own answer
    for path in ("/v1/control/list-runs", "/v1/control/start-run", "/v1/control/register-node",
                 "/v1/runtime/get-nodes", "/health", "/docs", "/v1/fleet/../control/list-runs",
                 "/v1/fleet/register-node%2F..%2F..%2Fcontrol%2Flist-runs"):
        assert https_post(f"https://{public}{path}", ca) == 404, path
    with pytest.raises(urllib.error.HTTPError) as plain:
        urllib.request.urlopen(urllib.request.Request(f"http://{public}/v1/fleet/get-run", data=b""), timeout=30)
    assert plain.value.code == 400  # nginx: "The plain HTTP request was sent to HTTPS port"

    # A SuperNode on "another machine" (this host, outside the compose network) dials the public port.
    start = time.perf_counter()
    clientappio = lf.free_ports(1)[0]
    supernode = fed.spawn("remote-supernode", [
        fed.command("flower-supernode"), "--root-certificates", str(ca), "--superlink", public,
        "--isolation", "process", "--host", "127.0.0.1", "--port", str(clientappio),
        "--node-config", f"partition-id={NUM_SUPERNODES - 1} num-partitions={NUM_SUPERNODES}"])
    fed.spawn("remote-superexec-clientapp", [fed.command("flower-superexec"), "--insecure",
                                             "--runtime-api-address", f"127.0.0.1:{clientappio}"])
    run_id, status, text = run_to_end(stack, RUN_CONFIG | {"output-dir": "/app/outputs/public"})
    log(f"public: 2 FedSoup rounds, 2 SuperNodes in compose + 1 through the proxy: {time.perf_counter() - start:.1f}s")
    assert status == lf.FINISHED_OK, text[-3000:]
    assert "[ROUND 2/2]" in text and f"FedSoup merged {NUM_SUPERNODES} replies" in text, text[-3000:]
    remote_log = supernode.log()
    assert remote_log.count("Sent successfully") >= 2, remote_log[-3000:]  # a reply in each round
    proxy_log = stack.run("logs", "--no-color", "fleet-proxy").stdout
    assert re.search(r'"POST /v1/fleet/push-messages HTTP/1\.1" 200', proxy_log), proxy_log[-3000:]

    # The Control API through the public port: `flwr run` and `flwr supernode register` are refused.
    connection = write_public_connection(fed, public, ca)
    runs_before = json_output(fed.flwr("ls", lf.CONNECTION, "--format", "json"))["runs"]
    submitted = fed.flwr("run", str(ROOT), connection, "--format", "json", check=False, timeout=300)
    refusal = refused_by_the_proxy(submitted)
    key = tmp_path / "outsider.pub"  # an EC P-384 public key in OpenSSH format, as Flower reads them
    key.write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(Encoding.OpenSSH,
                                                                                     PublicFormat.OpenSSH))
    registered = fed.flwr("supernode", "register", str(key), connection, "--format", "json", check=False)
    refused_by_the_proxy(registered)
    # Nothing reached the SuperLink: the same runs, as seen from the loopback port.
    runs_after = json_output(fed.flwr("ls", lf.CONNECTION, "--format", "json"))["runs"]
    assert [int(r["run-id"]) for r in runs_after] == [int(r["run-id"]) for r in runs_before] == [run_id]
    log(f"public: `flwr run` and `flwr supernode register` through the proxy refused: {refusal}")
