"""ShardReader: lazy per-tensor and per-prefix reads from one file or an index of shards; validation up front."""

import json
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from caldera.io.shards import INDEX_FILE, ShardError, ShardReader


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(11, 6, generator=g),
        "model.layers.0.w": torch.randn(6, 6, generator=g),
        "model.layers.0.b": torch.randn(6, generator=g).to(torch.bfloat16),
        "model.layers.1.w": torch.randn(6, 6, generator=g),
        "model.layers.10.w": torch.randn(3, 6, generator=g),
        "model.norm.weight": torch.ones(6),
    }


SHARD_OF = {  # layer 0 straddles both shards
    "model.embed_tokens.weight": "a.safetensors",
    "model.layers.0.w": "a.safetensors",
    "model.layers.0.b": "b.safetensors",
    "model.layers.1.w": "b.safetensors",
    "model.layers.10.w": "b.safetensors",
    "model.norm.weight": "b.safetensors",
}


def _single(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    save_file(_tensors(), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _sharded(folder: Path, weight_map: dict[str, str] | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    tensors = _tensors()
    for file in sorted(set(SHARD_OF.values())):
        save_file({n: t for n, t in tensors.items() if SHARD_OF[n] == file}, folder / file)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map or SHARD_OF}))
    return folder


@pytest.fixture(params=["single", "sharded"])
def folder(request, tmp_path) -> Path:
    return (_single if request.param == "single" else _sharded)(tmp_path / "model")


def test_tensors_round_trip_with_their_dtypes(folder):
    reader, expected = ShardReader(folder), _tensors()
    assert reader.names() == sorted(expected)
    for name, t in expected.items():
        got = reader.tensor(name)
        assert got.dtype == t.dtype and torch.equal(got, t)
    assert reader.info["model.layers.0.b"].dtype == "BF16" and reader.info["model.layers.0.w"].shape == (6, 6)
    assert reader.nbytes("model.layers.0.") == 6 * 6 * 4 + 6 * 2


def test_prefix_reads_exactly_that_layer(folder):
    layer = ShardReader(folder).tensors("model.layers.1.")
    assert list(layer) == ["model.layers.1.w"]  # not model.layers.10.w
    assert torch.equal(layer["model.layers.1.w"], _tensors()["model.layers.1.w"])
    both = ShardReader(folder).tensors("model.layers.0.")
    assert sorted(both) == ["model.layers.0.b", "model.layers.0.w"]


def test_reads_touch_only_the_requested_tensors_and_shards(tmp_path, monkeypatch):
    folder = _sharded(tmp_path / "model")
    reader = ShardReader(folder)
    real, opened, read = safetensors.safe_open, [], []

    class Spy:
        def __init__(self, path, framework):
            self.inner = real(path, framework=framework)
            opened.append(Path(path).name)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    reader.tensors("model.layers.1.")
    assert opened == ["b.safetensors"] and read == ["model.layers.1.w"]
    opened.clear(), read.clear()
    reader.tensors("model.layers.0.")
    assert opened == ["a.safetensors", "b.safetensors"] and sorted(read) == ["model.layers.0.b", "model.layers.0.w"]


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _message(folder: Path) -> str:
    with pytest.raises(ShardError) as info:
        ShardReader(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_shard(tmp_path):
    folder = _sharded(tmp_path / "m")
    (folder / "b.safetensors").unlink()
    assert _message(folder) == f"{folder}: shard b.safetensors is missing"


@pytest.mark.parametrize("keep", [-7, -200, 12, 3])  # cut in the data, deep in the data, in the header, in the length
def test_truncated_shard(tmp_path, keep):
    folder = _sharded(tmp_path / "m")
    _truncate(folder / "a.safetensors", keep)
    message = _message(folder)
    assert str(folder / "a.safetensors") in message and "truncated" in message


def test_trailing_bytes_and_garbage_header_are_corrupt(tmp_path):
    folder = _single(tmp_path / "m")
    with open(folder / "model.safetensors", "ab") as f:
        f.write(b"\0" * 16)
    assert "corrupt safetensors file" in _message(folder)
    (folder / "model.safetensors").write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 8)
    assert "corrupt safetensors header" in _message(folder)


def test_index_entry_its_shard_does_not_hold(tmp_path):
    folder = _sharded(tmp_path / "m", {**SHARD_OF, "model.layers.1.w": "a.safetensors"})
    assert _message(folder) == f"{folder / INDEX_FILE} maps model.layers.1.w to a.safetensors, which does not hold it"


def test_bad_folders_and_indexes(tmp_path):
    assert "no such model folder" in _message(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "neither model.safetensors nor model.safetensors.index.json" in _message(tmp_path / "empty")
    folder = _sharded(tmp_path / "m")
    (folder / INDEX_FILE).write_text("{")
    assert "unreadable shard index" in _message(folder)
    (folder / INDEX_FILE).write_text(json.dumps({"weight_map": {"x": "../a.safetensors"}}))
    assert "is not a file name inside the folder" in _message(folder)


def test_missing_tensor(tmp_path):
    folder = _single(tmp_path / "m")
    with pytest.raises(ShardError, match=r"tensor model\.layers\.9\.w is not in the model's shards"):
        ShardReader(folder).tensor("model.layers.9.w")
    assert ShardReader(folder).tensors("model.layers.9.") == {}


def test_tiny_model_shards_hold_what_the_single_file_holds(tmp_path):
    from safetensors.torch import load_file

    from caldera.testing.tiny_models import tiny_qwen2

    single, sharded = tiny_qwen2(tmp_path / "one"), tiny_qwen2(tmp_path / "three", shards=3)
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) == 3 and not (sharded / "model.safetensors").exists()
    expected = load_file(single / "model.safetensors")
    reader = ShardReader(sharded)
    assert reader.names() == sorted(expected)
    for name, t in reader.tensors("").items():
        assert torch.equal(t, expected[name])
