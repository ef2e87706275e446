"""caldera.load: an exported folder as a transformers model whose logits are those of the dense dequantized model."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import caldera
from caldera.cli import app
from caldera.io.model_folder import load_model
from caldera.io.packed_format import read_file_metadata, read_linear
from caldera.runtime.compressed import CompressedEmbedding, CompressedLinear
from caldera.runtime.load import LoadError
from caldera.testing.tiny_models import tiny_llama

runner = CliRunner()
FAST = ["--samples", "4", "--seq-len", "32", "--rank", "16", "--iters", "2", "--bl", "4", "--br", "4"]


def _export(model, calib, tmp, embed_bits: int):
    run, out = tmp / "run", tmp / f"out{embed_bits}"
    if not run.exists():
        args = ["decompose", "--model", str(model), "--calib", str(calib), *FAST, "--run", str(run), "--json"]
        assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(out), "--embed-bits", str(embed_bits)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def exports(qwen2_dir, calib_file, tmp_path_factory):
    """{(name, embed_bits): (original folder, exported folder)}: Qwen2 with biases, untied; Llama with tied head."""
    tmp = tmp_path_factory.mktemp("load")
    llama = tiny_llama(tmp / "llama-tied", seed=4, tie_word_embeddings=True)
    out = {}
    for name, folder in (("qwen2", qwen2_dir), ("llama-tied", llama)):
        for bits in (16, 4):
            out[name, bits] = folder, _export(folder, calib_file, tmp / name, bits)
    return out


def dense_reference(original, exported) -> torch.nn.Module:
    """The original model with every exported tensor put in place densely: linears as PackedLinear.dense_weight(),
    packed embeddings dequantized, fp16 norms and embeddings as stored (read through caldera.io, not the runtime)."""
    model = load_model(original)
    state = model.state_dict()
    for path in sorted(exported.glob("model-*.safetensors")):
        tensors = load_file(path)
        with safe_open(path, "pt") as f:
            metas = read_file_metadata(f.metadata())
        for prefix, meta in metas.items():
            linear = read_linear(tensors, prefix, meta)
            tied = prefix == "model.embed_tokens" and model.config.tie_word_embeddings
            targets = [prefix] + (["lm_head"] if tied else [])
            for target in targets:
                state[f"{target}.weight"].copy_(linear.dense_weight())
            if linear.bias is not None:
                state[f"{prefix}.bias"].copy_(linear.bias.float())
        for name, t in tensors.items():
            if name in state:
                state[name].copy_(t.float())
    return model


def _ids(vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("key", [("qwen2", 16), ("qwen2", 4), ("llama-tied", 16), ("llama-tied", 4)])
def test_logits_equal_the_dense_dequantized_model(exports, key):
    original, exported = exports[key]
    model = caldera.load(exported)
    linears = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(linears) == 2 * 7 + (key[1] < 16)  # every projection; the head too when packed
    assert isinstance(model.get_input_embeddings(), CompressedEmbedding) == (key[1] < 16)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.model.layers.modules())
    reference = dense_reference(original, exported)
    ids = _ids(model.config.vocab_size, seed=1)
    with torch.no_grad():
        logits, expected = model(ids).logits, reference(ids).logits
    rel = ((logits - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, f"||Δ||/||ref|| = {rel:.2e} (float32 rounding only)"
    tokens = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens, reference.generate(ids[:1, :8], max_new_tokens=6, do_sample=False, pad_token_id=0))


def test_the_compressed_model_differs_from_the_original(exports):
    original, exported = exports["qwen2", 16]
    ids = _ids(259, seed=2)  # the tiny byte-level vocabulary
    with torch.no_grad():
        a, b = caldera.load(exported)(ids).logits, load_model(original)(ids).logits
    assert 1e-3 < ((a - b).norm() / b.norm()).item() < 0.5  # a real, bounded approximation, not a copy


def test_bfloat16_activations(exports):
    original, exported = exports["qwen2", 4]
    ids = _ids(259, seed=3)
    with torch.no_grad():
        logits = caldera.load(exported, dtype=torch.bfloat16)(ids).logits.float()
        expected = dense_reference(original, exported)(ids).logits
    assert ((logits - expected).norm() / expected.norm()).item() < 3e-2


def _copy(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def test_bad_folders_are_one_line_errors(exports, tmp_path):
    _, exported = exports["qwen2", 16]
    with pytest.raises(LoadError, match="not a caldera export"):
        caldera.load(exports["qwen2", 16][0])  # the original model
    altered = _copy(exported, tmp_path / "altered")
    shard = altered / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="sha256 differs from the manifest"):
        caldera.load(altered)
    model = caldera.load(altered, verify=False)  # the flipped bit is in a code byte: loads, unverified
    assert isinstance(model.model.layers[0].self_attn.q_proj, CompressedLinear)
    newer = _copy(exported, tmp_path / "newer")
    config = json.loads((newer / "config.json").read_text())
    config["quantization_config"]["format_version"] = 2
    (newer / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="packed format 2 is not supported"):
        caldera.load(newer, verify=False)


def test_dense_weights_give_the_same_logits(exports):
    _, exported = exports["qwen2", 4]
    ids = _ids(259, seed=5)
    with torch.no_grad():
        packed = caldera.load(exported)(ids).logits
        dense_model = caldera.load(exported, dense_weights=True)
        dense = dense_model(ids).logits
    assert all(m.dense is not None for m in dense_model.modules() if isinstance(m, CompressedLinear))
    assert ((dense - packed).norm() / packed.norm()).item() < 1e-5


def test_kept_weights_load_and_give_the_dense_models_logits(qwen2_dir, calib_file, tmp_path):
    """decompose --protect stores fp16 outliers beside Q; the loaded model adds them (S x) like the dense Ŵ."""
    run, out = tmp_path / "run", tmp_path / "out"
    args = ["decompose", "--model", str(qwen2_dir), "--calib", str(calib_file), *FAST, "--protect", "0.002"]
    assert runner.invoke(app, [*args, "--run", str(run), "--json"]).exit_code == 0
    assert runner.invoke(app, ["export", "--run", str(run), "--out", str(out)]).exit_code == 0
    model = caldera.load(out)
    linears = [m for m in model.model.layers.modules() if isinstance(m, CompressedLinear)]
    assert len(linears) == 14 and all(m.outlier_rows is not None and m.outlier_rows.numel() > 0 for m in linears)
    ids = _ids(model.config.vocab_size, seed=3)
    with torch.no_grad():
        logits, expected = model(ids).logits, dense_reference(qwen2_dir, out)(ids).logits
    rel = ((logits - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, f"||Δ||/||ref|| = {rel:.2e} (float32 rounding only)"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["decompose"]["protect"] == 0.002
