"""Verify an MHA -> SHA port made by any tool: the laws of :mod:`pasd_verify.port.laws` on whatever subset of its
files a user has (``pasd-verify check``, and the pytest plugin of :mod:`pasd_verify.port.plugin`), the heads matched
by name (:mod:`pasd_verify.port.names`) and reported as a table, ``report.json`` and JUnit XML.

The names below are imported when first used (PEP 562): pytest loads the plugin in every run of an environment that
has pasd-verify installed, and a run that names no port must not pay for torch and diffusers.
"""

from __future__ import annotations

import importlib

_WHERE = {"LAWS": "laws", "Law": "laws", "check_port": "laws", "run_law": "laws",
          "Failure": "artifacts", "LawResult": "artifacts", "Port": "artifacts", "PortArtifacts": "artifacts",
          "HeadNames": "names", "infer_head_names": "names", "load_head_names": "names"}

__all__ = sorted(_WHERE)

# A port's files, as PortArtifacts names them, with what each is: ``pasd-verify check --<name>`` and the plugin's
# ``--pasd-<name>`` (dashes for underscores) read this one list.
ARTIFACTS = {"model": "the model folder (config.json and its MHA weights) or its config.json",
             "kind": "the network of a folder that holds two (a VAE: vae-encoder or vae-decoder)",
             "mha": "the MHA checkpoint (default: the weights in the model folder)",
             "sha": "the SHA checkpoint the port wrote",
             "mha_encodings": "AIMET encodings of the MHA model",
             "sha_encodings": "AIMET encodings of the SHA model the port wrote",
             "names": "JSON: MHA parameter name -> the port's head names, where they cannot be inferred",
             "partner": "the ControlNet folder whose outputs a PASD UNet takes",
             "onnx": "an ONNX export of the model (float graph)",
             "onnx_encodings": "the encodings exported with the ONNX graph",
             "qdq": "the quantized graph (QDQ ONNX): run on the HTP against the CPU",
             "context": "the compiled HTP context model of the QDQ graph (_ctx.onnx beside its .bin), run as it is "
                        "instead of compiling the QDQ graph"}

# The seeds of the inputs the laws compare on (``check --seed``, ``--pasd-seed``): what a seeded draw takes.
SEEDS = range(2**32)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
