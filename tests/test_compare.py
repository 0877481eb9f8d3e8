"""`axs compare` / tools/compare_checkpoints.py: verdicts, per-tensor report, metadata, runs, bad files."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from axs_lib.checkpoint import save_checkpoint
from axs_lib.cli import main
from axs_lib.compare import (
    DIFFERENT,
    IDENTICAL_BYTES,
    IDENTICAL_CONTENT,
    WITHIN_TOLERANCE,
    Options,
    compare_paths,
    compare_tensors,
    to_json,
)
from axs_lib.fingerprint.environment import environment_fingerprint
from axs_lib.reproducibility import get_seed_state, set_seed

REPO = Path(__file__).resolve().parent.parent


def make_checkpoint(seed: int = 42, step: int = 3) -> dict:
    """A checkpoint with the trainer's schema, from a small model trained a few steps."""
    seed_info = set_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for _ in range(step):
        model(torch.randn(2, 2, 8, 8)).square().mean().backward()
        opt.step()
        sched.step()
    return {
        "step": step,
        "epoch": 0,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "scheduler_state_dict": sched.state_dict(),
        "seed_info": seed_info,
        "rng_state": get_seed_state(),
        "sampler_state": {"epoch": 0, "position": step * 2},
        "early_stopping": {"best": 0.5, "bad_epochs": 0},
        "config": {"lr": 1e-3, "batch_size": 2, "seed": seed},
        # str(): the fingerprint's torch version is a TorchVersion, which weights-only loading refuses
        "environment": {k: str(v) if isinstance(v, str) else v for k, v in environment_fingerprint().items()},
        "data_fingerprint": {"sha256": "d" * 64, "tiles_sha256": "t" * 64, "split_sha256": "s" * 64, "num_tiles": 6},
        "metrics": {"val_loss": 0.5},
        "world_size": 1,
    }


def cli(*args: str) -> int:
    return main(["compare", *map(str, args)])


def one_ulp_up(t: torch.Tensor, index) -> torch.Tensor:
    """A copy of ``t`` with the element at ``index`` moved to the next float (away from zero)."""
    t = t.clone()
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    t.view(width)[index] += 1
    return t


@pytest.fixture(scope="module")
def base() -> dict:
    return make_checkpoint()


@pytest.fixture
def pair(tmp_path, base):
    """Write ``base`` as A and a modified copy as B; returns a function (modify) -> (a, b)."""

    def write(modify=lambda c: c):
        a, b = tmp_path / "a.pt", tmp_path / "b" / "b.pt"
        b.parent.mkdir(exist_ok=True)
        save_checkpoint(base, a)
        save_checkpoint(modify({k: v for k, v in base.items()}), b)
        return a, b

    return write


# --------------------------------------------------------------------------- verdicts


def test_same_checkpoint_in_another_directory_is_identical_bytes(pair, capsys):
    a, b = pair()
    result = compare_paths(a, b)
    assert result.verdict == IDENTICAL_BYTES and result.match
    assert result.tensors and all(t.identical for t in result.tensors)
    assert cli(a, b) == 0
    assert "IDENTICAL BYTES" in capsys.readouterr().out


def test_same_content_other_key_order_is_identical_content(pair):
    a, b = pair(lambda c: dict(reversed(list(c.items()))))
    assert a.read_bytes() != b.read_bytes()
    assert compare_paths(a, b).verdict == IDENTICAL_CONTENT
    assert cli(a, b) == 0


def test_one_ulp_in_one_weight_is_found_and_named(pair, capsys):
    def nudge(c):
        sd = dict(c["model_state_dict"])
        sd["2.weight"] = one_ulp_up(sd["2.weight"], (1, 3, 0, 0))
        return dict(c, model_state_dict=sd)

    a, b = pair(nudge)
    result = compare_paths(a, b)
    assert result.verdict == DIFFERENT
    (diff,) = result.tensor_diffs
    assert diff.path == "model_state_dict.2.weight"
    assert (diff.n_differ, diff.max_ulp, diff.first_index) == (1, 1, (1, 3, 0, 0))
    assert 0 < diff.max_abs < 1e-6
    assert not result.value_diffs and not result.only_in_a and not result.only_in_b
    assert cli(a, b) == 1
    out = capsys.readouterr().out
    assert out.startswith("verdict: DIFFERENT")
    assert "model_state_dict.2.weight" in out
    assert "no recorded difference explains it" in out


