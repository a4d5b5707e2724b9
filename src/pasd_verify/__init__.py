"""pasd-verify: convert Stable Diffusion 1.5 / PASD attention to single-head form and prove the numbers stay.

Data flow: ``sha`` (module rewrite, which yields the MHA -> SHA ``name_map``) -> ``checkpoint`` (state dicts) ->
``encodings`` (AIMET encodings) -> ``quant`` (AdaRound) / ``export`` (ONNX, QNN HTP).
"""

__version__ = "0.1.0"

from .checkpoint import convert_checkpoint_file, merge_state_dict, split_state_dict  # noqa: E402
from .errors import (  # noqa: E402
    AttentionInputError,
    CheckpointError,
    PasdVerifyError,
    UnsupportedAttentionError,
)
from .name_map import NameMap, NameMapError  # noqa: E402
from .sha import SHAAttention, convert_to_mha, convert_to_sha  # noqa: E402

__all__ = [
    "AttentionInputError",
    "CheckpointError",
    "NameMap",
    "NameMapError",
    "PasdVerifyError",
    "SHAAttention",
    "UnsupportedAttentionError",
    "convert_checkpoint_file",
    "convert_to_mha",
    "convert_to_sha",
    "merge_state_dict",
    "split_state_dict",
]
