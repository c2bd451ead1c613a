"""A Flower deployment on loopback, as plain processes: docker-compose.yml without Docker.

``scripts/deploy-local.sh`` is the command line (``python -m simulations.local_federation``);
:class:`LocalFederation` is the same thing as a Python API (the end-to-end tests use it
to kill and restart the server side, to register and unregister SuperNodes).

Modules, one concern each (standard library only; nothing here imports torch,
``strategies`` or ``fedsoup``):

- ``processes``: started commands and their process trees (free ports, logs, stopping
  a command with every descendant);
- ``auth``: the SuperNode key / SuperExec secret files ``scripts/make-node-keys.sh``
  writes, and the registered node ids kept beside the SuperLink's database;
- ``commands``: the argv, environment and trust flags of each compose service
  (:class:`ServiceCommands`, pure functions of the configuration);
- ``flwr_client``: runs, their status and SuperNode registration through the ``flwr``
  CLI (:class:`FlwrClient`);
- ``federation``: :class:`LocalFederation`, the processes' lifecycle (start/stop,
  health, waiting for runs), with the two above mixed in;
- ``__main__``: the ``deploy-local.sh`` options.
"""

from simulations.local_federation.auth import NodeAuthFiles, RegisteredNodes, supernode_name
from simulations.local_federation.commands import CONNECTION, FLOWER_ENV, FederationError, ServiceCommands
from simulations.local_federation.federation import LocalFederation, checkpoint_round
from simulations.local_federation.flwr_client import (
    FINISHED_OK,
    FlwrClient,
    RegistrationRefused,
    TomlText,
    run_config_arg,
    toml_value,
)
from simulations.local_federation.processes import Process, descendants, free_ports, pid_alive, signal_group

__all__ = [
    "CONNECTION", "FINISHED_OK", "FLOWER_ENV", "FederationError", "FlwrClient", "LocalFederation", "NodeAuthFiles",
    "Process", "RegisteredNodes", "RegistrationRefused", "ServiceCommands", "TomlText", "checkpoint_round", "descendants", "free_ports", "pid_alive", "run_config_arg",
    "signal_group", "supernode_name", "toml_value",
]
