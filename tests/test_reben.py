"""BigEarthNet v2 (reBEN) conversion on a small fixture in reBEN's layout, made from the real demo
tiles: nested product folders, one GeoTIFF per band, and a ``metadata.parquet``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import rasterio.io
import rasterio.windows
from affine import Affine

from axs_lib import ingest
from axs_lib.cli import main
from axs_lib.errors import InputError
from axs_lib.ingest import convert_reben, reben_folders
from axs_lib.tiles import list_tiles, read_tile

S1_BANDS = {"s1_vv": "VV", "s1_vh": "VH"}
S2_BANDS = {"s2_b2": "B02", "s2_b3": "B03", "s2_b4": "B04", "s2_b8": "B08"}
REPO = Path(__file__).resolve().parents[1]
SNOW, CLOUD, VALIDATION = 1, 4, 2  # which fixture rows carry a flag / the "validation" split


def _write_band(path, array, crs, bounds):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = array.shape
    left, bottom, right, top = bounds
    transform = Affine((right - left) / w, 0.0, left, 0.0, -(top - bottom) / h, top)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=1, dtype=array.dtype.name,
                       crs=crs, transform=transform) as ds:
        ds.write(array, 1)


@pytest.fixture(scope="module")
def reben(demo_tiles, tmp_path_factory):
    """(S1 root, S2 root, metadata.parquet, {patch_id: source arrays}) for the six demo pairs."""
    root = tmp_path_factory.mktemp("reben")
    s1_root, s2_root = root / "BigEarthNet-S1", root / "BigEarthNet-S2"
    rows, sources = [], {}
    for i, tile_path in enumerate(list_tiles(demo_tiles)):
        meta = json.loads(tile_path.with_suffix(".json").read_text())
        with np.load(tile_path) as npz:
            arrays = {k: npz[k] for k in (*S1_BANDS, *S2_BANDS)}
        date = tile_path.stem.split("_")[2]
        date = date[:9] + date[9:].zfill(6)  # v1 names drop leading zeros of the time; v2 names keep them
        patch_id = f"S2A_MSIL2A_{date}_N9999_R022_T33UUP_{i}_{i + 10}"
        s1_name = f"S1A_IW_GRDH_1SDV_{date[:8]}T165043_33UUP_{i}_{i + 10}"
        s1_dir, s2_dir = reben_folders(s1_root, s2_root, patch_id, s1_name)
        for key, band in S1_BANDS.items():
            _write_band(s1_dir / f"{s1_name}_{band}.tif", arrays[key], meta["crs"], meta["bounds"])
        for key, band in S2_BANDS.items():
            _write_band(s2_dir / f"{patch_id}_{band}.tif", arrays[key], meta["crs"], meta["bounds"])
        sources[patch_id] = {**arrays, "crs": meta["crs"], "bounds": meta["bounds"], "date": date}
        rows.append({
            "patch_id": patch_id, "s1_name": s1_name, "labels": meta["labels"],
            "split": "validation" if i == VALIDATION else ("test" if i == 5 else "train"),
            "country": "Austria" if i % 2 else "Portugal",
            "contains_seasonal_snow": i == SNOW, "contains_cloud_or_shadow": i == CLOUD,
        })
    metadata = root / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist(rows), metadata)
    return s1_root, s2_root, metadata, sources, rows


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_reben_tiles_equal_their_geotiffs_and_carry_the_metadata(reben, tmp_path):
    s1_root, s2_root, metadata, sources, rows = reben
    report = convert_reben(s1_root, s2_root, tmp_path, metadata)
    assert (report.written, report.present, report.snow_cloud, report.skipped) == (4, 0, 2, [])
    kept = [r for i, r in enumerate(rows) if i not in (SNOW, CLOUD)]
    assert [p.stem for p in list_tiles(tmp_path)] == sorted(r["patch_id"] for r in kept)
    for row in kept:
        tile = read_tile(tmp_path / f"{row['patch_id']}.npz")
        src = sources[row["patch_id"]]
        np.testing.assert_array_equal(tile.sar, np.stack([src[k] for k in S1_BANDS]))
        np.testing.assert_array_equal(tile.optical, np.stack([src[k] for k in S2_BANDS]).astype(np.float32))
        meta = json.loads((tmp_path / f"{row['patch_id']}.json").read_text())
        assert meta["labels"] == row["labels"] and meta["country"] == row["country"]
        assert meta["split"] == {"validation": "val"}.get(row["split"], row["split"])
        assert meta["s1_patch"] == row["s1_name"] and meta["s2_patch"] == row["patch_id"]
        assert meta["s2_product"] == "_".join(row["patch_id"].split("_")[:-2])
        assert meta["s1_product"] == "_".join(row["s1_name"].split("_")[:-3])
        d = src["date"]
        assert meta["s2_acquisition"] == f"{d[:4]}-{d[4:6]}-{d[6:8]}T{d[9:11]}:{d[11:13]}:{d[13:]}"
        assert (meta["crs"], meta["bounds"]) == (src["crs"], src["bounds"])
        assert "quality_flags" not in meta


def test_keep_snow_cloud_keeps_flagged_patches_and_says_why(reben, tmp_path):
    s1_root, s2_root, metadata, _, rows = reben
    report = convert_reben(s1_root, s2_root, tmp_path, metadata, keep_snow_cloud=True)
    assert (report.written, report.snow_cloud) == (6, 0)
    snow = json.loads((tmp_path / f"{rows[SNOW]['patch_id']}.json").read_text())
    cloud = json.loads((tmp_path / f"{rows[CLOUD]['patch_id']}.json").read_text())
    assert snow["quality_flags"] == ["seasonal_snow"] and cloud["quality_flags"] == ["cloud_or_shadow"]


def test_interrupted_conversion_continues_and_workers_give_the_same_bytes(reben, tmp_path):
    s1_root, s2_root, metadata, _, _ = reben
    whole = tmp_path / "whole"
    convert_reben(s1_root, s2_root, whole, metadata)
    resumed = tmp_path / "resumed"
    convert_reben(s1_root, s2_root, resumed, metadata, jobs=2)
    first, second = sorted(resumed.glob("*.npz"))[:2]
    first.unlink()  # as if the run was killed before this tile...
    second.unlink()
    second.with_suffix(".json").unlink()  # ...and before this one's sidecar
    report = convert_reben(s1_root, s2_root, resumed, metadata, jobs=2)
    assert (report.written, report.present, report.snow_cloud) == (2, 2, 2)
    assert {p.name: sha(p) for p in whole.iterdir()} == {p.name: sha(p) for p in resumed.iterdir()}


def test_missing_band_is_skipped_and_named(reben, tmp_path):
    s1_root, s2_root, metadata, _, rows = reben
    broken = tmp_path / "S2"
    shutil.copytree(s2_root, broken)
    s2_dir = reben_folders(s1_root, broken, rows[0]["patch_id"], rows[0]["s1_name"])[1]
    (s2_dir / f"{rows[0]['patch_id']}_B08.tif").unlink()
    report = convert_reben(s1_root, broken, tmp_path / "out", metadata)
    assert [(p, "B08.tif: missing band file" in r) for p, r in report.skipped] == [(rows[0]["patch_id"], True)]
    assert report.written == 3


def test_metadata_without_reben_columns_is_refused_before_anything_is_written(reben, tmp_path):
    s1_root, s2_root, _, _, _ = reben
    bad = tmp_path / "metadata.parquet"
    pq.write_table(pa.table({"patch_id": ["x"]}), bad)
    with pytest.raises(InputError, match="missing column 's1_name'"):
        convert_reben(s1_root, s2_root, tmp_path / "out", bad)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable parquet file"):
        convert_reben(s1_root, s2_root, tmp_path / "out", tmp_path / "junk.parquet")
    assert not (tmp_path / "out").exists()


def test_cli_reports_the_snow_cloud_count(reben, tmp_path, capsys):
    s1_root, s2_root, metadata, _, _ = reben
    argv = ["tiles", "from-bigearthnet", str(s1_root), str(s2_root), str(tmp_path), "--metadata", str(metadata)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "4 tiles written" in out and "2 snow/cloud patches left out" in out
    assert main(argv) == 0
    assert "0 tiles written" in capsys.readouterr().out


# --------------------------------------------------------------------------- hostile metadata and rasters


def _with_row(rows, i, **changes):
    return [dict(r, **changes) if j == i else dict(r) for j, r in enumerate(rows)]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("column", ["patch_id", "s1_name"])
@pytest.mark.parametrize("name", ["../../escape_T33UUP_1_2", "/tmp/abs_T33UUP_1_2", "a/b_T33UUP_1_2", "..", ".", "", "a\\b", "x" * 300, None])
def test_a_metadata_name_that_is_not_a_plain_name_is_refused_before_anything_is_written(reben, tmp_path, column, name):
    s1_root, s2_root, _, _, rows = reben
    metadata = tmp_path / "meta" / "metadata.parquet"
    metadata.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(_with_row(rows, 3, **{column: name})), metadata)
    before = _files(tmp_path)
    with pytest.raises(InputError, match=rf"^{metadata}: row 3: {column} ") as exc:
        convert_reben(s1_root, s2_root, tmp_path / "work" / "out", metadata)
    assert "\n" not in str(exc.value)
    assert _files(tmp_path) == before  # not even the output directory


def test_a_metadata_name_pointing_at_a_real_folder_outside_the_roots_still_writes_nothing_there(reben, tmp_path, capsys):
    s1_root, s2_root, _, _, rows = reben
    # a patch_id whose folder exists, reached through "..": the old converter read it and wrote the
    # tile at <out>/../../<name>.npz
    real_s2 = reben_folders(s1_root, s2_root, rows[0]["patch_id"], rows[0]["s1_name"])[1]
    escape = f"../{real_s2.parent.name}/{rows[0]['patch_id']}"
    metadata = tmp_path / "metadata.parquet"
    pq.write_table(pa.Table.from_pylist(_with_row(rows, 0, patch_id=escape)), metadata)
    with pytest.raises(InputError, match="row 0: patch_id .* holds a path separator"):
        convert_reben(s1_root, s2_root, tmp_path / "a" / "out", metadata)
    assert main(["tiles", "from-bigearthnet", str(s1_root), str(s2_root), str(tmp_path / "a" / "out"), "--metadata", str(metadata)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"axs: error: {metadata}: row 0: patch_id ") and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.npz")) and not (tmp_path / "a").exists()


def _bomb(path, rows, length):
    """A few KB of parquet: one ``length``-byte string in a dictionary page, an RLE index repeating it."""
    value = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["S" * length]))
    table = pa.table({"patch_id": value, "s1_name": value, "labels": pa.array([["x"]] * rows), "split": pa.array(["train"] * rows),
                      "country": pa.array(["A"] * rows), "contains_seasonal_snow": pa.array([False] * rows),
                      "contains_cloud_or_shadow": pa.array([False] * rows)})
    pq.write_table(table, path, compression="zstd")


_RSS_CHILD = """
import resource, sys
import pyarrow.parquet, pyarrow.compute
from axs_lib.errors import InputError
from axs_lib.ingest import convert_reben
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
try:
    convert_reben(sys.argv[1], sys.argv[1], sys.argv[2], sys.argv[3])
