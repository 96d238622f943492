"""The device's peak FLOP/s per dtype: --peak-tflops for every dtype, else a datasheet figure for known GPUs,
else a measured matmul peak (the CPU, unknown GPUs)."""

from __future__ import annotations

import torch
from machine import device_name
from timing import Timer

# Dense (no sparsity) peak tensor-core TFLOP/s, per dtype, from NVIDIA's datasheets, whose
# headline tensor figures are "with sparsity": the dense figure is half of it.
#   H100 SXM5 / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/):
#     FP16/BF16 1,979 / 1,513 / 1,671 sparse; TF32 989 / 756 / 835 sparse; FP32 67 / 51 / 60 (no tensor cores).
#   H200 SXM / NVL: NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200/):
#     FP16/BF16 1,979 / 1,671 sparse; TF32 989 / 835 sparse; FP32 67 / 60.
#   A100 (SXM and PCIe, 40 and 80 GB): NVIDIA A100 Tensor Core GPU datasheet
#     (nvidia.com/en-us/data-center/a100/): FP16/BF16 624 sparse (312 dense); TF32 312 sparse; FP32 19.5.
# Matched against torch.cuda.get_device_name() in this order (the first substring found wins).
GPU_PEAK_TFLOPS = [
    ("H100 NVL", "NVIDIA H100 NVL", {"fp16": 835.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", "NVIDIA H100 PCIe", {"fp16": 756.5, "bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    ("H100", "NVIDIA H100 SXM5", {"fp16": 989.5, "bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("H200 NVL", "NVIDIA H200 NVL", {"fp16": 835.5, "bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", "NVIDIA H200 SXM", {"fp16": 989.5, "bf16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("A100", "NVIDIA A100", {"fp16": 312.0, "bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]
H100_CLASS = ("H100", "H200")


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """Best FLOP/s of a large square matmul in ``dtype`` with the current thread count ('measured matmul peak')."""
    sizes = ([1024] if quick else [1024, 2048]) if device.type == "cpu" else [8192]
    reps = 5 if device.type == "cpu" else 20
    best = 0.0
    with torch.inference_mode():
        for n in sizes:
            gen = torch.Generator(device).manual_seed(0)
            a = torch.randn(n, n, device=device, generator=gen).to(dtype)
            b = torch.randn(n, n, device=device, generator=gen).to(dtype)
            a @ b  # warm-up: kernel selection, page faults
            for _ in range(reps):
                with Timer(device) as t:
                    a @ b
                best = max(best, 2 * n ** 3 / t.seconds)
            del a, b
    return best


def peak_flops(device: torch.device, dtypes: list[str], override_tflops: float | None, quick: bool) -> dict:
    """Peak FLOP/s per dtype name, with where each number comes from."""
    per_dtype, sources = {}, {}
    name = device_name(device)
    table = next(((label, row) for key, label, row in GPU_PEAK_TFLOPS if key in name), None) \
        if device.type == "cuda" else None
    for d in dtypes:
        if override_tflops is not None:
            per_dtype[d], sources[d] = override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
        elif table is not None:
            label, row = table
            if d == "fp32":
                # cuDNN convolutions (most of the UNet and VAE) run in TF32 unless disabled, matmuls only when allowed.
                tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
                key = "tf32" if tf32 else "fp32"
            else:
                key = d
            per_dtype[d] = row[key] * 1e12
            sources[d] = f"datasheet: {label} dense {key.upper()} {row[key]:g} TFLOP/s"
        else:
            per_dtype[d] = measure_matmul_peak(device, getattr(torch, {"fp32": "float32", "fp16": "float16",
                                                                       "bf16": "bfloat16"}[d]), quick)
            where = f"{torch.get_num_threads()} thread(s)" if device.type == "cpu" else "device not in the table"
            sources[d] = f"measured matmul peak ({d}, {where})"
    return {"flop_s": per_dtype, "source": sources}
