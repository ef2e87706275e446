"""The graph's scratch sizes in max_graph.py are the kernels' own constants (a mismatch would turn GPU paths off)."""

import ast
import re
from pathlib import Path

import pytest

from caldera.runtime import max_graph as mg

KERNELS = Path(__file__).resolve().parents[2] / "kernels_mojo"

PAIRS = [  # (max_graph.py name, .mojo file, comptime name)
    ("T_PARTS_GPU", "gpu_tiles.mojo", "P_SPLIT"),
    ("XP_PARTS_GPU", "gpu_decode.mojo", "XP_PARTS"),
    ("SPLIT_VALUES_GPU", "gpu.mojo", "SPLIT_VALUES"),
]


def comptime_int(source: str, name: str) -> int:
    """The value of `comptime NAME = <integer expression>` in Mojo source."""
    match = re.search(rf"^comptime {name} = (.+)$", source, re.MULTILINE)
    assert match, f"no comptime {name}"
    tree = ast.parse(match.group(1), mode="eval")
    assert all(isinstance(n, (ast.Expression, ast.BinOp, ast.Constant, ast.operator)) for n in ast.walk(tree))
    return eval(compile(tree, name, "eval"))


@pytest.mark.parametrize(("py_name", "mojo_file", "mojo_name"), PAIRS)
def test_scratch_sizes_match_the_kernels(py_name, mojo_file, mojo_name):
    source = (KERNELS / mojo_file).read_text()
    assert getattr(mg, py_name) == comptime_int(source, mojo_name)
