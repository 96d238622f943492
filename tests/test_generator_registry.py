"""The generator registry: every registered pipeline builds and keeps the VariationGenerator contract,
modules are imported only when their pipeline is chosen, and the config accepts only registered names."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from onlinemix.core.cli import build_parser
from onlinemix.core.config import ConfigError, GeneratorConfig, load_config
from onlinemix.core.registry import GENERATORS
from onlinemix.generation.generator import VariationGenerator, make_generator

RES = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("pipeline", GENERATORS.names())
def test_every_registered_pipeline_builds_and_keeps_the_contract(pipeline: str) -> None:
    cfg = GeneratorConfig(model="stub", pipeline=pipeline, steps=2)
    gen = make_generator(cfg, "cpu", RES)
    assert type(gen) is GENERATORS.load(pipeline)
    assert isinstance(gen, VariationGenerator), f"{type(gen).__name__} lacks part of the VariationGenerator contract"
    identity = gen.identity()
    assert json.loads(json.dumps(identity)) == identity  # written to the cache's generator.json as is
    assert identity["model"] == "stub" and identity["guidance"] == cfg.guidance and identity["steps"] == 2
    assert identity["resolution"] == RES
    assert isinstance(gen.fingerprint, str) and gen.fingerprint
    assert gen.dtype == torch.float32 and gen.retries == 0 and gen.attention in ("sdpa", "xformers")
    images = torch.randint(0, 256, (2, 3, RES, RES), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = gen.generate(images, [1, 2])
    assert out.dtype == torch.uint8 and out.shape == images.shape


def test_pipelines_have_distinct_identities() -> None:
    """Pairs of different pipelines must never share a cache key."""
    cfgs = [GeneratorConfig(model="stub", pipeline=name, steps=2) for name in GENERATORS.names()]
    fingerprints = {make_generator(cfg, "cpu", RES).fingerprint for cfg in cfgs}
    assert len(fingerprints) == len(cfgs)


def test_the_protocol_rejects_an_incomplete_generator() -> None:
    @dataclasses.dataclass
    class NoIdentity:
        fingerprint: str = "f"
        attention: str = "sdpa"
        attention_reason: str = "requested"
        dtype: torch.dtype = torch.float32
        retries: int = 0

        def generate(self, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
            return images

    assert not isinstance(NoIdentity(), VariationGenerator)


def test_generate_module_imports_no_other_generator() -> None:
    """Building the default generator does not import versatile.py; choosing the versatile pipeline
    does (so the check can see the import)."""
    code = textwrap.dedent("""
        import sys
        from onlinemix.core.config import GeneratorConfig
        from onlinemix.generation.generator import make_generator
        make_generator(GeneratorConfig(steps=1), "cpu", 16)
        print("onlinemix.generation.versatile" in sys.modules)
        make_generator(GeneratorConfig(model="stub", steps=1, pipeline="versatile"), "cpu", 16)
        print("onlinemix.generation.versatile" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split() == ["False", "True"]


def test_unknown_pipeline_is_rejected_naming_the_registered_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"generator.pipeline": "dall-e"})
    message = str(err.value)
    assert "generator.pipeline" in message and "dall-e" in message
    assert all(f"'{name}'" in message for name in GENERATORS.names())


def test_help_describes_every_registered_pipeline() -> None:
    squashed = "".join(build_parser().format_help().split())
    for name in GENERATORS.names():
        assert f"'{name}'=" in squashed
    assert "".join(GENERATORS.describe().split()) in squashed
