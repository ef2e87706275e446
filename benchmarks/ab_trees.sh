#!/usr/bin/env bash
# A/B of kernel trees on the GPU host (after .gpu/env/activate.sh): bash benchmarks/ab_trees.sh TAG...
# Prints `caldera bench` medians per TAG, and copies its JSON rows to $OUT/ab-seqS-TAG.jsonl where $OUT is set.
# The part of TAG before "-" names a copy of the tree under .gpu/ (e.g. .gpu/old from `git archive HEAD caldera
# kernels_mojo pyproject.toml`), else this tree. Each tree compiles into its own MAX
# cache (MAX caches by graph, not by kernel source). SEQ, IMPLS and PROJ choose what is timed; PROJ is a
# --projections list (e.g. q_proj: one shape, so fewer graphs to compile and more trees in one call; trees older
# than that option do not take it).
root=$PWD
for tag in "$@"; do
  base=${tag%%-*}; tree=$root; [ -d "$root/.gpu/$base" ] && tree=$root/.gpu/$base
  ( cd "$tree" && MODULAR_CACHE_DIR=/tmp/mc-$base PYTHONPATH="$tree:/tmp/site" \
      timeout 200 python3 -m caldera bench --seq ${SEQ:-1} --device gpu --impls ${IMPLS:-fused,dense} ${PROJ:+--projections $PROJ} --json \
      > "/tmp/bench-$tag.jsonl" 2> "/tmp/bench-$tag.err" ) || { echo "bench $tag failed"; tail -n 5 "/tmp/bench-$tag.err"; }
  [ -n "${OUT:-}" ] && cp "/tmp/bench-$tag.jsonl" "$OUT/ab-seq${SEQ:-1}-$tag.jsonl"  # the rows, back with the call
  python3 - "/tmp/bench-$tag.jsonl" "$tag" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(sys.argv[2], "  ".join(f"{r['shape'][0]}x{r['shape'][1]} {r['impl'][:5]} {r['median_us']:.1f}" for r in rows if "median_us" in r), flush=True)
PY
done
