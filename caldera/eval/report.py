"""The quality report: JSON + Markdown + PNG plots of one evaluated model, and the comparison of several.

MODEL_DIR/report/eval.json          the `caldera eval --json` object
MODEL_DIR/report/report.md          original vs compressed perplexity, delta, bits per weight, memory;
                                    per-projection activation-aware error (min / median / max over layers)
MODEL_DIR/report/layer_errors.png   act_err per layer, one line per projection type
OUT/comparison.{json,md}            several evaluated models: method, settings, bits per weight, ppl, delta
OUT/ppl_vs_bits.png                 perplexity versus bits per weight (the original as a horizontal line)
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caldera.pipeline.hessians import PROJ_PATH

PROJECTIONS = tuple(PROJ_PATH)  # q, k, v, o, gate, up, down


def settings(result: dict[str, Any]) -> str:
    """'2/4/4/r64/g64' (BQ/BL/BR/rank/group, then /zp for zero points, /d0.1 for a non-default damping, /+N rules
    for per-layer overrides on top of these settings, /pF for kept weights (protect), /ftN after N steps of caldera
    finetune) of an eval result,
    '16 (original)' for an uncompressed model."""
    if result.get("method") in (None, "dense"):
        return "16 (original)"
    extra = ("/zp" if result.get("zero_point") else "") + (
        f"/d{result['damping']:g}" if result.get("damping", 0.01) != 0.01 else ""
    )
    extra += f"/+{result['overrides']} rules" if result.get("overrides") else ""
    extra += f"/p{result['protect']:g}" if result.get("protect") else ""
    extra += f"/ft{result['finetune_steps']}" if result.get("finetune_steps") else ""
    if result["method"] != "caldera" or not result["rank"]:
        return f"{result['bq']}/–/–/r0/g{result['group_size']}{extra}"
    return f"{result['bq']}/{result['bl']}/{result['br']}/r{result['rank']}/g{result['group_size']}{extra}"


def label(result: dict[str, Any]) -> str:
    """The method column: the method (dense for an original), '+ finetune' after caldera finetune."""
    return (result.get("method") or "dense") + (" + finetune" if result.get("finetune_steps") else "")


def error_summary(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{proj: {min, median, max}} of act_err over the layers of caldera_metrics.json."""
    out = {}
    for proj in PROJECTIONS:
        errs = [layer["proj"][proj]["act_err"] for layer in metrics["layers"] if proj in layer["proj"]]
        if errs:
            out[proj] = {"min": min(errs), "median": statistics.median(errs), "max": max(errs)}
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_layer_errors(metrics: dict[str, Any], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    layers = [layer["layer"] for layer in metrics["layers"]]
    for proj in PROJECTIONS:
        ax.plot(layers, [layer["proj"][proj]["act_err"] for layer in metrics["layers"]], marker=".", label=proj)
    ax.set(xlabel="decoder layer", ylabel="activation-aware relative error", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(result: dict[str, Any], errors: dict[str, dict[str, float]] | None) -> str:
    """report.md of one evaluated model."""
    lines = [
        f"# caldera eval: {Path(result['model']).name}",
        "",
        f"Data: {result['data']}; {result['windows']} windows of {result['seq_len']} tokens "
        f"({result['predictions']} predicted tokens); device {result['device']}, {result['dtype']}.",
        "",
        "| model | settings | bits/weight (linears) | bits/weight (all) | bytes | ppl | delta |",
        "|---|---|---|---|---|---|---|",
    ]
    if result.get("baseline_ppl") is not None:
        lines.append(
            f"| original | 16 | 16 | 16 | {_fmt(result.get('baseline_bytes'), ',')} | {result['baseline_ppl']:.3f} | |"
        )
    lines.append(
        f"| {label(result)} | {settings(result)} | {_fmt(result['bits_per_weight'], '.3f')} | "
        f"{_fmt(result['bits_per_weight_total'], '.3f')} | {result['bytes_total']:,} | {result['ppl']:.3f} | "
        f"{_fmt(result.get('ppl_delta_pct'), '+.1f')}% |"
    )
    if errors:
        lines += [
            "",
            "Activation-aware error per projection (over layers):",
            "",
            "| projection | min | median | max |",
            "|---|---|---|---|",
        ]
        lines += [f"| {p} | {e['min']:.4f} | {e['median']:.4f} | {e['max']:.4f} |" for p, e in errors.items()]
    return "\n".join(lines) + "\n"


def write_report(model_dir: Path, result: dict[str, Any]) -> list[Path]:
    """Write MODEL_DIR/report/ for one eval result; returns the files written."""
    out = Path(model_dir) / "report"
    out.mkdir(exist_ok=True)
    metrics_path = Path(model_dir) / "caldera_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    errors = error_summary(metrics) if metrics else None
    files = [out / "eval.json", out / "report.md"]
    files[0].write_text(json.dumps(result | ({"act_err": errors} if errors else {}), indent=2) + "\n")
    files[1].write_text(markdown(result, errors))
    if metrics:
        files.append(out / "layer_errors.png")
        plot_layer_errors(metrics, files[-1], f"{Path(model_dir).name}: {settings(result)}")
    return files


def quality_table(results: Sequence[dict[str, Any]]) -> str:
    """Markdown: method | BQ/BL/BR/rank/group | bits per weight | ppl | delta % (the original first)."""
    lines = [
        "| method | BQ/BL/BR/rank/group | bits per weight (linears) | bits per weight (all) | ppl | delta % |",
        "|---|---|---|---|---|---|",
    ]
    base = next((r["baseline_ppl"] for r in results if r.get("baseline_ppl") is not None), None)
    if base is not None:
        lines.append(f"| original | fp16 | 16 | 16 | {base:.3f} | |")
    for r in sorted(results, key=lambda r: r["ppl"]):
        lines.append(
            f"| {label(r)} | {settings(r)} | {_fmt(r['bits_per_weight'], '.3f')} | "
            f"{_fmt(r['bits_per_weight_total'], '.3f')} | {r['ppl']:.3f} | {_fmt(r.get('ppl_delta_pct'), '+.1f')} |"
        )
    return "\n".join(lines) + "\n"


def plot_ppl_vs_bits(results: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for method in sorted({label(r) for r in results}):
        rows = sorted((r for r in results if label(r) == method), key=lambda r: r["bits_per_weight"])
        ax.plot([r["bits_per_weight"] for r in rows], [r["ppl"] for r in rows], marker="o", label=method)
    base = next((r["baseline_ppl"] for r in results if r.get("baseline_ppl") is not None), None)
    if base is not None:
        ax.axhline(base, color="gray", linestyle="--", label=f"original ({base:.2f})")
    ax.set(xlabel="bits per weight (linears, every stored byte)", ylabel="perplexity", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_comparison(results: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """OUT/comparison.json, comparison.md and ppl_vs_bits.png for several eval results."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "comparison.json", out / "comparison.md", out / "ppl_vs_bits.png"]
    files[0].write_text(json.dumps(list(results), indent=2) + "\n")
    files[1].write_text(quality_table(results))
    plot_ppl_vs_bits(results, files[2])
    return files


SWEEP_COLUMNS = (
    "tag", "method", "settings", "rank_rule", "samples", "seq_len", "baseline",
    "bits_per_weight", "bits_per_weight_total", "ppl", "ppl_delta_pct", "pareto",
)  # fmt: skip
"""Columns of a sweep's CSV, one row per config."""


def sweep_rows(results: Sequence[dict[str, Any]], pareto: Sequence[bool]) -> list[dict[str, Any]]:
    """The CSV rows of evaluated sweep configs (``pareto``: each row's place on the front)."""
    return [
        {k: r.get(k) for k in SWEEP_COLUMNS} | {"settings": settings(r), "pareto": front}
        for r, front in zip(results, pareto, strict=True)
    ]


def sweep_markdown(name: str, rows: Sequence[dict[str, Any]], baseline_ppl: float | None) -> str:
    """Markdown: the original, then every config by bits per weight; Pareto-front rows in bold, baselines marked."""
    lines = [
        f"# sweep {name}",
        "",
        "| config | rank rule | calibration | bits per weight (linears) | ppl | delta % | |",
        "|---|---|---|---|---|---|---|",
    ]
    if baseline_ppl is not None:
        lines.append(f"| original (fp16) | | | 16 | {baseline_ppl:.3f} | | |")
    for r in sorted(rows, key=lambda r: r["bits_per_weight"]):
        label = f"{r['method']} {r['settings']}"
        label = f"**{label}**" if r["pareto"] else label
        mark = "baseline" if r["baseline"] else ("Pareto" if r["pareto"] else "")
        lines.append(
            f"| {label} | {r['rank_rule']} | {r['samples']}×{r['seq_len']} | {r['bits_per_weight']:.3f} | "
            f"{r['ppl']:.3f} | {_fmt(r.get('ppl_delta_pct'), '+.1f')} | {mark} |"
        )
    return "\n".join(lines) + "\n"


def plot_sweep(rows: Sequence[dict[str, Any]], baseline_ppl: float | None, path: Path, title: str) -> None:
    """Perplexity versus bits per weight: the sweep's configs, its Pareto front as a line, baselines labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    configs = [r for r in rows if not r["baseline"]]
    ax.scatter([r["bits_per_weight"] for r in configs], [r["ppl"] for r in configs], color="tab:blue", label="configs")
    front = sorted((r for r in configs if r["pareto"]), key=lambda r: r["bits_per_weight"])
    ax.plot([r["bits_per_weight"] for r in front], [r["ppl"] for r in front], color="tab:blue", label="Pareto front")
    for r in configs:
        ax.annotate(
            r["settings"], (r["bits_per_weight"], r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points"
        )
    for r in (r for r in rows if r["baseline"]):
        ax.scatter(r["bits_per_weight"], r["ppl"], marker="s", color="tab:red")
        ax.annotate(f"{r['method']} {r['settings']}", (r["bits_per_weight"], r["ppl"]), fontsize=6, color="tab:red",
                    xytext=(3, -9), textcoords="offset points")  # fmt: skip
    if baseline_ppl is not None:
        ax.axhline(baseline_ppl, color="gray", linestyle="--", label=f"original ({baseline_ppl:.2f})")
    ax.set(xlabel="bits per weight (linears, every stored byte)", ylabel="perplexity", yscale="log", title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
