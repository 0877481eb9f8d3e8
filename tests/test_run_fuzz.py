"""Property tests: whatever a ``run.json`` or a checkpoint (with a valid checksum) holds, ``axs runs``
and the trainer's resume checks give a row, a list of differences or one of our errors: never
another exception. Fixed seed and a bounded number of examples, as in test_parsers_fuzz.py."""

from __future__ import annotations

import argparse
import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from axs_lib.errors import AxsError
from axs_lib.stage1.config import TrainConfig, build_config

FUZZ = settings(derandomize=True, max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_json = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                     max_leaves=8)
# run.json: the fields `axs runs` reads, each holding any JSON value (often the right type, often not)
_manifest = st.fixed_dictionaries({}, optional={
    "seed": _json, "status": st.one_of(st.sampled_from(["running", "completed"]), _json), "final_step": _json,
    "config": st.one_of(st.fixed_dictionaries({"seed": _json}), _json),
    "best": st.one_of(st.fixed_dictionaries({}, optional={"metric": _json, "value": _json, "step": _json}), _json),
    "data_fingerprint": st.one_of(st.fixed_dictionaries({"sha256": _json}), _json),
    "environment": st.one_of(st.fixed_dictionaries({}, optional={"torch": _json, "cpu": _json, "gpus": _json,
                                                                 "fingerprint": _json}), _json),
})


@FUZZ
@given(manifests=st.lists(_manifest, min_size=1, max_size=3))
def test_runs_on_any_run_json_gives_rows_or_one_of_our_errors(tmp_path_factory, manifests):
    from axs_lib.commands import runs

    root = tmp_path_factory.mktemp("runs")
    paths = []
    for i, manifest in enumerate(manifests):
        (root / f"r{i}").mkdir()
        text = json.dumps(manifest, allow_nan=True)
        (root / f"r{i}" / "run.json").write_text(text)
        paths.append(str(root / f"r{i}"))
    for as_json in (False, True):
        out = io.StringIO()
        try:
            with redirect_stdout(out):
                code = runs.run(argparse.Namespace(experiments=paths, json=as_json, trust=False))
        except AxsError as exc:
            assert "\n" not in str(exc)
        else:
            assert code == 0 and all(p in out.getvalue() for p in paths)


# A Stage-1 checkpoint's well-known keys, each replaced now and then by another value.
_counts = st.one_of(st.integers(min_value=0, max_value=20), st.integers(min_value=-5, max_value=2**70), st.booleans(),
                    st.floats(), st.text(max_size=4), st.none())
_values = st.one_of(_counts, _json, st.builds(lambda n: torch.ones(n), st.integers(0, 3)))


def _flat(keys: list[str]):
    return st.one_of(st.fixed_dictionaries({}, optional={k: _values for k in keys}), _values)


_crafted = st.fixed_dictionaries({}, optional={
    "format_version": st.one_of(st.just(2), _values), "step": _counts, "epoch": _counts, "world_size": _counts,
    "sampler_state": st.one_of(st.fixed_dictionaries({}, optional={"epoch": _counts, "position": _counts}), _values),
    "seed_info": _flat(["seed", "deterministic"]), "config": _flat(["lr", "width", "seed", "steps"]),
    "data_fingerprint": _flat(["scheme", "sha256", "num_tiles"]), "environment": _flat(["torch", "cpu"]),
    "metrics": _flat(["val_loss"]),
    "model_state_dict": st.one_of(st.just({}), _values), "optimizer_state_dict": st.one_of(st.just({}), _values),
    "scheduler_state_dict": st.one_of(st.just({}), _values), "early_stopping": st.one_of(st.just({}), _values),
})


@pytest.fixture(scope="module")
def config() -> TrainConfig:
    return build_config({"seed": 5, "steps": 4, "width": 4, "batch_size": 2})


@FUZZ
@given(ckpt=_crafted)
def test_the_trainers_resume_checks_refuse_any_crafted_checkpoint_with_one_line(config, ckpt):
    from axs_lib import run_dir
    from axs_lib.fingerprint.environment import diff_environments, environment_fingerprint
    from axs_lib.stage1 import train

    path = Path("crafted.pt")
    data_fp = {"scheme": "tiles-v2", "sha256": "d" * 64, "num_tiles": 6}
    try:  # the order of axs_lib.training.prepare
        run_dir.check_known_keys(ckpt, path)
        train.check_resume(ckpt, config, data_fp, 1)
        train._check_state_shapes(ckpt, path, config)
        train._check_sampler_position(ckpt, path, 5)
        list(diff_environments(ckpt.get("environment"), environment_fingerprint()))
    except AxsError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("crafted.pt: ") and len(message) < 1000
    else:  # accepted: then every value the resume goes on to use is a plain count
        state = ckpt["sampler_state"]
        assert all(type(state[k]) is int and 0 <= state[k] < 2**62 for k in ("epoch", "position"))
        assert not math.isnan(float(ckpt["step"]))


@FUZZ
@given(ckpt=_crafted, seed=st.integers(0, 9))
def test_the_toolkits_check_resume_lists_differences_for_any_checkpoint(ckpt, seed):
    """A loop of the user's own calls `CheckpointManager.check_resume` on whatever it loaded: a list of lines,
    each short, never an exception (no `check_known_keys` first)."""
    from axs_lib.run_dir import check_resume

    problems = check_resume(ckpt, seed=seed, config={"lr": 0.1, "width": 4, "layers": [4, 8]},
                            data_fingerprint={"scheme": "tiles-v2", "sha256": "d" * 64, "num_tiles": 6}, world_size=1)
    assert isinstance(problems, list) and all(isinstance(p, str) and "\n" not in p and len(p) < 600 for p in problems)
