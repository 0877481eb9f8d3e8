"""Packed tiles: the same tiles, metadata, split, data fingerprint and training bits as per-tile NPZ."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import pytest

from axs_lib.cli import main
from axs_lib.errors import InputError
from axs_lib.fingerprint.data import data_fingerprint
from axs_lib.packed import _HEADER_BYTES, DEFAULT_SHARD_TILES, _npy_header, pack_tiles
from axs_lib.split import make_split
from axs_lib.tiles import MAX_TILE_BYTES, list_tiles, read_sidecar, read_tile, summarize, validate_tile


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


def test_a_flipped_bit_in_a_shard_is_one_line_naming_the_shard_and_the_tile(demo_tiles, tmp_path, capsys):
    out = tmp_path / "p"
    pack_tiles(demo_tiles, out)
    refs = list_tiles(out)
    data_fingerprint(refs, {}, cache_dir=tmp_path / "c")
    shard = out / "shard-00000.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 1  # one bit of the first tile's s1_vv: still a plausible tile, so only a checksum sees it
    shard.write_bytes(bytes(data))
    message = f"{shard}: tile {refs[0].name}: checksum mismatch"
    with pytest.raises(InputError, match=re.escape(message)):
        read_tile(refs[0])
    with pytest.raises(InputError, match=re.escape(message)):
        data_fingerprint(refs, {}, cache_dir=tmp_path / "c", verify=True)
    assert read_tile(refs[1]).sar.size  # the other tiles of the shard still read
    assert main(["tiles", "validate", str(out)]) == 1
    assert capsys.readouterr().out.count("checksum mismatch") == 1


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


def test_a_shard_of_the_default_size_reads(demo_tiles, tmp_path):
    """A default shard holds DEFAULT_SHARD_TILES BigEarthNet tiles, about 1.4 GB: far past the
    per-tile size limit, which bounds each tile in it, not the mapped file. The shard is made
    sparse (its first six tiles real, a copy of the first at the last slot, holes between), so
    the test writes a few MB, not 1.4 GB."""
    out = tmp_path / "p"
    pack_tiles(demo_tiles, out)
    shard, index_path = out / "shard-00000.npy", out / "shard-00000.json"
    index = json.loads(index_path.read_text())
    first = index["tiles"][0]
    tile_bytes = index["tiles"][1]["offset"] - first["offset"]
    last_offset = (DEFAULT_SHARD_TILES - 1) * tile_bytes
    length = last_offset + tile_bytes
    assert length > MAX_TILE_BYTES  # what the readers used to hold the whole shard to
    with open(shard, "r+b") as f:
        f.seek(_HEADER_BYTES + first["offset"])
        copy = f.read(tile_bytes)
        f.seek(0)
        f.write(_npy_header(length))
        f.seek(_HEADER_BYTES + last_offset)
        f.write(copy)
        f.truncate(_HEADER_BYTES + length)
    index["tiles"].append({**first, "name": "zz_last", "offset": last_offset, "meta": None})
    index_path.write_text(json.dumps(index))
    doc = json.loads((out / "pack.json").read_text())
    doc["shards"][0]["tiles"].append("zz_last")
    (out / "pack.json").write_text(json.dumps(doc))
    refs = list_tiles(out)
    assert [validate_tile(ref) for ref in refs] == [[]] * 7
    assert read_tile(refs[-1]).sar.tobytes() == read_tile(refs[0]).sar.tobytes()


def _edit_json(path, edit):
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_a_version_1_pack_is_refused_with_the_command_that_rewrites_it(packed, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(packed, old)
    _edit_json(old / "pack.json", lambda doc: doc.update(version=1))
    with pytest.raises(InputError, match=r"pack.json: a version 1 pack, written before shards carried checksums; .*axs tiles pack"):
        list_tiles(old)


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", ".", "", "a\\b", "line\nbreak", "x" * 300, 7])
def test_a_tile_name_in_a_pack_index_that_is_not_a_plain_name_is_refused(packed, tmp_path, name):
    for where in ("pack.json", "shard-00000.json"):
        bad = tmp_path / where.replace(".json", "")
        shutil.copytree(packed, bad)
        if where == "pack.json":
            _edit_json(bad / where, lambda doc: doc["shards"][0]["tiles"].__setitem__(1, name))
            with pytest.raises(InputError, match=r"pack.json: shard shard-00000.npy, tile 1: name "):
                list_tiles(bad)
        else:
            _edit_json(bad / where, lambda doc: doc["tiles"][1].__setitem__("name", name))
            with pytest.raises(InputError, match=r"shard-00000.json: shard index entry 1: name ") as exc:
                read_tile(list_tiles(bad)[0])
            assert "\n" not in str(exc.value)


def test_a_tile_named_twice_in_a_pack_is_refused(packed, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    _edit_json(bad / "pack.json", lambda doc: doc["shards"][1]["tiles"].__setitem__(0, doc["shards"][0]["tiles"][0]))
    with pytest.raises(InputError, match=r"shard shard-00001.npy, tile 0: name .* appears twice in the pack"):
        list_tiles(bad)


@pytest.mark.parametrize("dtype", ["|O", ">f4", "<f8", "V8", "<i4"])
def test_a_shard_index_dtype_outside_the_contract_is_refused_before_any_bytes_are_read(packed, tmp_path, dtype):
    bad = tmp_path / "bad"
    shutil.copytree(packed, bad)
    _edit_json(bad / "shard-00000.json", lambda doc: doc["tiles"][0]["dtypes"].__setitem__(0, dtype))
    with pytest.raises(InputError, match=r"shard-00000.npy: tile .*\.npz: s1_vv has dtype .* in the shard index, expected <f4"):
        read_tile(list_tiles(bad)[0])
