"""docker-compose.yml (+ overlays), Dockerfile and scripts against the installed Flower.

No Docker engine is needed: every service's command is checked against the
installed Flower commands (the flags their ``--help`` lists, then the real
argument parser), every address/port/volume/file it references against what the
compose files declare, and the Dockerfile and build context against the repository.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
import shutil
import stat
import subprocess
import sys
from functools import cache
from pathlib import Path, PurePosixPath

import pytest
import yaml

from simulations import local_federation

from deploy_helpers import load_module

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
BIN = Path(sys.executable).parent
FLWR_VERSION = importlib.metadata.version("flwr")

# Which Flower command a service runs, from its image or Dockerfile build target.
COMMAND_OF_IMAGE = {"flwr/superlink": "flower-superlink", "flwr/supernode": "flower-supernode",
                    "flwr/superexec": "flower-superexec"}
COMMAND_OF_TARGET = {"superlink": "flower-superlink", "supernode": "flower-supernode",
                     "superexec": "flower-superexec"}
PATH_FLAGS = ("--database", "--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certfile", "--root-certificates",
              "--auth-supernode-private-key", "--superexec-auth-secret-file")
SECRET_FLAGS = ("--auth-supernode-private-key", "--superexec-auth-secret-file")
SECRETS_DIR = PurePosixPath("/run/secrets")  # where compose mounts a service's secrets
ADDRESS_FLAGS = ("--superlink", "--runtime-api-address")


scale = load_module("scale_supernodes", SCRIPTS / "scale-supernodes.py")


# --------------------------------------------------------------------------- compose model
def interpolate(value):
    """Compose's ``${VAR:-default}`` with VAR unset: the default."""
    if isinstance(value, str):
        return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def volume_target(entry: str) -> str:
    return entry.split(":")[1]


def merge_service(base: dict, over: dict) -> dict:
    """Compose's merge rules for the keys used here: command/image/build/profiles replace,
    environment merges by name, volumes merge by container path."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if key == "environment":
            merged[key] = {**merged.get(key, {}), **value}
        elif key == "volumes":
            by_target = {volume_target(v): v for v in merged.get(key, [])}
            by_target.update({volume_target(v): v for v in value})
            merged[key] = list(by_target.values())
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_compose(*texts: str) -> dict:
    """The effective project of ``docker compose -f a -f b ...`` (profiles left out)."""
    project: dict = {"services": {}, "volumes": {}, "secrets": {}}
    for text in texts:
        doc = interpolate(yaml.safe_load(text))
        for name, service in doc.get("services", {}).items():
            project["services"][name] = merge_service(project["services"].get(name, {}), service)
        project["volumes"].update(doc.get("volumes") or {})
        project["secrets"].update(doc.get("secrets") or {})
    project["services"] = {n: s for n, s in project["services"].items() if not s.get("profiles")}
    return project


def read(name: str) -> str:
    return (ROOT / name).read_text()


VARIANTS = {
    "base": lambda: [read("docker-compose.yml")],
    "tls": lambda: [read("docker-compose.yml"), read("docker-compose.tls.yml")],
    "scaled-1": lambda: [read("docker-compose.yml"), scale.overlay(1)],
    "scaled-5": lambda: [read("docker-compose.yml"), scale.overlay(5)],
    "tls-scaled-5": lambda: [read("docker-compose.yml"), read("docker-compose.tls.yml"), scale.overlay(5, tls=True)],
    "tls-auth": lambda: [read("docker-compose.yml"), read("docker-compose.tls.yml"), read("docker-compose.auth.yml")],
    "tls-auth-scaled-2": lambda: [read("docker-compose.yml"), read("docker-compose.tls.yml"),
                                  read("docker-compose.auth.yml"), scale.overlay(2, tls=True, auth=True)],
    "tls-auth-scaled-5": lambda: [read("docker-compose.yml"), read("docker-compose.tls.yml"),
                                  read("docker-compose.auth.yml"), scale.overlay(5, tls=True, auth=True)],
}
EXPECTED_SUPERNODES = {"base": 3, "tls": 3, "scaled-1": 1, "scaled-5": 5, "tls-scaled-5": 5, "tls-auth": 3,
                       "tls-auth-scaled-2": 2, "tls-auth-scaled-5": 5}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> tuple[str, dict]:
    return request.param, load_compose(*VARIANTS[request.param]())


def flower_command(name: str, service: dict) -> str:
    image = service.get("image", "").split(":")[0]
    if image in COMMAND_OF_IMAGE:
        return COMMAND_OF_IMAGE[image]
    target = service.get("build", {}).get("target")
    assert target in COMMAND_OF_TARGET, f"service '{name}': cannot tell which Flower command it runs"
    return COMMAND_OF_TARGET[target]


def flag_values(command: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command (flags without a value map to '')."""
    values = {}
    for i, arg in enumerate(command):
        if arg.startswith("--"):
            nxt = command[i + 1] if i + 1 < len(command) else ""
            values[arg] = "" if nxt.startswith("--") else nxt
    return values


