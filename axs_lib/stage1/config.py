"""The Stage-1 training configuration, and which of its fields determine the result.

Fields split in two. *Result* fields (seeds, steps, model, optimiser, loss, split and
augmentation, validation cadence, precision, determinism) change the trained bits: they are stored
in every checkpoint and a resume that changes one is refused. *Run* fields (paths, ``max_tiles``,
worker count, checkpoint cadence, retention and write mode, loggers, verbosity) do not change the bits given
the same tiles (the tile set itself is checked through the data fingerprint): two runs that differ
only there produce byte-identical checkpoints, which is what lets ``--num-workers 0`` and ``4`` be
compared.

The split has its own seed, ``split_seed`` (default `DEFAULT_SPLIT_SEED`, recorded like every
field), so a sweep over ``--seed`` trains and validates on the same tiles; an official split in the
tile sidecars still wins when ``split_source`` allows it.

Precedence: built-in defaults < ``--config FILE`` (JSON, TOML or YAML) < explicit command-line
flags; on resume, the checkpoint's stored result fields take the place of the defaults.

Checks, each one line naming the flag or the file:

* numbers must be finite (``inf`` and ``nan`` are refused in flags and files alike);
* sizes have documented maxima (`MAXIMA`), so a typo such as ``--width 100000`` is refused before
  it allocates tens of gigabytes, rather than after;
* a config file is at most `MAX_CONFIG_BYTES`, holds one flat mapping of known keys to single
  values of the right type, and a file nested deeper than the parser can follow is refused
  instead of crashing it.

`config_text` / `write_config_file` write the effective config as YAML that ``--config`` reads
back to the same config (``axs train stage1 --print-config`` prints it).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from axs_lib.errors import InputError, UsageError
from axs_lib.run_dir import diff_fields  # the one field comparison: bounded lines, crafted values safe

DEFAULT_SEED = 42
DEFAULT_SPLIT_SEED = 0  # fixed, so runs that differ only in --seed share their train/val tiles

PRECISIONS = ("32", "bf16-mixed")
ON_NONFINITE = ("stop", "skip")
CHECKPOINT_MODES = ("sync", "async")
SPLIT_SOURCES = ("auto", "sidecar", "random")
ES_METRICS = ("val_loss", "psnr", "ssim", "sam", "mae", "rmse")
# the early-stopping mode each metric implies: higher PSNR and SSIM are better, lower loss, SAM, MAE, RMSE
ES_MODES = {"val_loss": "min", "psnr": "max", "ssim": "max", "sam": "min", "mae": "min", "rmse": "min"}
HEADS = ("linear", "sigmoid")  # axs_lib.stage1.model.HEADS (not imported: that module imports torch)
BLOCKS = ("residual", "groupnorm")  # axs_lib.stage1.model.BLOCKS

# Default step count: AUTO_EPOCHS passes over the training tiles, within [AUTO_MIN_STEPS,
# AUTO_MAX_STEPS]; the warm-up is AUTO_WARMUP_FRACTION of the steps. See `resolve_auto_schedule`.
# Chosen by cross-validation over the training scenes (benchmarks/README.md): with residual blocks,
# 26 to 176 passes all beat the per-pixel models, the longer schedules by less (they learn the
# training scenes' own brightness); about 45 passes was the best measured (44: +16 % MAE, 2 seeds).
AUTO_EPOCHS = 45
AUTO_MIN_STEPS = 200
AUTO_MAX_STEPS = 100_000
AUTO_WARMUP_FRACTION = 0.05

# Largest accepted value of each integer size. Generous for real work, small enough that a slip of
# the keyboard is refused at once: a U-Net of width 256 already has about 120 M parameters.
MAXIMA = {
    "width": 256,
    "members": 16,
    "batch_size": 4096,
    "accum_steps": 1024,
    "steps": 10**9,
    "warmup_steps": 10**9,
    "val_every": 10**9,
    "checkpoint_every": 10**9,
    "log_every": 10**9,
    "patience": 10**6,
    "num_workers": 256,
    "max_tiles": 10**9,
    "keep_last": 10**6,
    "threads": 1024,
}

MAX_CONFIG_BYTES = 1 << 20  # a config is a few dozen lines; anything larger is not one

# Result fields added after checkpoints were first written, with the value those older checkpoints
# implicitly had: a checkpoint that lacks the key agrees with a run that uses this value.
# (``split_seed`` is not here: older runs split with ``seed``, so they do differ.)
IMPLICIT_IN_OLDER_CHECKPOINTS = {"precision": "32", "on_nonfinite": "stop", "head": "sigmoid", "clear_sky": False,
                                 "portable": False, "threads": None, "block": "groupnorm",
                                 "members": 1}


@dataclass
class TrainConfig:
    """Every knob of a Stage-1 run. ``metadata={"run": True}`` marks fields that do not change the bits."""

    # data
    data_dir: str | None = field(default=None, metadata={"run": True})
    max_tiles: int | None = field(default=None, metadata={"run": True})  # the tile set is checked by fingerprint
    split_source: str = "auto"
    split_seed: int = DEFAULT_SPLIT_SEED
    val_fraction: float = 0.1
    augment: bool = True
    speckle_std: float = 0.0
    clear_sky: bool = True  # leave out tiles whose sidecar flags cloud/shadow or seasonal snow
    # schedule
    seed: int = DEFAULT_SEED
    steps: int | None = None  # None: scaled to the training set (`resolve_auto_schedule`)
    batch_size: int = 3  # the six demo pairs leave three clear-sky training tiles
    accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int | None = None  # None: AUTO_WARMUP_FRACTION of the steps
    grad_clip: float = 1.0
    precision: str = "32"
    on_nonfinite: str = "stop"
    # model and loss
    head: str = "linear"
    block: str = "residual"  # GroupNorm blocks with an unnormalised 1x1 shortcut (axs_lib.stage1.model.ResidualBlock)
    width: int = 16
    members: int = 1  # U-Nets trained side by side, predicting their mean (axs_lib.stage1.model.UNetMembers)
    dropout: float = 0.0  # off: on validation scenes 0.1 cost 4 % MAE (3 seeds), in each visible band too
    l1_weight: float = 1.0
    ssim_weight: float = 0.0  # off: on validation scenes the SSIM term cost twice the step time and did not help
    # validation and early stopping
    val_every: int = 50
    early_stopping: bool = False
    patience: int = 5
    min_delta: float = 0.0
    es_metric: str = "val_loss"
    es_mode: str | None = None  # None: the metric's own direction (ES_MODES)
    # determinism and hardware
    deterministic: bool = True
    benchmark: bool = False
    device: str = "auto"
    # the same bits on any core count and x86-64 CPU generation: see axs_lib.portable
    portable: bool = False
    threads: int | None = None  # intra-op threads; None: torch's default (portable: axs_lib.portable.DEFAULT_THREADS)
    # run settings: no effect on the bits
    output_dir: str | None = field(default=None, metadata={"run": True})
    num_workers: int = field(default=0, metadata={"run": True})
    checkpoint_every: int = field(default=50, metadata={"run": True})
    keep_last: int | None = field(default=None, metadata={"run": True})  # None: keep every step checkpoint
    keep_best: bool = field(default=True, metadata={"run": True})
    checkpoint_mode: str = field(default="sync", metadata={"run": True})
    log_every: int = field(default=10, metadata={"run": True})
    plots: bool = field(default=True, metadata={"run": True})
    tensorboard: bool = field(default=True, metadata={"run": True})
    mlflow: bool = field(default=False, metadata={"run": True})  # axs_lib.loggers: the metrics to MLflow too
    wandb: bool = field(default=False, metadata={"run": True})  # and to Weights & Biases
    quiet: bool = field(default=False, metadata={"run": True})

    def __post_init__(self):
        if self.es_mode is None and self.es_metric in ES_MODES:
            self.es_mode = ES_MODES[self.es_metric]  # the metric's own direction (`es_mode_for`)

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the trained bits (stored in checkpoints, checked on resume)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("run")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = {f.name for f in fields(TrainConfig)}
RESULT_FIELD_NAMES = {f.name for f in fields(TrainConfig) if not f.metadata.get("run")}

_POSITIVE = ("batch_size", "accum_steps", "val_every", "patience", "checkpoint_every", "log_every", "width", "members")
_NON_NEGATIVE = ("num_workers", "lr", "weight_decay", "grad_clip", "min_delta", "speckle_std",
                 "l1_weight", "ssim_weight")
_CHOICES = {
    "split_source": SPLIT_SOURCES,
    "es_metric": ES_METRICS,
    "head": HEADS,
    "block": BLOCKS,
    "precision": PRECISIONS,
    "on_nonfinite": ON_NONFINITE,
    "checkpoint_mode": CHECKPOINT_MODES,
}


def flag(name: str) -> str:
    """The command-line spelling of a field: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(config: TrainConfig) -> TrainConfig:
    """Raise `UsageError` naming the first field that is out of range."""
    for name in ("seed", "split_seed"):
        try:
            from axs_lib.reproducibility import check_seed  # torch: only when a config is validated

            setattr(config, name, check_seed(getattr(config, name)))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"{flag(name)}: {exc}") from None
    for name in _POSITIVE:
        value = getattr(config, name)
        if not _is_int(value) or value < 1:
            raise UsageError(f"{flag(name)} must be a positive integer, got {value!r}")
    for name in _NON_NEGATIVE:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise UsageError(f"{flag(name)} must be >= 0, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"{flag(name)} must be a finite number, got {value!r}")
    for name in ("max_tiles", "keep_last", "steps", "threads"):
        value = getattr(config, name)
        if value is not None and (not _is_int(value) or value < 1):
            raise UsageError(f"{flag(name)} must be a positive integer, got {value!r}")
    if config.warmup_steps is not None and (not _is_int(config.warmup_steps) or config.warmup_steps < 0):
        raise UsageError(f"--warmup-steps must be >= 0, got {config.warmup_steps!r}")
    for name, most in MAXIMA.items():
        value = getattr(config, name)
        if value is not None and value > most:
            raise UsageError(f"{flag(name)} must be at most {most}, got {value!r}")
    for name in ("val_fraction", "dropout"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{flag(name)} must be a number, got {value!r}")
    if not 0.0 < config.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    if not 0.0 <= config.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {config.dropout}")
    for name, choices in _CHOICES.items():
        if getattr(config, name) not in choices:
            raise UsageError(f"{flag(name)} must be {_or(choices)}, got {getattr(config, name)!r}")
    config.es_mode = es_mode_for(config.es_metric, config.es_mode)
    if not isinstance(config.device, str) or (config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:")):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    if not isinstance(config.portable, bool):
        raise UsageError(f"--portable must be true or false, got {config.portable!r}")
    if config.portable and config.device.startswith("cuda"):
        raise UsageError(f"--portable pins the CPU's arithmetic; it cannot apply to --device {config.device} "
                         "(GPU models stay outside the cross-machine promise)")
    if config.portable and config.threads is None:
        from axs_lib.portable import DEFAULT_THREADS

        config.threads = DEFAULT_THREADS  # recorded, so that the run says which count its bits need
    return config


def es_mode_for(metric: str, mode: str | None) -> str:
    """The early-stopping mode: the metric's own direction when ``mode`` is None; a ``mode`` that
    contradicts it (``--es-metric psnr --es-mode min`` would keep the worst model) is refused."""
    implied = ES_MODES[metric]
    if mode is None:
        return implied
    if mode not in ("min", "max"):
        raise UsageError(f"--es-mode must be min or max, got {mode!r}")
    if mode != implied:
        better = "higher" if implied == "max" else "lower"
        raise UsageError(f"--es-metric {metric} --es-mode {mode} contradict each other: {better} {metric} is better, "
                         f"so its mode is {implied} (leave --es-mode out to follow the metric)")
    return mode


def resolve_auto_schedule(config: TrainConfig, train_tiles: int) -> TrainConfig:
    """Fill in ``steps`` and ``warmup_steps`` left at None (auto), from the number of training tiles.

    ``steps`` = `AUTO_EPOCHS` passes over the training tiles at ``batch_size * accum_steps`` tiles
    a step (as on one rank: the world size does not enter, so it cannot change the result fields),
    kept within [`AUTO_MIN_STEPS`, `AUTO_MAX_STEPS`]; ``warmup_steps`` = `AUTO_WARMUP_FRACTION` of
    that. Pure arithmetic on the tile count, so two runs over the same tiles resolve to the same
    numbers; the resolved values are what checkpoints store and what a resume compares.
    """
    if config.steps is None:
        per_step = config.batch_size * config.accum_steps
        config.steps = min(max(math.ceil(AUTO_EPOCHS * train_tiles / per_step), AUTO_MIN_STEPS), AUTO_MAX_STEPS)
    if config.warmup_steps is None:
        config.warmup_steps = math.ceil(AUTO_WARMUP_FRACTION * config.steps)
    return config


def _or(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def config_warnings(config: TrainConfig) -> list[str]:
    """Settings that are allowed but probably not meant, as ``warning:`` lines for the log."""
    warnings = []
    if config.steps is not None and config.warmup_steps is not None and config.warmup_steps >= config.steps:
        warnings.append(f"warning: --warmup-steps {config.warmup_steps} >= --steps {config.steps}: the learning rate "
                        "never reaches its peak and never decays")
    return warnings


# --------------------------------------------------------------------------- config files


class _YamlLoader:
    """PyYAML's safe loader, reading ``1e-3`` as a float as YAML 1.2 does (YAML 1.1 wants ``1.0e-3``)."""

    _cls = None

    @classmethod
    def get(cls):
        if cls._cls is None:
            import yaml

            class Loader(yaml.SafeLoader):
                pass

            Loader.add_implicit_resolver(
                "tag:yaml.org,2002:float",
                re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                list("-+0123456789"),
            )
            cls._cls = Loader
        return cls._cls


def _parse(path: Path, text: str) -> Any:
    """Parse by suffix: ``.toml``, ``.yaml``/``.yml``, anything else JSON."""
    suffix = path.suffix.lower()
    if suffix == ".toml":
        return tomllib.loads(text)
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.load(text, Loader=_YamlLoader.get())  # a SafeLoader: builds plain data only
        except yaml.YAMLError as exc:
            raise ValueError(" ".join(str(exc).split())) from None
    return json.loads(text)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON, TOML or YAML config file into a dict of known fields; one-line errors otherwise."""
    from axs_lib.bounded_read import NO_SUCH_FILE, read_regular

    path = Path(path)
    try:  # bounded and non-blocking: a FIFO or /dev/zero given as --config is refused, not waited on
        text = read_regular(path, MAX_CONFIG_BYTES, what="a config file").decode("utf-8")
    except InputError as exc:
        raise InputError(path, "config file not found" if exc.problem == NO_SUCH_FILE else exc.problem) from None
    except UnicodeDecodeError as exc:
        raise InputError(path, f"cannot read config file: {exc}") from None
    try:
        data = _parse(path, text)
    except RecursionError:
        raise InputError(path, "config file is nested too deeply; it must hold one flat mapping of option names to values") from None
    except (ValueError, tomllib.TOMLDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise InputError(path, f"config file does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(path, "config file must hold a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise InputError(path, f"unknown config keys: {', '.join(unknown)}")
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for name, value in data.items():
        if name == "precision" and _is_int(value):
            value = data[name] = str(value)  # ``precision = 32`` means the string "32"
        if isinstance(value, (dict, list, tuple, set)):
            raise InputError(path, f"config key {name!r} must be a single value, got a {type(value).__name__}")
        if not _type_ok(kinds[name], value):
            raise InputError(path, f"config key {name!r} has the wrong type: {value!r} ({kinds[name]} expected)")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(path, f"config key {name!r} must be a finite number, got {value!r}")
    return data


def _type_ok(kind: str, value: Any) -> bool:
    if value is None:
        return "None" in kind
    if kind.startswith("bool"):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind.startswith("int"):
        return isinstance(value, int)
    if kind.startswith("float"):
        return isinstance(value, (int, float))
    return isinstance(value, str)


def build_config(explicit: dict[str, Any], file_values: dict[str, Any] | None = None, base: dict[str, Any] | None = None) -> TrainConfig:
    """Merge ``base`` (defaults or a checkpoint's result fields) < file values < explicit flags.

    A ``base`` that lacks a field added since (`IMPLICIT_IN_OLDER_CHECKPOINTS`) gets the value such
    checkpoints implicitly had, so resuming an older run continues it as it was trained (the
    sigmoid head, every tile) instead of being refused over today's defaults.
    """
    if base is not None:
        base = {**IMPLICIT_IN_OLDER_CHECKPOINTS, **base}
    merged: dict[str, Any] = {}
    for layer in (base or {}, file_values or {}, explicit):
        merged.update({k: v for k, v in layer.items() if k in FIELD_NAMES})
        if "es_metric" in layer and "es_mode" not in layer:
            merged["es_mode"] = None  # a metric given without a mode takes its own direction, not the base's mode
    return validate(TrainConfig(**merged))


@dataclass
class ConfigRequest:
    """What a user asked for, turned into a `TrainConfig`: for a fresh run (`fresh`), or on top of a
    checkpoint's stored result fields when resuming (`for_resume`, handed to the trainer).

    The resume rule: a field not given (flag or config file) takes the checkpoint's value; a given
    one is kept and the trainer checks it against the checkpoint. ``--global-batch-size G`` becomes
    ``accum_steps`` = G / the micro-batch size given, else the config file's, else the resumed run's
    own (its ``run.json``), else the default. The tile directory of a resume is the run's own
    (absolute, from ``run.json``), so a resume works from any working directory.
    """

    explicit: dict[str, Any]  # fields given on the command line (or by a caller)
    file_values: dict[str, Any] = field(default_factory=dict)  # a --config file's fields
    global_batch_size: int | None = None
    resuming: bool = False

    @property
    def given(self) -> dict[str, Any]:
        return {**self.file_values, **self.explicit}

    @property
    def output_dir(self) -> str:
        return self.given.get("output_dir") or f"runs/stage1_seed{self.given.get('seed', DEFAULT_SEED)}"

    @functools.cached_property
    def _previous(self) -> dict[str, Any]:
        """The run.json of the run being resumed, or {} when there is none to read (read once: under
        torchrun, rank 0 rewrites it once training starts)."""
        from axs_lib.errors import AxsError
        from axs_lib.run_dir import read_run_json

        if not self.resuming:
            return {}
        try:
            return _as_dict(read_run_json(Path(self.output_dir)))
        except AxsError:
            return {}

    def _with_accum(self, base: dict[str, Any] | None) -> dict[str, Any]:
        explicit, total = dict(self.explicit), self.global_batch_size
        if total is None:
            return explicit
        fallback = (base or {}).get("batch_size", TrainConfig.batch_size)
        micro = explicit.get("batch_size", self.file_values.get("batch_size", fallback))
        if not isinstance(micro, int) or micro < 1 or total < 1 or total % micro:
            raise UsageError(f"--global-batch-size {total} is not a positive multiple of --micro-batch-size {micro}")
        accum = total // micro
        if "accum_steps" in explicit and explicit["accum_steps"] != accum:
            raise UsageError(f"--global-batch-size {total} / --micro-batch-size {micro} = {accum} micro-batches, but "
                             f"--accum-steps {explicit['accum_steps']} was given: pass one of them")
        explicit["accum_steps"] = accum
        return explicit

    def fresh(self) -> TrainConfig:
        """The config as given (a resume's micro-batch size is the run's own unless given)."""
        config = build_config(self._with_accum(_as_dict(self._previous.get("config"))), self.file_values)
        config.data_dir = self.given.get("data_dir") or "tiles"
        config.output_dir = self.output_dir
        return config

    def for_resume(self, stored: dict[str, Any]) -> TrainConfig:
        """The config on top of a checkpoint's stored result fields (the resume rule above)."""
        resumed = build_config(self._with_accum(stored), self.file_values, base=stored)
        resumed.output_dir = self.output_dir
        resumed.data_dir = self.given.get("data_dir") or _previous_data_dir(self._previous) or "tiles"
        return resumed


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _previous_data_dir(previous: dict) -> str | None:
    """The tile directory of the run being resumed, as an absolute path (``run.json``'s ``paths``); the
    config's own spelling may be relative."""
    for value in (_as_dict(previous.get("paths")).get("data_dir"), _as_dict(previous.get("config")).get("data_dir")):
        if isinstance(value, str) and value:
            return value
    return None


def diff_result_fields(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human lines naming every result field whose value differs between two configs.

    A key that an older checkpoint lacks counts as the value such checkpoints implicitly had
    (`IMPLICIT_IN_OLDER_CHECKPOINTS`), so adding an option does not strand every earlier run.
    """
    return diff_fields({**{k: v for k, v in IMPLICIT_IN_OLDER_CHECKPOINTS.items() if k in current}, **stored}, current)


# --------------------------------------------------------------------------- writing the config

_HEADER = "# Stage-1 training config; reuse with: axs train stage1 --config <this file>\n"
_RESULT_COMMENT = ("# result fields: they determine the trained bits, and a resume that changes one is refused\n"
                   "# (steps and warmup_steps null: scaled to the training tiles when the run starts)\n")
_RUN_COMMENT = "# run fields: paths, cadence and output; they do not change the bits\n"


def config_text(config: TrainConfig) -> str:
    """The config as YAML that `read_config_file` (and so ``--config``) reads back to the same config."""
    import yaml

    values = config.to_dict()
    result = {k: v for k, v in values.items() if k in RESULT_FIELD_NAMES}
    run = {k: v for k, v in values.items() if k not in RESULT_FIELD_NAMES}
    dump = lambda d: yaml.safe_dump(d, sort_keys=False, default_flow_style=False, allow_unicode=True)  # noqa: E731
    return _HEADER + _RESULT_COMMENT + dump(result) + _RUN_COMMENT + dump(run)


def write_config_file(config: TrainConfig, path: str | Path) -> Path:
    """Write the effective config to ``path`` (``config.yaml`` in a run directory), atomically.

    The file is complete or absent: written to a temporary name beside it, then renamed.
    """
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"{path}: the config is written as YAML; name it .yaml or .yml")
    from axs_lib.atomic import atomic_write_text  # a random, exclusive temp name: never a planted link

    atomic_write_text(path, config_text(config))
    return path
