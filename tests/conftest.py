"""Shared pytest fixtures live in tests/support/*; each module registers here (one line each)."""

pytest_plugins = [
    "tests.support.servers",
    "tests.support.models",
    "tests.support.plugin",
    "tests.support.ab_peers",
]
