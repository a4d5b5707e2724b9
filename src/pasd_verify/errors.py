"""The one exception hierarchy of pasd-verify.

Every message names the file, key or module at fault, what was found and what was expected, so that a user
can act on it without reading a traceback.
"""

from __future__ import annotations


class PasdVerifyError(Exception):
    """Base class of every error pasd-verify raises on purpose."""


class UnsupportedAttentionError(PasdVerifyError):
    """An attention module cannot be rewritten to single-head form without changing what it computes.

    ``problems`` maps each refused module's name to the reasons it was refused.
    """

    def __init__(self, problems: dict[str, list[str]]):
        self.problems = problems
        lines = [f"  {name or '<root>'}: {'; '.join(reasons)}" for name, reasons in problems.items()]
        super().__init__(
            f"{len(problems)} attention module(s) cannot be converted to SHA exactly "
            "(nothing was changed):\n" + "\n".join(lines)
        )


class AttentionInputError(PasdVerifyError):
    """A converted attention module was called with inputs it does not handle the way diffusers does."""


class CheckpointError(PasdVerifyError):
    """A checkpoint file or state dict does not match what the conversion expects."""


class ImageInputError(PasdVerifyError):
    """An image tensor breaks the input conventions: range, dtype, layout, channels, size or finiteness."""


class TokenInputError(PasdVerifyError):
    """Token ids for the text encoder break its conventions: integers, 77 per prompt, within the vocabulary."""


class LatentInputError(PasdVerifyError):
    """A latent for the VAE decoder breaks its conventions: NCHW float with the VAE's latent channels, scaled."""


class OutputFolderError(PasdVerifyError):
    """The output folder holds something a run would have to replace and may not: a file or folder the command did
    not write, or one that cannot be removed."""
