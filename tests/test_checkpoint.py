"""Checkpoint files: weights-only loading, byte identity, checksum, atomicity, unsafe pickles."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from axs_lib.checkpoint import (
    CHECKSUM_KEY,
    FORMAT_KEY,
    LEGACY_CHECKSUM_KEY,
    FORMAT_VERSION,
    atomic_open,
    content_digest,
    load_checkpoint,
    read_latest,
    save_checkpoint,
    unsafe_leaves,
    write_checkpoint_files,
    write_latest,
)
from axs_lib.errors import EXIT_FAILURE, AxsError, CheckpointError
from axs_lib.reproducibility import add_seed_to_checkpoint, set_seed


def _ckpt(scale: float = 1.0) -> dict:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    ckpt = {
        "model_state_dict": {k: v * scale for k, v in model.state_dict().items()},
        "optimizer_state_dict": opt.state_dict(),
        "step": 3,
        "epoch": 0,
        "config": {"lr": 1e-3, "name": "x", "flags": [1, 2]},
    }
    return add_seed_to_checkpoint(ckpt, set_seed(42))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_plain_weights_only_load_with_no_allow_list(tmp_path):
    path = tmp_path / "a.pt"
    save_checkpoint(_ckpt(), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded[FORMAT_KEY] == FORMAT_VERSION
    assert set(_ckpt()) <= set(loaded)


def test_same_content_same_bytes_in_any_directory(tmp_path):
    (tmp_path / "run1" / "deep").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    a, b = tmp_path / "run1" / "deep" / "x.pt", tmp_path / "other" / "y.pt"
    save_checkpoint(_ckpt(), a)
    save_checkpoint(_ckpt(), b)
    assert sha(a) == sha(b)
    save_checkpoint(_ckpt(scale=2.0), b)
    assert sha(a) != sha(b)


def test_save_does_not_modify_callers_dict(tmp_path):
    ckpt = _ckpt()
    keys = set(ckpt)
    save_checkpoint(ckpt, tmp_path / "a.pt")
    assert set(ckpt) == keys


def test_round_trip_verifies_checksum(tmp_path):
    path = tmp_path / "a.pt"
    digest = save_checkpoint(_ckpt(), path)
    loaded = load_checkpoint(path)
    assert loaded[CHECKSUM_KEY] == digest
    assert torch.equal(loaded["model_state_dict"]["weight"], _ckpt()["model_state_dict"]["weight"])


def test_bit_rot_in_tensor_data_is_reported_by_name(tmp_path):
    path = tmp_path / "rot.pt"
    ckpt = _ckpt()
    save_checkpoint(ckpt, path)
    raw = bytearray(path.read_bytes())
    weight = ckpt["model_state_dict"]["weight"].numpy().tobytes()
    at = bytes(raw).index(weight)  # the tensor's bytes are stored verbatim in the archive
    raw[at + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"rot\.pt: checksum mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncation_is_reported_by_name(tmp_path, keep):
    path = tmp_path / "cut.pt"
    save_checkpoint(_ckpt(), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(CheckpointError, match=r"cut\.pt: truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "no such file"), (b"", "empty file"), (b"hello world, not a checkpoint", "not a PyTorch checkpoint")],
)
def test_missing_empty_garbage(tmp_path, content, problem):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=problem):
        load_checkpoint(path)


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, zip_format):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    obj = {"model_state_dict": {}, "x": _Payload(str(marker))}
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)  # False: legacy pickle format
    with pytest.raises(CheckpointError, match=r"evil\.pt: .*can run code.*--trust"):
        load_checkpoint(path)
    assert not marker.exists()
    with pytest.warns(RuntimeWarning, match="trust"):
        load_checkpoint(path, trust=True)
    assert marker.read_text() == "pwned"  # trust is the only way in, and it does run code


def test_foreign_checkpoint_without_checksum_loads_only_when_allowed(tmp_path):
    path = tmp_path / "guide.pt"
    torch.save({"model_state_dict": {"w": torch.ones(3)}, "epoch": 10, "loss": 0.123}, path)
    with pytest.raises(CheckpointError, match=r"guide\.pt: no content checksum .*--allow-unverified"):
        load_checkpoint(path)
    assert load_checkpoint(path, allow_unverified=True)["epoch"] == 10
    assert load_checkpoint(path, verify=False)["epoch"] == 10


def test_content_digest_ignores_key_order_but_not_values():
    a = {"x": torch.ones(2), "y": 1}
    b = {"y": 1, "x": torch.ones(2)}
    assert content_digest(a) == content_digest(b)
    assert content_digest(a) != content_digest({"x": torch.ones(2, dtype=torch.float64), "y": 1})
    assert content_digest(a) != content_digest({"x": torch.ones(1, 2), "y": 1})
    assert content_digest({"l": [1, 2]}) != content_digest({"l": {"0": 1, "1": 2}})


def test_atomic_open_leaves_old_file_on_error(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as f:
            f.write("new half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_kill_during_save_leaves_previous_checkpoint_intact(tmp_path):
    """SIGKILL a process in the middle of writing a large checkpoint over an existing one."""
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.zeros(10)}, path)
    before = sha(path)
    script = textwrap.dedent(f"""
        import os, sys, torch
        from axs_lib import checkpoint
        real_save = torch.save
        def slow_save(obj, f):
            real_save(obj, f)
            f.flush()
            print("written", flush=True)
            sys.stdin.readline()  # wait here, mid-write, to be killed
        checkpoint.torch.save = slow_save
        checkpoint.save_checkpoint({{"w": torch.ones(2_000_000)}}, {str(path)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sha(path) == before
    assert torch.equal(load_checkpoint(path)["w"], torch.zeros(10))


def test_latest_pointer(tmp_path):
    assert read_latest(tmp_path) is None
    write_latest(tmp_path, "checkpoint_step_10.pt")
    assert read_latest(tmp_path) == tmp_path / "checkpoint_step_10.pt"
    (tmp_path / "latest").write_text("../../etc/passwd\n")
    with pytest.raises(CheckpointError, match="malformed latest pointer"):
        read_latest(tmp_path)


def test_guide_save_and_plain_load_round_trip(tmp_path):
    """The guide saves with plain torch.save and loads with plain torch.load (weights-only by default)."""
    ckpt = add_seed_to_checkpoint({"model_state_dict": {"w": torch.ones(2)}, "epoch": 10, "loss": 0.123}, set_seed(42))
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    loaded = torch.load(path)
    assert loaded["seed_info"]["seed"] == 42 and "rng_state" in loaded
    assert os.path.getsize(path) > 0


@pytest.mark.parametrize(
    ("value", "named"),
    [
        (torch.__version__, "meta.version: torch.torch_version.TorchVersion"),
        (np.float32(1.0), "meta.version: numpy.float32"),
        (np.zeros(2), "meta.version: numpy.ndarray"),
        (Path("x"), "meta.version: pathlib.PosixPath"),
    ],
)
def test_content_that_weights_only_would_refuse_is_not_written(tmp_path, value, named):
    path = tmp_path / "x.pt"
    with pytest.raises(TypeError, match=named.replace(".", r"\.")):
        save_checkpoint({"meta": {"version": value}}, path)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_unsafe_leaves_accepts_what_weights_only_accepts(tmp_path):
    import collections

    ok = {"a": collections.OrderedDict(w=torch.ones(1)), "b": (1, 2.0, "s", None, True), "c": [torch.float32, torch.Size([2])]}
    assert unsafe_leaves(ok) == []
    torch.save(ok, tmp_path / "ok.pt")
    torch.load(tmp_path / "ok.pt", weights_only=True)


def test_same_content_with_other_object_identity_gives_same_bytes(tmp_path):
    """A resumed run holds equal strings and tuples as distinct objects; the bytes must not change."""
    key = "step"
    betas = (0.9, 0.999)
    shared = {"step": 1, "opt": {"state": {0: {key: torch.ones(1)}}, "groups": [{"betas": betas}, {"betas": betas}]}}
    fresh = {
        "step": 1,
        "opt": {"state": {0: {"".join(["st", "ep"]): torch.ones(1)}}, "groups": [{"betas": (0.9, 0.999)}, {"betas": tuple([0.9, 0.999])}]},
    }
    save_checkpoint(shared, tmp_path / "a.pt")
    save_checkpoint(fresh, tmp_path / "b.pt")
    assert sha(tmp_path / "a.pt") == sha(tmp_path / "b.pt")


def test_module_state_dict_metadata_survives(tmp_path):
    model = torch.nn.Linear(2, 2)
    save_checkpoint({"m": model.state_dict()}, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")["m"]
    assert loaded._metadata == model.state_dict()._metadata
    torch.nn.Linear(2, 2).load_state_dict(loaded)


def test_written_files_get_the_usual_mode(tmp_path):
    old = os.umask(0o022)
    try:
        save_checkpoint({"w": torch.ones(1)}, tmp_path / "m.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "m.pt").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------------------- checksum versions

_GOLDEN = {"x": torch.arange(4, dtype=torch.float32), "y": 1, "l": ["a", 2.5, None]}


def test_checksum_algorithms_are_pinned_by_golden_values():
    """Changing either digest silently would make every existing checkpoint fail its check."""
    assert content_digest(_GOLDEN) == "306a08b8d12dd366296dc5ed289bf30f"
    assert content_digest(_GOLDEN, LEGACY_CHECKSUM_KEY) == "20d6cb6d327b6155ffef94afe42179cd8e782fba923a0553fa48492e8fae3ba6"


def test_new_checkpoints_carry_the_xxh3_checksum_only(tmp_path):
    save_checkpoint({**_ckpt(), LEGACY_CHECKSUM_KEY: "stale"}, tmp_path / "a.pt")
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert raw[FORMAT_KEY] == 2 and CHECKSUM_KEY == "content_xxh3"
    assert LEGACY_CHECKSUM_KEY not in raw and len(raw[CHECKSUM_KEY]) == 32


def _format_1_file(path: Path, ckpt: dict) -> None:
    """A checkpoint as format 1 wrote it: SHA-256 over the same structure under ``content_sha256``."""
    body = {**ckpt, FORMAT_KEY: 1}
    body[LEGACY_CHECKSUM_KEY] = content_digest(body, LEGACY_CHECKSUM_KEY)
    torch.save(body, path)


def test_format_1_checkpoint_still_loads_and_verifies(tmp_path):
    path = tmp_path / "old.pt"
    _format_1_file(path, _ckpt())
    loaded = load_checkpoint(path)
    assert loaded[FORMAT_KEY] == 1 and torch.equal(loaded["model_state_dict"]["bias"], _ckpt()["model_state_dict"]["bias"])


def test_format_1_checkpoint_with_changed_content_is_caught(tmp_path):
    path = tmp_path / "old.pt"
    ckpt = _ckpt()
    _format_1_file(path, ckpt)
    tampered = torch.load(path, weights_only=True)
    tampered["step"] = 4
    torch.save(tampered, path)
    with pytest.raises(CheckpointError, match=r"old\.pt: checksum mismatch"):
        load_checkpoint(path)


def test_format_2_checksum_catches_a_changed_scalar(tmp_path):
    path = tmp_path / "new.pt"
    save_checkpoint(_ckpt(), path)
    tampered = torch.load(path, weights_only=True)
    tampered["config"]["flags"][1] = 3
    torch.save(tampered, path)
    with pytest.raises(CheckpointError, match=r"new\.pt: checksum mismatch"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- several names, one write


def test_checkpoint_files_are_written_once_and_linked_then_latest_moves(tmp_path):
    digest = write_checkpoint_files(tmp_path, ["best.pt", "checkpoint_step_3.pt"], _ckpt(), latest="checkpoint_step_3.pt")
    best, step = tmp_path / "best.pt", tmp_path / "checkpoint_step_3.pt"
    assert best.stat().st_ino == step.stat().st_ino  # one file, two names
    assert read_latest(tmp_path) == step
    assert load_checkpoint(step)[CHECKSUM_KEY] == digest
    save_checkpoint(_ckpt(), tmp_path / "alone.pt")
    assert sha(tmp_path / "alone.pt") == sha(step)  # same bytes as a plain save


@pytest.mark.parametrize("failing", ["checkpoint_step_4.pt", "best.pt", "latest"])
def test_failed_checkpoint_write_is_one_line_and_keeps_what_was_there(tmp_path, monkeypatch, failing):
    write_checkpoint_files(tmp_path, ["checkpoint_step_2.pt"], _ckpt(), latest="checkpoint_step_2.pt")
    before = {p.name: sha(p) for p in tmp_path.iterdir()}
    monkeypatch.setenv("AXS_FAULT", f"enospc:{failing}")
    with pytest.raises(AxsError) as caught:
        write_checkpoint_files(tmp_path, ["checkpoint_step_4.pt", "best.pt"], _ckpt(2.0), latest="checkpoint_step_4.pt")
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_FAILURE and "\n" not in message
    assert message.startswith(f"{tmp_path / failing}: cannot write checkpoint: No space left on device")
    assert "earlier checkpoints and the latest pointer are intact" in message and "free some space" in message
    assert {p.name: sha(p) for p in tmp_path.iterdir() if p.name in before} == before
    assert read_latest(tmp_path).name == "checkpoint_step_2.pt"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_an_unrelated_runtime_error_is_not_reported_as_a_full_disk(tmp_path, monkeypatch):
    def broken(obj, f):
        raise RuntimeError("some bug")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="some bug"):
        write_checkpoint_files(tmp_path, ["a.pt"], _ckpt())
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- hostile files


def test_fifo_checkpoint_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)  # nobody writes to it: an ordinary open or read would wait forever
    with pytest.raises(CheckpointError, match=r"pipe\.pt: is a FIFO \(named pipe\), not a checkpoint file"):
        load_checkpoint(fifo)


def test_symlink_to_dev_zero_is_refused_without_reading(tmp_path):
    link = tmp_path / "zero.pt"
    link.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"zero\.pt: is a character device, not a checkpoint file"):
        load_checkpoint(link)
    (tmp_path / "latest").symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match=r"latest: is a character device"):
        read_latest(tmp_path)


def test_latest_that_is_a_fifo_or_a_directory_is_refused(tmp_path):
    os.mkfifo(tmp_path / "latest")
    with pytest.raises(CheckpointError, match="latest: is a FIFO"):
        read_latest(tmp_path)
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").mkdir()
    with pytest.raises(CheckpointError, match="latest: is a directory"):
        read_latest(tmp_path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"checkpoint_step_1.pt" * 100, "longer than 512 bytes"),
        (b"checkpoint_step_\xff.pt\n", "not UTF-8"),
        (b"checkpoint\x00.pt\n", "malformed latest pointer"),
        (b"\n\n", "malformed latest pointer"),
        (b".checkpoint_step_2.pt.abc.tmp\n", "malformed latest pointer"),
    ],
)
def test_malformed_latest_pointer_is_one_error(tmp_path, content, problem):
    (tmp_path / "latest").write_bytes(content)
    with pytest.raises(CheckpointError, match=problem):
        read_latest(tmp_path)


