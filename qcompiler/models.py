"""Model input: a ``model.py`` with ``build_model()``, a Hugging Face model directory, or a
GGUF file. Every source becomes a ``ModelSource``: an eval-mode module called as
``model(input_ids=ids, position_ids=pos)`` on ``[1, T]`` tensors, plus what is known of its
tokenizer and texts."""
import importlib.util
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .artifact import sha256_of

log = logging.getLogger("qcompiler")
CACHE_DIR = Path(os.environ.get("QCOMPILER_CACHE", Path.home() / ".cache" / "qcompiler"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    model: torch.nn.Module
    kind: str                                   # "model.py" | "hf" | "gguf"
    path: str
    tokenizer: Any = None                       # a transformers tokenizer, or None
    calibration_texts: Optional[Callable[[], list[str]]] = None
    calibration_data: Optional[Callable[[], list[torch.Tensor]]] = None
    eval_text: Optional[Callable[[], str]] = None
    config: dict = field(default_factory=dict)  # model facts for the manifest
    checkpoint: Any = None  # a compressed-tensors checkpoint's codes (``checkpoint.CheckpointCodes``)
    checks: Optional[dict] = None  # what was checked of the input against a reference (GGUF: llama.cpp)


def _hf_config_dict(model) -> dict:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    keep = ("model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "max_position_embeddings", "rope_theta", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id",
            # attention windows: what the compile's checks probe past (qcompiler.verify)
            "sliding_window", "use_sliding_window", "attention_chunk_size", "layer_types",
            # score and logit soft-caps, a custom softmax scale, RoPE scaling: what the summary reports
            "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar", "rope_scaling",
            "rope_parameters")
    d = cfg.to_dict()
    return {k: d[k] for k in keep if k in d}


def hf_checkpoint_facts(model) -> Optional[dict]:
    """What a Hugging Face directory of ``model`` needs besides its weights (``qcompile export``):
    the full config, naming its architecture, and the generation config. None for a model that is
    not a transformers ``PreTrainedModel``."""
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        return None
    cfg = json.loads(model.config.to_json_string(use_diff=False))
    cfg["architectures"] = [type(model).__name__]
    cfg.pop("quantization_config", None)
    gen = getattr(model, "generation_config", None)
    return {"config": cfg, "generation_config": json.loads(gen.to_json_string(use_diff=True)) if gen else None}


def _prepare(model: torch.nn.Module, dtype: Optional[torch.dtype]) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"build_model() must return a torch.nn.Module, got {type(model).__name__}")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "use_cache", False):
        cfg.use_cache = False  # the program is stateless; the runtime owns the KV cache
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def load_model_py(path: Path, dtype=None) -> ModelSource:
    spec = importlib.util.spec_from_file_location(f"qc_user_model_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except Exception as e:  # the user's file: say which and why, in one line
        raise ValueError(f"{path} failed to import: {type(e).__name__}: {e}") from e
    if not callable(getattr(mod, "build_model", None)):
        raise ValueError(f"{path} defines no build_model(): a model file must define build_model() "
                         "returning an nn.Module")
    try:
        model = mod.build_model()
        tok = mod.build_tokenizer() if callable(getattr(mod, "build_tokenizer", None)) else None
    except (FileNotFoundError, ValueError):
        raise
    except Exception as e:
        raise ValueError(f"{path}: build_model()/build_tokenizer() raised {type(e).__name__}: {e}") from e
    model = _prepare(model, dtype)
    return ModelSource(model=model, kind="model.py", path=str(path), tokenizer=tok,
                       calibration_texts=getattr(mod, "calibration_texts", None),
                       calibration_data=getattr(mod, "calibration_data", None),
                       eval_text=getattr(mod, "eval_text", None), config=_hf_config_dict(model))


def load_tokenizer(path):
    """``AutoTokenizer.from_pretrained(path)``, less the cleanup flag a BPE tokenizer ignores
    anyway (transformers warns about it on every decode): the text it decodes is unchanged."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    backend = getattr(tok, "backend_tokenizer", None)
    if (getattr(tok, "clean_up_tokenization_spaces", False) and backend is not None
            and type(backend.model).__name__ == "BPE"
            and not getattr(tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)):
        tok.clean_up_tokenization_spaces = False
    return tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def tokenizer_in(path: Path):
    """The tokenizer saved in the directory ``path`` (``load_tokenizer``), or None where it holds none."""
    return load_tokenizer(path) if any((path / f).exists() for f in TOKENIZER_FILES) else None


def load_hf_dir(path: Path, dtype=None) -> ModelSource:
    from transformers import AutoModelForCausalLM

    from .checkpoint import load_model, quantization_config
    if quantization_config(path) is not None:  # quantized already: the float its codes stand for, and the codes
        model, tok, ck = load_model(path, dtype)
        return ModelSource(model=_prepare(model, None), kind="hf", path=str(path), tokenizer=tok,
                           config=_hf_config_dict(model), checkpoint=ck)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa")
        tok = tokenizer_in(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a loadable Hugging Face causal LM: {type(e).__name__}: {e}") from e
    return ModelSource(model=_prepare(model, None), kind="hf", path=str(path), tokenizer=tok,
                       config=_hf_config_dict(model))


def gguf_to_hf_dir(path: Path) -> Path:
    """Dequantizes a GGUF file once into a float HF directory under ``~/.cache/qcompiler``
    (keyed by the file's SHA-256) and returns that directory. Its tokenizer and float model are
    checked against llama.cpp on the way (``qcompiler.gguf``); the findings are kept in
    ``qcompiler_source.json``. Raises ``GGUFError`` for a file that would be read wrongly."""
    from .capture import use_exact_attention
    from .gguf import SAMPLE_TEXT, check_logits, check_tokenizer
    out = CACHE_DIR / "gguf" / sha256_of(path)[:16]
    if (out / "model.safetensors").exists() and "checks" in _source_record(out):
        return out
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    log.info("converting %s to float (once; cached in %s)", path.name, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: transformers cannot read this GGUF file: {type(e).__name__}: {e}") from e
    tok, tokenizer_check = check_tokenizer(path, tok)
    use_exact_attention(model)  # the logits compared are the ones the compile will capture
    logits_check = check_logits(path, model, tok.encode(SAMPLE_TEXT, add_special_tokens=False))
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # the weights are float now
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tied = getattr(cfg, "tie_word_embeddings", False)
        sd = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(sd, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "qcompiler_source.json").write_text(json.dumps(
            {"gguf": str(path), "checks": {"tokenizer": tokenizer_check, "float_logits": logits_check}}))
        if out.exists() and "checks" not in _source_record(out):
            shutil.rmtree(out, ignore_errors=True)  # converted before the checks existed
        if not out.exists():  # else a concurrent conversion finished first
            tmp.rename(out)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial conversion, or the loser of a race


def _source_record(hf_dir: Path) -> dict:
    try:
        return json.loads((hf_dir / "qcompiler_source.json").read_text())
    except (OSError, ValueError):
        return {}


def load_gguf(path: Path, dtype=None) -> ModelSource:
    hf_dir = gguf_to_hf_dir(path)
    src = load_hf_dir(hf_dir, dtype)
    src.checks = _source_record(hf_dir).get("checks")
    src.kind, src.path = "gguf", str(path)
    return src


def source_kind(path: str) -> str:
    """``"model.py" | "hf" | "gguf"`` for an existing, recognizable model path; raises otherwise."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {path} (expected a model.py, a Hugging Face model directory or a .gguf file)")
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ValueError(f"{path} is a directory without config.json: not a Hugging Face model directory")
        return "hf"
    if p.suffix in (".py", ".gguf"):
        return {".py": "model.py", ".gguf": "gguf"}[p.suffix]
    raise ValueError(f"cannot load {path}: expected a .py file, a .gguf file or a Hugging Face model directory")


LOADERS = {"model.py": load_model_py, "hf": load_hf_dir, "gguf": load_gguf}


def load_source(path: str, dtype: Optional[str] = None) -> ModelSource:
    """Loads a model from ``model.py``, a Hugging Face directory or a ``.gguf`` file."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; available: {', '.join(DTYPES)}")
    return LOADERS[source_kind(path)](Path(path), DTYPES.get(dtype) if dtype else None)
