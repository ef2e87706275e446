"""`caldera finetune`: distil an exported compressed model toward the original's next-token distributions, and
write it again with the same bits.

    teacher   the original model (the folder calibrate and decompose read), float32, frozen
    student   caldera.load(EXPORT) with trainable parts (caldera.runtime.trainable): L and R through
              straight-through re-quantization, Q's fp16 scales (codes fixed), the RMSNorm weights
    loss      KL(teacher ‖ student) over the whole vocabulary, averaged over tokens
    data      token windows (samples, seq_len) of calibration text: by default the default corpus's calibration
              articles, disjoint from the evaluation articles
    OUT       EXPORT's files with the trained tensors in place (same names, shapes, dtypes and bytes, so the same
              bits per weight); config.json's quantization_config gains "finetune" (settings, loss at the start
              and end); a new manifest. Built beside OUT and renamed: OUT appears whole or not at all.

An interrupted fine-tune leaves nothing behind and starts over when run again (minutes on the default model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from caldera.config import FinetuneConfig
from caldera.eval.evaluate import load_any
from caldera.io.packed_format import part_tensors
from caldera.io.run_dir import atomic_folder
from caldera.pipeline.export import (
    MANIFEST,
    REPORT_DIR,
    ExportError,
    safetensors_bytes,
    verify,
    write_durably,
    write_manifest,
)
from caldera.runtime.load import load
from caldera.runtime.trainable import make_trainable, packed_parts

SECTION = "finetune"  # key in config.json's quantization_config


class FinetuneError(RuntimeError):
    """Bad input for a fine-tune (one line)."""


@dataclasses.dataclass
class FinetuneSummary:
    path: str
    steps: int
    tokens: int  # trained on (steps × batch × seq_len)
    loss_first: float  # KL per token, nats: the first step's batch, the last 10 steps' mean
    loss_last: float
    seconds: float
    trained_parameters: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(teacher) ‖ softmax(student)); logits (..., vocab), float32 scalar."""
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _schedule(cfg: FinetuneConfig) -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over the first 5% of steps, then cosine decay to 0."""
    warm = max(1, cfg.steps // 20)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / (cfg.steps - warm)))

    return factor


def distill(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    cfg: FinetuneConfig,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train ``student``'s parameters that require grad (Adam) toward ``teacher``'s logits on windows of
    ``input_ids`` (samples, seq_len) int64, ``cfg.batch_size`` per step in seeded random order (``cfg.micro_batch``
    at a time, gradients accumulated: the same step in less memory); the loss of every step (KL per token, nats)."""
    device = next(teacher.parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    gen, order, losses = torch.Generator().manual_seed(cfg.seed), [], []
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order = torch.randperm(len(input_ids), generator=gen).tolist()
        batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
        opt.zero_grad(set_to_none=True)
        loss = 0.0
        for part in torch.tensor(batch).split(cfg.micro_batch or len(batch)):  # gradients accumulate
            ids = input_ids[part].to(device)
            with torch.no_grad():
                target = teacher(ids, use_cache=False).logits
            part_loss = kl_per_token(target, student(ids, use_cache=False).logits) * (len(part) / len(batch))
            part_loss.backward()
            loss += part_loss.item()
        opt.step()
        sched.step()
        losses.append(loss)
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def trained_tensors(model: nn.Module, swapped: list[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """Stored name -> tensor (CPU) of everything training may have changed: every part of each swapped linear
    (packed as the format stores it) and the trainable norm weights."""
    out = {}
    for name, module in swapped:
        for part, t in packed_parts(module).items():
            out |= part_tensors(f"{name}.{part}", t)
    out |= {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad and n.endswith("norm.weight")}
    return out


def write_finetuned(src: Path, out: Path, tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> None:
    """OUT = SRC with ``tensors`` replacing the stored ones of the same names (each cast to its stored dtype; a
    shape change is an error), ``record`` under quantization_config["finetune"], and a new manifest."""
    left = set(tensors)
    with atomic_folder(out, FinetuneError) as tmp:
        for path in sorted(src.iterdir()):
            if path.name in (MANIFEST, REPORT_DIR):
                continue
            if path.suffix == ".safetensors":
                stored = load_file(str(path))
                with safe_open(str(path), framework="pt") as f:
                    header = f.metadata() or {}
                for name in left & set(stored):
                    if tensors[name].shape != stored[name].shape:
                        raise FinetuneError(f"{name}: trained shape {tuple(tensors[name].shape)} != stored one")
                    stored[name] = tensors[name].to(stored[name].dtype).contiguous()
                left -= set(stored)
                write_durably(tmp / path.name, safetensors_bytes(stored, header))
            elif path.name == "config.json":
                config = json.loads(path.read_text())
                config["quantization_config"][SECTION] = record
                write_durably(tmp / path.name, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
            else:
                shutil.copyfile(path, tmp / path.name)
        if left:
            raise FinetuneError(f"{sorted(left)[0]}: trained, but no shard of {src} stores it")
        write_manifest(tmp)


def finetune(
    export_dir: Path | str,
    original: Path | str,
    out: Path | str,
    input_ids: torch.Tensor,
    cfg: FinetuneConfig,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> FinetuneSummary:
    """Fine-tune the export EXPORT_DIR against ORIGINAL on ``input_ids`` (samples, seq_len) and write OUT."""
    src, out, device = Path(export_dir), Path(out), torch.device(device)
    if out.exists():
        raise FinetuneError(f"{out} already exists; remove it or choose another output folder")
    try:
        verify(src)
    except ExportError as e:
        raise FinetuneError(str(e)) from None
    config = json.loads((src / "config.json").read_text())
    if SECTION in config["quantization_config"]:
        raise FinetuneError(f"{src} is already fine-tuned; start from the export caldera export wrote")
    start = time.perf_counter()
    teacher = load_any(original, device, torch.float32).requires_grad_(False)
    if teacher.config.vocab_size != config["vocab_size"]:
        raise FinetuneError(f"{original} and {src} have different vocabularies: not the same model")
    student = load(src, device=device, verify=False)
    swapped = make_trainable(student, norms=cfg.norms)
    trained = sum(p.numel() for p in student.parameters() if p.requires_grad)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA while training (the stored parts are rounded)
    try:
        losses = distill(student, teacher, input_ids, cfg, on_step)
    finally:
        torch.set_float32_matmul_precision(precision)
    last = sum(losses[-10:]) / len(losses[-10:])
    record = cfg.to_dict() | {"original": str(Path(original).resolve()), "loss_first": losses[0], "loss_last": last}
    write_finetuned(src, out, trained_tensors(student, swapped), record)
    tokens = cfg.steps * min(cfg.batch_size, len(input_ids)) * input_ids.shape[1]
    return FinetuneSummary(str(out), cfg.steps, tokens, losses[0], last, time.perf_counter() - start, trained)
