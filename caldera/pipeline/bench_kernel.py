"""Kernel benchmark: the MAX ops (fused, two-stage) against unfused PyTorch and dense fp16 at real layer shapes.

For each projection shape, random packed layers (BQ=2, BL=BR=4, rank 256, groups of 64, no incoherence: the
transforms are the same for every impl and stay out of the timing) are generated in place. Per (shape, impl):

    median_us   median time of one call; on a GPU between device events, each sample one replay of a captured
                device graph that calls the impl once per weight set (several sets, so that L2 holds none of
                them; no host work or launch gaps between the calls), divided by the sets; on a CPU by
                perf_counter around a call on each of two sets
    gbps        bytes the impl must read (packed parts, or the dense weight) + activations, over median_us
    rel_err     ||y - y_ref|| / ||y_ref|| against the dense dequantized weight in float64 on the same inputs

and for each impl the tokens/s that a stack of ``layers`` decoder layers of those projections would reach.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from caldera.pipeline.hessians import PROJ_PATH
from caldera.runtime.compressed import CompressedLinear
from caldera.testing.packed import random_packed_linear

IMPLS = ("fused", "two_stage", "unfused_torch", "dense")
PROJECTIONS = tuple(PROJ_PATH)  # q, k, v, o, gate, up, down


@dataclass(frozen=True)
class ModelShapes:
    """The (out, in) shape of each projection of one decoder layer, and the number of layers."""

    name: str
    layers: int
    linears: dict[str, tuple[int, int]]

    @classmethod
    def from_config(cls, name: str, cfg: dict) -> ModelShapes:
        """From a Hugging Face config.json (Llama/Qwen2-style attention and MLP)."""
        hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or hidden // heads
        q, kv, inter = heads * head_dim, cfg.get("num_key_value_heads", heads) * head_dim, cfg["intermediate_size"]
        shapes = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden)]
        return cls(name, cfg["num_hidden_layers"], dict(zip(PROJECTIONS, [*shapes, (hidden, inter)], strict=True)))

    def distinct(self) -> list[tuple[int, int]]:
        return list(dict.fromkeys(self.linears.values()))

    def only(self, names: list[str]) -> ModelShapes:
        """The projections ``names`` alone (a layer stack's tokens/s then needs the rest: none is computed)."""
        if unknown := [n for n in names if n not in self.linears]:
            raise ValueError(f"unknown projection {unknown[0]!r}; choose from {', '.join(self.linears)}")
        return ModelShapes(self.name, self.layers, {n: self.linears[n] for n in self.linears if n in names})


QWEN2_72B = ModelShapes.from_config(
    "qwen2-72b",
    {
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
    },
)


def model_shapes(spec: str) -> ModelShapes:
    """``qwen2-72b`` or a model folder with a config.json."""
    if spec == QWEN2_72B.name:
        return QWEN2_72B
    path = Path(spec) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{spec}: neither 'qwen2-72b' nor a folder with a config.json")
    return ModelShapes.from_config(Path(spec).name, json.loads(path.read_text()))


@dataclass(frozen=True)
class BenchConfig:
    seq: int
    device: str  # "cpu" or "cuda"
    impls: tuple[str, ...] = IMPLS
    rank: int = 256
    bq: int = 2
    blr: int = 4
    group: int = 64
    sets: int | None = None  # weight sets to rotate through (default: enough to overflow the L2 twice)
    iters: int = 50  # timed samples (GPU); the CPU takes what fits in cpu_seconds, at least 3
    cpu_seconds: float = 3.0
    seed: int = 0


@dataclass
class BenchRow:
    shape: list[int]  # [out, in]
    seq: int
    impl: str
    device: str
    median_us: float
    gbps: float
    pct_copy: float
    rel_err: float
    dtype: str
    timing: str  # "device graph" (GPU) or "perf_counter" (CPU)


@dataclass
class Case:
    """One impl on every weight set: a timed call (one product per set), the first set's output (for the error),
    and the bytes one product must read."""

    call: Callable[[], object]
    sets: int
    output: Callable[[], torch.Tensor]
    nbytes: int
    on_max_queue: bool  # timed with events on MAX's queue rather than torch's stream


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), "CPU")
    return f"{model} ({torch.get_num_threads()} threads)"


def _cpuinfo() -> list[str]:
    path = Path("/proc/cpuinfo")
    return path.read_text().splitlines() if path.exists() else []


def copy_gbps(device: str) -> float:
    """Measured copy bandwidth, bytes read + written per second / 1e9 (a 512 MB device-to-device copy)."""
    a = torch.randn(128 * 2**20, device=device)
    b = torch.empty_like(a)
    times = [_time_once(lambda: b.copy_(a), device) for _ in range(10)]
    return 2 * a.numel() * 4 / statistics.median(times) / 1e3


