"""``/v1/completions`` and ``/v1/chat/completions``: a validated body becomes one engine request per
prompt; the reply is one JSON body, or server-sent events as the tokens come."""
from fastapi import Request
from fastapi.responses import StreamingResponse

from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .responses import SSE_DONE, chat_logprobs, completion_logprobs, envelope, new_id, sse, usage


def _error_event(message: str) -> str:
    return sse({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}})


class OpenAIRoutes:
    """Mixed into ``server.app.Server``, whose checks (``_parse``, ``_encode``, ``_check_fits``,
    ``_params``, ``_submit``, ``_events``, ``_collect``) these use."""

    async def completions(self, request: Request):
        body = await self._parse(request, CompletionRequest)
        raw = body.prompts()
        prompts = [self._encode(p) for p in raw]
        # echo with max_tokens 0 (a loglikelihood query): one token is generated and not returned
        hidden = body.echo and body.max_tokens == 0
        max_tokens = 1 if hidden else body.max_tokens
        for ids in prompts:
            self._check_fits(len(ids), max_tokens)
        params = self._params(body, max_tokens, body.logprobs,
                              body.logprobs if body.echo and body.logprobs is not None else None)
        handles, q = self._submit(prompts, params, [p if isinstance(p, str) else None for p in raw])
        rid, n = new_id("cmpl"), body.n
        if body.stream:
            return StreamingResponse(self._stream_completion(body, rid, handles, q, hidden),
                                     media_type="text/event-stream")
        out = await self._collect(request, handles, q)
        choices, completion_tokens = [], 0
        for h in handles:
            prompt_text = self._prompt_text(h) if body.echo else ""
            for j in range(n):
                c = out.get((h.tag, j), {"ids": [], "text": "", "lps": [], "finish": "abort"})
                ids, lps, text = ([], [], "") if hidden else (c["ids"], c["lps"], c["text"])
                completion_tokens += len(ids)
                lp = None
                if body.logprobs is not None:
                    pre_ids, pre_lps = (h.prompt_ids, h.req.prompt_logprobs) if body.echo else ([], [])
                    lp = completion_logprobs(self.tok, pre_ids + ids, pre_lps + lps)
                choices.append({"index": h.tag * n + j, "text": prompt_text + text, "logprobs": lp,
                                "finish_reason": "length" if hidden else c["finish"]})
        return envelope(rid, "text_completion", self.name, choices, self._usage(handles, completion_tokens))

    def _stream_completion(self, body, rid, handles, q, hidden):
        echoed = set()

        def chunk(h, d):
            text, lp_ids, lp_entries = ("" if hidden else d.text), d.token_ids, d.logprobs
            if hidden:
                lp_ids, lp_entries = [], []
            if body.echo and (h.tag, d.index) not in echoed:
                echoed.add((h.tag, d.index))
                text = self._prompt_text(h) + text
                if body.logprobs is not None:
                    lp_ids, lp_entries = h.prompt_ids + lp_ids, h.req.prompt_logprobs + lp_entries
            lp = completion_logprobs(self.tok, lp_ids, lp_entries) if body.logprobs is not None else None
            finish = ("length" if hidden else d.finish_reason) if d.finish_reason else None
            return {"index": h.tag * body.n + d.index, "text": text, "logprobs": lp, "finish_reason": finish}
        return self._stream(rid, "text_completion", handles, q, chunk, body.include_usage, count_tokens=not hidden)

    async def chat_completions(self, request: Request):
        body = await self._parse(request, ChatCompletionRequest)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=body.add_generation_prompt)
        except Exception as e:  # the template rejects the conversation (e.g. roles out of order)
            raise APIError(400, f"the chat template rejects these messages: {e}", param="messages")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, self.max_len - len(ids))
        self._check_fits(len(ids), max_tokens)
        params = self._params(body, max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
        handles, q = self._submit([ids], params)
        rid = new_id("chatcmpl")
        if body.stream:
            return StreamingResponse(self._stream_chat(body, rid, handles, q), media_type="text/event-stream")
        out = await self._collect(request, handles, q)
        choices, completion_tokens = [], 0
        for j in range(body.n):
            c = out.get((0, j), {"ids": [], "text": "", "lps": [], "finish": "abort"})
            completion_tokens += len(c["ids"])
            choices.append({"index": j, "message": {"role": "assistant", "content": c["text"]},
                            "logprobs": chat_logprobs(self.tok, c["ids"], c["lps"]) if body.logprobs else None,
                            "finish_reason": c["finish"]})
        return envelope(rid, "chat.completion", self.name, choices, self._usage(handles, completion_tokens))

    def _stream_chat(self, body, rid, handles, q):
        started = set()

        def chunk(h, d):
            delta = {"content": d.text}
            if d.index not in started:
                started.add(d.index)
                delta = {"role": "assistant", **delta}
            lp = chat_logprobs(self.tok, d.token_ids, d.logprobs) if body.logprobs else None
            return {"index": d.index, "delta": delta, "logprobs": lp, "finish_reason": d.finish_reason}
        return self._stream(rid, "chat.completion.chunk", handles, q, chunk, body.include_usage)

    async def _stream(self, rid, obj: str, handles, q, chunk, include_usage: bool, count_tokens: bool = True):
        """Server-sent events: one chunk object per step (``chunk(handle, delta)`` per choice), an error
        event for a request that failed, the usage chunk when asked, then ``[DONE]``."""
        completion_tokens = 0
        async for h, deltas in self._events(handles, q):
            if deltas is None:
                if h.error:
                    yield _error_event(h.error)
                continue
            completion_tokens += sum(len(d.token_ids) for d in deltas) if count_tokens else 0
            yield sse(envelope(rid, obj, self.name, [chunk(h, d) for d in deltas]))
        if include_usage:
            yield sse(envelope(rid, obj, self.name, [], self._usage(handles, completion_tokens)))
        yield SSE_DONE

    def _prompt_text(self, h) -> str:
        if h.prompt_text is not None:
            return h.prompt_text
        return self.llm.engine.detokenize(h.prompt_ids) if self.tokenizer is not None else ""

    def _usage(self, handles, completion_tokens: int) -> dict:
        return usage(sum(len(h.prompt_ids) for h in handles), completion_tokens,
                     sum(h.req.num_cached_tokens for h in handles if h.req is not None))
