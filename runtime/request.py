"""A request in the engine: its sequence, its sampling parameters and what it has produced."""
from dataclasses import dataclass, field
from typing import Optional

import torch

from .detokenizer import IncrementalDetokenizer
from .sampling import SamplingParams
from .sequence import Sequence


@dataclass
class Request:
    seq: Sequence
    params: SamplingParams
    generator: Optional[torch.Generator]
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    detok: Optional[IncrementalDetokenizer] = None  # text as it is generated: stop strings, streaming
    text: str = ""  # the final text of a request that has ``detok``
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served at the last admission
    children: list = field(default_factory=list)  # the other n - 1 completions, forked at the first token
    forked: bool = False
    # with params.logprobs: per generated token (its log-prob, [(token id, log-prob)] top alternatives)
    logprobs: list = field(default_factory=list)
    # with params.prompt_logprobs: the same per prompt token, None for the first
    prompt_logprobs: list = field(default_factory=list)
    group: Optional[object] = None  # the ``BeamGroup`` whose beam this sequence is  # the beam search this sequence is a beam of

    @property
    def done(self) -> bool:
        if self.finish_reason == "abort":
            return True
        complete = self.forked or self.params.n == 1 or self.error is not None
        return self.finish_reason is not None and complete and all(c.finish_reason for c in self.children)
