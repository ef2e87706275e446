"""The GPU branch of the ops compiles for the H100 (sm_90a) through MAX's virtual device: no GPU needed.

A compile error in kernels_mojo/gpu*.mojo fails this test (CI has no GPU). It runs in a subprocess because
virtual-device mode is process-wide; the probe leaves by os._exit once its files are listed (MAX's teardown after a
virtual-device compile aborted once in CI: "terminate called without an active exception", the work all done).
The GPU numbers themselves are checked on the H100 (runbook step 03).
"""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.max

PROBE = """
import os, sys, torch
from pathlib import Path
from caldera.runtime import max_graph as mg
out = Path(sys.argv[1])
mg.compile_for_gpu(mg.IMPLS, mg.KernelSpec(), torch.bfloat16, "sm_90a", out / "bf16")
# 4-bit Q in groups of 128 (4 chunks a group: no shared-memory ring), fp16 factors, fp16 activations
mg.compile_for_gpu(mg.IMPLS, mg.KernelSpec(4, 128, 16, 1, 16, 1), torch.float16, "sm_90a", out / "fp16")
print(sorted(p.suffix for p in out.rglob("*.mef")), flush=True)
os._exit(0)
"""


def test_gpu_branch_compiles_for_sm90a(tmp_path):
    run = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip().endswith("['.mef', '.mef']")


LAYER_PROBE = """
import os, sys
from pathlib import Path
from types import SimpleNamespace
from max.dtype import DType
from caldera.runtime import max_graph as mg, max_layer as ml
from caldera.runtime.compressed import CompressedLinear
from caldera.testing.packed import random_packed_linear
shapes = {"q_proj": (72, 72), "k_proj": (24, 72), "v_proj": (24, 72), "o_proj": (72, 72),
          "gate_proj": (45, 72), "up_proj": (45, 72), "down_proj": (72, 45)}
linears = {}
for i, (name, (m, n)) in enumerate(shapes.items()):
    tensors, meta = random_packed_linear(m, n, rank=8, bias=name in ("q_proj", "k_proj", "v_proj"), seed=i)
    linears[name] = CompressedLinear(tensors, "linear", meta)
attn = SimpleNamespace(**{k: v for k, v in linears.items() if not k.startswith(("gate", "up", "down"))})
mlp = SimpleNamespace(**{k: v for k, v in linears.items() if k.startswith(("gate", "up", "down"))})
steps = [*ml.layer_steps(SimpleNamespace(self_attn=attn, mlp=mlp))]
steps.append(ml.Step(((mlp.gate_proj, mlp.up_proj), (mlp.down_proj,)), swiglu=True))
plans = ml.LayerGraph(steps).plans
out = Path(sys.argv[1])
mg.compile_graph_for_gpu(lambda device: ml.build_layer_graph(plans, "fused", DType.bfloat16, device), "sm_90a", out)
print(sorted(p.suffix for p in out.rglob("*.mef")), flush=True)
os._exit(0)
"""


def test_layer_graph_compiles_for_sm90a(tmp_path):
    """The layer graph's GPU branch: the decoder layer's projections and the SwiGLU step, bf16 activations."""
    run = subprocess.run(
        [sys.executable, "-c", LAYER_PROBE, str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.strip().endswith("['.mef']")
