"""Distributed GradCon training on Ray Train, with the exact global-batch semantics of one process.

gradcon train [--config FILE] [key=value ...]   e.g.  gradcon train data=s3://b/mnist/ normal_class=3 num_workers=8

Every epoch runs the detector's own train_epoch, the one its single-process fit runs: the same
global order (generators seeded once, randperm per epoch) cut into global batches of `batch_size`,
worker r taking the r-th of N near-equal slices of each. The sync is ours, not DDP's (DDP does not see autograd.grad):
each worker weights its loss by N * n_r / B, the inner decoder gradients are all-reduced
(differentiably) before the cosine, the final gradients are all-reduced, and every worker
updates the reference from the same all-reduced gradient. So N workers compute what one
process computes on the global batch, whatever N is; with ARAE (epsilon > 0) too, each worker
attacking its slice from the random start one process would draw. Every other registered detector
trains here as well (detector=NAME params={...}); its docstring says whether its data-parallel step
is exact. The scikit-learn ones (ocsvm, kde) are fitted once, in one worker.

Input flows through Ray Data (read, keep the selected rows); every worker receives the whole
selected train and validation rows of the normal class (a one-class set: it must fit in a
worker's memory) because exact global batches need specific rows on specific workers.
Checkpoints (DESIGN section 6 directories) go to local storage or S3 every `checkpoint_every`
epochs and whenever the selection metric (select_by: val_loss, or val_auroc against other classes'
train rows) improves; a restarted or resumed run continues from the latest with optimizers,
buffers, generators and epoch restored.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch
import yaml

from cluster.storage import S3Options, filesystem_for
from gradcon_core import Detector, GradConDetector, create_model
from gradcon_core.checkpoint import load_checkpoint, load_training_state
from gradcon_core.config import add_config_arguments, config_from_arguments
from gradcon_core.detectors.neural import NeuralDetector
from gradcon_core.images import channels_of, decode_images
from gradcon_core.imageset import IMAGE, image_bytes, list_parquet_files, read_columns, take_rows
from gradcon_core.metrics import auroc
from gradcon_core.objective import training_generators
from gradcon_core.protocols import Selection, select
from gradcon_core.registry import create_detector, detector_class
from gradcon_core.storage import write_bytes


@dataclass
class TrainConfig:
    data: str = "data/sets/mnist"  # image set made by `gradcon prepare` (needs its `id` column)
    normal_class: int = 0
    protocol: str = "gradcon"
    merge_splits: bool = False  # the Fashion-MNIST variant of the gradcon protocol
    seed: int = 0
    epochs: int = 10
    batch_size: int = 64  # the GLOBAL batch; each of N workers holds about batch_size / N
    detector: str = "gradcon"  # any registered detector (gradcon_core.list_detectors())
    params: dict[str, Any] = field(default_factory=dict)  # the detector's own settings, e.g. {objective: soft-boundary}
    model: str = "gradcon_cae"  # gradcon's network: gradcon_cae, or arae_mlp (ARAE's dense network)
    alpha: float = 0.03
    beta: float = 0.12
    lr: float = 1e-3
    epsilon: float = 0.0  # > 0: adversarially robust training (ARAE); alpha = beta = 0 is plain ARAE
    gamma: float = 0.1
    attack_steps: int = 40
    attack_refresh: str = "batch"  # or "epoch" (the official ARAE schedule)
    val_anomalies: int = 0  # > 0: also report val_auroc against this many other-class *train* rows; -1: one per val row
    select_by: str = "val_loss"  # the best checkpoint: lowest val_loss, or highest val_auroc
    num_workers: int = 2
    max_train_images: int = 0  # > 0: a seeded random subset of the class's training rows (smoke runs, demos)
    use_gpu: bool = False
    storage: str = "runs"  # local folder or s3://bucket/prefix
    name: str | None = None  # default gradcon-c<class>-<time>
    resume: str | None = None  # the name of a stopped run under `storage` to continue
    checkpoint_every: int = 1
    max_failures: int = 2
    fail_at_epoch: int | None = None  # fault drill: raise once at this epoch on rank 0 (tests)
    address: str | None = None
    s3_endpoint: str | None = None


SELECT_BY = {"val_loss": "min", "val_auroc": "max"}


class AllReduceMean:
    """GradientSync over torch.distributed: the mean over workers, differentiable where needed."""

    def __init__(self, world_size: int):
        self.world_size = world_size

    def mean_differentiable(self, t: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(t) / self.world_size

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        # One all-reduce of all gradients flattened together: per-tensor calls cost 2x DDP's step time.
        flat = torch.cat([t.flatten() for t in tensors])
        torch.distributed.all_reduce(flat)
        flat.div_(self.world_size)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))


def _load_rows(shard, ids: list[str], channels: int) -> torch.Tensor:
    """The rows with these ids, in this order, decoded to [N, C, 28, 28]; other and undecodable rows left out."""
    position = {i: k for k, i in enumerate(ids)}
    found = np.full(len(ids), False)
    pixels = np.zeros((len(ids), 28, 28, channels), np.uint8)
    for batch in shard.iter_batches(batch_format="pyarrow", batch_size=4096):
        where = [position.get(i) for i in batch.column("id").to_pylist()]
        decoded, errors = decode_images(image_bytes(batch.column(IMAGE)), channels, (28, 28))
        for k, (pos, err) in enumerate(zip(where, errors)):
            if pos is not None and err is None:
                pixels[pos], found[pos] = decoded[k], True
    return torch.from_numpy(pixels[found]).permute(0, 3, 1, 2).float().div_(255)


def build_detector(cfg: TrainConfig, channels: int, device: str | torch.device = "cpu") -> Detector:
    """The untrained detector a run trains: GradCon from the run's own fields, others from `params`."""
    if cfg.detector == "gradcon":
        return GradConDetector(create_model(cfg.model, in_channels=channels), cfg.alpha, cfg.beta, cfg.lr,
                               device=device, epsilon=cfg.epsilon, gamma=cfg.gamma, attack_steps=cfg.attack_steps,
                               attack_refresh=cfg.attack_refresh)
    if cfg.epsilon > 0:
        raise ValueError(f"epsilon (ARAE) is an option of detector=gradcon (alpha=beta=0 is ARAE on its CAE), "
                         f"not of {cfg.detector!r}")
    neural = issubclass(detector_class(cfg.detector), NeuralDetector)
    try:
        return create_detector(cfg.detector, in_channels=channels, **cfg.params,
                               **({"lr": cfg.lr, "device": device} if neural else {}))
    except TypeError as e:
        raise ValueError(f"bad params for detector {cfg.detector!r}: {e}") from None


