"""Deploying any method across real processes with Flower.

:mod:`.federation` (no Flower): what a client's site and the server compute,
through the engine's client and server halves; :mod:`.wire`: pytrees in
Flower's records; :mod:`.client_app` and :mod:`.server_app`: the Flower
apps, named in pyproject.toml's ``[tool.flwr.app.components]``;
:mod:`.local`: a SuperLink and SuperNodes started on 127.0.0.1 (tests,
benchmarks).
docs/deploy.md walks through a run on one machine.
"""
