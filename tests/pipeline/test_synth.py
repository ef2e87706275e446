"""`caldera synth`: random folders with a model's shapes, sharded, and the pipeline running on them."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from caldera.cli import app
from caldera.io.byte_tokenizer import VOCAB_SIZE
from caldera.io.model_folder import load_tokenizer, read_model_config
from caldera.io.model_shapes import model_config, model_shape
from caldera.io.shards import ShardReader
from caldera.pipeline.synth import SynthError, plan_shards, synth, tensor_shapes

runner = CliRunner()


@pytest.fixture(scope="module")
def synth_dir(qwen2_dir, tmp_path_factory):
    """3 layers at the tiny Qwen2 shape, in shards of at most 40 kB."""
    out = tmp_path_factory.mktemp("synth") / "model"
    synth(read_model_config(qwen2_dir), out, 3, seed=1, shard_bytes=40_000)
    return out


def test_folder_has_the_architectures_tensors_sharded_with_an_index(synth_dir, qwen2_dir):
    config = read_model_config(synth_dir)
    assert config["num_hidden_layers"] == 3 and config["hidden_size"] == 64 and config["torch_dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(synth_dir, dtype=torch.float32)  # a valid HF folder
    reader = ShardReader(synth_dir)
    assert set(reader.info) == set(model.state_dict())  # every tensor, lm_head included (untied)
    assert "model.layers.2.self_attn.q_proj.bias" in reader and "model.layers.2.self_attn.o_proj.bias" not in reader
    index = json.loads((synth_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == reader.nbytes() == 2 * sum(t.numel() for t in model.state_dict().values())


def test_values_norms_one_weights_gaussian_with_the_configs_std(synth_dir):
    reader = ShardReader(synth_dir)
    assert torch.equal(reader.tensor("model.layers.0.input_layernorm.weight").float(), torch.ones(64))
    w = reader.tensor("model.embed_tokens.weight").float()  # 259 × 64 at least
    assert w.dtype == torch.float32 and abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    bias = reader.tensor("model.layers.1.self_attn.k_proj.bias").float()
    assert bias.abs().min() > 0  # drawn, not zeros


def test_seeded_per_tensor_name_independent_of_layer_count_and_shards(synth_dir, qwen2_dir, tmp_path):
    other = synth(read_model_config(qwen2_dir), tmp_path / "one", 1, seed=1)  # 1 layer, one shard
    assert other.shards == 1
    a, b = ShardReader(synth_dir), ShardReader(tmp_path / "one")
    for name in ("model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(a.tensor(name), b.tensor(name))
    synth(read_model_config(qwen2_dir), tmp_path / "seed2", 1, seed=2)
    c = ShardReader(tmp_path / "seed2").tensor("model.layers.0.mlp.down_proj.weight")
    assert not torch.equal(c, b.tensor("model.layers.0.mlp.down_proj.weight"))


def test_shards_hold_at_most_the_bound_unless_one_tensor_is_larger():
    shapes = {"a": (10, 10), "b": (10, 10), "big": (100, 10), "c": (5, 10)}
    assert plan_shards(shapes, 2, 400) == [["a", "b"], ["big"], ["c"]]
    assert plan_shards(shapes, 2, 10**9) == [["a", "b", "big", "c"]]


def test_shipped_72b_shapes_with_biases_from_the_architecture():
    _, config = model_config("qwen2-72b")
    shapes = tensor_shapes(config | {"num_hidden_layers": 1})
    projections = model_shape("qwen2-72b").projection_shapes
    for proj, shape in projections.items():
        path = ("self_attn." if proj[0] in "qkvo" else "mlp.") + proj
        assert shapes[f"model.layers.0.{path}.weight"] == shape
    assert shapes["model.layers.0.self_attn.k_proj.bias"] == (1024,)
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (152064, 8192)
    params = sum(math.prod(s) for s in tensor_shapes(config).values())
    assert 72.7e9 < params < 72.8e9  # Qwen2-72B: 72.71 B parameters


def test_the_byte_tokenizer_gives_ids_inside_the_vocabulary(synth_dir):
    tokenizer = load_tokenizer(synth_dir)
    ids = tokenizer("Calibration text, ünïcode too.", add_special_tokens=False)["input_ids"]
    assert max(ids) < 256 and tokenizer.eos_token_id == 257
    assert len(tokenizer) <= VOCAB_SIZE + 1  # transformers' Qwen2 tokenizer adds <|endoftext|> as id 259
    assert read_model_config(synth_dir)["eos_token_id"] == 257


def test_errors_are_one_line(qwen2_dir, tmp_path, synth_dir):
    config = read_model_config(qwen2_dir)
    with pytest.raises(SynthError, match="already exists"):
        synth(config, synth_dir, 1)
    with pytest.raises(SynthError, match="layers=0"):
        synth(config, tmp_path / "x", 0)
    with pytest.raises(SynthError, match="vocab_size 100 is below"):
        synth(config | {"vocab_size": 100}, tmp_path / "x", 1)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    for args, needle in [
        (["--shape", "qwen3-72b"], "neither a shipped model"),
        (["--shape", "qwen2-7b", "--shard-size", "lots"], "bad size 'lots'"),
        (["--shape", "qwen2-7b", "--dtype", "int8"], "dtype 'int8'"),
    ]:
        result = runner.invoke(app, ["synth", *args, "--layers", "1", "--out", str(tmp_path / "y")])
        assert result.exit_code == 2 and needle in result.stderr, result.output


@pytest.mark.slow
def test_calibrate_decompose_export_run_on_a_synthetic_folder(qwen2_dir, calib_file, tmp_path):
    out = tmp_path / "model"
    result = runner.invoke(
        app, ["synth", "--shape", str(qwen2_dir), "--layers", "2", "--out", str(out), "--shard-size", "30kB", "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["layers"] == 2 and summary["shards"] > 2 and summary["device"] == "cpu"
    run = tmp_path / "run"
    fast = ["--samples", "4", "--seq-len", "32", "--iters", "1", "--rank", "8", "--calib", str(calib_file)]
    result = runner.invoke(app, ["decompose", "--model", str(out), "--run", str(run), *fast, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["summary"]["layers"] == 2
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(tmp_path / "exp"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["layers"] == 2
    with safe_open(str(tmp_path / "exp" / "model-00002-of-00002.safetensors"), framework="pt") as f:
        assert "model.layers.1.self_attn.q_proj.bias" in set(f.keys())
