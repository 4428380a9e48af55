"""``qcompile qat``: quantization-aware training of a model file, then the ordinary compile of its
trained codes (``qcompiler.qat``)."""
import copy
import hashlib
import json
import logging
import math
import os
import pickle
import time
from dataclasses import replace
from pathlib import Path

log = logging.getLogger(__name__)
INIT_SAMPLES = 256  # calibration samples of the PTQ init (compile's gptq: 64)


def add_parser(sub) -> None:
    q = sub.add_parser("qat", help="quantization-aware training (straight-through estimator), then compile")
    q.add_argument("model", help="model.py, Hugging Face model directory, or .gguf file")
    q.add_argument("--target", "-t", default="w4a16", help="w4a16 (default), w8a16 or w8a8 (dynamic per-token "
                                                           "activations, no SmoothQuant)")
    q.add_argument("--group-size", "-g", default=None, help="as for compile: a power of two, 'auto' or 'channel'")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--asymmetric", dest="symmetric", action="store_false", default=None)
    sym.add_argument("--symmetric", dest="symmetric", action="store_true")
    q.add_argument("--init", default="rtn", choices=["rtn", "imatrix", "gptq"],
                   help="start from this PTQ method's codes (default rtn)")
    q.add_argument("--calib-samples", type=int, default=None, metavar="N",
                   help=f"calibration samples of 512 tokens for --init's method (default {INIT_SAMPLES}, four "
                        "times compile's: better codes to train from, for minutes more of calibration)")
    q.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    q.add_argument("--lr", type=float, default=1e-3,
                   help="AdamW learning rate of the weights, cosine to 0 (default 1e-3, measured on a 135M "
                        "model; billions of parameters want 1e-5 to 1e-4)")
    q.add_argument("--scale-lr", type=float, default=None,
                   help="learning rate of the scales, cosine to 0 (default: a tenth of --lr)")
    q.add_argument("--batch-tokens", type=int, default=1024, help="tokens per step (default 1024)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence (default 512)")
    q.add_argument("--loss", default="kd", choices=["kd", "ce"],
                   help="kd (default): KL divergence to the float model's next-token distribution; ce: cross entropy")
    q.add_argument("--train-file", default=None, help="UTF-8 text to train on (default: the model file's "
                                                      "calibration texts)")
    q.add_argument("--generate", type=int, default=0, metavar="N",
                   help="train on N sequences the float model writes itself (sampled at temperature 1 from its "
                        "BOS; cycled over the steps) instead of text: the model's own distribution, no text needed; "
                        "seen more than twice, they overfit")
    q.add_argument("--train-norms", action="store_true",
                   help="train the norm weights and biases as well (the artifact keeps them float)")
    q.add_argument("--learn", default="scales", choices=["all", "scales", "weights"],
                   help="what trains: scales (default): the scales only, the weights as the init left them; "
                        "all: the weights and their scales; weights: the weights only")
    q.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="matmuls of the training steps: auto (default) = bf16 where the hardware has it "
                        "(CUDA, AVX512-BF16/AMX CPUs), else fp32; weights, scales and fake quantization stay fp32")
    q.add_argument("-o", "--output", default=None, help="artifact directory (default build/<model>-<target>-qat)")
    q.add_argument("--no-verify", dest="verify", action="store_false", help="skip the compile's checks")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def ptq_target(target, method: str):
    """``target`` with ``method`` and that method's own defaults (GPTQ: act-order, clipped ranges)."""
    return replace(target, method=method, act_order=None, clip=None)


def ptq_codes(src, target, method: str, cfg, samples=None) -> dict:
    """The codes a calibrated PTQ method gives the model (module name -> ``QuantizedWeight``),
    calibrated on ``samples`` (token-id tensors) if given, else on the data ``cfg`` names."""
    from .calibration import load_calibration
    from .capture import capture, max_tokens_of
    from .passes.quantize_weights import layer_name
    from .pipeline import passes_for
    t = ptq_target(target, method)
    if samples is None:
        samples = load_calibration(src, cfg, src.config.get("vocab_size"), method).samples
    prog = capture(src.model, max_tokens_of(src.model))
    for p in passes_for(t, samples=samples)[:2]:  # normalize, then the method's own pass
        prog = p.fn(prog)
    return {layer_name(fqn): qw for fqn, (qw, _) in prog.meta["qc_codes"].items()}


