"""The gated delta rule: sequential oracle, chunked torch path and Triton kernels."""
from .gated_delta import BACKENDS, gated_delta_rule
from .recurrent import gated_delta_step, recurrent_gated_delta_rule

__all__ = ["BACKENDS", "gated_delta_rule", "gated_delta_step", "recurrent_gated_delta_rule"]