def _fit_in_one_go(det: Detector, cfg: TrainConfig, x_train: torch.Tensor, x_val: torch.Tensor) -> dict:
    """scikit-learn detectors: one fit, reported as one epoch; val_loss = mean validation score."""
    start = time.perf_counter()
    det.fit(x_train, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, x_val=x_val if len(x_val) else None)
    return {"val_loss": float(np.mean(det.decision_function(x_val))) if len(x_val) else 0.0,
            "images_per_s": len(x_train) / (time.perf_counter() - start)}


def train_loop_per_worker(config: dict) -> list[str]:
    import ray.train
    from ray.train import Checkpoint

    cfg = TrainConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    x_train = _load_rows(ray.train.get_dataset_shard("train"), config["train_ids"], config["channels"])
    x_val = _load_rows(ray.train.get_dataset_shard("val"), config["val_ids"], config["channels"])
    x_anomalies = _load_rows(ray.train.get_dataset_shard("val"), config["anomaly_ids"], config["channels"])

    torch.manual_seed(cfg.seed)
    det = build_detector(cfg, config["channels"], device)
    iterative = hasattr(det, "train_epoch")
    order, noise = training_generators(cfg.seed)
    start_epoch, best = 0, float("inf")
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            det.load_state_tensors(load_checkpoint(d)[0])
            state = load_training_state(d)
        for optimizer, saved in zip(det.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        order.set_state(state["generator"])
        noise.set_state(state["noise_generator"])
        start_epoch, best = state["epoch"] + 1, state["best_selection_key"]
    sync = AllReduceMean(world) if world > 1 else None
    if iterative and not restored:
        det.prepare(x_train.to(device), sync)  # e.g. Deep SVDD's centre, before the first step
    epochs = cfg.epochs if iterative else 1

    for epoch in range(start_epoch, epochs):
        if cfg.fail_at_epoch == epoch and restored is None and rank == 0:
            raise RuntimeError(f"fault drill: rank 0 fails at epoch {epoch}")
        start = time.perf_counter()
        if iterative:
            sums = det.train_epoch(x_train, order, noise, cfg.batch_size, rank, world, sync)
            totals = torch.tensor(list(sums.values()), dtype=torch.float64)
            if sync:  # per-worker shares -> global sums
                torch.distributed.all_reduce(totals)
                # Weights agree already; per-worker buffers (Deep SVDD's BatchNorm statistics) are averaged,
                # as DDP's buffer broadcast would, so that every rank holds the state rank 0 saves.
                buffers = [b for b in getattr(det, "model", torch.nn.Module()).buffers() if b.is_floating_point()]
                if buffers:
                    sync.mean_(buffers)
            metrics = dict(zip(sums, (totals / len(x_train)).tolist()))
            metrics["val_loss"] = det.validation_loss(x_val) if len(x_val) else metrics["loss"]
            metrics["images_per_s"] = len(x_train) / (time.perf_counter() - start)
        else:
            metrics = _fit_in_one_go(det, cfg, x_train, x_val)
        metrics.update(epoch=epoch, resumed=restored is not None)
        if len(x_anomalies) and len(x_val):
            scores = det.decision_function(torch.cat([x_val, x_anomalies]))
            metrics["val_auroc"] = auroc(scores, np.arange(len(scores)) >= len(x_val))
        if rank == 0:  # progress on the driver's console (Ray forwards worker output)
            print(f"epoch {epoch + 1}/{epochs}  " + "  ".join(
                f"{k} {v:.4g}" for k, v in metrics.items() if k not in ("epoch", "resumed")), flush=True)
        # The selection metric as "lower is better", so that one running minimum serves both.
        key = -metrics[cfg.select_by] if SELECT_BY[cfg.select_by] == "max" else metrics[cfg.select_by]
        improved = key < best
        best = min(best, key)
        if improved or (epoch + 1) % cfg.checkpoint_every == 0 or epoch == epochs - 1:
            with tempfile.TemporaryDirectory() as d:
                checkpoint = None
                if rank == 0:
                    det.fit_info_ = {"epochs": epoch + 1, "batch_size": cfg.batch_size, "seed": cfg.seed,
                                     "best_epoch": epoch if improved else None, "normal_class": cfg.normal_class}
                    det.set_threshold(scores=det.decision_function(x_val if len(x_val) else x_train[:1024]),
                                      percentile=det.threshold_percentile)
                    det.save(d, training_state={"optimizers": [o.state_dict() for o in getattr(det, "optimizers", [])],
                                                "generator": order.get_state(),
                                                "noise_generator": noise.get_state(),
                                                "epoch": epoch, "best_selection_key": best})
                    checkpoint = Checkpoint.from_directory(d)
                ray.train.report(metrics, checkpoint=checkpoint)
        else:
            ray.train.report(metrics)
    # Every rank must end with the same state: a hash of it from each, for the caller to compare.
    digest = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes()
                                     for _, t in sorted(det.state_tensors().items()))).hexdigest()
    if not sync:
        return [digest]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, digest)
    return gathered


