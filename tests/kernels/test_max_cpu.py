"""The Mojo ops on the CPU (MAX graphs) against docs/FORMAT.md in float64 and the unfused PyTorch path.

Tolerance: ||Δ||/||ref|| < 1e-5 with float32 activations (float32 dot products over ≤ 1536 terms land near 1e-7).
Graphs are compiled once per process (``max_graph.compiled``): the first test of each spec pays ~30 s.
"""

import pytest
import torch

from caldera.runtime import max_graph as mg
from caldera.runtime.compressed import CompressedLinear
from caldera.testing.format_reference import doc_forward
from caldera.testing.packed import random_packed_linear

pytestmark = pytest.mark.max

CASES = {
    # name: (m, n, options); 72, 80, 100, 200 are not multiples of the 16-row tile or the 64-column step
    "rank16-bias-no-incoherence": (80, 200, {"rank": 16, "incoherence": False, "bias": True}),
    "rank16-incoherence-bias": (64, 256, {"rank": 16, "bias": True}),
    "ragged-rank5": (72, 100, {"rank": 5}),
    "rank0": (96, 80, {"rank": 0}),
    "fp16-factors": (80, 96, {"rank": 8, "bl": 16, "br": 16}),
    "long-rows": (40, 1100, {"rank": 24, "incoherence": False}),
}
ROWS = (1, 7)  # decode (one token) and a few tokens


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_format_and_the_unfused_path(name):
    m, n, options = CASES[name]
    tensors, meta = random_packed_linear(m, n, seed=11, **options)
    module = CompressedLinear(tensors, "linear", meta)
    layer = mg.MaxLinear(module)
    assert layer.reason is None
    for rows in ROWS:
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
        reference, unfused = doc_forward(tensors, "linear", meta, x), module(x)
        for impl, y in zip(mg.IMPLS, layer.outputs(x, mg.IMPLS), strict=True):
            assert y.shape == (rows, m) and y.dtype == torch.float32
            err = rel_err(y, reference)
            assert err < 1e-5, f"{impl}, {rows} rows: ||Δ||/||ref|| = {err:.2e}"
            assert rel_err(y, unfused.double()) < 1e-5


def test_leading_dimensions_and_repeated_calls():
    tensors, meta = random_packed_linear(64, 256, rank=16, bias=True, seed=12)
    module = CompressedLinear(tensors, "linear", meta)
    layer = mg.MaxLinear(module)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(13))
    first = layer.outputs(x, mg.IMPLS)
    assert all(y.shape == (2, 3, 64) for y in first)
    assert all(map(torch.equal, layer.outputs(x, mg.IMPLS), first)), "the same inputs give the same bits"
    assert rel_err(first[0], doc_forward(tensors, "linear", meta, x)) < 1e-5


def test_a_model_routed_through_max():
    """``use_max`` swaps a model's compressed linears in place; the unsupported one keeps PyTorch."""
    parts = [
        random_packed_linear(48, 96, rank=8, seed=20),
        random_packed_linear(96, 48, rank=8, zero_point=True, seed=21),
    ]
    model = torch.nn.Sequential(*(CompressedLinear(t, "linear", meta) for t, meta in parts))
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(22))
    reference = model(x).double()
    assert mg.use_max(model) == {"1": "q: zero points are not supported by the kernels"}
    assert isinstance(model[0], mg.MaxLinear) and model[0].reason is None
    assert rel_err(model(x), reference) < 1e-5


def test_unsupported_layers_fall_back_to_pytorch():
    tensors, meta = random_packed_linear(64, 96, rank=8, zero_point=True, seed=14)
    module = CompressedLinear(tensors, "linear", meta)
    layer = mg.MaxLinear(module)
    assert layer.reason == "q: zero points are not supported by the kernels"
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(15))
    assert torch.equal(layer(x), module(x))
    tensors, meta = random_packed_linear(64, 96, rank=8, bq=3, seed=16)
    with pytest.raises(mg.Unsupported, match="3-bit codes"):
        mg.KernelSpec.of(CompressedLinear(tensors, "linear", meta))
    tensors, meta = random_packed_linear(64, 384, group_size=192, seed=17)  # 3 chunks of 64 columns per group
    module = CompressedLinear(tensors, "linear", meta)
    assert mg.KernelSpec.of(module).gq == 192  # the CPU kernels take any group
    with pytest.raises(mg.Unsupported, match="group size 192 is not 64 times a power of two"):
        mg.KernelSpec.of(module, "cuda")


