"""PASD's whole super-resolution with any of its five networks on any backend, judged by the picture.

``pasd`` is the pipeline itself (a diffusers ``DiffusionPipeline``); ``networks`` puts each network on a backend
behind its torch call.
"""

from .networks import BACKENDS, NETWORKS, Components, parse_backends, pipeline_components, preset_components
from .pasd import PASDOutput, PASDPipeline, StartNoise, Trace, pasd_prompt, preprocess, sd15_scheduler, to_tensor

__all__ = ["BACKENDS", "NETWORKS", "Components", "PASDOutput", "PASDPipeline", "StartNoise", "Trace",
           "parse_backends", "pasd_prompt", "pipeline_components", "preprocess", "preset_components",
           "sd15_scheduler", "to_tensor"]
