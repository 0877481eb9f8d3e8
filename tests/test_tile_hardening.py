"""Hostile tiles: whatever a tile or sidecar holds, or whatever kind of file it is, reading it gives
a value or one `InputError` line naming it -- never a hang, an endless read, a huge allocation or
another exception."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import time
import zipfile
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axs_lib import tiles as tiles_module
from axs_lib.cli import main
from axs_lib.errors import InputError, UsageError
from axs_lib.ingest import encode_tile
from axs_lib.split import make_split
from axs_lib.tiles import (
    MAX_TILE_PX, MIN_TILE_PX, S1_KEYS, S2_KEYS, check_tiles, list_tiles, load_arrays, read_sidecar, read_tile, summarize,
    validate_tile,
)


def arrays_of(size=8, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {k: rng.uniform(-25, -5, (size, size)).astype(np.float32) for k in S1_KEYS}
    arrays |= {k: rng.integers(100, 5000, (size, size)).astype(np.uint16) for k in S2_KEYS}
    return arrays


GOOD = encode_tile(arrays_of())


@contextmanager
def no_hang(seconds=5):
    """Fail (instead of hanging the suite) if the block takes longer than ``seconds``."""
    def alarm(*_):
        raise AssertionError(f"blocked for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def tile(tmp_path, data=GOOD, stem="t"):
    path = tmp_path / f"{stem}.npz"
    path.write_bytes(data)
    return path


def test_fifo_sidecar_is_refused_without_hanging(tmp_path):
    path = tile(tmp_path)
    os.mkfifo(tmp_path / "t.json")
    with no_hang(), pytest.raises(InputError, match="FIFO"):
        read_sidecar(path)


def test_sidecar_linked_to_dev_zero_is_refused_without_reading(tmp_path):
    path = tile(tmp_path)
    os.symlink("/dev/zero", tmp_path / "t.json")
    with no_hang(), pytest.raises(InputError, match="character device"):
        read_sidecar(path)


def test_tile_that_is_a_fifo_or_device_is_refused_by_name(tmp_path):
    os.mkfifo(tmp_path / "a.npz")
    with no_hang(), pytest.raises(InputError) as err:
        load_arrays(tmp_path / "a.npz")
    assert "FIFO" in str(err.value) and err.value.path.endswith("a.npz")
    os.symlink("/dev/zero", tmp_path / "z.npz")
    with no_hang(), pytest.raises(InputError, match="character device"):
        load_arrays(tmp_path / "z.npz")


def test_sidecar_directory_is_refused_by_name(tmp_path):
    path = tile(tmp_path)
    (tmp_path / "t.json").mkdir()
    with pytest.raises(InputError, match="directory"):
        read_sidecar(path)


def test_oversized_sidecar_is_refused(tmp_path):
    path = tile(tmp_path)
    (tmp_path / "t.json").write_text(json.dumps({"note": "x" * (tiles_module.MAX_SIDECAR_BYTES + 10)}))
    with pytest.raises(InputError, match="more than the"):
        read_sidecar(path)


def test_deeply_nested_sidecar_is_one_error(tmp_path):
    path = tile(tmp_path)
    (tmp_path / "t.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputError, match="nests JSON too deeply"):
        read_sidecar(path)
    (tmp_path / "t.json").write_text('{"a": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(InputError, match="nests JSON too deeply"):
        read_sidecar(path)


def npy_member(shape, dtype="<f4", payload=b""):
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + payload


def zip_of(members: dict[str, bytes], compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compress) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def with_member(name, data):
    with zipfile.ZipFile(io.BytesIO(GOOD)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[name] = data
    return members


def test_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path):
    path = tile(tmp_path, zip_of(with_member("s1_vv.npy", npy_member((100_000, 100_000)))))
    with pytest.raises(InputError, match=f"tile sides must be {MIN_TILE_PX} to {MAX_TILE_PX} px"):
        load_arrays(path)
    path = tile(tmp_path, zip_of(with_member("s1_vv.npy", npy_member((8, 8), payload=b"\0" * 16))))
    with pytest.raises(InputError, match="header says"):
        load_arrays(path)


def test_zip_bomb_member_is_refused_by_its_declared_size(tmp_path):
    # A 22 MB-style bomb, small here: the member's declared (uncompressed) size is what is checked,
    # before a byte is inflated.
    data = bytearray(zip_of(with_member("s1_vv.npy", npy_member((8, 8), payload=b"\0" * 256)), zipfile.ZIP_DEFLATED))
    central = data.rfind(b"PK\x01\x02", 0, len(data))
    while central >= 0:
        name_len = struct.unpack_from("<H", data, central + 28)[0]
        if bytes(data[central + 46:central + 46 + name_len]) == b"s1_vv.npy":
            struct.pack_into("<I", data, central + 24, 0xF0000000)  # claims 4 GB
            break
        central = data.rfind(b"PK\x01\x02", 0, central)
    path = tile(tmp_path, bytes(data))
    with pytest.raises(InputError, match="declares 4026531840 bytes"):
        load_arrays(path)


@pytest.mark.parametrize("size", [1, MIN_TILE_PX - 1])
def test_tiles_below_the_minimum_size_are_refused(tmp_path, size):
    path = tile(tmp_path, encode_tile(arrays_of(size)))
    with pytest.raises(InputError, match=f"tile sides must be {MIN_TILE_PX} to {MAX_TILE_PX} px"):
        read_tile(path)
    assert read_tile(tile(tmp_path, encode_tile(arrays_of(MIN_TILE_PX)), "ok")).sar.shape == (2, MIN_TILE_PX, MIN_TILE_PX)


def test_tiles_of_different_sizes_are_one_error_before_training(tmp_path):
    tile(tmp_path, encode_tile(arrays_of(8)), "a")
    tile(tmp_path, encode_tile(arrays_of(16)), "b")
    with pytest.raises(InputError, match="tiles differ in size: a.npz is 8x8, b.npz is 16x16"):
        check_tiles(list_tiles(tmp_path), cache_dir=tmp_path / "cache")


def test_non_utf8_file_name_is_reported_in_one_printable_line(tmp_path, capsys):
    name = os.fsdecode(b"bad\xff")
    arrays = arrays_of()
    arrays["s1_vv"] = np.zeros((8, 8), np.float64)
    tile(tmp_path, encode_tile(arrays), name)
    with pytest.raises(InputError) as err:
        read_tile(list_tiles(tmp_path)[0])
    assert "bad\\xff.npz" in str(err.value)
    assert main(["tiles", "validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "bad\\xff.npz: s1_vv has dtype float64" in out


def test_permission_denied_is_said_not_truncated(tmp_path, monkeypatch, capsys):
    path = tile(tmp_path)
    if os.geteuid() == 0:  # root reads anything: make the open (axs_lib.bounded_read's) answer as the kernel would for others
        real_open = os.open

        def denied(file, *args, **kwargs):
            if os.fspath(file) == str(path):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", denied)
    else:
        path.chmod(0)
    with pytest.raises(InputError) as err:
        load_arrays(path)
    assert "permission denied" in err.value.problem and "truncated" not in err.value.problem
    assert main(["tiles", "validate", str(tmp_path)]) == 1
    assert "permission denied" in capsys.readouterr().out


def test_sidecars_that_all_say_test_leave_nothing_to_train(tmp_path):
    for i in range(3):
        tile(tmp_path, GOOD, f"t{i}")
        (tmp_path / f"t{i}.json").write_text('{"split": "test"}')
    with pytest.raises(UsageError, match="every one of the 3 tiles has split 'test'"):
        make_split(list_tiles(tmp_path), seed=0)


def test_check_tiles_reads_a_tile_once_and_again_after_a_rewrite(tmp_path, monkeypatch):
    monkeypatch.setattr(tiles_module, "RACY_SECONDS", -1.0)
    (tmp_path / "d").mkdir()
    for i in range(3):
        tile(tmp_path / "d", encode_tile(arrays_of(8, i)), f"t{i}")
    refs = list_tiles(tmp_path / "d")
    assert check_tiles(refs, cache_dir=tmp_path / "c") == {"checked": 3, "cached": 0, "shape": (8, 8)}
    assert check_tiles(refs, cache_dir=tmp_path / "c") == {"checked": 0, "cached": 3, "shape": (8, 8)}
    st_before = refs[1].stat()
    bad = arrays_of(8, 1)
    bad["s1_vv"][:] = 0.5  # linear power, not dB: implausible
    refs[1].write_bytes(encode_tile(bad))
    os.utime(refs[1], ns=(st_before.st_atime_ns, st_before.st_mtime_ns))  # cp -p keeps mtime
    with pytest.raises(InputError, match="looks like linear power"):
        check_tiles(refs, cache_dir=tmp_path / "c")


def test_validate_json_lists_problems_by_tile(tmp_path, capsys):
    tile(tmp_path, GOOD, "good")
    tile(tmp_path, b"junk", "junk")
    assert main(["tiles", "validate", str(tmp_path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["checked"], report["good"], report["bad"]) == (2, 1, 1)
    assert list(report["problems"]) == [str(tmp_path / "junk.npz")]
    assert report["tile_sizes"] == {"8x8": 1} and report["mixed_sizes"] is False


# --------------------------------------------------------------------------- any bytes at all

HYPOTHESIS = settings(derandomize=True, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def mutations():
    """Bytes near a valid tile (flipped, cut, spliced) and arbitrary bytes."""
    flips = st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)), min_size=1, max_size=8).map(
        lambda changes: _flip(changes))
    cuts = st.integers(0, len(GOOD)).map(lambda n: GOOD[:n])
    return st.one_of(flips, cuts, st.binary(max_size=2048))


def _flip(changes):
    data = bytearray(GOOD)
    for at, xor in changes:
        data[at] ^= xor
    return bytes(data)


@HYPOTHESIS
@given(data=mutations())
def test_any_tile_bytes_give_arrays_or_one_input_error(tmp_path, data):
    path = tile(tmp_path, data, "h")
    with no_hang():
        try:
            arrays = load_arrays(path)
        except InputError as exc:
            assert "\n" not in str(exc) and exc.path == str(path)
        else:
            assert set(arrays) == {*S1_KEYS, *S2_KEYS}
        validate_tile(path)  # never raises: problems are returned


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@HYPOTHESIS
@given(data=st.one_of(st.binary(max_size=512), JSONISH.map(lambda v: json.dumps(v).encode()),
                      st.dictionaries(st.sampled_from(sorted(tiles_module.SIDECAR_FIELDS)), JSONISH, max_size=4).map(
                          lambda v: json.dumps(v).encode())))
def test_any_sidecar_bytes_give_metadata_or_one_input_error(tmp_path, data):
    path = tile(tmp_path, GOOD, "s")
    (tmp_path / "s.json").write_bytes(data)
    with no_hang():
        try:
            meta = read_sidecar(path)
        except InputError as exc:
            assert "\n" not in str(exc)
        else:
            assert isinstance(meta, dict)


def test_summary_and_validate_do_not_block_on_a_fifo_tile(tmp_path, capsys):
    tile(tmp_path, GOOD, "good")
    os.mkfifo(tmp_path / "pipe.npz")
    with no_hang():
        assert summarize(tmp_path)["unreadable"] == 1
        assert main(["tiles", "validate", str(tmp_path)]) == 1
    assert "pipe.npz: tile is a FIFO (named pipe), not a regular file" in capsys.readouterr().out


def test_a_tile_swapped_for_a_fifo_after_its_check_is_refused_without_hanging(tmp_path, monkeypatch):
    good = tile(tmp_path, GOOD, "good")
    os.mkfifo(tmp_path / "pipe.npz")
    # the check saw a regular file; by the time of the read a FIFO has taken its place
    monkeypatch.setattr(tiles_module, "check_regular_file", lambda *_: os.stat(good))
    with no_hang(), pytest.raises(InputError, match="pipe.npz: tile is a FIFO"):
        load_arrays(tmp_path / "pipe.npz")
    start = time.monotonic()
    with no_hang(3):  # tile_shape turns any failure into None: it must come back at once, not after the alarm
        assert tiles_module.tile_shape(tmp_path / "pipe.npz") is None
    assert time.monotonic() - start < 2


# --------------------------------------------------------------------------- sidecar values JSON lets through


@pytest.mark.parametrize("bounds", ["[NaN, 0, 1, 1]", "[0, 0, Infinity, 1]", "[0, -Infinity, 1, 1]", "[0, 0, 1e999, 1]"])
def test_sidecar_bounds_that_are_not_finite_numbers_are_refused(tmp_path, bounds, capsys):
    path = tile(tmp_path, GOOD, "b")
    (tmp_path / "b.json").write_text('{"tile_id": "b", "bounds": %s}' % bounds)
    with pytest.raises(InputError, match=r"b.json: (invalid JSON in sidecar: -?(NaN|Infinity) is not a JSON number|sidecar field 'bounds' must be a list of 4 finite numbers)"):
        read_sidecar(path)
    assert main(["tiles", "validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith(f"{path}: b.json: ")


@pytest.mark.parametrize("text", ['{"split": "train", "split": "test"}', '{"tile_id": "a", "labels": ["x"], "tile_id": "b"}',
                                  '{"extra": {"k": 1, "k": 2}}'])
def test_a_sidecar_key_given_twice_is_refused(tmp_path, text):
    path = tile(tmp_path, GOOD, "d")
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(InputError, match=r"d.json: invalid JSON in sidecar: key \"(split|tile_id|k)\" appears twice in one object$"):
        read_sidecar(path)
    with pytest.raises(InputError, match="appears twice"):
        check_tiles([path], cache_dir=tmp_path / "cache")
