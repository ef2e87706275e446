"""`caldera plan`: will the compressed model fit the card? Exact stored bytes, KV cache, activations, verdict."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from caldera.cli.common import JsonOpt, app, emit, err_console, fail, parse_size, say

GB = 10**9


@app.command("plan")
def plan(
    model: Annotated[str, typer.Option(help="qwen2-72b, qwen2-7b, qwen2.5-72b, or a folder with a config.json.")] = (
        "qwen2-72b"
    ),
    bq: Annotated[int, typer.Option(help="Bits of Q.")] = 2,
    bl: Annotated[int, typer.Option(help="Bits of L (16: fp16).")] = 4,
    br: Annotated[int, typer.Option(help="Bits of R (16: fp16).")] = 4,
    rank: Annotated[str, typer.Option(help="Rank of L·R: K, or per type: attn=K,mlp=K or q_proj=K,...")] = "256",
    group_size: Annotated[int, typer.Option(help="Q's group along the input dimension.")] = 64,
    zero_point: Annotated[bool, typer.Option(help="Asymmetric grids with uint8 zero points.")] = False,
    embed_bits: Annotated[int, typer.Option(help="Embeddings and lm_head: 16 (fp16), 8 or 4.")] = 4,
    kv_bits: Annotated[int, typer.Option(help="KV cache: 16 (fp16), 8 or 4.")] = 16,
    ctx: Annotated[int, typer.Option(help="Context length the KV cache holds (batch 1).")] = 4096,
    budget: Annotated[str, typer.Option(help="GPU memory to fit, e.g. 22GB (10⁹ bytes) or 20GiB.")] = "22GB",
    fit: Annotated[
        bool, typer.Option("--fit", help="Search the configs that fit, most bits per weight first.")
    ] = False,
    top: Annotated[int, typer.Option(help="With --fit: how many fitting configs to list.")] = 10,
    json_out: JsonOpt = False,
) -> None:
    """Bytes of the compressed model by component (from the code that writes the format), the KV cache at --ctx
    and activation buffers, against --budget; --fit lists the configs that fit."""
    from caldera.config import ConfigError
    from caldera.io.model_folder import ModelFolderError
    from caldera.io.model_shapes import model_shape
    from caldera.pipeline import plan as planner

    try:
        shape = model_shape(model)
        budget_bytes = parse_size(budget)
        ranks = planner.parse_ranks(rank)
        kw = {"bq": bq, "bl": bl, "br": br, "ranks": ranks, "group_size": group_size, "zero_point": zero_point}
        cfg = planner.PlanConfig(**kw, embed_bits=embed_bits, kv_bits=kv_bits, ctx=ctx)
        result = planner.plan(shape, cfg, budget_bytes)
        found, searched = planner.fit(shape, cfg, budget_bytes) if fit else ([], 0)
    except (ConfigError, ModelFolderError, ValueError) as e:
        fail(str(e))
    if json_out:
        emit(result.to_dict())
        for p in found[:top]:
            emit({"fit": p.to_dict()})
        if fit:
            emit({"fit_summary": {"searched": searched, "fitting": len(found), "listed": min(top, len(found))}})
        return
    err_console.print(plan_table(result, shape))
    say(verdict(result), json_out)
    if fit:
        err_console.print(fit_table(found[:top], searched, len(found), result.budget_bytes))


def plan_table(result, shape) -> Table:
    """Rows: each projection type (over all layers), the linears with shared blocks, embeddings, norms, KV, buffers."""
    from caldera.pipeline.decompose_model import clamped_rank

    total = result.total_bytes
    cfg = result.config
    title = f"{result.model}: {shape.layers} layers; BQ {cfg.bq}, BL {cfg.bl}, BR {cfg.br}, group {cfg.group_size}"
    table = Table("component", "shape × count", "rank", "GB", "bits/weight", "share", title=title)
    shapes = shape.projection_shapes
    for (proj, nbytes), rank in zip(result.linears_by_projection.items(), cfg.ranks, strict=True):
        m, n = shapes[proj]
        bpw = 8 * nbytes / (shape.layers * m * n)
        row = (f"{m}×{n} × {shape.layers}", str(clamped_rank(rank, (m, n))), f"{nbytes / GB:.3f}", f"{bpw:.3f}")
        table.add_row(f"  {proj}", *row, f"{nbytes / total:.1%}")
    comp = result.components
    bpw = f"{result.bits_per_weight_linears:.3f}"
    table.add_row(
        "linears (+ shared blocks)", "", "", f"{comp['linears'] / GB:.3f}", bpw, f"{comp['linears'] / total:.1%}"
    )
    embed = f"{shape.vocab}×{shape.hidden}"
    rows = {
        "embed": (embed, f"{cfg.embed_bits}-bit"),
        "lm_head": ("tied" if shape.tied else embed, f"{cfg.embed_bits}-bit"),
        "norms": (f"{shape.hidden} × {2 * shape.layers + 1}", "fp16"),
        "kv_cache": (f"ctx {cfg.ctx}, {shape.kv_heads} KV heads × {shape.head_dim}", f"{cfg.kv_bits}-bit"),
        "activations": (f"prefill chunk of {min(cfg.ctx, 512)} tokens", "fp16"),
    }
    for name, (what, bits) in rows.items():
        table.add_row(name, what, "", f"{comp[name] / GB:.3f}", bits, f"{comp[name] / total:.1%}")
    table.add_row("total", "", "", f"{total / GB:.3f}", "", "")
    return table


def verdict(result) -> str:
    total, budget = result.total_bytes / GB, result.budget_bytes / GB
    if result.fits:
        return f"[green]fits[/]: {total:.2f} GB of {budget:.2f} GB ({budget - total:.2f} GB left)"
    return (
        f"[red]does not fit[/]: {total:.2f} GB > {budget:.2f} GB by {total - budget:.2f} GB "
        "(caldera plan --fit lists what does)"
    )


def fit_table(found: list, searched: int, fitting: int, budget_bytes: int) -> Table:
    title = f"{fitting} of {searched} configs fit {budget_bytes / GB:.2f} GB; most bits per weight of the linears first"
    table = Table(
        "bits/weight", "GB", "left GB", "group", "rank attn", "rank mlp", "BL", "BR", "embed", "KV", title=title
    )
    for p in found:
        c = p.config
        cells = (c.group_size, c.ranks[0], c.ranks[-1], c.bl, c.br, c.embed_bits, c.kv_bits)
        left = (p.budget_bytes - p.total_bytes) / GB
        table.add_row(f"{p.bits_per_weight_linears:.3f}", f"{p.total_bytes / GB:.2f}", f"{left:.2f}", *map(str, cells))
    return table
