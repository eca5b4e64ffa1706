"""The layers stay apart: gradcon_core is pure PyTorch + NumPy + PyArrow and never imports ray, jobs or cluster."""
import subprocess
import sys

IMPORT_EVERY_CORE_MODULE = """
import pkgutil, importlib, sys
import gradcon_core
for m in pkgutil.walk_packages(gradcon_core.__path__, "gradcon_core."):
    importlib.import_module(m.name)
bad = sorted(n for n in sys.modules if n.split(".")[0] in ("ray", "jobs", "cluster"))
print(",".join(bad))
"""


def test_no_core_module_imports_ray_jobs_or_cluster():
    done = subprocess.run([sys.executable, "-c", IMPORT_EVERY_CORE_MODULE], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"gradcon_core pulled in: {done.stdout.strip()}"
