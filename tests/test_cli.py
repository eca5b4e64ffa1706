from jobs.cli import main


def test_demo_without_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["demo", f"data_dir={tmp_path}", f"out={tmp_path / 'o'}"]) == 2
    assert "make data" in capsys.readouterr().err


def test_demo_rejects_unknown_config_keys(tmp_path, capsys):
    assert main(["demo", "epoch=3"]) == 2
    assert "unknown config key" in capsys.readouterr().err