@pytest.fixture(scope="module")
def real_layers():
    """Layer 0's q_proj (576×576) and k_proj (192×576) of the default model, decomposed (a synthetic SPD
    Hessian, one CALDERA round: the weights are real, the fit need not be good) and packed as exported."""
    from safetensors import safe_open

    from caldera.config import DecomposeConfig
    from caldera.core.decompose import decompose
    from caldera.io.default_model import default_model_dir
    from caldera.io.packed_format import incoherence_blocks, linear_metadata, linear_tensors
    from caldera.testing.hessians import random_spd_hessian

    cfg = DecomposeConfig.for_method("caldera", bq=2, rank=64, bl=4, br=4, iters=1)
    layers = {}
    with safe_open(default_model_dir() / "model.safetensors", "pt") as f:
        for proj in ("self_attn.q_proj", "self_attn.k_proj"):
            w = f.get_tensor(f"model.layers.0.{proj}.weight").float()
            dec = decompose(w, random_spd_hessian(w.shape[1], seed=18), cfg)
            tensors = linear_tensors(proj, dec) | incoherence_blocks([dec])
            layers[proj] = (tensors, linear_metadata(dec))
    return layers


@pytest.mark.parametrize("proj", ["self_attn.q_proj", "self_attn.k_proj"])
def test_real_exported_layer(real_layers, proj):
    tensors, meta = real_layers[proj]
    module = CompressedLinear(tensors, proj, meta)
    x = torch.randn(5, meta["shape"][1], generator=torch.Generator().manual_seed(17))
    reference = doc_forward(tensors, proj, meta, x)
    for y in mg.MaxLinear(module).outputs(x, mg.IMPLS):
        assert rel_err(y, reference) < 1e-5


@pytest.mark.parametrize("incoherence", (True, False))
def test_kept_weights_are_added_after_the_kernel(incoherence):
    """A linear with outliers (decompose --protect): the kernel's product plus S x in torch equals the format."""
    from caldera.config import DecomposeConfig
    from caldera.core.decompose import decompose
    from caldera.io.packed_format import incoherence_blocks, linear_metadata, linear_tensors
    from caldera.testing import lowrank_plus_noise, random_spd_hessian

    w, h = lowrank_plus_noise(64, 128, 8, seed=14, noise=0.3), random_spd_hessian(128, seed=15)
    cfg = DecomposeConfig(rank=8, iters=2, lr_iters=1, incoherence=incoherence, protect=0.002)
    dec = decompose(w, h, cfg)
    tensors, meta = linear_tensors("linear", dec) | incoherence_blocks([dec]), linear_metadata(dec)
    layer = mg.MaxLinear(CompressedLinear(tensors, "linear", meta))
    assert layer.reason is None and meta["outliers"] > 0
    x = torch.randn(7, 128, generator=torch.Generator().manual_seed(16))
    reference = doc_forward(tensors, "linear", meta, x)
    assert all(rel_err(y, reference) < 1e-5 for y in layer.outputs(x, mg.IMPLS))


def test_one_graph_over_several_layers():
    """`build_graph(..., sets=3)` (what the GPU benchmark captures): one x through three layers of different shapes,
    each output equal to that layer's own graph and within 1e-5 of docs/FORMAT.md in float64."""
    shapes = [(48, 128), (80, 128), (32, 128)]
    layers, specs = [], set()
    for i, (m, n) in enumerate(shapes):
        tensors, meta = random_packed_linear(m, n, rank=8, incoherence=False, seed=30 + i)
        module = CompressedLinear(tensors, "linear", meta)
        layers.append((tensors, meta, mg.KernelInputs.of(module, fuse_bias=True)))
        specs.add(mg.KernelSpec.of(module))
    (spec,) = specs
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(33))
    model = mg.compiled(("fused",), spec, torch.float32, mg.max_device("cpu"), 3)
    outs = model.execute(x, *[t for _, _, inputs in layers for t in inputs.args()])
    for (tensors, meta, inputs), out, (m, _) in zip(layers, outs, shapes, strict=True):
        y = torch.from_dlpack(out)
        assert y.shape == (5, m)
        assert torch.equal(y, mg.transformed_matmul(x, inputs, spec, ("fused",))[0])
        assert rel_err(y, doc_forward(tensors, "linear", meta, x.double())) < 1e-5
