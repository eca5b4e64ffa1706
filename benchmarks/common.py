"""Shared helpers for the benchmarks: timing that is fair on CPU and CUDA, machine descriptions, and the
sections of docs/benchmarks.md that the benchmarks write (publish)."""
from __future__ import annotations

import os
import platform
import re
import shlex
import sys
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


DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DOCS_HEADER = """# Benchmarks

Written by the benchmark scripts, not by hand: each section is the latest run of the command it names
(`--write-docs`), with the machine and the date. Rerun a command to replace its section.
"""


def describe_machine() -> str:
    """The CPU's model and logical CPUs, the GPU where there is one, Python and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def publish(section: str, title: str, body: str, docs: Path = DOCS) -> None:
    """Replace `section` of docs/benchmarks.md (appended if new) with body, under its title and a line naming
    what measured it: this script's command line, the machine and the date."""
    command = shlex.join(["python", f"benchmarks/{Path(sys.argv[0]).name}", *sys.argv[1:]])
    begin, end = f"<!-- begin {section} -->", f"<!-- end {section} -->"
    block = (f"{begin}\n## {title}\n\n`{command}` on {describe_machine()}, {time.strftime('%Y-%m-%d')}.\n\n"
             f"{body.strip()}\n{end}")
    text = docs.read_text() if docs.exists() else DOCS_HEADER
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text.rstrip()}\n\n{block}\n"
    docs.write_text(text)
    print(f"wrote section {section!r} of {docs}")
