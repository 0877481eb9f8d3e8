"""The tile contract: reading, one clear error per kind of bad tile, plausibility, listing, summary, CLI."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest

from axs_lib.cli import main
from axs_lib.errors import InputError
from axs_lib.ingest import encode_tile
from axs_lib.tiles import S1_KEYS, S2_KEYS, list_tiles, read_sidecar, read_tile, summarize, validate_tile


def good_arrays(size=8):
    rng = np.random.default_rng(0)
    arrays = {k: rng.uniform(-25, -5, (size, size)).astype(np.float32) for k in S1_KEYS}
    arrays |= {k: rng.integers(100, 5000, (size, size)).astype(np.uint16) for k in S2_KEYS}
    return arrays


def write(tmp_path, arrays=None, raw=None, sidecar=None, stem="t"):
    path = tmp_path / f"{stem}.npz"
    path.write_bytes(raw if raw is not None else encode_tile(arrays if arrays is not None else good_arrays()))
    if sidecar is not None:
        (tmp_path / f"{stem}.json").write_text(sidecar)
    return path


def with_(**changes):
    arrays = good_arrays()
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value
    return arrays


def nan_band():
    return np.full((8, 8), np.nan, np.float32)


def inf_band():
    band = good_arrays()["s1_vh"].copy()
    band[2, 3] = np.inf
    return band


# (case, tile kwargs, file that the error names, phrase in the problem)
BAD_TILES = [
    ("truncated", dict(raw=encode_tile(good_arrays())[:700]), "npz", "truncated"),
    ("not a zip", dict(raw=b"hello, not a tile"), "npz", "not an .npz"),
    ("empty file", dict(raw=b""), "npz", "empty file"),
    ("missing key", dict(arrays=with_(s2_b8=None)), "npz", "missing array 's2_b8'"),
    ("not 2-D", dict(arrays=with_(s1_vv=np.zeros((1, 8, 8), np.float32))), "npz", "s1_vv is 3-D"),
    ("shape mismatch", dict(arrays=with_(s2_b4=np.ones((4, 4), np.uint16))), "npz", "differ in shape"),
    ("SAR dtype", dict(arrays=with_(s1_vv=np.zeros((8, 8), np.float64))), "npz", "s1_vv has dtype float64"),
    ("optical dtype", dict(arrays=with_(s2_b2=np.zeros((8, 8), np.int16))), "npz", "s2_b2 has dtype int16"),
    ("all NaN", dict(arrays=with_(s1_vv=nan_band())), "npz", "s1_vv is all NaN"),
    ("inf", dict(arrays=with_(s1_vh=inf_band())), "npz", "s1_vh has 1 infinite"),
    ("bad JSON", dict(sidecar='{"split": "train",'), "json", "invalid JSON"),
    ("sidecar not an object", dict(sidecar="[1, 2]"), "json", "JSON object"),
    ("field type", dict(sidecar='{"labels": "Pastures"}'), "json", "'labels' must be a list of strings"),
    ("bounds type", dict(sidecar='{"bounds": [1, 2, 3]}'), "json", "'bounds' must be a list of 4 finite numbers"),
    ("bad split", dict(sidecar='{"split": "training"}'), "json", "'split' is \"training\""),
]


@pytest.mark.parametrize("case,kwargs,names,phrase", BAD_TILES, ids=[c[0] for c in BAD_TILES])
def test_each_kind_of_bad_tile_gives_one_clear_error(tmp_path, capsys, case, kwargs, names, phrase):
    path = write(tmp_path, **kwargs)
    with pytest.raises(InputError) as err:
        read_tile(path)
    assert err.value.path == str(path.with_suffix(f".{names}"))
    assert phrase in err.value.problem

    assert main(["tiles", "validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2, out  # one line for the bad tile, then the summary
    assert out[0].startswith(f"{path}: ") and phrase in out[0]
    assert out[1].endswith("0 good, 1 bad")


def test_pickled_object_arrays_are_refused_and_never_unpickled(tmp_path):
    def savez(arrays):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    pickled = np.array([{"a": 1}], dtype=object)
    path = write(tmp_path, raw=savez(with_(s1_vv=pickled)))
    with pytest.raises(InputError, match="pickled object arrays; refused"):
        read_tile(path)
    path = write(tmp_path, raw=savez(good_arrays() | {"extra": pickled}), stem="extra")
    read_tile(path)  # extra arrays are ignored, so their pickles are never loaded


def test_good_tile_reads_with_extras_and_no_sidecar(tmp_path):
    arrays = good_arrays() | {"s2_b11": np.zeros((8, 8), np.float32)}
    path = write(tmp_path, arrays=arrays)
    tile = read_tile(path)
    assert tile.sar.shape == (2, 8, 8) and tile.sar.dtype == np.float32
    assert tile.optical.shape == (4, 8, 8) and tile.optical.dtype == np.float32
    np.testing.assert_array_equal(tile.sar[1], arrays["s1_vh"])
    np.testing.assert_array_equal(tile.optical[3], arrays["s2_b8"].astype(np.float32))
    assert tile.meta == {}
    assert validate_tile(path) == []


def test_validation_split_is_accepted_as_val(tmp_path):
    path = write(tmp_path, sidecar='{"split": "validation", "custom": {"x": 1}}')
    assert read_tile(path).meta == {"split": "val", "custom": {"x": 1}}


@pytest.mark.parametrize(
    "changes,phrase",
    [
        (dict(s1_vv=np.full((8, 8), 0.05, np.float32)), "looks like linear power"),
        (dict(s1_vh=np.full((8, 8), -90.0, np.float32)), "outside the plausible"),
        ({k: np.full((8, 8), 0.3, np.float32) for k in S2_KEYS}, "looks like reflectance 0..1"),
        (dict(s2_b4=np.full((8, 8), 60000, np.uint16)), "outside the plausible"),
    ],
)
def test_implausible_values_are_reported_but_readable(tmp_path, changes, phrase):
    path = write(tmp_path, arrays=with_(**changes))
    read_tile(path)  # structurally fine
    problems = validate_tile(path)
    assert len(problems) == 1 and phrase in problems[0]


def test_dark_water_with_near_zero_nir_is_plausible(tmp_path):
    # Calm water: NIR reflectance of 1 (x 10000) everywhere is real, not reflectance in 0..1.
    path = write(tmp_path, arrays=with_(s2_b8=np.full((8, 8), 1, np.uint16)))
    assert validate_tile(path) == []


def test_low_valid_fraction_is_reported(tmp_path):
    band = good_arrays()["s1_vv"].copy()
    band[:, 1:] = np.nan  # 1 column of 8 valid: 12.5%...
    band[1:, 0] = np.nan  # ...now 1 pixel of 64
    problems = validate_tile(write(tmp_path, arrays=with_(s1_vv=band)))
    assert len(problems) == 1 and "of pixels are valid" in problems[0]


def test_demo_tiles_are_valid_and_real(demo_tiles):
    paths = list_tiles(demo_tiles)
    assert len(paths) == 6
    for path in paths:
        assert validate_tile(path) == []
        tile = read_tile(path)
        assert tile.sar.shape == (2, 120, 120) and tile.optical.shape == (4, 120, 120)
        assert tile.meta["tile_id"] == path.stem
        assert tile.sar.std() > 0.5 and tile.optical.std() > 50  # real texture, not constants


def test_list_tiles_sorted_and_limited(tmp_path):
    for stem in ["b", "a", "c10", "c2"]:
        write(tmp_path, stem=stem)
    (tmp_path / "notes.txt").write_text("ignored")
    assert [p.name for p in list_tiles(tmp_path)] == ["a.npz", "b.npz", "c10.npz", "c2.npz"]
    assert [p.name for p in list_tiles(tmp_path, max_tiles=2)] == ["a.npz", "b.npz"]
    assert len(list_tiles(tmp_path, max_tiles=100)) == 4


@pytest.mark.parametrize("setup,phrase", [("missing", "no such directory"), ("file", "not a directory"), ("empty", "no .npz tiles"), ("zero", "--max-tiles must be >= 1")])
def test_list_tiles_errors_name_the_directory(tmp_path, setup, phrase):
    target = tmp_path / "d"
    if setup == "file":
        target.write_text("x")
    elif setup in ("empty", "zero"):
        target.mkdir()
        if setup == "zero":
            write(target)
    with pytest.raises(InputError) as err:
        list_tiles(target, max_tiles=0 if setup == "zero" else None)
    assert err.value.path == str(target) and phrase in err.value.problem


def test_symlink_loops_and_case_collisions(tmp_path):
    write(tmp_path, stem="a")
    os.symlink(tmp_path / "loop.npz", tmp_path / "loop.npz")
    with pytest.raises(InputError, match="symlink loop") as err:
        list_tiles(tmp_path)
    assert err.value.path == str(tmp_path / "loop.npz")
    assert [p.name for p in list_tiles(tmp_path, max_tiles=1)] == ["a.npz"]
    os.unlink(tmp_path / "loop.npz")
    os.symlink(tmp_path / "loop", tmp_path / "loop")  # a directory-ish loop that is not a tile is ignored
    write(tmp_path, stem="A")
    with pytest.raises(InputError, match="differ only in letter case"):
        list_tiles(tmp_path)


def test_validate_reports_every_bad_tile_and_keeps_going(tmp_path, capsys):
    write(tmp_path, stem="good")
    write(tmp_path, stem="trunc", raw=b"PK\x03\x04broken")
    write(tmp_path, stem="nan", arrays=with_(s2_b2=nan_band()), sidecar="{oops")
    os.symlink(tmp_path / "gone", tmp_path / "dangling.npz")
    assert main(["tiles", "validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert out[0].startswith(f"{tmp_path / 'dangling.npz'}: broken symlink")
    assert out[1].startswith(f"{tmp_path / 'nan.npz'}: ") and "all NaN" in out[1] and "nan.json: invalid JSON" in out[1]
    assert out[2].startswith(f"{tmp_path / 'trunc.npz'}: ")
    assert out[3] == f"4 tiles checked in {tmp_path}: 1 good, 3 bad"


def test_validate_cli_exit_codes(demo_tiles, tmp_path, capsys):
    assert main(["tiles", "validate", str(demo_tiles)]) == 0
    assert main(["tiles", "validate", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["tiles", "validate"]) == 2
    assert main(["tiles", "bogus"]) == 2


def test_every_tiles_action_help_shows_an_example(capsys):
    for action in ["validate", "summary", "from-bigearthnet", "demo", "synth", "pack"]:
        assert main(["tiles", action, "--help"]) == 0
        out = capsys.readouterr().out
        assert f"example:\n  axs tiles {action} " in out or f"examples:\n  axs tiles {action} " in out


def test_summary_of_demo_tiles(demo_tiles, capsys):
    summary = summarize(demo_tiles)
    assert summary["num_tiles"] == 6 and summary["unreadable"] == 0 and summary["synthetic"] == 0
    assert summary["by_split"] == {"none": 1, "test": 1, "train": 4}
    assert summary["countries"] == {"Austria": 1, "Finland": 2, "Ireland": 2, "Portugal": 1}
    assert summary["date_range"] == ["2017-06-13", "2018-02-04"]
    assert summary["tile_sizes"] == {"120x120": 6}
    assert summary["labels"]["Non-irrigated arable land"] == 3
    assert main(["tiles", "summary", str(demo_tiles), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_split"] == summary["by_split"]
    assert main(["tiles", "summary", str(demo_tiles)]) == 0
    assert "by split: none 1, test 1, train 4" in capsys.readouterr().out


def test_summary_counts_unreadable_tiles(demo_tiles, tmp_path):
    for path in list_tiles(demo_tiles)[:2]:
        shutil.copy(path, tmp_path)
        shutil.copy(path.with_suffix(".json"), tmp_path)
    write(tmp_path, stem="zz", raw=b"junk")
    summary = summarize(tmp_path)
    assert summary["num_tiles"] == 3 and summary["unreadable"] == 1
    assert sum(summary["by_split"].values()) == 2


def test_read_sidecar_absent_is_empty(tmp_path):
    assert read_sidecar(write(tmp_path)) == {}


# --------------------------------------------------------------------------- tile stores


class _MemoryStore:
    """A tile format of the test's own: a directory holding ``memory.store``, tiles kept in a dict."""

    def __init__(self, tiles: dict[str, tuple[dict, dict | None]]):
        self.tiles = tiles

    def holds_dir(self, directory):
        return os.path.isfile(os.path.join(directory, "memory.store"))

    def holds_ref(self, ref):
        return os.path.basename(os.path.dirname(os.fspath(ref))) == "memory.store"

    def list_tiles(self, directory, max_tiles=None):
        from pathlib import Path

        return [Path(directory) / "memory.store" / f"{name}.npz" for name in sorted(self.tiles)][:max_tiles]

    def read_arrays(self, ref):
        return self.tiles[os.path.basename(ref).removesuffix(".npz")][0]

    def read_meta(self, ref):
        return self.tiles[os.path.basename(ref).removesuffix(".npz")][1]

    def ref_files(self, ref):
        marker = os.path.dirname(os.fspath(ref))
        return marker, marker


