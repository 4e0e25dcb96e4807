"""One rank of the ZeRO-3 construction check, started by torchrun:

    python -m tests.sla_core.engine.zero3_sizes_worker OUT_DIR --config C --run-dir D

It runs the real worker (`sla_core.engine.worker.main`: the training loop, as `sla train --nproc` does)
with `ds.initialize` wrapped, so it records the size of every backbone parameter on this rank when the
model reaches the engine (built, not yet wrapped) and again once wrapped. Writes OUT_DIR/rank<R>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from sla_core.adapters import is_adapter_key
from sla_core.engine import ds, worker


def backbone_sizes(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per backbone parameter: the elements this rank holds in `.data`, the full size, the shard size."""
    return {
        name: {
            "numel": p.numel(),
            "partitioned": ds.is_partitioned(p),
            "full": int(p.ds_numel) if ds.is_partitioned(p) else p.numel(),
            "shard": int(p.ds_tensor.numel()) if ds.is_partitioned(p) else p.numel(),
        }
        for name, p in model.named_parameters()
        if not is_adapter_key(name)
    }


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    real_initialize = ds.initialize

    def recording_initialize(model: nn.Module, settings: ds.EngineSettings, *args: Any) -> Any:
        built = backbone_sizes(model)
        engine = real_initialize(model, settings, *args)
        rank = ds.dist_info().rank
        wrapped = backbone_sizes(model)
        record = {"rank": rank, "zero_stage": settings.zero_stage, "built": built, "wrapped": wrapped}
        (out / f"rank{rank}.json").write_text(json.dumps(record))
        return engine

    ds.initialize = recording_initialize  # the loop calls it as ds.initialize
    return worker.main(argv)


if __name__ == "__main__":
    sys.exit(main())
