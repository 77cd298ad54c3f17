"""Typed, validated YAML configs: `load_config(path, overrides)` -> `Config`.

See `bigexp.config.schema` for every key, `bigexp.config.load` for `base:` chains and overrides,
and `bigexp.config.validate` for the rules (including the exponential-LR existence condition).
"""
from bigexp.config.load import (add_config_arguments, arm_config, config_from_args, config_from_args_or_exit, config_sources,
                                from_dict, load_config, save_resolved, to_dict, to_yaml)
from bigexp.config.schema import Config
from bigexp.config.validate import (ConfigError, effective_lr, exp_lr_bound, exp_lr_condition_error, exp_lr_exists,
                                    source_of, validate)

__all__ = [
    "Config", "ConfigError", "arm_config", "load_config", "validate", "to_dict", "from_dict", "save_resolved", "to_yaml",
    "config_sources", "source_of", "add_config_arguments", "config_from_args", "config_from_args_or_exit",
    "effective_lr", "exp_lr_bound", "exp_lr_exists", "exp_lr_condition_error",
]
