"""OpenAI response bodies from the engine's outputs: completions and chat completions, whole or as
stream chunks, with log-probs in each API's shape and usage."""
import json
import time
import uuid
from typing import Optional


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class TokenText:
    """Token id -> its text as a piece of the output (decoded alone; cached)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, t: int) -> str:
        s = self.cache.get(t)
        if s is None:
            s = self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer is not None else f"token_id:{t}"
            self.cache[t] = s
        return s


def completion_logprobs(tok: TokenText, ids: list[int], entries: list, offset: int = 0) -> dict:
    """The completions API's ``logprobs``: parallel lists; an entry of None (the first prompt token)
    has no log-prob. Each ``top_logprobs`` dict holds the k most likely tokens and the chosen one."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, e in zip(ids, entries):
        s = tok(t)
        out["tokens"].append(s)
        out["text_offset"].append(offset)
        offset += len(s)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        lp, top = e
        out["token_logprobs"].append(lp)
        alts = {tok(a): v for a, v in top}
        alts.setdefault(s, lp)
        out["top_logprobs"].append(alts)
    return out


def chat_logprobs(tok: TokenText, ids: list[int], entries: list) -> dict:
    """The chat API's ``logprobs``: one record per token with its UTF-8 bytes and top alternatives."""
    def rec(t, lp):
        s = tok(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
    return {"content": [{**rec(t, lp), "top_logprobs": [rec(a, v) for a, v in top]}
                        for t, (lp, top) in zip(ids, entries)]}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def envelope(rid: str, obj: str, model: str, choices: list, usage_: Optional[dict] = None) -> dict:
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
