"""Image statistics: the Frechet distance and diversity against hand-computed cases, and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_files import strict_loads

from onlinemix.cache import ShardWriter, cache_key
from onlinemix.core.config import Config, save_config
from onlinemix.core.schedule import variation_seed
from onlinemix.data import load_real_images
from onlinemix.methods.backbones import build_backbone
from onlinemix.tools.stats import (
    frechet_distance,
    frechet_from_moments,
    main,
    mean_cosine_distance,
    torchvision_extractor,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- Frechet distance

@pytest.mark.parametrize("m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (1.0, 4.0, -2.0, 0.25), (3.0, 0.0, 0.0, 9.0)])
def test_frechet_of_1d_gaussians(m1: float, v1: float, m2: float, v2: float) -> None:
    want = (m1 - m2) ** 2 + v1 + v2 - 2 * math.sqrt(v1 * v2)
    got = frechet_from_moments(torch.tensor([m1]), torch.tensor([[v1]]), torch.tensor([m2]), torch.tensor([[v2]]))
    assert got == pytest.approx(want, abs=1e-9)


def test_frechet_of_non_commuting_covariances() -> None:
    """2-d case by hand: s1 = diag(4, 1), s2 = [[2, 1], [1, 2]]; s1 s2 = [[8, 4], [1, 2]] has trace 10 and
    determinant 12, so tr((s1 s2)^(1/2)) = sqrt(10 + 2 sqrt(12))."""
    s1, s2 = torch.diag(torch.tensor([4.0, 1.0])), torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    want = 1.0 + 5 + 4 - 2 * math.sqrt(10 + 2 * math.sqrt(12))  # |(1, 0)|^2 + tr s1 + tr s2 - 2 tr sqrt
    got = frechet_from_moments(torch.tensor([1.0, 0.0]), s1, torch.zeros(2), s2)
    assert got == pytest.approx(want, abs=1e-9)


def test_frechet_of_identical_shifted_and_scaled_sets() -> None:
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(8, dtype=torch.float64) / 4
    assert frechet_distance(x, x + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    # s2 = c^2 s1: tr s1 + c^2 tr s1 - 2 c tr s1 = (1 - c)^2 tr s1 (the mean scales too: c x has mean c m).
    c, mean = 3.0, x.mean(0)
    want = float(((1 - c) * mean).pow(2).sum()) + (1 - c) ** 2 * float(torch.cov(x.T).trace())
    assert frechet_distance(x, c * x) == pytest.approx(want, rel=1e-6)


# ----------------------------------------------------------------------------- diversity

def test_diversity_hand_cases_and_growth_with_noise() -> None:
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert mean_cosine_distance(e1, e2) == pytest.approx(1.0)
    assert mean_cosine_distance(e1, -e1) == pytest.approx(2.0)
    x = torch.rand(200, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    assert mean_cosine_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=gen)
    values = [mean_cosine_distance(x, x + sigma * noise) for sigma in (0.01, 0.1, 0.5, 2.0)]
    assert values == sorted(values) and values[0] > 0


# ----------------------------------------------------------------------------- extractors and the command

def test_torchvision_extractor_from_a_local_file(tmp_path: Path) -> None:
    weights = tmp_path / "resnet18.safetensors"
    import torchvision

    save_file(torchvision.models.resnet18(weights=None).state_dict(), str(weights))
    ex = torchvision_extractor("resnet18", weights, size=32)
    assert ex.fd_label == "Frechet distance on torchvision resnet18 (resnet18.safetensors) features (not the Inception FID)"
    feats = ex.features(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8), torch.device("cpu"), "test")
    assert feats.shape == (3, 512)
    # Random Inception weights are not the standard ones: not labelled FID.
    save_file(torchvision.models.inception_v3(weights=None, init_weights=False).state_dict(), str(tmp_path / "i.safetensors"))
    assert "not the Inception FID" in torchvision_extractor("inception_v3", tmp_path / "i.safetensors").fd_label
    with pytest.raises(ValueError, match="does not fit torchvision resnet34"):
        torchvision_extractor("resnet34", weights)


def test_stats_command_end_to_end(tmp_path: Path, capsys) -> None:
    cfg = Config()
    cfg.data.resolution, cfg.train.width, cfg.generator.steps = 16, 8, 2
    cfg.output_dir = str(tmp_path)  # so the cache looked up is <tmp_path>/cache, empty
    save_file(build_backbone(cfg.train).state_dict(), str(tmp_path / "backbone.safetensors"))
    save_config(cfg, tmp_path / "config.yaml")
    main([str(tmp_path), "--num-images", "64", "--guidance", "1", "3"])
    result = strict_loads((tmp_path / "stats" / "stats.json").read_text())
    label = f"Frechet distance on the trained tinycnn backbone of run {tmp_path.name} features (not the Inception FID)"
    assert result["fd_label"] == label and label in capsys.readouterr().out
    assert result["num_images"] == 64 and [r["guidance"] for r in result["scales"]] == [1.0, 3.0]
    for row in result["scales"]:
        assert 0 < row["diversity"] <= 2 and row["frechet_distance"] > 0
    # Different guidance, different images: the two scales do not give identical statistics.
    assert result["scales"][0]["frechet_distance"] != result["scales"][1]["frechet_distance"]
    assert (tmp_path / "stats" / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {r["variations"] for r in result["scales"]} == {"generated"}


def test_stats_read_variations_from_the_cache_when_it_covers_the_images(tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.resolution, cfg.train.width, cfg.output_dir = 16, 8, str(tmp_path)
    save_file(build_backbone(cfg.train).state_dict(), str(tmp_path / "backbone.safetensors"))
    save_config(cfg, tmp_path / "config.yaml")
    real = load_real_images(cfg.data)
    # "Variations" identical to their real images, cached for guidance 3 only: diversity and distance 0.
    writer = ShardWriter(cfg.cache_root(), cache_key("c" * 16, "digits"),
                         {"dataset": "digits", "identity": {"guidance": 3.0}}, 16, 4096, 3600.0)
    for i in range(len(real)):
        writer.add(i, variation_seed(cfg.generator.seed, i, 0), 0, real.images[i].numpy())
    writer.close()
    main([str(tmp_path), "--num-images", "64", "--guidance", "1", "3"])
    rows = {r["guidance"]: r for r in json.loads((tmp_path / "stats" / "stats.json").read_text())["scales"]}
    assert rows[3.0]["variations"] == "cache" and rows[3.0]["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1.0]["variations"] == "generated" and rows[1.0]["diversity"] > 0


@pytest.mark.parametrize("value", ["-3", "nan", "inf", "51"])
def test_stats_guidance_is_checked_as_the_config_checks_generator_guidance(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--config", "c.yaml", "--arch", "resnet18", "--weights", "w", "--out", "o", "--guidance", "2", value])
    assert e.value.code == 2
    assert f"argument --guidance: generator.guidance='{value}' is not valid: expected float >= 0.0 <= 50.0" \
        in capsys.readouterr().err


def test_stats_refuse_a_cache_in_the_old_layout_naming_migrate(tmp_path: Path) -> None:
    cfg = Config()
    cfg.data.resolution, cfg.train.width, cfg.output_dir = 16, 8, str(tmp_path)
    save_file(build_backbone(cfg.train).state_dict(), str(tmp_path / "backbone.safetensors"))
    save_config(cfg, tmp_path / "config.yaml")
    key = cfg.cache_root() / cache_key("c" * 16, "digits")
    key.mkdir(parents=True)  # as cache format 1 described a key: no version, "format": 1
    (key / "generator.json").write_text(json.dumps({"format": 1, "resolution": 16, "fingerprint": "c" * 16,
                                                    "dataset": "digits", "identity": {"guidance": 3.0}}))
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--num-images", "8", "--guidance", "3"])
    assert f"python -m onlinemix.cache migrate --cache.dir {cfg.cache_root()}" in str(e.value.code)


def test_stats_command_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert "no config.yaml" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(tmp_path / "c.yaml")])  # no extractor, no output directory
    assert e.value.code == 2
