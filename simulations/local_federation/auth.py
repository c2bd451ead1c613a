"""SuperNode authentication material, as ``scripts/make-node-keys.sh`` lays it out.

One directory holds (the names the compose overlay docker-compose.auth.yml mounts):

- ``supernode-<i>.key`` / ``supernode-<i>.pub``: SuperNode i's EC key pair (NIST P-384,
  OpenSSH format, as ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read them). The private key never leaves the node; the
  public key is what the operator registers with the SuperLink.
- ``superlink.secret``: the SuperExec shared secret of the SuperLink and the
  ServerApp's SuperExec (``--superexec-auth-secret-file``, read as raw bytes).
- ``supernode-<i>.secret``: the same for SuperNode i and its ClientApp SuperExec.

SuperNode ``i`` is 1-based (as the compose services ``supernode-1..N``) and runs
``partition-id = i - 1``. Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

KEYS_SCRIPT = "scripts/make-node-keys.sh"
SUPERLINK_SECRET = "superlink.secret"


def supernode_name(index: int) -> str:
    """The name of SuperNode `index` (1-based): its compose service, its key files, its log."""
    return f"supernode-{index}"


@dataclass(frozen=True)
class NodeAuthFiles:
    """Where the authentication material of a federation of `num_supernodes` lives."""

    directory: Path
    num_supernodes: int

    @property
    def superlink_secret(self) -> Path:
        return self.directory / SUPERLINK_SECRET

    def private_key(self, index: int) -> Path:
        return self.directory / f"{supernode_name(index)}.key"

    def public_key(self, index: int) -> Path:
        return self.directory / f"{supernode_name(index)}.pub"

    def supernode_secret(self, index: int) -> Path:
        return self.directory / f"{supernode_name(index)}.secret"

    def required(self) -> list[Path]:
        files = [self.superlink_secret]
        for i in range(1, self.num_supernodes + 1):
            files += [self.private_key(i), self.public_key(i), self.supernode_secret(i)]
        return files

    def missing(self) -> list[Path]:
        return [path for path in self.required() if not path.is_file()]

    def check(self) -> None:
        """Raise FileNotFoundError naming every missing file (and the script that makes them)."""
        missing = self.missing()
        if missing:
            raise FileNotFoundError(
                f"authentication directory '{self.directory}' lacks "
                f"{', '.join(p.name for p in missing)}: make them with "
                f"{KEYS_SCRIPT} {self.directory} {self.num_supernodes}"
            )


class RegisteredNodes:
    """SuperNode name -> node id, as `flwr supernode register` answered.

    Flower lists registered nodes by id only (no name, no key), and refuses to
    register a key twice, so the ids are kept in a JSON file beside the SuperLink's
    database: a restarted SuperLink on that database knows the same nodes.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, int]:
        try:
            return {str(k): int(v) for k, v in json.loads(self.path.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, TypeError, AttributeError):
            return {}

    def save(self, name: str, node_id: int) -> None:
        ids = self.load() | {name: node_id}
        tmp = self.path.with_suffix(".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.path)
