"""sla_core: structure-learnable adapters for Hugging Face transformers (pure torch + transformers)."""

from sla_core.config import SLAConfig
from sla_core.io import AdapterFileError, load_adapters, save_adapters
from sla_core.model import SLAModel, SLAOutput, attach

__all__ = [
    "SLAConfig",
    "SLAModel",
    "SLAOutput",
    "attach",
    "load_adapters",
    "save_adapters",
    "AdapterFileError",
]
