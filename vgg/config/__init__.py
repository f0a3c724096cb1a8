"""A run's configuration: the Config dataclass with the paper's defaults and its checks
(vgg.config.fields), read from configs/*.yaml with the command line on top (vgg.config.command_line).

May import: vgg.models (the net names and their input sizes), vgg.core.
"""

from vgg.config.command_line import (
                                     RUNTIME_FIELDS,
                                     available_configs,
                                     check_output_dirs,
                                     config_defaults,
                                     config_path,
                                     ensure_writable_dir,
                                     get_args_parser,
                                     load_yaml,
                                     resolve_config,
                                     runtime_value,
)
from vgg.config.fields import (
    AUTO_FIELDS, CHOICES, FIELDS, MAX_PIXELS, RANGES, Config, check_ranges, check_run_name, speed_flag,
    validate)

__all__ = ["AUTO_FIELDS", "CHOICES", "FIELDS", "MAX_PIXELS", "RANGES", "RUNTIME_FIELDS", "Config",
           "available_configs", "check_output_dirs", "check_ranges", "check_run_name", "config_defaults", "config_path",
           "ensure_writable_dir", "get_args_parser", "load_yaml", "resolve_config", "runtime_value", "speed_flag", "validate"]