except InputError as exc:
    print(exc)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def test_a_tiny_dictionary_encoded_metadata_file_is_refused_in_bounded_memory(reben, tmp_path):
    s1_root = reben[0]
    bomb = tmp_path / "metadata.parquet"
    _bomb(bomb, rows=20_000, length=100_000)  # 2 KB on disk, 2 GB of strings decoded
    assert bomb.stat().st_size < 4096
    child = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(s1_root), str(tmp_path / "out"), str(bomb)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    before, message, after = child.stdout.strip().splitlines()
    assert message == f"{bomb}: row 0: patch_id holds a string of 100000 bytes, more than the 256 allowed"
    assert int(after) - int(before) < 100, (before, after)  # the old reader decoded 2048 rows at a time: +400 MB


def test_declared_row_counts_and_label_counts_are_held_to_bounds(reben, tmp_path, monkeypatch):
    s1_root, s2_root, metadata, _, rows = reben
    monkeypatch.setattr(ingest, "REBEN_MAX_ROWS", 5)
    with pytest.raises(InputError, match="declares 6 rows, more than the 5 allowed"):
        convert_reben(s1_root, s2_root, tmp_path / "out", metadata)
    monkeypatch.setattr(ingest, "REBEN_MAX_ROWS", 10)
    monkeypatch.setattr(ingest, "REBEN_MAX_GROUP_BYTES", 100)
    with pytest.raises(InputError, match=r"row group 0: the reBEN columns declare \d+ uncompressed bytes, more than the 100 allowed"):
        convert_reben(s1_root, s2_root, tmp_path / "out", metadata)
    monkeypatch.undo()
    many = tmp_path / "many.parquet"
    pq.write_table(pa.Table.from_pylist(_with_row(rows, 2, labels=["Arable land"] * 65)), many)
    with pytest.raises(InputError, match="row 2: labels holds 65 values, more than the 64 allowed"):
        convert_reben(s1_root, s2_root, tmp_path / "out", many)
    long_label = tmp_path / "long.parquet"
    pq.write_table(pa.Table.from_pylist(_with_row(rows, 4, labels=["ok", "y" * 300])), long_label)
    with pytest.raises(InputError, match="row 4: labels holds a string of 300 bytes"):
        convert_reben(s1_root, s2_root, tmp_path / "out", long_label)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("column,value,expected", [("patch_id", 7, "strings"), ("labels", "Arable land", "lists of strings"),
                                                    ("contains_seasonal_snow", "yes", "booleans")])
