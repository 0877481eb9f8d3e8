"""The Stage-1 training configuration, and which of its fields determine the result.

Fields split in two. *Result* fields (seed, steps, model, optimiser, loss, split and
augmentation, validation cadence, determinism) change the trained bits: they are stored in every checkpoint and
a resume that changes one is refused. *Run* fields (paths, ``max_tiles``, worker count, checkpoint
cadence, verbosity) do not change the bits given the same tiles (the tile set itself is checked
through the data fingerprint): two runs that differ only there
produce byte-identical checkpoints, which is what lets ``--num-workers 0`` and ``4`` be compared.

Precedence: built-in defaults < ``--config FILE`` (JSON or TOML) < explicit command-line flags;
on resume, the checkpoint's stored result fields take the place of the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from axs_lib.errors import InputError, UsageError
from axs_lib.reproducibility import check_seed

DEFAULT_SEED = 42


@dataclass
class TrainConfig:
    """Every knob of a Stage-1 run. ``metadata={"run": True}`` marks fields that do not change the bits."""

    # data
    data_dir: str | None = field(default=None, metadata={"run": True})
    max_tiles: int | None = field(default=None, metadata={"run": True})  # the tile set is checked by fingerprint
    split_source: str = "auto"
    val_fraction: float = 0.1
    augment: bool = True
    speckle_std: float = 0.0
    # schedule
    seed: int = DEFAULT_SEED
    steps: int = 1000
    batch_size: int = 4
    accum_steps: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    # model and loss
    width: int = 16
    dropout: float = 0.1
    l1_weight: float = 1.0
    ssim_weight: float = 0.5
    # validation and early stopping
    val_every: int = 50
    early_stopping: bool = False
    patience: int = 5
    min_delta: float = 0.0
    es_metric: str = "val_loss"
    es_mode: str = "min"
    # determinism and hardware
    deterministic: bool = True
    benchmark: bool = False
    device: str = "auto"
    # run settings: no effect on the bits
    output_dir: str | None = field(default=None, metadata={"run": True})
    num_workers: int = field(default=0, metadata={"run": True})
    checkpoint_every: int = field(default=50, metadata={"run": True})
    log_every: int = field(default=10, metadata={"run": True})
    plots: bool = field(default=True, metadata={"run": True})
    tensorboard: bool = field(default=True, metadata={"run": True})
    quiet: bool = field(default=False, metadata={"run": True})

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the trained bits (stored in checkpoints, checked on resume)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("run")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = {f.name for f in fields(TrainConfig)}

_POSITIVE = ("steps", "batch_size", "accum_steps", "val_every", "patience", "checkpoint_every", "log_every", "width")
_NON_NEGATIVE = ("num_workers", "warmup_steps", "lr", "weight_decay", "grad_clip", "min_delta", "speckle_std",
                 "l1_weight", "ssim_weight")


def validate(config: TrainConfig) -> TrainConfig:
    """Raise `UsageError` naming the first field that is out of range."""
    try:
        config.seed = check_seed(config.seed)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--seed: {exc}") from None
    for name in _POSITIVE:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    for name in _NON_NEGATIVE:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {value!r}")
    if config.max_tiles is not None and (isinstance(config.max_tiles, bool) or not isinstance(config.max_tiles, int) or config.max_tiles < 1):
        raise UsageError(f"--max-tiles must be a positive integer, got {config.max_tiles!r}")
    if not 0.0 < config.val_fraction < 1.0:
        raise UsageError(f"--val-fraction must be between 0 and 1 (exclusive), got {config.val_fraction}")
    if not 0.0 <= config.dropout < 1.0:
        raise UsageError(f"--dropout must be in [0, 1), got {config.dropout}")
    if config.split_source not in ("auto", "sidecar", "random"):
        raise UsageError(f"--split-source must be auto, sidecar or random, got {config.split_source!r}")
    if config.es_mode not in ("min", "max"):
        raise UsageError(f"--es-mode must be min or max, got {config.es_mode!r}")
    if config.es_metric not in ("val_loss", "psnr", "ssim", "sam"):
        raise UsageError(f"--es-metric must be val_loss, psnr, ssim or sam, got {config.es_metric!r}")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}")
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict of known fields; one-line errors otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(path, "config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read config file: {exc}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(path, f"config file does not parse: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(path, "config file must hold a mapping of option names to values")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELD_NAMES)
    if unknown:
        raise InputError(path, f"unknown config keys: {', '.join(unknown)}")
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    for name, value in data.items():
        if not _type_ok(kinds[name], value):
            raise InputError(path, f"config key {name!r} has the wrong type: {value!r} ({kinds[name]} expected)")
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
    """Merge ``base`` (defaults or a checkpoint's result fields) < file values < explicit flags."""
    merged: dict[str, Any] = {}
    for layer in (base or {}, file_values or {}, explicit):
        merged.update({k: v for k, v in layer.items() if k in FIELD_NAMES})
    return validate(TrainConfig(**merged))


def diff_result_fields(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human lines naming every result field whose value differs between two configs."""
    keys = sorted(set(stored) | set(current))
    return [f"{k}: checkpoint {stored.get(k)!r}, now {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]
