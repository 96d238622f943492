"""Configuration: YAML preset, command-line overrides, validation and --help."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from onlinemix.core.cli import build_parser, parse_args
from onlinemix.core.config import Config, ConfigError, leaves, load_config, save_config
from onlinemix.core.registry import METHODS, PAIRINGS
from onlinemix.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "tiny.yaml"


def write_yaml(tmp_path: Path, data: Any, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def dotted_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted leaf keys of a nested mapping."""
    out: set[str] = set()
    for k, v in data.items():
        if isinstance(v, dict):
            out |= dotted_keys(v, f"{prefix}{k}.")
        else:
            out.add(f"{prefix}{k}")
    return out


def squash(text: str) -> str:
    """Drop all whitespace, so argparse's line wrapping (also at hyphens) does not matter."""
    return "".join(text.split())


# ----------------------------------------------------------------------------- preset


def test_tiny_preset_equals_dataclass_defaults() -> None:
    assert load_config(TINY) == Config()


def test_tiny_preset_spells_out_every_key() -> None:
    """A key missing from the preset would silently take the default, so the two could drift."""
    data = yaml.safe_load(TINY.read_text())
    assert dotted_keys(data) == {key for key, _, _ in leaves()}


def test_no_file_gives_defaults() -> None:
    assert load_config() == Config()
    assert load_config(None, {}) == Config()


# ----------------------------------------------------------------------------- unknown keys


def test_unknown_yaml_key_is_named_with_suggestion(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": {"epochz": 3}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "train.epochz" in msg
    assert "train.epochs" in msg


def test_unknown_override_key_is_named_with_suggestion() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"train.epochz": "3"})
    msg = str(exc.value)
    assert "train.epochz" in msg
    assert "train.epochs" in msg


def test_unknown_flag_is_named_with_suggestion() -> None:
    _, overrides = parse_args(["--train.epochz", "3"])
    with pytest.raises(ConfigError, match=re.escape("unknown key 'train.epochz' (did you mean 'train.epochs'?)")):
        load_config(None, overrides)
    with pytest.raises(SystemExit):  # not a config key at all: argparse's own error
        parse_args(["--epochz", "3"])


MOVED = [("train.dino_teacher_temp", "dino.teacher_temp"), ("train.dino_local_crops", "dino.local_crops"),
         ("train.barlowtwins_lambda", "barlowtwins.lambda"), ("train.barlowtwins_projector", "barlowtwins.projector"),
         ("train.proj_dim", "simclr.proj_dim"), ("train.temperature", "simclr.temperature")]


@pytest.mark.parametrize("old,new", MOVED)
def test_a_key_that_moved_to_a_method_section_names_its_new_key_in_yaml(tmp_path: Path, old: str, new: str) -> None:
    section, name = old.split(".")
    with pytest.raises(ConfigError, match=re.escape(f"unknown key '{old}': it is now '{new}'")):
        load_config(write_yaml(tmp_path, {section: {name: 1}}))


@pytest.mark.parametrize("old,new", MOVED)
def test_a_key_that_moved_to_a_method_section_names_its_new_key_on_the_command_line(old: str, new: str) -> None:
    for flag in ("--" + old.replace("_", "-"), "--" + old):
        _, overrides = parse_args(["--train.epochs", "2", flag, "1"])
        assert overrides == {"train.epochs": "2", old: "1"}
        with pytest.raises(ConfigError, match=re.escape(f"unknown key '{old}': it is now '{new}'")):
            load_config(None, overrides)
    assert load_config(None, parse_args(["--" + new.replace("_", "-"), "2"])[1]) != Config()


