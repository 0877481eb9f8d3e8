"""Data fingerprint: what it covers (tile content and checked metadata, not file bytes), that the
cache is used, is not fooled by a rewrite that keeps size and mtime, and that verify re-hashes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from axs_lib import tiles as tiles_module
from axs_lib.errors import InputError
from axs_lib.fingerprint import data as fp
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.ingest import encode_tile
from axs_lib.tiles import S1_KEYS, S2_KEYS, list_tiles, read_sidecar

MANIFEST = {"source": "random", "seed": 42, "val_fraction": 0.1, "train": ["a"], "val": ["b"], "excluded": []}


@pytest.fixture(autouse=True)
def cache_at_once(monkeypatch):
    """Cache files changed just now (the tests' files are all new; ctime cannot be set back)."""
    monkeypatch.setattr(tiles_module, "RACY_SECONDS", -1.0)


@pytest.fixture()
def tiles(synth_tiles, tmp_path):
    target = tmp_path / "tiles"
    shutil.copytree(synth_tiles, target)
    return target


@pytest.fixture()
def hashed(monkeypatch):
    """Record every tile whose content is hashed."""
    seen = []
    original = fp.tile_digests

    def counting(ref):
        seen.append(os.path.basename(ref))
        return original(ref)

    monkeypatch.setattr(fp, "tile_digests", counting)
    return seen


def test_definition_matches_an_independent_computation(tiles, tmp_path):
    paths = list_tiles(tiles)
    result = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    h = hashlib.sha256()
    for path in paths:
        content = hashlib.sha256()
        with np.load(path) as npz:
            for key in (*S1_KEYS, *S2_KEYS):
                arr = npz[key]
                content.update(f"{key}\0{arr.dtype.str}\0{arr.shape[0]}x{arr.shape[1]}\0".encode() + arr.tobytes())
        meta = json.loads(path.with_suffix(".json").read_text())
        side = hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()
        h.update(f"{path.name}\0{content.hexdigest()}\0{side}\n".encode())
    split = hashlib.sha256(json.dumps(MANIFEST, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert result["tiles_sha256"] == h.hexdigest()
    assert result["split_sha256"] == split
    assert result["sha256"] == hashlib.sha256(f"tiles:{h.hexdigest()}\nsplit:{split}\n".encode()).hexdigest()
    assert result["num_tiles"] == 12 and result["scheme"] == fp.SCHEME


def test_it_follows_content_not_container_bytes(tiles, tmp_path):
    cache = tmp_path / "cache"
    paths = list_tiles(tiles)
    base = data_fingerprint(paths, MANIFEST, cache_dir=cache)
    with np.load(paths[0]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    buf = tmp_path / "c.npz"
    np.savez_compressed(buf, **arrays)  # other bytes, same arrays
    paths[0].write_bytes(buf.read_bytes())
    side = paths[0].with_suffix(".json")
    side.write_text(json.dumps(json.loads(side.read_text())))  # other bytes, same fields
    assert data_fingerprint(paths, MANIFEST, cache_dir=cache) == base


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

    with np.load(paths[3]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["s2_b8"][5, 5] ^= 1  # one bit of one pixel
    paths[3].write_bytes(encode_tile(arrays))
    assert data_fingerprint(paths, MANIFEST, cache_dir=cache)["tiles_sha256"] != base["tiles_sha256"]
    before_side = data_fingerprint(list_tiles(moved), MANIFEST, cache_dir=cache)
    side = moved / paths[5].with_suffix(".json").name
    side.write_text(side.read_text().replace("synthetic tiles", "Synthetic tiles"))
    assert data_fingerprint(list_tiles(moved), MANIFEST, cache_dir=cache)["tiles_sha256"] != before_side["tiles_sha256"]
    (moved / paths[0].with_suffix(".json").name).unlink()
    after_unlink = data_fingerprint(list_tiles(moved), MANIFEST, cache_dir=cache)
    assert after_unlink["tiles_sha256"] != before_side["tiles_sha256"]
    os.rename(moved / "synth_00011.npz", moved / "synth_00099.npz")
    os.rename(moved / "synth_00011.json", moved / "synth_00099.json")
    assert data_fingerprint(list_tiles(moved), MANIFEST, cache_dir=cache)["tiles_sha256"] != after_unlink["tiles_sha256"]


def test_second_run_hashes_nothing_and_a_changed_file_is_hashed_again(tiles, tmp_path, hashed):
    paths = list_tiles(tiles)
    first = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert len(hashed) == 12
    hashed.clear()
    assert data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache") == first
    assert hashed == []
    os.chmod(paths[2], 0o644)  # changes ctime only
    data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert hashed == [paths[2].name]


def test_rewrite_that_keeps_size_and_mtime_is_not_missed(tiles, tmp_path):
    # What ``cp -p`` of a same-size file does: new bytes, old size and mtime. ctime gives it away.
    paths = list_tiles(tiles)
    before = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    st = paths[4].stat()
    with np.load(paths[4]) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["s1_vv"] = arrays["s1_vv"] + np.float32(0.5)
    data = encode_tile(arrays)
    assert len(data) == st.st_size
    paths[4].write_bytes(data)
    os.utime(paths[4], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert paths[4].stat().st_mtime_ns == st.st_mtime_ns
    assert data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")["tiles_sha256"] != before["tiles_sha256"]


def test_verify_hashes_every_tile_again(tiles, tmp_path, hashed):
    paths = list_tiles(tiles)
    first = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    hashed.clear()
    assert data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache", verify=True) == first
    assert len(hashed) == 12


def test_recently_modified_files_are_not_cached(tiles, tmp_path, hashed, monkeypatch):
    monkeypatch.setattr(tiles_module, "RACY_SECONDS", 3600.0)
    paths = list_tiles(tiles)
    data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    hashed.clear()
    data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert len(hashed) == 12


def test_corrupt_or_unwritable_cache_is_ignored(tiles, tmp_path, hashed):
    paths = list_tiles(tiles)
    cache = tmp_path / "cache"
    expected = data_fingerprint(paths, MANIFEST, cache_dir=cache)
    for cache_file in cache.iterdir():
        cache_file.write_text('{"version": 2, "files": [trunc')
    hashed.clear()
    assert data_fingerprint(paths, MANIFEST, cache_dir=cache) == expected
    assert len(hashed) == 12
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    assert data_fingerprint(paths, MANIFEST, cache_dir=blocker / "cache") == expected


def test_default_cache_dir_follows_xdg(tiles, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    data_fingerprint(list_tiles(tiles), MANIFEST)
    assert len(list((tmp_path / "xdg" / "axs").glob("digests-*.json"))) == 1


def test_missing_tile_is_an_input_error(tiles, tmp_path):
    paths = list_tiles(tiles)
    paths[4].unlink()
    with pytest.raises(InputError) as err:
        data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "cache")
    assert err.value.path == str(paths[4])


def test_validation_alias_hashes_like_val(tiles, tmp_path):
    paths = list_tiles(tiles)[:2]
    side = paths[0].with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "split": "val"}))
    a = data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "c1")
    side.write_text(json.dumps({**meta, "split": "validation"}))
    assert read_sidecar(paths[0])["split"] == "val"
    assert data_fingerprint(paths, MANIFEST, cache_dir=tmp_path / "c2") == a
