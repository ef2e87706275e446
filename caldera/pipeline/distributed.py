"""Decomposition spread over a Ray cluster: one task per unfinished layer, one GPU per task when on CUDA.

The run directory is the only channel: tasks read the weights from the model's shards and the Hessians from
``RUN/hessians`` and write ``RUN/layers/layer_NNN.safetensors`` atomically (``decompose_layer_into_run``,
the code a local run uses), so every node must see the model folder and the run directory at the same paths
(shared storage). The driver holds ``RUN/.lock`` for the whole job; finished layers are read back, not
recomputed, so an interrupted job resumes like a local one, and each layer's tensors are the local run's
bit for bit (same code, same seeds, same device type).

Ray is the optional extra ``caldera[distributed]``; it is imported only here, when a job asks for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from caldera.config import DecomposeConfig
from caldera.io.run_dir import RunDir
from caldera.pipeline.decompose_model import LayerResult
from caldera.pipeline.run_decompose import LayerDone, stored_result

LOCAL = "local"
"""``--ray`` without an address: ``ray.init()`` (the cluster in RAY_ADDRESS, else a new local one)."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot be joined or started (one line)."""


def import_ray():
    """The ray module, or an ImportError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray: pip install 'caldera[distributed]' (or pip install ray)") from None
    return ray


def _layer_task(run_root: str, folder: str, layer: int, cfg: dict, spec: dict[str, Any], device: str, threads: int):
    """Runs on a Ray worker: decompose one layer into the run directory; its LayerResult (no tensors; on CUDA with
    the worker's peak GPU memory).

    ``threads``: torch's CPU threads, the driver's (Ray gives a worker one), so that CPU float sums group as in
    a local run."""
    import torch

    torch.set_num_threads(threads)
    from caldera.io.shards import ShardReader
    from caldera.pipeline.run_decompose import decompose_layer_into_run

    cfg_ = DecomposeConfig.from_dict(cfg)
    cuda = device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # a worker process may run several tasks
    with torch.no_grad():
        result = decompose_layer_into_run(RunDir(run_root), ShardReader(folder), layer, cfg_, spec, device)
    result.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return result


def connect(address: str) -> None:
    """Join (or start, for LOCAL) a Ray cluster unless this process already has one."""
    ray = import_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address == LOCAL else address, log_to_driver=False)
    except Exception as e:  # Ray raises ValueError, ConnectionError, RuntimeError, ... by cause
        raise ClusterError(f"cannot join the Ray cluster at {address}: {e}") from None


def ray_decompose_into_run(
    run: RunDir,
    folder: Path | str,
    layers: Iterable[int],
    cfg: DecomposeConfig,
    spec: dict[str, Any],
    device: str,
) -> Iterator[LayerDone]:
    """The finished layers first (read back, in order), then every other layer as its Ray task completes.

    ``device`` is the device type (cpu or cuda): a CUDA task asks Ray for one GPU and sees it as cuda:0.
    Call under ``RunDir.lock`` with Ray connected (``connect``).
    """
    ray = import_ray()
    todo = []
    for i in layers:
        stored = stored_result(run, i, spec)
        if stored is None:
            todo.append(i)
        else:
            yield LayerDone(stored, resumed=True)
    task = ray.remote(_layer_task).options(num_gpus=1 if device == "cuda" else 0, num_cpus=1, max_retries=0)
    args = (str(run.root.resolve()), str(Path(folder).resolve()))
    threads = torch.get_num_threads()
    pending = [task.remote(*args, i, cfg.to_dict(), spec, device, threads) for i in todo]
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            result: LayerResult = ray.get(ready[0])
            yield LayerDone(result, resumed=False)
    finally:
        for ref in pending:  # interrupted: stop what has not finished (finished layers stay in the run)
            ray.cancel(ref, force=True)
