"""BigEarthNet conversion, the embedded demo, synthetic tiles: real values, metadata, byte-identical
output, skipped patches, and no overwriting."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal

import numpy as np
import pytest
import rasterio

from axs_lib.cli import main
from axs_lib.errors import InputError, UsageError
from axs_lib.ingest import (DEMO_LISTS, convert_bigearthnet, extract_examples, official_metadata, write_demo_tiles,
                             write_synthetic_tiles)
from axs_lib.tiles import list_tiles, read_tile, validate_tile

DEMO_STEMS = [
    "S2A_MSIL2A_20170613T101031_87_48",
    "S2A_MSIL2A_20170617T113321_36_85",
    "S2A_MSIL2A_20170617T113321_4_55",
    "S2A_MSIL2A_20171221T112501_56_35",
    "S2B_MSIL2A_20170924T93020_69_24",
    "S2B_MSIL2A_20180204T94161_57_38",
]
S1_87_48 = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"


@pytest.fixture()
def patches(tmp_path):
    """A private, modifiable copy of the wheel's S1 and S2 example patch folders."""
    return extract_examples(tmp_path / "src")


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_demo_tiles_are_the_six_real_pairs(demo_tiles):
    assert [p.stem for p in list_tiles(demo_tiles)] == DEMO_STEMS


def test_demo_sidecar_keeps_the_metadata(demo_tiles):
    meta = json.loads((demo_tiles / "S2A_MSIL2A_20170613T101031_87_48.json").read_text())
    assert meta == {
        "tile_id": "S2A_MSIL2A_20170613T101031_87_48",
        "s1_patch": S1_87_48,
        "s2_patch": "S2A_MSIL2A_20170613T101031_87_48",
        "s1_product": "S1A_IW_GRDH_1SDV_20170613T165043_20170613T165108_017018_01C579_7EEC",
        "s2_product": "S2A_MSIL1C_20170613T101031_N0205_R022_T33UUP_20170613T101608.SAFE",
        "s1_acquisition": "2017-06-13T16:50:43",
        "s2_acquisition": "2017-06-13T10:10:31",
        "crs": "EPSG:32633",
        "bounds": [404400.0, 5341200.0, 405600.0, 5342400.0],
        "labels": ["Non-irrigated arable land", "Land principally occupied by agriculture, with significant areas of natural vegetation"],
        "split": "test",
        "country": "Austria",
        "season": "Summer",
        "source": "BigEarthNet v1.0 (Sentinel-1 + Sentinel-2 patches)",
    }
    unlisted = json.loads((demo_tiles / "S2B_MSIL2A_20180204T94161_57_38.json").read_text())
    assert "split" not in unlisted  # not in the official lists: removed for seasonal snow
    assert unlisted["quality_flags"] == ["seasonal_snow"]


def test_tile_values_equal_the_geotiffs(demo_tiles, patches):
    s1_root, s2_root = patches
    tile = read_tile(demo_tiles / "S2A_MSIL2A_20170613T101031_87_48.npz")
    s2_dir = s2_root / "S2A_MSIL2A_20170613T101031_87_48"
    for i, band in enumerate(["VV", "VH"]):
        with rasterio.open(s1_root / S1_87_48 / f"{S1_87_48}_{band}.tif") as ds:
            np.testing.assert_array_equal(tile.sar[i], ds.read(1))
    for i, band in enumerate(["B02", "B03", "B04", "B08"]):
        with rasterio.open(s2_dir / f"{s2_dir.name}_{band}.tif") as ds:
            np.testing.assert_array_equal(tile.optical[i], ds.read(1).astype(np.float32))
    with np.load(demo_tiles / "S2A_MSIL2A_20170613T101031_87_48.npz") as npz:
        assert npz["s1_vv"].dtype == np.float32 and npz["s2_b2"].dtype == np.uint16


