"""The trainer's flags come from one table (``TrainConfig``'s fields): defaults, help and parsing agree."""
import dataclasses

from hpc_dgrab.train import build_parser, parse_args
from hpc_dgrab.training.config import TrainConfig, flags


def test_every_field_is_a_flag_whose_help_shows_its_default():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    for spec in flags():
        action = actions[spec.dest]
        assert action.option_strings == [spec.option]
        assert "(default: " in action.help or "(required)" in action.help, spec.dest
    assert set(actions) - {"help", "config"} == {f.name for f in dataclasses.fields(TrainConfig)}
    assert "(default: ring)" in " ".join(parser.format_help().split())


def test_parsed_defaults_are_the_dataclass_defaults():
    cfg = parse_args(["--data", "somewhere"])
    assert cfg == TrainConfig(data="somewhere")
