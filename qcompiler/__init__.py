"""qcompiler: quantize, compile and serve PyTorch language models."""
__version__ = "0.1.0"

from qcompiler.runtime.beam_search import BeamSearchParams  # noqa: E402
from qcompiler.runtime.sampling import SamplingParams  # noqa: E402

from .llm import LLM, BeamSearchOutput, GenerationOutput  # noqa: E402
from .loader import CompiledModel, load  # noqa: E402
from .targets import W4A16, W8A16, Float, make_target  # noqa: E402

__all__ = ["BeamSearchOutput", "BeamSearchParams", "CompiledModel", "Float", "GenerationOutput", "LLM", "SamplingParams",
           "W4A16", "W8A16", "__version__", "load", "make_target"]
