"""The diffusers variation generator, run on the CPU with the tiny stub diffuser."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_variation

from onlinemix.core.config import GeneratorConfig
from onlinemix.generation.generator import (
    MAX_RETRIES,
    SCHEDULERS,
    DiffusersVariationGenerator,
    GeneratorError,
    make_generator,
)
from onlinemix.tinymodel.__main__ import main as tinymodel_main

RES = 32


def random_images(n: int, h: int = RES, w: int = RES, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gen() -> DiffusersVariationGenerator:
    return DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", RES)


@pytest.fixture
def fresh_gen() -> DiffusersVariationGenerator:
    """A generator of its own, for tests that patch it or read its retry counter."""
    return DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", RES)


# ----------------------------------------------------------------------------- output


def test_output_dtype_and_shape(gen: DiffusersVariationGenerator) -> None:
    out = gen.generate(random_images(4), [1, 2, 3, 4])
    assert out.dtype == torch.uint8
    assert out.shape == (4, 3, RES, RES)
    assert out.device == torch.device("cpu")
    assert out.float().std() > 0  # not a constant image


def test_same_seeds_same_output(gen: DiffusersVariationGenerator) -> None:
    images = random_images(4)
    a = gen.generate(images, [10, 11, 12, 13])
    b = gen.generate(images, [10, 11, 12, 13])
    assert torch.equal(a, b)


def test_different_seed_different_output(gen: DiffusersVariationGenerator) -> None:
    images = random_images(4)
    a = gen.generate(images, [10, 11, 12, 13])
    b = gen.generate(images, [99, 11, 12, 13])
    assert not torch.equal(a[0], b[0])
    assert torch.equal(a[1:], b[1:])  # other images keep their own seeds


def test_output_independent_of_batch_mates(gen: DiffusersVariationGenerator) -> None:
    images = random_images(4)
    seeds = [5, 6, 7, 8]
    together = gen.generate(images, seeds)
    alone = gen.generate(images[:2], seeds[:2])
    assert_same_variation(together[:2], alone)
    swapped = gen.generate(images[[1, 0]], [seeds[1], seeds[0]])
    assert_same_variation(swapped, together[[1, 0]])


@pytest.mark.parametrize("resolution", [24, 23, 20])
def test_output_resolution(resolution: int) -> None:
    """Any configured resolution (config allows any int >= 8) comes out at that size.

    24 can be generated directly; 23 cannot, so the output is resized from the generation
    size; 20 is a multiple of the stub VAE's factor 2 but not of 8.
    """
    g = DiffusersVariationGenerator(GeneratorConfig(model="stub", steps=2), "cpu", resolution)
    assert g.gen_size % g.pipe.vae_scale_factor == 0 and g.gen_size >= resolution
    out = g.generate(random_images(2), [1, 2])
    assert out.dtype == torch.uint8
    assert out.shape == (2, 3, resolution, resolution)


# ----------------------------------------------------------------------------- preprocessing


def reference_preprocess(gen: DiffusersVariationGenerator, images: torch.Tensor, antialias: bool) -> torch.Tensor:
    clip = int(gen.pipe.image_encoder.config.image_size)
    fe = gen.pipe.feature_extractor
    mean = torch.tensor(fe.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(fe.image_std, dtype=torch.float32).view(1, 3, 1, 1)
    x = images.float() / 255.0
    x = F.interpolate(x, size=(clip, clip), mode="bicubic", antialias=antialias, align_corners=False)
    return (x - mean) / std


def test_preprocess_matches_training_preprocessing(gen: DiffusersVariationGenerator) -> None:
    """Whole image squashed to the CLIP size, bicubic without antialiasing, CLIP mean/std."""
    images = random_images(3, h=80, w=48)  # non-square and larger than CLIP: a downscale
    got = gen.preprocess(images)
    clip = int(gen.pipe.image_encoder.config.image_size)
    assert got.shape == (3, 3, clip, clip)
    torch.testing.assert_close(got.float(), reference_preprocess(gen, images, antialias=False),
                               rtol=0, atol=1e-5)


def test_preprocess_does_not_antialias(gen: DiffusersVariationGenerator) -> None:
    images = random_images(3, h=80, w=48)
    got = gen.preprocess(images).float()
    antialiased = reference_preprocess(gen, images, antialias=True)
    assert (got - antialiased).abs().max() > 1e-2


# ----------------------------------------------------------------------------- bad inputs


def test_float_images_rejected(gen: DiffusersVariationGenerator) -> None:
    with pytest.raises(TypeError, match="uint8"):
        gen.generate(random_images(2).float(), [1, 2])


@pytest.mark.parametrize("shape", [(0, 3, RES, RES), (3, RES, RES), (2, 2, RES, RES), (2, 3, 0, RES)])
def test_bad_shape_rejected(gen: DiffusersVariationGenerator, shape: tuple[int, ...]) -> None:
    images = torch.zeros(shape, dtype=torch.uint8)
    seeds = list(range(shape[0])) if len(shape) == 4 else [1, 2, 3]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        gen.generate(images, seeds)


def test_nan_images_are_rejected_naming_the_image(gen: DiffusersVariationGenerator) -> None:
    images = torch.rand(3, 3, RES, RES)
    images[2, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="image 2 .*NaN"):
        gen.generate(images, [1, 2, 3])


def test_grey_rgba_and_16_bit_batches_are_converted(gen: DiffusersVariationGenerator) -> None:
    rgb = random_images(2)
    grey = rgb[:, :1]
    expected_grey = gen.generate(grey.expand(-1, 3, -1, -1).contiguous(), [1, 2])
    assert torch.equal(gen.generate(grey, [1, 2]), expected_grey)
    rgba = torch.cat([rgb, torch.full_like(rgb[:, :1], 7)], dim=1)
    assert torch.equal(gen.generate(rgba, [1, 2]), gen.generate(rgb, [1, 2]))
    sixteen = rgb.to(torch.int32).mul(257).to(torch.uint16)
    assert torch.equal(gen.generate(sixteen, [1, 2]), gen.generate(rgb, [1, 2]))


def test_list_rejected(gen: DiffusersVariationGenerator) -> None:
    with pytest.raises(TypeError):
        gen.generate(list(random_images(2)), [1, 2])  # type: ignore[arg-type]


def test_seed_count_mismatch(gen: DiffusersVariationGenerator) -> None:
    with pytest.raises(ValueError, match="seeds"):
        gen.generate(random_images(3), [1, 2])


# ----------------------------------------------------------------------------- fingerprint


def test_fingerprint_stable_for_same_config() -> None:
    a = DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", RES)
    b = DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", RES)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("change", [{"guidance": 1.0}, {"steps": 4}, {"scheduler": "ddim"}, {"stub_seed": 1}])
def test_fingerprint_changes_with_output_affecting_settings(gen: DiffusersVariationGenerator,
                                                            change: dict[str, object]) -> None:
    other = DiffusersVariationGenerator(dataclasses.replace(GeneratorConfig(model="stub"), **change), "cpu", RES)
    assert other.fingerprint != gen.fingerprint


def test_fingerprint_changes_with_resolution(gen: DiffusersVariationGenerator) -> None:
    other = DiffusersVariationGenerator(GeneratorConfig(model="stub"), "cpu", 16)
    assert other.fingerprint != gen.fingerprint


# ----------------------------------------------------------------------------- attention


def test_xformers_requested_but_missing() -> None:
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers installed")
    with pytest.raises(GeneratorError, match="xformers"):
        DiffusersVariationGenerator(GeneratorConfig(model="stub", attention="xformers"), "cpu", RES)


def test_auto_attention_falls_back_to_sdpa() -> None:
    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers installed")
    g = DiffusersVariationGenerator(GeneratorConfig(model="stub", attention="auto"), "cpu", RES)
    assert g.attention == "sdpa"


def test_sdpa_requested(gen: DiffusersVariationGenerator) -> None:
    g = DiffusersVariationGenerator(GeneratorConfig(model="stub", attention="sdpa"), "cpu", RES)
    assert g.attention == "sdpa"


# ----------------------------------------------------------------------------- non-finite outputs


def fake_run(gen: DiffusersVariationGenerator, nan_calls: int | None, nan_image: int = 1
             ) -> tuple[Callable[[torch.Tensor, list[int], np.ndarray], torch.Tensor], list[list[int]]]:
    """A stand-in for ``_run``: the first call yields 0.25 everywhere (but one black pixel, so
    images are not blank) with NaN in ``nan_image``; the next ``nan_calls - 1`` calls yield
    all-NaN, later ones 0.75. ``None``: NaN for ever."""
    calls: list[list[int]] = []

    def run(pixels: torch.Tensor, seeds: list[int], noises: np.ndarray) -> torch.Tensor:
        calls.append(list(seeds))
        out = torch.full((len(seeds), 3, gen.gen_size, gen.gen_size), 0.25 if len(calls) == 1 else 0.75)
        out[:, :, 0, 0] = 0.0
        if len(calls) == 1:
            out[nan_image] = float("nan")
        elif nan_calls is None or len(calls) <= nan_calls:
            out[:] = float("nan")
        return out

    return run, calls


def test_non_finite_image_is_regenerated(fresh_gen: DiffusersVariationGenerator,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run, calls = fake_run(fresh_gen, nan_calls=1)
    monkeypatch.setattr(fresh_gen, "_run", run)
    seeds = [100, 101, 102, 103]
    out = fresh_gen.generate(random_images(4), seeds)
    assert fresh_gen.retries == 1
    assert len(calls) == 2
    assert len(calls[1]) == 1 and calls[1][0] != seeds[1]  # only image 1, with a new seed
    assert out.shape == (4, 3, RES, RES) and out.dtype == torch.uint8
    assert (out[1, :, 1:] == round(0.75 * 255)).all()  # the regenerated image
    for i in (0, 2, 3):
        assert (out[i, :, 1:] == round(0.25 * 255)).all()  # the untouched images


def test_last_allowed_retry_is_used(fresh_gen: DiffusersVariationGenerator,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An image that becomes finite on the MAX_RETRIES-th regeneration is accepted, not discarded."""
    run, calls = fake_run(fresh_gen, nan_calls=MAX_RETRIES)
    monkeypatch.setattr(fresh_gen, "_run", run)
    out = fresh_gen.generate(random_images(4), [100, 101, 102, 103])
    assert len(calls) == 1 + MAX_RETRIES
    assert fresh_gen.retries == MAX_RETRIES
    assert (out[1, :, 1:] == round(0.75 * 255)).all()


