"""`caldera allocate`: sensitivity-guided rank and BQ per layer and projection under a bits-per-weight budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from caldera.cli.common import GroupSizeOpt, JsonOpt, app, emit, err_console, fail, progress_bar


@app.command("allocate")
def allocate(
    run: Annotated[Path, typer.Option(help="A calibrated run directory (its Hessians; `caldera calibrate --run`).")],
    out: Annotated[Path, typer.Option(help="Overrides file to write (YAML; `caldera decompose/run --overrides`).")],
    budget: Annotated[
        float | None, typer.Option(help="Bits per weight of the linears (default: the profile's).", show_default=False)
    ] = None,
    profile: Annotated[str, typer.Option(help="balanced, attention-high or compression-max.")] = "balanced",
    bl: Annotated[int, typer.Option(help="Bits of L.")] = 4,
    br: Annotated[int, typer.Option(help="Bits of R.")] = 4,
    group_size: GroupSizeOpt = 64,
    device: Annotated[str, typer.Option(help="cpu or cuda (the probes).")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Probe every matrix (LDLQ at 2 bits, then the spectrum of its Hessian-weighted residual), choose rank and BQ
    per layer and projection that minimise the predicted error within the budget, and write them as overrides."""
    from caldera.config import ConfigError, DecomposeConfig
    from caldera.io.model_folder import ModelFolderError, read_model_config
    from caldera.io.run_dir import RunDir, RunDirError
    from caldera.io.shards import ShardError, ShardReader
    from caldera.pipeline import allocate as alloc
    from caldera.pipeline.decompose_model import PROJECTIONS, resolve_device

    try:
        if profile not in alloc.PROFILES:
            raise ConfigError(f"profile {profile!r} is not one of {', '.join(alloc.PROFILES)}")
        prof = alloc.PROFILES[profile]
        budget = prof.budget if budget is None else budget
        rundir = RunDir(run)
        calibration = (rundir.read_spec() or {}).get("calibration")
        if calibration is None:
            raise RunDirError(f"{run} has no calibration; run `caldera calibrate --run {run}` first")
        folder = Path(calibration["model"])
        num_layers = read_model_config(folder)["num_hidden_layers"]
        missing = [i for i in range(num_layers) if not rundir.has_hessians(i)]
        if missing:
            raise RunDirError(f"{run} lacks the Hessians of layer {missing[0]}; finish `caldera calibrate` first")
        cfg = DecomposeConfig(bq=min(prof.bqs), bl=bl, br=br, group_size=group_size)
        with progress_bar(json_out) as progress:
            task = progress.add_task("probes", total=num_layers * len(PROJECTIONS))
            args = (rundir, ShardReader(folder), num_layers, cfg, max(prof.ranks), resolve_device(device))
            probes = alloc.probe_run(*args, on_matrix=lambda *_: progress.advance(task))
        choice = alloc.choose(probes, cfg, prof, budget)
    except (ConfigError, ModelFolderError, RunDirError, ShardError) as e:
        fail(str(e))
    info = {"profile": profile, "budget": budget, "bl": bl, "br": br, "group_size": group_size, "run": str(run)}
    info |= alloc.summary(choice, probes)
    rules = alloc.as_overrides(choice)
    alloc.write_allocation(out, rules, info)
    (run / "allocation.json").write_text(json.dumps({"info": info, "overrides": rules}, indent=2) + "\n")
    if json_out:
        emit(info | {"out": str(out), "overrides": rules})
        return
    table = Table("layer", *PROJECTIONS, title=f"rank/BQ per layer ({profile}, {budget:g} bits per weight)")
    for i in range(num_layers):
        table.add_row(str(i), *(f"{choice[i, p].rank}/{choice[i, p].bq}" for p in PROJECTIONS))
    err_console.print(table)
    err_console.print(
        f"{info['bits_per_weight']:.3f} bits per weight, predicted relative error {info['predicted_rel_error']:.4f}; "
        f"overrides in {out} (also {run}/allocation.json)",
        highlight=False,
    )
