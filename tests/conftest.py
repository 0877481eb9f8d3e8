"""Shared fixtures: tile sets made once per test session."""

from __future__ import annotations

import pytest

from axs_lib.ingest import write_demo_tiles, write_synthetic_tiles


@pytest.fixture(scope="session")
def demo_tiles(tmp_path_factory):
    """Directory holding the six real BigEarthNet demo tiles (from the bigearthnet-common wheel)."""
    out = tmp_path_factory.mktemp("demo_tiles")
    write_demo_tiles(out)
    return out


@pytest.fixture(scope="session")
def synth_tiles(tmp_path_factory):
    """Directory holding 12 synthetic 32 x 32 tiles (seed 0)."""
    out = tmp_path_factory.mktemp("synth_tiles")
    write_synthetic_tiles(out, count=12, size=32, seed=0)
    return out
