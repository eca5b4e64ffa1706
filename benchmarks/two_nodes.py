"""Two Ray nodes on one machine: train with one worker on each, checkpoints in S3, then score on both.

python benchmarks/two_nodes.py [--cpus-per-node 3] [--rows 200] [--epochs 2]

Starts a local S3 server (SeaweedFS on 127.0.0.1), a head node (`ray start --head`) and a second node
(`ray start --address=...`) on 127.0.0.1, each with its own CPUs and a custom resource naming it. Writes a
small 64x64 RGB texture set to S3, then runs the commands a user runs against a cluster: `gradcon train`
with 2 workers placed STRICT_SPREAD (one per node) and its checkpoints in S3, and `gradcon score` with 2
actors. Prints each command's output and, from Ray's state API, which node ran each train worker and each
score actor; also shows that `train` with a local storage path is refused on this 2-node cluster.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cluster.local_s3 import LocalS3, _free_ports  # noqa: E402
from cluster.processes import stop  # noqa: E402
from gradcon_core.data.defects import DefectCounts, defect_tables  # noqa: E402
from gradcon_core.data.imageset import ImageShape, write_image_set  # noqa: E402

BUCKET = "two-nodes"
BIN = Path(sys.executable).parent


def ray_start(args: list[str], env: dict[str, str]) -> None:
    subprocess.run([str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *args],
                   env=env, check=True, stdout=subprocess.DEVNULL)


def gradcon(args: list[str], env: dict[str, str]) -> str:
    """Run a gradcon command, echo its output, return it."""
    print(f"$ gradcon {' '.join(args)}", flush=True)
    done = subprocess.run([str(BIN / "gradcon"), *args], env=env, capture_output=True, text=True)
    out = done.stdout + done.stderr
    print("\n".join("    " + line for line in out.splitlines() if "Warning" not in line), flush=True)
    if done.returncode:
        raise RuntimeError(f"gradcon {args[0]} exited with {done.returncode}")
    return out


def placement(address: str, match: str) -> list[str]:
    """'<actor> on <node name>' for every actor (alive or ended) whose class name contains match."""
    import ray
    from ray.util.state import list_actors

    ray.init(address=address, logging_level="ERROR")
    names = {n["NodeID"]: next((k[5:] for k in n["Resources"] if k.startswith("node_")), "?") for n in ray.nodes()}
    actors = [a for a in list_actors(detail=True, limit=10000) if match in a.class_name]
    ray.shutdown()
    return sorted(f"{a.class_name} (pid {a.pid}) on node {names.get(a.node_id, a.node_id)}" for a in actors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpus-per-node", type=int, default=3)
    parser.add_argument("--rows", type=int, default=200, help="training images")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalS3(data_dir=f"{tmp}/s3") as s3:
        s3.create_bucket(BUCKET)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
               "AWS_ENDPOINT_URL": s3.options.endpoint, "RAY_AUTH_MODE": "disabled"}
        table = next(defect_tables(64, counts=DefectCounts(args.rows, 20, 20), classes=("fabric",),
                                   rows_per_table=10**6))
        data = f"s3://{BUCKET}/sets/fabric"
        write_image_set(f"{BUCKET}/sets/fabric", table, rows_per_file=100, filesystem=s3.filesystem(),
                        shape=ImageShape((64, 64), 3))
        port = _free_ports(1)[0]
        address = f"127.0.0.1:{port}"
        try:
            ray_start(["--head", f"--port={port}", f"--temp-dir={tmp}/ray", f"--num-cpus={args.cpus_per_node}",
                       "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--resources={json.dumps({'node_head': 1})}"], env)
            ray_start([f"--address={address}", f"--num-cpus={args.cpus_per_node}",
                       f"--resources={json.dumps({'node_second': 1})}"], env)
            common = ["data=" + data, "normal_class=0", f"address={address}", "num_workers=2", "batch_size=32"]
            refused = subprocess.run([str(BIN / "gradcon"), "train", *common, f"storage={tmp}/runs"], env=env,
                                     capture_output=True, text=True)
            print("local storage on 2 nodes:", refused.stderr.strip().splitlines()[-1])
            out = gradcon(["train", *common, f"epochs={args.epochs}", "placement_strategy=STRICT_SPREAD",
                           f"storage=s3://{BUCKET}/runs", "name=two-nodes"], env)
            print("\n".join(placement(address, "RayTrainWorker")))
            checkpoint = out.split("best checkpoint: ")[-1].split()[0]
            gradcon(["score", f"checkpoint={checkpoint}", f"input={data}", f"output=s3://{BUCKET}/scores",
                     "concurrency=2", f"address={address}"], env)
            print("\n".join(placement(address, "Scorer")))
        finally:  # this cluster's processes only (`ray stop` would stop every Ray on the machine)
            stop([p for p in psutil.process_iter(["cmdline"]) if f"{tmp}/ray" in " ".join(p.info["cmdline"] or [])],
                 grace_s=0)


if __name__ == "__main__":
    main()
