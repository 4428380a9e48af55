"""The paged program's metadata for one step, from each scheduled sequence's block table,
the number of its tokens already in the KV cache, and the new tokens it computes now."""
from typing import NamedTuple, Sequence as Seq

import numpy as np
import torch

from qcompiler.codegen.attention import new_kv_cache


class StepInputs(NamedTuple):
    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    slot_mapping: torch.Tensor     # [T]
    block_tables: torch.Tensor     # [S, max_blocks], padded with 0
    seq_lens: torch.Tensor         # [S]: cached + new tokens
    query_start_loc: torch.Tensor  # [S + 1]
    logits_indices: torch.Tensor   # [N]: the rows whose logits the step needs (each sequence's last)

    def args(self, kv_cache: torch.Tensor) -> tuple:
        """The paged program's positional inputs, in its order (``input_ids, positions, kv_cache,
        slot_mapping, block_tables, seq_lens, query_start_loc, logits_indices``), on the cache's device."""
        d = kv_cache.device
        return (self.input_ids.to(d), self.positions.to(d), kv_cache, self.slot_mapping.to(d),
                self.block_tables.to(d), self.seq_lens.to(d), self.query_start_loc.to(d), self.logits_indices.to(d))

    @property
    def is_decode(self) -> bool:
        """One new token per sequence."""
        return self.input_ids.shape[0] == self.seq_lens.shape[0]


def single_sequence(input_ids: torch.Tensor, positions: torch.Tensor, paged: dict, dtype: torch.dtype,
                    block_size: int = 16) -> tuple:
    """The paged program's inputs for one sequence of ``T`` tokens computed from scratch,
    with a KV cache of its own and logits for every token: what a plain ``model(ids, positions)``
    call means."""
    T, d = input_ids.shape[0], input_ids.device
    nb = -(-T // block_size)
    kv = new_kv_cache(paged["num_layers"], nb, block_size, paged["num_kv_heads"], paged["head_dim"], dtype, d)
    return (input_ids, positions, kv, torch.arange(T, device=d), torch.arange(nb, device=d).view(1, nb),
            torch.tensor([T], device=d), torch.tensor([0, T], device=d), torch.arange(T, device=d))


def step_inputs(block_tables: Seq[Seq[int]], num_cached: Seq[int], new_tokens: Seq[Seq[int]],
                block_size: int, every_row: Seq[bool] = ()) -> StepInputs:
    """One step's inputs from the scheduled sequences. Logits are asked for each sequence's last
    new token, and for every new token of the sequences ``every_row`` flags (in order). Lists
    become tensors through numpy, which converts a Python list faster than ``torch.tensor`` (a
    step's block tables can hold ~10k entries)."""
    S, bs = len(block_tables), block_size
    if all(len(t) == 1 for t in new_tokens):  # decode: one token per sequence
        ids = [t[0] for t in new_tokens]
        pos = list(num_cached)
        slots = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, pos)]
        lens = [p + 1 for p in pos]
        starts = list(range(S + 1))
    else:
        ids, pos, slots, lens, starts = [], [], [], [], [0]
        for table, n0, toks in zip(block_tables, num_cached, new_tokens):
            ids += toks
            pos += range(n0, n0 + len(toks))
            slots += [table[p // bs] * bs + p % bs for p in range(n0, n0 + len(toks))]
            lens.append(n0 + len(toks))
            starts.append(starts[-1] + len(toks))
    width = max(1, max(len(t) for t in block_tables))
    tables = []
    for table in block_tables:
        tables += table
        tables += [0] * (width - len(table))
    rows = _long(starts[1:]) - 1
    if any(every_row):
        rows = _long([r for i, every in enumerate(every_row) for r in
                      (range(starts[i], starts[i + 1]) if every else (starts[i + 1] - 1,))])
    return StepInputs(_long(ids), _long(pos), _long(slots), _long(tables).view(S, width), _long(lens), _long(starts),
                      rows)


def _long(values: list) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))
