"""The paper's linear evaluation protocol: fresh augmented views every epoch, a frozen backbone, seeded
results, a classifier that learns, read from an image store; the eval command's protocol column and options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from onlinemix.core.config import Config, LinearEvalConfig, save_config
from onlinemix.data import load_real_images
from onlinemix.data.prepare import Settings, prepare
from onlinemix.evaluation.evaluate import main
from onlinemix.evaluation.linear import LinearProtocol, fit_linear_classifier, training_view
from onlinemix.methods.backbones import build_backbone
from onlinemix.views.recipes import eval_transform

R = 16        # the views' side
STORED = 20   # the store's side: training views are crops of it, test views its centre crop
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Uses conftest's one-thread fixture: the tiny network gains nothing from more threads."""


def tiny_config() -> Config:
    cfg = Config()
    cfg.data.resolution = R
    cfg.train.width = 8
    return cfg


def digits_backbone(cfg: Config) -> nn.Module:
    """A random-weight backbone with the digits' BatchNorm statistics (one pass in train mode, cumulative
    averages): features at the scale a trained backbone's have, without a training run."""
    net = build_backbone(cfg.train)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    real = load_real_images(cfg.data)
    with torch.no_grad():
        net.train()(eval_transform()(real.images[real.train_ids]))
    return net.eval()


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(1)
    return digits_backbone(tiny_config())


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    real = load_real_images(tiny_config().data)
    return real.images[real.train_ids], real.labels[real.train_ids]


def protocol(epochs: int, batch_size: int, seed: int = 0, lr: float = 1.0) -> LinearProtocol:
    return LinearProtocol(LinearEvalConfig(epochs=epochs, batch_size=batch_size, lr=lr), "torch",
                          training_view(R, 0.2), seed)


def state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_every_epoch_sees_fresh_views_and_the_backbone_stays_frozen(backbone: nn.Module, digits) -> None:
    images, labels = digits[0][:16], digits[1][:16]
    seen: list[tuple[torch.Tensor, bool]] = []
    hook = backbone.register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), module.training)))
    before = state(backbone)
    backbone.train()  # the caller's mode is given back; the fit itself runs in eval mode
    try:
        fit_linear_classifier(backbone, images, labels, 10, protocol(epochs=2, batch_size=16), CPU, desc=None)
    finally:
        hook.remove()
    assert backbone.training
    backbone.eval()
    assert [training for _, training in seen] == [False, False]  # BatchNorm used its statistics, did not update them
    after = state(backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in backbone.parameters())
    (first, _), (second, _) = seen
    test_views = eval_transform()(images)
    assert first.shape == second.shape == (16, 3, R, R)
    # Every epoch makes new views of every image, none of them the test view (whatever the order).
    for view in torch.cat([first, second]):
        assert not any(torch.allclose(view, t) for t in test_views)
    assert not any(torch.allclose(a, b) for a in first for b in second)


def test_the_classifier_is_a_function_of_the_seed(backbone: nn.Module, digits) -> None:
    images, labels = digits[0][:64], digits[1][:64]

    def weights(seed: int) -> torch.Tensor:
        return fit_linear_classifier(backbone, images, labels, 10, protocol(2, 32, seed), CPU, desc=None).weight

    assert torch.equal(weights(0), weights(0))
    assert not torch.allclose(weights(0), weights(1))


# ----------------------------------------------------------------------------- the eval command

@pytest.fixture(scope="module")
def store_run(tmp_path_factory: pytest.TempPathFactory, backbone: nn.Module) -> Path:
    """A run on the digits prepared into a store at a larger stored size, with the digits backbone."""
    root = tmp_path_factory.mktemp("store-run")
    prepare("digits", root / "store", Settings(size=STORED), workers=1, progress=False)
    cfg = tiny_config()
    cfg.data.dataset = str(root / "store")
    save_file(backbone.state_dict(), str(root / "backbone.safetensors"))
    save_config(cfg, root / "config.yaml")
    return root


def test_the_linear_protocol_learns_from_a_store_and_the_table_names_each_protocol(store_run: Path, capsys) -> None:
    main([str(store_run), "--protocol", "both", "--random-init", "--linear-epochs", "1", "--linear-lr", "1",
          "--linear-batch-size", "64", "--probe-epochs", "20", "--out", str(store_run / "out")])
    result = json.loads((store_run / "out" / "eval" / f"{store_run.name}.json").read_text())
    rows = {(r["protocol"], r["method"], r["backbone"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((protocol, method, backbone) for protocol, method in
                                  (("fast", "linear probe"), ("fast", "kNN"), ("linear", "linear classifier"))
                                  for backbone in ("trained", "random_init"))
    linear = rows["linear", "linear classifier", "trained"]
    assert linear["n_eval"] == 359 and linear["split"].startswith("held-out")
    assert linear["top1"] > 30  # 10 classes: chance is 10%
    assert linear["top1"] > rows["linear", "linear classifier", "random_init"]["top1"] + 15
    settings = result["settings"]["linear classifier"]
    assert "SGD momentum 0.9, lr 0.25 (1 per 256 images)" in settings and "batch 64, 1 epochs" in settings
    assert "torch view backend" in settings and "RandomResizedCrop (scale [0.2, 1])" in settings
    printed = capsys.readouterr().out
    assert "| eval set | split | protocol | method | backbone |" in printed
    assert "| linear | linear classifier | trained |" in printed and "| fast | kNN | random_init |" in printed


def error_of(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    return str(e.value.code)


def test_bad_options(store_run: Path, capsys) -> None:
    assert error_of([str(store_run), "--protocol", "probe"]) == "2"
    assert "argument --protocol: invalid choice: 'probe'" in capsys.readouterr().err
    assert error_of([str(store_run), "--linear-epochs", "2"]) == "2"
    assert ("--linear-epochs: an option of the linear protocol, which --protocol fast does not run; add --protocol "
            "linear or --protocol both") in capsys.readouterr().err
    assert error_of([str(store_run), "--protocol", "linear", "--probe-epochs", "5"]) == "2"
    assert "--probe-epochs: an option of the fast protocol, which --protocol linear does not run" in capsys.readouterr().err
    assert error_of([str(store_run), "--protocol", "linear", "--linear-lr", "-1"]) == "2"
    assert "linear_eval.lr=" in capsys.readouterr().err
    assert error_of([str(store_run), "--protocol", "linear", "--linear-batch-size", "0"]) == "2"
    assert "linear_eval.batch_size='0' is not valid: expected int >= 1" in capsys.readouterr().err
    assert error_of([str(store_run), "--protocol", "linear", "--augment-backend", "fast"]) == "2"
    assert "train.augment_backend='fast' is not valid: expected one of 'auto'" in capsys.readouterr().err
