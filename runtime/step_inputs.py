"""The paged program's metadata for one step, from each scheduled sequence's block table,
the number of its tokens already in the KV cache, and the new tokens it computes now."""
from typing import NamedTuple, Sequence as Seq

import torch


class StepInputs(NamedTuple):
    input_ids: torch.Tensor        # [T]
    positions: torch.Tensor        # [T]
    slot_mapping: torch.Tensor     # [T]
    block_tables: torch.Tensor     # [S, max_blocks], padded with 0
    seq_lens: torch.Tensor         # [S]: cached + new tokens
    query_start_loc: torch.Tensor  # [S + 1]


def step_inputs(block_tables: Seq[Seq[int]], num_cached: Seq[int], new_tokens: Seq[Seq[int]],
                block_size: int) -> StepInputs:
    ids, pos, slots, lens, starts = [], [], [], [], [0]
    for table, n0, toks in zip(block_tables, num_cached, new_tokens):
        for j, t in enumerate(toks):
            p = n0 + j
            ids.append(t)
            pos.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        lens.append(n0 + len(toks))
        starts.append(starts[-1] + len(toks))
    width = max(1, max(len(t) for t in block_tables))
    tables = [list(t) + [0] * (width - len(t)) for t in block_tables]
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return StepInputs(as_long(ids), as_long(pos), as_long(slots), as_long(tables), as_long(lens), as_long(starts))
