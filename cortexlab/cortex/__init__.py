"""Cortex: a trainable gated-delta-rule memory sidecar on frozen Hugging Face decoders."""
from .config import CortexWrapConfig
from .controller import MetacognitiveController, neutralise_controller_
from .gdn import CortexBlock, GatedDeltaNet
from .hybrid import HybridCortexBlock
from .session import SessionCorruptError, SessionStore, validate_session_id
from .wrap import CortexModel, attach_cortex, load_qwen_with_cortex, load_with_cortex

__all__ = [
    "CortexBlock", "CortexModel", "CortexWrapConfig", "GatedDeltaNet", "HybridCortexBlock",
    "MetacognitiveController", "SessionCorruptError", "SessionStore", "attach_cortex", "load_qwen_with_cortex",
    "load_with_cortex", "neutralise_controller_", "validate_session_id",
]