def training_rows(cfg: TrainConfig, data_path: str, data_fs: pafs.FileSystem) -> tuple[Selection, dict[str, list]]:
    """The ids a run may read: train and validation rows of the class, and validation anomalies.

    Everything a training (or tuning) run sees goes through here; test rows are not among them.
    """
    meta = read_columns(data_path, ["label", "split"], filesystem=data_fs)
    sel = select(meta.column("label").to_numpy(), meta.column("split").to_numpy(zero_copy_only=False),
                 cfg.normal_class, cfg.protocol, cfg.seed, cfg.merge_splits)
    if cfg.select_by == "val_auroc" and not len(sel.val):
        raise ValueError(f"select_by=val_auroc needs validation rows; protocol {cfg.protocol!r} has none")
    ids = np.asarray(meta.column("id").to_pylist(), dtype=object)
    if cfg.max_train_images > 0:
        keep = np.random.default_rng([cfg.seed, 2]).permutation(len(sel.train))[: cfg.max_train_images]
        sel.train = np.sort(sel.train[keep])
    anomalies = sel.validation_anomalies(len(sel.val) if cfg.val_anomalies < 0 else cfg.val_anomalies)
    return sel, {"train": ids[sel.train].tolist(), "val": ids[sel.val].tolist(), "anomalies": ids[anomalies].tolist()}


