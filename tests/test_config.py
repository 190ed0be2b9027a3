import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, load_config
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
    (["data.colour=3"], "unknown config key 'data.colour'"),
    (["nosuch.key=3"], "unknown config key 'nosuch.key'"),
    (["data.shortest_side=big"], "'data.shortest_side' must be a positive integer"),
    (["data.shortest_side=-3"], "'data.shortest_side' must be a positive integer"),
    (["train.nesterov=maybe"], "'train.nesterov' must be true or false"),
    (["pipeline.device=tpu"], "'pipeline.device' must be one of auto, gpu, cpu"),
    (["data.val_fraction=1.5"], "'data.val_fraction' must be a number in [0, 1)"),
    (["novalue"], "--set expects dotted.key=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(REPO / "config.yaml", override)


def test_unknown_and_missing_keys_in_a_file(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {REPO / 'config.yaml'}\ntrain:\n  lr_warmup: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.lr_warmup'"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("paths:\n  shards: x\n")
    with pytest.raises(ConfigError, match="is missing"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "c.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml")


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


@pytest.mark.parametrize("old, new, value, expected", [
    ("submit.tta", "predict.tta", "flip", "flip"),
    ("submit.top_k", "predict.top_k", "7", 7),
    ("validation.top_k", "predict.top_k", "9", 9),
    ("submit.batch_size", "predict.batch_size", "3", 3),
    ("submit.max_labels", "predict.max_labels", "4", 4),
    ("train.amp", "model.amp", "false", False),
    ("pipeline.layout", "model.channels_last", "NHWC", True),
])
def test_renamed_keys_still_work_with_a_one_line_warning(old, new, value, expected, tmp_path, caplog):
    section, name = new.split(".")
    cfg = load_config(REPO / "config.yaml", [f"{old}={value}"])
    assert getattr(getattr(cfg, section), name) == expected
    assert [r.getMessage() for r in caplog.records] == [
        f"config key '{old}' (--set) is now '{new}'; the old name still works but will go"]
    old_section, old_name = old.split(".")
    (tmp_path / "old.yaml").write_text(f"extends: {REPO / 'config.yaml'}\n{old_section}:\n  {old_name}: {value}\n")
    assert getattr(getattr(load_config(tmp_path / "old.yaml"), section), name) == expected
    (tmp_path / "both.yaml").write_text(f"extends: {REPO / 'config.yaml'}\n{old_section}:\n  {old_name}: {value}\n"
                                        f"{section}:\n  {name}: {value if section != 'model' else 'true'}\n")
    with pytest.raises(ConfigError, match=f"sets both '{old}' and '{new}'"):
        load_config(tmp_path / "both.yaml")


def test_a_renamed_key_keeps_its_checks():
    with pytest.raises(ConfigError, match="'pipeline.layout' must be one of NCHW, NHWC"):
        load_config(REPO / "config.yaml", ["pipeline.layout=CHWN"])
    with pytest.raises(ConfigError, match="'predict.tta' must be one of none, flip, tencrop"):
        load_config(REPO / "config.yaml", ["submit.tta=twelvecrop"])


def test_a_dropped_key_is_ignored_with_a_one_line_warning(tmp_path, caplog):
    (tmp_path / "old.yaml").write_text(f"extends: {REPO / 'config.yaml'}\ndata:\n  shard_max_bytes: 1000000000\n")
    cfg = load_config(tmp_path / "old.yaml", ["data.shard_max_bytes=5"])
    assert not hasattr(cfg.data, "shard_max_bytes")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("'data.shard_max_bytes'" in w and "is ignored" in w for w in warnings)


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
