"""kdvae.config: one declaration per setting gives the command line, presets, validation
and the settings stored with checkpoints."""

from __future__ import annotations

import dataclasses

import pytest

from kdvae import cli, config


@dataclasses.dataclass(frozen=True)
class Demo(cli.Common):
    PRESETS = {"small": {}, "big": {"width": 512, "rate": 0.5}}

    preset: str = config.setting("small", "which preset", choices=tuple(PRESETS))
    width: int = config.setting(64, "hidden width", check=config.at_least(1))
    rate: float = config.setting(0.1, "a rate (5 % is 0.05)", check=config.between(0.0, 1.0))
    lr: float = config.setting(1e-3, "learning rate", check=config.POSITIVE, flag="learning-rate")
    mode: str = config.setting("a", "a mode", choices=("a", "b"))
    classes: tuple[int, ...] = config.setting(
        (),
        "class ids",
        check=config.Check("class ids in 0..9", lambda v: all(0 <= k < 10 for k in v)),
    )
    cap: int | None = config.setting(None, "an optional cap", check=config.at_least(1))
    cache: bool = config.setting(True, "cache things")
    eval_k: int = config.setting(10, "evaluation samples", check=config.at_least(1),
                                 training=False)  # fmt: skip

    def check(self):
        if self.mode == "b" and self.classes:
            raise config.ConfigError("--classes only apply to --mode a.")


def parse_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as excinfo:
        config.parse(Demo, argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_defaults_presets_and_flags():
    assert config.parse(Demo, []) == Demo()
    big = config.parse(Demo, ["--preset", "big"])
    assert (big.width, big.rate, big.preset) == (512, 0.5, "big")
    # A flag given on the command line beats the preset.
    assert config.parse(Demo, ["--preset", "big", "--width", "8"]).width == 8
    s = config.parse(Demo, ["--learning-rate", "0.5", "--classes", "7,8", "--cap", "3",
                            "--no-cache", "--no-progress", "--resume", "--seed", "4"])  # fmt: skip
    assert (s.lr, s.classes, s.cap, s.cache, s.progress, s.resume, s.seed) == (
        0.5, (7, 8), 3, False, False, True, 4,
    )  # fmt: skip
    assert config.make(Demo, preset="big", rate=0.2) == Demo(preset="big", width=512, rate=0.2)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--width", "0"], "--width must be >= 1, got 0."),
        (["--rate", "1.5"], "--rate must be in [0, 1], got 1.5."),
        (["--learning-rate", "0"], "--learning-rate must be positive, got 0.0."),
        (["--learning-rate", "nan"], "--learning-rate must be positive, got nan."),
        (["--mode", "c"], "--mode must be one of ['a', 'b'], got 'c'."),
        (["--preset", "huge"], "--preset must be one of ['big', 'small'], got 'huge'."),
        (["--classes", "12"], "--classes must be class ids in 0..9, got (12,)."),
        (["--classes", "1,x"], "expected comma-separated integers, got '1,x'"),
        (["--cap", "0"], "--cap must be >= 1, got 0."),
        (["--width", "abc"], "argument --width: invalid int value: 'abc'"),
        (["--mode", "b", "--classes", "3"], "--classes only apply to --mode a."),
        (["--val-size", "0"], "--val-size must be in [1, 10,000,000], got 0."),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_naming_the_flag(argv, expected, capsys):
    err = parse_error(argv, capsys)
    assert ": error: " in err
    assert expected in err and err.rstrip().endswith("--help)")


def test_construction_validates_every_field():
    with pytest.raises(config.ConfigError, match=r"--width must be >= 1, got 0\."):
        Demo(width=0)
    with pytest.raises(config.ConfigError, match=r"--width must be an int, got '8'\."):
        Demo(width="8")
    with pytest.raises(config.ConfigError, match=r"--cache must be a bool, got 1\."):
        Demo(cache=1)
    with pytest.raises(config.ConfigError, match="--learning-rate must be set, got None"):
        Demo(lr=None)
    assert Demo(lr=1).lr == 1  # an int is a float's value too
    with pytest.raises(dataclasses.FrozenInstanceError):
        Demo().width = 3  # type: ignore[misc]


def test_training_settings_are_stored_the_others_not():
    stored = Demo().training()
    assert {"width", "rate", "seed", "val_size", "dataset", "preset", "classes"} <= set(stored)
    # Where outputs go, how the finished model is evaluated, and how the run is shown
    # do not change what is trained: never stored, free to change on --resume.
    for name in ("workdir", "data_dir", "resume", "progress", "distributed", "eval_k"):
        assert name not in stored
        assert name in Demo().to_dict()


def test_help_lists_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as excinfo:
        config.parse(Demo, ["--help"], description="Demo run.")
    assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "Demo run." in out
    for flag in ("--width", "--learning-rate", "--cache, --no-cache", "--classes I,J", "--cap"):
        assert flag in out
    assert "hidden width (default: 64)" in out
    assert "a rate (5 % is 0.05) (default: 0.1)" in out  # a % in the help is text
    assert "--val-size" not in out  # hidden (for tests)


@dataclasses.dataclass(frozen=True)
class Grown(cli.Common):
    """Demo's settings after one was added: runs stored before trained as ``mode="a"``."""

    mode: str = config.setting("b", "a setting added later", choices=("a", "b"), legacy="a")


def test_a_setting_at_its_legacy_value_is_not_stored():
    """So checkpoints stored before it existed (without it) resume at that value and are
    refused at any other; cli.Common's dtype is such a setting."""
    assert "mode" not in config.parse(Grown, ["--mode", "a"]).training()
    assert config.parse(Grown, []).training()["mode"] == "b"
    assert "dtype" not in config.parse(Grown, []).training()
    assert config.parse(Grown, ["--dtype", "bfloat16"]).training()["dtype"] == "bfloat16"
    assert config.parse(Grown, ["--mode", "a"]).to_dict()["mode"] == "a"  # results.json: all


def test_the_vae_config_at_the_legacy_values_is_the_earlier_one():
    """The VAE example's stored config at the new settings' legacy values is the one
    the earlier version stored: no dtype, gradient, likelihood or decoder_logvar."""
    from conftest import load_script

    example = load_script("examples/vae_mnist.py")
    stored = config.parse(example.Settings, []).training()
    model = config.parse(example.Settings, []).model_config().to_dict()
    assert not {"dtype", "gradient", "likelihood", "decoder_logvar", "final_fit"} & set(stored)
    assert model == {"encoder_widths": (500,), "decoder_widths": (500,), "latents": 20,
                     "activation": "relu"}  # fmt: skip
    gaussian = config.parse(example.Settings, ["--likelihood", "gaussian"])
    assert gaussian.training()["likelihood"] == "gaussian"
    assert gaussian.model_config().to_dict()["likelihood"] == "gaussian"
