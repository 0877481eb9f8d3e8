"""Kill harness: SIGKILL a training run at random moments, resume it each time, demand the same bits.

A test tool, not part of the installed package: it lives beside the repository's tests and drives
``scripts/train_stage1.py`` (the ``axs_lib`` next to it) in subprocesses.
``python tools/killtest.py --kills 20 --seed 1234`` does this:

1. trains an uninterrupted *reference* run of the Stage-1 trainer on the real demo tiles (small
   model, 2 DataLoader workers, a checkpoint every 2 steps, validation every 4), in a subprocess
   (or takes one trained already with `train_argv`: ``run_harness(..., reference=PATH)``, as the
   tests do);
2. starts the same run again and kills it ``--kills`` times. Each kill is one of

   * ``write``: the run is started with ``AXS_FAULT=kill:checkpoint_step_<k>.pt``, so it SIGKILLs
     itself in the middle of writing that checkpoint (temp file half written, not yet renamed);
   * ``clock``: once the run has logged a training step past the one it resumed from, wait a random
     delay and SIGKILL its whole process group (main process and DataLoader workers). The moment
     lands wherever it lands: in a step, in validation, in a checkpoint or ``best.pt`` write;
   * ``term``: the same moment, but SIGTERM to the whole process group, as Slurm, systemd and
     ``timeout`` send it: the run must checkpoint at the step it is in and exit 143. That extra
     checkpoint (at a step the reference has none) is checked to load, and left out of the
     final comparison.

   After every kill the harness checks what a crash may leave behind: every checkpoint file
   loads with a valid checksum, every ``checkpoint_step_<N>.pt`` present is byte-identical to the
   reference's, and the ``latest`` pointer names a complete file. Then it resumes with
   ``--resume auto``;
3. after the last kill, lets the run finish and requires every checkpoint file (sha256),
   ``metrics.jsonl`` and ``metrics.csv`` to be byte-identical to the reference's.

The plan (kind of each kill, its target and delay) is a pure function of ``--seed`` and is printed
first, so a failure is replayed with the same command. Wall-clock kills land at slightly different
instants on every replay; ``write`` kills land on exactly the same byte.

The runs use one intra-op thread (``OMP_NUM_THREADS=1`` unless set): on a loaded machine several
processes each spinning a thread per core slow training down five-fold, and the reference and
the killed run use the same setting, so the comparison is fair.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the axs_lib beside this script, not another install

from axs_lib.checkpoint import load_checkpoint, read_latest  # noqa: E402
from axs_lib.errors import CheckpointError  # noqa: E402
from axs_lib.run_dir import CHECKPOINTS, METRICS, METRICS_CSV, checkpoint_name, step_of  # noqa: E402

ROOT_SEED_MAX = 2**32 - 1
MAX_DELAY_S = 0.6  # a few steps of this small model: lands in steps, validation and writes alike
TRAIN_SCRIPT = [sys.executable, str(ROOT / "scripts" / "train_stage1.py")]  # the trainer beside this harness
REPLAY = "python tools/killtest.py"


@dataclass(frozen=True)
class Kill:
    """One planned kill. ``offset`` is in checkpoints (write) or steps (clock) past the resume point."""

    kind: str  # "write", "clock" or "term"
    offset: int
    delay: float  # seconds after the target step was logged (clock kills)

    def describe(self) -> str:
        if self.kind == "write":
            return f"write: die inside the write of the checkpoint {self.offset} after the resume point"
        signal_name = "SIGTERM" if self.kind == "term" else "SIGKILL"
        return f"{self.kind}: {signal_name} to the group {self.delay:.2f} s after step +{self.offset} is logged"


@dataclass
class Event:
    index: int
    kill: Kill
    resumed_from: int
    target: str
    made: bool = False
    survived: bool = False
    problems: list[str] = field(default_factory=list)
    latest_after: str | None = None


@dataclass
class Result:
    seed: int
    kills_planned: int
    steps: int
    events: list[Event] = field(default_factory=list)
    identical: bool = False
    mismatches: list[str] = field(default_factory=list)
    files_compared: int = 0
    wall_s: float = 0.0
    error: str | None = None

    @property
    def kills_made(self) -> int:
        return sum(e.made for e in self.events)

    @property
    def kills_survived(self) -> int:
        return sum(e.survived for e in self.events)

    @property
    def ok(self) -> bool:
        return (self.error is None and self.identical and self.kills_made == self.kills_planned
                and self.kills_survived == self.kills_made)

    def summary(self) -> str:
        verdict = "byte-identical" if self.identical else "NOT byte-identical"
        line = (f"kill harness seed {self.seed}: kills survived {self.kills_survived} / kills made {self.kills_made} "
                f"(planned {self.kills_planned}); {self.files_compared} files {verdict} to the uninterrupted run; "
                f"{self.wall_s:.0f} s")
        if self.mismatches:
            line += "; differ: " + ", ".join(self.mismatches[:8])
        if self.error:
            line += f"; error: {self.error}"
        return line


def plan(seed: int, kills: int, write_share: float = 0.4, term_share: float = 0.2) -> list[Kill]:
    """The kills for ``seed``: a pure function of its arguments, at least one write and one clock
    kill when kills >= 2."""
    rng = random.Random(seed)
    out = []
    for _ in range(kills):
        draw = rng.random()
        kind = "write" if draw < write_share else "term" if draw < write_share + term_share else "clock"
        offset = rng.randint(1, 2)
        delay = round(rng.uniform(0.0, MAX_DELAY_S), 3)
        out.append(Kill(kind, offset, delay))
    kinds = {k.kind for k in out}
    if kills >= 2 and not {"write", "clock"} <= kinds:  # at least one write and one clock kill
        missing = "write" if "write" not in kinds else "clock"
        i = next((j for j, k in enumerate(out) if k.kind != ("clock" if missing == "write" else "write")), rng.randrange(kills))
        if sum(k.kind == out[i].kind for k in out) == 1:  # do not take away the only one of another kind
            i = next(j for j, k in enumerate(out) if sum(m.kind == k.kind for m in out) > 1)
        out[i] = Kill(missing, out[i].offset, out[i].delay)
    return out


def default_steps(kills: int) -> int:
    """Enough steps that every planned kill finds the run still going (each kill advances <= ~2 steps)."""
    return max(12, 2 * kills + 4)


def train_argv(data_dir: Path, out: Path, steps: int, *extra: str, num_workers: int = 2,
               checkpoint_every: int = 2, seed: int = 42) -> list[str]:
    return [
        "--data-dir", str(data_dir), "--output-dir", str(out), "--seed", str(seed), "--steps", str(steps),
        "--batch-size", "3", "--width", "8", "--checkpoint-every", str(checkpoint_every), "--val-every", "4",
        "--log-every", "1", "--no-plots", "--quiet", "--num-workers", str(num_workers), *extra,
    ]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("AXS_FAULT", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def spawn(argv: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start the trainer in its own session (so killpg reaches its DataLoader workers)."""
    log = open(log_path, "ab")
    try:
        return subprocess.Popen([*TRAIN_SCRIPT, *argv], env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()


@contextlib.contextmanager
def running(argv: Sequence[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """`spawn`, and SIGKILL the run's group if the block is left while it still runs (a timeout, an
    interrupted harness): in its own session, a Ctrl-C or a test timeout would not reach it."""
    proc = spawn(argv, env, log_path)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group and reap the main process."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    # give orphaned workers (same group) a moment; they were sent SIGKILL too
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_shas(run: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted((run / CHECKPOINTS).glob("*.pt"))}


def resume_point(run: Path) -> int:
    """The step ``--resume auto`` will continue from: the one the latest pointer names (0 if none)."""
    try:
        latest = read_latest(run / CHECKPOINTS)
    except CheckpointError:
        return 0
    return (step_of(latest.name) or 0) if latest is not None else 0


def logged_train_steps(metrics: Path) -> list[int]:
    steps = []
    try:
        text = metrics.read_text()
    except FileNotFoundError:
        return steps
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split") == "train":
            steps.append(int(record["step"]))
    return steps


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def check_after_kill(run: Path, reference: dict[str, str], interrupts: set[str] | None = None) -> tuple[list[str], str | None]:
    """What a crash may not leave behind: a damaged checkpoint, a step file unlike the reference's,
    a latest pointer on a missing or damaged file. Returns (problems, latest name).

    After a SIGTERM the run has written a checkpoint at the step it stopped in; the reference has
    no file of that name, so a step file that is absent from the reference is compared only when it
    is not such an interrupt checkpoint (it must still load)."""
    interrupts = interrupts or set()
    latest_path = None
    with contextlib.suppress(CheckpointError):
        latest_path = read_latest(run / CHECKPOINTS)
    problems = []
    ckpts = run / CHECKPOINTS
    for path in sorted(ckpts.glob("*.pt")) if ckpts.is_dir() else []:
        try:
            load_checkpoint(path)
        except CheckpointError as exc:
            problems.append(f"damaged after kill: {exc}")
            continue
        interrupt = path.name not in reference and (path.name in interrupts or (latest_path is not None and path.name == latest_path.name))
        if step_of(path.name) is not None and not interrupt and sha256(path) != reference.get(path.name):
            problems.append(f"{path.name} differs from the reference's")
    latest_name = None
    try:
        latest = read_latest(ckpts)
    except CheckpointError as exc:
        problems.append(f"latest pointer: {exc}")
        latest = None
    if latest is not None:
        latest_name = latest.name
        if not latest.exists():
            problems.append(f"latest names {latest.name}, which does not exist")
    return problems, latest_name


def make_reference(data_dir: os.PathLike | str, out: os.PathLike | str, steps: int, *, num_workers: int = 2,
                   timeout: float = 600.0) -> int:
    """Train the uninterrupted run the killed one must match (log beside it, ``<out>.log``); its exit code."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with running(train_argv(Path(data_dir), out, steps, num_workers=num_workers), child_env(), out.with_suffix(".log")) as proc:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1


def run_harness(
    data_dir: os.PathLike | str,
    workdir: os.PathLike | str,
    *,
    kills: int,
    seed: int,
    steps: int | None = None,
    num_workers: int = 2,
    reference: os.PathLike | str | None = None,
    resume_args: Sequence[str] = (),
    log: Callable[[str], None] = print,
    segment_timeout: float = 300.0,
) -> Result:
    """Run the kill harness; see the module docstring. ``resume_args`` are added to every resume
    (the self-test passes ``--seed 43 --force-resume`` to prove a real difference is reported)."""
    started = time.monotonic()
    data_dir, workdir = Path(data_dir), Path(workdir)
    steps = steps or default_steps(kills)
    kill_plan = plan(seed, kills)
    result = Result(seed=seed, kills_planned=kills, steps=steps)
    log(f"kill harness: seed {seed}, {kills} kills, {steps} steps, {num_workers} workers "
        f"(replay: {REPLAY} --kills {kills} --seed {seed} --steps {steps})")
    for i, k in enumerate(kill_plan, 1):
        log(f"  kill {i}: {k.describe()}")
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env()

    # ------------------------------------------------------------------ the uninterrupted run
    if reference is None:
        reference = workdir / "reference"
        code = make_reference(data_dir, reference, steps, num_workers=num_workers, timeout=segment_timeout * 2)
        if code != 0:
            result.error = f"reference run failed with exit {code}; see {reference}.log"
            result.wall_s = time.monotonic() - started
            return result
    reference = Path(reference)
    ref_shas = checkpoint_shas(reference)
    log(f"reference: {len(ref_shas)} checkpoint files in {reference}")

    # ------------------------------------------------------------------ kills
    run = workdir / "killed"
    run_log = workdir / "killed.log"
    first = True
    interrupts: set[str] = set()  # checkpoints written on SIGTERM, at steps the reference has none
    for index, kill in enumerate(kill_plan, 1):
        s0 = resume_point(run)
        argv = train_argv(data_dir, run, steps, num_workers=num_workers)
        if not first:
            argv += ["--resume", "auto", *resume_args]
        first = False
        metrics = run / METRICS
        inode_before = _inode(metrics)
        remaining = steps - s0
        if kill.kind in ("clock", "term") and remaining < kill.offset + 6:
            kill = Kill("write", 1, kill.delay)  # too near the end for a clock kill to land surely
        if kill.kind == "write":
            ckpt_every = 2
            target_step = min(steps, (s0 // ckpt_every + kill.offset) * ckpt_every)
            target = checkpoint_name(target_step)
            seg_env = {**env, "AXS_FAULT": f"kill:{target}"}
        else:
            target_step = min(steps - 1, s0 + kill.offset)
            target = f"step {target_step} + {kill.delay:.2f} s"
            seg_env = env
        event = Event(index, kill, s0, target)
        result.events.append(event)
        with open(run_log, "a") as f:
            f.write(f"--- kill {index}: {kill.kind} at {target}, resuming from step {s0}\n")
        with running(argv, seg_env, run_log) as proc:
            try:
                if kill.kind == "write":
                    proc.wait(timeout=segment_timeout)
                    event.made = proc.returncode == -signal.SIGKILL
                    kill_group(proc)  # the workers of a process that killed itself
                else:
                    signum = signal.SIGTERM if kill.kind == "term" else signal.SIGKILL
                    event.made = _clock_kill(proc, metrics, inode_before, target_step, kill.delay, segment_timeout, signum)
            except subprocess.TimeoutExpired:
                event.problems.append(f"segment did not reach its target within {segment_timeout:.0f} s")
        if not event.made:
            event.problems.append(f"run was not killed (exit {proc.returncode}); see {run_log}")
            log(f"kill {index}: NOT MADE ({kill.kind} at {target}): {'; '.join(event.problems)}")
            result.error = f"kill {index} could not be made"
            break
        problems, event.latest_after = check_after_kill(run, ref_shas if not resume_args else {}, interrupts)
        if kill.kind == "term" and event.latest_after:
            interrupts.add(event.latest_after)  # the checkpoint the run wrote at the step it stopped in
        if resume_args:  # self-test: the bits are meant to differ, only check that files are sound
            problems = [p for p in problems if "differs from the reference" not in p]
        event.problems += problems
        event.survived = not problems
        log(f"kill {index}: {kill.kind} at {target} (resumed from step {s0}); latest -> {event.latest_after}; "
            + ("ok" if event.survived else "PROBLEMS: " + "; ".join(problems)))

    # ------------------------------------------------------------------ finish and compare
    if result.error is None:
        final = train_argv(data_dir, run, steps, num_workers=num_workers) + ["--resume", "auto", *resume_args]
        with running(final, env, run_log) as proc:
            try:
                code = proc.wait(timeout=segment_timeout * 2)
            except subprocess.TimeoutExpired:
                code = None
        if code != 0:
            result.error = f"final resume exited with {code}; see {run_log}"
            if result.events:  # the last kill was not survived: its resume failed
                result.events[-1].survived = False
        else:
            run_shas = {n: h for n, h in checkpoint_shas(run).items() if n not in interrupts or n in ref_shas}
            names = sorted(set(ref_shas) | set(run_shas))
            result.mismatches = [n for n in names if ref_shas.get(n) != run_shas.get(n)]
            # the record and its table, each cut back at every resume (a reference of an earlier version has no table)
            logs = [n for n in (METRICS, METRICS_CSV) if (reference / n).is_file()]
            result.mismatches += [n for n in logs if not (run / n).is_file() or sha256(reference / n) != sha256(run / n)]
            leftovers = sorted(p.name for p in (run / CHECKPOINTS).glob(".*.tmp"))
            result.mismatches += [f"{n} (temp file left)" for n in leftovers]
            result.files_compared = len(names) + len(logs)
            result.identical = not result.mismatches
    result.wall_s = time.monotonic() - started
    log(result.summary())
    return result


def _clock_kill(proc: subprocess.Popen, metrics: Path, inode_before: int | None, target_step: int,
                delay: float, timeout: float, signum: int = signal.SIGKILL) -> bool:
    """Wait until this segment has logged ``target_step``, sleep ``delay``, signal the group.

    SIGKILL: made when the process died of it. SIGTERM: made when the run exited 143 (it
    checkpointed at the step it was in); the group is then reaped.

    The metrics log is rewritten (new inode) when a run starts or resumes, so lines left by the
    previous segment are not mistaken for progress of this one."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        inode = _inode(metrics)
        if inode is not None and inode != inode_before and any(s >= target_step for s in logged_train_steps(metrics)):
            break
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    if signum == signal.SIGTERM:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return False
        code = proc.returncode
        kill_group(proc)
        return code == 143
    kill_group(proc)
    return proc.returncode == -signal.SIGKILL


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=REPLAY,
        description="SIGKILL a Stage-1 run at random moments (some inside checkpoint writes), resume it each "
                    "time with --resume auto, and require its checkpoints to be byte-identical to an "
                    "uninterrupted run's. Exit 0 when every kill was survived, 1 otherwise.",
    )
    p.add_argument("--kills", type=int, default=5, help="number of kills (default 5; the soak uses 20)")
    p.add_argument("--seed", type=int, default=None, help="seed of the kill plan (default: random, printed)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default max(12, 2 * kills + 4))")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument("--data-dir", default=None, help="tiles (default: the six real demo tiles, written to a temp dir)")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temp dir, kept on failure)")
    args = p.parse_args(argv)
    if args.kills < 1:
        p.error("--kills must be >= 1")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(ROOT_SEED_MAX + 1)
    if not 0 <= seed <= ROOT_SEED_MAX:
        p.error(f"--seed must be in [0, {ROOT_SEED_MAX}]")
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="axs-killtest-"))
    data_dir = Path(args.data_dir) if args.data_dir else workdir / "tiles"
    if args.data_dir is None:
        from axs_lib.ingest import write_demo_tiles

        write_demo_tiles(data_dir)
    result = run_harness(data_dir, workdir, kills=args.kills, seed=seed, steps=args.steps, num_workers=args.num_workers)
    if result.ok and own_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not result.ok:
        print(f"runs and logs kept in {workdir}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
