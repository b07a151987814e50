"""Flag values and flags the chosen method does not read: a CLI error naming the flag, before training."""
import pytest

from tests.test_bad_input import cli_error, parse


@pytest.mark.parametrize("flag", ["--dive-lambda", "--dive-alpha"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_dive_numbers_must_be_finite(capsys, ref_shards, flag, value):
    err = cli_error(["--robust-loss", "dive", "--ref-data", ref_shards, f"{flag}={value}"], capsys)  # = : argparse reads -inf as a flag
    assert f"{flag} {float(value)}: must be a finite number" in err


@pytest.mark.parametrize("method,flag,message", [
    ("dive", "--dive-lambda", "--dive-lambda -10.0: must be >= 0"),
    ("dive", "--dive-alpha", "--dive-alpha -10.0: must be in [0, 1)"),
    ("snd", "--snd-lambda", "--snd-lambda -10.0: must be >= 0"),
    ("replay", "--replay-lambda", "--replay-lambda -10.0: must be >= 0"),
])
def test_negative_weights_are_refused(capsys, ref_shards, method, flag, message):
    assert message in cli_error(["--robust-loss", method, "--ref-data", ref_shards, flag, "-10"], capsys)


@pytest.mark.parametrize("method,flags,message", [
    ("flyp", ["--ref-data", "x.tar"], "--ref-data: not used by --robust-loss flyp; drop it"),
    ("snd", ["--ref-data", "x.tar", "--dive-lambda", "5"], "--dive-lambda: not used by --robust-loss snd"),
    ("dive", ["--ref-data", "x.tar", "--snd-lambda", "2", "--replay-lambda", "3"],
     "--replay-lambda, --snd-lambda: not used by --robust-loss dive; drop them"),
    ("flyp", ["--diff-precision", "autocast"], "--diff-precision: not used by --robust-loss flyp"),
    ("flyp", ["--prompt-shots", "4"], "--prompt-shots: not used by --robust-loss flyp"),
])
def test_flags_of_other_methods_are_refused(capsys, method, flags, message):
    assert message in cli_error(["--robust-loss", method, *flags], capsys)


def test_inherited_flags_count_as_the_methods_own(tmp_path):
    """coop and kgcoop read contcoop's --prompt-* flags (they inherit them): not 'unused'."""
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    args = parse(["--robust-loss", "kgcoop", "--train-data", str(tmp_path / "x.tar"), "--prompt-shots", "4"])
    assert args.prompt_shots == 4


def test_explicit_default_is_not_flagged(ref_shards):
    """A flag at its default value changes nothing, so it is accepted with any method."""
    assert parse(["--robust-loss", "snd", "--ref-data", ref_shards, "--dive-lambda", "1000"]).snd_lambda == 1.0


@pytest.mark.parametrize("flags,message", [
    (["--kernel-weight", "-1"], "--kernel-weight -1.0: must be >= 0"),
    (["--kernel-weight", "nan"], "--kernel-weight nan: must be a finite number"),
    (["--kernel-gamma", "0"], "--kernel-gamma 0.0: must be > 0"),
    (["--kernel-coef", "-0.5"], "--kernel-coef -0.5: must be >= 0"),
    (["--kernel-type", "gaussian", "--kernel-sigma", "0"], "--kernel-sigma 0.0: must be > 0"),
])
def test_kernel_numbers(capsys, flags, message):
    """Checked before the teacher flags, so a bad number is reported even before a teacher is chosen."""
    assert message in cli_error(["--robust-loss", "kernel", *flags], capsys)