def test_blank_image_is_regenerated(fresh_gen: DiffusersVariationGenerator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A flat image (what a safety checker or a broken decoder leaves) is never passed on."""
    real_run = fresh_gen._run
    calls = []

    def run_with_one_blank(pixels: torch.Tensor, seeds: list[int], noises: np.ndarray) -> torch.Tensor:
        out = real_run(pixels, seeds, noises)
        if not calls:
            out[2] = 0.0
        calls.append(seeds)
        return out

    monkeypatch.setattr(fresh_gen, "_run", run_with_one_blank)
    out = fresh_gen.generate(random_images(3), [5, 6, 7])
    assert fresh_gen.retries == 1 and calls[1] != [7] and len(calls[1]) == 1
    assert out[2].float().std() > 1


def test_always_non_finite_raises(fresh_gen: DiffusersVariationGenerator,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run, calls = fake_run(fresh_gen, nan_calls=None)
    monkeypatch.setattr(fresh_gen, "_run", run)
    with pytest.raises(GeneratorError, match="non-finite"):
        fresh_gen.generate(random_images(4), [100, 101, 102, 103])
    assert len(calls) == 1 + MAX_RETRIES  # bounded: no endless regeneration
    # Each regeneration uses a seed not tried before.
    retried = [c[0] for c in calls[1:]]
    assert len(set(retried)) == len(retried) and 101 not in retried


# ----------------------------------------------------------------------------- schedulers


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_every_scheduler_generates(name: str) -> None:
    g = DiffusersVariationGenerator(GeneratorConfig(model="stub", scheduler=name, steps=4), "cpu", RES)
    assert isinstance(g.pipe.scheduler, SCHEDULERS[name])
    out = g.generate(random_images(2), [1, 2])
    assert out.shape == (2, 3, RES, RES) and out.dtype == torch.uint8
    assert torch.equal(out, g.generate(random_images(2), [1, 2]))


def test_non_finite_output_of_the_real_pipeline_is_regenerated(fresh_gen: DiffusersVariationGenerator,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline's own output is an inference tensor; regenerating into it must work."""
    real_run = fresh_gen._run
    calls = []

    def run_with_one_nan(pixels: torch.Tensor, seeds: list[int], noises: np.ndarray) -> torch.Tensor:
        out = real_run(pixels, seeds, noises)
        if not calls:
            out[0, 0, 0, 0] = float("nan")
        calls.append(seeds)
        return out

    monkeypatch.setattr(fresh_gen, "_run", run_with_one_nan)
    images = random_images(3)
    out = fresh_gen.generate(images, [5, 6, 7])
    assert fresh_gen.retries == 1 and len(calls) == 2 and len(calls[1]) == 1
    assert torch.equal(out[1:], fresh_gen.generate(images[1:], [6, 7]))


def test_generation_size_is_independent_of_the_ring_resolution() -> None:
    gen = DiffusersVariationGenerator(GeneratorConfig(model="stub", resolution=64), "cpu", 24)
    assert gen.gen_size == 64
    assert gen.generate(random_images(2), [1, 2]).shape == (2, 3, 24, 24)


@pytest.mark.parametrize("model", ["./missing_model", "/no/such/model", "models/sd/missing", "~/no-such-model-dir"])
def test_a_missing_local_model_is_named_as_a_missing_directory(model: str) -> None:
    """Passed on, the hub client would blame the path's syntax as a repo id."""
    with pytest.raises(FileNotFoundError, match=f"^generator.model {re.escape(model)}: no such directory"):
        make_generator(GeneratorConfig(model=model), "cpu", RES)


def test_tinymodel_quality_names_a_missing_model() -> None:
    with pytest.raises(SystemExit) as e:
        tinymodel_main(["quality", "--model", "./missing_model", "--num-images", "2"])
    assert str(e.value.code).startswith("error: generator.model ./missing_model: no such directory")


def test_loading_the_bundled_model_prints_no_warning_and_no_progress_bar(capsys) -> None:
    """Every producer start loads it: a deprecation warning or per-component bars would fill every log."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_generator(GeneratorConfig(), "cpu", RES)
    assert [str(w.message) for w in caught if "dtype" in str(w.message)] == []
    err = capsys.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err, err
