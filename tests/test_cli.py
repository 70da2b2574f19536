"""The command line: bad configs fail before any rank starts, with the key named."""

from longtrain.launch.cli import main


def test_train_rejects_bad_config(tmp_path, capsys):
    assert main(["train", "--set", "optim.lrr=1"]) == 2
    assert "unknown key(s) optim.lrr" in capsys.readouterr().err
    assert main(["train", "--set", "parallel.tp=3"]) == 2
    assert "divisible by tp=3" in capsys.readouterr().err


def test_prepare_reports_bad_input(tmp_path, capsys):
    assert main(["prepare", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
