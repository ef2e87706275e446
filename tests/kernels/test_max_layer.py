"""Layer graphs (caldera.runtime.max_layer) on the CPU against docs/FORMAT.md in float64 and the unfused path.

Tolerance: ||Δ||/||ref|| < 1e-5 with float32 activations, per projection (float32 transforms and dot products:
~2e-7 measured); the logits of a tiny model with every decoder layer through layer graphs equal the unfused
model's within 1e-5. Four graphs are compiled, each once per session: the decoder layer's projections as one
graph (shared by the random and the exported layer: same structure, symbolic dims), and the three a forward
pass runs (q/k/v, o, SwiGLU MLP).
"""

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import caldera
from caldera.io.packed_format import read_file_metadata
from caldera.runtime import max_graph as mg
from caldera.runtime import max_layer as ml
from caldera.runtime.compressed import CompressedLinear
from caldera.testing.format_reference import doc_forward
from caldera.testing.packed import random_packed_linear

pytestmark = pytest.mark.max

ATTN, MLP = ("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj")
STEP_INPUTS = (0, 0, 0, 1, 2, 2, 3)  # the step (input) each projection reads, in layer_steps' output order
HIDDEN, KV, INTER = 72, 24, 45  # 8·9, 8·3, 45 odd: blocks of 9, 3 and 45, Hadamard factors down to 1
RANDOM = {  # name: (out, in, options); q/k/v with biases as in Qwen2
    "q_proj": (HIDDEN, HIDDEN, {"rank": 8, "bias": True}),
    "k_proj": (KV, HIDDEN, {"rank": 8, "bias": True}),
    "v_proj": (KV, HIDDEN, {"rank": 5, "bias": True}),
    "o_proj": (HIDDEN, HIDDEN, {"rank": 0}),
    "gate_proj": (INTER, HIDDEN, {"rank": 8}),
    "up_proj": (INTER, HIDDEN, {"rank": 8}),
    "down_proj": (HIDDEN, INTER, {"rank": 8}),
}


