"""MAX graphs over the Mojo kernels in kernels_mojo/: the one module of caldera that imports ``max``.

What runs where, for one compressed linear y = x Ŵᵀ + b (docs/FORMAT.md §6):

    torch  x̃ = U_in x                 signs, FWHT, odd block (caldera.core.incoherence)
    MAX    ỹ = x̃ (Q + L R)ᵀ (+ b)     "fused": one Mojo op (one GPU launch), dequantizing Q, L and R on the fly
                                       "two_stage": t = x̃ Rᵀ, then x̃ Qᵀ + t Lᵀ in one pass (two ops)
    torch  y = U_outᵀ ỹ + b            the bias is fused into the op only when there is no incoherence

Graphs have symbolic dimensions: one compiled model serves every shape with the same bits and group sizes
(``KernelSpec``), activation dtype and device; it is compiled once per process and cached. Tensors go in and out
through DLPack (torch CPU or CUDA tensors, no copies); on CUDA, MAX's queue is ordered after torch's current
stream and torch's stream after it, so callers never synchronize by hand.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from max import driver
from max.dtype import DType
from max.engine import InferenceSession, Model
from max.graph import BufferType, DeviceRef, Graph, TensorType, TensorValue, Value, ops
from torch import nn

from caldera.runtime.compressed import CompressedLinear, PackedMatrix

Impl = Literal["fused", "two_stage"]
IMPLS: tuple[Impl, ...] = ("fused", "two_stage")
KERNELS = Path(os.environ.get("CALDERA_KERNELS", Path(__file__).resolve().parents[2] / "kernels_mojo"))
"""The Mojo package of the ops: a source folder (precompiled once per process) or a .mojoc."""
T_PARTS_GPU = 8
"""Partial sums of t = x̃ Rᵀ on the GPU: kernels_mojo/gpu_tiles.mojo's P_SPLIT (the CPU writes one)."""
XP_PARTS_GPU = 2
"""Rows of the prepared-activations scratch for 2-bit Q on the GPU: gpu_decode.mojo's XP_PARTS (else none)."""
SPLIT_VALUES_GPU = 3 << 20
"""Float32 values of the fused op's split-K scratch on the GPU (12 MiB, whatever the tokens): gpu.mojo's
SPLIT_VALUES."""

DTYPES = {torch.float32: DType.float32, torch.bfloat16: DType.bfloat16, torch.float16: DType.float16}

# MAX's device memory manager reserves most of a GPU by default; here torch holds the weights and MAX only the
# ops' outputs and scratch, so it gets a tenth unless the caller says otherwise (read when a device is created).
os.environ.setdefault("MODULAR_DEVICE_CONTEXT_MEMORY_MANAGER_SIZE_PERCENT", "10")


class Unsupported(ValueError):
    """The kernels cannot run this linear here; the message says why (callers fall back to the PyTorch path)."""


@dataclass(frozen=True)
class KernelSpec:
    """The ops' compile-time parameters: bits and group size of Q, L and R (bits 16: fp16 values, group 1)."""

    bq: int = 2
    gq: int = 64
    bl: int = 4
    gl: int = 64
    br: int = 4
    gr: int = 64

    @classmethod
    def of(cls, module: CompressedLinear, device: torch.device | str = "cpu") -> KernelSpec:
        """The spec of a layer, or Unsupported when the kernels cannot decode it on ``device``'s type."""
        gpu = torch.device(device).type == "cuda"
        parts = {"q": module.q} | ({"l": module.l, "r": module.r} if module.rank else {})
        for name, part in parts.items():
            _check_part(name, part, gpu)
        if not module.rank:  # L, R unused: share the default spec's compiled model
            return cls(module.q.bits, module.q.group_size)
        bits_group = [(p.bits, 1 if p.bits == 16 else p.group_size) for p in (module.l, module.r)]
        return cls(module.q.bits, module.q.group_size, *bits_group[0], *bits_group[1])

    def parameters(self, *parts: str) -> dict[str, int]:
        return {f"{a}{p}": getattr(self, f"{a}{p}") for p in parts for a in ("b", "g")}

    def key(self) -> str:
        return f"q{self.bq}g{self.gq}_l{self.bl}g{self.gl}_r{self.br}g{self.gr}"


