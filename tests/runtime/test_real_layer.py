"""CompressedLinear on a real exported layer of the default model (SmolLM2-135M) and real activations."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from caldera.cli import app
from caldera.io.calibration import default_evaluation_texts, evaluation_windows
from caldera.io.default_model import default_model_dir
from caldera.io.model_folder import load_model, load_tokenizer
from caldera.io.packed_format import read_file_metadata
from caldera.io.run_dir import RunDir
from caldera.pipeline.decompose_model import PROJECTIONS
from caldera.pipeline.hessians import PROJ_PATH, decoder_layers
from caldera.pipeline.run_decompose import linear_prefix
from caldera.runtime.compressed import CompressedLinear
from caldera.testing.format_reference import doc_forward

LAYER = 3
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real_layer(tmp_path_factory):
    """(tensors, metas) of decoder layer LAYER as caldera decompose writes it, and its inputs on held-out text."""
    run = tmp_path_factory.mktemp("real") / "run"
    args = ["decompose", "--layers", str(LAYER), "--samples", "16", "--seq-len", "128", "--rank", "32"]
    result = CliRunner().invoke(app, [*args, "--iters", "1", "--run", str(run), "--json"])
    assert result.exit_code == 0, result.output
    path = RunDir(run).layer_path(LAYER)
    with safe_open(path, "pt") as f:
        metas = read_file_metadata(f.metadata())
    folder = default_model_dir()
    model = load_model(folder)
    ids = evaluation_windows(load_tokenizer(folder), default_evaluation_texts(), 64, max_tokens=128)  # (2, 64)
    inputs, layer = {}, decoder_layers(model)[LAYER]
    hooks = [
        layer.get_submodule(PROJ_PATH[p]).register_forward_pre_hook(lambda _m, a, p=p: inputs.setdefault(p, a[0]))
        for p in PROJECTIONS
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return load_file(path), metas, inputs


@pytest.mark.parametrize("proj", PROJECTIONS)
def test_compressed_linear_matches_the_format_on_real_activations(real_layer, proj):
    tensors, metas, inputs = real_layer
    prefix = linear_prefix(LAYER, proj)
    module, x = CompressedLinear(tensors, prefix, metas[prefix]), inputs[proj]  # x (2, 64, in) float32
    assert module.rank == min(32, *metas[prefix]["shape"]) and module.incoherence
    reference = doc_forward(tensors, prefix, metas[prefix], x)
    with torch.no_grad():
        y = module(x)
    rel = ((y.double() - reference).norm() / reference.norm()).item()
    assert rel < 1e-5, f"{proj}: ||Δ||/||ref|| = {rel:.2e}"
