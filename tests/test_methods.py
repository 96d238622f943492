"""Methods (onlinemix/methods/): the views each loss takes, DINO's teacher and its inputs, one
optimisation step per method, the supervised baseline learning, the trainer's wiring, the recipes."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_views import RES, B, make_batch, source

from onlinemix.core.config import Config, ConfigError, leaves, load_config, needs_synthetic_views
from onlinemix.core.registry import METHODS, resolve
from onlinemix.data import RealImages, fraction_subset, select_train_ids
from onlinemix.exchange.lookup import PairImages
from onlinemix.methods.build import StepInfo, build_method
from onlinemix.methods.dino import DINO
from onlinemix.methods.optim import build_optimizer
from onlinemix.methods.supervised import Supervised
from onlinemix.views.compose import (
    Augmentation,
    ClassifierViews,
    MultiCrops,
    TwoViews,
    ViewComposer,
    Views,
    build_pairing,
)

REPO = Path(__file__).resolve().parent.parent
NUM_CLASSES = 3


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_cfg(dino: dict[str, object] | None = None, **train: object) -> Config:
    """Tiny sizes, geometry-only views (sources identifiable by their pixel values); ``train`` and
    ``dino`` override keys of those sections."""
    overrides = {"data.resolution": str(RES), "train.width": "4", "train.augmentation": "no_augmentation",
                 "barlowtwins.projector": "16-16", "dino.out_dim": "16", "dino.hidden_dim": "16",
                 "dino.bottleneck_dim": "8", "simclr.proj_dim": "8"}
    overrides.update({f"train.{k}": str(v) for k, v in train.items()})
    overrides.update({f"dino.{k}": str(v) for k, v in (dino or {}).items()})
    return load_config(None, overrides)


def method_for(name: str, dino: dict[str, object] | None = None, **train: object):
    return build_method(make_cfg(dino, method=name, **train), NUM_CLASSES)


def views_for(method, batch: PairImages | None = None, pairing: str = "mixdiff", epoch: int = 0,
              augmentation: str = "no_augmentation") -> Views:
    """The batch's views as the trainer composes them for this method (onlinemix/views/compose.py)."""
    cfg = make_cfg(pairing=pairing, augmentation=augmentation)
    compose = ViewComposer(method.view_plan, build_pairing(cfg.train), Augmentation.from_config(cfg), RES,
                           cfg.train.seed, torch.arange(100) % NUM_CLASSES)
    return compose(make_batch() if batch is None else batch, epoch, step=0)


@pytest.mark.parametrize("name,plan", [("simclr", TwoViews()), ("barlowtwins", TwoViews()),
                                       ("supervised", ClassifierViews()), ("dino", MultiCrops(0.4, 8))])
def test_each_method_names_the_views_its_loss_takes(name: str, plan) -> None:
    assert method_for(name).view_plan == plan


def test_dino_crop_plan_comes_from_its_config() -> None:
    assert method_for("dino", {"global_crop_min": 0.14, "local_crops": 2}).view_plan == MultiCrops(0.14, 2)


# ----------------------------------------------------------------------------- DINO


def test_dino_teacher_receives_exactly_the_two_globals() -> None:
    method = method_for("dino")
    seen = []
    method.teacher.net["backbone"].register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].clone()))
    views = views_for(method)
    method(views, StepInfo(0, 0, 10))
    assert len(seen) == 1 and seen[0].shape == (2 * B, 3, RES, RES)
    assert torch.equal(seen[0], torch.cat(views.images[:2]))
    assert source(seen[0]) == ["real"] * B + ["syn"] * B


def test_dino_teacher_shares_no_storage_and_is_not_a_child() -> None:
    method = method_for("dino")
    assert isinstance(method, DINO)
    teacher_ptrs = {t.data_ptr() for t in method.teacher.state_dict().values()}
    student_ptrs = {t.data_ptr() for t in method.state_dict().values()}
    assert not teacher_ptrs & student_ptrs
    assert not any(k.startswith("teacher") for k in method.state_dict())
    assert all(not p.requires_grad for p in method.teacher.parameters())
    ids = {id(p) for p in method.parameters()}
    assert not any(id(p) in ids for p in method.teacher.parameters())
    # Same initial values: the teacher starts as the student.
    for p_t, p_s in zip(method.teacher.net.parameters(), method.student().parameters(), strict=True):
        assert torch.equal(p_t, p_s)


# ----------------------------------------------------------------------------- one step per method


def one_step(method, pairing: str = "mixdiff", lr: float = 1e-2, step: int = 0, epoch: int = 0):
    optimizer = build_optimizer("adamw", method, lr, 1e-4)
    info = StepInfo(step, epoch, 100)
    loss, logs = method(views_for(method, pairing=pairing, epoch=epoch, augmentation="simclr"), info)
    optimizer.zero_grad()
    loss.backward()
    method.after_backward(info)
    optimizer.step()
    method.after_step(info)
    return loss, logs


