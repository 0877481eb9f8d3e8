"""Kill harness (tools/killtest.py): SIGKILL at random moments, resume, demand byte-identical checkpoints.

``make test`` checks the harness itself, cheaply (against the shared reference run, so no
reference is trained here): its plan is a pure function of the seed, and it can fail: a resume
that changes the seed (with --force-resume) must be reported as not byte-identical. ``make soak``
(``pytest -m slow``) runs it for real: one write kill, 5 kills through the command line as a user
replays them, and 20 kills, with a fresh random seed each time (printed; set AXS_KILLTEST_SEED to
replay one). The single kill scenarios that ``make test`` must always
cover (SIGKILL mid-epoch with workers, inside a checkpoint write, SIGTERM) are in test_train.py.
"""

from __future__ import annotations

import os
import random

import pytest

import killtest
from conftest import REFERENCE_STEPS

CI_KILLS = 5
SOAK_KILLS = 20


def _seed() -> int:
    env = os.environ.get("AXS_KILLTEST_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


def test_plan_is_a_pure_function_of_the_seed_with_both_kinds():
    for seed in range(50):
        plan = killtest.plan(seed, 5)
        assert plan == killtest.plan(seed, 5)
        assert {"write", "clock"} <= {k.kind for k in plan} <= {"write", "clock", "term"}
        assert all(k.offset in (1, 2) and 0 <= k.delay <= killtest.MAX_DELAY_S for k in plan)
    assert killtest.plan(1, 5) != killtest.plan(2, 5)
    assert killtest.default_steps(SOAK_KILLS) >= 2 * SOAK_KILLS


def _write_kill_seed() -> int:
    """A plan seed whose single kill is a ``write`` kill: it lands on the same byte on every machine."""
    return next(s for s in range(100) if killtest.plan(s, 1)[0].kind == "write")


@pytest.mark.slow
def test_harness_passes_a_run_killed_inside_a_checkpoint_write(stage1_reference, demo_tiles, tmp_path):
    lines = []
    result = killtest.run_harness(demo_tiles, tmp_path, kills=1, seed=_write_kill_seed(), steps=REFERENCE_STEPS,
                                  reference=stage1_reference, log=lines.append)
    report = "\n".join(lines)
    assert result.ok, report
    assert result.kills_made == result.kills_survived == 1, report
    assert result.files_compared == len(list((stage1_reference / "checkpoints").glob("*.pt"))) + 2, report  # + both logs
    assert "files byte-identical" in result.summary()


@pytest.mark.slow  # the harness's self-test runs where the harness does: in make soak, before its kills
def test_harness_reports_a_resume_with_another_seed_as_different(stage1_reference, demo_tiles, tmp_path):
    """The harness can fail: resuming with --seed 43 --force-resume must not pass as identical."""
    lines = []
    result = killtest.run_harness(demo_tiles, tmp_path, kills=1, seed=_write_kill_seed(), steps=REFERENCE_STEPS,
                                  reference=stage1_reference,
                                  log=lines.append, resume_args=["--seed", "43", "--force-resume"])
    report = "\n".join(lines)
    assert result.kills_made == 1, report
    assert not result.identical and not result.ok, report
    assert f"checkpoint_step_{REFERENCE_STEPS}.pt" in result.mismatches, report
    assert "NOT byte-identical" in result.summary()


@pytest.mark.slow
def test_kills_in_ci_mode_change_no_bit(demo_tiles, tmp_path, capsys):
    """Through the command line, as a user replays it: ``python tools/killtest.py --kills N --seed S``."""
    seed = _seed()
    code = killtest.main(["--kills", str(CI_KILLS), "--seed", str(seed), "--data-dir", str(demo_tiles),
                          "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out
    assert f"kill harness: seed {seed}, {CI_KILLS} kills" in out
    assert f"python tools/killtest.py --kills {CI_KILLS} --seed {seed}" in out
    assert f"kills survived {CI_KILLS} / kills made {CI_KILLS}" in out and "files byte-identical" in out
    assert "write at checkpoint_step_" in out and "clock at step" in out


@pytest.mark.slow
def test_kills_in_soak_mode_change_no_bit(demo_tiles, tmp_path):
    lines = []
    result = killtest.run_harness(demo_tiles, tmp_path, kills=SOAK_KILLS, seed=_seed(), log=lines.append)
    report = "\n".join(lines)
    print(report)
    assert result.ok, report
    assert result.kills_made == result.kills_survived == SOAK_KILLS
