"""Run configs: typed, validated dataclasses for every section, loaded from YAML (safe loader only).

``load_config(path, overrides)`` reads a YAML file (None: the built-in defaults, the content of
configs/mnist_cnn.yaml), applies ``key.path=value`` overrides and validates everything before any process group
starts: an unknown key, a wrong type, an out-of-range value or inconsistent values raise one
:class:`ConfigError` naming the file or override, the key path and what is allowed. ``format_config`` prints the
resolved config (``--print-config``) in a form ``load_config`` reads back. docs/configs.md describes every key.
"""

from kfac_dist.app.config.fields import ConfigError
from kfac_dist.app.config.loader import (
    DEFAULTS_SOURCE,
    FINGERPRINT_SECTIONS,
    config_fingerprint,
    config_to_dict,
    format_config,
    load_config,
)
from kfac_dist.app.config.schedules import kfac_hyperparameter, learning_rate, lr_scale
from kfac_dist.app.config.schema import (
    AMP_MODES,
    BACKENDS,
    DEVICES,
    LR_SCALINGS,
    LR_SCHEDULES,
    OPTIMIZER_NAMES,
    SCHEDULED_KFAC_OPTIONS,
    WIDTH_MODELS,
    CheckpointConfig,
    CommConfig,
    Config,
    DataConfig,
    KFACConfig,
    LoggingConfig,
    LRScheduleConfig,
    ModelConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainingConfig,
)

__all__ = [
    "AMP_MODES",
    "BACKENDS",
    "DEFAULTS_SOURCE",
    "DEVICES",
    "FINGERPRINT_SECTIONS",
    "LR_SCALINGS",
    "LR_SCHEDULES",
    "OPTIMIZER_NAMES",
    "SCHEDULED_KFAC_OPTIONS",
    "WIDTH_MODELS",
    "CheckpointConfig",
    "CommConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "KFACConfig",
    "LRScheduleConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "config_fingerprint",
    "config_to_dict",
    "format_config",
    "kfac_hyperparameter",
    "learning_rate",
    "load_config",
    "lr_scale",
]
