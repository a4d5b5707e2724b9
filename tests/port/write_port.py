"""Write a port as a team using quic/ai-hub-models would have it, in a folder of its own with the pyproject.toml that
points the pytest plugin at it: CI's port tier then runs ``pytest -m pasd_port`` there, as such a team would.

    python tests/port/write_port.py OUT_DIR

OUT_DIR gets ``model/`` (the tiny seeded UNet, diffusers' layout), ``sha.safetensors`` (ai-hub-models' SHA names,
written by tests/other_tools.py from its documented behaviour), ``mha.encodings`` and ``sha.encodings``,
``model.onnx`` (torch's own export of the MHA UNet) with ``model.encodings`` and ``pyproject.toml`` with ``[tool.pasd-verify]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from other_tools import ai_hub_checkpoint, ai_hub_name, attention_heads, sha_encodings, weight_encodings  # noqa: E402
from pasd_verify.checkpoint import save_state_dict_file  # noqa: E402
from pasd_verify.encodings import save_encodings  # noqa: E402
from pasd_verify.kinds import graph_of  # noqa: E402
from pasd_verify.presets import build_unet, unet_inputs  # noqa: E402

PYPROJECT = """\
[tool.pasd-verify]
model = "model"
sha = "sha.safetensors"
mha-encodings = "mha.encodings"
sha-encodings = "sha.encodings"
onnx = "model.onnx"
onnx-encodings = "model.encodings"
"""


def write_port(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    unet = build_unet("tiny", seed=0)
    unet.save_pretrained(out / "model")
    heads, state = attention_heads(unet), unet.state_dict()
    save_state_dict_file(ai_hub_checkpoint(state, heads), out / "sha.safetensors")
    mha = weight_encodings(state)
    save_encodings(mha, out / "mha.encodings")
    save_encodings(sha_encodings(mha, heads, ai_hub_name), out / "sha.encodings")
    graph = graph_of(unet)
    inputs = unet_inputs(unet, batch=1, seed=0)
    torch.onnx.export(graph.module, tuple(inputs[name] for name in graph.input_names), str(out / "model.onnx"),
                      input_names=graph.input_names, output_names=graph.output_names, dynamo=False)
    # the export's encodings: the weights that kept their names as the graph's initializers
    import onnx

    initializers = {i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    exported = weight_encodings(state, prefix="unet.")  # the wrapper's module path, as the export names them
    exported["param_encodings"] = [e for e in exported["param_encodings"] if e["name"] in initializers]
    save_encodings(exported, out / "model.encodings")
    (out / "pyproject.toml").write_text(PYPROJECT)


if __name__ == "__main__":
    write_port(Path(sys.argv[1]))
    print(f"wrote an ai-hub-models-style port of the tiny UNet into {sys.argv[1]}")
