#!/usr/bin/env bash
# GPU host (after .gpu/env/activate.sh): GPU parity of several kernel trees side by side, then a short bench run of
# each so that its graphs are compiled before a timed `ab_trees.sh`:  bash benchmarks/parity_trees.sh TAG...
# TAG names the folder .gpu/TAG (unpacked from .gpu/trees.tgz if that is here), else this tree (e.g. "new"), as in
# `ab_trees.sh`. Each tree
# compiles into its own MAX cache, /tmp/mc-TAG, the one `ab_trees.sh` uses. SEQ and PROJ choose the warmed graphs
# (default: seq 128, every projection); PARITY=0 only warms; PARITY_K="tiles or qwen" runs only the cases pytest -k
# selects (a short lease). Logs: $OUT/parity-TAG.log, $OUT/warm-TAG.err.
set -u
out=${OUT:-/tmp} parity=${PARITY:-1}
[ -f .gpu/trees.tgz ] && tar xzf .gpu/trees.tgz -C .gpu
for tag in "$@"; do
  tree=$PWD; [ -d ".gpu/$tag" ] && tree=$PWD/.gpu/$tag
  ( cd "$tree" && export MODULAR_CACHE_DIR=/tmp/mc-$tag PYTHONPATH="$tree:/tmp/site"
    if [ "$parity" != 0 ]; then
      timeout 420 python3 -m pytest tests/kernels/test_max_gpu.py -q -p no:cacheprovider ${PARITY_K:+-k "$PARITY_K"} \
        > "$out/parity-$tag.log" 2>&1
      echo "parity rc $?" >> "$out/parity-$tag.log"
    fi
    timeout 150 python3 -m caldera bench --seq "${SEQ:-128}" --device gpu --impls fused --iters 2 --sets 2 \
      ${PROJ:+--projections $PROJ} --json > /dev/null 2> "$out/warm-$tag.err"
    echo "warm rc $?" >> "$out/warm-$tag.err" ) &
done
wait
for tag in "$@"; do
  said="no parity (PARITY=0)"
  [ "$parity" != 0 ] && said=$(grep -E 'passed|failed|skipped|error' "$out/parity-$tag.log" | tail -n 1)
  echo "$tag: $said | $(tail -n 1 "$out/warm-$tag.err")"
done
