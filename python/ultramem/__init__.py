"""ultramem for PyTorch: the UltraMem, PKM and Engram memory layers as modules, the language model, checkpoints.

    import torch, ultramem
    mem = ultramem.UltraMem(D=256, n=64, E=4, Dk=64, Dv=128, m=16, m_first=16)   # C++ config fields
    y = mem(torch.randn(8, 256))                                                 # forward/backward via the ops
    model = ultramem.TransformerLM.from_checkpoint("runs/ultramem-small/checkpoint.safetensors")

The layers run the C++ kernels through the op library (libultramem_ops.so: $ULTRAMEM_OPS_LIB, next to
this package, or the checkout's build/release); it is loaded on first use, so importing never fails for
lack of it. docs/python.md walks through the package.
"""
from ._ops import OpsLibraryError, library_path, load as load_ops
from .checkpoint import Checkpoint, CheckpointError, read_checkpoint, save_checkpoint
from .data import DataError
from .hf import ExportFormatError
from .layers import PKM, Engram, UltraMem
from .model import TransformerLM
from .safetensors import SafetensorsError
from .training import cosine_lr, lr_scheduler, param_groups, value_lr_multiplier

__version__ = "0.2.0"

__all__ = [
    "UltraMem", "PKM", "Engram", "TransformerLM", "param_groups", "lr_scheduler", "cosine_lr", "value_lr_multiplier",
    "read_checkpoint", "save_checkpoint", "Checkpoint", "load_ops", "library_path",
    "OpsLibraryError", "CheckpointError", "SafetensorsError", "DataError", "ExportFormatError",
]
