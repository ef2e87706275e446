"""MAX graphs over a decoder layer's compressed projections, with the incoherence transforms inside the graph.

A *group* is the linears that read one input: q/k/v (the attention input), o, gate/up (the MLP input), down.
For a group and its input x (s, n), one graph computes (docs/FORMAT.md §6):

    x̃_j = U_in,j x          signs (elementwise), then one ``caldera_axis_matmul`` per Kronecker factor of
                             B ⊗ H_a ⊗ H_b (the odd block, two Hadamard factors of n / q); every matrix has signs
                             of its own (su/sv per linear, a seed per matrix), so the group's distinct U_in run as one
                             stacked (d, s, n) tensor; linears whose U_in coincide share a row
    ỹ_j = x̃_j (Q + L R)ᵀ    the fused or two-stage op of ``max_graph`` (the bias fused when there is no incoherence)
    y_j = U_out,jᵀ ỹ_j + b   outputs of equal width (k/v, gate/up) stacked through one inverse transform

A ``Step`` is one graph input through one group (every y_j out), or with ``swiglu`` through gate/up, then
silu(gate)·up, then down (one output). ``LayerGraph`` compiles a chain of steps as one MAX model: the decoder
layer's projections (``layer_steps``: four inputs, seven outputs), or the three that a forward pass runs with
attention and the norms in torch between them (``use_max_layers``: q/k/v | o | SwiGLU MLP). Every dim is
symbolic, so one compiled model per (structure, specs, impl, dtype, device) serves every width and token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache

import torch
from max import driver
from max.dtype import DType
from max.engine import Model
from max.graph import BufferType, DeviceRef, Graph, TensorType, TensorValue, Value, ops
from torch import nn

from caldera.core.incoherence import _hadamard, split_pow2
from caldera.runtime import max_graph as mg
from caldera.runtime.compressed import CompressedLinear

ATTENTION = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
SWIGLU_ACTS = ("silu", "swish")
"""``config.hidden_act`` values whose MLP is down(silu(gate(x)) · up(x))."""


@dataclass(frozen=True)
class GroupPlan:
    """The structure of one group (hashable: with the impl, dtype and device, the key of a compiled model)."""

    specs: tuple[mg.KernelSpec, ...]
    rows: tuple[int, ...]  # per linear: its row of the stacked transformed inputs, -1 without incoherence
    out_sets: tuple[tuple[int, ...], ...]  # incoherent linears of equal width, through one inverse transform
    out_bias: tuple[bool, ...]  # per out set: a bias added after the inverse transform


@dataclass(frozen=True)
class Step:
    """One graph input through ``groups[0]`` (each linear's output), or with ``swiglu`` through the gate/up group,
    silu(gate)·up and the down group (``groups`` = ((gate, up), (down,)); one output)."""

    groups: tuple[tuple[CompressedLinear, ...], ...]
    swiglu: bool = False


def _factors(n: int) -> list[torch.Tensor]:
    """(B, H_a, H_b) float32 with U = (B ⊗ H_a ⊗ H_b) diag(s) for width n = q·a·b (a ≤ b powers of two)."""
    p2, q = split_pow2(n)
    a = 1 << ((p2.bit_length() - 1) // 2)
    return [torch.ones(q, q), _hadamard(a).float(), _hadamard(p2 // a).float()]


def _transform_inputs(modules: Sequence[CompressedLinear], side: str) -> dict[str, torch.Tensor]:
    """Stacked signs (d, 1, width) and the factors of one (inverse) transform shared by ``modules`` (one width)."""
    first = modules[0]
    block = getattr(first, f"block_{side}")
    factors = _factors(first.out_features if side == "out" else first.in_features)
    if block is not None:
        b = first._transform(side, torch.float32).block.cpu()
        factors[0] = b.T.contiguous() if side == "out" else b  # U_outᵀ mixes the rows with Bᵀ
    for m in modules[1:]:
        other = getattr(m, f"block_{side}")
        if (block is None) != (other is None) or (block is not None and not torch.equal(block, other)):
            raise mg.Unsupported(f"the {side} blocks of a group differ (one file holds one block per width)")
    device = first.q.codes.device
    signs = torch.stack([getattr(m, f"signs_{side}").float() for m in modules]).unsqueeze(1)
    return {"signs": signs.to(device), **{k: f.to(device) for k, f in zip(("B", "Ha", "Hb"), factors, strict=True)}}


def plan_group(modules: Sequence[CompressedLinear]) -> tuple[GroupPlan, dict[str, torch.Tensor]]:
    """A group's plan and its graph inputs by name (``group_input_types`` order); Unsupported if the kernels can't."""
    device = modules[0].q.codes.device
    if len({m.in_features for m in modules}) > 1:
        raise mg.Unsupported("the linears of a group must read inputs of one width")
    if any(m.outlier_rows is not None for m in modules):
        raise mg.Unsupported("kept weights (protect) are added per linear, outside the layer graphs")
    specs = tuple(mg.KernelSpec.of(m, device) for m in modules)
    tensors: dict[str, torch.Tensor] = {}
    for j, m in enumerate(modules):
        tensors |= {f"{j}.{i}": t for i, t in enumerate(mg.KernelInputs.of(m, not m.incoherence).args())}
    distinct: list[CompressedLinear] = []  # U_in that differ (signs; the block depends on the width only)
    rows = []
    for m in modules:
        row = -1
        if m.incoherence:
            row = next((i for i, d in enumerate(distinct) if torch.equal(d.signs_in, m.signs_in)), len(distinct))
            distinct += [m] if row == len(distinct) else []
        rows.append(row)
    if distinct:
        tensors |= {f"in.{k}": t for k, t in _transform_inputs(distinct, "in").items()}
    widths = sorted({m.out_features for m in modules if m.incoherence})
    out_sets = tuple(tuple(j for j, m in enumerate(modules) if m.incoherence and m.out_features == w) for w in widths)
    out_bias = []
    for o, members in enumerate(out_sets):
        tensors |= {f"out{o}.{k}": t for k, t in _transform_inputs([modules[j] for j in members], "out").items()}
        biases = [modules[j].bias for j in members]
        out_bias.append(any(b is not None for b in biases))
        if out_bias[-1]:
            zero = torch.zeros(modules[members[0]].out_features, device=device)
            tensors[f"out{o}.bias"] = torch.stack([zero if b is None else b.float() for b in biases]).unsqueeze(1)
    return GroupPlan(specs, tuple(rows), out_sets, tuple(out_bias)), tensors


def group_input_types(plan: GroupPlan, ref: DeviceRef, prefix: str) -> dict[str, TensorType | BufferType]:
    """The graph inputs of one group but x, by name, with symbolic dims named after ``prefix``."""
    f32 = DType.float32
    types: dict[str, TensorType | BufferType] = {}
    for j in range(len(plan.specs)):
        kernel = mg.kernel_input_types(ref, f"{prefix}{j}_")
        types |= {f"{j}.{i}": t for i, t in enumerate(kernel)}
    sides = [("in", max(plan.rows) + 1)] if max(plan.rows) >= 0 else []
    sides += [(f"out{o}", len(members)) for o, members in enumerate(plan.out_sets)]
    for side, count in sides:
        p = f"{prefix}{side}_"
        types[f"{side}.signs"] = TensorType(f32, [count, 1, p + "width"], device=ref)
        types |= {f"{side}.{k}": TensorType(f32, [p + k, p + k], device=ref) for k in ("B", "Ha", "Hb")}
        if side != "in" and plan.out_bias[int(side[3:])]:
            types[f"{side}.bias"] = TensorType(f32, [count, 1, p + "width"], device=ref)
    return types


def _axis_matmul(x: TensorValue, m: TensorValue, view: list, ref: DeviceRef) -> TensorValue:
    """x viewed as (A, f, C) with M (f, f) applied along f: the view's shape, x's dtype."""
    x = ops.reshape(x, view)
    return ops.custom("caldera_axis_matmul", ref, [x, m], [TensorType(x.dtype, x.shape, device=ref)])[0].tensor


def _cast(x: TensorValue, dtype: DType) -> TensorValue:
    return x if x.dtype == dtype else ops.cast(x, dtype)


def _transform(x: TensorValue, values: dict[str, TensorValue], ref: DeviceRef, inverse: bool) -> TensorValue:
    """Forward: x (s, n) -> (d, s, n), row i = U_i x. Inverse: x (d, s, m) -> row i = U_iᵀ x_i (B given as Bᵀ).

    In x's dtype; d = the count of stacked signs.
    """
    signs = _cast(values["signs"], x.dtype)
    d, width = signs.shape[0], x.shape[-1]
    signs = ops.rebind(signs, [d, 1, width])
    y = x if inverse else ops.unsqueeze(x, 0) * signs  # signs first (forward) or last (inverse)
    b, ha, hb = (values[k] for k in ("B", "Ha", "Hb"))
    q, a, w = b.shape[0], ha.shape[0], hb.shape[0]
    rows = y.shape[1]
    shape = [d, rows, q * a * w]
    y = _axis_matmul(ops.rebind(y, shape), b, [-1, q, a * w], ref)  # the factors act on different axes
    y = _axis_matmul(y, ha, [-1, a, w], ref)
    y = ops.rebind(ops.reshape(_axis_matmul(y, hb, [-1, w, 1], ref), shape), [d, rows, width])
    return y * signs if inverse else y


def _group(
    plan: GroupPlan, x: TensorValue, values: dict[str, Value], impl: mg.Impl, kernel_dtype: DType, ref: DeviceRef
) -> list[TensorValue]:
    """y_j (s, m_j) of every linear of the group on x (s, n), in x's dtype."""
    act = x.dtype

    def side(name: str) -> dict[str, TensorValue]:
        return {k[len(name) + 1 :]: v.tensor for k, v in values.items() if k.startswith(name + ".")}

    xt = _transform(x, side("in"), ref, False) if max(plan.rows) >= 0 else None
    ys = []
    for j, (spec, row) in enumerate(zip(plan.specs, plan.rows, strict=True)):
        xj = _cast(x if row < 0 else xt[row], kernel_dtype)
        ys.append(_cast(mg.linear_op(impl, spec, ref, xj, [values[f"{j}.{i}"] for i in range(8)]), act))
    for o, members in enumerate(plan.out_sets):
        out = side(f"out{o}")
        first = ys[members[0]]
        y = _transform(ops.stack([ops.rebind(ys[j], first.shape) for j in members]), out, ref, True)
        if plan.out_bias[o]:
            y = y + _cast(ops.rebind(out["bias"], [len(members), 1, first.shape[1]]), act)
        for i, j in enumerate(members):
            ys[j] = ops.rebind(y[i], ys[j].shape)
    return ys


StepPlan = tuple[tuple[GroupPlan, ...], bool]
"""A step's group plans and whether SwiGLU joins them."""


def build_layer_graph(plans: tuple[StepPlan, ...], impl: mg.Impl, dtype: DType, device: driver.Device) -> Graph:
    """Inputs: per step x (s, n_step) in ``dtype``, then its groups' ``group_input_types``; outputs per step."""
    ref = DeviceRef.from_device(device)
    kernel_dtype = DType.bfloat16 if not device.is_host and dtype == DType.float32 else dtype
    types: dict[str, TensorType | BufferType] = {}
    for i, (groups, _) in enumerate(plans):
        types[f"{i}.x"] = TensorType(dtype, ["s", f"s{i}_n"], device=ref)
        for g, plan in enumerate(groups):
            types |= {f"{i}.{g}.{k}": t for k, t in group_input_types(plan, ref, f"s{i}g{g}_").items()}
    with Graph(f"caldera_layer_{impl}", input_types=list(types.values()), custom_extensions=[mg.kernel_package()]) as g:
        values = dict(zip(types, g.inputs, strict=True))
        outputs = []
        for i, (groups, swiglu) in enumerate(plans):
            x = values[f"{i}.x"].tensor
            for k, plan in enumerate(groups):
                prefix = f"{i}.{k}."
                group_values = {n[len(prefix) :]: v for n, v in values.items() if n.startswith(prefix)}
                ys = _group(plan, x, group_values, impl, kernel_dtype, ref)
                if swiglu and k == 0:
                    gate, up = ys
                    x = ops.silu(gate) * ops.rebind(up, gate.shape)
            outputs += ys
        g.output(*outputs)
    return g


@cache
def compiled_layer(plans: tuple[StepPlan, ...], impl: mg.Impl, dtype: torch.dtype, device: driver.Device) -> Model:
    """``build_layer_graph`` compiled, once per process (MAX's disk cache keeps it across processes)."""
    return mg.session(device).load(build_layer_graph(plans, impl, mg.DTYPES[dtype], device))


class LayerGraph:
    """Steps over CompressedLinears of one device as one compiled MAX model: one input per step -> the outputs.

    ``__call__(x_0, x_1, ...)``, x_i (..., n_i) with the same leading dims, returns every step's outputs
    ((..., m) each) in x's dtype. Unsupported (from the constructor) when the kernels cannot run a linear.
    """

    def __init__(self, steps: Sequence[Step], impl: mg.Impl = "fused") -> None:
        self.impl, plans, self.inputs = impl, [], []
        for step in steps:
            if step.swiglu and [len(g) for g in step.groups] != [2, 1]:
                raise ValueError("a SwiGLU step has the groups (gate, up), (down,)")
            step_plans, step_inputs = [], []
            for group in step.groups:
                plan, tensors = plan_group(group)
                step_plans.append(plan)
                step_inputs += [tensors[name] for name in group_input_types(plan, DeviceRef.CPU(), "g")]
            plans.append((tuple(step_plans), step.swiglu))
            self.inputs.append(step_inputs)
        self.plans: tuple[StepPlan, ...] = tuple(plans)
        self.widths = [m.out_features for step in steps for m in step.groups[-1 if step.swiglu else 0]]

    def __call__(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x0 = xs[0]
        device = mg.max_device("gpu" if x0.device.type == "cuda" else "cpu", x0.device.index or 0)
        model = compiled_layer(self.plans, self.impl, x0.dtype, device)
        args = []
        for x, inputs in zip(xs, self.inputs, strict=True):
            args += [x.reshape(-1, x.shape[-1]).contiguous(), *inputs]
        with mg.Ordered(device, x0.device):
            outs = model.execute(*args)
        lead = x0.shape[:-1]
        return tuple(torch.from_dlpack(y).reshape(*lead, m) for y, m in zip(outs, self.widths, strict=True))


def layer_steps(layer: nn.Module) -> list[Step]:
    """A transformers decoder layer's projections as four steps: q/k/v, o, gate/up, down (one input each)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [[attn, *ATTENTION], [attn, "o_proj"], [mlp, *MLP[:2]], [mlp, MLP[2]]]
    return [Step((tuple(getattr(parent, name) for name in names),)) for parent, *names in groups]


class _SharedRun:
    """A one-step LayerGraph run once per input tensor, each member taking its output (q/k/v read one x).

    A member asking again for the same x, or for another x (or x modified in place), runs the graph again.
    """

    def __init__(self, graph: LayerGraph) -> None:
        self.graph, self.count = graph, len(graph.widths)
        self.x: torch.Tensor | None = None
        self.version, self.outputs, self.taken = -1, (), set()

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.x is not x or self.version != x._version or index in self.taken:
            self.outputs, self.x, self.version, self.taken = self.graph(x), x, x._version, set()
        self.taken.add(index)
        y = self.outputs[index]
        if len(self.taken) == self.count:  # every member served: release x and the outputs
            self.x, self.outputs = None, ()
        return y


class MaxProjection(mg.MaxModule):
    """Member ``index`` of a group run as one graph (``_SharedRun``): x (..., n) -> its y (..., m) in x's dtype."""

    def __init__(self, module: CompressedLinear, shared: _SharedRun, index: int) -> None:
        super().__init__()
        self.module, self.shared, self.index = module, shared, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(self.index, x)


class MaxMLP(mg.MaxModule):
    """A SwiGLU MLP as one graph: x (..., hidden) -> down(silu(gate(x)) · up(x)) (..., hidden) in x's dtype."""

    def __init__(self, gate: CompressedLinear, up: CompressedLinear, down: CompressedLinear, impl: mg.Impl) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down  # the state dict keeps its names
        self.graph = LayerGraph([Step(((gate, up), (down,)), swiglu=True)], impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)[0]


def use_max_layers(model: nn.Module, impl: mg.Impl = "fused") -> dict[str, str]:
    """Route each decoder layer's compressed projections through layer graphs, in place: q/k/v as one graph run
    once per input, o as one, and a SwiGLU MLP (``config.hidden_act`` silu) as one graph from x to down's output.

    Returns {group name: reason} for the groups left to the per-linear path (``max_graph.use_max``).
    """
    fallbacks = {}
    swiglu = getattr(getattr(model, "config", None), "hidden_act", None) in SWIGLU_ACTS
    for name, module in list(model.named_modules()):
        if isinstance(module, mg.MaxModule):  # routed already
            continue
        for names in (ATTENTION, ("o_proj",)):
            linears = [getattr(module, n, None) for n in names]
            if not all(isinstance(m, CompressedLinear) for m in linears):
                continue
            try:
                shared = _SharedRun(LayerGraph([Step((tuple(linears),))], impl))
            except mg.Unsupported as e:
                fallbacks[f"{name}.{'+'.join(names)}".lstrip(".")] = str(e)
                continue
            for i, (n, m) in enumerate(zip(names, linears, strict=True)):
                setattr(module, n, MaxProjection(m, shared, i))
        mlp = [getattr(module, n, None) for n in MLP]
        if swiglu and all(isinstance(m, CompressedLinear) for m in mlp):
            try:
                model.set_submodule(name, MaxMLP(*mlp, impl))
            except mg.Unsupported as e:
                fallbacks[name] = str(e)
    return fallbacks
