import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common.config import Config, ConfigError, Train, load_config
from preprocessing.build_shards import main as build_shards_main
from tests.fixtures import REPO


def test_repo_config_holds_the_original_solution_values():
    cfg = load_config(REPO / "config.yaml")
    assert cfg.data.shortest_side == 256
    assert cfg.data.val_fraction == 0.01
    assert cfg.data.seed == 0xDEADFACE
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.batch_size, cfg.train.momentum) == (0.01, 25, 32, 0.9)
    assert cfg.train.nesterov and cfg.train.weight_decay == 1e-4
    assert (cfg.tune.lr, cfg.tune.epochs) == (1e-4, 80)
    assert (cfg.submit.threshold, cfg.predict.max_labels, cfg.submit.min_labels, cfg.predict.tta) == (0.55, 5, 2, "tencrop")
    assert cfg.predict.top_k == 150
    assert cfg.model.name == "seresnet101"
    assert set(vars(cfg.paths)) - {"_name"} == {"original_images", "competition_data", "shards", "artifacts", "output"}


def test_extends_and_relative_paths_resolve_against_the_defining_file():
    cfg = load_config(REPO / "demo" / "config.yaml")
    assert cfg.paths.shards == (REPO / "demo_run" / "shards").resolve()
    assert cfg.data.shortest_side == 64 and cfg.data.seed == 0xDEADFACE  # changed / inherited


def test_set_overrides_are_typed(tmp_path):
    cfg = load_config(REPO / "config.yaml", ["train.lr=1e-3", "model.name=resnet18", "paths.shards=rel"])
    assert cfg.train.lr == 1e-3 and cfg.model.name == "resnet18"
    assert cfg.paths.shards == (Path.cwd() / "rel").resolve()


@pytest.mark.parametrize("override, message", [
    (["data.colour=3"], "unknown config key 'data.colour' in --set"),
    (["nosuch.key=3"], "unknown config key 'nosuch.key' in --set"),
    (["data.shortest_side=big"], "config key 'data.shortest_side' must be a valid integer, got 'big'"),
    (["data.shortest_side=-3"], "config key 'data.shortest_side' must be greater than 0, got -3"),
    (["tune.batch_size=2.5"], "config key 'tune.batch_size' must be a valid integer, got 2.5"),
    (["train.nesterov=maybe"], "config key 'train.nesterov' must be a valid boolean, got 'maybe'"),
    (["train.lr=true"], "config key 'train.lr' must be a number, not true or false, got True"),
    (["pipeline.device=tpu"], "config key 'pipeline.device' must be 'auto', 'gpu' or 'cpu', got 'tpu'"),
    (["data.val_fraction=1.5"], "config key 'data.val_fraction' must be less than 1, got 1.5"),
    (["pipeline.mean=[1, 2]"], "config key 'pipeline.mean' item 3 is missing, got [1, 2]"),
    (["tune.test_resolutions=[[256, 224], [64, 72]]"], "config key 'tune.test_resolutions' item 2 must be [short "
                                                        "side, crop] with the crop at most the short side"),
    (["paths.shards="], "config key 'paths.shards' must be a path, got ''"),
    (["submit.tta=flip"], "config key 'submit.tta' (--set) is now 'predict.tta': rename it"),
    (["pipeline.layout=NHWC"], "config key 'pipeline.layout' (--set) is now 'model.channels_last' (true for NHWC)"),
    (["data.shard_max_bytes=5"], "config key 'data.shard_max_bytes' (--set) is gone"),
    (["novalue"], "--set expects dotted.key=value"),
])
def test_every_wrong_key_or_value_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(REPO / "config.yaml", override)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_unknown_and_old_keys_in_a_file_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {REPO / 'config.yaml'}\ntrain:\n  lr_warmup: 3\n")
    with pytest.raises(ConfigError, match=f"unknown config key 'train.lr_warmup' in {tmp_path / 'a.yaml'}"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "old.yaml").write_text(f"extends: {REPO / 'config.yaml'}\nsubmit:\n  tta: flip\n")
    with pytest.raises(ConfigError, match=f"'submit.tta' \\({tmp_path / 'old.yaml'}\\) is now 'predict.tta'"):
        load_config(tmp_path / "old.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "c.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")


def test_the_schema_holds_the_defaults_and_config_yaml_restates_them(tmp_path):
    """One home for every default (common.config's models); config.yaml, the file users read and copy, says the
    same; a file that sets only its paths gets the original solution's values."""
    assert load_config(REPO / "config.yaml").to_dict() == Config().to_dict()
    written = yaml.safe_load((REPO / "config.yaml").read_text())
    assert {s: set(v) for s, v in written.items()} == {s: set(v) for s, v in Config().to_dict().items()}
    (tmp_path / "mine.yaml").write_text("paths:\n  shards: s\n")
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.paths.shards == tmp_path / "s" and cfg.train == Train() and cfg.tune.batch_size == 32


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_command_reports_a_bad_key_in_one_line_with_exit_code_2():
    r = run_cli("preprocessing.build_shards", "--set", "data.nope=1")
    assert r.returncode == 2
    assert r.stderr.strip() == "error: unknown config key 'data.nope' in --set"


def test_command_names_a_missing_competition_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"extends: {REPO / 'config.yaml'}\npaths:\n  competition_data: {tmp_path}\n")
    with pytest.raises(SystemExit) as exit_:
        build_shards_main(["--config", str(tmp_path / "c.yaml")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: competition file not found: {tmp_path / 'classes-trainable.csv'}"
    assert not list(tmp_path.glob("*.tar"))


def test_values_take_their_key_s_type_and_a_key_added_later_has_its_default(tmp_path):
    cfg = load_config(REPO / "config.yaml", ["train.lr=1", "model.compile=yes"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.model.compile is True
    # a config file written before model.compile_backend existed still loads, with its default
    text = (REPO / "config.yaml").read_text()
    old = tmp_path / "old.yaml"
    old.write_text("\n".join(line for line in text.splitlines() if "compile_backend" not in line) + "\n")
    assert load_config(old).model.compile_backend == "inductor"


def test_files_of_the_wrong_kind_are_one_line_naming_the_file(tmp_path, capsys):
    from inference.score import main as score_main
    from tests.fixtures import run_main
    from training.train import main as train_main
    image = tmp_path / "photo.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    cases = [(score_main, [str(image), str(image)], f"{image} is not a submission or solution CSV: it is not UTF-8"),
             (train_main, ["--config", str(image), "--stage", "train"], f"{image} is not a YAML config file"),
             (train_main, ["--config", str(tmp_path), "--stage", "train"], f"{tmp_path} is a folder; it must be a")]
    for main, args, words in cases:
        code, _, err = run_main(main, args, capsys)
        errors = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(errors) == 1 and words in errors[0] and "Traceback" not in err, err[-800:]