def test_changed_rng_state_alone_is_found(pair):
    def reseed(c):
        torch.manual_seed(1234)
        return dict(c, rng_state=dict(c["rng_state"], torch_rng_state=torch.get_rng_state()))

    a, b = pair(reseed)
    result = compare_paths(a, b)
    assert result.verdict == DIFFERENT
    assert [t.path for t in result.tensor_diffs] == ["rng_state.torch_rng_state"]
    assert result.tensor_diffs[0].max_ulp is None  # uint8: no ULPs, but counted and sized
    assert result.tensor_diffs[0].n_differ > 0
    assert compare_paths(a, b, Options(ignore=("rng_state",))).verdict == IDENTICAL_CONTENT


def test_python_and_numpy_rng_state_and_sampler_are_compared(pair):
    def shift(c):
        rng = dict(c["rng_state"], numpy_state=dict(c["rng_state"]["numpy_state"], pos=1))
        return dict(c, rng_state=rng, sampler_state={"epoch": 0, "position": 7})

    a, b = pair(shift)
    paths = {v.path for v in compare_paths(a, b).value_diffs}
    assert paths == {"rng_state.numpy_state.pos", "sampler_state.position"}


def test_tolerance_modes(pair):
    def drift(c):
        sd = dict(c["model_state_dict"])
        sd["0.weight"] = sd["0.weight"] * (1 + 1e-6)
        return dict(c, model_state_dict=sd)

    a, b = pair(drift)
    assert compare_paths(a, b).verdict == DIFFERENT
    assert compare_paths(a, b, Options(rtol=1e-5)).verdict == WITHIN_TOLERANCE
    assert compare_paths(a, b, Options(rtol=1e-8)).verdict == DIFFERENT
    assert compare_paths(a, b, Options(atol=1.0)).verdict == WITHIN_TOLERANCE
    assert cli(a, b, "--rtol", "1e-5") == 0
    assert cli(a, b, "--atol", "1e-12") == 1
    assert cli(a, b, "--rtol", "-1") == 2


def test_tolerance_never_excuses_integers_or_other_values(pair):
    a, b = pair(lambda c: dict(c, step=4, rng_state=dict(c["rng_state"], torch_rng_state=c["rng_state"]["torch_rng_state"] ^ 1)))
    result = compare_paths(a, b, Options(atol=1e9, rtol=1.0))
    assert result.verdict == DIFFERENT
    assert result.tensor_diffs[0].n_outside == result.tensor_diffs[0].n_differ > 0
    assert [v.path for v in result.value_diffs] == ["step"]


def test_missing_and_extra_keys_are_listed_collapsed(pair, capsys):
    def edit(c):
        c = {k: v for k, v in c.items() if k != "scheduler_state_dict"}
        c["extra"] = {"x": torch.zeros(2), "y": 1}
        sd = dict(c["model_state_dict"])
        del sd["0.bias"]
        return dict(c, model_state_dict=sd)

    a, b = pair(edit)
    result = compare_paths(a, b)
    assert result.verdict == DIFFERENT
    assert sorted(result.only_in_a) == ["model_state_dict.0.bias", "scheduler_state_dict"]
    assert result.only_in_b == ["extra"]
    assert cli(a, b) == 1
    assert "keys only in B: extra" in capsys.readouterr().out
    ignored = compare_paths(a, b, Options(ignore=("scheduler_state_dict", "extra", "model_state_dict.*.bias")))
    assert ignored.only_in_a == ignored.only_in_b == []