# --------------------------------------------------------------------------- installed Flower
@cache
def help_flags(executable: str) -> frozenset[str]:
    """The long options that ``<executable> --help`` of the installed Flower lists."""
    result = subprocess.run([str(BIN / executable), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{executable} --help failed:\n{result.stderr}"
    return frozenset(re.findall(r"(--[a-z][a-z0-9-]*)", result.stdout))


def real_parser(executable: str):
    """The installed command's own argparse parser (private Flower API, so optional)."""
    try:
        if executable == "flower-superlink":
            from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink as make
        elif executable == "flower-supernode":
            from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode as make
        else:
            from flwr.supercore.cli.flower_superexec import _parse_args as make
    except ImportError:
        return None
    return make()


def assert_command_accepted(where: str, executable: str, command: list[str]) -> None:
    unknown = sorted({a for a in command if a.startswith("--")} - help_flags(executable))
    assert not unknown, f"{where}: {executable} --help does not list {unknown}"
    parser = real_parser(executable)
    if parser is not None:
        try:
            parser.parse_args(command)
        except SystemExit:
            pytest.fail(f"{where}: {executable} rejects {command}")


# --------------------------------------------------------------------------- compose tests
def test_every_command_is_accepted_by_the_installed_flower(variant):
    check_commands(*variant)


def check_commands(label: str, project: dict) -> None:
    for name, service in project["services"].items():
        assert_command_accepted(f"{label}/{name}", flower_command(name, service), service["command"])


def test_each_service_either_uses_tls_or_says_insecure(variant):
    label, project = variant
    for name, service in project["services"].items():
        flags = flag_values(service["command"])
        tls = {"--ssl-certfile", "--root-certificates"} & set(flags)
        assert ("--insecure" in flags) != bool(tls), f"{label}/{name}: --insecure xor TLS flags"
    if label.startswith("tls"):
        for name in ("superlink", "superexec-serverapp", *[n for n in project["services"] if n.startswith("supernode-")]):
            assert "--insecure" not in project["services"][name]["command"], f"{label}/{name} stays insecure"


def test_every_address_points_at_a_declared_service_and_its_port(variant):
    check_addresses(*variant)


def check_addresses(label: str, project: dict) -> None:
    services = project["services"]
    for name, service in services.items():
        for flag, value in flag_values(service["command"]).items():
            if flag not in ADDRESS_FLAGS:
                continue
            host, _, port = value.rpartition(":")
            assert host in services, f"{label}/{name}: {flag} {value} names no service"
            target_port = flag_values(services[host]["command"]).get("--port")
            assert target_port == port, f"{label}/{name}: {flag} {value} but {host} listens on --port {target_port}"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{label}/{name}: depends_on '{dependency}' is not a service"
        for mapping in service.get("ports", []):
            container_port = str(mapping).rsplit(":", 1)[-1]
            assert flag_values(service["command"]).get("--port") == container_port, (
                f"{label}/{name}: publishes {mapping} but listens on another port")


def test_every_volume_and_file_is_declared(variant):
    check_volumes(*variant)


def check_volumes(label: str, project: dict) -> None:
    for name, service in project["services"].items():
        mounts = []
        for entry in service.get("volumes", []):
            source, target = entry.split(":")[:2]
            mounts.append(PurePosixPath(target))
            if source.startswith((".", "/")):
                # Bind mounts: only the certificates that scripts/make-certs.sh writes.
                assert PurePosixPath(source).parent == PurePosixPath("./certificates"), f"{label}/{name}: {entry}"
                assert PurePosixPath(source).name in ("ca.crt", "server.pem", "server.key")
            else:
                assert source in project["volumes"], f"{label}/{name}: volume '{source}' is not declared"
        for secret in service.get("secrets", []):
            # Secrets: only the files that scripts/make-node-keys.sh writes into ./keys.
            assert secret in project["secrets"], f"{label}/{name}: secret '{secret}' is not declared"
            assert PurePosixPath(project["secrets"][secret]["file"]).parent == PurePosixPath("./keys"), (
                f"{label}/{name}: secret '{secret}' is not a file in ./keys")
            mounts.append(SECRETS_DIR / secret)
        for flag, value in flag_values(service["command"]).items():
            if flag in PATH_FLAGS:
                path = PurePosixPath(value)
                assert any(path == m or m in path.parents for m in mounts), (
                    f"{label}/{name}: {flag} {value} is not inside any volume of the service")


def test_state_and_checkpoints_live_on_volumes(variant):
    label, project = variant
    superlink = project["services"]["superlink"]
    database = PurePosixPath(flag_values(superlink["command"])["--database"])
    named = {volume_target(v): v.split(":")[0] for v in superlink["volumes"]}
    assert named.get(str(database.parent)) in project["volumes"], f"{label}: SuperLink state not on a named volume"
    serverapp = project["services"]["superexec-serverapp"]
    targets = {volume_target(v): v.split(":")[0] for v in serverapp["volumes"]}
    assert targets.get("/app/checkpoints") in project["volumes"], f"{label}: no checkpoint volume for FedSoup"


def test_supernodes_have_partitions_and_a_clientapp_superexec_each(variant):
    label, project = variant
    services = project["services"]
    supernodes = sorted(n for n in services if n.startswith("supernode-"))
    n = EXPECTED_SUPERNODES[label]
    assert len(supernodes) == n, f"{label}: {supernodes}"
    partitions = []
    for name in supernodes:
        config = dict(kv.split("=") for kv in flag_values(services[name]["command"])["--node-config"].split())
        assert int(config["num-partitions"]) == n, f"{label}/{name}: {config}"
        partitions.append(int(config["partition-id"]))
    assert sorted(partitions) == list(range(n))
    for name in supernodes:
        executors = [s for s in services.values()
                     if flag_values(s["command"]).get("--runtime-api-address", "").startswith(f"{name}:")]
        assert len(executors) == 1, f"{label}/{name}: {len(executors)} ClientApp SuperExecs"


def test_runtime_dependency_installation_is_off_everywhere(variant):
    label, project = variant
    for name, service in project["services"].items():
        assert service["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1", f"{label}/{name}"
        assert "--allow-runtime-dependency-installation" not in service["command"], f"{label}/{name}"
    assert "--disable-runtime-dependency-installation" in project["services"]["superlink"]["command"]


def test_app_code_runs_only_in_images_built_from_this_project(variant):
    label, project = variant
    for name, service in project["services"].items():
        if flower_command(name, service) == "flower-superexec":
            assert service["build"]["target"] == "superexec", f"{label}/{name}"


# --------------------------------------------------------------------------- SuperNode authentication
def secret_source(project: dict, service: str, flag: str) -> str | None:
    """The host file behind the path `service` passes to `flag` (a compose secret); None without the flag."""
    value = flag_values(project["services"][service]["command"]).get(flag)
    if value is None:
        return None
    path = PurePosixPath(value)
    assert path.parent == SECRETS_DIR and path.name in project["services"][service].get("secrets", []), (
        f"{service}: {flag} {value} is not one of its compose secrets")
    return project["secrets"][path.name]["file"]


def check_auth(label: str, project: dict) -> None:
    """Only registered SuperNodes get in; every SuperExec proves itself with its partner's secret."""
    services = project["services"]
    superlink = flag_values(services["superlink"]["command"])
    assert "--enable-supernode-auth" in superlink, f"{label}: the SuperLink admits any SuperNode"
    assert "--ssl-certfile" in superlink, f"{label}: SuperNode authentication without TLS"
    link_secret = secret_source(project, "superlink", "--superexec-auth-secret-file")
    assert link_secret == "./keys/superlink.secret", f"{label}: SuperLink secret {link_secret}"
    assert secret_source(project, "superexec-serverapp", "--superexec-auth-secret-file") == link_secret
    for name in (n for n in services if n.startswith("supernode-")):
        assert secret_source(project, name, "--auth-supernode-private-key") == f"./keys/{name}.key", (
            f"{label}/{name}: not its own private key")
        node_secret = secret_source(project, name, "--superexec-auth-secret-file")
        assert node_secret == f"./keys/{name}.secret", f"{label}/{name}: SuperExec secret {node_secret}"
        executor = next(n for n, s in services.items()
                        if flag_values(s["command"]).get("--runtime-api-address", "").startswith(f"{name}:"))
        assert secret_source(project, executor, "--superexec-auth-secret-file") == node_secret, (
            f"{label}/{executor}: not the secret of {name}")


def test_auth_overlays_admit_only_registered_supernodes(variant):
    label, project = variant
    if "auth" in label:
        check_auth(label, project)
    else:  # the other variants stay as they were: no key material anywhere
        for name, service in project["services"].items():
            used = set(flag_values(service["command"])) & {*SECRET_FLAGS, "--enable-supernode-auth"}
            assert not used and not service.get("secrets"), f"{label}/{name}: {used}"


@pytest.mark.parametrize(
    ("mistake", "fix", "message"),
    [
        ("      - --enable-supernode-auth\n", "", "admits any SuperNode"),
        ("/run/secrets/supernode-2-key", "/run/secrets/supernode-1-key", "not one of its compose secrets"),
        ("- /run/secrets/supernode-3-secret\n    secrets: [supernode-3-secret]",
         "- /run/secrets/supernode-1-secret\n    secrets: [supernode-1-secret]", "not the secret of supernode-3"),
    ],
)
def test_the_auth_check_catches_broken_overlays(mistake, fix, message):
    text = read("docker-compose.auth.yml")
    assert mistake in text
    broken = load_compose(read("docker-compose.yml"), read("docker-compose.tls.yml"), text.replace(mistake, fix, 1))
    with pytest.raises(AssertionError, match=message):
        check_auth("broken", broken)


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_make_node_keys_writes_what_the_auth_overlays_mount_in_formats_flower_reads(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    keys = tmp_path / "keys"
    made = subprocess.run([str(SCRIPTS / "make-node-keys.sh"), str(keys), "5"], capture_output=True, text=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    for label in ("tls-auth", "tls-auth-scaled-5"):
        for secret in load_compose(*VARIANTS[label]())["secrets"].values():
            assert (keys / PurePosixPath(secret["file"]).name).is_file(), f"{label}: {secret['file']} not made"
    for i in range(1, 6):
        private = load_ssh_private_key((keys / f"supernode-{i}.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
        assert try_load_public_key(keys / f"supernode-{i}.pub")  # what `flwr supernode register` reads
        for secret in (keys / f"supernode-{i}.key", keys / f"supernode-{i}.secret"):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret
    secret = (keys / "superlink.secret").read_bytes()
    assert re.fullmatch(rb"[0-9a-f]{64}", secret), "a secret is 64 hex characters, no newline"
    assert len({(keys / f"supernode-{i}.secret").read_bytes() for i in range(1, 6)} | {secret}) == 6
    # Kept on a second call (registered keys stay valid); --force makes new ones.
    before = (keys / "supernode-1.pub").read_bytes()
    again = subprocess.run([str(SCRIPTS / "make-node-keys.sh"), str(keys), "5"], capture_output=True, text=True)
    assert again.returncode == 0 and "keeping" in again.stderr
    assert (keys / "supernode-1.pub").read_bytes() == before
    assert (keys / ".gitignore").read_text() == "*\n"


def test_generated_keys_and_certificates_are_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["keys/supernode-1.key", "keys/superlink.secret", "certificates/server.key",
             ".flwr/deploy-local/keys/supernode-1.key"]
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *paths], capture_output=True, text=True, cwd=ROOT)
    assert sorted(ignored.stdout.split()) == sorted(paths)


@pytest.mark.parametrize(
    ("mistake", "fix", "check", "message"),
    [
        ("- --isolation\n      - process\n      - --host", "- --isolaton\n      - process\n      - --host",
         check_commands, "does not list"),
        ("- superlink:9093\n      - --isolation", "- superlink:9092\n      - --isolation", check_addresses,
         "listens on --port 9093"),
        ("- supernode-2:9094", "- supernode-7:9094", check_addresses, "names no service"),
        ("- /app/state/state.db", "- /app/data/state.db", check_volumes, "not inside any volume"),
        ("  fedsoup-checkpoints:\n", "", check_volumes, "is not declared"),
    ],
)
def test_the_checks_catch_broken_compose_files(mistake, fix, check, message):
    text = read("docker-compose.yml")
    assert mistake in text
    broken = load_compose(text.replace(mistake, fix, 1))
    with pytest.raises((AssertionError, pytest.fail.Exception), match=message):
        check("broken", broken)


def test_the_documented_connection_reaches_the_published_superlink_port():
    published = load_compose(read("docker-compose.yml"))["services"]["superlink"]["ports"][0].split(":")[0]
    docs = read("docs/deployment.md")
    assert f'address = "127.0.0.1:{published}"' in docs
    assert f"--superlink superlink.example.org:{published}" in docs


# --------------------------------------------------------------------------- Dockerfile
def dockerfile_stages() -> dict[str, str]:
    """Stage name -> base image of every ``FROM image AS name``."""
    return {alias: image for image, alias in
            re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", read("Dockerfile"), flags=re.M | re.I)}


def test_build_context_dockerfile_and_targets_exist():
    stages = dockerfile_stages()
    project = load_compose(*VARIANTS["tls-scaled-5"]())
    for name, service in project["services"].items():
        build = service.get("build")
        if build is None:
            continue
        context = ROOT / build["context"]
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        assert build["target"] in stages, f"{name}: Dockerfile has no stage '{build['target']}'"
        assert build["args"]["FLWR_VERSION"] == FLWR_VERSION


def test_dockerfile_builds_on_flowers_images_of_the_installed_version():
    text = read("Dockerfile")
    assert re.search(rf"^ARG FLWR_VERSION={re.escape(FLWR_VERSION)}$", text, flags=re.M)
    for alias, image in dockerfile_stages().items():
        assert image == f"flwr/{alias}:${{FLWR_VERSION}}", f"stage {alias} is built on {image}"
    # The App's dependencies are installed at build time, with flwr pinned to the image's.
    assert '"flwr==${FLWR_VERSION}"' in text
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    compose = load_compose(read("docker-compose.yml"))
    images = {s["image"] for s in compose["services"].values()}
    assert f"flwr/supernode:{FLWR_VERSION}" in images


def test_every_copied_path_exists_and_passes_dockerignore():
    ignore = read(".dockerignore").splitlines()
    assert ignore[0].startswith("#") and "**" in ignore, "the context is an allow-list"
    allowed = {line[1:].split("/")[0] for line in ignore if line.startswith("!")}
    for sources in re.findall(r"^COPY\s+(?:--chown=\S+\s+)?(.+?)\s+\S+$", read("Dockerfile"), flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists() or source == "README.md", f"COPY {source}: not in the repository"
            assert source in allowed, f"COPY {source}: excluded by .dockerignore"
    packages = re.search(r'include = \[(.*?)\]', read("pyproject.toml")).group(1)
    for package in re.findall(r'"(\w+)\*"', packages):
        assert package in allowed, f"package {package} is not in the build context"


def _docker_compose() -> list[str] | None:
    """`docker compose` (v2), else `docker-compose` (v1), else None."""
    for argv in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(argv[0]) is None:
            continue
        if subprocess.run([*argv, "version"], capture_output=True, text=True).returncode == 0:
            return argv
    return None


COMPOSE = _docker_compose()


@pytest.mark.skipif(COMPOSE is None, reason="neither `docker compose` nor `docker-compose` here")
def test_docker_compose_config_accepts_the_files(tmp_path):
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.tls.yml"],
                  ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.auth.yml"]):
        args = [x for f in files for x in ("-f", str(ROOT / f))]
        result = subprocess.run([*COMPOSE, *args, "config", "-q"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- scripts
def test_scale_overlay_rejects_zero_supernodes_and_auth_without_tls():
    with pytest.raises(ValueError, match="at least 1"):
        scale.overlay(0)
    with pytest.raises(ValueError, match="needs --tls"):
        scale.overlay(2, auth=True)
    result = subprocess.run([sys.executable, str(SCRIPTS / "scale-supernodes.py"), "0"], capture_output=True, text=True)
    assert result.returncode == 2 and "at least 1" in result.stderr


def test_local_federation_uses_the_compose_flags(tmp_path):
    """scripts/deploy-local.sh starts the same commands, with flags Flower accepts."""
    fed = local_federation.LocalFederation(tmp_path, 2, tls_dir=None)
    for argv in (fed.superlink_argv(), fed.serverapp_superexec_argv(), fed.supernode_argv(2),
                 fed.clientapp_superexec_argv(2)):
        assert_command_accepted("deploy-local", Path(argv[0]).name, argv[1:])
    compose = load_compose(read("docker-compose.yml"))["services"]
    for service, argv in (("superlink", fed.superlink_argv()), ("supernode-2", fed.supernode_argv(2))):
        assert set(flag_values(compose[service]["command"])) == set(flag_values(argv[1:])), service
    assert "partition-id=1 num-partitions=2" in fed.supernode_argv(2)


def test_local_federation_with_auth_uses_the_auth_overlays_flags(tmp_path):
    """deploy-local.sh --tls --auth: the flags of docker-compose.auth.yml, accepted by Flower."""
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    certs.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (certs / name).write_text("x")
    auth = local_federation.NodeAuthFiles(keys, 2)
    keys.mkdir()
    for path in auth.required():
        path.write_text("x")
    fed = local_federation.LocalFederation(tmp_path / "w", 2, tls_dir=certs, auth_dir=keys)
    compose = load_compose(*VARIANTS["tls-auth"]())["services"]
    for service, argv in (("superlink", fed.superlink_argv()), ("superexec-serverapp", fed.serverapp_superexec_argv()),
                          ("supernode-2", fed.supernode_argv(2)),
                          ("superexec-clientapp-2", fed.clientapp_superexec_argv(2))):
        assert_command_accepted(f"deploy-local --auth/{service}", Path(argv[0]).name, argv[1:])
        assert set(flag_values(compose[service]["command"])) == set(flag_values(argv[1:])), service
    assert flag_values(fed.supernode_argv(2)[1:])["--auth-supernode-private-key"] == str(keys / "supernode-2.key")
    assert flag_values(fed.clientapp_superexec_argv(2)[1:])["--superexec-auth-secret-file"] == str(
        keys / "supernode-2.secret")


def test_run_config_values_are_written_as_toml():
    arg = local_federation.run_config_arg(
        {"strategy": "fedsoup", "num-server-rounds": 2, "lr": 0.5, "soup-shuffle": True,
         "checkpoint-dir": "/tmp/a b", "local-epochs": local_federation.TomlText("1")})
    assert arg == 'strategy="fedsoup" num-server-rounds=2 lr=0.5 soup-shuffle=true checkpoint-dir="/tmp/a b" local-epochs=1'
    ports = local_federation.free_ports(4)
    assert len(set(ports)) == 4


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_make_certs_gives_a_ca_signed_server_certificate_with_the_sans(tmp_path):
    out = tmp_path / "certs"
    made = subprocess.run([str(SCRIPTS / "make-certs.sh"), str(out), "superlink.example.org", "10.0.0.5"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    sans = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True).stdout
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "DNS:superlink", "DNS:superlink.example.org",
                "IP Address:10.0.0.5"):
        assert san in sans, sans
    assert stat.S_IMODE((out / "server.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    # A second call keeps the existing set (SuperNodes already trust that CA).
    before = (out / "ca.crt").read_bytes()
    again = subprocess.run([str(SCRIPTS / "make-certs.sh"), str(out)], capture_output=True, text=True)
    assert again.returncode == 0 and "keeping" in again.stderr
    assert (out / "ca.crt").read_bytes() == before
