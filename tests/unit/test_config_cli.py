"""shardwise-check-config: exit codes 0/1/2, the JSON report on stdout, the verdict or error on stderr."""

import json

from shardwise.config.cli import main


def _write(tmp_path, config, name="ds_config.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config) if isinstance(config, dict) else config)
    return str(path)


def test_valid_config_prints_resolved_json(tmp_path, capsys):
    path = _write(tmp_path, {"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto",
                             "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 3},
                             "cuda_visible_devices": "0,1"})
    assert main([path, "--world-size", "4"]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["dp_world_size"] == 4 and report["file"] == path
    assert report["auto_keys"] == ["train_micro_batch_size_per_gpu"]
    assert len(report["warnings"]) == 1 and "cuda_visible_devices" in report["warnings"][0]
    config = report["config"]
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (32, 4, 2)
    assert config["zero_optimization"]["overlap_comm"] is True  # defaults filled in
    assert config["gradient_clipping"] == 1.0
    assert err.startswith(f"OK: {path} is valid for data-parallel size 4")
    assert "32 = micro 4 x accumulation 2 x dp 4" in err


def test_default_world_size_is_one(tmp_path, capsys):
    assert main([_write(tmp_path, {"train_batch_size": 8})]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["train_micro_batch_size_per_gpu"] == 8


def test_invalid_config_exits_1_with_the_error(tmp_path, capsys):
    path = _write(tmp_path, {"train_batch_size": 8, "zero_optimization": {"stag": 2}})
    assert main([path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error: {path}: zero_optimization.stag: unknown key; did you mean 'stage'?")


def test_batch_error_for_world_size(tmp_path, capsys):
    path = _write(tmp_path, {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8})
    assert main([path, "--world-size", "2"]) == 1
    assert "data-parallel size 2 = 16" in capsys.readouterr().err


def test_parse_error_exits_1(tmp_path, capsys):
    assert main([_write(tmp_path, '{"train_batch_size": CONFIG_BATCH_SIZE}')]) == 1
    assert "placeholder" in capsys.readouterr().err


def test_missing_file_exits_1(tmp_path, capsys):
    assert main([str(tmp_path / "nope.json")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert "usage: shardwise-check-config" in capsys.readouterr().err
    assert main(["x.json", "--world-size", "two"]) == 2
    assert main(["x.json", "--world-size", "0"]) == 2
    assert "--world-size must be a positive integer" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--world-size" in capsys.readouterr().out


def test_warnings_are_not_duplicated_on_stderr(tmp_path, capsys):
    assert main([_write(tmp_path, {"train_batch_size": 2, "cuda_visible_devices": "0"})]) == 0
    err = capsys.readouterr().err
    assert "cuda_visible_devices" not in err  # it is in the JSON report, not logged twice
