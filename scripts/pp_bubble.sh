#!/usr/bin/env bash
# The pipeline bubble each schedule gives on this machine against plan.py's figure, and the in-flight activations
# and stage-boundary bytes against the plan (tests/pp_worker.py's `measure`), at pp 2 and pp 4 over gloo on CPU:
#   [PYTHON=.venv/bin/python] scripts/pp_bubble.sh [DATASET] [extra overrides...]   (default DATASET: data/pycode)
# The model: 8 layers of d 512, block 256, 16 micro-batches of 1 sequence, FP32. Each rank should have a core of
# its own: on a 2-core machine pp 4 shares them, and its bubble then measures the sharing, not the schedule.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-data/pycode}; shift || true
shape="model.n_embd=512:model.n_head=8:model.n_layer=8:model.block_size=256:train.batch_size=16${*:+:$(IFS=:; echo "$*")}"
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
for pp in 2 4; do
  cases=()
  for s in gpipe 1f1b interleaved_1f1b zero_bubble dualpipev; do cases+=("measure:$s:$shape"); done
  "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node=$pp tests/pp_worker.py "$data" "$out/$pp.json" \
    "${cases[@]}" > "$out/$pp.log" 2>&1 || { tail -20 "$out/$pp.log"; exit 1; }
  "${PYTHON:-python}" - "$out/$pp.json" "$pp" <<'PY'
import json, sys
for name, d in json.load(open(sys.argv[1])).items():
    print(f"pp {sys.argv[2]} {name.split(':')[1]:<17} bubble {d['bubble']:6.1%} (plan {d['planned_bubble']:5.1%})  "
          f"in flight {d['inflight']} (plan {[int(x) for x in d['planned_inflight']]})  "
          f"sent {d['sent'] / 2**20:.1f} MiB (plan {d['planned_sent'] / 2**20:.1f})  {d['microbatches']} micro-batches")
PY
done