def test_lambda_is_the_key_of_the_lambda__field(tmp_path: Path) -> None:
    """A field named after a Python keyword (lambda_) has the keyword as its key everywhere."""
    assert load_config(write_yaml(tmp_path, {"barlowtwins": {"lambda": 0.5}})).barlowtwins.lambda_ == 0.5
    _, overrides = parse_args(["--barlowtwins.lambda", "0.25"])
    cfg = load_config(None, overrides)
    assert overrides == {"barlowtwins.lambda": "0.25"} and cfg.barlowtwins.lambda_ == 0.25
    with pytest.raises(ConfigError, match=re.escape("barlowtwins.lambda='-1' is not valid")):
        load_config(None, {"barlowtwins.lambda": "-1"})
    with pytest.raises(ConfigError, match=re.escape("(did you mean 'barlowtwins.lambda'?)")):
        load_config(write_yaml(tmp_path, {"barlowtwins": {"lambda_": 0.5}}))
    save_config(cfg, tmp_path / "saved.yaml")
    assert yaml.safe_load((tmp_path / "saved.yaml").read_text())["barlowtwins"] == {"projector": "128-128",
                                                                                     "lambda": 0.25}
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_method_and_pairing_choices_come_from_the_registry() -> None:
    choices = {key: f.metadata["choices"] for key, f, _ in leaves()}
    assert choices["train.method"] == METHODS.names() and choices["train.pairing"] == PAIRINGS.names()
    text = squash(build_parser().format_help())
    assert squash(METHODS.describe()) in text and squash(PAIRINGS.describe()) in text


def test_unknown_top_level_section(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"trian": {"epochs": 3}})
    with pytest.raises(ConfigError, match="trian"):
        load_config(path)


def test_section_given_a_scalar_is_rejected(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": 3})
    with pytest.raises(ConfigError, match="train"):
        load_config(path)


# ----------------------------------------------------------------------------- types


def test_wrong_type_in_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": {"epochs": "many"}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "train.epochs" in msg
    assert "many" in msg
    assert "int" in msg


def test_wrong_type_on_command_line() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"train.lr": "fast"})
    msg = str(exc.value)
    assert "train.lr" in msg
    assert "fast" in msg
    assert "float" in msg


@pytest.mark.parametrize("value", [True, False])
def test_yaml_bool_is_not_an_int(tmp_path: Path, value: bool) -> None:
    path = write_yaml(tmp_path, {"train": {"epochs": value}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "train.epochs" in str(exc.value)
    assert "int" in str(exc.value)


def test_command_line_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, {"train.epochs": "true"})


def test_yaml_float_is_not_an_int(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": {"epochs": 2.5}})
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path)


def test_command_line_bool_rejects_other_words() -> None:
    with pytest.raises(ConfigError, match="probe.enabled"):
        load_config(None, {"probe.enabled": "maybe"})


# ----------------------------------------------------------------------------- ranges and choices


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("train.batch_size", "1", ">= 2"),
        ("data.holdout_fraction", "0.99", "<= 0.9"),
        ("train.epochs", "-1", ">= 0"),
    ],
)
def test_out_of_range_override(key: str, value: str, allowed: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, {key: value})
    msg = str(exc.value)
    assert key in msg
    assert value in msg
    assert allowed in msg


def test_out_of_range_in_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"data": {"holdout_fraction": 0.99}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "data.holdout_fraction" in msg
    assert "0.99" in msg
    assert "0.9" in msg.replace("0.99", "")


def test_nan_float_is_rejected() -> None:
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, {"train.lr": "nan"})


def test_bad_choice_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"generator.scheduler": "foo"})
    msg = str(exc.value)
    assert "generator.scheduler" in msg
    assert "foo" in msg
    for choice in ("dpm++", "ddim", "pndm", "euler"):
        assert choice in msg


# ----------------------------------------------------------------------------- consistency


def test_mixdiff_needs_a_producer() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(None, {"train.pairing": "mixdiff", "gen_gpus": "0"})
    assert "gen_gpus" in str(exc.value)
    # Plain SSL needs no producer.
    cfg = load_config(None, {"train.pairing": "real", "gen_gpus": "0"})
    assert cfg.gen_gpus == 0 and cfg.train.pairing == "real"


