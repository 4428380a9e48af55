"""qcompiler: quantize, compile and serve PyTorch language models."""
import os

__version__ = "0.1.0"

# oneDNN's primitive cache and ideep's keep a compiled kernel per GEMM shape, 1,024 each by
# default: a server meets new shapes with new prompt lengths, so they are kept small here. torch
# reads them when it loads: they apply where qcompiler is imported first and the user has not set them.
for _var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_var, "128")

from qcompiler.runtime.beam_search import BeamSearchParams  # noqa: E402
from qcompiler.runtime.sampling import SamplingParams  # noqa: E402

from .llm import LLM, BeamSearchOutput, GenerationOutput  # noqa: E402
from .loader import CompiledModel, load  # noqa: E402
from .targets import W4A16, W8A16, Float, make_target  # noqa: E402

__all__ = ["BeamSearchOutput", "BeamSearchParams", "CompiledModel", "Float", "GenerationOutput", "LLM", "SamplingParams",
           "W4A16", "W8A16", "__version__", "load", "make_target"]
