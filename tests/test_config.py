import argparse

import pytest
import yaml

from vgg.config import Config, available_configs, config_path, get_args_parser, load_yaml, resolve_config
from vgg.core.errors import UserError


def parse(*argv):
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    return resolve_config(parser.parse_args(list(argv)))


def test_every_shipped_config_resolves():
    names = available_configs()
    for needed in ["A", "A-LRN", "B", "C", "D", "E", "D-S384", "D-jitter", "demo"]:
        assert needed in names
    for name in names:
        config = parse("--config", name)
        assert config.run_name == name


def test_paper_defaults_and_scale_variants():
    d = parse("--config", "D")
    assert (d.arch, d.lr, d.momentum, d.weight_decay, d.batch_size, d.dropout) == ("D", 0.01, 0.9, 5e-4, 256, 0.5)
    assert (d.scale_min, d.scale_max, d.init, d.init_from) == (256, 256, "normal", "checkpoints/A/best.pt")
    s384 = parse("--config", "D-S384")
    assert (s384.scale_min, s384.lr, s384.init_from) == (384, 0.001, "checkpoints/D/best.pt")
    jitter = parse("--config", "D-jitter")
    assert jitter.jittered and jitter.test_scale == 384 and jitter.init_from == "checkpoints/D-S384/best.pt"


def test_command_line_overrides_yaml():
    config = parse("--config", "D", "--lr", "0.005", "--batch-size", "128", "--compile", "false", "--bf16")
    assert (config.lr, config.batch_size, config.compile, config.bf16) == (0.005, 128, False, True)


def test_unknown_config_name_lists_available():
    with pytest.raises(UserError, match="unknown config 'Z'.*available: .*D-S384"):
        parse("--config", "Z")


def test_unknown_key_and_wrong_type_fail_loudly(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text(yaml.safe_dump({"arch": "D", "learning_rate": 0.1}))
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        load_yaml(bad_key)
    bad_type = tmp_path / "bad_type.yaml"
    bad_type.write_text(yaml.safe_dump({"batch_size": "big"}))
    with pytest.raises(UserError, match="'batch_size' must be int"):
        load_yaml(bad_type)
    bad_arch = tmp_path / "bad_arch.yaml"
    bad_arch.write_text(yaml.safe_dump({"arch": "F"}))
    with pytest.raises(UserError, match="'arch' is 'F'; allowed: A, A-LRN, B, C, D, E"):
        load_yaml(bad_arch)
    with pytest.raises(UserError, match="config file not found"):
        config_path(str(tmp_path / "missing.yaml"))


def test_cross_field_checks():
    with pytest.raises(UserError, match="scale_min"):
        parse("--config", "D", "--scale-min", "200")
    with pytest.raises(UserError, match="multiple of 32"):
        parse("--config", "D", "--crop-size", "100", "--scale-min", "256")


def test_ints_are_accepted_for_float_fields(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nwidth: 1\n")
    assert load_yaml(path) == {"lr": 1.0, "width": 1.0}
    assert Config(**load_yaml(path)).lr == 1.0