def test_a_metadata_column_of_the_wrong_type_is_one_line(reben, tmp_path, column, value, expected):
    s1_root, s2_root, _, _, rows = reben
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([dict(r, **{column: value}) for r in rows]), bad)
    with pytest.raises(InputError, match=rf"column '{column}' has type .*; reBEN's metadata.parquet has {expected}"):
        convert_reben(s1_root, s2_root, tmp_path / "out", bad)


def _huge_sparse_geotiff(path, side):
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=1, dtype="uint16", tiled=True,
                       compress="deflate", sparse_ok=True, crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 5000000)) as ds:
        ds.write(np.ones((16, 16), np.uint16), 1, window=rasterio.windows.Window(0, 0, 16, 16))


def test_a_geotiff_declaring_30000_px_is_refused_before_its_pixels_are_read(reben, tmp_path, monkeypatch):
    s1_root, s2_root, metadata, _, rows = reben
    band = tmp_path / "huge.tif"
    _huge_sparse_geotiff(band, 30_000)
    assert band.stat().st_size < 256 << 10  # declares 1.8 GB of pixels

    def no_read(*args, **kwargs):
        raise AssertionError("pixels read before the declared size was checked")

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", no_read)
    with pytest.raises(InputError, match=r"huge.tif: GeoTIFF declares 30000x30000 px; tile sides must be 4 to 4096 px"):
        ingest._read_band(band)
    broken = tmp_path / "S2"
    shutil.copytree(s2_root, broken)
    s2_dir = reben_folders(s1_root, broken, rows[0]["patch_id"], rows[0]["s1_name"])[1]
    shutil.copy(band, s2_dir / f"{rows[0]['patch_id']}_B04.tif")
    monkeypatch.undo()
    report = convert_reben(s1_root, broken, tmp_path / "out", metadata)
    assert [(p, "B04.tif: GeoTIFF declares 30000x30000 px" in r) for p, r in report.skipped] == [(rows[0]["patch_id"], True)]