def _check_part(name: str, part: PackedMatrix, gpu: bool) -> None:
    if getattr(part, "zeros", None) is not None:
        raise Unsupported(f"{name}: zero points are not supported by the kernels")
    allowed = (2, 4, 16) if gpu else (2, 4, 8, 16)
    if part.bits not in allowed or (name == "q" and part.bits == 16):
        raise Unsupported(f"{name}: {part.bits}-bit codes are not supported by the {'GPU' if gpu else 'CPU'} kernels")
    chunk = 128 // part.bits  # columns of one thread's 16-byte load on the GPU; it must not straddle groups
    per = part.group_size // chunk  # chunks per group: a power of two on the GPU
    if gpu and part.bits < 16 and (part.group_size % chunk or per & (per - 1)):
        raise Unsupported(f"{name}: group size {part.group_size} is not {chunk} times a power of two (GPU kernels)")


@dataclass
class KernelInputs:
    """A layer's stored tensors as the ops read them (views of the module's buffers: no copies)."""

    q_codes: torch.Tensor  # (m, nbytes(n, bq)) uint8
    q_scales: torch.Tensor  # (m, ngroups(n, gq)) fp16
    l_data: torch.Tensor  # (m, nbytes(k, bl)) uint8, or fp16 (m, k) as bytes (m, 2k); (m, 0) at rank 0
    l_scales: torch.Tensor  # (m, ngroups(k, gl)) fp16; (m, 0) for fp16 or rank 0
    r_data: torch.Tensor  # (k, nbytes(n, br)) uint8, or fp16 (k, n) as bytes (k, 2n)
    r_scales: torch.Tensor  # (k, ngroups(n, gr)) fp16; (k, 0) for fp16
    bias: torch.Tensor  # (m,) float32, or (0,)
    sync: torch.Tensor  # (2,) int64: the fused GPU launch's counters, zeros when created, reset by each launch

    @classmethod
    def of(cls, module: CompressedLinear, fuse_bias: bool) -> KernelInputs:
        device = module.q.codes.device
        empty_u8 = torch.empty(module.out_features, 0, dtype=torch.uint8, device=device)
        empty_f16 = torch.empty(module.out_features, 0, dtype=torch.float16, device=device)
        left = _part(module.l) if module.rank else (empty_u8, empty_f16)
        right = _part(module.r) if module.rank else (empty_u8[:0], empty_f16[:0])
        bias = module.bias.float() if fuse_bias and module.bias is not None else torch.empty(0, device=device)
        sync = torch.zeros(2, dtype=torch.int64, device=device)
        return cls(*_part(module.q), *left, *right, bias.contiguous(), sync)

    def args(self) -> list[torch.Tensor]:
        """The graph's inputs after x, in order."""
        return [
            self.q_codes,
            self.q_scales,
            self.l_data,
            self.l_scales,
            self.r_data,
            self.r_scales,
            self.bias,
            self.sync,
        ]