def errors(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """||Δ||/||ref||, max |Δ|, mean |Δ|."""
    d = (y.double() - ref.double()).abs()
    return (d.norm() / ref.double().norm()).item(), d.max().item(), d.mean().item()


def as_layer(linears: dict[str, CompressedLinear]) -> SimpleNamespace:
    """The attributes of a transformers decoder layer that ``layer_steps`` reads."""
    attn = SimpleNamespace(**{n: linears[n] for n in ATTN})
    return SimpleNamespace(self_attn=attn, mlp=SimpleNamespace(**{n: linears[n] for n in MLP}))


@pytest.fixture(scope="module")
def random_layer() -> dict[str, tuple[dict, dict]]:
    """{projection: (tensors, metadata)}: random packed tensors (FORMAT.md), every matrix with signs of its own."""
    return {
        name: random_packed_linear(m, n, seed=30 + i, prefix=name, **options)
        for i, (name, (m, n, options)) in enumerate(RANDOM.items())
    }


def check_layer(raw: dict[str, tuple[dict, dict, str]], linears: dict[str, CompressedLinear], rows: int) -> None:
    """The full-layer graph's seven outputs vs FORMAT.md (float64) and the unfused path, on seeded inputs."""
    graph = ml.LayerGraph(ml.layer_steps(as_layer(linears)))
    gen = torch.Generator().manual_seed(rows)
    n = [linears[name].in_features for name in ("q_proj", "o_proj", "gate_proj", "down_proj")]
    xs = [torch.randn(2, rows, width, generator=gen) for width in n]  # leading dims (2, rows)
    outputs = graph(*xs)
    for name, y, step in zip((*ATTN[:3], ATTN[3], *MLP), outputs, STEP_INPUTS, strict=True):
        tensors, meta, prefix = raw[name]
        x = xs[step]
        assert y.shape == (2, rows, meta["shape"][0]) and y.dtype == torch.float32
        rel, worst, mean = errors(y, doc_forward(tensors, prefix, meta, x))
        assert rel < 1e-5, f"{name}, {rows} rows: ||Δ||/||ref|| {rel:.1e}, max |Δ| {worst:.1e}, mean {mean:.1e}"
        assert errors(y, linears[name](x))[0] < 1e-5


@pytest.mark.parametrize("rows", [1, 7])
def test_layer_graph_on_random_odd_widths(random_layer, rows):
    linears = {name: CompressedLinear(t, name, meta) for name, (t, meta) in random_layer.items()}
    check_layer({name: (t, meta, name) for name, (t, meta) in random_layer.items()}, linears, rows)


def test_layer_graph_on_an_exported_layer(exported):
    layer = caldera.load(exported).model.layers[1]
    linears = {name: getattr(layer.self_attn if name in ATTN else layer.mlp, name) for name in (*ATTN, *MLP)}
    raw = {}
    for path in sorted(exported.glob("model*.safetensors")):
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metas = read_file_metadata(f.metadata())
        for prefix, meta in metas.items():
            if prefix.startswith("model.layers.1."):
                raw[prefix.rsplit(".", 1)[1]] = (tensors, meta, prefix)
    assert sorted(raw) == sorted(linears)
    check_layer(raw, linears, 5)


def test_logits_of_a_model_through_layer_graphs(exported):
    model = caldera.load(exported)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(40))
    with torch.no_grad():
        reference = model(ids).logits
        assert mg.use_max(model, scope="layer") == {}
        layer = model.model.layers[0]
        assert isinstance(layer.self_attn.q_proj, ml.MaxProjection) and isinstance(layer.mlp, ml.MaxMLP)
        logits = model(ids).logits
        again = model(ids[:, :5]).logits  # another token count, same compiled models
    assert mg.use_max(model, scope="layer") == {} and isinstance(layer.mlp.gate_proj, CompressedLinear)  # no-op
    rel, worst, mean = errors(logits, reference)
    assert rel < 1e-5, f"logits: ||Δ||/||ref|| {rel:.1e}, max |Δ| {worst:.1e}, mean {mean:.1e}"
    assert errors(again, reference[:, :5])[0] < 1e-5


def test_group_plan_shares_coinciding_input_transforms():
    """Matrices decomposed with one seed share U_in: one stacked row; k/v (one width) share the inverse transform."""
    parts = [random_packed_linear(m, 48, rank=4, seed=s, bias=b) for m, s, b in ((48, 1, False), (24, 1, True))]
    parts.append(random_packed_linear(24, 48, rank=4, seed=2))
    plan, tensors = ml.plan_group([CompressedLinear(t, "linear", meta) for t, meta in parts])
    assert plan.rows == (0, 0, 1) and plan.out_sets == ((1, 2), (0,)) and plan.out_bias == (True, False)
    assert tensors["in.signs"].shape == (2, 1, 48) and tensors["out0.bias"].shape == (2, 1, 24)
    assert torch.equal(tensors["out0.bias"][1], torch.zeros(1, 24))  # v has no bias: zeros in the stack


def test_unsupported_groups_fall_back():
    """A group the kernels cannot run (zero points) stays on the per-linear path, here PyTorch."""
    parts = {n: random_packed_linear(32, 32, rank=4, zero_point=True, seed=i) for i, n in enumerate(ATTN)}
    attn = torch.nn.Module()
    for n, (t, meta) in parts.items():
        setattr(attn, n, CompressedLinear(t, "linear", meta))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(41))
    reference = attn.q_proj(x)
    reason = "q: zero points are not supported by the kernels"
    expected = {"q_proj+k_proj+v_proj": reason, "o_proj": reason} | dict.fromkeys(ATTN, reason)
    assert mg.use_max(attn, scope="layer") == expected
    assert torch.equal(attn.q_proj(x), reference)