def test_latest_in_a_missing_directory_is_no_pointer(tmp_path):
    assert read_latest(tmp_path / "absent") is None


def _unicode_op(text: str) -> bytes:
    data = text.encode()
    return b"X" + len(data).to_bytes(4, "little") + data


def test_deeply_nested_content_is_one_checkpoint_error(tmp_path):
    """A file whose pickle nests lists 5000 deep (Python's pickler could not even write it)."""
    import zipfile as _zip

    depth = 5000
    stream = (b"\x80\x02}" + _unicode_op("x") + b"]" * depth + b"a" * (depth - 1) + b"s"
              + _unicode_op(FORMAT_KEY) + b"K\x02s" + _unicode_op(CHECKSUM_KEY) + _unicode_op("0" * 32) + b"s.")
    path = tmp_path / "deep.pt"
    with _zip.ZipFile(path, "w") as z:  # torch's zip layout around that pickle stream
        z.writestr("archive/data.pkl", stream)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match=r"deep\.pt: content nested more than \d+ levels deep"):
        load_checkpoint(path)
    nested: list = []
    for _ in range(depth):
        nested = [nested]
    with pytest.raises(TypeError, match="nested more than"):
        save_checkpoint({"x": nested}, tmp_path / "w.pt")
    assert not (tmp_path / "w.pt").exists()