def run(cfg: TrainConfig, callbacks: list | None = None):
    """Train; returns Ray's Result and the URI of the best checkpoint (by cfg.select_by).

    callbacks go to the Train run (Tune passes its report callback here).
    """
    import ray
    import ray.train
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.ray_init import data_context, init_ray

    if cfg.batch_size < 1 or cfg.num_workers < 1 or cfg.epochs < 1:
        raise ValueError("batch_size, num_workers and epochs must be >= 1")
    if cfg.select_by not in SELECT_BY:
        raise ValueError(f"select_by must be one of {sorted(SELECT_BY)}, got {cfg.select_by!r}")
    if cfg.select_by == "val_auroc" and cfg.val_anomalies == 0:
        raise ValueError("select_by=val_auroc needs validation anomalies: set val_anomalies (e.g. -1)")
    options = S3Options.from_env(endpoint=cfg.s3_endpoint)
    data_fs, data_path = filesystem_for(cfg.data, options)
    _, files = list_parquet_files(data_path, data_fs)
    if "id" not in pq.ParquetFile(files[0], filesystem=data_fs).schema_arrow.names:
        raise ValueError(f"{cfg.data} has no `id` column, which distributed training selects rows by: "
                         "re-encode it with `gradcon prepare parquet`")
    sel, rows = training_rows(cfg, data_path, data_fs)
    train_ids, val_ids, anomaly_ids = rows["train"], rows["val"], rows["anomalies"]
    channels = channels_of(take_rows(data_path, sel.train[:1], filesystem=data_fs).images[0])
    if not hasattr(build_detector(cfg, channels), "train_epoch") and cfg.num_workers != 1:  # also checks params
        raise ValueError(f"{cfg.detector} is fitted in one process (scikit-learn): use num_workers=1")

    if not ray.is_initialized():
        init_ray(cfg.address, min_cpus=cfg.num_workers + 2)  # an embedded Ray is sized for the check below
    data_context()
    cpus = ray.cluster_resources().get("CPU", 0)
    # Ray Data's listing and read tasks need a CPU each while the workers hold theirs, or the read waits forever.
    if cfg.num_workers + 2 > cpus or (cfg.use_gpu and cfg.num_workers > ray.cluster_resources().get("GPU", 0)):
        raise ValueError(f"{cfg.num_workers} worker(s) (+2 CPUs for reading) do not fit this cluster "
                         f"({cpus:g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs)")

    def rows_with(wanted: list[str]):
        value_set = pa.array(wanted)  # string or int64 ids, as the image set stores them

        def only_selected(batch: pa.Table) -> pa.Table:
            return batch.filter(pc.is_in(batch.column("id"), value_set=value_set))

        return ray.data.read_parquet(files, filesystem=data_fs).select_columns(["id", IMAGE]).map_batches(
            only_selected, batch_format="pyarrow")

    store_fs, store_path = filesystem_for(cfg.storage, options)
    if cfg.resume and store_fs.get_file_info(f"{store_path}/{cfg.resume}").type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no run named {cfg.resume!r} under {cfg.storage} to resume")
    # Ray Train resumes a run whose name already has checkpoints in storage.
    name = cfg.resume or cfg.name or f"gradcon-c{cfg.normal_class}-{time.strftime('%Y%m%d-%H%M%S')}"
    is_s3 = str(cfg.storage).startswith("s3://")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": asdict(cfg), "train_ids": train_ids, "val_ids": val_ids,
                           "anomaly_ids": anomaly_ids, "channels": channels},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        datasets={"train": rows_with(train_ids), "val": rows_with(val_ids + anomaly_ids)},
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(name=name, storage_path=store_path, storage_filesystem=store_fs if is_s3 else None,
                             failure_config=FailureConfig(max_failures=cfg.max_failures), callbacks=callbacks,
                             checkpoint_config=CheckpointConfig(num_to_keep=None)),
    )
    result = trainer.fit()
    best = (result.get_best_checkpoint(metric=cfg.select_by, mode=SELECT_BY[cfg.select_by])
            if result.best_checkpoints else result.checkpoint)
    uri = f"s3://{best.path}" if is_s3 else best.path
    write_bytes(store_fs, f"{store_path}/{name}/config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False).encode())
    write_bytes(store_fs, f"{store_path}/{name}/best_checkpoint", uri.encode())
    print(f"run {name}: final val J {result.metrics['val_loss']:.6g}; best checkpoint: {uri}")
    return result, uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, TrainConfig)


def main(args: argparse.Namespace) -> int:
    run(config_from_arguments(args, TrainConfig))
    return 0


if __name__ == "__main__":  # python -m jobs.train ... == gradcon train ...
    from jobs.cli import main as cli_main

    raise SystemExit(cli_main(["train", *sys.argv[1:]]))
