"""Checkpoint writes against real operating-system failures, not exceptions of our choosing.

* A tiny tmpfs fills up (ENOSPC) and is remounted read-only (EROFS); this needs root and a kernel
  that lets us mount, so those tests skip, saying so, where ``mount`` is refused.
* ``RLIMIT_FSIZE`` makes a child process's large write fail with EFBIG, and a directory the child
  may not write to gives EACCES; these need no privilege (as root the child drops to ``nobody``).

Each checks the promise of `write_checkpoint_files`: one line naming the file, exit status 1, the
earlier checkpoint and ``latest`` intact, no temp file left behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from axs_lib.checkpoint import load_checkpoint, read_latest, write_checkpoint_files
from axs_lib.checkpoint_writer import AsyncCheckpointWriter
from axs_lib.errors import EXIT_FAILURE, AxsError

REPO = Path(__file__).resolve().parents[1]
SMALL = {"w": torch.arange(1000, dtype=torch.float32), "step": 2}  # ~4 kB
LARGE = {"w": torch.ones(2_000_000), "step": 4}  # 8 MB, larger than the filesystem


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs, or a skip that says why one cannot be mounted here."""
    target = tmp_path / "fs"
    target.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the ENOSPC/EROFS tests need a tiny tmpfs (RLIMIT_FSIZE test still runs)")
    done = _mount("-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(target))
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not permitted'}); "
                    "the RLIMIT_FSIZE and EACCES tests cover a failing write without privileges")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _state(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def _check_failure(error: AxsError, path: Path, reason: str) -> None:
    text = str(error)
    assert error.exit_code == EXIT_FAILURE and "\n" not in text
    assert text.startswith(f"{path}: cannot write checkpoint: {reason}"), text
    assert "earlier checkpoints and the latest pointer are intact" in text
    assert "enforce fail" not in text and "Traceback" not in text


def _check_intact(directory: Path, before: dict[str, str]) -> None:
    assert _state(directory) == before  # nothing changed, nothing added (no temp files either)
    assert read_latest(directory).name == "checkpoint_step_2.pt"
    assert load_checkpoint(directory / "checkpoint_step_2.pt")["step"] == 2


def test_full_disk_during_serialisation_is_one_line_and_keeps_earlier_files(tiny_fs):
    write_checkpoint_files(tiny_fs, ["checkpoint_step_2.pt"], SMALL, latest="checkpoint_step_2.pt")
    before = _state(tiny_fs)
    with pytest.raises(AxsError) as caught:  # the disk fills inside torch.save, which would say "unexpected pos"
        write_checkpoint_files(tiny_fs, ["checkpoint_step_4.pt", "best.pt"], LARGE, latest="checkpoint_step_4.pt")
    _check_failure(caught.value, tiny_fs / "checkpoint_step_4.pt", "No space left on device")
    assert "free some space" in str(caught.value)
    _check_intact(tiny_fs, before)


def test_full_disk_in_an_async_write_is_raised_by_wait(tiny_fs):
    write_checkpoint_files(tiny_fs, ["checkpoint_step_2.pt"], SMALL, latest="checkpoint_step_2.pt")
    before = _state(tiny_fs)
    writer = AsyncCheckpointWriter()
    writer.submit(tiny_fs, ["checkpoint_step_4.pt"], LARGE, latest="checkpoint_step_4.pt")
    with pytest.raises(AxsError) as caught:
        writer.wait()
    writer.close()
    _check_failure(caught.value, tiny_fs / "checkpoint_step_4.pt", "No space left on device")
    _check_intact(tiny_fs, before)


def test_read_only_filesystem_is_one_line_and_keeps_earlier_files(tiny_fs):
    write_checkpoint_files(tiny_fs, ["checkpoint_step_2.pt"], SMALL, latest="checkpoint_step_2.pt")
    before = _state(tiny_fs)
    done = _mount("-o", "remount,ro", str(tiny_fs))
    assert done.returncode == 0, done.stderr
    with pytest.raises(AxsError) as caught:
        write_checkpoint_files(tiny_fs, ["checkpoint_step_4.pt"], SMALL, latest="checkpoint_step_4.pt")
    _check_failure(caught.value, tiny_fs / "checkpoint_step_4.pt", "Read-only file system")
    _check_intact(tiny_fs, before)


_CHILD = textwrap.dedent("""
    import os, resource, signal, sys, torch
    from axs_lib.checkpoint import write_checkpoint_files
    from axs_lib.errors import AxsError
    directory, fault = sys.argv[1:]
    if fault == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif os.getuid() == 0:
        os.setgid(65534)
        os.setuid(65534)  # nobody: may read the checkpoints, may not create files beside them
    try:
        write_checkpoint_files(directory, ["checkpoint_step_4.pt", "best.pt"], {"w": torch.ones(2_000_000), "step": 4},
                               latest="checkpoint_step_4.pt")
    except AxsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
""")


@pytest.mark.parametrize(("fault", "reason"), [("fsize", "File too large"), ("eacces", "Permission denied")])
def test_os_refusing_a_write_in_a_real_process_is_one_line(tmp_path, fault, reason):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    write_checkpoint_files(directory, ["checkpoint_step_2.pt"], SMALL, latest="checkpoint_step_2.pt")
    before = _state(directory)
    if fault == "eacces":
        os.chmod(tmp_path, 0o755)
        os.chmod(directory, 0o555)
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(directory), fault], env=env, cwd="/",
                          capture_output=True, text=True, timeout=120)
    os.chmod(directory, 0o755)
    assert done.returncode == EXIT_FAILURE, done.stderr
    line = done.stderr.strip()
    assert "\n" not in line and line.startswith(f"{directory / 'checkpoint_step_4.pt'}: cannot write checkpoint: {reason}"), line
    assert "earlier checkpoints and the latest pointer are intact" in line
    _check_intact(directory, before)
