"""Check one stage, or a chain of stages, and submit it to SLURM; refuse before any GPU is allocated.

    python launch/submit.py --config configs/<run>/stage1.yaml --ds ds_configs/zero3.json \\
        --nodes 2 --gpus-per-node 8 --out runs/<run>
    python launch/submit.py --config s1.yaml --config s2.yaml --config s3.yaml --config s4.yaml \\
        --ds ds_configs/zero3.json --nodes 2 --gpus-per-node 8 --out runs/<run>
    python launch/submit.py ... (same four --config) --from-stage 3     (stages 3-4 only)

Every stage runs ``launch/slurm/stage.sbatch`` in ``<out>/<stage name>`` (log: ``slurm-<job id>.out``,
appended to across requeues). Stage k+1 is submitted with ``--dependency=afterok:<job of stage k>``
and starts from ``<out>/<stage k name>/final``; a stage that fails cancels the rest of the chain.
Checked here, on the submit host: the configs, the DeepSpeed config, that the expert-parallel
size divides the world size and the experts and stays inside a node (unless
``--ep-across-nodes``), the data path, and the init checkpoint of the first submitted stage.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from sedit.config import Config, ConfigError, load_config, merge, parse_override  # noqa: E402
from sedit.engine import TopologyError, ep_size_of, load_ds_config, resolve_ds_config  # noqa: E402

BATCH_SCRIPT = ROOT / "launch" / "slurm" / "stage.sbatch"


class SubmitError(ValueError):
    """The submission would fail on the cluster; the message says what to fix."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True, help="stage config; repeat for a chain, in order")
    parser.add_argument(
        "--ds", required=True, help="engine config: ds_configs/flat_dp.json, or DeepSpeed's zero3.json, zero2_ep.json"
    )
    parser.add_argument("--nodes", type=int, default=1, help="nodes per stage")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="processes per node, one per GPU")
    parser.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: the DeepSpeed config's)")
    parser.add_argument(
        "--ep-across-nodes", action="store_true", help="allow expert-parallel groups spanning nodes (slower all-to-all)"
    )
    parser.add_argument("--out", required=True, help="run directory; stage k writes to <out>/<stage name>")
    parser.add_argument("--from-stage", type=int, default=1, help="submit the chain from this stage (1-based)")
    parser.add_argument("--init-from", default=None, help="weights for the first submitted stage (an export dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every stage")
    parser.add_argument("--sbatch", action="append", default=[], metavar="ARG", help="extra sbatch argument, e.g. "
                        "--sbatch=--partition=gpu --sbatch=--time=24:00:00 --sbatch=--signal=USR1@600")  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="run the processes on CPU (gloo; tests, no GPU request)")
    parser.add_argument("--dry-run", action="store_true", help="check and print the sbatch commands, submit nothing")
    return parser.parse_args(argv)


def check_data(cfg: Config, source: str) -> None:
    data = cfg.stage.data
    if not data:
        raise SubmitError(f"{source}: stage.data: no data source given (a shard directory, or 'synthetic')")
    if data != "synthetic" and not (Path(data).exists() or glob.glob(data)):
        raise SubmitError(f"{source}: stage.data: {data} does not exist on this host; fix it (or --set stage.data=...)")


def check_ep_placement(ep: int, gpus_per_node: int, nodes: int, across: bool) -> None:
    """Expert-parallel groups are runs of consecutive ranks; keep each inside one node by default."""
    if nodes > 1 and gpus_per_node % ep and not across:
        raise SubmitError(
            f"expert-parallel size {ep} does not divide the {gpus_per_node} processes of a node, so some "
            f"expert-parallel groups would span two nodes and their all-to-all would cross the network; "
            f"choose --ep dividing {gpus_per_node}, or pass --ep-across-nodes to accept it"
        )


