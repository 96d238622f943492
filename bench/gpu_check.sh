#!/usr/bin/env bash
# One-command check of every GPU path, on one GPU, with nothing downloaded (random weights), in
# under 8 minutes:
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default bench/results/gpu-check
#
# 1. generator: the full-size SD image-variation architecture, random weights, fp16, through the
#    package's generator, with SDPA and with xformers when it loads: finite, non-blank images;
# 2. bench/generate.py --full-size at 4 steps (images/s, wrapper overhead, FLOP bound);
# 3. a short online run, producer and trainer sharing the GPU (--gen-devices cuda:0);
# 4. bench/ring.py and bench/cache.py at 224 px;
# 5. the Triton view kernels (bench/augment.py on CUDA), when triton is installed.
#
# Prints one table (step, status, seconds, output) and writes OUT_DIR/gpu_check.json. Exits non-zero
# when any step fails, or at once when no CUDA device is visible.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-bench/results/gpu-check}
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}): run it on a machine with a GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1  # nothing is downloaded; a step that would need to fails
STEPS="$OUT/steps.tsv"
: > "$STEPS"

# step NAME TIMEOUT_S OUTPUT COMMAND...: run it with its output in OUT/NAME.log, record status and time.
step() {
    local name=$1 limit=$2 output=$3
    shift 3
    local started=$SECONDS status
    echo "== $name: $*" >&2
    if timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; then status=ok; else status="FAIL($?)"; fi
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - started))" "$output" >> "$STEPS"
    [[ $status == ok ]] || tail -n 20 "$OUT/$name.log" >&2
}

step generator 150 "$OUT/generator.log" "$PYTHON" - <<'EOF'
import torch
from onlinemix.config import GeneratorConfig
from onlinemix.generate import make_generator

images = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
for attention in ("sdpa", "xformers"):
    cfg = GeneratorConfig(model="full-size-random", dtype="fp16", attention=attention, steps=4, resolution=512)
    try:
        gen = make_generator(cfg, "cuda:0", 224)
    except Exception as e:  # xformers missing or broken: reported, not a failure (auto falls back to SDPA)
        if attention == "xformers":
            print(f"xformers: does not load ({' '.join(str(e).split())[:300]})")
            continue
        raise
    out = gen.generate(images, [1, 2])
    assert out.shape == (2, 3, 224, 224) and out.dtype == torch.uint8, (out.shape, out.dtype)
    assert out.float().std() > 1.0, "blank images"
    print(f"{attention}: ok, dtype {gen.dtype}, attention {gen.attention} ({gen.attention_reason}), "
          f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak")
EOF
step generate 200 "$OUT/generate.json" "$PYTHON" bench/generate.py --full-size --steps 4 --plain-steps 4 \
    --dtypes fp16 --attentions sdpa,xformers --batch-sizes 1,8 --repeats 2 --plain-repeats 1 --tiny-vae off \
    --out "$OUT/generate.json"
rm -rf "$OUT/run"
step online-run 180 "$OUT/run/shared-gpu/summary.json" "$PYTHON" -m onlinemix.train --gen-devices cuda:0 \
    --producer.memory-fraction 0.5 --generator.model full-size-random --generator.resolution 256 \
    --generator.steps 4 --generator.batch-size 8 --train.epochs 1 --train.batch-size 64 --probe.epochs 50 \
    --report-to none --output-dir "$OUT/run" --run-name shared-gpu
step ring 120 "$OUT/ring.json" "$PYTHON" bench/ring.py --resolutions 224 --producers 1,2 --consumers 1 --retries 0 \
    --out "$OUT/ring.json"
step cache 120 "$OUT/cache.json" "$PYTHON" bench/cache.py --resolutions 224 --mib 64 --dir "$OUT" \
    --out "$OUT/cache.json"
if "$PYTHON" -c "import triton" 2>/dev/null; then
    step triton 90 "$OUT/augment.json" "$PYTHON" bench/augment.py --device cuda --resolutions 224 --batches 256 \
        --recipes mixdiff_real,mixdiff_synthetic --out "$OUT/augment.json"
else
    printf 'triton\tnot installed\t0\t-\n' >> "$STEPS"
fi

"$PYTHON" - "$STEPS" "$OUT/gpu_check.json" <<'EOF'
import json
import sys

import torch

from onlinemix.files import write_json

rows = [dict(zip(("step", "status", "seconds", "output"), line.rstrip("\n").split("\t")))
        for line in open(sys.argv[1])]
failed = [r["step"] for r in rows if r["status"].startswith("FAIL")]
width = max(len(r["step"]) for r in rows)
print(f"\ngpu check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda})")
print(f"{'step':<{width}}  {'status':<14} {'seconds':>7}  output")
for r in rows:
    print(f"{r['step']:<{width}}  {r['status']:<14} {r['seconds']:>7}  {r['output']}")
write_json(sys.argv[2], {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                         "steps": [{**r, "seconds": int(r["seconds"])} for r in rows], "failed": failed})
print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all steps passed'}; wrote {sys.argv[2]}")
sys.exit(1 if failed else 0)
EOF
