"""The view backends: who turns a batch's uint8 images into float views, and which one a run uses.

- ``torchvision``: :class:`PerImageViews`, torchvision.transforms.v2 one image at a time on the CPU, the
  ground truth the others are tested against;
- ``torch`` and ``compiled``: :class:`BatchedViews` over :mod:`~onlinemix.views.torch_backend` (with hue
  compiled by Inductor for ``compiled``, :mod:`~onlinemix.views.compiled`);
- ``triton``: :class:`BatchedViews` over the fused kernels of ``onlinemix_kernels.augment``, on CUDA.

:func:`choose_backend` resolves ``train.augment_backend`` (``auto`` included) for a device.
"""

from __future__ import annotations

from functools import partial

import torch

from onlinemix.core.config import ConfigError
from onlinemix.views.buffers import RecycledTensors
from onlinemix.views.compiled import COMPILE_MIN_SIZE, warm_up
from onlinemix.views.params import ViewParams, sample_view_params
from onlinemix.views.recipes import ViewRecipe, build_transform
from onlinemix.views.specs import ViewSpec
from onlinemix.views.torch_backend import augment_views


class PerImageViews:
    """torchvision.transforms.v2, one call per image on the CPU: the ground truth the batched
    backends are tested against (their parameters are drawn from the same distributions)."""

    name = "torchvision"

    def __init__(self) -> None:
        self._transforms: dict[ViewSpec, object] = {}

    def reseed(self, seed: int) -> None:
        """v2 transforms draw from torch's global generator, so that is what a batch's seed sets."""
        torch.manual_seed(seed)

    def __call__(self, images: torch.Tensor, synthetic: torch.Tensor, real: ViewSpec, other: ViewSpec) -> torch.Tensor:
        pick = [self._transform(other if syn else real) for syn in synthetic.tolist()]
        return torch.stack([transform(image) for transform, image in zip(pick, images.cpu(), strict=True)])

    def _transform(self, spec: ViewSpec):
        if spec not in self._transforms:
            self._transforms[spec] = build_transform(spec.recipe, spec.size)
        return self._transforms[spec]


class BatchedViews:
    """A whole batch per call: per-sample parameters drawn as torchvision draws them
    (``view_params``), pixels made by the plain-torch backend (``compiled``: with hue compiled) or
    the fused Triton kernels on the device, from its own seeded generator. On the CPU, output batches
    are recycled once nothing holds them (``buffers``)."""

    def __init__(self, name: str, device: torch.device, seed: int) -> None:
        self.name = name
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.outputs = RecycledTensors() if device.type == "cpu" else None
        if name == "triton":
            from onlinemix_kernels.augment import augment_views_triton  # imports triton: only when chosen

            def run(images: torch.Tensor, params: ViewParams, out: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
                views = augment_views_triton(images, params, torch.float32)
                return views if out is None else out.index_copy_(0, rows.to(out.device), views)
            self.run = run
        else:
            self.run = partial(augment_views, compiled=name == "compiled")

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, images: torch.Tensor, synthetic: torch.Tensor, real: ViewSpec, other: ViewSpec) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        shape = (len(images), 3, real.size, real.size)
        out = self.outputs.empty(shape) if self.outputs is not None else None  # None: the backend allocates
        if real == other:  # one recipe for every row: no split
            return self.run(images, self.params(real, images, len(images)), out=out)
        if out is None:
            out = torch.empty(shape, device=self.device)
        for spec, rows in ((real, ~synthetic), (other, synthetic)):
            index = rows.nonzero().flatten()
            if len(index):
                self.run(images.index_select(0, index.to(self.device)), self.params(spec, images, len(index)),
                         out=out, rows=index)
        return out

    def params(self, spec: ViewSpec, images: torch.Tensor, n: int) -> ViewParams:
        """``n`` samples of ``spec``'s parameters for crops of ``images``' size, from this backend's generator."""
        return sample_view_params(spec.recipe, n, images.shape[2], images.shape[3], spec.size, self.generator)


ViewBackend = PerImageViews | BatchedViews


def choose_backend(requested: str, device: torch.device, view_size: int) -> tuple[str, str]:
    """(backend, why): ``auto`` = the Triton kernels on CUDA when they load; on the CPU, the torch backend
    with hue compiled for views of at least ``compiled_ops.COMPILE_MIN_SIZE`` px when that compiles, else
    the torch backend. ``compiled`` is compiled here, so a failure is known before training."""
    if requested == "triton" and device.type != "cuda":
        raise ConfigError(f"train.augment_backend=triton needs a CUDA device; this run trains on {device.type} "
                          "(use torch)")
    if requested == "compiled":
        if device.type != "cpu":
            raise ConfigError(f"train.augment_backend=compiled is for CPUs; this run trains on {device.type} "
                              "(use triton or torch)")
        try:
            return "compiled", f"requested; hue compiled in {warm_up():.1f}s"
        except RuntimeError as e:
            raise ConfigError(f"train.augment_backend=compiled: {e} (use torch)") from e
    if requested == "triton":
        problem = triton_problem(device)
        if problem is not None:
            raise ConfigError(f"train.augment_backend=triton: the Triton kernels cannot make views here ({problem}); "
                              "use torch or auto")
        return "triton", "requested; a trial launch matched the torch backend"
    if requested != "auto":
        return requested, "requested"
    if device.type == "cpu":
        if view_size < COMPILE_MIN_SIZE:
            return "torch", f"auto: {view_size} px views on the CPU (hue is compiled from {COMPILE_MIN_SIZE} px)"
        try:
            return "compiled", f"auto: {view_size} px views on the CPU; hue compiled in {warm_up():.1f}s"
        except RuntimeError as e:
            return "torch", f"auto: on the CPU, and {e}"
    if device.type != "cuda":
        return "torch", f"auto: training on {device.type}, where the Triton kernels do not run"
    problem = triton_problem(device)
    if problem is not None:
        return "torch", f"auto: the Triton kernels cannot make views here ({problem})"
    return "triton", "auto: training on CUDA; a trial launch matched the torch backend"


TRIAL_RECIPE = ViewRecipe(blur_p=0.5, solarize_p=0.5)  # every kernel and every colour operation
TRIAL_TOLERANCE = 1e-3  # the kernels match the torch backend to about 2e-5 in float32


def triton_problem(device: torch.device) -> str | None:
    """Why the Triton kernels cannot make views on ``device``, or None. Triton compiles at the first launch,
    with a C compiler, libcuda and ptxas: one launch on a small batch here, checked against the torch
    backend, finds a missing piece before training instead of at step 0 in the input-pipeline thread."""
    try:
        from onlinemix_kernels.augment import augment_views_triton

        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8, generator=generator)
        params = sample_view_params(TRIAL_RECIPE, len(images), 24, 24, 16, generator)
        ours = augment_views_triton(images.to(device), params, torch.float32).cpu()
        error = float((ours - augment_views(images, params)).abs().max())
    except Exception as e:  # ImportError, no driver, no compiler, a failed compilation
        return f"{e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not error <= TRIAL_TOLERANCE:
        return f"a trial launch differs from the torch backend by {error:.3g}"
    return None


def make_backend(name: str, device: torch.device, seed: int) -> ViewBackend:
    """The view backend ``name`` (after ``choose_backend``); batched ones make views on ``device``."""
    return PerImageViews() if name == "torchvision" else BatchedViews(name, device, seed)
