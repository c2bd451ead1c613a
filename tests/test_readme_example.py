"""The README's ServerApp example runs as printed: extracted from README.md, run against the
repository's ClientApp for two rounds (in process, through a Flower Grid)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import torch
from flwr.app import Context, RecordDict

from simulations.client_app import make_client_app
from strategies.inprocess import InProcessGrid, serverapp_identity

ROOT = Path(__file__).resolve().parents[1]
FIRST_LINE = "# server_app.py: FedSoup as the strategy of a Flower ServerApp"
CLIENTS = {"dataset": "digits", "num-partitions": 3, "local-epochs": 1, "partitioning": "iid"}


def readme_server_app() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    matching = [block for block in blocks if block.startswith(FIRST_LINE)]
    assert len(matching) == 1, "README.md must hold exactly one server_app.py example"
    return matching[0]


def test_readme_server_app_runs_two_rounds_and_saves_the_model(tmp_path, monkeypatch):
    (tmp_path / "server_app.py").write_text(readme_server_app())
    monkeypatch.chdir(tmp_path)  # the example writes checkpoints/ and final_model.pt where it runs
    app = runpy.run_path(str(tmp_path / "server_app.py"))["app"]

    client_app = make_client_app(CLIENTS)
    nodes = [11, 12, 13]
    contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": 3},
                              state=RecordDict(), run_config={}) for i, node in enumerate(nodes)}
    with serverapp_identity():
        grid = InProcessGrid(nodes, lambda message: client_app(message, contexts[message.metadata.dst_node_id]))
        app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                          run_config={"num-server-rounds": 2}))

    final = torch.load(tmp_path / "final_model.pt", weights_only=True)
    assert set(final) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert (tmp_path / "checkpoints" / "state.json").is_file()  # checkpoint_dir resumes a killed server
