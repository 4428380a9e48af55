"""The split-K workspace (``codegen.workspace``) and who owns it: calls of the Triton weight-only
linear with a forced K split, under the owner's ``SplitKWorkspace`` or none, on the interpreter
without a GPU; and the runtime's runners entering their own around the program."""
import pytest
import torch

from qcompiler.codegen.ops import quantized_linear_ref
from qcompiler.codegen.quant import quantize_weight
from qcompiler.codegen.triton_linear import wq_linear_triton
from qcompiler.codegen.triton_linear_tiles import LinearConfig
from qcompiler.codegen.workspace import SplitKWorkspace, active_workspace
from qcompiler.runtime.engine import ModelRunner

TOL = dict(rtol=2e-3, atol=2e-2)  # fp16 outputs against an fp32 reference
FORMS = {"planes": 2, "stream": 2, "dot": 16, "swap": 16}  # form -> block_m ("dot": planes at 16 rows)


def _case(M, N, device, seed=0, K=128, group=32):
    """fp16 ``x [M, K]`` and an int4 asymmetric weight, bias included, with the fp32 reference."""
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(N, K, generator=g), 4, group, symmetric=False)
    x, b = torch.randn(M, K, generator=g).half(), torch.randn(N, generator=g).half()
    scales = qw.scales.half()
    ref = quantized_linear_ref(x.float(), qw.qweight, scales.float(), qw.zeros, b.float(), 4)
    args = tuple(t.to(device) for t in (x, qw.qweight, scales, qw.zeros, b))
    return args, ref


def _split(form: str) -> LinearConfig:
    """Tiles of ``form`` with K split 4 ways (K = 128, BLOCK_K = 32: every split has work)."""
    return LinearConfig(FORMS[form], 16, 32, 4, 4, 1, "planes" if form == "dot" else form)


@pytest.mark.parametrize("form", list(FORMS))
def test_owned_workspace_is_left_clean_and_grows(kernel_device, form):
    """Calls in a row under one workspace, of different sizes: each equals its reference in the input's
    dtype, the workspace's sums and locks are zero between calls, a call that needs more grows it
    and keeps the outgrown buffers alive (CUDA graphs captured earlier still point at them)."""
    dev = torch.device(kernel_device)
    with SplitKWorkspace() as ws:
        for i, (M, N) in enumerate([(2, 24), (3, 40), (2, 24)]):
            args, ref = _case(M, N, kernel_device, seed=i)
            out = wq_linear_triton(*args, bits=4, config=_split(form))
            assert out.dtype == torch.float16
            torch.testing.assert_close(out.cpu().float(), ref, **TOL)
            sums, locks = ws.buffers[dev]
            assert sums.numel() >= M * N and not sums.any() and not locks.any()
    assert len(ws.retired) == 1 and not ws.retired[0][0].any()  # grown once, at the 3 x 40 call


def test_the_innermost_owner_is_used_and_workspaces_share_no_memory(kernel_device):
    """Two owners, one inside the other: a call uses the innermost one's buffers alone, the outer
    one's again once the inner is left; their buffers are distinct memory. Outside both, a call
    still computes its reference and leaves both workspaces as they were."""
    dev = torch.device(kernel_device)
    args, ref = _case(2, 24, kernel_device)
    cfg = _split("stream")
    outer, inner = SplitKWorkspace(), SplitKWorkspace()
    with outer:
        with inner:
            assert active_workspace() is inner
            torch.testing.assert_close(wq_linear_triton(*args, bits=4, config=cfg).cpu().float(), ref, **TOL)
        assert dev in inner.buffers and dev not in outer.buffers
        assert active_workspace() is outer
        torch.testing.assert_close(wq_linear_triton(*args, bits=4, config=cfg).cpu().float(), ref, **TOL)
    assert active_workspace() is None
    (a_sums, a_locks), (b_sums, b_locks) = outer.buffers[dev], inner.buffers[dev]
    ptrs = {t.untyped_storage().data_ptr() for t in (a_sums, a_locks, b_sums, b_locks)}
    assert len(ptrs) == 4
    held = {id(t) for pair in (outer.buffers[dev], inner.buffers[dev]) for t in pair}
    torch.testing.assert_close(wq_linear_triton(*args, bits=4, config=cfg).cpu().float(), ref, **TOL)
    assert {id(t) for pair in (outer.buffers[dev], inner.buffers[dev]) for t in pair} == held
    assert not outer.retired and not inner.retired


def test_exits_out_of_order_are_refused():
    a, b = SplitKWorkspace(), SplitKWorkspace()
    a.__enter__()
    b.__enter__()
    with pytest.raises(AssertionError, match="out of order"):
        a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    a.__exit__(None, None, None)
    assert active_workspace() is None


def test_model_runner_runs_the_program_in_its_own_workspace():
    """The engine's runner enters the workspace it owns around every call of the program (one it
    was given, else its own); two runners own two."""
    seen = []

    def program(*args):
        seen.append(active_workspace())
        return torch.zeros(1)

    class Step:
        is_decode = False

        def args(self, kv_cache):
            return (kv_cache,)

    paged = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 4}
    given = SplitKWorkspace()
    runners = [ModelRunner(program, paged, torch.float32, 2, 4),
               ModelRunner(program, paged, torch.float32, 2, 4, workspace=given)]
    for r in runners:
        r.run(Step())
    assert seen == [runners[0].workspace, given] and seen[0] is not given
    assert active_workspace() is None
