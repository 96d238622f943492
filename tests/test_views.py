"""View composition (onlinemix/views/compose.py): which image every view of every pairing comes from,
the recipe following the source, DINO's crops, the supervised views and labels, the pairing registry."""

from __future__ import annotations

import pytest
import torch

from onlinemix.core.config import ConfigError, load_config, needs_synthetic_views
from onlinemix.core.registry import PAIRINGS
from onlinemix.exchange.lookup import PairImages
from onlinemix.views.backends import BatchedViews, PerImageViews, choose_backend, make_backend
from onlinemix.views.compose import (
    Augmentation,
    ClassifierViews,
    MixDiff,
    Mixing,
    MultiCrops,
    Pairing,
    Real,
    Sequential,
    Synthetic,
    TwoViews,
    ViewComposer,
    ViewPlan,
    build_pairing,
)

RES = 16
B = 8
LABELS = torch.arange(100) % 3
GEOMETRY_ONLY = Augmentation("no_augmentation", 0.2)  # sources stay identifiable by their pixel values

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch(n: int = B, synthetic: list[bool] | None = None) -> PairImages:
    """Real images all 0, synthetic all 255; a fallback's second image is the real one again."""
    is_synthetic = torch.tensor([True] * n if synthetic is None else synthetic)
    real = torch.zeros(n, 3, RES, RES, dtype=torch.uint8)
    other = torch.where(is_synthetic[:, None, None, None], torch.full_like(real, 255), real)
    return PairImages(real, other, is_synthetic, torch.arange(n) * 7)


def source(view: torch.Tensor) -> list[str]:
    """Per sample: 'syn' for an all-255 crop (positive after normalisation), 'real' for all-0."""
    means = view.flatten(1).mean(1)
    assert ((means > 1) | (means < -1)).all(), "a view mixes both sources"
    return ["syn" if m > 0 else "real" for m in means.tolist()]


def composer(plan: ViewPlan, pairing: Pairing, seed: int = 0,
             augmentation: Augmentation = GEOMETRY_ONLY) -> ViewComposer:
    return ViewComposer(plan, pairing, augmentation, RES, seed, LABELS)


DINO_CROPS = MultiCrops(global_crop_min=0.4, local_crops=8)

# ----------------------------------------------------------------------------- pairings


@pytest.mark.parametrize("plan", [TwoViews(), ClassifierViews()])
@pytest.mark.parametrize("pairing,expected", [(MixDiff(), ("real", "syn")), (Real(), ("real", "real")),
                                              (Synthetic(), ("syn", "syn"))])
def test_pairings_take_the_right_sources(plan: ViewPlan, pairing: Pairing, expected: tuple[str, str]) -> None:
    views = composer(plan, pairing)(make_batch(), epoch=0, step=0)
    # The classifier takes view b only where it differs from view a: an image and its variation.
    assert len(views.images) == views.n_global == (2 if isinstance(plan, TwoViews) or pairing.two_sources else 1)
    for view, expected_source in zip(views.images, expected):
        assert view.shape == (B, 3, RES, RES) and source(view) == [expected_source] * B


def test_mixing_uses_one_source_per_sample_for_both_views_and_both_occur() -> None:
    view_a, view_b = composer(TwoViews(), Mixing())(make_batch(64), epoch=0, step=0).images
    a, b = source(view_a), source(view_b)
    assert a == b
    assert 15 < a.count("syn") < 49  # 50/50 over 64 samples


def test_mixing_is_seeded_per_composer_and_step() -> None:
    def picks(seed: int, step: int = 0) -> list[list[str]]:
        return [source(v) for v in composer(TwoViews(), Mixing(), seed)(make_batch(32), 0, step).images]

    assert picks(0) == picks(0)
    assert picks(123) != picks(0)  # each trainer rank gets its own seed
    assert picks(0, step=5) == picks(0, step=5) != picks(0)  # a pure function of the step: nothing to checkpoint


@pytest.mark.parametrize("real_epochs,switch", [(0, 2), (1, 1), (3, 3)])
def test_sequential_is_real_before_the_switch_then_synthetic(real_epochs: int, switch: int) -> None:
    train = load_config(None, {"train.epochs": "4", "train.sequential_real_epochs": str(real_epochs),
                               "train.pairing": "sequential"}).train
    pairing = build_pairing(train)
    assert pairing == Sequential(switch)
    compose = composer(TwoViews(), pairing)
    for epoch in range(4):
        expected = "real" if epoch < switch else "syn"
        assert pairing.at(epoch).uses_synthetic == (epoch >= switch)
        for view in compose(make_batch(), epoch, epoch).images:
            assert source(view) == [expected] * B, (epoch, switch)


