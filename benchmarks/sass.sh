#!/usr/bin/env bash
# The GPU kernels' machine code without a GPU: compile the single-linear graph for sm_90a through MAX's virtual
# device, cut the cubins out of the .mef, and print each kernel's registers and instruction mix (nvdisasm from the
# nvidia-cuda-nvdisasm wheel: `pip download --no-deps nvidia-cuda-nvdisasm -d W && unzip W/*.whl -d W`, then
# NVDISASM=W/nvidia/cu13/bin/nvdisasm). SASS files land in ${SASS_DIR:-/tmp/caldera-sass}.
set -euo pipefail
dir="${SASS_DIR:-/tmp/caldera-sass}"
rm -rf "$dir" && mkdir -p "$dir"
# MAX caches compiled graphs by graph, not by kernel source: a cache of our own, so edited kernels are recompiled
export MODULAR_CACHE_DIR="$dir/cache"
python3 - "$dir" <<'PY'
import sys, torch
from pathlib import Path
from caldera.runtime import max_graph as mg
mg.compile_for_gpu(mg.IMPLS, mg.KernelSpec(), torch.bfloat16, "sm_90a", Path(sys.argv[1]) / "mef")
PY
python3 - "$dir" "${NVDISASM:-nvdisasm}" <<'PY'
import collections, re, struct, subprocess, sys
from pathlib import Path
out, nvdisasm = Path(sys.argv[1]), sys.argv[2]
data = next((out / "mef").rglob("*.mef")).read_bytes()
kernels = 0
for i, o in enumerate(m.start() for m in re.finditer(rb"\x7fELF", data)):
    if struct.unpack_from("<H", data, o + 0x12)[0] != 190:  # EM_CUDA
        continue
    shoff, phoff = struct.unpack_from("<Q", data, o + 0x28)[0], struct.unpack_from("<Q", data, o + 0x20)[0]
    phsize, phnum, shsize, shnum = struct.unpack_from("<HHHH", data, o + 0x36)
    end = max(shoff + shsize * shnum, phoff + phsize * phnum)
    for k in range(shnum):
        sh = o + shoff + k * shsize
        if struct.unpack_from("<I", data, sh + 4)[0] != 8:
            off, size = struct.unpack_from("<QQ", data, sh + 0x18)
            end = max(end, off + size)
    cubin = out / f"k{i}.cubin"
    cubin.write_bytes(data[o : o + end])
    sass = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    name = re.search(r"\.text\.(\S+):", sass).group(1)
    (out / f"{name}-{i}.sass").write_text(sass)
    ops = collections.Counter(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)", sass))
    regs = max((int(r) for r in re.findall(r"\bR(\d+)\b", sass)), default=0) + 1
    top = ", ".join(f"{op} {n}" for op, n in ops.most_common(10))
    print(f"{name[-16:]}-{i}  ~{regs} regs  {sum(ops.values())} instrs: {top}")
    kernels += 1
# MAX 26.7 leaves a kernel closure that calls another closure out of the graph without an error: compare the count
print(f"{kernels} kernels in the graph")
PY