def test_content_that_is_not_a_dict_is_refused(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match=r"list\.pt: holds a list, not a checkpoint"):
        load_checkpoint(tmp_path / "list.pt")


# Property tests: whatever the bytes, a dict or a CheckpointError, never another exception or a hang.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PROPERTY = settings(derandomize=True, max_examples=60, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _valid_bytes() -> bytes:
    if not hasattr(_valid_bytes, "raw"):
        import io
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            save_checkpoint({"w": torch.arange(6, dtype=torch.float32), "step": 3, "config": {"a": [1, 2.5, "s"]}}, Path(d) / "v.pt")
            _valid_bytes.raw = (Path(d) / "v.pt").read_bytes()
        buf = io.BytesIO()
        torch.save({"w": torch.ones(3)}, buf, _use_new_zipfile_serialization=False)
        _valid_bytes.legacy = buf.getvalue()
    return _valid_bytes.raw


def _load_outcome(path: Path) -> str:
    try:
        result = load_checkpoint(path)
    except CheckpointError:
        return "refused"
    assert isinstance(result, dict)
    return "loaded"


_MUTATION = st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=1, max_value=255)), min_size=1, max_size=4)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@_PROPERTY
@given(raw=st.binary(max_size=600), head=st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x05"]))
def test_any_bytes_load_as_a_dict_or_a_checkpoint_error(tmp_path, raw, head):
    path = tmp_path / "any.pt"
    path.write_bytes(head + raw)
    _load_outcome(path)


@_PROPERTY
@given(flips=_MUTATION, cut=st.one_of(st.none(), st.floats(min_value=0.0, max_value=1.0)), legacy=st.booleans())
def test_damaged_checkpoints_load_as_a_dict_or_a_checkpoint_error(tmp_path, flips, cut, legacy):
    _valid_bytes()
    raw = bytearray(_valid_bytes.legacy if legacy else _valid_bytes.raw)
    for at, xor in flips:
        raw[at % len(raw)] ^= xor
    if cut is not None:
        raw = raw[: int(len(raw) * cut)]
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(raw))
    _load_outcome(path)


