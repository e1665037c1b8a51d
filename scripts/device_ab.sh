#!/usr/bin/env bash
# On the lent GPU: the runtime overhead of an earlier commit against the work tree,
# on one machine, alternating (hosts differ by several per cent between machines).
# Here, before the call:
#   mkdir -p .gpu/base && git archive <commit> iq_transform | tar -x -C .gpu/base
# then run "bash scripts/device_ab.sh" with carry [".gpu"] (after scripts/device_bundle.sh).
# Each base run swaps .gpu/base/iq_transform in as ./iq_transform, so the editable
# install imports it (PYTHONPATH does not win over it), and swaps it back after.
# PAIRS=3 by default; logs and JSON in $OUT.
set -o pipefail
R=$(pwd)
bash scripts/device_checks.sh
export PYTHONPATH=/tmp/site:$R IQ_TRANSFORM_DATA_DIR=$R/.gpu/data PYTHONUNBUFFERED=1
for i in $(seq "${PAIRS:-3}"); do
  for v in base new; do
    if [ $v = base ]; then mv iq_transform iq_transform.new && cp -r .gpu/base/iq_transform iq_transform; fi
    timeout 60 python3 benchmarks/runtime_overhead.py --model llama3-8b-planted --device cuda \
      --dtype bfloat16 --shapes 1x2048 --repeats 6 --output $OUT/ab_${v}_$i.json > $OUT/ab_${v}_$i.log 2>&1
    echo "$v $i: $(python3 -c 'import iq_transform, os; print(os.path.realpath(iq_transform.__file__))')"
    grep "^| decode\|^| prefill\|Error" $OUT/ab_${v}_$i.log
    if [ $v = base ]; then rm -rf iq_transform && mv iq_transform.new iq_transform; fi
  done
done