def test_wait_policy_needs_a_timeout(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"staleness": {"policy": "wait", "wait_timeout_s": 0}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert "wait_timeout_s" in str(exc.value)
    with pytest.raises(ConfigError, match="wait_timeout_s"):
        load_config(None, {"staleness.policy": "wait", "staleness.wait_timeout_s": "0"})
    cfg = load_config(None, {"staleness.policy": "real", "staleness.wait_timeout_s": "0"})
    assert cfg.staleness.wait_timeout_s == 0.0


def test_ring_must_hold_one_producer_batch() -> None:
    with pytest.raises(ConfigError, match="ring.slots"):
        load_config(None, {"ring.slots": "4", "generator.batch_size": "8"})


def test_a_size_limit_below_one_shard_is_refused_naming_the_minimum() -> None:
    cfg = load_config(None, {"cache.max_gb": "0.01"})  # a shard of 256 synthetic images at 32 px: 0.8 MB
    assert cfg.cache_shard_bytes() > 256 * 3 * 32 * 32
    with pytest.raises(ConfigError, match=re.escape("cache.max_gb=0.0005 cannot hold one cache shard of "
                                                    "cache.shard_pairs=256 images at data.resolution=32")) as e:
        load_config(None, {"cache.max_gb": "0.0005"})
    minimum = float(re.search(r"at least ([0-9.]+)", str(e.value)).group(1))
    assert minimum * 1e9 >= cfg.cache_shard_bytes()
    load_config(None, {"cache.max_gb": str(minimum)})
    load_config(None, {"cache.max_gb": "0.0005", "cache.enabled": "false", "train.pairing": "real"})


def test_a_dataset_smaller_than_one_global_batch_says_how_to_fix_it() -> None:
    cfg = load_config(None, {"train.batch_size": "128"})
    cfg.check_dataset_size(256, 2)
    with pytest.raises(ConfigError, match=re.escape("has 100 training images (after the data.holdout_fraction=0.2 "
                                                    "hold-out, at data.real_fraction=1), fewer than one global batch "
                                                    "of 256 (train.batch_size=128 x 2 rank(s)): lower train.batch_size "
                                                    "to at most 50")):
        cfg.check_dataset_size(100, 2)
    with pytest.raises(ConfigError, match=r"use more images or at most 3 trainer rank\(s\)$"):
        cfg.check_dataset_size(7, 4)
    with pytest.raises(ConfigError, match=r"use a dataset with at least 2 training images \(or a lower "
                                          r"data.holdout_fraction\)$"):
        cfg.check_dataset_size(1, 1)


def test_command_line_overrides_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, {"train": {"epochs": 3, "lr": 0.5}})
    cfg = load_config(path, {"train.epochs": "7"})
    assert cfg.train.epochs == 7
    assert cfg.train.lr == 0.5  # untouched by the override


# ----------------------------------------------------------------------------- conversion


def test_overrides_are_converted_to_field_types() -> None:
    cfg = load_config(None, {
        "train.epochs": "5",
        "train.lr": "1e-3",
        "train.warmup_epochs": "2",
        "probe.enabled": "false",
        "ring.verify_checksums": "False",
        "generator.scheduler": "ddim",
        "run_name": "123",
    })
    assert cfg.train.epochs == 5 and type(cfg.train.epochs) is int
    assert cfg.train.lr == pytest.approx(1e-3) and type(cfg.train.lr) is float
    assert cfg.train.warmup_epochs == 2.0 and type(cfg.train.warmup_epochs) is float
    assert cfg.probe.enabled is False
    assert cfg.ring.verify_checksums is False
    assert cfg.generator.scheduler == "ddim"
    assert cfg.run_name == "123"


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("1", True), ("yes", True),
                                                 ("false", False), ("0", False), ("no", False)])