def test_a_small_geotiff_stored_in_one_huge_block_is_refused_before_its_pixels_are_read(tmp_path, monkeypatch):
    band = tmp_path / "block.tif"
    with rasterio.open(band, "w", driver="GTiff", width=120, height=120, count=1, dtype="uint16", tiled=True, blockxsize=8192,
                       blockysize=8192, compress="deflate", crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 5000000)) as ds:
        ds.write(np.ones((120, 120), np.uint16), 1)
    assert band.stat().st_size < 1 << 20  # GDAL would decode 128 MB to read it

    def no_read(*args, **kwargs):
        raise AssertionError("pixels read before the block size was checked")

    monkeypatch.setattr(rasterio.io.DatasetReader, "read", no_read)
    with pytest.raises(InputError, match=r"block.tif: GeoTIFF stores its pixels in 8192x8192 px blocks, more than a 4096 x 4096 px tile holds"):
        ingest._read_band(band)


def test_a_worker_killed_mid_conversion_fails_in_bounded_time_with_one_line(reben, tmp_path):
    """The out-of-memory killer, played by the fault hook: the worker writing one tile SIGKILLs
    itself. multiprocessing.Pool waited forever for its task; the command must exit 1."""
    s1_root, s2_root, metadata, _, rows = reben
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "axs_lib.cli", "tiles", "from-bigearthnet", str(s1_root), str(s2_root), str(out),
            "--metadata", str(metadata), "--jobs", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "AXS_FAULT": f"kill:{rows[0]['patch_id']}.npz"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("the conversion hung after its worker was killed")
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1].startswith(f"axs: error: {out}: a worker process converting tiles died")
    assert "Traceback" not in err
    del env["AXS_FAULT"]
    assert subprocess.run(argv, env=env, capture_output=True, timeout=90).returncode == 0  # a rerun completes it
    assert len(list(out.glob("*.npz"))) == 4