def _time_once(fn: Callable[[], object], device: str) -> float:
    """Microseconds of one call (device events on a GPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def _graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """A torch computation captured as a CUDA graph (after a warm-up call), replayed by the returned call."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _max_call(mg, x, layers, spec, impl: str) -> Callable[[], object]:
    """The replay of a captured device graph of the op on every layer, or eager execution if MAX cannot capture it."""
    try:
        return mg.captured(x, layers, spec, impl)
    except RuntimeError as e:
        EAGER[impl] = str(e).splitlines()[0]
        return lambda: [mg.transformed_matmul(x, inputs, spec, (impl,)) for inputs in layers]


EAGER: dict[str, str] = {}
"""impl -> why MAX could not capture it as a device graph (it then runs eagerly; said under the tables)."""


def _case(impl: str, modules: list[CompressedLinear], x: torch.Tensor, cfg: BenchConfig) -> Case:
    """``impl`` on every module of ``modules``, as one call."""
    gpu = cfg.device == "cuda"
    act = x.nbytes + x.shape[0] * modules[0].out_features * x.element_size()
    if impl in ("fused", "two_stage"):
        from caldera.runtime import max_graph as mg

        layers = [mg.KernelInputs.of(m, fuse_bias=False) for m in modules]
        spec = mg.KernelSpec.of(modules[0], cfg.device)
        output = lambda: mg.transformed_matmul(x, layers[0], spec, (impl,))[0]  # noqa: E731
        runs = [lambda i=inputs: mg.transformed_matmul(x, i, spec, (impl,)) for inputs in layers]
        call = _max_call(mg, x, layers, spec, impl) if gpu else lambda: [run() for run in runs]
        return Case(call, len(modules), output, modules[0].nbytes() + act, gpu)
    if impl == "unfused_torch":
        runs = [lambda m=m: m(x) for m in modules]
        nbytes = modules[0].nbytes()
    else:  # dense fp16 through cuBLAS; float32 on the CPU, which has no fast fp16 GEMM
        weights = [m.transformed_weight(torch.float16 if gpu else torch.float32) for m in modules]
        xd = x.to(weights[0].dtype)
        runs = [lambda w=w: torch.nn.functional.linear(xd, w) for w in weights]
        nbytes = weights[0].nbytes
    chain = lambda: [run() for run in runs]  # noqa: E731
    return Case(_graphed(chain) if gpu else chain, len(modules), runs[0], nbytes + act, False)


def _median_us(case: Case, cfg: BenchConfig) -> float:
    """Median microseconds per product (warm-up first)."""
    case.call()
    if cfg.device == "cuda":
        case.call()
        torch.cuda.synchronize()
        if case.on_max_queue:
            from caldera.runtime.max_graph import time_on_queue

            timer = lambda: time_on_queue(case.call)  # noqa: E731
        else:
            timer = lambda: _time_once(case.call, "cuda")  # noqa: E731
        samples = [timer() / case.sets for _ in range(cfg.iters)]
    else:
        samples, start = [], time.perf_counter()
        while len(samples) < 3 or time.perf_counter() - start < cfg.cpu_seconds:
            samples.append(_time_once(case.call, "cpu") / case.sets)
    return statistics.median(samples)


def _sets(cfg: BenchConfig, nbytes: int) -> int:
    """Weight sets to rotate through: their bytes overflow the GPU's L2 twice (2 on a CPU)."""
    if cfg.sets:
        return cfg.sets
    if cfg.device != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(2, min(64, math.ceil(2 * l2 / nbytes)))


def bench_shape(shape: tuple[int, int], cfg: BenchConfig, copy: float) -> list[BenchRow]:
    """Every impl at one (out, in) shape."""
    out_f, in_f = shape
    gpu = cfg.device == "cuda"
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.seq, in_f, generator=gen).to(cfg.device, torch.bfloat16 if gpu else torch.float32)
    options = {
        "rank": min(cfg.rank, out_f, in_f),
        "bq": cfg.bq,
        "bl": cfg.blr,
        "br": cfg.blr,
        "group_size": cfg.group,
        "lr_group_size": cfg.group,
        "incoherence": False,
    }

    def layer(seed: int) -> CompressedLinear:
        tensors, meta = random_packed_linear(out_f, in_f, seed=seed, **options)
        return CompressedLinear(tensors, "linear", meta).to(cfg.device)

    modules = [layer(cfg.seed)]
    reference = x.double() @ modules[0].transformed_weight(torch.float64).T
    dense_bytes = out_f * in_f * (2 if gpu else 4)
    counts = {impl: _sets(cfg, dense_bytes if impl == "dense" else modules[0].nbytes()) for impl in cfg.impls}
    modules += [layer(cfg.seed + j) for j in range(1, max(counts.values()))]
    rows = []
    for impl in cfg.impls:
        case = _case(impl, modules[: counts[impl]], x, cfg)
        y = case.output()
        rel = ((y.double() - reference).norm() / reference.norm()).item()
        us = _median_us(case, cfg)
        gbps = case.nbytes / us / 1e3
        dtype = "fp16" if impl == "dense" and gpu else str(x.dtype).removeprefix("torch.")
        timing = ("eager" if impl in EAGER else "device graph") if gpu else "perf_counter"
        rows.append(
            BenchRow(
                [out_f, in_f], cfg.seq, impl, device_name(cfg.device), us, gbps, 100 * gbps / copy, rel, dtype, timing
            )
        )
        del case
        if gpu:
            torch.cuda.empty_cache()
    return rows


