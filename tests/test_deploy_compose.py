"""docker-compose.yml (+ overlays), Dockerfile and scripts against the installed Flower.

No Docker engine is needed: every service's command is checked against the
installed Flower commands (the flags their ``--help`` lists, then the real
argument parser), every address/port/volume/file it references against what the
compose files declare, and the Dockerfile and build context against the repository.
"""

from __future__ import annotations

import copy
import importlib.metadata
import inspect
import os
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
    environment merges by name, volumes merge by container path, and `ports` lists are
    appended (docker-compose 1.29: an overlay cannot take a published port back)."""
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if key == "ports":
            merged[key] = [*merged.get(key, []), *value]
        elif key == "environment":
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


# The reverse proxy of docker-compose.public.yml: the only service that is not Flower's.
PROXY = "fleet-proxy"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def flower_services(project: dict) -> dict[str, dict]:
    """The project's Flower services (everything but the reverse proxy)."""
    return {n: s for n, s in project["services"].items() if n != PROXY}


def published(mapping) -> tuple[str, str, str]:
    """(host address, host port, container port) of one `ports` entry, short or long syntax;
    the address is '0.0.0.0' where the entry names none (Docker then binds every interface)."""
    if isinstance(mapping, dict):
        return str(mapping.get("host_ip", "0.0.0.0")), str(mapping["published"]), str(mapping["target"])
    text = str(mapping).split("/")[0]
    if text.startswith("["):  # [::1]:9093:9093
        address, _, rest = text[1:].partition("]:")
        host_port, _, container_port = rest.partition(":")
        return address, host_port, container_port
    parts = text.split(":")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    if len(parts) == 2:
        return "0.0.0.0", parts[0], parts[1]
    return "0.0.0.0", "", parts[0]  # a container port only: Docker picks a host port on every interface


VARIANTS = {
    "base": lambda: [read("docker-compose.yml")],
    "tls-public": lambda: [read("docker-compose.yml"), read("docker-compose.tls.yml"), read("docker-compose.public.yml")],
    "tls-auth-public": lambda: [read("docker-compose.yml"), read("docker-compose.tls.yml"),
                                read("docker-compose.auth.yml"), read("docker-compose.public.yml")],
    "tls-auth-scaled-5-public": lambda: [read("docker-compose.yml"), read("docker-compose.tls.yml"),
                                         read("docker-compose.auth.yml"), scale.overlay(5, tls=True, auth=True),
                                         read("docker-compose.public.yml")],
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
                       "tls-auth-scaled-2": 2, "tls-auth-scaled-5": 5, "tls-public": 3, "tls-auth-public": 3,
                       "tls-auth-scaled-5-public": 5}


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
    for name, service in flower_services(project).items():
        assert_command_accepted(f"{label}/{name}", flower_command(name, service), service["command"])


def test_each_service_either_uses_tls_or_says_insecure(variant):
    label, project = variant
    for name, service in flower_services(project).items():
        flags = flag_values(service["command"])
        tls = {"--ssl-certfile", "--root-certificates"} & set(flags)
        assert ("--insecure" in flags) != bool(tls), f"{label}/{name}: --insecure xor TLS flags"
    if label.startswith("tls"):
        for name in ("superlink", "superexec-serverapp", *[n for n in project["services"] if n.startswith("supernode-")]):
            assert "--insecure" not in project["services"][name]["command"], f"{label}/{name} stays insecure"


def test_every_address_points_at_a_declared_service_and_its_port(variant):
    check_addresses(*variant)


