"""Training throughput at 1 and 2 Ray Train workers, and what our gradient sync costs next to DDP's.

python benchmarks/train_scaling.py [--data data/sets/mnist] [--epochs 2] [--sync-only] [--projection-only]

Part 1 runs the real job (jobs/train.py) on one MNIST class and reads images/s of its last epoch.
Part 2 times, in two gloo processes without Ray, one step of: (a) GradCon with our sync
(differentiable all-reduce of the 4 inner gradients + all-reduce of every final gradient),
(b) a plain autoencoder step with our all-reduce of the gradients (one flat tensor), (c) the same plain step
under DDP (bucketed, overlapped all-reduce). (b)/(c) is the price of not using DDP's reducer;
(a)/(b) is the GradCon step itself.
Part 3 (also alone, --projection-only) is arithmetic, not a measurement: from the network's real all-reduce
sizes at each image size, the communication of one GradCon step at 8 GPUs in one node and 64 GPUs in eight,
under the link figures in PROJECTED_LINKS, and the compute per step at which it is 10% of the step.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import publish  # noqa: E402

from gradcon_core import create_model  # noqa: E402
from gradcon_core.detectors.objective import ReferenceGradients, constraint_layers, gradcon_step  # noqa: E402
from gradcon_core.training.parallel import AllReduceMean  # noqa: E402


def _sync_worker(rank: int, world: int, port: int, steps: int, batch: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(steps, batch, 1, 28, 28)
    sync = AllReduceMean(world)

    def timed(fn) -> float:
        fn(x[0])
        dist.barrier()
        start = time.perf_counter()
        for xb in x:
            fn(xb)
        dist.barrier()
        return (time.perf_counter() - start) / steps

    model = create_model("gradcon_cae")
    reference = ReferenceGradients.for_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gradcon = timed(lambda xb: gradcon_step(model, reference, opt, xb, 0.03, sync))

    def plain_ours(xb):
        opt.zero_grad()
        F.mse_loss(model(xb), xb).backward()
        sync.mean_([p.grad for p in model.parameters()])
        opt.step()

    ours = timed(plain_ours)
    ddp = torch.nn.parallel.DistributedDataParallel(create_model("gradcon_cae"))
    opt_ddp = torch.optim.Adam(ddp.parameters(), lr=1e-3)

    def plain_ddp(xb):
        opt_ddp.zero_grad()
        F.mse_loss(ddp(xb), xb).backward()
        opt_ddp.step()

    with_ddp = timed(plain_ddp)
    if rank == 0:
        out.put((gradcon, ours, with_ddp))
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


def sync_costs(steps: int, batch: int) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(_sync_worker, args=(2, port, steps, batch, out), nprocs=2, start_method="spawn")
    gradcon, ours, with_ddp = out.get()
    print(f"2 gloo processes, per-worker batch {batch}, ms per step:")
    print(f"  (a) GradCon step, our sync      {1000 * gradcon:8.2f}")
    print(f"  (b) plain step, our all-reduce  {1000 * ours:8.2f}")
    print(f"  (c) plain step, DDP             {1000 * with_ddp:8.2f}")
    print(f"our sync vs DDP (b)/(c) = {ours / with_ddp:.2f}   GradCon vs plain (a)/(b) = {gradcon / ours:.2f}")


def job_scaling(data: str, epochs: int, normal_class: int) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from cluster.ray_init import init_ray
    from jobs.train import TrainConfig, run

    # N workers + 2 logical CPUs for Ray Data's list and read tasks (the train job requires them).
    init_ray("local", num_cpus=os.cpu_count() + 2, log_to_driver=False)
    rates = {}
    for workers in (1, 2):
        result, _ = run(TrainConfig(data=data, normal_class=normal_class, epochs=epochs, num_workers=workers,
                                    storage="runs/bench-train", name=f"scaling-{workers}-{time.time():.0f}"))
        rates[workers] = result.metrics["images_per_s"]
    ray.shutdown()
    print(f"Ray Train job, class {normal_class}, global batch 64: 1 worker {rates[1]:,.0f} images/s, "
          f"2 workers {rates[2]:,.0f} images/s -> {rates[2] / rates[1]:.2f}x on {os.cpu_count()} cores")


# Assumed NCCL all-reduce figures for 1-8 MB messages (bus bandwidth in bytes/s, latency in s): what published
# nccl-tests runs show for H100s on NVLink in one node and on 400 Gb/s InfiniBand across nodes, rounded down.
# Assumptions, not measurements: replace them with your cluster's nccl-tests numbers.
PROJECTED_LINKS = {8: ("8 GPUs, one node (NVLink)", 100e9, 20e-6), 64: ("64 GPUs, 8 nodes (InfiniBand)", 20e9, 50e-6)}
PROJECTION_NOTE = ("A GradCon step runs three all-reduces one after the other (the inner gradients forward and "
                   "backward, then every gradient): more workers shrink compute per worker and leave them. The "
                   "network's real all-reduce sizes, a ring all-reduce, and assumed links: 100 GB/s bus bandwidth "
                   "and 20 us latency for 8 GPUs on NVLink in one node; 20 GB/s and 50 us for 64 GPUs over 400 Gb/s "
                   "InfiniBand in eight nodes. Compare the compute column with the `step compute` of your epoch "
                   "lines. The global batch is fixed by the math, so compute per worker falls as 1/N: scale the "
                   "global batch with the workers (and the learning rate with it), or keep N where the per-worker "
                   "batch fills the GPU.")


def allreduce_seconds(nbytes: int, workers: int, bus_bandwidth: float, latency: float) -> float:
    """A ring all-reduce: every worker sends and receives 2 (N - 1) / N of the message, plus a fixed latency."""
    return latency + nbytes * 2 * (workers - 1) / workers / bus_bandwidth


def projection(sizes: list[tuple[int, int]]) -> str:
    """Per GradCon step: the inner all-reduce (the constrained weights' gradients, forward and backward) and the
    final one (every gradient), one after the other, as the step cannot overlap them; as a Markdown table."""
    links = list(PROJECTED_LINKS.items())
    head = "".join(f" {n} workers ({where}): comm per step | 90% efficiency needs compute >= |"
                   for n, (where, _, _) in links)
    rows = ["| image | inner all-reduce (x2 per step) | final all-reduce |" + head,
            "|---|---:|---:|" + "---:|---:|" * len(links)]
    for size, channels in sizes:
        model = create_model("gradcon_cae", in_channels=channels, image_size=size)
        final = sum(p.numel() * p.element_size() for p in model.parameters())
        inner = sum(layer.weight.numel() * layer.weight.element_size() for layer in constraint_layers(model))
        cells = []
        for workers, (_, bandwidth, latency) in links:
            comm = 2 * allreduce_seconds(inner, workers, bandwidth, latency) + allreduce_seconds(
                final, workers, bandwidth, latency)
            cells.append(f" {1e3 * comm:.2f} ms | {9e3 * comm:.1f} ms |")
        name = f"{size}x{size}x{channels}"
        rows.append(f"| {name} | {inner / 2**20:.2f} MiB | {final / 2**20:.2f} MiB |" + "".join(cells))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/sets/mnist")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--normal-class", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--sync-only", action="store_true")
    parser.add_argument("--projection-only", action="store_true")
    parser.add_argument("--sizes", default="28:1,64:3,128:3,256:3", help="projection: SIZE:CHANNELS,...")
    parser.add_argument("--write-docs", action="store_true", help="the projection into docs/benchmarks.md")
    args = parser.parse_args()
    table = projection([tuple(int(v) for v in s.split(":")) for s in args.sizes.split(",")])
    print(f"PROJECTION (arithmetic from the all-reduce sizes and the assumed links in PROJECTED_LINKS):\n{table}")
    if args.write_docs:
        publish("scaling-projection", "Data-parallel training: what the all-reduces cost at 8 and 64 GPUs "
                "(arithmetic, not a measurement)", f"{PROJECTION_NOTE}\n\n{table}")
    if args.projection_only:
        return
    sync_costs(args.steps, args.batch)
    if not args.sync_only:
        job_scaling(args.data, args.epochs, args.normal_class)


if __name__ == "__main__":
    main()
