"""Property tests on the structured inputs of the data side: reBEN metadata rows, packed-tile
indexes and shard bytes. Whatever they hold, the readers return good data or raise one of our
errors (one line naming the file), never another exception, never a file outside the output
directory, never bytes that differ from what was packed. Fixed seed, bounded examples."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axs_lib.errors import AxsError, InputError
from axs_lib.ingest import REBEN_MAX_LABELS, REBEN_MAX_TEXT_BYTES, convert_reben
from axs_lib.packed import _HEADER_BYTES, pack_tiles
from axs_lib.tiles import list_tiles, load_arrays, name_problem, read_tile

FUZZ = settings(derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_PLAIN = st.from_regex(r"\AS2A_MSIL2A_20170613T101031_[0-9]{1,2}_[0-9]{1,2}\Z")
_HOSTILE = st.sampled_from(["..", ".", "", "../x_1_2", "/tmp/x_1_2", "a/b_1_2", "a\\b", "tab\there", "x" * 300, "é" * 120])
_NAMES = st.one_of(_PLAIN, _PLAIN, _HOSTILE, st.text(max_size=30), st.none())
_LABELS = st.one_of(st.none(), st.lists(st.one_of(st.sampled_from(["Arable land", "Urban fabric"]), st.text(max_size=8),
                                                  st.just("L" * 300)), max_size=3),
                    st.integers(REBEN_MAX_LABELS - 1, REBEN_MAX_LABELS + 2).map(lambda n: ["Arable land"] * n))
_ROWS = st.lists(st.fixed_dictionaries({
    "patch_id": _NAMES, "s1_name": _NAMES, "labels": _LABELS,
    "split": st.one_of(st.none(), st.sampled_from(["train", "validation", "test", "bogus"])),
    "country": st.one_of(st.none(), st.text(max_size=10)),
    "contains_seasonal_snow": st.one_of(st.none(), st.booleans()), "contains_cloud_or_shadow": st.one_of(st.none(), st.booleans()),
}), min_size=1, max_size=6)


def _schema():
    text = pa.string()
    return pa.schema([("patch_id", text), ("s1_name", text), ("labels", pa.list_(text)), ("split", text), ("country", text),
                      ("contains_seasonal_snow", pa.bool_()), ("contains_cloud_or_shadow", pa.bool_())])


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _row_problem(row: dict) -> bool:
    texts = [row[c] for c in ("patch_id", "s1_name", "split", "country") if isinstance(row[c], str)] + list(row["labels"] or [])
    return (name_problem(row["patch_id"]) is not None or name_problem(row["s1_name"]) is not None
            or len(row["labels"] or []) > REBEN_MAX_LABELS or any(len(t.encode()) > REBEN_MAX_TEXT_BYTES for t in texts))


@FUZZ
@given(rows=_ROWS, dictionary=st.booleans(), group_rows=st.integers(1, 4))
def test_any_metadata_rows_convert_or_give_one_line_and_write_only_into_the_output(rows, dictionary, group_rows):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "S1").mkdir()
        (tmp / "S2").mkdir()
        metadata = tmp / "metadata.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=_schema()), metadata, use_dictionary=dictionary, row_group_size=group_rows)
        before = _tree(tmp)
        out = tmp / "deep" / "out"
        try:
            report = convert_reben(tmp / "S1", tmp / "S2", out, metadata, keep_snow_cloud=True)
        except InputError as exc:
            assert "\n" not in str(exc) and exc.path == str(metadata)
            assert _tree(tmp) == before  # refused before anything was created
            match = re.match(r"row (\d+): ", exc.problem)
            if match:  # a value: the row it names has a problem (rows count across row groups)
                assert _row_problem(rows[int(match.group(1))]), exc.problem
            else:  # a size the footer declares
                assert exc.problem.startswith(("row group ", "declares ")) and any(_row_problem(row) for row in rows), exc.problem
            return
        # accepted: every name was plain and every value within bounds
        assert not any(_row_problem(row) for row in rows)
        assert len(report.skipped) == len(rows)  # no band files: every pair is skipped, none written
        assert set(_tree(tmp)) - set(before) <= {"deep", "deep/out"}


@pytest.fixture(scope="module")
def small_pack(synth_tiles, tmp_path_factory):
    src = tmp_path_factory.mktemp("fuzzsrc")
    for path in list_tiles(synth_tiles)[:3]:
        shutil.copy(path, src / path.name)
        shutil.copy(path.with_suffix(".json"), src / path.with_suffix(".json").name)
    out = tmp_path_factory.mktemp("fuzzpack") / "p"
    pack_tiles(src, out, shard_tiles=2)
    return out, {p.stem: read_tile(p) for p in list_tiles(src)}


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
_FIELDS = st.sampled_from(["name", "offset", "shape", "dtypes", "xxh3", "meta"])


def _edit(doc, path, value):
    """Set doc[path...] = value, for a path of keys and list indices that exists."""
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(["index", "pack"]), st.integers(0, 2), _FIELDS, _JSONISH), min_size=1, max_size=3))
def test_any_edit_of_a_pack_index_reads_the_packed_tiles_or_gives_one_line(small_pack, edits):
    pack, originals = small_pack
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p"
        shutil.copytree(pack, out)
        index_path = out / "shard-00000.json"
        index, doc = json.loads(index_path.read_text()), json.loads((out / "pack.json").read_text())
        for where, row, field, value in edits:
            if where == "index":
                _edit(index, ["tiles", row % len(index["tiles"]), field], value)
            else:
                tiles = doc["shards"][0]["tiles"]
                _edit(doc, ["shards", 0, "tiles", row % len(tiles)], value if field == "name" else tiles[row % len(tiles)])
        index_path.write_text(json.dumps(index))
        (out / "pack.json").write_text(json.dumps(doc))
        try:
            for ref in list_tiles(out):
                tile = read_tile(ref)
                assert Path(os.path.dirname(ref)).parent == out  # a ref never leaves the pack
                original = originals[ref.stem]
                # what reads is what was packed: an edited index cannot make other bytes pass
                assert tile.sar.tobytes() == original.sar.tobytes() and tile.optical.tobytes() == original.optical.tobytes()
        except AxsError as exc:
            assert "\n" not in str(exc)


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=4))
def test_any_flipped_bytes_in_a_shard_are_caught_or_leave_every_tile_as_packed(small_pack, flips):
    pack, originals = small_pack
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p"
        shutil.copytree(pack, out)
        shard = out / "shard-00000.npy"
        data = bytearray(shard.read_bytes())
        for at, xor in flips:
            data[_HEADER_BYTES + at % (len(data) - _HEADER_BYTES)] ^= xor  # the tiles' bytes and their padding
        shard.write_bytes(bytes(data))
        for ref in list_tiles(out):
            try:
                arrays = load_arrays(ref)
            except InputError as exc:
                assert "\n" not in str(exc) and exc.path == str(shard) and f"tile {ref.name}: checksum mismatch" in str(exc)
                continue
            original = originals[ref.stem]
            assert np.stack([arrays["s1_vv"], arrays["s1_vh"]]).tobytes() == original.sar.tobytes()
