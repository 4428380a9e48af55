"""``qcompile serve ARTIFACT``: the OpenAI-compatible server on uvicorn, bound to 127.0.0.1 unless
told otherwise; SIGTERM/SIGINT stop accepting, let running requests finish for ``--grace``
seconds, abort the rest and exit 0."""
import os
import re
import sys
from pathlib import Path

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]?)(?:i?B)?", s.strip(), re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size in bytes such as 268435456, 256M or 1G, got {s!r}")
    return int(m.group(1)) * UNITS[m.group(2).upper()]


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve an artifact over an OpenAI-compatible HTTP API")
    s.add_argument("artifact")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("QCOMPILE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $QCOMPILE_API_KEY, else none)")
    s.add_argument("--served-model-name", default=None, help="the model name clients send (default: the "
                   "artifact directory's name)")
    s.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch (default 64)")
    s.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (default 512)")
    s.add_argument("--max-waiting", type=int, default=1024,
                   help="requests allowed to wait; more get 503 with Retry-After (default 1024)")
    s.add_argument("--kv-cache-memory", type=byte_size, default=None, help="bytes for the KV cache, e.g. 512M "
                   "(default: LLM's, 256M)")
    s.add_argument("--num-blocks", type=int, default=None, help="KV blocks (instead of --kv-cache-memory)")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--kv-cache-dtype", default="auto", metavar="DTYPE",
                   help="auto (default), float32, bfloat16, float16, int8 or fp8 (quantized: a scale per token and KV head)")
    s.add_argument("--no-prefix-cache", action="store_true", help="turn the radix prefix cache off")
    from qcompiler.run_cli import add_compile_option
    add_compile_option(s)
    s.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--max-body-bytes", type=byte_size, default=8 << 20, help="larger request bodies get 413 "
                   "(default 8M)")
    s.add_argument("--grace", type=float, default=5.0, help="seconds running requests get to finish at shutdown")
    s.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")


def cmd_serve(a) -> int:
    import torch
    import uvicorn

    from qcompiler import LLM

    from .app import Server
    if a.threads:
        torch.set_num_threads(a.threads)
    if not 0 < a.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {a.port}")
    kw = {"num_blocks": a.num_blocks} if a.num_blocks else {}
    if a.kv_cache_memory:
        kw["kv_cache_memory"] = a.kv_cache_memory
    llm = LLM(a.artifact, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
              block_size=a.block_size, kv_cache_dtype=a.kv_cache_dtype, prefix_cache=not a.no_prefix_cache,
              compile=a.compile, device=a.device, **kw)
    name = a.served_model_name or Path(a.artifact).resolve().name
    server = Server(llm, served_model_name=name, api_key=a.api_key, max_waiting=a.max_waiting,
                    max_body_bytes=a.max_body_bytes, grace_s=a.grace)
    st = llm.stats()
    print(f"qcompile: serving {a.artifact} as '{name}' on http://{a.host}:{a.port}/v1 "
          f"({st['blocks_total']} KV blocks of {a.block_size} tokens)", file=sys.stderr, flush=True)
    config = uvicorn.Config(server.app, host=a.host, port=a.port, log_level=a.log_level,
                            timeout_graceful_shutdown=max(1, int(a.grace)), access_log=False)
    _uvicorn_server()(config).run()
    return 0


def _uvicorn_server():
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            self._captured_signals.clear()  # a graceful shutdown exits 0, not by raising the signal again
    return Server
