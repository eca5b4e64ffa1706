"""Shared helpers for the benchmarks: timing that is fair on CPU and CUDA, and a machine description."""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(fn: Callable[[], None], images: int, device: torch.device, repeats: int = 3) -> float:
    """Best of `repeats` timed runs of fn (after one warm-up run), as images per second."""
    fn()
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return images / best


def repeat_rows(table: pa.Table, count: int) -> pa.Table:
    """`count` rows: the table's rows over and over, each copy's ids suffixed `-K` (so unique while the table's
    are). For sets larger than it is worth generating: the same bytes decode and train at the same cost."""
    copies = [table.set_column(table.schema.get_field_index("id"), "id",
                               pc.binary_join_element_wise(table["id"], pa.scalar(f"-{k}"), ""))
              for k in range(-(-count // len(table)))]
    return pa.concat_tables(copies).slice(0, count)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def peak_memory(fn: Callable[[], None], device: torch.device) -> int | None:
    """Bytes fn takes at its peak beyond what was in use before it: allocated tensors on CUDA, resident
    memory on a Linux CPU (the kernel's high-water mark, reset first); None where it cannot be measured."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    status, reset = Path("/proc/self/status"), Path("/proc/self/clear_refs")
    if not status.exists() or not os.access(reset, os.W_OK):
        return None

    def read(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith(key))

    before = read("VmRSS:")
    reset.write_text("5")
    fn()
    return read("VmHWM:") - before