def sampling_batch(config: dict, seq_len: int, budget: int = 4 << 30) -> int:
    """Sequences sampled at once: up to 128, their fp32 KV cache within ``budget`` bytes (32 where
    the config does not say the model's shape)."""
    try:
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        per_seq = seq_len * config["num_hidden_layers"] * 2 * heads * head_dim * 4
    except (KeyError, TypeError, ZeroDivisionError):
        return 32
    return max(1, min(128, budget // per_seq))


def start_tokens(src) -> list[int]:
    """What sampled training sequences open with: the tokenizer's BOS, else its EOS (a document
    boundary), else token 0."""
    tok = src.tokenizer
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tok, name, None)
        if isinstance(tid, int):
            return [tid]
    return [0]


def sampled_sequences(src, n: int, seq_len: int, autocast, progress: bool) -> tuple[list, bool]:
    """``n`` sequences of ``seq_len`` tokens the float model ``src.model`` writes itself
    (``qat.sample_sequences``, seed 1), kept under ``~/.cache/qcompiler/qat-samples`` keyed by the
    model's weights and these options: a rerun with other training options reads them back
    instead of sampling again. Returns the sequences and whether they came from the cache."""
    import torch

    from .models import CACHE_DIR
    from .qat import sample_sequences
    start, device = start_tokens(src), next(src.model.parameters()).device
    autocast = autocast if device.type == "cuda" else None
    h = hashlib.sha256(json.dumps({"n": n, "seq_len": seq_len, "start": start, "seed": 1, "device": device.type,
                                   "autocast": str(autocast)}).encode())
    for name, t in src.model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
    path = CACHE_DIR / "qat-samples" / f"{h.hexdigest()[:24]}.pt"
    try:
        ids = torch.load(path, weights_only=True)
        if ids.shape == (n, seq_len):
            log.info("sampled sequences read from %s", path)
            return list(ids), True
    except (OSError, RuntimeError, AttributeError, ValueError, pickle.UnpicklingError):  # none yet, or unreadable
        pass
    samples = sample_sequences(src.model, n, seq_len, start, seed=1, batch=sampling_batch(src.config, seq_len),
                               autocast=autocast, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    torch.save(torch.stack(samples), tmp)
    tmp.replace(path)
    return samples, False


def train_source(a, src, on_step=None):
    """Quantization-aware training of ``src`` (a ``ModelSource``) as the parsed ``qcompile qat``
    options ``a`` say; leaves the trained codes and the run's record in ``src.checkpoint``.
    ``on_step(step, seconds)`` runs before the first optimizer step and after each (``qat.train``).
    Returns the ``TrainResult``."""
    import torch

    from .calibration import CalibrationConfig, load_calibration
    from .checkpoint import CheckpointCodes
    from .cli import PER_CHANNEL, _group_size
    from .qat import autocast_dtype, convert, prepare, qat_target, train
    from .targets import W8A8, make_target
    if a.target not in ("w4a16", "w8a16", "w8a8"):
        raise ValueError(f"qcompile qat trains w4a16, w8a16 or w8a8, not {a.target}")
    if a.steps < 1 or a.batch_tokens < a.seq_len or a.seq_len < 2:
        raise ValueError(f"--steps must be >= 1 and --batch-tokens >= --seq-len >= 2, got {a.steps}, "
                         f"{a.batch_tokens}, {a.seq_len}")
    group = None if a.group_size == PER_CHANNEL else (_group_size(a.group_size) if a.group_size else None)
    target = (W8A8(smoothquant_alpha=None) if a.target == "w8a8" else
              make_target(a.target, group_size=group, symmetric=a.symmetric, method="rtn"))
    if a.init != "rtn" and isinstance(target, W8A8):
        raise ValueError("--init applies to w4a16 and w8a16")
    if a.lr <= 0 or (a.scale_lr is not None and a.scale_lr <= 0):
        raise ValueError(f"--lr and --scale-lr must be > 0, got {a.lr} and {a.scale_lr}")
    if a.calib_samples is not None and (a.init == "rtn" or a.calib_samples < 1):
        raise ValueError(f"--calib-samples takes a number >= 1 and applies to --init imatrix or gptq, got "
                         f"{a.calib_samples} with --init {a.init}")
    if a.generate < 0:
        raise ValueError(f"--generate takes a number of sequences >= 0, got {a.generate}")
    has_text = bool(a.train_file or src.calibration_data or src.calibration_texts)
    if not (a.generate or has_text):
        raise ValueError(f"{a.model}: no training data: pass --train-file TEXT or --generate N, or define "
                         "calibration_texts() or calibration_data() in the model file")
    batch = a.batch_tokens // a.seq_len
    device = next(src.model.parameters()).device
    autocast = {"auto": autocast_dtype(device), "bf16": torch.bfloat16, "fp32": None}[a.precision]
    sampling_s, cached = 0.0, False
    if a.generate:
        if a.steps * batch > 2 * a.generate:
            log.warning("each of the %d sampled sequences is trained on %.1f times: more than twice overfits "
                        "them (--generate %d or more)", a.generate, a.steps * batch / a.generate,
                        math.ceil(a.steps * batch / 2))
        t0 = time.perf_counter()
        samples, cached = sampled_sequences(src, a.generate, a.seq_len, autocast, not a.quiet)
        sampling_s = time.perf_counter() - t0
        source = f"{a.generate} sequences of {a.seq_len} tokens sampled from the float model"
    else:
        cfg = CalibrationConfig(samples=a.steps * batch, seq_len=a.seq_len, file=a.train_file, seed=1)
        data = load_calibration(src, cfg, src.config.get("vocab_size"), "qat")
        samples, source = data.samples, data.source
    n_calib, t0 = (a.calib_samples or INIT_SAMPLES) if a.init != "rtn" else None, time.perf_counter()
    init = (ptq_codes(src, target, a.init, CalibrationConfig(samples=n_calib, file=a.train_file),
                      None if has_text else samples[:n_calib])
            if n_calib else None)
    init_s = time.perf_counter() - t0
    teacher = copy.deepcopy(src.model) if a.loss == "kd" else None
    prepare(src.model, target, learn_scales=a.learn != "weights", init=init)
    res = train(src.model, teacher, samples, a.steps, a.lr, batch, a.loss, progress=not a.quiet,
                autocast=autocast, on_step=on_step, train_vectors=a.train_norms, train_weights=a.learn != "scales",
                scale_lr=a.scale_lr)
    codes = convert(src.model)
    record = {"init": a.init, "calib_samples": n_calib,
              "init_seconds": round(init_s, 1), "loss": a.loss, "steps": res.steps, "tokens": res.tokens, "lr": a.lr,
              "scale_lr": res.scale_lr,
              "batch_tokens": batch * a.seq_len, "learn": a.learn,
              "train_norms": a.train_norms, "seconds": res.seconds, "sampling_seconds": round(sampling_s, 1),
              "samples_cached": cached,
              "precision": "bf16" if autocast is not None else "fp32",
              "loss_first": res.loss_first, "loss_last": res.loss_last, "curve": res.curve,
              "data": {"source": source, "sha256": res.data_sha256}}
    src.checkpoint = CheckpointCodes(qat_target(target), codes, record)
    return res


def cmd_qat(a) -> int:
    from .cli import print_summary
    from .compiler import compile_model
    from .models import load_source
    src = load_source(a.model)
    t0 = time.perf_counter()
    res = train_source(a, src)
    out = a.output or f"build/{Path(a.model).stem.lower()}-{src.checkpoint.target.name}-qat"
    rep = compile_model(src, None, out, progress=not a.quiet, verify=a.verify)
    print(f"qat: {res.steps} steps, {res.tokens} tokens, {a.loss} loss {res.loss_first:.4f} -> {res.loss_last:.4f} "
          f"in {time.perf_counter() - t0:.0f} s")
    print_summary(rep, a.model)
    return 0
