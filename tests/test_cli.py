import dataclasses

from jobs.cli import main


def test_demo_without_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["demo", f"data_dir={tmp_path}", f"out={tmp_path / 'o'}"]) == 2
    assert "make data" in capsys.readouterr().err


def test_demo_rejects_unknown_config_keys(tmp_path, capsys):
    assert main(["demo", "epoch=3"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_every_command_takes_key_value_settings_and_lists_them_in_its_help(capsys):
    from jobs.cli import COMMANDS

    for verb, module in COMMANDS.items():
        assert main([verb, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: gradcon {verb} ") and "key=value" in text
        fields = [line.split("=")[0].strip() for line in text.split("settings (key=value")[1].splitlines()[1:]]
        assert fields == [f.name for f in dataclasses.fields(module.Config)]


def test_the_help_says_what_each_setting_means(capsys):
    main(["score", "--help"])
    assert "checkpoint=''  (str)  a checkpoint folder" in capsys.readouterr().out


def test_the_flags_of_the_release_before_still_work_each_with_a_notice(capsys):
    from jobs import demo, prepare, score, submit, tune
    from jobs.cli import parse

    cfg = parse(score, ["--model", "/c", "--input=/i", "--output", "/o", "--batch-size", "64", "--quiet"])
    assert (cfg.checkpoint, cfg.input, cfg.output, cfg.batch_size, cfg.quiet) == ("/c", "/i", "/o", 64, True)
    err = capsys.readouterr().err
    assert "--model is the flag style of the release before" in err and "write checkpoint=/c" in err
    cfg = parse(demo, ["--quick", "--no-s3", "epochs=2"])
    assert (cfg.quick, cfg.s3, cfg.epochs) == (True, False, 2)
    cfg = parse(tune, ["--search", "alpha=loguniform(1e-3,1)", "lr=choice(0.1,0.01)", "--tracking", "none"])
    assert cfg.search == {"alpha": "loguniform(0.001,1)", "lr": "choice(0.1,0.01)"}
    cfg = parse(prepare, ["defects", "--out", "/s", "--image-size", "48x64", "--counts", "4,2,2"])
    assert (cfg.kind, cfg.image_size, cfg.counts) == ("defects", [48, 64], [4, 2, 2])
    cfg = parse(submit, ["train", "--no-wait", "--env", "A", "B", "--", "epochs=1"])
    assert (cfg.job, cfg.wait, cfg.env, cfg.job_args) == ("train", False, ["A", "B"], ["epochs=1"])


def test_words_fill_the_commands_words_and_no_more(capsys):
    from jobs import prepare, train
    from jobs.cli import parse

    assert parse(prepare, ["mnist", "out=/s", "source=/m"]).kind == "mnist"
    assert main(["prepare", "mnist", "extra", "out=/s"]) == 2
    assert "unexpected 'extra': this command takes KIND before its key=value settings" in capsys.readouterr().err
    assert main(["train", "data"]) == 2 and "takes no words" in capsys.readouterr().err
    assert main(["prepare", "out=/s"]) == 2 and "name the source" in capsys.readouterr().err
    assert parse(train, ["epochs=3"]).epochs == 3