def test_demo_bytes_are_pinned_and_regenerate_identically(demo_tiles, tmp_path):
    # Golden digest: a change in the converter or the npz encoding changes every data fingerprint.
    assert sha(demo_tiles / "S2A_MSIL2A_20170613T101031_87_48.npz") == "ec0d26604243c5d70e63bfba02335e3c4f27c7b38f8e3b08857ff48fde08a4a2"
    again = write_demo_tiles(tmp_path / "again")
    assert [sha(p) for p in again] == [sha(demo_tiles / p.name) for p in again]
    assert [sha(p.with_suffix(".json")) for p in again] == [sha(demo_tiles / f"{p.stem}.json") for p in again]


def test_repeating_demo_is_idempotent_and_different_files_are_not_overwritten(tmp_path, capsys):
    out = tmp_path / "tiles"
    assert main(["tiles", "demo", str(out)]) == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    assert main(["tiles", "demo", str(out)]) == 0
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()} == before
    victim = out / "S2A_MSIL2A_20170617T113321_4_55.json"
    victim.write_text('{"mine": true}\n')
    capsys.readouterr()
    assert main(["tiles", "demo", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"axs: error: {victim}: already exists with different content; refusing to overwrite (use an empty output directory)"]
    assert victim.read_text() == '{"mine": true}\n'


def test_unpaired_and_unreadable_patches_are_reported_and_skipped(patches, demo_tiles, tmp_path, capsys):
    s1_root, s2_root = patches
    shutil.rmtree(s2_root / "S2A_MSIL2A_20170617T113321_36_85")  # S1 partner left unpaired
    broken = s2_root / "S2B_MSIL2A_20170924T93020_69_24" / "S2B_MSIL2A_20170924T93020_69_24_B04.tif"
    broken.write_bytes(broken.read_bytes()[:500])  # truncated GeoTIFF
    shutil.rmtree(s1_root / S1_87_48)  # S2 partner left unpaired
    out = tmp_path / "out"
    report = convert_bigearthnet(s1_root, s2_root, out)
    assert [p.stem for p in report.written] == [
        "S2A_MSIL2A_20170617T113321_4_55",
        "S2A_MSIL2A_20171221T112501_56_35",
        "S2B_MSIL2A_20180204T94161_57_38",
    ]
    reasons = dict(report.skipped)
    assert set(reasons) == {"S1A_IW_GRDH_1SDV_20170617T064724_29UPU_36_85", "S1A_IW_GRDH_1SDV_20170925T043256_35VPK_69_24", "S2A_MSIL2A_20170613T101031_87_48"}
    assert "unpaired" in reasons["S1A_IW_GRDH_1SDV_20170617T064724_29UPU_36_85"]
    assert str(broken) in reasons["S1A_IW_GRDH_1SDV_20170925T043256_35VPK_69_24"] and "unreadable band" in reasons["S1A_IW_GRDH_1SDV_20170925T043256_35VPK_69_24"]
    assert "no S1 patch names" in reasons["S2A_MSIL2A_20170613T101031_87_48"]
    # nothing half-written: exactly the three tiles and their sidecars, no temp files
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}{ext}" for p in report.written for ext in (".npz", ".json"))
    assert main(["tiles", "from-bigearthnet", str(s1_root), str(s2_root), str(tmp_path / "cli")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("3 tiles written, 0 already present, 3 patches skipped")
    # Conversion reads the official lists (loaded above); the demo uses their six rows, pinned.
    for tile in report.written:
        assert (out / f"{tile.stem}.json").read_bytes() == (demo_tiles / f"{tile.stem}.json").read_bytes()
    splits, places, flags = official_metadata()
    assert DEMO_LISTS == ({n: splits[n] for n in DEMO_STEMS if n in splits}, {n: places[n] for n in DEMO_STEMS},
                          {n: flags[n] for n in DEMO_STEMS if n in flags})


def test_the_demo_sidecars_carry_the_pinned_list_entries(demo_tiles):
    for name in DEMO_STEMS:
        meta = json.loads((demo_tiles / f"{name}.json").read_text())
        assert meta.get("split") == DEMO_LISTS[0].get(name)
        assert (meta["country"], meta["season"]) == DEMO_LISTS[1][name]
        assert meta.get("quality_flags") == DEMO_LISTS[2].get(name)


def test_missing_roots_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        convert_bigearthnet(tmp_path / "s1", tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_synthetic_tiles_are_valid_marked_and_reproducible(tmp_path):
    first = write_synthetic_tiles(tmp_path / "a", count=3, size=24, seed=5)
    assert [p.name for p in first] == ["synth_00000.npz", "synth_00001.npz", "synth_00002.npz"]
    for path in first:
        assert validate_tile(path) == []
        tile = read_tile(path)
        assert tile.sar.shape == (2, 24, 24)
        assert tile.meta == {"tile_id": path.stem, "synthetic": True, "source": "axs synthetic tiles (seed 5)"}
    again = write_synthetic_tiles(tmp_path / "b", count=4, size=24, seed=5)  # a larger set extends a smaller one
    assert [sha(p) for p in again[:3]] == [sha(p) for p in first]
    other = write_synthetic_tiles(tmp_path / "c", count=1, size=24, seed=6)
    assert sha(other[0]) != sha(first[0])


def test_synth_cli_and_usage_errors(tmp_path, capsys):
    assert main(["tiles", "synth", str(tmp_path / "s"), "--count", "2", "--size", "16", "--seed", "3"]) == 0
    assert len(list_tiles(tmp_path / "s")) == 2
    assert main(["tiles", "synth", str(tmp_path / "s"), "--count", "2", "--size", "16", "--seed", "4"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["tiles", "synth", str(tmp_path / "t"), "--count", "0"]) == 2
    assert main(["tiles", "synth", str(tmp_path / "t"), "--count", "1", "--seed", "-1"]) == 2
    assert main(["tiles", "synth", str(tmp_path / "t")]) == 2  # --count is required
    with pytest.raises(UsageError, match="--size must be >= 2"):
        write_synthetic_tiles(tmp_path / "t", count=1, size=1, seed=0)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_a_v1_partner_name_that_is_not_a_plain_name_is_skipped_and_nothing_is_written_outside(patches, tmp_path, kind):
    s1_root, s2_root = patches
    s2_name = "S2A_MSIL2A_20170613T101031_87_48"
    outside = s2_root.parent / "outside"
    shutil.copytree(s2_root / s2_name, outside / s2_name)  # a real folder the name can reach
    target = f"../outside/{s2_name}" if kind == "relative" else str(outside / s2_name)
    meta_path = s1_root / S1_87_48 / f"{S1_87_48}_labels_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "corresponding_s2_patch": target}))
    out = tmp_path / "out" / "tiles"
    report = convert_bigearthnet(s1_root, s2_root, out, lists=DEMO_LISTS)
    reason = dict(report.skipped)[S1_87_48]
    assert reason.startswith(f"{meta_path}: corresponding_s2_patch '") and reason.endswith("holds a path separator; a plain name is required")
    assert sorted(p.name for p in tmp_path.rglob("*.npz")) == sorted(p.name for p in report.written)
    assert all(p.parent == out for p in tmp_path.rglob("*.npz"))


def test_a_v1_patch_metadata_file_that_is_a_fifo_is_skipped_without_hanging(patches, tmp_path):
    s1_root, s2_root = patches
    meta_path = s1_root / S1_87_48 / f"{S1_87_48}_labels_metadata.json"
    meta_path.unlink()
    os.mkfifo(meta_path)

    def alarm(*_):
        raise AssertionError("blocked reading a FIFO")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(20)
    try:
        report = convert_bigearthnet(s1_root, s2_root, tmp_path / "out", lists=DEMO_LISTS)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert dict(report.skipped)[S1_87_48] == f"{meta_path}: patch metadata is a FIFO (named pipe), not a regular file"
    assert len(report.written) == 5
