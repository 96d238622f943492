"""The eval command on a tiny run: eval sets of every kind, the results it writes, bad inputs."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from onlinemix.core.config import Config, save_config
from onlinemix.data import load_image_source, load_real_images
from onlinemix.data.prepare import Settings, prepare
from onlinemix.evaluation.evaluate import main
from onlinemix.methods.backbones import build_backbone
from onlinemix.tools.stats import main as stats_main

R = 16  # image side of the tiny run


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Uses conftest's one-thread fixture: the tiny network gains nothing from more threads."""


# ----------------------------------------------------------------------------- a tiny run and its eval sets

def tiny_config() -> Config:
    cfg = Config()
    cfg.data.resolution = R
    cfg.train.width = 8
    cfg.probe.epochs = 30
    return cfg


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    torch.manual_seed(1)
    save_file(build_backbone(cfg.train).state_dict(), str(path / "backbone.safetensors"))
    save_config(cfg, path / "config.yaml")
    return path


def png_bytes(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(root: Path, images: torch.Tensor, classes: list[str]) -> Path:
    for i, (image, name) in enumerate(zip(images, classes)):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"{i:04d}.png").write_bytes(png_bytes(image))
    return root


def write_tar(path: Path, images: torch.Tensor, labels: list[int]) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, (image, label) in enumerate(zip(images, labels)):
            for suffix, data in (("png", png_bytes(image)), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{i:06d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def two_tone(n: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Dark and bright noisy images: any backbone separates them."""
    gen = torch.Generator().manual_seed(seed)
    labels = [i % 2 for i in range(n)]
    base = torch.tensor(labels, dtype=torch.float32).view(-1, 1, 1, 1) * 160 + 40
    noise = torch.randint(-30, 30, (n, 3, R, R), generator=gen)
    return (base + noise).clamp(0, 255).to(torch.uint8), labels


@pytest.fixture(scope="module")
def heldout() -> tuple[torch.Tensor, torch.Tensor]:
    real = load_real_images(tiny_config().data)
    return real.images[real.holdout_ids], real.labels[real.holdout_ids]


def test_eval_command_end_to_end(run_dir: Path, heldout, tmp_path: Path, capsys) -> None:
    images, labels = heldout
    folder = write_folder(tmp_path / "folder", images, [str(int(y)) for y in labels])
    shards = write_tar(tmp_path / "shards.tar", images, labels.tolist())
    xfer_train, train_labels = two_tone(40, seed=0)
    xfer_val, val_labels = two_tone(20, seed=1)
    write_folder(tmp_path / "xfer" / "train", xfer_train, ["dark" if y == 0 else "bright" for y in train_labels])
    write_folder(tmp_path / "xfer" / "val", xfer_val, ["dark" if y == 0 else "bright" for y in val_labels])
    prepare(str(folder), tmp_path / "store", Settings(size=R), workers=1, progress=False)
    out = tmp_path / "out"
    main([str(run_dir), "--eval-set", f"folder={folder}", "--eval-set", f"shards={shards}",
          "--eval-set", f"store={tmp_path / 'store'}",
          "--eval-set", f"xfer={tmp_path / 'xfer'}", "--random-init", "--probe-epochs", "20",
          "--knn-k", "10", "--knn-temperature", "0.1", "--out", str(out)])
    name = run_dir.name
    result = json.loads((out / "eval" / f"{name}.json").read_text())
    markdown = (out / "eval" / f"{name}.md").read_text()
    assert markdown in capsys.readouterr().out
    rows = {(r["eval_set"], r["method"], r["backbone"]): r for r in result["rows"]}
    assert len(rows) == 5 * 2 * 2  # sets x methods x backbones
    for backbone in ("trained", "random_init"):
        for method in ("linear probe", "kNN"):
            ref = rows["digits", method, backbone]
            assert ref["n_eval"] == len(images) and 0 <= ref["top1"] <= ref["top5"] <= 100
            # The same held-out images, read back from PNG folders, tar shards and a store, score the same.
            for copy in ("folder", "shards", "store"):
                assert rows[copy, method, backbone]["top1"] == pytest.approx(ref["top1"])
                assert rows[copy, method, backbone]["top5"] == pytest.approx(ref["top5"])
            xfer = rows["xfer", method, backbone]
            assert (xfer["n_fit"], xfer["n_eval"], xfer["top1"]) == (40, 20, 100.0)
            assert xfer["split"].startswith("transfer") and xfer["protocol"] == "fast"
    assert rows["folder", "kNN", "trained"]["split"].startswith("robustness")
    assert "k=10" in result["settings"]["kNN"] and "T=0.1" in result["settings"]["kNN"]
    assert "20 steps" in result["settings"]["linear probe"]
    assert "| eval set | split | protocol | method | backbone |" in markdown


def test_shards_by_brace_pattern_and_directory(tmp_path: Path) -> None:
    images, labels = two_tone(6, seed=0)
    write_tar(tmp_path / "s-0.tar", images[:4], labels[:4])
    write_tar(tmp_path / "s-1.tar", images[4:], labels[4:])
    for source in (f"{tmp_path}/s-{{0..1}}.tar", tmp_path):
        loaded = load_image_source(source, R)
        assert torch.equal(loaded.images, images) and loaded.labels.tolist() == labels


def test_eval_writes_into_the_run_dir_and_accepts_a_weights_file(run_dir: Path) -> None:
    main([str(run_dir / "backbone.safetensors"), "--probe-epochs", "5"])
    result = json.loads((run_dir / "eval" / f"{run_dir.name}.json").read_text())
    assert [(r["eval_set"], r["method"]) for r in result["rows"]] == [("digits", "linear probe"), ("digits", "kNN")]


# ----------------------------------------------------------------------------- bad input

def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code)


def test_missing_checkpoint(tmp_path: Path) -> None:
    assert "does not exist" in error_of([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "no config.yaml" in error_of([str(tmp_path / "empty")])


def test_run_without_backbone(run_dir: Path, tmp_path: Path) -> None:
    save_config(tiny_config(), tmp_path / "config.yaml")
    assert "backbone.safetensors does not exist" in error_of([str(tmp_path)])


def test_backbone_of_another_architecture(tmp_path: Path) -> None:
    cfg = tiny_config()
    save_file(build_backbone(cfg.train).state_dict(), str(tmp_path / "backbone.safetensors"))
    cfg.train.width = 16
    save_config(cfg, tmp_path / "config.yaml")
    assert "does not hold a train.backbone=tinycnn backbone" in error_of([str(tmp_path)])


def test_unreadable_eval_sets(run_dir: Path, tmp_path: Path) -> None:
    assert "eval set gone:" in error_of([str(run_dir), "--eval-set", f"gone={tmp_path / 'gone'}"])
    (tmp_path / "bad.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    assert "eval set bad: cannot read webdataset shards" in error_of([str(run_dir), "--eval-set",
                                                                       f"bad={tmp_path / 'bad.tar'}"])
    (tmp_path / "file.txt").write_text("x")
    assert "neither an ImageFolder" in error_of([str(run_dir), "--eval-set", f"txt={tmp_path / 'file.txt'}"])


def test_class_mismatch(run_dir: Path, tmp_path: Path) -> None:
    images, _ = two_tone(4, seed=0)
    folder = write_folder(tmp_path / "pets", images, ["cat", "dog", "cat", "dog"])
    assert "class mismatch" in error_of([str(run_dir), "--eval-set", f"pets={folder}"])
    shards = write_tar(tmp_path / "s.tar", images, [0, 1, 2, 42])
    assert "label 42, outside the 10 classes" in error_of([str(run_dir), "--eval-set", f"s={shards}"])
    write_folder(tmp_path / "xfer" / "train", images, ["a", "b", "a", "b"])
    write_folder(tmp_path / "xfer" / "val", images, ["a", "c", "a", "b"])
    assert "class mismatch" in error_of([str(run_dir), "--eval-set", f"x={tmp_path / 'xfer'}"])


def test_bad_eval_set_syntax(run_dir: Path) -> None:
    assert error_of([str(run_dir), "--eval-set", "no-equals-sign"]) == "2"


@pytest.mark.parametrize("command,prog", [(main, "onlinemix.eval"), (stats_main, "onlinemix.stats")])
def test_argument_errors_name_the_command_as_it_is_run(command, prog: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        command(["--no-such-flag"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"\n{prog}: error: " in err and ".py" not in err
