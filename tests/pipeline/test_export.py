"""`caldera export`: an HF-style folder of packed linears that reads back to the run's decompositions."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from caldera.cli import app
from caldera.config import DecomposeConfig
from caldera.io.packed_format import read_file_metadata, read_linear
from caldera.io.run_dir import RunDir
from caldera.io.shards import ShardReader
from caldera.pipeline.decompose_model import PROJECTIONS, decompose_layer
from caldera.pipeline.export import ExportError, export, sha256_file, verify
from caldera.pipeline.hessians import PROJ_GROUP
from caldera.pipeline.run_decompose import linear_prefix
from caldera.testing.tiny_models import tiny_llama

runner = CliRunner()
SETTINGS = {"rank": 16, "iters": 2, "bq": 2, "bl": 4, "br": 8}
FAST = ["--samples", "4", "--seq-len", "32", *(x for k, v in SETTINGS.items() for x in (f"--{k}", str(v)))]


def _decompose(model, calib, run, *extra):
    args = ["decompose", "--model", str(model), "--calib", str(calib), *FAST, "--run", str(run), "--json", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return run


def _export(run, out, *extra):
    return runner.invoke(app, ["export", "--run", str(run), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def exported(qwen2_dir, calib_file, tmp_path_factory):
    """(run, out) of tiny Qwen2 (biases on q/k/v, untied embeddings), exported one layer per shard."""
    tmp = tmp_path_factory.mktemp("export")
    run = _decompose(qwen2_dir, calib_file, tmp / "run")
    result = _export(run, tmp / "out", "--layers-per-shard", "1", "--json")
    assert result.exit_code == 0, result.output
    return run, tmp / "out", json.loads(result.stdout)


def _shards(out) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(out.glob("model-*.safetensors"))}


def _metas(path) -> dict[str, dict]:
    """{prefix: linear metadata} of one exported shard."""
    with safe_open(path, "pt") as f:
        return read_file_metadata(f.metadata())


def test_every_linear_reads_back_as_the_runs_decomposition(exported, qwen2_dir):
    run, out, _ = exported
    reader, cfg = ShardReader(qwen2_dir), DecomposeConfig(**SETTINGS)
    shards = {
        name: (tensors, read_file_metadata(safe_open(out / name, "pt").metadata()))
        for name, tensors in _shards(out).items()
    }
    found = 0
    for i in range(2):
        tensors = reader.tensors(f"model.layers.{i}.")
        weights = {p: tensors[linear_prefix(i, p) + ".weight"] for p in PROJECTIONS}
        hessians = RunDir(run).load_hessians(i)
        again = decompose_layer(i, weights, lambda p, h=hessians: h[PROJ_GROUP[p]], cfg, keep=True)
        for proj in PROJECTIONS:
            prefix = linear_prefix(i, proj)
            ((file_tensors, metas),) = [(t, m) for t, m in shards.values() if prefix in m]
            packed = read_linear(file_tensors, prefix, metas[prefix])
            dec = again.proj[proj].decomposition
            assert torch.equal(packed.transformed_weight(), dec.transformed())
            assert (packed.dense_weight() - dec.dense()).norm() <= 1e-6 * dec.dense().norm()
            bias = tensors.get(prefix + ".bias")
            assert (bias is None) == (proj not in ("q_proj", "k_proj", "v_proj"))  # Qwen2: q/k/v have biases
            assert bias is None or torch.equal(packed.bias, bias)
            found += 1
    assert found == 2 * len(PROJECTIONS)


def test_folder_config_index_tokenizer_and_fp16_tensors(exported, qwen2_dir):
    _, out, summary = exported
    config = json.loads((out / "config.json").read_text())
    source = json.loads((qwen2_dir / "config.json").read_text())
    q = config.pop("quantization_config")
    assert q["quant_method"] == "caldera" and q["format_version"] == 1 and q["method"] == "caldera"
    assert {k: q[k] for k in SETTINGS if k != "iters"} == {k: v for k, v in SETTINGS.items() if k != "iters"}
    assert q["group_size"] == 64 and q["lr_group_size"] == 64 and q["embed_bits"] == 16
    assert q["tied_embeddings"] is False and q["rank_clamps"] == {} and q["decompose"]["iters"] == 2
    assert config == source | {"dtype": "float16"}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (qwen2_dir / name).read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = _shards(out)
    assert sorted(shards) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert {n for tensors in shards.values() for n in tensors} == set(index["weight_map"])
    assert all(name in shards[file] for name, file in index["weight_map"].items())
    reader = ShardReader(qwen2_dir)
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
    ):
        stored = shards[index["weight_map"][name]][name]
        assert stored.dtype == torch.float16 and torch.equal(stored, reader.tensor(name).half())
    assert not any(n.endswith("_proj.weight") for n in index["weight_map"])  # no dense linear left
    assert summary["path"] == str(out) and summary["files"] == len(list(out.iterdir()))
    assert summary["bytes"] == sum(p.stat().st_size for p in out.iterdir())
    assert 4 < summary["bits_per_weight"] < 8 and summary["shards"] == 3 and summary["layers"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the temporary folder's private mode


def test_bits_per_weight_counts_every_stored_byte_of_the_linears(exported):
    _, out, summary = exported
    weights, stored = 0, 0
    for name, tensors in _shards(out).items():
        stored += sum(t.numel() * t.element_size() for n, t in tensors.items() if "_proj." in n or "incoherence" in n)
        weights += sum(meta["shape"][0] * meta["shape"][1] for meta in _metas(out / name).values())
    assert summary["linear_bytes"] == stored and summary["linear_weights"] == weights == 2 * (
        2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 160
    )
    assert summary["bits_per_weight"] == pytest.approx(8 * stored / weights)


def test_manifest_verification_names_the_altered_file(exported, tmp_path):
    _, out, _ = exported
    manifest = verify(out)
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    shard = copy / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model-00002-of-00003.safetensors: sha256 differs from the manifest"):
        verify(copy)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(ExportError, match=r"model-00002-of-00003.safetensors: \d+ bytes, the manifest says"):
        verify(copy)
    shard.unlink()
    with pytest.raises(ExportError, match="model-00002-of-00003.safetensors: listed in the manifest but missing"):
        verify(copy)


def test_verify_command_checks_the_manifest_and_every_packed_entry(exported, tmp_path):
    _, out, _ = exported
    result = runner.invoke(app, ["verify", "--model", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["packed_entries"] == 2 * len(PROJECTIONS) and summary["files"] == len(list(out.iterdir())) - 1
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    name = "model-00002-of-00003.safetensors"
    with safe_open(copy / name, "pt") as f:
        header = f.metadata()
    tensors = load_file(copy / name)
    tensors["model.layers.0.mlp.up_proj.q.scales"][0, 0] = float("nan")
    save_file(tensors, copy / name, metadata=header)  # a well-formed file, then a manifest that matches it
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": sha256_file(copy / name), "bytes": (copy / name).stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bad = runner.invoke(app, ["verify", "--model", str(copy)])
    _one_line_error(bad, f"{name}: tensor model.layers.0.mlp.up_proj.q.scales: contains NaN or Inf")


def test_tied_embeddings_are_stored_once(calib_file, tmp_path):
    model = tiny_llama(tmp_path / "tied", seed=2, tie_word_embeddings=True)
    run = _decompose(model, calib_file, tmp_path / "run")
    summary = export(run, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and config["quantization_config"]["tied_embeddings"] is True
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index
    assert summary.tied_embeddings and summary.shards == 2  # embeddings, then both layers (8 per shard)


@pytest.mark.parametrize(("bits", "tolerance"), [(8, 0.01), (4, 0.15)])
def test_embeddings_and_lm_head_packed_at_8_and_4_bits(exported, qwen2_dir, tmp_path, bits, tolerance):
    run, out16, summary16 = exported
    result = _export(run, tmp_path / "out", "--layers-per-shard", "1", "--embed-bits", str(bits), "--json")
    assert result.exit_code == 0, result.output
    summary, reader = json.loads(result.stdout), ShardReader(qwen2_dir)
    first = tmp_path / "out" / "model-00001-of-00003.safetensors"
    tensors, metas = load_file(first), _metas(first)
    assert sorted(metas) == ["lm_head", "model.embed_tokens"]  # untied: both packed, rank 0, no incoherence
    for prefix in metas:
        assert metas[prefix]["q"] == {"bits": bits, "group_size": 64, "zero_point": False}
        assert metas[prefix]["rank"] == 0 and not metas[prefix]["incoherence"]
        assert f"{prefix}.weight" not in tensors and tensors[f"{prefix}.q.codes"].dtype == torch.uint8
        original = reader.tensor(f"{prefix}.weight").double()
        dense = read_linear(tensors, prefix, metas[prefix]).dense_weight().double()
        err = ((dense - original).norm() / original.norm()).item()
        assert err < tolerance and err == pytest.approx(summary["embed_error"][prefix], rel=1e-3)
    assert tensors["model.norm.weight"].dtype == torch.float16  # norms stay fp16
    for name in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (out16 / name).read_bytes()  # linears untouched
    assert summary["bits_per_weight"] == summary16["bits_per_weight"]
    assert summary["tensor_bytes"] < summary16["tensor_bytes"] and summary["parameters"] == summary16["parameters"]
    assert summary["bits_per_weight_total"] == pytest.approx(8 * summary["tensor_bytes"] / summary["parameters"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["embed_bits"] == bits
    verify(tmp_path / "out")


def _one_line_error(result, needle):
    assert result.exit_code == 2, result.output
    assert needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_unfinished_run_is_refused_naming_the_layers(llama_dir, calib_file, tmp_path):
    run = _decompose(llama_dir, calib_file, tmp_path / "run", "--layers", "0")
    _one_line_error(_export(run, tmp_path / "out"), "layers 1 of 2 are not decomposed")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--embed-bits", "3"], "embed_bits=3 is not supported; choose one of 16, 8, 4"),
        (["--layers-per-shard", "0"], "layers_per_shard=0 must be >= 1"),
    ],
)
def test_unsupported_options(exported, tmp_path, extra, needle):
    run, _, _ = exported
    _one_line_error(_export(run, tmp_path / "out", *extra), needle)


def test_missing_run_and_existing_output(exported, tmp_path):
    run, out, _ = exported
    _one_line_error(_export(tmp_path / "nope", tmp_path / "out"), "nope: no such run directory")
    (tmp_path / "empty").mkdir()
    _one_line_error(_export(tmp_path / "empty", tmp_path / "out"), "has no decomposition; run caldera decompose")
    _one_line_error(_export(run, out), "already exists; remove it or choose another output folder")


def test_full_disk_leaves_no_folder_behind(exported, tmp_path, monkeypatch):
    run, _, _ = exported
    written = []

    def half_then_full(path, data):
        if written:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        written.append(path)
        path.write_bytes(data)

    monkeypatch.setattr("caldera.pipeline.export.write_durably", half_then_full)
    target = tmp_path / "models" / "out"
    _one_line_error(_export(run, target), f"cannot write {target}: No space left on device")
    assert written and list((tmp_path / "models").iterdir()) == []  # neither the folder nor its temporary


def test_per_layer_metrics_and_stats_travel_with_the_export(exported):
    run, out, summary = exported
    metrics = json.loads((out / "caldera_metrics.json").read_text())["layers"]
    assert [m["layer"] for m in metrics] == [0, 1] and set(metrics[0]["proj"]) == set(PROJECTIONS)
    header = RunDir(run).layer_path(1)
    with safe_open(header, "pt") as f:
        stored = json.loads(f.metadata()["caldera.metrics"])
    assert metrics[1]["proj"] == {p: {k: v for k, v in m.items() if k != "seconds"} for p, m in stored.items()}
    stats = json.loads((out / "config.json").read_text())["quantization_config"]["stats"]
    assert stats["bits_per_weight"] == summary["bits_per_weight"] and stats["parameters"] == summary["parameters"]
    assert stats["bits_per_weight_total"] == summary["bits_per_weight_total"]
    (out / "report").mkdir()  # caldera eval's report folder is not part of the model
    try:
        verify(out)
    finally:
        (out / "report").rmdir()
