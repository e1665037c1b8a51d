#!/usr/bin/env bash
# On the lent GPU (device tool, carry [".gpu"] after scripts/device_bundle.sh):
#   bash scripts/device_checks.sh runtime speed scale tests   (TESTS="..." TESTS_S=300)
# installs the carried wheels, links the data, runs the parts, logs into $OUT.
set -o pipefail
R=$(pwd)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl > $OUT/pip.log 2>&1 || { tail $OUT/pip.log; exit 1; }
export PYTHONPATH=/tmp/site:$R IQ_TRANSFORM_DATA_DIR=$R/.gpu/data PYTHONUNBUFFERED=1
mkdir -p ../shared && ln -sfn $R/.gpu/data ../shared/data
python3 -m pip install -q --no-deps --no-build-isolation -e . >> $OUT/pip.log 2>&1 || python3 -m pip install -q --no-deps -e . >> $OUT/pip.log 2>&1
nvidia-smi --query-gpu=name,clocks.sm,memory.used --format=csv > $OUT/gpu.txt
for part in "$@"; do
  case $part in
    runtime) timeout ${RUNTIME_S:-200} python3 benchmarks/runtime_overhead.py --model llama3-8b-planted --device cuda --dtype bfloat16 --shapes 1x2048 8x2048 --repeats 10 --sync-check --graph --output $OUT/runtime_overhead.json 2>&1 | tee $OUT/runtime.log | tail -30 ;;
    speed) timeout ${SPEED_S:-230} python3 benchmarks/speed_gpu.py --widths llama3-8b --out $OUT/speed_gpu_llama3-8b.json 2>&1 | tee $OUT/speed_gpu.log | grep "^|\|Error" | head -40 ;;
    scale) timeout 240 python3 benchmarks/oneshot_scale.py --samples 16 --seqlen 512 --out $OUT/oneshot_scale.json 2>&1 | tee $OUT/scale.log | grep -v "it/s\|s/it" | tail -30 ;;
    tests) timeout ${TESTS_S:-300} python3 -m pytest -q -m "not slow" -n 8 -v --tb=short -rf -p no:cacheprovider --ignore=tests/test_zero_shot.py $TESTS 2>&1 | tee $OUT/tests.log | tail -60 ;;
  esac
done
