"""Fixtures shared by the tests that run the engine (registered from conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of tiny models for the whole run: built once, loaded through from_pretrained after."""
    from wanserve.engine.tiny import TINY_NAMES, tiny_model_dir

    cache = tmp_path_factory.mktemp("wanserve-cache")
    for name in TINY_NAMES:
        tiny_model_dir(name, cache)
    return cache