def tokens_per_second(rows: list[BenchRow], shapes: ModelShapes, seq: int) -> dict[str, float]:
    """Per impl: seq / (layers × Σ over one layer's projections of median_us), in tokens/s; none unless ``shapes``
    holds all of a layer's projections."""
    if list(shapes.linears) != list(PROJECTIONS):
        return {}
    times = {(r.impl, tuple(r.shape)): r.median_us for r in rows}
    out = {}
    for impl in dict.fromkeys(r.impl for r in rows):
        layer_us = sum(times[(impl, shape)] for shape in shapes.linears.values())
        out[impl] = seq * 1e6 / (shapes.layers * layer_us)
    return out


def run(shapes: ModelShapes, cfg: BenchConfig, progress: Callable[[str], None] = lambda _: None) -> BenchResult:
    """Every distinct shape of ``shapes`` × every impl of ``cfg``."""
    copy = copy_gbps(cfg.device)
    rows = []
    for shape in shapes.distinct():
        progress(f"{shape[0]}×{shape[1]}")
        rows += bench_shape(shape, cfg, copy)
    return BenchResult(rows, tokens_per_second(rows, shapes, cfg.seq), copy, device_name(cfg.device), shapes, cfg)


@dataclass
class BenchResult:
    rows: list[BenchRow]
    tokens_per_s: dict[str, float]
    copy_gbps: float
    device: str
    shapes: ModelShapes
    cfg: BenchConfig

    def markdown(self) -> str:
        """The tables: one row per (shape, impl) with the speedups over dense and unfused, then tokens/s."""
        base = {(r.impl, tuple(r.shape)): r.median_us for r in self.rows}
        lines = [
            f"`caldera bench --seq {self.cfg.seq}` on {self.device}: {self.shapes.name} projections, BQ={self.cfg.bq},"
            f" BL=BR={self.cfg.blr}, rank {self.cfg.rank}, groups of {self.cfg.group}; copy bandwidth"
            f" {self.copy_gbps:.0f} GB/s (read + write); timing: {self.rows[0].timing}.",
            "",
            "| shape (out×in) | impl | median µs | GB/s | % copy | × dense | × unfused | rel_err |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            shape = tuple(r.shape)
            dense, unfused = (_ratio(base.get((other, shape)), r.median_us) for other in ("dense", "unfused_torch"))
            lines.append(
                f"| {shape[0]}×{shape[1]} | {r.impl} | {r.median_us:.1f} | {r.gbps:.0f} | {r.pct_copy:.0f} |"
                f" {dense} | {unfused} | {r.rel_err:.2e} |"
            )
        if self.tokens_per_s:
            stack = f"Tokens/s of a {self.shapes.layers}-layer stack of these projections (seq {self.cfg.seq}):"
            lines += ["", stack, ""]
            lines += ["| impl | tokens/s |", "|---|---:|"]
            lines += [f"| {impl} | {tps:.3g} |" for impl, tps in self.tokens_per_s.items()]
        lines += [f"\n{impl} ran eagerly (no device graph): {why}" for impl, why in EAGER.items()]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> list[Path]:
        """``bench-seq<S>-<cpu|gpu>.csv`` and ``.md`` in ``out``."""
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"bench-seq{self.cfg.seq}-{'gpu' if self.cfg.device == 'cuda' else 'cpu'}"
        fields = list(asdict(self.rows[0]))
        csv = [",".join(fields)] + [",".join(_csv_cell(getattr(r, f)) for f in fields) for r in self.rows]
        paths = [stem.with_suffix(".csv"), stem.with_suffix(".md")]
        paths[0].write_text("\n".join(csv) + "\n")
        paths[1].write_text(self.markdown())
        return paths


def _ratio(other_us: float | None, us: float) -> str:
    return "–" if other_us is None else f"{other_us / us:.2f}"


def _csv_cell(value: object) -> str:
    if isinstance(value, list):
        return "x".join(map(str, value))
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if "," in text else text
