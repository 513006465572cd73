"""tandem: tensor and pipeline parallelism for PyTorch, with a C++/CUDA core."""

import torch  # noqa: F401  (loads libtorch before the core)

try:
    from tandem import _C
except ImportError as e:  # a source tree without the compiled core
    raise ImportError(
        f"tandem's compiled core (tandem._C) could not be loaded: {e}. Build it with "
        "`pip install --no-build-isolation -e .` (or `make build`) using the torch you run with") from e
from tandem import ops  # noqa: F401  (registers fake kernels)
from tandem import nn  # noqa: F401
from tandem.mesh import Mesh, get_mesh, init_mesh, set_mesh
from tandem.parallelize import GPT2_PLAN, LLAMA_PLAN, parallelize
from tandem import checkpoint, models, optim  # noqa: F401
from tandem.optim import clip_grad_norm_
from tandem.recomputation import recompute

__all__ = ["build_info", "ops", "nn", "models", "checkpoint", "Mesh", "init_mesh", "get_mesh", "set_mesh",
           "parallelize", "GPT2_PLAN", "LLAMA_PLAN", "optim", "clip_grad_norm_",
           "recompute"]
__version__ = "0.1.0"


def build_info() -> dict:
    """How the compiled core was built.

    Keys: ``cuda`` (bool: CUDA kernels compiled in), ``cuda_archs`` (e.g. "9.0"),
    ``cuda_version``, ``cublaslt_version``, ``nccl_version`` (compiled against; None on a
    CPU-only build), ``nccl_runtime_version`` (the libnccl loaded), ``torch_version``.
    """
    return dict(_C.build_info())