def test_property_tests_do_reach_both_outcomes(tmp_path):
    """The strategies above are only useful if damage is sometimes harmless and sometimes caught."""
    _valid_bytes()
    path = tmp_path / "v.pt"
    path.write_bytes(_valid_bytes.raw)
    assert _load_outcome(path) == "loaded"
    raw = bytearray(_valid_bytes.raw)
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert _load_outcome(path) == "refused"


@_PROPERTY
@given(raw=st.binary(max_size=700))
def test_any_latest_bytes_give_a_path_or_a_checkpoint_error(tmp_path, raw):
    (tmp_path / "latest").write_bytes(raw)
    try:
        found = read_latest(tmp_path)
    except CheckpointError:
        return
    assert found is not None and found.parent == tmp_path and "/" not in found.name


@pytest.mark.parametrize("damaged", [b"content_xxh4", b"content_XXh3", b"Content_xxh3"])
def test_one_flipped_byte_in_the_checksum_key_name_is_refused_not_unchecked(tmp_path, damaged):
    path = tmp_path / "a.pt"
    save_checkpoint(_ckpt(), path)
    raw = path.read_bytes()
    assert raw.count(CHECKSUM_KEY.encode()) == 1
    path.write_bytes(raw.replace(CHECKSUM_KEY.encode(), damaged))
    assert damaged.decode() in torch.load(path, weights_only=True)  # torch itself loads it fine
    with pytest.raises(CheckpointError, match=r"a\.pt: no content checksum .*format_version 2.*key is damaged"):
        load_checkpoint(path)
    assert load_checkpoint(path, allow_unverified=True)[FORMAT_KEY] == FORMAT_VERSION  # only when asked


def test_a_format_1_checkpoint_still_verifies_and_a_wrong_sha256_is_refused(tmp_path):
    body = {**_ckpt(), FORMAT_KEY: 1}
    body[LEGACY_CHECKSUM_KEY] = content_digest(body, LEGACY_CHECKSUM_KEY)
    torch.save(body, tmp_path / "v1.pt")
    assert load_checkpoint(tmp_path / "v1.pt")[FORMAT_KEY] == 1
    torch.save({**body, LEGACY_CHECKSUM_KEY: "0" * 64}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: checksum mismatch"):
        load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("key", [CHECKSUM_KEY, LEGACY_CHECKSUM_KEY, FORMAT_KEY, "step", "seed_info"])
def test_training_state_refuses_every_key_the_checkpoint_reserves(key):
    from axs_lib.state import RESERVED, TrainingState

    assert key in RESERVED
    with pytest.raises(ValueError, match="collides with a checkpoint key"):
        TrainingState(extras={key: 1}, model=torch.nn.Linear(1, 1)).state_dict()
    if key != "step":  # ``step`` is the constructor's own argument
        with pytest.raises(ValueError, match="reserved"):
            TrainingState(**{key: torch.nn.Linear(1, 1)})
