#!/usr/bin/env bash
# Here: pack git revisions as trees for the GPU host, one folder each, into .gpu/trees.tgz (carry it):
#   bash benchmarks/pack_trees.sh ahead2=next/codes-two-ahead-2 prev=main
# On the host `parity_trees.sh` and `ab_trees.sh` find them as .gpu/<name> (names without "-").
set -euo pipefail
rm -rf .gpu/trees && mkdir -p .gpu/trees
for pair in "$@"; do
  name=${pair%%=*} rev=${pair#*=}
  case $name in *-*|"") echo "tree name '$name': no '-' (ab_trees.sh cuts tags there)" >&2; exit 2;; esac
  mkdir -p ".gpu/trees/$name"
  git archive "$rev" caldera kernels_mojo pyproject.toml tests benchmarks | tar x -C ".gpu/trees/$name"
done
tar czf .gpu/trees.tgz -C .gpu/trees . && rm -rf .gpu/trees && ls -l .gpu/trees.tgz
