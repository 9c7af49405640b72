"""Shared fixtures: every test writes its caches under a temporary folder, never the repo."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(autouse=True, scope="session")
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """Point LDM_CACHE_DIR (scan cache, synthetic data, latents) at one folder per session."""
    path = tmp_path_factory.mktemp("ldm-cache")
    old = os.environ.get("LDM_CACHE_DIR")
    os.environ["LDM_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LDM_CACHE_DIR", None)
    else:
        os.environ["LDM_CACHE_DIR"] = old


@pytest.fixture
def cache_dir(_session_cache_dir: Path) -> Path:
    """The session's cache folder (LDM_CACHE_DIR)."""
    return _session_cache_dir
