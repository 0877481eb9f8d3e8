"""BigEarthNet v2 (reBEN) conversion on a small fixture in reBEN's layout, made from the real demo
tiles: nested product folders, one GeoTIFF per band, and a ``metadata.parquet``."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from affine import Affine

from axs_lib.cli import main
from axs_lib.errors import InputError
from axs_lib.ingest import convert_reben, reben_folders
from axs_lib.tiles import list_tiles, read_tile

S1_BANDS = {"s1_vv": "VV", "s1_vh": "VH"}
S2_BANDS = {"s2_b2": "B02", "s2_b3": "B03", "s2_b4": "B04", "s2_b8": "B08"}
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