def test_bool_override_spellings(text: str, expected: bool) -> None:
    assert load_config(None, {"probe.enabled": text}).probe.enabled is expected


def test_yaml_int_for_float_field_becomes_float(tmp_path: Path) -> None:
    cfg = load_config(write_yaml(tmp_path, {"train": {"lr": 1}}))
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float


# ----------------------------------------------------------------------------- command line


def test_help_lists_every_key_with_its_help() -> None:
    text = squash(build_parser().format_help())
    for key, f, _ in leaves():
        flag = "--" + key.replace("_", "-")
        assert flag in text, f"--help lacks {flag}"
        assert squash(f.metadata["help"]) in text, f"--help lacks the help text of {key}"


def help_groups(text: str) -> dict[str, list[str]]:
    """The flags each group of ``--help`` lists (first spelling), by title, in the order shown."""
    groups: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = groups.setdefault(line.removesuffix(":"), [])
        elif line.startswith("  -") and groups:
            title.append(line.split()[0].rstrip(","))
    return groups


def test_help_shows_the_common_settings_first_and_each_sections_advanced_ones_after() -> None:
    groups = help_groups(build_parser().format_help())
    titles = list(groups)
    assert titles[:2] == ["options", "common settings"]
    sections = list(dict.fromkeys(key.split(".")[0] if "." in key else "run" for key, _, _ in leaves()))
    assert titles[2:] == [f"advanced {section} settings" for section in sections]
    common = [key for key, f, _ in leaves() if f.metadata["common"]]
    assert {"gen_gpus", "data.dataset", "generator.model", "train.method", "train.pairing", "train.epochs"} <= {*common}
    assert groups["common settings"] == ["--config", "--resume", *("--" + key.replace("_", "-") for key in common)]
    for key, f, _ in leaves():
        section = key.split(".")[0] if "." in key else "run"
        assert ("--" + key.replace("_", "-") in groups[f"advanced {section} settings"]) != f.metadata["common"], key


def test_usage_stays_one_short_line() -> None:
    usage = build_parser().format_usage()
    assert len(usage.splitlines()) == 1 and "--section.key VALUE" in usage and "--dino" not in usage


def test_a_method_section_flag_reaches_the_method_section() -> None:
    args, overrides = parse_args(["--dino.teacher_temp", "0.05", "--simclr.temperature", "0.3"])
    assert vars(args)["dino.teacher_temp"] == "0.05"  # a declared flag, not passed on as an unknown key
    cfg = load_config(None, overrides)
    assert (cfg.dino.teacher_temp, cfg.simclr.temperature) == (0.05, 0.3)
    with pytest.raises(ConfigError, match=re.escape("dino.teacher_temp='0' is not valid: expected float >= 0.0001")):
        load_config(None, {"dino.teacher_temp": "0"})


def test_a_saved_config_with_method_sections_loads_unchanged(tmp_path: Path) -> None:
    cfg = load_config(None, {"train.method": "dino", "dino.teacher_temp": "0.05", "barlowtwins.lambda": "0.01"})
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert list(saved)[list(saved).index("train") + 1:][:3] == ["simclr", "barlowtwins", "dino"]
    assert saved["dino"]["teacher_temp"] == 0.05
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(write_yaml(tmp_path, {"dino": {"teacher_temp": 0.05}})).dino.teacher_temp == 0.05
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # as a producer receives it


def test_a_process_that_imports_only_core_has_every_method_section() -> None:
    """What a spawned producer and the cache, plan and stats commands rely on: core finds the methods'
    sections itself, for flags, presets and pickled configs alike."""
    cfg = load_config(None, {"dino.teacher_temp": "0.05"})
    code = ("import pickle, sys\n"
            "from onlinemix.core.cli import add_config_options, parse_config_args\n"
            "from onlinemix.core.config import load_config\n"
            "assert not any(m.startswith('onlinemix.methods') for m in sys.modules)\n"
            "import argparse; parser = argparse.ArgumentParser(); add_config_options(parser)\n"
            "args, overrides = parse_config_args(parser, ['--dino.teacher-temp', '0.05'])\n"
            "assert vars(args)['dino.teacher_temp'] == '0.05'\n"
            "assert load_config(None, overrides) == pickle.loads(sys.stdin.buffer.read())\n"
            "print(load_config(None, overrides).dino.teacher_temp)\n")
    proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(cfg), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() == "0.05"


