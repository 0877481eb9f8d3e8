"""The Stage-1 config: flags, config files (JSON, TOML, YAML), --print-config round trip, refusals.

Everything runs in-process through `axs_lib.cli.main` with ``--print-config``, which builds and
checks the config exactly as a training run does and then exits before touching any tiles.
"""

from __future__ import annotations

import json

import pytest
import yaml

from axs_lib.cli import main
from axs_lib.stage1.config import (
    DEFAULT_SPLIT_SEED,
    MAX_CONFIG_BYTES,
    MAXIMA,
    TrainConfig,
    build_config,
    config_text,
    config_warnings,
    diff_result_fields,
    read_config_file,
    write_config_file,
)
from axs_lib.errors import InputError, UsageError

TRAIN = ["train", "stage1"]


def print_config(capsys, *flags: str) -> tuple[int, str, str]:
    code = main([*TRAIN, *flags, "--print-config"])
    out, err = capsys.readouterr()
    return code, out, err


def parsed(text: str) -> dict:
    return yaml.safe_load(text)


# --------------------------------------------------------------------------- new fields


def test_new_options_are_fields_of_the_config_with_their_defaults():
    config = TrainConfig()
    assert config.split_seed == DEFAULT_SPLIT_SEED
    assert (config.keep_last, config.keep_best, config.checkpoint_mode) == (None, True, "sync")
    assert (config.precision, config.on_nonfinite) == ("32", "stop")


def test_precision_split_seed_and_nonfinite_policy_are_result_fields_and_retention_is_not():
    result = TrainConfig().result_fields()
    assert {"split_seed", "precision", "on_nonfinite"} <= set(result)
    assert not {"keep_last", "keep_best", "checkpoint_mode", "output_dir", "num_workers"} & set(result)


def test_split_seed_does_not_follow_seed(capsys):
    _, out_a, _ = print_config(capsys, "--seed", "1")
    _, out_b, _ = print_config(capsys, "--seed", "2")
    assert parsed(out_a)["split_seed"] == parsed(out_b)["split_seed"] == DEFAULT_SPLIT_SEED
    _, out_c, _ = print_config(capsys, "--seed", "1", "--split-seed", "9")
    assert parsed(out_c)["split_seed"] == 9


@pytest.mark.parametrize("flags,key,value", [
    (["--keep-last", "3"], "keep_last", 3),
    (["--no-keep-best"], "keep_best", False),
    (["--keep-best"], "keep_best", True),
    (["--checkpoint-mode", "async"], "checkpoint_mode", "async"),
    (["--precision", "bf16-mixed"], "precision", "bf16-mixed"),
    (["--on-nonfinite", "skip"], "on_nonfinite", "skip"),
    (["--log-every", "7"], "log_every", 7),
])
def test_each_new_flag_reaches_the_printed_config(capsys, flags, key, value):
    code, out, _ = print_config(capsys, *flags)
    assert code == 0
    assert parsed(out)[key] == value


def test_every_new_flag_is_described_in_help(capsys):
    assert main([*TRAIN, "--help"]) == 0
    text = capsys.readouterr().out
    for name in ("--split-seed", "--keep-last", "--keep-best", "--no-keep-best", "--checkpoint-mode", "--precision",
                 "--on-nonfinite", "--print-config", "--log-every"):
        assert name in text


# --------------------------------------------------------------------------- round trip


def test_print_config_fed_back_to_config_gives_the_same_config(capsys, tmp_path):
    flags = ["--seed", "7", "--steps", "300", "--lr", "1e-5", "--width", "8", "--keep-last", "2", "--precision",
             "bf16-mixed", "--no-augment", "--max-tiles", "12", "--data-dir", "somewhere", "--split-seed", "5"]
    code, first, _ = print_config(capsys, *flags)
    assert code == 0
    (tmp_path / "c.yaml").write_text(first)
    code, second, _ = print_config(capsys, "--config", str(tmp_path / "c.yaml"))
    assert code == 0
    assert second == first
    assert parsed(second)["lr"] == 1e-5 and parsed(second)["max_tiles"] == 12


def test_written_config_file_reads_back_to_the_same_config(tmp_path):
    config = build_config({"seed": 3, "lr": 2.5e-4, "keep_last": 4, "output_dir": "runs/x", "data_dir": "tiles"})
    path = write_config_file(config, tmp_path / "config.yaml")
    assert path.read_text() == config_text(config)
    assert build_config(read_config_file(path)) == config
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left


