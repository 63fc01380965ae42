#!/usr/bin/env bash
# GPU checks for a lent CUDA machine (the `device` tool): builds the CUDA kernels, runs the CUDA op tests
# against the grid_sample reference, and times the op backends. Run from the repository root; results
# go to $OUT (or ./gpu_check_out). The machine's own python3 has torch; fvcore/pycocotools are not needed.
set -uo pipefail
out="${OUT:-gpu_check_out}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/sdetr_ext}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python3 -m sparse_detr.cli doctor 2>&1 | tee "$out/doctor.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_ops_cuda.py tests/test_ops.py tests/test_deformable_attention.py \
    2>&1 | tee "$out/tests.txt"
for dtype in float32 bfloat16; do
    python3 -m sparse_detr.cli benchmark-op --repeats 20 --dtype "$dtype" --output "$out/op_benchmark_$dtype.csv" \
        2>&1 | tee "$out/op_benchmark_$dtype.txt"
done
# Model benchmark (FPS at batch 1 and 4, float32 and bf16 autocast): sparse-rho0.1 against deformable-topk-bbr at
# 800x1066, 50 timed passes each. GFLOPs do not depend on the device and fvcore is not installed there: --no-flops.
reports="$out/model_benchmark"
mkdir -p "$reports"
for amp in none bf16; do
    python3 -m sparse_detr.cli benchmark --preset deformable-topk-bbr,sparse-rho0.1 --input-size 800x1066 \
        --batch-sizes 1,4 --no-flops $([ "$amp" = none ] || echo --amp "$amp") --output "$reports/$amp" \
        2>&1 | tee "$reports/$amp.txt"
done
# the device tool brings back at most 8 files from $OUT: one archive for the model benchmark's reports
tar -czf "$out/model_benchmark.tar.gz" -C "$out" model_benchmark && rm -r "$reports"
# onnxruntime's CUDA provider, when the machine has onnxruntime-gpu (nothing can be installed there: it is offline)
python3 -c "import onnxruntime as ort; print('onnxruntime', ort.__version__, ort.get_available_providers())" \
    > "$out/onnxruntime.txt" 2>&1 || echo "onnxruntime not installed: no ONNX check on the GPU" > "$out/onnxruntime.txt"
# TensorRT: FP32 and FP16 engines from `sdetr export --msda tensorrt` files, against PyTorch on the GPU
python3 scripts/tensorrt_check.py --out "$out/tensorrt_files" > "$out/tensorrt.txt" 2>&1
rm -rf "$out/tensorrt_files"