def test_the_settings_that_shape_a_checkpoint_are_fixed_on_resume() -> None:
    assert [key for key, f, _ in leaves() if f.metadata["fixed_on_resume"]] == [
        "train.method", "train.backbone", "train.width", "train.optimizer", "simclr.proj_dim", "barlowtwins.projector",
        "dino.out_dim", "dino.hidden_dim", "dino.bottleneck_dim", "dino.use_bn", "dino.norm_last_layer"]


def test_parse_args_accepts_both_spellings() -> None:
    _, dashed = parse_args(["--train.batch-size", "64", "--gen-gpus", "2"])
    _, underscored = parse_args(["--train.batch_size", "64", "--gen_gpus", "2"])
    assert dashed == underscored == {"train.batch_size": "64", "gen_gpus": "2"}
    _, none = parse_args([])
    assert none == {}


# ----------------------------------------------------------------------------- files


def test_invalid_yaml_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("train: {epochs: [1, 2\n  lr: : :\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(path)


def test_missing_file_raises_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(path)


def test_a_config_that_is_a_directory_is_named_as_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"config file {tmp_path} is a directory, not a YAML file")):
        load_config(tmp_path)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_empty_yaml_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == Config()


# ----------------------------------------------------------------------------- entry point


def test_train_rejects_bad_config_before_creating_anything(tmp_path: Path) -> None:
    out_dir = tmp_path / "runs"
    work = tmp_path / "cwd"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "onlinemix.train", "--train.epochs", "-1", "--output-dir", str(out_dir)],
        cwd=work, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "config error" in proc.stderr
    assert "train.epochs" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out_dir.exists()
    assert list(work.iterdir()) == []


def test_a_mistyped_flag_ends_training_with_one_config_error_line() -> None:
    with pytest.raises(SystemExit) as e:
        train_main(["--train.epochz", "3"])
    assert e.value.code == "config error: unknown key 'train.epochz' (did you mean 'train.epochs'?)"


# ----------------------------------------------------------------------------- presets with a base

def test_a_preset_overrides_its_base_and_cycles_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 7\n  batch_size: 32\n")
    (tmp_path / "exp.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "exp.yaml")
    assert (cfg.train.epochs, cfg.train.batch_size) == (9, 32)
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml does not exist \\(the base of"):
        load_config(tmp_path / "orphan.yaml")


EXPERIMENTS = sorted((REPO / "configs" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_paper_experiment_is_one_valid_config(path: Path) -> None:
    dataset, method, pairing, *variant = path.stem.split("-")
    cfg = load_config(path)
    assert (cfg.train.method, cfg.train.pairing) == (method, pairing)
    if dataset == "digits":  # the miniature of Table 1 on the default run
        assert cfg.data.dataset == "digits" and cfg.generator.model == "digits-tiny" and cfg.train.backbone == "tinycnn"
    else:
        assert cfg.train.backbone == "resnet50" and cfg.data.resolution == 224
        assert cfg.train.epochs == 100 and ("imagenet100" in cfg.data.dataset) == (dataset == "in100")
    assert (cfg.gen_gpus == 0) == (pairing == "real")
    if variant and variant[0].startswith("k"):
        assert cfg.generator.guidance == float(variant[0][1:])
    if variant and variant[0].startswith("real"):
        assert cfg.data.real_fraction == int(variant[0][4:]) / 100
    if variant == ["noaug"]:
        assert cfg.train.augmentation == "no_augmentation"