def test_shape_and_dtype_mismatch(pair):
    def edit(c):
        sd = dict(c["model_state_dict"])
        sd["0.bias"] = sd["0.bias"].double()
        sd["2.bias"] = torch.zeros(5)
        return dict(c, model_state_dict=sd)

    a, b = pair(edit)
    mismatches = {t.path: t.mismatch for t in compare_paths(a, b).tensor_diffs}
    assert mismatches == {"model_state_dict.0.bias": "dtype float32 vs float64", "model_state_dict.2.bias": "shape (4,) vs (5,)"}


# --------------------------------------------------------------------------- ULP and NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_ulp_distance_is_exact_across_zero_and_types(dtype):
    tiny = torch.tensor([0], dtype={2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dtype).bits // 8]).add(1).view(dtype)
    one = torch.ones(1, dtype=dtype)

    def ulp(x, y):
        return compare_tensors("t", x, y, Options()).max_ulp

    assert ulp(one, one_ulp_up(one, 0)) == 1
    assert ulp(tiny, -tiny) == 2  # smallest subnormals either side of zero
    assert ulp(torch.zeros(1, dtype=dtype), -torch.zeros(1, dtype=dtype)) == 0  # bits differ, value does not
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[one.element_size()]
    report = compare_tensors("t", -one, one, Options())
    assert (report.max_ulp, report.max_abs, report.max_rel, report.n_differ) == (2 * int(one.view(bits)), 2.0, 2.0, 1)
    big = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
    assert ulp(big, -big) == 2 * int(big.view(bits))  # 2**64 - 2**53 - 2 for float64: past int64, exact


def test_nan_equals_nan_in_the_same_place_only():
    a = torch.tensor([1.0, math.nan, 3.0])
    assert compare_tensors("t", a, a.clone(), Options()).identical
    moved = compare_tensors("t", a, torch.tensor([math.nan, 2.0, 3.0]), Options(atol=10.0))
    assert moved.n_differ == 2 and moved.n_outside == 2
    assert moved.max_abs == math.inf and moved.max_ulp == math.inf
    json.loads(json.dumps({"x": str(moved.max_ulp)}))


def test_large_tensor_is_compared_in_chunks(monkeypatch):
    monkeypatch.setattr("axs_lib.compare.CHUNK_BYTES", 4096)
    a = torch.arange(100_000, dtype=torch.float32).reshape(100, 1000)
    b = a.clone()
    b[3, 7] += 1
    b[99, 999] = -b[99, 999]
    report = compare_tensors("t", a, b, Options())
    assert (report.n_differ, report.first_index, report.max_abs) == (2, (3, 7), 2 * 99_999)


# --------------------------------------------------------------------------- metadata


def test_metadata_differences_explain_the_mismatch(pair, capsys):
    def other_world(c):
        env = dict(c["environment"], torch="9.9.9", num_threads=c["environment"]["num_threads"] + 1)
        seed_info = dict(c["seed_info"], seed=7, use_deterministic_algorithms=False)
        data = dict(c["data_fingerprint"], sha256="e" * 64, tiles_sha256="u" * 64)
        return dict(c, environment=env, seed_info=seed_info, data_fingerprint=data)

    a, b = pair(other_world)
    result = compare_paths(a, b)
    text = "\n".join(result.explanations)
    for expected in ("another seed: A 42, B 7", "other tiles", "another PyTorch version", "thread count",
                     "determinism off in B: seed_info.use_deterministic_algorithms=False"):
        assert expected in text
    assert "determinism off in A" not in text
    rows = {m.key: m for m in result.metadata}
    assert (rows["environment.torch"].b, rows["environment.torch"].equal) == ("9.9.9", False)
    assert rows["seed_info.deterministic"].equal
    cli(a, b)
    out = capsys.readouterr().out
    assert "what can explain the difference:" in out and "9.9.9" in out


def _other_machine(c):
    """The same training result as written on another machine: only the environment differs."""
    env = dict(c["environment"], torch="9.9.9", cpu="Another CPU", num_threads=c["environment"]["num_threads"] + 1)
    del env["blas"]
    return dict(c, environment=env, seed_info=dict(c["seed_info"], cuda_available=True, cuda_device_count=8))


def test_environment_alone_differing_is_identical_content_and_listed(pair, capsys):
    a, b = pair(_other_machine)
    result = compare_paths(a, b)
    assert result.verdict == IDENTICAL_CONTENT and result.match
    assert {d.path for d in result.environment_diffs} == {
        "environment.torch", "environment.cpu", "environment.num_threads", "environment.blas",
        "seed_info.cuda_available", "seed_info.cuda_device_count"}
    assert not result.value_diffs and not result.only_in_a and not result.only_in_b
    assert cli(a, b) == 0
    out = capsys.readouterr().out
    assert out.startswith("verdict: IDENTICAL CONTENT") and "6 environment fields differ" in out
    assert "the environment differs, but every tensor and value is bit-identical:" in out
    assert "9.9.9" in out and "Another CPU" in out
    assert cli(a, b, "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == IDENTICAL_CONTENT and len(data["environment_diffs"]) == 6


def test_environment_difference_does_not_hide_a_real_difference(pair, capsys):
    def other_machine_one_ulp(c):
        c = _other_machine(c)
        return dict(c, model_state_dict={**c["model_state_dict"], "0.bias": one_ulp_up(c["model_state_dict"]["0.bias"], 0)})

    a, b = pair(other_machine_one_ulp)
    result = compare_paths(a, b)
    assert result.verdict == DIFFERENT and not result.match
    assert [t.path for t in result.tensor_diffs] == ["model_state_dict.0.bias"]
    assert any("another PyTorch version" in e for e in result.explanations)
    assert cli(a, b) == 1
    out = capsys.readouterr().out
    assert "what can explain the difference:" in out and "bit-identical:" not in out


def test_a_changed_run_setting_beside_the_environment_is_still_different(pair):
    a, b = pair(lambda c: dict(_other_machine(c), seed_info=dict(_other_machine(c)["seed_info"], deterministic=False)))
    result = compare_paths(a, b)
    assert result.verdict == DIFFERENT
    assert [v.path for v in result.value_diffs] == ["seed_info.deterministic"]


def test_json_output_is_complete(pair, capsys):
    a, b = pair(lambda c: dict(c, model_state_dict={**c["model_state_dict"], "0.bias": one_ulp_up(c["model_state_dict"]["0.bias"], 0)}))
    assert cli(a, b, "--json") == 1
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"] == DIFFERENT and data["match"] is False
    assert len(data["tensors"]) == len(compare_paths(a, b).tensors)
    (changed,) = [t for t in data["tensors"] if t["n_differ"]]
    assert (changed["path"], changed["max_ulp"]) == ("model_state_dict.0.bias", 1)
    assert any(m["key"] == "seed_info.seed" for m in data["metadata"])


def test_thousands_of_differences_are_summarised(tmp_path):
    a = {f"layer{i}.weight": torch.full((3,), float(i)) for i in range(1200)}
    b = {k: v * 2 + 1 for k, v in a.items()}  # layer i differs by i + 1
    save_checkpoint(a, tmp_path / "a.pt")
    save_checkpoint(b, tmp_path / "b.pt")
    result = compare_paths(tmp_path / "a.pt", tmp_path / "b.pt")
    text = result.render_text()
    assert len(text.splitlines()) < 80
    assert "... and 1180 more" in text
    assert result.tensor_diffs[0].path == "layer1199.weight"  # largest first


# --------------------------------------------------------------------------- run directories


def write_run(root: Path, steps: list[int], diverge_at: int | None = None) -> Path:
    (root / "checkpoints").mkdir(parents=True)
    for step in steps:
        ckpt = make_checkpoint(step=1)
        ckpt["step"] = step
        if diverge_at is not None and step >= diverge_at:
            sd = dict(ckpt["model_state_dict"])
            sd["0.weight"] = one_ulp_up(sd["0.weight"], (0, 0, 0, 0))
            ckpt["model_state_dict"] = sd
        save_checkpoint(ckpt, root / "checkpoints" / f"checkpoint_step_{step}.pt")
    (root / "checkpoints" / "latest").write_text(f"checkpoint_step_{steps[-1]}.pt\n")
    return root


def test_run_directories_report_the_first_diverging_step(tmp_path, capsys):
    a = write_run(tmp_path / "a", [10, 20, 30, 40])
    b = write_run(tmp_path / "b", [10, 20, 30], diverge_at=20)
    c = write_run(tmp_path / "c", [10, 20, 30])
    result = compare_paths(a, b)
    assert result.first_diverging_step == 20
    assert result.steps == [(10, IDENTICAL_BYTES), (20, DIFFERENT), (30, DIFFERENT)]
    assert result.only_in_a == [40]
    assert [t.path for t in result.detail.tensor_diffs] == ["model_state_dict.0.weight"]
    assert cli(a, b) == 1
    out = capsys.readouterr().out
    assert "first diverging step: 20" in out and "at step 20:" in out
    assert json.loads(to_json(result))["first_diverging_step"] == 20
    assert cli(a, c) == 0
    assert "every shared step matches" in capsys.readouterr().out


def test_run_directories_without_shared_steps_or_mixed_arguments(tmp_path, capsys):
    a = write_run(tmp_path / "a", [10])
    b = write_run(tmp_path / "b", [20])
    assert cli(a, b) == 2
    assert cli(a, a / "checkpoints" / "checkpoint_step_10.pt") == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no checkpoint step in common" in err[0] and "not one of each" in err[1]


# --------------------------------------------------------------------------- bad files


class _Payload:
    """Unpickling this writes the marker file: proof that a payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def _bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    files = {name: tmp_path / f"{name}.pt" for name in ("empty", "truncated", "text", "zip_of_other", "malicious")}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["text"].write_text("model_state_dict: not really\n")
    with zipfile.ZipFile(files["zip_of_other"], "w") as z:
        z.writestr("hello.txt", "hi")
    torch.save({"model_state_dict": _Payload(tmp_path / "MARKER")}, files["malicious"])
    files["missing"] = tmp_path / "missing.pt"
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "text", "zip_of_other", "malicious"])
def test_bad_files_exit_2_with_one_line(tmp_path, pair, capsys, kind):
    good, _ = pair()
    bad = _bad_files(tmp_path, good)[kind]
    for args in ((good, bad), (bad, good)):
        assert cli(*args) == 2
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"axs: error: {bad}"), captured.err
        assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "MARKER").exists()
    if kind == "malicious":
        assert "--trust" in lines[0]


def test_malicious_payload_runs_only_with_trust(tmp_path, pair):
    good, _ = pair()
    bad = _bad_files(tmp_path, good)["malicious"]
    marker = tmp_path / "MARKER"
    assert cli(good, bad) == 2 and not marker.exists()
    tool = [sys.executable, str(REPO / "tools" / "compare_checkpoints.py"), str(good), str(bad), "--trust"]
    trusted = subprocess.run(tool, capture_output=True, text=True, cwd=tmp_path)
    assert trusted.returncode == 1, trusted.stderr  # loaded, so it ran, and it differs
    assert marker.read_text() == "ran"


def _flip_a_bit_of(path, tensor) -> None:
    """Damage ``path`` on disk as a bad sector would: one bit inside ``tensor``'s bytes, still loadable."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x01
    path.write_bytes(bytes(data))


def _named_as_damaged(a, b, capsys) -> None:
    assert cli(a, b) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"axs: error: {b}: checksum mismatch") and len(err.splitlines()) == 1


def test_damaged_file_with_the_same_checksum_is_named(tmp_path, pair, capsys):
    a, b = pair()
    _flip_a_bit_of(b, make_checkpoint()["model_state_dict"]["0.weight"])
    _named_as_damaged(a, b, capsys)


def test_a_damaged_file_is_named_also_when_the_checkpoints_differ_anyway(tmp_path, pair, capsys):
    """Another seed's checkpoint differs everywhere; if it is also damaged on disk, that is what compare
    says first, not "nondeterminism" blamed on the training."""
    def other_weights(c):
        c["model_state_dict"] = {k: v + 1 for k, v in c["model_state_dict"].items()}
        return c

    a, b = pair(other_weights)
    assert cli(a, b) == 1  # different, and both intact: the usual verdict
    capsys.readouterr()
    _flip_a_bit_of(b, make_checkpoint()["model_state_dict"]["0.weight"] + 1)
    _named_as_damaged(a, b, capsys)


# --------------------------------------------------------------------------- the guide's command


def test_guide_command_works_as_written(tmp_path, base, capsys):
    for run in ("test1", "test2"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        save_checkpoint(base, tmp_path / run / "checkpoints" / "checkpoint_step_100.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "compare_checkpoints.py"),
         "test1/checkpoints/checkpoint_step_100.pt", "test2/checkpoints/checkpoint_step_100.pt"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("verdict: IDENTICAL BYTES")
    assert cli("--help") == 0
    helped = capsys.readouterr().out
    assert "examples:" in helped and "--ignore" in helped



def test_integer_complex_and_bool_tensors_are_compared_exactly():
    big = compare_tensors("i", torch.tensor([2**62, 5]), torch.tensor([2**62 + 1, 5]), Options(atol=10.0))
    assert (big.max_abs, big.n_outside, big.max_ulp) == (1.0, 1, None)  # exact beyond 2**53, never tolerated
    cplx = compare_tensors("c", torch.tensor([1 + 2j, 3 + 0j, 5j]), torch.tensor([1 + 2j, 4 + 0j, 5j]), Options())
    assert (cplx.n_differ, cplx.first_index, cplx.max_abs) == (1, (1,), 1.0)
    flags = compare_tensors("b", torch.tensor([True, False]), torch.tensor([True, True]), Options())
    assert (flags.n_differ, flags.first_index) == (1, (1,))


def test_compare_puts_the_likely_cause_first_and_names_config_differences_without_shared_steps(synth_tiles, tmp_path, capsys):
    from conftest import train_in_process

    def run(name: str, *extra: str) -> Path:
        out = tmp_path / name
        train_in_process(["--data-dir", str(synth_tiles), "--output-dir", str(out), "--width", "4", "--no-plots",
                          "--quiet", "--no-tensorboard", *extra])
        return out

    a = run("a", "--seed", "1", "--steps", "2", "--checkpoint-every", "2")
    other_seed = run("b", "--seed", "2", "--steps", "2", "--checkpoint-every", "2")
    other_steps = run("c", "--seed", "1", "--steps", "3", "--checkpoint-every", "3")
    capsys.readouterr()
    assert cli(a, other_seed) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("verdict: DIFFERENT") and lines[1].startswith("likely cause: another seed: A 1, B 2")
    assert cli(a, other_steps) == 2
    err = capsys.readouterr().err
    assert "no checkpoint step in common" in err and "their configs differ: steps 2 vs 3, checkpoint_every 2 vs 3" in err


def test_a_latest_pointer_is_compared_as_the_checkpoint_it_names_and_inspected_as_it(pair, capsys):
    from axs_lib.checkpoint import write_latest

    a, b = pair()
    write_latest(b.parent, b.name)
    result = compare_paths(a, b.parent / "latest")
    assert result.verdict == IDENTICAL_BYTES
    assert main(["inspect", str(b.parent / "latest"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["path"] == str(b)


def test_run_directories_called_latest_are_compared_as_directories(tmp_path):
    """Only a small file is a pointer: a directory named latest stays a directory."""
    a, b = tmp_path / "latest", tmp_path / "other"
    a.mkdir(), b.mkdir()
    from axs_lib.errors import AxsError

    with pytest.raises(AxsError, match="no checkpoint step in common"):
        compare_paths(a, b)
