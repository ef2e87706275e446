"""Bit allocation: choose one option per matrix minimising the total weighted error under a total bit budget.

Each matrix has options (stored bits, squared error); the greedy walks every matrix's lower convex hull of
(bits, error) from its cheapest option, always taking the step with the largest error drop per bit that still
fits the budget (the classic greedy for separable convex allocation, optimal at the hull's vertices).
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Hashable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Option:
    bq: int
    rank: int
    bits: int  # every stored bit of the matrix with this option
    sq_error: float  # weighted squared error (the allocator's objective term)


def lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of (bits, sq_error), by increasing bits, error strictly falling."""
    pts: list[Option] = []
    for o in sorted(options, key=lambda o: (o.bits, o.sq_error)):
        if pts and o.sq_error >= pts[-1].sq_error:
            continue  # costs more, no better
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]  # drop b if it lies on or above the segment a -> o
            if (b.sq_error - a.sq_error) * (o.bits - a.bits) >= (o.sq_error - a.sq_error) * (b.bits - a.bits):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def allocate(options: Mapping[Hashable, Sequence[Option]], budget_bits: int) -> dict[Hashable, Option]:
    """One option per key with the sum of bits <= budget_bits; ValueError if even the cheapest ones do not fit."""
    hulls = {k: lower_hull(v) for k, v in options.items()}
    chosen = {k: 0 for k in hulls}
    used = sum(h[0].bits for h in hulls.values())
    if used > budget_bits:
        raise ValueError(f"the cheapest options take {used} bits, more than the budget of {budget_bits}")
    heap = []

    def push(k: Hashable) -> None:
        h, i = hulls[k], chosen[k]
        if i + 1 < len(h):
            slope = (h[i].sq_error - h[i + 1].sq_error) / (h[i + 1].bits - h[i].bits)
            heapq.heappush(heap, (-slope, repr(k), k))

    for k in hulls:
        push(k)
    while heap:
        _, _, k = heapq.heappop(heap)
        h, i = hulls[k], chosen[k]
        extra = h[i + 1].bits - h[i].bits
        if used + extra <= budget_bits:
            chosen[k], used = i + 1, used + extra
            push(k)  # this matrix's next step; a step that does not fit ends the matrix
    return {k: hulls[k][i] for k, i in chosen.items()}