def plan(args: argparse.Namespace) -> list[dict]:
    """One entry per stage to submit: its config, run directory and stage.py arguments. Raises on a problem."""
    from sedit.train import check_init_from

    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SubmitError(f"--nodes ({args.nodes}) and --gpus-per-node ({args.gpus_per_node}) must be >= 1")
    if not 1 <= args.from_stage <= len(args.config):
        raise SubmitError(f"--from-stage {args.from_stage}: the chain has stages 1-{len(args.config)}")
    world = args.nodes * args.gpus_per_node
    overrides: dict = {}
    for item in args.set:
        overrides = merge(overrides, parse_override(item))
    ds_config = load_ds_config(args.ds)
    out = Path(args.out).resolve()
    cfgs = [load_config(path, overrides) for path in args.config]
    names = [cfg.stage.name for cfg in cfgs]
    if len(set(names)) < len(names):
        raise SubmitError(f"stage names {names} repeat; each stage needs its own stage.name (its run directory)")
    stages = []
    for index, (path, cfg) in enumerate(zip(args.config, cfgs, strict=True), start=1):
        ds = resolve_ds_config(ds_config, cfg, world, args.ep)  # experts, world size, batch divisibility
        check_ep_placement(ep_size_of(ds), args.gpus_per_node, args.nodes, args.ep_across_nodes)
        check_data(cfg, path)
        if index < args.from_stage:
            continue
        sets = list(args.set)
        if index == args.from_stage:
            init = args.init_from or (str(out / cfgs[index - 2].stage.name / "final") if index > 1 else None)
        else:  # written by the previous job of this chain; it must hold the same model
            init = str(out / cfgs[index - 2].stage.name / "final")
            if cfgs[index - 2].model != cfg.model:
                raise SubmitError(f"{path}: model differs from stage {index - 1}'s, whose weights it starts from")
        if init:
            sets.append(f"stage.init_from={init}")
            cfg.stage.init_from = init
        if cfg.stage.init_from and index == args.from_stage:
            check_init_from(cfg, path)  # the export must exist now, with this model's shape
        run_dir = out / cfg.stage.name
        stage_args = ["--config", str(Path(path).resolve()), "--ds", str(Path(args.ds).resolve())]
        stage_args += ["--out", str(run_dir)]
        if args.ep is not None:
            stage_args += ["--ep", str(args.ep)]
        for item in sets:
            stage_args += ["--set", item]
        stages.append({"index": index, "name": cfg.stage.name, "run_dir": run_dir, "stage_args": stage_args})
    return stages


def sbatch_command(args: argparse.Namespace, stage: dict, after: str | None) -> list[str]:
    cmd = [
        "sbatch", "--parsable", f"--job-name=sedit-{stage['name']}", f"--nodes={args.nodes}",
        f"--ntasks-per-node={args.gpus_per_node}", f"--output={stage['run_dir']}/slurm-%j.out",
    ]  # fmt: skip
    if not args.cpu:
        cmd.append(f"--gpus-per-node={args.gpus_per_node}")
    if after:
        cmd.append(f"--dependency=afterok:{after}")
    return [*cmd, *args.sbatch, str(BATCH_SCRIPT), *stage["stage_args"]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stages = plan(args)
    except (ConfigError, TopologyError, SubmitError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    env = {**os.environ, "SEDIT_ROOT": str(ROOT), "SEDIT_PYTHON": sys.executable}
    if args.cpu:
        env["DS_ACCELERATOR"] = "cpu"
    after = None
    for stage in stages:
        cmd = sbatch_command(args, stage, after)
        print(f"stage {stage['index']} ({stage['name']}): {shlex.join(cmd)}", flush=True)
        if args.dry_run:
            after = f"<job of stage {stage['index']}>"
            continue
        stage["run_dir"].mkdir(parents=True, exist_ok=True)
        run = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if run.returncode:
            print(f"error: sbatch failed for stage {stage['index']}: {run.stderr.strip()}", file=sys.stderr)
            return 1
        after = run.stdout.strip().split(";")[0]
        print(f"submitted job {after}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
