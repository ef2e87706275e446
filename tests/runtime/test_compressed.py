"""CompressedLinear / CompressedEmbedding against docs/FORMAT.md read literally in float64."""

import pytest
import torch

from caldera.runtime.compressed import CompressedEmbedding, CompressedLinear
from caldera.testing.format_reference import doc_decode, doc_forward, doc_weight
from caldera.testing.packed import random_packed_linear

CASES = {
    # name: (m, n, options); 80 = 2^4·5 and 96 = 2^5·3 use odd blocks, 72 is not a multiple of the groups
    "rank16-4bit-lr": (80, 96, {"rank": 16, "bias": True}),
    "rank0": (96, 80, {"rank": 0}),
    "rank8-fp16-lr": (80, 96, {"rank": 8, "bl": 16, "br": 16}),
    "ragged-groups-zeros": (
        72,
        100,
        {"rank": 5, "bq": 3, "br": 8, "group_size": 40, "lr_group_size": 3, "zero_point": True},
    ),
    "no-incoherence": (64, 128, {"rank": 16, "incoherence": False, "bias": True}),
    "pow2-only": (128, 64, {"rank": 4}),
}


def _x(n: int, seed: int, rows: int = 7) -> torch.Tensor:
    return torch.randn(rows, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_the_documented_float64_forward(name):
    m, n, options = CASES[name]
    tensors, meta = random_packed_linear(m, n, seed=3, **options)
    module = CompressedLinear(tensors, "linear", meta)
    x = _x(n, seed=4)
    y, reference = module(x), doc_forward(tensors, "linear", meta, x)
    rel = ((y.double() - reference).norm() / reference.norm()).item()
    assert y.dtype == torch.float32 and y.shape == (7, m)
    assert rel < 1e-5, f"||Δ||/||ref|| = {rel:.2e}"  # float32 rounding of a few matmuls and transforms
    dense = module.dense_weight().double()
    assert ((dense - doc_weight(tensors, "linear", meta)).norm() / dense.norm()).item() < 1e-6
    assert (module.in_features, module.out_features, module.rank) == (n, m, options["rank"])


def test_leading_dimensions_and_bfloat16_activations():
    tensors, meta = random_packed_linear(80, 96, rank=16, bias=True, seed=5)
    module = CompressedLinear(tensors, "linear", meta)
    x = _x(96, seed=6, rows=12).reshape(2, 6, 96)
    reference = doc_forward(tensors, "linear", meta, x)
    assert module(x).shape == (2, 6, 80)
    scales = module.q.scales.clone()
    module.to(torch.bfloat16)  # what users do to a transformers model
    assert torch.equal(module.q.scales, scales), "scales are stored as an integer view: a dtype cast never rounds them"
    y = module(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert ((y.double() - reference).norm() / reference.norm()).item() < 1e-2


def test_nbytes_counts_the_stored_parts():
    tensors, meta = random_packed_linear(80, 96, rank=16, bias=True, seed=7)
    module = CompressedLinear(tensors, "linear", meta)
    stored = sum(
        t.numel() * t.element_size() for k, t in tensors.items() if k.startswith("linear.") and "bias" not in k
    )
    assert module.nbytes() == stored


def test_embedding_looks_up_dequantized_rows():
    tensors, meta = random_packed_linear(300, 64, bq=4, incoherence=False, seed=8, prefix="model.embed_tokens")
    module = CompressedEmbedding(tensors, "model.embed_tokens", meta)
    table = doc_decode(tensors, "model.embed_tokens.q", 4, 64, 300, 64, False)
    ids = torch.randint(0, 300, (3, 5), generator=torch.Generator().manual_seed(9))
    out = module(ids)
    assert out.shape == (3, 5, 64) and torch.equal(out.double(), table[ids])  # exact: codes × fp16 scales
    with pytest.raises(ValueError, match="rank 0 and no incoherence"):
        tensors, meta = random_packed_linear(300, 64, seed=8, prefix="model.embed_tokens")  # with incoherence
        CompressedEmbedding(tensors, "model.embed_tokens", meta)
