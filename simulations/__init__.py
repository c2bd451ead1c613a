"""Flower simulations of FedSoup and the paper's experiments.

- ``simulations.server_app:app`` / ``simulations.client_app:app``: the Flower App
  (``flwr run .`` from the repository root; run-config keys in ``simulations.config``).
- ``python -m simulations.compare``: several strategies on identical shards (``make demo``).
- ``python -m simulations.paper_table1`` / ``paper_cauchy``: Section 4.1 and Appendix F.

See ``docs/simulations.md``.
"""