@pytest.mark.parametrize("pairing", [MixDiff(), Synthetic()])
def test_missing_synthetic_view_falls_back_to_the_real_image(pairing: Pairing) -> None:
    flags = [False, True] * (B // 2)
    _, view_b = composer(TwoViews(), pairing)(make_batch(synthetic=flags), 0, 0).images
    assert source(view_b) == ["syn" if f else "real" for f in flags]


def test_recipe_follows_the_source() -> None:
    """The real-branch recipe for real images, the synthetic one for synthetic images."""
    compose = composer(TwoViews(), Synthetic(), augmentation=Augmentation("simclr", 0.2))
    real, synthetic = compose.branches
    assert real.recipe.blur_p == 1.0 and real.recipe.solarize_p == 0.0
    assert synthetic.recipe.solarize_p > 0.0 and synthetic.recipe.blur_p == 0.0
    calls = []

    class Recording:
        def reseed(self, seed: int) -> None:
            pass

        def __call__(self, images, is_synthetic, real_spec, synthetic_spec):
            calls.extend("syn" if s else "real" for s in is_synthetic.tolist())
            return torch.zeros(len(images), 3, RES, RES)

    compose.backend = Recording()
    compose(make_batch(2, [True, False]), 0, 0)
    assert calls == ["syn", "real", "syn", "real"]


@pytest.mark.parametrize("plan,pairing", [(TwoViews(), MixDiff()), (TwoViews(), Synthetic()), (TwoViews(), Real()),
                                          (DINO_CROPS, MixDiff()), (DINO_CROPS, Real())])
def test_the_batched_backend_crops_every_view_from_the_same_sources(plan: ViewPlan, pairing: Pairing) -> None:
    """The torch backend draws its own parameters, so pixels differ from torchvision's; which image
    each view comes from, how many views and their sizes must not."""
    batch = make_batch(synthetic=[True, False] * (B // 2))
    per_image = composer(plan, pairing)(batch, 0, 0)
    batched = ViewComposer(plan, pairing, GEOMETRY_ONLY, RES, 0, LABELS,
                           BatchedViews("torch", torch.device("cpu"), 0))(batch, 0, 0)
    assert [v.shape for v in batched.images] == [v.shape for v in per_image.images]
    assert [source(v) for v in batched.images] == [source(v) for v in per_image.images]
    assert batched.n_global == per_image.n_global


def test_backend_choice() -> None:
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu, 32)[0] == "torch"
    assert choose_backend("torchvision", cpu, 224) == ("torchvision", "requested")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        choose_backend("triton", cpu, 32)
    with pytest.raises(ConfigError, match="is for CPUs"):
        choose_backend("compiled", torch.device("cuda"), 224)
    backend, why = choose_backend("auto", cpu, 224)  # compiles hue (seconds, once per process)
    assert backend == "compiled" and "hue compiled in" in why


def test_auto_falls_back_to_torch_when_a_triton_launch_fails_and_says_why() -> None:
    """Triton compiles at its first launch, which fails without a driver, compiler or ptxas: found by a
    trial launch when the backend is chosen (here: no CUDA driver at all), not at step 0."""
    backend, why = choose_backend("auto", torch.device("cuda"), 224)
    assert backend == "torch" and why.startswith("auto: the Triton kernels cannot make views here (RuntimeError: ")
    with pytest.raises(ConfigError, match=r"train.augment_backend=triton: the Triton kernels cannot make views here "
                                          r"\(RuntimeError: .*\); use torch or auto"):
        choose_backend("triton", torch.device("cuda"), 224)
    assert isinstance(make_backend("torchvision", torch.device("cpu"), 0), PerImageViews)


def test_the_cpu_backend_recycles_a_batch_of_views_only_once_nothing_holds_it() -> None:
    """Two recipes fill one output batch (real rows and synthetic rows), which comes back for a later batch
    only after its holder let go of it."""
    real = torch.full((8, 3, 128, 128), 90, dtype=torch.uint8)
    batch = PairImages(real, torch.zeros_like(real), torch.tensor([True, False] * 4), torch.arange(8))
    compose = ViewComposer(TwoViews(), MixDiff(), Augmentation("simclr", 0.2), 128, 0, LABELS,
                           BatchedViews("torch", torch.device("cpu"), 0))
    first = compose(batch, 0, 0)
    held = first.images[1].clone()
    address = first.images[1].data_ptr()
    second = compose(batch, 0, 1)
    assert address not in {v.data_ptr() for v in second.images}
    assert torch.equal(first.images[1], held)
    del first
    assert address in {v.data_ptr() for v in compose(batch, 0, 2).images}


def test_every_registered_pairing_is_implemented_here() -> None:
    assert PAIRINGS.names() == ("mixdiff", "real", "synthetic", "mixing", "sequential")
    for name in PAIRINGS.names():
        cfg = load_config(None, {"train.pairing": name})
        pairing = build_pairing(cfg.train)
        assert isinstance(pairing, PAIRINGS.load(name)) and isinstance(pairing, Pairing)
        # The producers a config asks for match what the pairing reads, in some epoch.
        reads = any(pairing.at(epoch).uses_synthetic for epoch in range(cfg.train.epochs))
        assert reads == needs_synthetic_views(cfg), name


def test_sequential_has_no_sources_of_its_own() -> None:
    with pytest.raises(ValueError, match="at\\(epoch\\)"):
        Sequential(2).sources(make_batch(), torch.Generator())


# ----------------------------------------------------------------------------- DINO's crops


def test_dino_mixdiff_views_are_one_plus_six_real_and_one_plus_two_synthetic() -> None:
    views = composer(DINO_CROPS, MixDiff())(make_batch(), 0, 0)
    assert len(views.images) == 10 and views.n_global == 2
    assert [v.shape[-1] for v in views.images] == [RES, RES] + [8] * 8  # multicrop_sizes(16) = (16, 8)
    assert [source(v)[0] for v in views.images] == ["real", "syn"] + ["real"] * 6 + ["syn"] * 2
    assert all(len(set(source(v))) == 1 for v in views.images)


@pytest.mark.parametrize("pairing,expected", [(Real(), "real"), (Synthetic(), "syn")])
def test_dino_single_source_pairings_multicrop_one_image(pairing: Pairing, expected: str) -> None:
    views = composer(MultiCrops(0.4, local_crops=4), pairing)(make_batch(), 0, 0)
    assert [v.shape[-1] for v in views.images] == [RES, RES, 8, 8, 8, 8] and views.n_global == 2
    assert all(source(v) == [expected] * B for v in views.images)


def test_dino_mixing_keeps_each_sample_on_one_source_across_its_crops() -> None:
    views = composer(MultiCrops(0.4, local_crops=2), Mixing())(make_batch(32), 0, 0)
    per_view = [source(v) for v in views.images]
    assert all(s == per_view[0] for s in per_view) and len(set(per_view[0])) == 2


def test_dino_crop_scales_follow_the_plan() -> None:
    compose = composer(MultiCrops(global_crop_min=0.14, local_crops=2), Real(), augmentation=Augmentation("simclr", 0.2))
    global_crop, local_crop = compose.multicrop[0].recipe, compose.multicrop[-1].recipe
    assert global_crop.crop_scale == (0.14, 1.0) and local_crop.crop_scale == (0.05, 0.14)
    assert local_crop.jitter_p > 0
    flip_only = composer(DINO_CROPS, Real()).multicrop[-1].recipe
    assert flip_only.jitter_p == 0 and flip_only.blur_p == 0 and flip_only.flip_p > 0


# ----------------------------------------------------------------------------- supervised


@pytest.mark.parametrize("pairing", [MixDiff(), Real(), Mixing()])
def test_classifier_views_carry_the_labels_of_their_ids(pairing: Pairing) -> None:
    batch = make_batch()
    views = composer(ClassifierViews(), pairing)(batch, 0, 0)
    assert torch.equal(views.labels, LABELS[batch.ids]) and views.labels.dtype == torch.int64


def test_classifier_views_need_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        ViewComposer(ClassifierViews(), Real(), GEOMETRY_ONLY, RES, 0)


def test_views_move_with_their_labels() -> None:
    views = composer(ClassifierViews(), MixDiff())(make_batch(), 0, 0)
    moved = views.to(torch.device("cpu"))
    assert moved.n_global == views.n_global and torch.equal(moved.labels, views.labels)
    assert all(torch.equal(a, b) for a, b in zip(moved.images, views.images, strict=True))