@pytest.mark.parametrize("name", METHODS.names())
def test_one_step_gives_a_finite_loss_and_moves_the_parameters(name: str) -> None:
    method = method_for(name, augmentation="simclr")
    before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    loss, logs = one_step(method)
    assert torch.isfinite(loss) and isinstance(logs, dict)
    changed = [k for k, v in method.backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed), "no backbone weight changed"


def test_dino_teacher_moves_only_by_the_ema_and_the_center_updates() -> None:
    method = method_for("dino", {"momentum": 0.9}, augmentation="simclr")
    teacher_before = [p.clone() for p in method.teacher.net.parameters()]
    last_before = method.head.last_layer.parametrizations.weight.original1.clone()
    one_step(method, step=0, epoch=0)
    assert all(p.grad is None for p in method.teacher.parameters())
    # EMA at step 0 uses the base momentum: teacher = 0.9 * old + 0.1 * new student.
    for p_t, old, p_s in zip(method.teacher.net.parameters(), teacher_before, method.student().parameters(),
                             strict=True):
        torch.testing.assert_close(p_t, 0.9 * old + 0.1 * p_s)
    assert any(not torch.equal(p, old) for p, old in zip(method.teacher.net.parameters(), teacher_before,
                                                           strict=True))
    assert method.teacher.center.center.abs().sum() > 0
    # Epoch 0 < dino.freeze_last_layer_epochs (1): the prototypes did not move; at epoch 1 they do.
    assert torch.equal(method.head.last_layer.parametrizations.weight.original1, last_before)
    one_step(method, step=50, epoch=1)
    assert not torch.equal(method.head.last_layer.parametrizations.weight.original1, last_before)


def test_supervised_learns_a_fixed_batch() -> None:
    cfg = make_cfg(method="supervised", pairing="real")
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    method = build_method(cfg, NUM_CLASSES)
    assert isinstance(method, Supervised)
    g = torch.Generator().manual_seed(0)
    batch = PairImages.real_only(torch.randint(0, 256, (B, 3, RES, RES), dtype=torch.uint8, generator=g), np.arange(B))
    optimizer = build_optimizer("adamw", method, 1e-2, 0.0)
    compose = ViewComposer(method.view_plan, build_pairing(cfg.train), Augmentation.from_config(cfg), RES, 0, labels)
    views = compose(batch, 0, 0)
    assert len(views.images) == 1 and torch.equal(views.labels, labels)  # one image view for 'real'
    losses = []
    for step in range(30):
        loss, _ = method(views, StepInfo(step, 0, 30))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ----------------------------------------------------------------------------- config and trainer wiring


@pytest.mark.parametrize("pairing", ["mixdiff", "synthetic", "mixing", "sequential"])
def test_pairings_with_synthetic_views_need_producers(pairing: str) -> None:
    with pytest.raises(ConfigError, match="gen_gpus"):
        load_config(None, {"train.pairing": pairing, "gen_gpus": "0"})
    assert needs_synthetic_views(load_config(None, {"train.pairing": pairing}))


@pytest.mark.parametrize("method", METHODS.names())
def test_real_pairing_needs_no_producers(method: str) -> None:
    cfg = load_config(None, {"train.pairing": "real", "gen_gpus": "0", "train.method": method})
    assert not needs_synthetic_views(cfg)


@pytest.mark.parametrize("name", METHODS.names())
def test_each_method_declares_its_settings_next_to_its_code_and_gets_them(name: str) -> None:
    cls = METHODS.load(name)
    reference = METHODS.settings().get(name)
    if reference is None:  # the supervised baseline has no settings of its own
        assert name not in {key.split(".")[0] for key, _, _ in leaves()}
        return
    section = resolve(reference)
    assert section.__module__ == cls.__module__ and type(getattr(Config(), name)) is section
    assert {key.split(".")[1] for key, _, _ in leaves() if key.startswith(f"{name}.")} == {
        f.name.removesuffix("_") for f in dataclasses.fields(section)}


def test_bad_barlowtwins_projector_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="barlowtwins.projector"):
        load_config(None, {"barlowtwins.projector": "8192x8192"})


def test_real_fraction_selects_one_nested_stratified_subset() -> None:
    labels = torch.arange(200) % 4
    real = RealImages(torch.zeros(200, 3, 1, 1, dtype=torch.uint8), labels, list("abcd"), torch.arange(40, 200),
                      torch.arange(40))
    full = load_config(None, {})
    assert torch.equal(select_train_ids(real, full.data), real.train_ids)
    half = load_config(None, {"data.real_fraction": "0.5"}).data
    quarter = load_config(None, {"data.real_fraction": "0.25"}).data
    ids_half, ids_quarter = select_train_ids(real, half), select_train_ids(real, quarter)
    assert len(ids_half) == 80 and len(ids_quarter) == 40
    assert set(ids_quarter.tolist()) <= set(ids_half.tolist())
    assert torch.equal(ids_half, fraction_subset(real.train_ids, 0.5, 0, labels))


