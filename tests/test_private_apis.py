"""The private parts of aimet-torch and aimet-onnx that pasd-verify relies on, each used in one module only: when a
new aimet release moves or changes one, this fails naming the helper and the module that needs it, instead of a
traceback deep inside an export or an AdaRound."""

from __future__ import annotations

import importlib
import inspect

import pytest

# (our module that uses it, aimet module, attribute path, the parameters we pass by name or position, in order)
PRIVATE = [
    ("pasd_verify.export.quantize", "aimet_onnx.common.onnx._utils", "_add_onnx_qdq_nodes_ir",
     ("ir_model", "input_names", "output_names", "node_name_prefixes", "encodings", "float_types", "onnx_opset",
      "prequantize_constants")),
    ("pasd_verify.export.quantize", "aimet_onnx.common.onnx._utils", "_derive_data_movement_op_encodings",
     ("model", "encodings")),
    ("pasd_verify.export.quantize", "aimet_onnx.quantsim", "_to_unsigned_encoding", None),
    ("pasd_verify.export.quantize", "aimet_onnx.quantsim", "QuantizationSimModel._get_qdq_parameters", ("self",)),
    ("pasd_verify.quant.reference", "aimet_torch._base.adaround.adaround_optimizer", "AdaroundOptimizer.adaround_module",
     ("module", "quant_module", "orig_model", "quant_model", "act_func", "cached_dataset", "forward_fn",
      "opt_params")),
]


@pytest.mark.parametrize("user,module,path,parameters", PRIVATE, ids=[p[2] for p in PRIVATE])
def test_the_private_aimet_helpers_we_use_are_still_there(user, module, path, parameters):
    where = f"{module}.{path} (used by {user})"
    try:
        found = importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{where}: its module no longer imports: {e}")
    for part in path.split("."):
        assert hasattr(found, part), f"{where}: {part!r} is gone from this aimet release"
        found = getattr(found, part)
    assert callable(found), f"{where}: no longer callable"
    if parameters is not None:
        names = tuple(inspect.signature(found).parameters)[:len(parameters)]
        assert names == parameters, f"{where}: its parameters are now {names}, we pass {parameters}"


def test_aimet_torchs_adaround_caching_switch_is_still_a_class_flag():
    """quant.reference flips ``is_activation_caching_enabled`` for AIMET's uncached mode and restores it."""
    from aimet_torch._base.adaround.adaround_optimizer import AdaroundOptimizer

    assert isinstance(AdaroundOptimizer.__dict__.get("is_activation_caching_enabled"), bool), (
        "aimet_torch._base.adaround.adaround_optimizer.AdaroundOptimizer.is_activation_caching_enabled "
        "(used by pasd_verify.quant.reference) is no longer a class-level flag")
    assert isinstance(AdaroundOptimizer.__dict__.get("adaround_module"), classmethod), (
        "AdaroundOptimizer.adaround_module (used by pasd_verify.quant.reference) is no longer a classmethod")


def test_no_other_module_reaches_into_aimet_privately():
    """Each private helper above is used (imported, called or reached as an attribute) by its one module and nowhere
    else in src/."""
    import re
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "src" / "pasd_verify"
    for user, module, path, _ in PRIVATE:
        parts = path.split(".")
        name = parts[-1] if parts[-1].startswith("_") else parts[0]
        used = re.compile(rf"import .*\b{name}\b|\b{name}\s*[.(]")
        users = sorted(str(f.relative_to(src)) for f in src.rglob("*.py") if used.search(f.read_text()))
        assert users == [user.removeprefix("pasd_verify.").replace(".", "/") + ".py"], (name, users)
