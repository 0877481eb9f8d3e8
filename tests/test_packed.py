"""Packed tiles: the same tiles, metadata, split, data fingerprint and training bits as per-tile NPZ."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from axs_lib.cli import main
from axs_lib.errors import InputError
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.packed import pack_tiles
from axs_lib.split import make_split
from axs_lib.tiles import list_tiles, read_sidecar, read_tile, summarize, validate_tile


@pytest.fixture(scope="module")
def packed(demo_tiles, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "demo"
    assert pack_tiles(demo_tiles, out, shard_tiles=4) == {"tiles": 6, "shards": 2}
    return out


def test_packed_tiles_read_back_identical_with_their_metadata(demo_tiles, packed):
    plain, refs = list_tiles(demo_tiles), list_tiles(packed)
    assert [r.name for r in refs] == [p.name for p in plain]
    for path, ref in zip(plain, refs):
        a, b = read_tile(path), read_tile(ref)
        assert a.sar.tobytes() == b.sar.tobytes() and a.optical.tobytes() == b.optical.tobytes()
        assert a.meta == b.meta == read_sidecar(ref)
        assert validate_tile(ref) == validate_tile(path)
    assert list_tiles(packed, 2) == refs[:2]
    assert summarize(packed)["by_split"] == summarize(demo_tiles)["by_split"]


def test_packed_split_and_fingerprint_equal_the_unpacked(demo_tiles, packed, tmp_path):
    plain, refs = list_tiles(demo_tiles), list_tiles(packed)
    a, b = make_split(plain, seed=3), make_split(refs, seed=3)
    assert a.manifest() == b.manifest()
    fp_a = data_fingerprint(plain, a.manifest(), cache_dir=tmp_path / "c")
    assert fp_a == data_fingerprint(refs, b.manifest(), cache_dir=tmp_path / "c")
    assert fp_a == data_fingerprint(refs, b.manifest(), cache_dir=tmp_path / "c", verify=True)


def test_edited_shard_changes_the_fingerprint(demo_tiles, tmp_path):
    out = tmp_path / "p"
    pack_tiles(demo_tiles, out)
    refs = list_tiles(out)
    before = data_fingerprint(refs, {}, cache_dir=tmp_path / "c")
    shard = out / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 1  # one bit of the first tile's s1_vv
    shard.write_bytes(bytes(data))
    after = data_fingerprint(refs, {}, cache_dir=tmp_path / "c", verify=True)
    assert after["tiles_sha256"] != before["tiles_sha256"]


def test_pack_refuses_a_non_empty_output(demo_tiles, packed):
    with pytest.raises(InputError, match="not an empty directory"):
        pack_tiles(demo_tiles, packed)


def test_truncated_shard_is_named(demo_tiles, tmp_path):
    out = tmp_path / "p"
    pack_tiles(demo_tiles, out)
    shard = out / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(InputError, match="shard|truncated"):
        for ref in list_tiles(out):
            read_tile(ref)


def shas(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "checkpoints").glob("*.pt"))}


def test_training_on_packed_tiles_is_byte_identical_to_npz(demo_tiles, packed, tmp_path):
    def train(data, out):
        argv = ["train", "stage1", "--data-dir", str(data), "--output-dir", str(out), "--seed", "42", "--steps", "4",
                "--batch-size", "2", "--width", "4", "--checkpoint-every", "2", "--val-every", "2", "--no-plots", "--quiet"]
        assert main(argv) == 0
        return shas(out)

    npz, pk = train(demo_tiles, tmp_path / "npz"), train(packed, tmp_path / "packed")
    assert npz and npz == pk
    assert json.loads((tmp_path / "npz" / "split.json").read_text()) == json.loads((tmp_path / "packed" / "split.json").read_text())


def test_cli_packs(demo_tiles, tmp_path, capsys):
    assert main(["tiles", "pack", str(demo_tiles), str(tmp_path / "p"), "--shard-tiles", "5"]) == 0
    assert "6 tiles packed into 2 shard(s)" in capsys.readouterr().out
    loaded = np.load(tmp_path / "p" / "shard-00000.npy", mmap_mode="r")
    assert loaded.dtype == np.uint8 and loaded.ndim == 1


def test_bench_loader_smallest_gives_positive_figures(monkeypatch, capsys):
    from axs_lib import tiles as tiles_module
    from benchmarks import bench_loader

    monkeypatch.setattr(bench_loader, "WORKERS", (0,))
    monkeypatch.setattr(bench_loader, "TILE_SIZE", 16)
    monkeypatch.setattr(bench_loader, "BATCH_SIZE", 4)
    monkeypatch.setattr(tiles_module, "RACY_SECONDS", 0.0)
    results = bench_loader.main(["--startup", "20", "--loader-tiles", "16"])
    assert results["startup_20_second_vs_first"] > 0 and results["loader_packed_0_workers_tiles_per_s"] > 0
    assert "second/first" in capsys.readouterr().out


def test_shard_index_larger_than_the_sidecar_limit_reads(synth_tiles, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for path in list_tiles(synth_tiles)[:3]:
        (src / path.name).write_bytes(path.read_bytes())
        (src / path.with_suffix(".json").name).write_text(json.dumps({"note": "x" * 600_000}))
    pack_tiles(src, tmp_path / "p")
    assert (tmp_path / "p" / "shard-00000.json").stat().st_size > 1 << 20
    assert [len(read_tile(ref).meta["note"]) for ref in list_tiles(tmp_path / "p")] == [600_000] * 3
