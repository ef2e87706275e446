"""`caldera finetune`: distillation lowers the KL to the original, and the new export stores exactly what was trained,
in the same bytes."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import caldera
from caldera.cli import app
from caldera.config import FinetuneConfig
from caldera.io.model_folder import load_model
from caldera.pipeline.export import verify
from caldera.pipeline.finetune import FinetuneError, distill, finetune, kl_per_token
from caldera.runtime.trainable import LatentFactor, QScales, make_trainable

runner = CliRunner()
FAST = ["--samples", "4", "--seq-len", "32", "--rank", "8", "--iters", "2"]
CFG = FinetuneConfig(steps=40, lr=3e-3, batch_size=4, seq_len=32, samples=16, seed=1)


def ids(seed: int, samples: int = 16) -> torch.Tensor:
    """Random token windows (samples, 32) of the tiny vocabulary."""
    return torch.randint(0, 256, (samples, 32), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def export_dir(qwen2_dir, calib_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    args = ["decompose", "--model", str(qwen2_dir), "--calib", str(calib_file), *FAST, "--run", str(tmp / "run")]
    assert runner.invoke(app, [*args, "--json"]).exit_code == 0
    assert runner.invoke(app, ["export", "--run", str(tmp / "run"), "--out", str(tmp / "model")]).exit_code == 0
    return tmp / "model"


@pytest.fixture(scope="module")
def tuned(export_dir, qwen2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "model"
    return finetune(export_dir, qwen2_dir, out, ids(0), CFG), out


def test_kl_per_token_matches_float64_reference():
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    assert kl_per_token(t, s).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_per_token(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_trainable_parts_start_at_the_stored_values_and_all_get_gradients(export_dir, qwen2_dir):
    reference = caldera.load(export_dir)
    student = caldera.load(export_dir)
    swapped = make_trainable(student)
    assert len(swapped) == 7 * student.config.num_hidden_layers
    for name, module in swapped:
        ref = reference.get_submodule(name)
        assert isinstance(module.q, QScales) and isinstance(module.l, LatentFactor)
        assert torch.equal(module.q.dequantize(), ref.q.dequantize())  # Q exactly as stored
        step = ref.l.unpacked().scales.float().abs().max()  # L re-quantized from its own grid: within a step
        assert (module.l.dequantize() - ref.l.dequantize()).abs().max() <= step
    x = ids(5, samples=2)
    kl_per_token(load_model(qwen2_dir)(x).logits, student(x).logits).backward()
    trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    names = {n.rsplit(".", 1)[-1] for n, _ in trainable}
    assert names == {"scales", "latent", "weight"}  # Q scales, L/R latents, norm weights; nothing else
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)


def test_distillation_lowers_the_kl_on_held_out_windows(tuned, export_dir, qwen2_dir):
    summary, out = tuned
    teacher, held_out = load_model(qwen2_dir), ids(99)
    with torch.no_grad():
        target = teacher(held_out).logits
        before = kl_per_token(target, caldera.load(export_dir)(held_out).logits).item()
        after = kl_per_token(target, caldera.load(out)(held_out).logits).item()
    assert summary.loss_last < 0.7 * summary.loss_first
    assert after < 0.8 * before, (before, after)


def test_export_stores_exactly_what_was_trained(export_dir, qwen2_dir, tmp_path):
    """The in-memory student after training and the reloaded export give the same logits (float32 rounding)."""
    cfg = FinetuneConfig(steps=5, lr=3e-3, batch_size=4, seq_len=32, samples=16, norms=False)
    student = caldera.load(export_dir)
    make_trainable(student, norms=False)
    distill(student, load_model(qwen2_dir), ids(0), cfg)
    out = tmp_path / "model"
    finetune(export_dir, qwen2_dir, out, ids(0), cfg)  # the same seeds: the same training
    x = ids(7, samples=2)
    with torch.no_grad():
        expected, got = student(x).logits, caldera.load(out)(x).logits
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()


def test_same_tensors_names_shapes_bytes_and_a_manifest(tuned, export_dir):
    _, out = tuned
    assert verify(out, packed=True)["packed_entries"] == verify(export_dir, packed=True)["packed_entries"]
    changed = 0
    for path in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as a, safe_open(str(out / path.name), "pt") as b:
            names = a.keys()
            assert a.metadata() == b.metadata() and set(names) == set(b.keys())
            for name in names:
                x, y = a.get_tensor(name), b.get_tensor(name)
                assert (x.dtype, x.shape) == (y.dtype, y.shape), name
                changed += not torch.equal(x, y)
        assert path.stat().st_size == (out / path.name).stat().st_size
    assert changed > 0
    src_qc = json.loads((export_dir / "config.json").read_text())["quantization_config"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["stats"] == src_qc["stats"] and qc["finetune"]["steps"] == CFG.steps


def test_errors_are_one_line(tuned, export_dir, qwen2_dir, llama_dir, tmp_path):
    _, out = tuned
    with pytest.raises(FinetuneError, match="already exists"):
        finetune(export_dir, qwen2_dir, out, ids(0), CFG)
    with pytest.raises(FinetuneError, match="already fine-tuned"):
        finetune(out, qwen2_dir, tmp_path / "again", ids(0), CFG)
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-4] + b"xxxx")
    with pytest.raises(FinetuneError, match="sha256"):
        finetune(broken, qwen2_dir, tmp_path / "b", ids(0), CFG)
    assert not (tmp_path / "b").exists()


def test_cli_json_and_checks_the_original(export_dir, qwen2_dir, llama_dir, calib_file, tmp_path):
    out = tmp_path / "model"
    args = ["finetune", "--model", str(export_dir), "--out", str(out), "--original", str(qwen2_dir)]
    args += ["--data", str(calib_file), "--steps", "3"]
    result = runner.invoke(app, [*args, "--seq-len", "32", "--samples", "8", "--batch-size", "2", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 32 and summary["path"] == str(out)
    verify(out)
    bad = runner.invoke(app, ["finetune", "--model", str(tmp_path), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not an export folder" in bad.output
    bad = runner.invoke(app, ["finetune", "--model", str(export_dir), "--out", str(tmp_path / "y"), "--steps", "0"])
    assert bad.exit_code == 2 and "steps=0" in bad.output
    args = ["finetune", "--model", str(export_dir), "--out", str(tmp_path / "z"), "--original", str(llama_dir)]
    bad = runner.invoke(app, args)
    assert bad.exit_code == 2 and "was not decomposed from" in bad.output


def test_micro_batches_give_the_same_step(export_dir, qwen2_dir):
    """Gradients accumulated over micro-batches of 1 equal the whole batch's (float32 summation order aside)."""
    teacher, students = load_model(qwen2_dir), []
    for micro in (0, 1):
        student = caldera.load(export_dir)
        make_trainable(student)
        cfg = FinetuneConfig(steps=2, lr=1e-3, batch_size=4, seq_len=32, samples=16, micro_batch=micro)
        losses = distill(student, teacher, ids(0), cfg)
        students.append((losses, dict(student.named_parameters())))
    (whole, a), (micro, b) = students
    assert whole == pytest.approx(micro, rel=1e-5)
    assert all(torch.allclose(a[n], b[n], rtol=1e-4, atol=1e-6) for n in a if a[n].requires_grad)
