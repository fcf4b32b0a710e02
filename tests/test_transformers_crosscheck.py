"""Cross-check against an implementation written elsewhere: transformers' Qwen3-Next torch paths.

transformers puts fla's kernels in their place when flash-linear-attention is installed;
`inspect.unwrap` reaches its own torch code, which is what is checked here.
"""
import inspect

import pytest

from cortexlab.ops import gated_delta_rule
from conftest import make_inputs, rrmse

qwen3_next = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")


@pytest.mark.parametrize("T", [1, 50, 64, 129])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("backend", ["recurrent", "chunk"])
def test_matches_transformers(T, with_state, backend):
    q, k, v, g, beta, h0 = make_inputs(B=2, T=T, H=2, Dk=16, Dv=16, initial_state=with_state,
                                       requires_grad=False, seed=T)
    ours_o, ours_s = gated_delta_rule(q * 3, k * 2, v, g, beta, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm=True, backend=backend)
    for theirs in map(inspect.unwrap, (qwen3_next.torch_chunk_gated_delta_rule,
                                       qwen3_next.torch_recurrent_gated_delta_rule)):
        their_o, their_s = theirs(q * 3, k * 2, v, g, beta, initial_state=h0, output_final_state=True,
                                  use_qk_l2norm_in_kernel=True)
        assert rrmse(ours_o, their_o) <= 1e-5, theirs.__name__
        assert rrmse(ours_s, their_s) <= 1e-5, theirs.__name__
