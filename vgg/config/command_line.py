"""The configuration from YAML files under configs/ and the command line on top.

Precedence (timm's train.py pattern): dataclass defaults (the paper's values) < the YAML file named by
`--config` < command-line flags. Every field is a flag (`lr` -> `--lr`, `scale_min` ->
`--scale-min`). The resolved config is written to the run folder as config.yaml and into every
checkpoint, so a run can always be reproduced from what it saved.
"""

import argparse
import tempfile
from pathlib import Path

import yaml

from vgg.config.fields import AUTO_FIELDS, CHOICES, FIELDS, Config, _check_type, validate
from vgg.core.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def config_path(name: str) -> Path:
    """`--config D` -> configs/D.yaml; anything that looks like a path is taken as one."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        return path
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown config {name!r}; available: {', '.join(available_configs())} "
                        f"(or a path to a .yaml file)")
    return path


def available_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases (`*a`: a config has no use for them, and nested ones expand
    without bound when printed) and without a key given twice (the later one would silently win)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in a config",
                                              event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=True) for key, _ in node.value]
        twice = next((key for i, key in enumerate(keys) if key in keys[:i]), None)
        if twice is not None:
            raise yaml.constructor.ConstructorError(None, None, f"key {twice!r} given twice", node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(path: Path) -> dict:
    """Read a config file; unknown keys and wrong types fail loudly (STYLE: fail on bad config)."""
    try:
        values = yaml.load(path.read_bytes().decode("utf-8"), Loader=_ConfigLoader) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, a number of 4300+ digits
        detail = getattr(e, "problem", None) or ("not UTF-8 text" if isinstance(e, UnicodeDecodeError) else
                                                 "a number too long" if isinstance(e, ValueError) else "")
        raise UserError(f"{path}: not valid YAML ({e.__class__.__name__}{': ' + detail if detail else ''})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of config fields")
    for key, value in values.items():
        if key not in FIELDS:
            raise UserError(f"{path}: unknown key '{key}'; allowed keys: {', '.join(FIELDS)}")
        values[key] = _check_type(key, value, str(path))
    return values


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_auto_bool(text: str) -> bool | str:
    if text.lower() == "auto":
        return "auto"
    try:
        return _parse_bool(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected auto, true or false, got {text!r}") from None


# The flags evaluate.py shares with train.py: how to run, not what to train.
RUNTIME_FIELDS = ("device", "gpus", "workers", "bf16", "channels_last", "progress_every_s")


def get_args_parser(add_help: bool = False, default_config: str = "demo",
                    fields: tuple[str, ...] | None = None, shown_defaults: dict | None = None) -> argparse.ArgumentParser:
    """Flags for Config fields, each spelled `--field-name`, for use through `parents=[...]`.

    By default: --config plus every field (train.py). With `fields`: only those, and no --config
    (evaluate.py takes RUNTIME_FIELDS). Unset flags are absent from the namespace (SUPPRESS), so
    only what the user typed overrides the YAML file; read others with `runtime_value`.
    shown_defaults: the values `--help` shows as defaults (the chosen config file's), where they
    differ from the dataclass's.
    """
    parser = argparse.ArgumentParser(add_help=add_help, argument_default=argparse.SUPPRESS)
    if fields is None:
        parser.add_argument("--config", help=f"a name under configs/ ({', '.join(available_configs())}) or a "
                                             f"YAML path (default: {default_config}, the small CPU demo)")
    group = parser.add_argument_group("config fields (override the YAML file)" if fields is None
                                      else "runtime")
    shown_defaults = shown_defaults or {}
    for name, f in FIELDS.items():
        if fields is not None and name not in fields:
            continue
        kind = type(f.default)
        flag = "--" + name.replace("_", "-")
        default_text = f" (default: {shown_defaults.get(name, f.default)!r})"
        if name in AUTO_FIELDS:  # a bare `--bf16` is true, as for the other switches
            group.add_argument(flag, type=_parse_auto_bool, nargs="?", const=True, metavar="auto|BOOL",
                               help=f.metadata["help"] + default_text)
        elif kind is bool:
            group.add_argument(flag, type=_parse_bool, nargs="?", const=True, metavar="BOOL",
                               help=f.metadata["help"] + default_text)
        else:
            group.add_argument(flag, type=kind, metavar=name.upper(), choices=CHOICES.get(name),
                               help=f.metadata["help"] + default_text)
    return parser


def config_defaults(argv: list[str] | None, default_config: str = "demo") -> dict:
    """The values of the config file `argv` names with --config (or the default one), for `--help`;
    {} if it cannot be read (resolve_config then reports why)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config)
    known, _ = pre.parse_known_args(argv)
    try:
        values = load_yaml(config_path(known.config))
    except UserError:
        return {}
    values.setdefault("run_name", config_path(known.config).stem)
    return values


def runtime_value(args: argparse.Namespace, name: str):
    """A field's value from the command line, or the Config default when it was not given."""
    return getattr(args, name, FIELDS[name].default)


def resolve_config(args: argparse.Namespace) -> Config:
    """Defaults < YAML named by args.config < command-line values present in `args`."""
    config_name = getattr(args, "config", None)
    path = config_path(config_name or "demo")
    values = load_yaml(path)
    for name in FIELDS:
        if name in args:
            values[name] = _check_type(name, getattr(args, name), "command line")
    values.setdefault("run_name", path.stem)
    config = Config(**values)
    validate(config)
    if config_name is None and Path(config.data).resolve() != Path(FIELDS["data"].default).resolve():
        # `train.py --data /data/imagenet` alone would train the tiny demo net on ImageNet.
        raise UserError(f"--data {config.data} given without --config: the default config is the small CPU "
                        f"demo; pick a net, e.g. --config A (available: {', '.join(available_configs())})")
    return config


def ensure_writable_dir(path, flag: str) -> Path:
    """Create `path` (and parents) if needed and prove a file can be written there; UserError otherwise.

    Called before any data scan or model build, so an unwritable output place fails in a second, not
    after an hour of training or evaluation. (A permission check alone would not do: root passes it
    on a read-only file system.)
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path} cannot be written: {e.strerror or e}") from None
    return path


def check_output_dirs(config: Config) -> None:
    """The run folder and the TensorBoard folder must be writable (checked up front)."""
    ensure_writable_dir(Path(config.out_dir) / config.run_name, "--out-dir")
    ensure_writable_dir(Path(config.log_dir) / config.run_name, "--log-dir")