def test_a_tile_store_of_ones_own_is_listed_read_and_checked_like_npz_tiles(tmp_path, monkeypatch):
    from axs_lib import tile_store
    from axs_lib.tiles import ref_key

    monkeypatch.setattr(tile_store, "_stores", list(tile_store.stores()))
    arrays = good_arrays()
    store = _MemoryStore({"b": (arrays, {"split": "validation"}), "a": (arrays, None),
                          "bad": (with_(s1_vv=arrays["s1_vv"][:4]), {"split": "holdout"})})
    tile_store.register(store)
    (tmp_path / "memory.store").write_text("")
    refs = list_tiles(tmp_path)
    assert [r.stem for r in refs] == ["a", "b", "bad"] and tile_store.store_for_ref(refs[0]) is store
    tile = read_tile(refs[1])
    assert np.array_equal(tile.sar[0], arrays["s1_vv"], equal_nan=True) and tile.meta["split"] == "val"  # normalised by tiles
    assert read_sidecar(refs[0]) == {}
    with pytest.raises(InputError, match="split"):  # the sidecar checks apply to what a store returns
        read_sidecar(refs[2])
    with pytest.raises(InputError, match="shape"):  # and so does the tile contract
        read_tile(refs[2])
    assert ref_key(refs[0])[1] == "memory.store"  # a stat cache keys the tile on the store's files


def test_the_packed_store_is_a_tile_store_and_a_non_store_is_refused():
    from axs_lib import packed, tile_store

    assert isinstance(packed.STORE, tile_store.TileStore) and packed.STORE in tile_store.stores()
    with pytest.raises(TypeError, match="TileStore"):
        tile_store.register(object())