def _part(part: PackedMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """(data, scales) of one stored part: packed codes and fp16 scales, or fp16 values as bytes and no scales."""
    if part.bits == 16:
        values = part.weight.view(torch.float16)
        return values.view(torch.uint8), torch.empty(part.rows, 0, dtype=torch.float16, device=values.device)
    return part.codes, part.scales.view(torch.float16)


@cache
def kernel_package() -> Path:
    """The kernels as a .mojoc, precompiled once per process (MAX otherwise reruns `mojo precompile` per graph)."""
    if KERNELS.suffix == ".mojoc":
        return KERNELS
    from mojo.paths import _build_mojo_source_package  # MAX's own precompile step

    return _build_mojo_source_package(KERNELS)


@cache
def max_device(kind: str, index: int = 0) -> driver.Device:
    return driver.CPU() if kind == "cpu" else driver.Accelerator(index)


@cache
def session(device: driver.Device) -> InferenceSession:
    return InferenceSession(devices=[device])


KERNEL_INPUT_DIMS = (
    ("m", "q_bytes"),
    ("m", "q_groups"),
    ("l_rows", "l_bytes"),
    ("l_rows", "l_groups"),
    ("k", "r_bytes"),
    ("k", "r_groups"),
    ("b",),
)
"""Symbolic dims of KernelInputs.args() but ``sync`` (the layer graphs prefix each linear's names)."""


def kernel_input_types(ref: DeviceRef, prefix: str = "") -> list[TensorType | BufferType]:
    """The graph input types of ``KernelInputs.args()``, with symbolic dims named ``prefix`` + KERNEL_INPUT_DIMS."""
    dtypes = (DType.uint8, DType.float16) * 3 + (DType.float32,)
    types = zip(dtypes, KERNEL_INPUT_DIMS, strict=True)
    tensors = [TensorType(dt, [prefix + d for d in dims], device=ref) for dt, dims in types]
    return [*tensors, BufferType(DType.int64, [2], device=ref)]


def linear_op(impl: Impl, spec: KernelSpec, ref: DeviceRef, x: TensorValue, inputs: list[Value]) -> TensorValue:
    """ỹ (s, m) = x (s, n) (Q + L R)ᵀ (+ fused bias) in x's dtype, from the graph values of KernelInputs.args()."""
    qc, qs, ld, ls, rd, rs, bias = (v.tensor for v in inputs[:7])
    sync = inputs[7].buffer
    y_type = TensorType(x.dtype, [x.shape[0], qc.shape[0]], device=ref)
    parts = 1 if ref.is_cpu() else T_PARTS_GPU
    t_type = TensorType(DType.float32, [parts, x.shape[0], rd.shape[0]], device=ref)  # x̃ Rᵀ, P partial sums
    xp_parts = XP_PARTS_GPU if not ref.is_cpu() and spec.bq == 2 else 0
    xp_type = TensorType(x.dtype, [xp_parts, x.shape[0], x.shape[1]], device=ref)  # stage 1's prepared x̃ (scratch)
    if impl == "fused":
        values, params = [x, qc, qs, ld, ls, rd, rs, bias, sync], spec.parameters("q", "l", "r")
        split_type = TensorType(DType.float32, [0 if ref.is_cpu() else SPLIT_VALUES_GPU], device=ref)
        out_types = [y_type, t_type, xp_type, split_type]
        return ops.inplace_custom("caldera_qlr_fused", ref, values, out_types, params)[0].tensor
    t, xp = ops.custom("caldera_lr_project", ref, [x, rd, rs], [t_type, xp_type], spec.parameters("r"))
    values = [x, t, xp, qc, qs, ld, ls, bias]
    return ops.custom("caldera_qlr_apply", ref, values, [y_type], spec.parameters("q", "l"))[0].tensor


def build_graph(impls: tuple[Impl, ...], spec: KernelSpec, dtype: DType, device: driver.Device, sets: int = 1) -> Graph:
    """Layers' transformed-domain products: inputs (x (s, n), then KernelInputs.args() of each of ``sets`` layers)
    -> y (s, m) per layer and impl (layer-major).

    Several impls in one graph share one compilation (tests, the GPU compile check); the runtime uses one each.
    Several layers on one x run back to back (the benchmark times them as one captured graph).
    """
    ref = DeviceRef.from_device(device)
    prefixes = [""] if sets == 1 else [f"w{i}_" for i in range(sets)]
    types = [TensorType(dtype, ["s", "n"], device=ref)]
    for prefix in prefixes:
        types += kernel_input_types(ref, prefix)
    name = f"caldera_{'_'.join(impls)}_{spec.key()}" + (f"_x{sets}" if sets > 1 else "")
    per = len(KERNEL_INPUT_DIMS) + 1
    with Graph(name, input_types=types, custom_extensions=[kernel_package()]) as g:
        x = g.inputs[0].tensor
        layers = [list(g.inputs[1 + i * per : 1 + (i + 1) * per]) for i in range(sets)]
        g.output(*(linear_op(impl, spec, ref, x, inputs) for inputs in layers for impl in impls))
    return g


@cache
def compiled(
    impls: tuple[Impl, ...], spec: KernelSpec, dtype: torch.dtype, device: driver.Device, sets: int = 1
) -> Model:
    """``build_graph`` compiled, once per process (tens of seconds cold, a few from MAX's disk cache)."""
    return session(device).load(build_graph(impls, spec, DTYPES[dtype], device, sets))


def compile_for_gpu(impls: tuple[Impl, ...], spec: KernelSpec, dtype: torch.dtype, target: str, out: Path) -> None:
    """``build_graph``'s GPU branch compiled for ``target`` through MAX's virtual device (``compile_graph_for_gpu``)."""
    compile_graph_for_gpu(lambda device: build_graph(impls, spec, DTYPES[dtype], device), target, out)


def compile_graph_for_gpu(build: Callable[[driver.Device], Graph], target: str, out: Path) -> None:
    """Compile ``build(device)`` for ``target`` (e.g. "sm_90a") through MAX's virtual device; raises on any error.

    It switches this process to virtual-device mode for good: call it in a process of its own.
    """
    driver.set_virtual_device_api("cuda")
    driver.set_virtual_device_target_arch(target)
    driver.set_virtual_device_count(1)
    device = driver.Accelerator()
    InferenceSession(devices=[device], export_mefs=str(out)).compile_reusing_mefs(build(device))


class Ordered:
    """On CUDA: MAX's queue waits for torch's current stream before the block, torch's stream for MAX's after it.

    Through a torch view of MAX's queue; if torch cannot use that stream, both sides are synchronized instead
    (correct, slower).
    """

    def __init__(self, device: driver.Device, tensor_device: torch.device) -> None:
        self.device, self.cuda = device, tensor_device.type == "cuda"
        self.stream = _queue_stream(tensor_device.index or 0) if self.cuda else None
        self.caller = torch.cuda.current_stream(tensor_device) if self.cuda else None

    def __enter__(self) -> None:
        if self.cuda and self.stream is not None:
            self.stream.wait_stream(self.caller)
        elif self.cuda:
            self.caller.synchronize()

    def __exit__(self, *exc: object) -> None:
        if self.cuda and self.stream is not None:
            self.caller.wait_stream(self.stream)
        elif self.cuda:
            self.device.synchronize()


@cache
def _queue_stream(index: int) -> torch.cuda.ExternalStream | None:
    """MAX's queue on CUDA device ``index`` as a torch stream, or None if torch cannot use it."""
    try:
        handle = max_device("gpu", index).default_queue.native_stream_handle
        stream = torch.cuda.ExternalStream(handle, device=torch.device("cuda", index))
        stream.wait_stream(torch.cuda.current_stream(index))
        return stream
    except RuntimeError:
        return None


def time_on_queue(fn: Callable[[], object], index: int = 0) -> float:
    """Microseconds between device events recorded on MAX's queue of CUDA device ``index`` around ``fn()``."""
    device = max_device("gpu", index)
    start, end = driver.DeviceEvent(device, enable_timing=True), driver.DeviceEvent(device, enable_timing=True)
    device.default_queue.record_event(start)
    fn()
    device.default_queue.record_event(end)
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def transformed_matmul(
    x: torch.Tensor, inputs: KernelInputs, spec: KernelSpec, impls: tuple[Impl, ...] = ("fused",)
) -> tuple[torch.Tensor, ...]:
    """ỹ (s, m) = x (s, n) (Q + L R)ᵀ (+ fused bias) through MAX on x's device, once per impl (one graph).

    Results have x's dtype; on a GPU, float32 activations are rounded to bf16 for the tensor cores.
    """
    gpu = x.device.type == "cuda"
    xin = x.to(torch.bfloat16) if gpu and x.dtype == torch.float32 else x.contiguous()
    device = max_device("gpu" if gpu else "cpu", x.device.index or 0)
    model = compiled(impls, spec, xin.dtype, device)
    with Ordered(device, x.device):
        outs = model.execute(xin, *inputs.args())
    return tuple(torch.from_dlpack(out).to(x.dtype) for out in outs)


def captured(x: torch.Tensor, layers: list[KernelInputs], spec: KernelSpec, impl: Impl) -> Callable[[], None]:
    """One impl on fixed CUDA buffers, every layer of ``layers`` in turn, captured as one device graph (MAX's
    Model.capture); returns its replay.

    Replays run on MAX's queue and rewrite the same output buffers; used to time kernels without launch gaps.
    """
    device = max_device("gpu", x.device.index or 0)
    model = compiled((impl,), spec, x.dtype, device, len(layers))
    tensors = [x.contiguous()] + [t for inputs in layers for t in inputs.args()]
    buffers = [driver.Buffer.from_dlpack(t) for t in tensors]
    key = next(_capture_keys)
    with Ordered(device, x.device):
        model.capture(key, *buffers)
    return lambda: model.replay(key, *buffers)


_capture_keys = itertools.count(1)


class MaxModule(nn.Module):
    """A module whose compressed linears run through MAX: ``use_max`` leaves the linears inside it alone."""


class MaxLinear(MaxModule):
    """A CompressedLinear whose transformed-domain product runs in MAX: y = U_outᵀ MAX(U_in x) (+ b) (+ S x for kept
    weights, in torch).

    Falls back to the module's own PyTorch forward when the kernels cannot run the layer (``reason`` says why).
    """

    def __init__(self, module: CompressedLinear, impl: Impl = "fused") -> None:
        super().__init__()
        self.module, self.impl = module, impl
        self.reason: str | None = None
        try:
            self.spec = KernelSpec.of(module, module.q.codes.device)
        except Unsupported as e:
            self.reason = str(e)
        self.inputs = None if self.reason else KernelInputs.of(module, fuse_bias=not module.incoherence)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> y (..., out) in x's dtype."""
        return self.outputs(x, (self.impl,))[0]

    def outputs(self, x: torch.Tensor, impls: tuple[Impl, ...]) -> tuple[torch.Tensor, ...]:
        """The forward of each impl from one graph (tests compare them at the cost of one compilation)."""
        m = self.module
        if self.inputs is None:
            return (m(x),) * len(impls)
        lead = x.shape[:-1]
        xt = x.reshape(-1, m.in_features)
        if m.incoherence:
            xt = m._transform("in", x.dtype).forward(xt)
        ys = transformed_matmul(xt, self.inputs, self.spec, impls)
        if m.incoherence:
            ys = tuple(m._transform("out", x.dtype).inverse(y) for y in ys)
            ys = ys if m.bias is None else tuple(y + m.bias.to(x.dtype) for y in ys)
        x2 = x.reshape(-1, m.in_features)
        return tuple(m.outlier_term(x2, y).reshape(*lead, m.out_features) for y in ys)  # kept weights, in torch


def use_max(model: nn.Module, impl: Impl = "fused", scope: Literal["linear", "layer"] = "linear") -> dict[str, str]:
    """Route every CompressedLinear of ``model`` through MAX, in place.

    ``scope="linear"``: each becomes a MaxLinear around it. ``scope="layer"``: each decoder layer's projections
    first go through layer graphs (``max_layer.use_max_layers``: q/k/v, o, the SwiGLU MLP, transforms inside),
    the rest (the head; groups the layer graphs cannot run) through MaxLinear. Returns {module name: reason}
    for what took a slower path: a group left to MaxLinear, a linear left to its PyTorch forward.
    """
    fallbacks = {}
    if scope == "layer":
        from caldera.runtime.max_layer import use_max_layers  # built on this module

        fallbacks = use_max_layers(model, impl)
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CompressedLinear) and not isinstance(parent, MaxModule):
                layer = MaxLinear(child, impl)
                setattr(parent, name, layer)
                if layer.reason:
                    fallbacks[f"{parent_name}.{name}".lstrip(".")] = layer.reason
    return fallbacks
