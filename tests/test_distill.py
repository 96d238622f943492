"""The few-step student: trained from the teacher's guided samples, saved as a pipeline the generator runs
as it was trained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler

from onlinemix.core.config import DataConfig, GeneratorConfig
from onlinemix.data import load_real_images
from onlinemix.generation.generator import DISTILLATION_FILE, DiffusersVariationGenerator, make_generator
from onlinemix.tinymodel.__main__ import main as tinymodel_main
from onlinemix.tinymodel.distill import DistillSettings, distill, student_scheduler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("steps,timesteps", [(1, [999]), (2, [999, 499]), (4, [999, 749, 499, 249])])
def test_the_student_starts_from_pure_noise_and_predicts_the_sample(steps: int, timesteps: list[int]) -> None:
    teacher = DiffusersVariationGenerator(GeneratorConfig(), "cpu", 8).pipe.scheduler
    scheduler = student_scheduler(teacher, steps)
    assert scheduler.timesteps.tolist() == timesteps
    assert scheduler.config.prediction_type == "sample"
    assert torch.equal(scheduler.alphas_cumprod, teacher.alphas_cumprod)  # the teacher's noise schedule


@pytest.fixture(scope="module")
def student(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("distill") / "student"
    record = distill(GeneratorConfig(), DataConfig(), out, DistillSettings(steps=4, images=16, samples_per_image=2,
                                                                           batch_size=8))
    return out, record


def test_distillation_writes_a_pipeline_and_its_record(student) -> None:
    out, record = student
    saved = json.loads((out / DISTILLATION_FILE).read_text())
    assert saved["student_steps"] == 2 and saved["timesteps"] == [999, 499]
    assert saved["training_pairs"] == 32 and len(saved["loss"]) == 4
    assert saved["teacher"]["model"] == "digits-tiny" and saved["teacher"]["guidance"] == GeneratorConfig().guidance
    assert all(torch.isfinite(torch.tensor(saved["loss"])))
    assert (out / "loss.png").stat().st_size > 0 and not out.with_name("student.partial").exists()


def test_the_generator_runs_a_student_as_trained(student) -> None:
    out, _ = student
    gen = make_generator(GeneratorConfig(model=str(out), steps=10, guidance=3.0, scheduler="dpm++"), "cpu", 32)
    assert (gen.cfg.steps, gen.cfg.guidance, gen.cfg.scheduler) == (2, 1.0, "ddim")
    assert isinstance(gen.pipe.scheduler, DDIMScheduler) and gen.pipe.scheduler.config.prediction_type == "sample"
    teacher = make_generator(GeneratorConfig(), "cpu", 32)
    assert gen.fingerprint != teacher.fingerprint
    calls = []
    gen.pipe.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    images = load_real_images(DataConfig()).images[:3]
    out_images = gen.generate(images, [1, 2, 3])
    assert out_images.shape == (3, 3, 32, 32) and out_images.dtype == torch.uint8
    assert calls == [3, 3]  # two steps, no doubled batch for guidance


def test_distill_refuses_bad_settings_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1 to 8 steps"):
        distill(GeneratorConfig(), DataConfig(), tmp_path / "s", DistillSettings(student_steps=0))
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="is a file"):
        tinymodel_main(["distill", "--out", str(tmp_path / "file"), "--steps", "1"])