def test_config_is_written_only_as_yaml(tmp_path):
    with pytest.raises(ValueError, match="YAML"):
        write_config_file(TrainConfig(), tmp_path / "config.toml")


@pytest.mark.parametrize("name,text", [
    ("c.json", '{"lr": 0.01, "width": 8, "precision": "bf16-mixed"}'),
    ("c.toml", 'lr = 0.01\nwidth = 8\nprecision = "bf16-mixed"\n'),
    ("c.yaml", "lr: 0.01\nwidth: 8\nprecision: bf16-mixed\n"),
    ("c.yml", "lr: 1e-2\nwidth: 8\nprecision: bf16-mixed\n"),
])
def test_json_toml_and_yaml_files_give_the_same_values(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert read_config_file(tmp_path / name) == {"lr": 0.01, "width": 8, "precision": "bf16-mixed"}


def test_yaml_reads_exponent_floats_without_a_dot_as_numbers(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 3e-4\nweight_decay: 1E-5\n")
    assert read_config_file(tmp_path / "c.yaml") == {"lr": 3e-4, "weight_decay": 1e-5}


def test_precision_written_as_a_bare_number_means_32(tmp_path):
    (tmp_path / "c.toml").write_text("precision = 32\n")
    assert read_config_file(tmp_path / "c.toml") == {"precision": "32"}


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("flag_name,value", [
    ("--lr", "inf"), ("--lr", "nan"), ("--weight-decay", "inf"), ("--speckle-std", "inf"), ("--grad-clip", "-inf"),
    ("--dropout", "nan"), ("--val-fraction", "nan"), ("--l1-weight", "inf"), ("--ssim-weight", "nan"), ("--min-delta", "inf"),
])
def test_non_finite_hyperparameter_flags_are_refused_naming_the_flag(capsys, flag_name, value):
    code, out, err = print_config(capsys, f"{flag_name}={value}")  # "=" lets argparse take "-inf" as a value
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag_name in lines[0] and "finite" in lines[0]


@pytest.mark.parametrize("suffix,text", [
    (".json", '{"lr": Infinity}'), (".json", '{"weight_decay": NaN}'), (".toml", "speckle_std = inf\n"),
    (".toml", "lr = nan\n"), (".yaml", "lr: .inf\n"), (".yaml", "dropout: .nan\n"),
])
def test_non_finite_values_in_config_files_are_refused_naming_the_file(capsys, tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    code, out, err = print_config(capsys, "--config", str(path))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "must be a finite number" in lines[0]


@pytest.mark.parametrize("name", sorted(MAXIMA))
def test_sizes_above_their_documented_maximum_are_refused(capsys, name):
    flag_name = "--" + name.replace("_", "-")
    code, out, err = print_config(capsys, flag_name, str(MAXIMA[name] + 1))
    assert code == 2 and out == ""
    assert err.strip() == f"axs: error: {flag_name} must be at most {MAXIMA[name]}, got {MAXIMA[name] + 1}"
    code, _, _ = print_config(capsys, flag_name, str(MAXIMA[name]))
    assert code == 0


def test_absurd_width_in_a_config_file_is_refused_too(capsys, tmp_path):
    (tmp_path / "c.toml").write_text("width = 100000\n")
    code, _, err = print_config(capsys, "--config", str(tmp_path / "c.toml"))
    assert code == 2 and "--width must be at most 256, got 100000" in err


@pytest.mark.parametrize("flags,phrase", [
    (["--keep-last", "0"], "--keep-last must be a positive integer, got 0"),
    (["--split-seed", "-1"], "seed must be in"),
    (["--precision", "16"], "invalid choice: '16'"),
    (["--on-nonfinite", "ignore"], "invalid choice: 'ignore'"),
    (["--checkpoint-mode", "later"], "invalid choice: 'later'"),
])
def test_bad_values_of_new_flags_are_refused(capsys, flags, phrase):
    code, _, err = print_config(capsys, *flags)
    assert code == 2 and phrase in err


@pytest.mark.parametrize("name,text,phrase", [
    ("deep.json", "[" * 100_000, "nested too deeply"),
    ("deep.yaml", "[" * 100_000, "nested too deeply"),
    ("deep.toml", "a = " + "[" * 100_000, "nested too deeply"),
    ("nested.yaml", "lr: {a: 1}\n", "'lr' must be a single value, got a dict"),
    ("list.toml", "width = [8, 16]\n", "'width' must be a single value, got a list"),
    ("two.yaml", "lr: 0.1\n---\nlr: 0.2\n", "does not parse"),
    ("code.yaml", "lr: !!python/object/apply:os.system ['true']\n", "does not parse"),
    ("empty.yaml", "", "mapping"),
    ("bad-precision.yaml", "precision: 16\n", "--precision must be 32 or bf16-mixed, got '16'"),
])
def test_malformed_config_files_get_one_line(capsys, tmp_path, name, text, phrase):
    path = tmp_path / name
    path.write_text(text)
    code, out, err = print_config(capsys, "--config", str(path))
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and phrase in lines[0]


def test_huge_config_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.json"
    path.write_text('{"lr": 0.1' + " " * MAX_CONFIG_BYTES + "}")
    with pytest.raises(InputError, match=f"{path}: is {MAX_CONFIG_BYTES + 11} bytes, more than the {MAX_CONFIG_BYTES} allowed"):
        read_config_file(path)


def test_validate_refuses_non_finite_values_given_in_code():
    with pytest.raises(UsageError, match="--lr must be a finite number, got inf"):
        build_config({"lr": float("inf")})
    with pytest.raises(UsageError, match="--weight-decay must be >= 0, got nan"):
        build_config({"weight_decay": float("nan")})


# --------------------------------------------------------------------------- warnings and resume checks


def test_warmup_as_long_as_the_run_is_warned_about(capsys, tmp_path):
    assert config_warnings(build_config({"steps": 100, "warmup_steps": 50})) == []
    assert "--warmup-steps 100 >= --steps 100" in config_warnings(build_config({"steps": 100, "warmup_steps": 100}))[0]


def test_warmup_warning_is_said_by_a_run_that_starts_and_never_beside_an_input_error(capsys, tmp_path, synth_tiles):
    argv = [*TRAIN, "--seed", "1", "--steps", "1", "--warmup-steps", "10", "--width", "4", "--batch-size", "2",
            "--no-plots", "--no-tensorboard", "--quiet"]
    assert main([*argv, "--data-dir", str(tmp_path / "none"), "--output-dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such directory" in err  # bad input: one line, the warning not beside it
    assert main([*argv, "--data-dir", str(synth_tiles), "--output-dir", str(tmp_path / "good")]) == 0
    assert "warning: --warmup-steps 10 >= --steps 1" in capsys.readouterr().err
    # said when the run starts, not again at each resume (its result fields cannot change there)
    assert main([*argv, "--data-dir", str(synth_tiles), "--output-dir", str(tmp_path / "good"), "--resume", "auto"]) == 0
    assert "--warmup-steps" not in capsys.readouterr().err


def test_a_changed_precision_is_a_resume_difference():
    stored = TrainConfig().result_fields()
    now = build_config({"precision": "bf16-mixed"}).result_fields()
    assert diff_result_fields(stored, now) == ["precision: checkpoint '32', now 'bf16-mixed'"]


def test_checkpoints_older_than_the_precision_option_count_as_float32():
    now = TrainConfig().result_fields()
    older = {k: v for k, v in now.items() if k not in ("precision", "on_nonfinite")}
    assert diff_result_fields(older, now) == []
    assert diff_result_fields(older, {**now, "precision": "bf16-mixed"}) == ["precision: checkpoint '32', now 'bf16-mixed'"]


def test_checkpoints_older_than_split_seed_are_a_difference():
    now = TrainConfig().result_fields()
    older = {k: v for k, v in now.items() if k != "split_seed"}
    assert diff_result_fields(older, now) == [f"split_seed: checkpoint None, now {DEFAULT_SPLIT_SEED}"]


def test_run_json_style_dump_holds_every_new_field():
    values = json.loads(json.dumps(TrainConfig().to_dict()))
    assert {"split_seed", "keep_last", "keep_best", "checkpoint_mode", "precision", "on_nonfinite"} <= set(values)


def test_a_config_file_with_data_dir_null_uses_the_default_directory(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("data_dir: null\n")
    code, out, _ = print_config(capsys, "--config", str(tmp_path / "c.yaml"))
    assert code == 0 and parsed(out)["data_dir"] == "tiles"


def test_print_config_still_warns_on_stderr_and_keeps_stdout_a_clean_config(capsys):
    code, out, err = print_config(capsys, "--steps", "10", "--warmup-steps", "10")
    assert code == 0 and "warning: --warmup-steps 10 >= --steps 10" in err
    assert parsed(out)["warmup_steps"] == 10


@pytest.mark.parametrize("kind", ["fifo", "device", "link to a device"])
def test_a_config_that_is_a_fifo_or_a_device_is_refused_without_blocking_or_reading_forever(tmp_path, kind):
    import contextlib
    import os
    import signal

    path = tmp_path / "c.yaml"
    if kind == "fifo":
        os.mkfifo(path)  # nobody writes to it: an ordinary open waits forever
    elif kind == "device":
        path = "/dev/zero"  # a read never ends: memory runs out
    else:
        path.symlink_to("/dev/zero")

    def alarm(*_):
        raise AssertionError("read_config_file blocked for more than 5 s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(5)
    with contextlib.ExitStack() as stack:
        stack.callback(signal.signal, signal.SIGALRM, old)
        stack.callback(signal.alarm, 0)
        with pytest.raises(InputError, match=f"{path}: is a (FIFO|character device)"):
            read_config_file(path)


# --------------------------------------------------------------------------- early-stopping mode


@pytest.mark.parametrize("metric, mode", [("val_loss", "min"), ("psnr", "max"), ("ssim", "max"), ("sam", "min"),
                                          ("mae", "min"), ("rmse", "min")])
def test_es_mode_follows_the_metric_when_not_given(capsys, metric, mode):
    code, out, _ = print_config(capsys, "--es-metric", metric)
    assert code == 0 and parsed(out)["es_mode"] == mode
    code, out, _ = print_config(capsys, "--es-metric", metric, "--es-mode", mode)  # the same mode given: fine
    assert code == 0 and parsed(out)["es_mode"] == mode


@pytest.mark.parametrize("metric, mode", [("psnr", "min"), ("ssim", "min"), ("sam", "max"), ("val_loss", "max")])
def test_a_mode_that_contradicts_the_metric_is_one_line_exit_2(capsys, metric, mode):
    code, out, err = print_config(capsys, "--es-metric", metric, "--es-mode", mode)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1
    assert f"--es-metric {metric} --es-mode {mode} contradict each other" in lines[0]


def test_a_metric_given_over_a_base_config_takes_its_own_mode_not_the_bases():
    base = build_config({}).result_fields()
    assert base["es_mode"] == "min"
    assert build_config({"es_metric": "psnr"}, base=base).es_mode == "max"
    with pytest.raises(UsageError, match="contradict"):
        build_config({"es_metric": "psnr", "es_mode": "min"}, base=base)


def test_steps_and_warmup_default_to_a_schedule_scaled_to_the_training_tiles():
    from axs_lib.stage1.config import AUTO_MAX_STEPS, AUTO_MIN_STEPS, resolve_auto_schedule

    few, many = resolve_auto_schedule(build_config({}), 3), resolve_auto_schedule(build_config({}), 400)
    assert few.steps == AUTO_MIN_STEPS and many.steps > few.steps and many.warmup_steps > few.warmup_steps
    assert resolve_auto_schedule(build_config({}), 10**9).steps == AUTO_MAX_STEPS
    given = resolve_auto_schedule(build_config({"steps": 7, "warmup_steps": 2}), 400)
    assert (given.steps, given.warmup_steps) == (7, 2)


def test_checkpoints_older_than_the_linear_head_and_clear_sky_count_as_sigmoid_and_all_tiles():
    current = build_config({"head": "sigmoid", "clear_sky": False}).result_fields()
    stored = {k: v for k, v in current.items() if k not in ("head", "clear_sky")}
    assert diff_result_fields(stored, current) == []
    assert any(line.startswith("head:") for line in diff_result_fields(stored, build_config({"clear_sky": False}).result_fields()))


def test_resuming_a_checkpoint_from_before_the_linear_head_keeps_its_sigmoid_head_and_all_tiles():
    stored = {k: v for k, v in build_config({"steps": 10, "warmup_steps": 1}).result_fields().items()
              if k not in ("head", "clear_sky")}
    resumed = build_config({}, base=stored)
    assert (resumed.head, resumed.clear_sky) == ("sigmoid", False)
    assert diff_result_fields(stored, resumed.result_fields()) == []


@pytest.mark.parametrize(("flags", "accum", "micro"), [
    (["--global-batch-size", "12"], 4, 3),  # the default micro-batch size
    (["--global-batch-size", "8", "--micro-batch-size", "2"], 4, 2),
    (["--global-batch-size", "6", "--batch-size", "6"], 1, 6),
])
def test_a_global_batch_sets_the_micro_batches_per_step(capsys, flags, accum, micro):
    code, out, _ = print_config(capsys, *flags)
    assert code == 0 and parsed(out)["accum_steps"] == accum and parsed(out)["batch_size"] == micro


@pytest.mark.parametrize(("flags", "message"), [
    (["--global-batch-size", "10"], "--global-batch-size 10 is not a positive multiple of --micro-batch-size 3"),
    (["--global-batch-size", "0"], "--global-batch-size 0 is not a positive multiple"),
    (["--global-batch-size", "8", "--micro-batch-size", "2", "--accum-steps", "3"], "= 4 micro-batches, but --accum-steps 3"),
])
def test_a_global_batch_that_does_not_fit_the_micro_batches_is_one_line_exit_2(capsys, flags, message):
    code, out, err = print_config(capsys, *flags)
    assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_a_global_batch_on_resume_is_divided_by_the_runs_own_micro_batch_size(synth_tiles, tmp_path, capsys):
    from conftest import train_in_process

    out = tmp_path / "run"
    base = ["--data-dir", str(synth_tiles), "--output-dir", str(out), "--seed", "1", "--width", "4", "--no-plots",
            "--quiet", "--checkpoint-every", "2"]
    train_in_process([*base, "--steps", "4", "--batch-size", "2", "--accum-steps", "2"])
    train_in_process([*base, "--steps", "4", "--global-batch-size", "4", "--resume", "auto"])  # 4 / 2, not 4 / 3
    assert main(["train", "stage1", *base, "--steps", "4", "--global-batch-size", "6", "--resume", "auto"]) == 2
    assert "accum_steps: checkpoint 2, now 3" in capsys.readouterr().err  # another global batch: refused by name


def test_the_resume_rule_keeps_what_was_given_and_takes_the_rest_from_the_checkpoint(tmp_path):
    """`ConfigRequest.for_resume` is the library's resume rule (the command only parses flags): a field
    given keeps its value, one not given takes the checkpoint's, and a global batch is divided by the
    micro-batch size of the checkpoint when none is given."""
    from axs_lib.stage1.config import ConfigRequest, build_config

    stored = build_config({"width": 8, "lr": 0.002, "batch_size": 2, "steps": 40}).result_fields()
    request = ConfigRequest({"lr": 0.001, "output_dir": str(tmp_path / "run")}, global_batch_size=12, resuming=True)
    resumed = request.for_resume(stored)
    assert (resumed.width, resumed.lr, resumed.batch_size, resumed.accum_steps, resumed.steps) == (8, 0.001, 2, 6, 40)
    assert resumed.output_dir == str(tmp_path / "run") and resumed.data_dir == "tiles"
    fresh = request.fresh()  # no run.json to read: the default micro-batch size
    assert (fresh.width, fresh.batch_size * fresh.accum_steps) == (build_config({}).width, 12)


def test_checkpoints_older_than_the_residual_blocks_count_as_groupnorm_blocks():
    current = build_config({"block": "groupnorm"}).result_fields()
    stored = {k: v for k, v in current.items() if k != "block"}
    assert diff_result_fields(stored, current) == []
    assert any(line.startswith("block:") for line in diff_result_fields(stored, build_config({}).result_fields()))
    assert build_config({}, base=stored).block == "groupnorm"


def test_checkpoints_older_than_members_count_as_one_member():
    current = build_config({}).result_fields()
    stored = {k: v for k, v in current.items() if k != "members"}
    assert diff_result_fields(stored, current) == []
    assert any(line.startswith("members:") for line in diff_result_fields(stored, build_config({"members": 2}).result_fields()))
    assert build_config({}, base=stored).members == 1


@pytest.mark.parametrize("value", [0, 17])
def test_members_outside_one_to_sixteen_are_refused(value):
    with pytest.raises(UsageError, match="--members"):
        build_config({"members": value})