def test_producers_follow_the_trainers_own_schedule(tmp_path: Path) -> None:
    """The producers' job carries the trainers' EpochSchedule itself (train.real_fraction's ids, their order):
    pickled for a spawned producer, it names the same image at every position, across epochs."""
    import pickle

    from accelerate import Accelerator

    from onlinemix.data import load_real_images
    from onlinemix.exchange.ring import PairRing
    from onlinemix.generation.producer import ProducerPool
    from onlinemix.train import Trainer

    cfg = load_config(None, {"data.real_fraction": "0.5", "train.width": "4", "train.batch_size": "32",
                             "output_dir": str(tmp_path)})
    real = load_real_images(cfg.data)
    trainer = Trainer(cfg, Accelerator(cpu=True), tmp_path, real)
    assert len(trainer.schedule.train_ids) == round(0.5 * len(real.train_ids))
    ring = PairRing.local(64)
    job = ProducerPool(cfg, ring, ["cpu"], trainer.schedule, tmp_path).specs[0].job
    assert job.schedule is trainer.schedule
    copy = pickle.loads(pickle.dumps(job.schedule))
    positions = np.arange(0, 3 * trainer.schedule.positions_per_epoch, 7)
    assert np.array_equal(copy.ids_at(positions), trainer.schedule.ids_at(positions))


def test_trainer_builds_the_configured_optimizer_and_scaled_lr(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from onlinemix.data import load_real_images
    from onlinemix.methods.optim import LARS
    from onlinemix.train import Trainer

    cfg = load_config(None, {"train.method": "barlowtwins", "train.optimizer": "lars", "train.lr": "0.2",
                             "train.lr_scaling": "linear", "train.batch_size": "64", "train.width": "4",
                             "train.pairing": "real", "gen_gpus": "0"})
    trainer = Trainer(cfg, Accelerator(cpu=True), tmp_path, load_real_images(cfg.data))
    assert isinstance(trainer.optimizer.optimizer, LARS)
    assert trainer.base_lr == pytest.approx(0.2 * 64 / 256)
    assert type(trainer.method).__name__ == "BarlowTwins"


# ----------------------------------------------------------------------------- recipes


RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
EXPECTED = {"simclr": "lars", "barlowtwins": "lars", "dino": "adamw"}


def test_every_method_has_an_in100_and_an_in1k_recipe() -> None:
    assert {p.stem for p in RECIPES} == {f"{d}-{m}" for d in ("in100", "in1k") for m in EXPECTED}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_has_the_papers_settings(path: Path) -> None:
    cfg = load_config(path)
    method = path.stem.split("-", 1)[1]
    assert cfg.train.method == method and cfg.train.pairing == "mixdiff"
    assert cfg.train.backbone == "resnet50" and cfg.data.resolution == 224
    assert cfg.train.optimizer == EXPECTED[method] and cfg.train.lr_scaling == "linear"
    assert cfg.generator.model == "lambdalabs/sd-image-variations-diffusers" and cfg.generator.resolution == 512
    assert cfg.generator.guidance == 3.0 and cfg.generator.steps == 50
    assert cfg.data.min_crop_scale == 0.08 and cfg.train.augmentation == "simclr"
    assert path.read_text().startswith("#")  # documented at the top
    if method == "barlowtwins":
        assert cfg.barlowtwins.lambda_ == 0.0051 and cfg.barlowtwins.projector == "8192-8192-8192"
    if method == "dino":
        assert cfg.train.clip_grad == 3.0 and cfg.dino.out_dim == 65536 and cfg.dino.momentum == 0.996
    if path.stem == "in1k-simclr":
        assert cfg.train.epochs == 100
    # Every pairing of the paper is one flag away from the recipe.
    for pairing in ("real", "synthetic", "mixing", "sequential"):
        assert load_config(path, {"train.pairing": pairing}).train.pairing == pairing
    assert yaml.safe_load(path.read_text())["train"]["method"] == method


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_states_its_launch_and_a_memory_estimate_that_fits(path: Path) -> None:
    """The comment's global batch, rank count, launch and memory estimate agree with the recipe's per-rank batch
    (bench/memory.py measures the estimate); a changed batch without them fails here."""
    text, cfg = path.read_text(), load_config(path)
    scale = re.search(r"global batch (\d+) \((\d+) per rank x (\d+) ranks\)", text)
    glob, per_rank, ranks = map(int, scale.groups())
    assert per_rank == cfg.train.batch_size and per_rank * ranks == glob
    assert f"takes {ranks} trainer ranks" in text and f"num_processes {ranks}" in text
    assert "4+gen_gpus" not in text  # --num_processes counts trainer ranks only
    gb, batch = map(int, re.search(r"# Memory: about (\d+) GB per trainer rank at (\d+) per rank", text).groups())
    assert batch == cfg.train.batch_size and gb <= 70  # 10 GB of an 80 GB GPU left for context and allocator