def check_addresses(label: str, project: dict) -> None:
    services = flower_services(project)
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
            container_port = published(mapping)[2]
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
        for flag, value in flag_values(service.get("command", [])).items():
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
    services = flower_services(project)
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
    for name, service in flower_services(project).items():
        assert service["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1", f"{label}/{name}"
        assert "--allow-runtime-dependency-installation" not in service["command"], f"{label}/{name}"
    assert "--disable-runtime-dependency-installation" in project["services"]["superlink"]["command"]


def test_app_code_runs_only_in_images_built_from_this_project(variant):
    label, project = variant
    for name, service in flower_services(project).items():
        if flower_command(name, service) == "flower-superexec":
            assert service["build"]["target"] == "superexec", f"{label}/{name}"


# --------------------------------------------------------------------------- closed by default
def check_exposure(label: str, project: dict) -> None:
    """What a file combination publishes on the host: nothing that runs `--insecure` beyond
    loopback, nothing but the reverse proxy beyond loopback (the SuperLink's port serves the
    Control API, which has no user authentication), and no host port twice."""
    seen: dict[str, str] = {}
    for name, service in project["services"].items():
        insecure = "--insecure" in service.get("command", [])
        for mapping in service.get("ports", []):
            address, host_port, _ = published(mapping)
            beyond_loopback = address not in LOOPBACK
            assert not (insecure and beyond_loopback), (
                f"{label}/{name}: runs --insecure and publishes {mapping} beyond loopback")
            assert not beyond_loopback or name == PROXY, f"{label}/{name}: publishes {mapping} beyond loopback"
            assert host_port not in seen, f"{label}/{name}: publishes host port {host_port} again ({seen[host_port]})"
            seen[host_port] = f"{name} {mapping}"


def test_no_insecure_service_publishes_a_port_beyond_loopback(variant):
    label, project = variant
    for name, service in project["services"].items():
        if "--insecure" in service.get("command", []):
            for mapping in service.get("ports", []):
                assert published(mapping)[0] in LOOPBACK, (
                    f"{label}/{name}: runs --insecure and publishes {mapping} beyond loopback")


def test_only_the_fleet_proxy_publishes_beyond_loopback_and_no_port_twice(variant):
    label, project = variant
    check_exposure(label, project)
    superlink_ports = project["services"]["superlink"].get("ports", [])
    assert superlink_ports and all(published(m)[0] in LOOPBACK for m in superlink_ports), (
        f"{label}: the SuperLink (Fleet + Control API) is not on loopback only: {superlink_ports}")
    assert (PROXY in project["services"]) == label.endswith("public"), label


@pytest.mark.parametrize(
    ("files", "message"),
    [
        # The overlays, in an order and a combination an operator might try: each publishes its own port.
        ([], None),
        (["docker-compose.tls.yml", "docker-compose.public.yml"], None),
        # What docker-compose 1.29 does with a port restated by an overlay: it is published twice.
        ([("superlink", "      - \"127.0.0.1:${SUPERLINK_PORT:-9093}:9093\"\n")], "again"),
        ([("superlink", "      - \"0.0.0.0:9093:9093\"\n")], "beyond loopback"),
    ],
)
def test_the_exposure_check_catches_ports_published_again_or_on_every_interface(files, message):
    texts = [read("docker-compose.yml")]
    for item in files:
        if isinstance(item, str):
            texts.append(read(item))
        else:
            service, port = item
            texts.append(f"services:\n  {service}:\n    ports:\n{port}")
    project = load_compose(*texts)
    if message is None:
        check_exposure("ok", project)
    else:
        with pytest.raises(AssertionError, match=message):
            check_exposure("broken", project)


def nginx_conf() -> str:
    return read("proxy/nginx.conf")


def proxied_path_pattern() -> re.Pattern:
    """The one `location ~ ^...$` of proxy/nginx.conf that forwards to the SuperLink."""
    text = nginx_conf()
    assert text.count("proxy_pass") == 1, "proxy/nginx.conf must forward from exactly one location"
    found = re.findall(r"location\s+~\s+(\^\S+\$)\s*\{", text)
    assert len(found) == 1, f"proxy/nginx.conf: one regex location expected, found {found}"
    return re.compile(found[0])


def superlink_routes() -> dict[str, set[str]]:
    """Every path the installed Flower's SuperLink serves (its routers, as flwr.superlink.main
    mounts them, in one FastAPI app), by API."""
    from fastapi import FastAPI
    from fastapi.routing import iter_route_contexts
    from flwr.supercore.routers import health
    from flwr.supercore.routers.runtime import create_runtime_router, responses_router
    from flwr.superlink.routers.control.router import router as control
    from flwr.superlink.routers.fleet.router import router as fleet
    from flwr.supernode.fleet_http_client import FleetHttpClient

    app = FastAPI()
    for router in (health.router, control, fleet, create_runtime_router("SuperLink"), responses_router):
        app.include_router(router)
    routes: dict[str, set[str]] = {"fleet": set(), "control": set(), "runtime": set(), "other": {"/"}}
    for context in iter_route_contexts(app.routes):
        api = next((a for a in ("fleet", "control", "runtime") if context.path.startswith(f"/v1/{a}/")), "other")
        routes[api].add(context.path)
    # What a SuperNode of the installed Flower calls: the Fleet routes, nothing else.
    called = set(re.findall(r'path="(/v1/[^"]+)"', Path(inspect.getsourcefile(FleetHttpClient)).read_text()))
    assert called and called <= routes["fleet"], sorted(called - routes["fleet"])
    return routes


def test_the_proxy_forwards_exactly_the_fleet_api_of_the_installed_flower():
    pattern = proxied_path_pattern()
    routes = superlink_routes()
    assert all(path.startswith("/v1/fleet/") for path in routes["fleet"]) and len(routes["fleet"]) >= 10
    assert {p for p in routes["fleet"] if not pattern.fullmatch(p)} == set(), "Fleet routes the proxy refuses"
    for api in ("control", "runtime", "other"):
        leaked = {p for p in routes[api] if pattern.fullmatch(p)}
        assert not leaked, f"the proxy forwards {api} paths: {sorted(leaked)}"
    for probe in ("/v1/fleet/", "/v1/fleet/../control/start-run", "/v1/fleet/register-node/x", "/v1/fleetx/get-run",
                  "/v1/control/register-node", "/v1/control/start-run"):
        assert not pattern.fullmatch(probe), probe
    text = nginx_conf()
    # Only POST, forwarded as the normalised path ($uri, which the regex pins to a Fleet route),
    # to the SuperLink over TLS, its certificate checked against the CA; everything else 404.
    assert re.search(r"limit_except\s+POST\s*\{\s*deny\s+all;\s*\}", text)
    assert re.search(r"proxy_pass\s+https://\$superlink\$uri;", text)
    assert re.search(r"proxy_ssl_verify\s+on;", text) and "proxy_ssl_trusted_certificate" in text
    assert re.search(r"location\s+/\s*\{\s*return\s+404;\s*\}", text)


def check_public(label: str, project: dict) -> None:
    """The reverse proxy of docker-compose.public.yml: TLS on its public port, and TLS to a
    SuperLink that serves TLS (the TLS overlay), at the SuperLink's own port."""
    services = project["services"]
    proxy = services[PROXY]
    superlink = flag_values(services["superlink"]["command"])
    assert "--ssl-certfile" in superlink, f"{label}: the proxy needs the TLS overlay (the SuperLink runs without TLS)"
    text = nginx_conf()
    listen = re.findall(r"^\s*listen\s+(\d+)\s+ssl;", text, flags=re.M)
    assert [published(m)[2] for m in proxy["ports"]] == listen, f"{label}: publishes {proxy['ports']}, listens {listen}"
    upstream = re.search(r"set\s+\$superlink\s+(\S+):(\d+);", text)
    assert upstream and upstream.group(1) == "superlink" and upstream.group(2) == superlink["--port"], (
        f"{label}: the proxy forwards to {upstream and upstream.group(0)}")
    mounted = {volume_target(v) for v in proxy["volumes"]}
    for path in re.findall(r"(?:ssl_certificate|ssl_certificate_key|proxy_ssl_trusted_certificate)\s+(\S+);", text):
        assert path in mounted, f"{label}: {path} is not mounted into {PROXY}"
    assert "superlink" in proxy.get("depends_on", [])
    assert proxy["build"]["context"] == "./proxy" and "command" not in proxy


def test_public_overlays_proxy_over_tls_to_a_tls_superlink(variant):
    label, project = variant
    if PROXY in project["services"]:
        check_public(label, project)


def test_the_public_check_refuses_the_proxy_without_the_tls_overlay():
    project = load_compose(read("docker-compose.yml"), read("docker-compose.public.yml"))
    with pytest.raises(AssertionError, match="needs the TLS overlay"):
        check_public("base-public", project)


def test_the_proxy_image_is_nginx_from_debian_packages_run_unprivileged():
    dockerfile = read("proxy/Dockerfile")
    assert re.search(r"^FROM debian:bookworm-slim$", dockerfile, flags=re.M)
    assert re.search(r"apt-get install .*nginx-light", dockerfile)
    assert re.search(r"^USER 49999", dockerfile, flags=re.M), "the proxy runs as uid 49999, like Flower's images"
    assert "COPY nginx.conf" in dockerfile


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
    services = flower_services(project)
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
        for name, service in flower_services(project).items():
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


def test_the_documented_connections_reach_the_published_ports():
    """`flwr` on the host talks to the SuperLink's loopback port; remote SuperNodes to the proxy's."""
    project = load_compose(*VARIANTS["tls-public"]())
    address, port, _ = published(project["services"]["superlink"]["ports"][0])
    public_port = published(project["services"][PROXY]["ports"][0])[1]
    docs = read("docs/deployment.md")
    assert f'address = "{address}:{port}"' in docs
    assert f"--superlink superlink.example.org:{public_port}" in docs
    assert f"--superlink superlink.example.org:{port}" not in docs, "a remote SuperNode cannot reach the loopback port"


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


SHIPPED_COMBINATIONS = (
    ["docker-compose.yml"],
    ["docker-compose.yml", "docker-compose.tls.yml"],
    ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.auth.yml"],
    ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.public.yml"],
    ["docker-compose.yml", "docker-compose.tls.yml", "docker-compose.auth.yml", "docker-compose.public.yml"],
)


@pytest.mark.skipif(COMPOSE is None, reason="neither `docker compose` nor `docker-compose` here")
@pytest.mark.parametrize("files", SHIPPED_COMBINATIONS, ids=lambda files: "+".join(f[15:-4] or "base" for f in files))
def test_docker_compose_config_accepts_the_files_and_publishes_nothing_open(files):
    """The project as Compose itself merges it (its own `ports` rules): the exposure check."""
    args = [x for f in files for x in ("-f", str(ROOT / f))]
    result = subprocess.run([*COMPOSE, *args, "config"], capture_output=True, text=True, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k not in ("SUPERLINK_PORT", "FLEET_PUBLIC_PORT")})
    assert result.returncode == 0, result.stderr
    project = yaml.safe_load(result.stdout)
    check_exposure("+".join(files), project)
    proxies = [n for n, s in project["services"].items() if any(published(m)[0] not in LOOPBACK for m in s.get("ports", []))]
    assert proxies == ([PROXY] if "docker-compose.public.yml" in files else [])


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
