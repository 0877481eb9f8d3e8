"""Data fingerprint: what it covers, that the cache is used and safe, and 10,000 cached tiles in < 1 s."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time

import pytest

from axs_lib.errors import InputError
from axs_lib.fingerprint import data as fp
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.tiles import list_tiles

MANIFEST = {"source": "random", "seed": 42, "val_fraction": 0.1, "train": ["a"], "val": ["b"], "excluded": []}
PAST = time.time() - 3600


def age(directory):
    """Give every file an mtime an hour ago, as for data that is not being written right now."""
    for path in directory.iterdir():
        os.utime(path, (PAST, PAST))


@pytest.fixture()
def tiles(synth_tiles, tmp_path):
    target = tmp_path / "tiles"
    shutil.copytree(synth_tiles, target)
    age(target)
    return target


@pytest.fixture()
def hashed(monkeypatch):
    """Record every file whose bytes are hashed."""
    seen = []
    original = fp.file_sha256

    def counting(path):
        seen.append(os.path.basename(path))
        return original(path)

    monkeypatch.setattr(fp, "file_sha256", counting)
    return seen


def test_definition_matches_an_independent_computation(tiles, tmp_path):
    paths = list_tiles(tiles)
    result = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    h = hashlib.sha256()
    for path in paths:
        sidecar = hashlib.sha256(path.with_suffix(".json").read_bytes()).hexdigest()
        h.update(f"{path.name}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\0{sidecar}\n".encode())
    split = hashlib.sha256(json.dumps(MANIFEST, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert result["tiles_sha256"] == h.hexdigest()
    assert result["split_sha256"] == split
    assert result["sha256"] == hashlib.sha256(f"tiles:{h.hexdigest()}\nsplit:{split}\n".encode()).hexdigest()
    assert result["num_tiles"] == 12


def test_it_changes_with_content_names_sidecars_and_split_but_not_location(tiles, tmp_path):
    cache = tmp_path / "cache"
    paths = list_tiles(tiles)
    base = data_fingerprint(paths, MANIFEST, cache_dir=cache)
    moved = tmp_path / "moved"
    shutil.copytree(tiles, moved)
    assert data_fingerprint(list_tiles(moved), MANIFEST, cache_dir=cache) == base
    assert data_fingerprint(paths, {**MANIFEST, "seed": 43}, cache_dir=cache)["tiles_sha256"] == base["tiles_sha256"]
    assert data_fingerprint(paths, {**MANIFEST, "seed": 43}, cache_dir=cache)["sha256"] != base["sha256"]
    assert data_fingerprint(paths[:-1], MANIFEST, cache_dir=cache)["tiles_sha256"] != base["tiles_sha256"]

    data = bytearray(paths[3].read_bytes())
    data[-30] ^= 1  # one bit, same size
    paths[3].write_bytes(bytes(data))
    os.utime(paths[3], (PAST + 5, PAST + 5))
    assert data_fingerprint(paths, MANIFEST, cache_dir=cache)["tiles_sha256"] != base["tiles_sha256"]
    side = paths[5].with_suffix(".json")
    side.write_text(side.read_text().replace("synthetic", "Synthetic"))
    before_side = data_fingerprint(list_tiles(moved), MANIFEST, cache_dir=cache)
    (moved / paths[0].with_suffix(".json").name).unlink()
    assert data_fingerprint(list_tiles(moved), MANIFEST, cache_dir=cache)["tiles_sha256"] != before_side["tiles_sha256"]
    os.rename(moved / "synth_00011.npz", moved / "synth_00099.npz")
    os.rename(moved / "synth_00011.json", moved / "synth_00099.json")
    assert data_fingerprint(list_tiles(moved), MANIFEST, cache_dir=cache)["tiles_sha256"] != before_side["tiles_sha256"]


def test_second_run_hashes_nothing_and_a_changed_file_is_hashed_again(tiles, tmp_path, hashed):
    paths = list_tiles(tiles)
    first = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert len(hashed) == 24  # 12 tiles + 12 sidecars
    hashed.clear()
    assert data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache") == first
    assert hashed == []
    os.utime(paths[2], (PAST + 1, PAST + 1))
    data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert hashed == [paths[2].name]


def test_recently_modified_files_are_not_cached(synth_tiles, tmp_path, hashed):
    fresh = tmp_path / "fresh"
    shutil.copytree(synth_tiles, fresh)
    for path in fresh.iterdir():
        os.utime(path)  # modified just now
    paths = list_tiles(fresh)
    data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    hashed.clear()
    data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert len(hashed) == 24


def test_corrupt_or_unwritable_cache_is_ignored(tiles, tmp_path, hashed):
    paths = list_tiles(tiles)
    cache = tmp_path / "cache"
    expected = data_fingerprint(paths, MANIFEST, cache_dir=cache)
    for cache_file in cache.iterdir():
        cache_file.write_text('{"version": 1, "files": [trunc')
    hashed.clear()
    assert data_fingerprint(paths, MANIFEST, cache_dir=cache) == expected
    assert len(hashed) == 24
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    assert data_fingerprint(paths, MANIFEST, cache_dir=blocker / "cache") == expected


def test_default_cache_dir_follows_xdg(tiles, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data_fingerprint(list_tiles(tiles), MANIFEST)
    assert len(list((tmp_path / "xdg" / "axs").glob("data-*.json"))) == 1


def test_missing_tile_is_an_input_error(tiles, tmp_path):
    paths = list_tiles(tiles)
    paths[4].unlink()
    with pytest.raises(InputError) as err:
        data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert err.value.path == str(paths[4])


def test_ten_thousand_cached_tiles_cost_under_a_second(tmp_path, hashed):
    directory = tmp_path / "many"
    directory.mkdir()
    for i in range(10_000):
        (directory / f"t{i:05d}.npz").write_bytes(i.to_bytes(4, "little") * 256)
    age(directory)
    paths = list_tiles(directory)
    first = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert len(hashed) == 10_000
    hashed.clear()
    start = time.perf_counter()
    second = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    elapsed = time.perf_counter() - start
    assert second == first and hashed == []
    assert elapsed < 1.0, f"cached fingerprint of 10,000 tiles took {elapsed:.2f} s"
