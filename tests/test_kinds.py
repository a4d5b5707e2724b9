"""The model-kind registry: each kind is recognised, builds, draws and checks its samples, and runs through its flat
signature exactly as its model runs when called the diffusers way; no module outside it branches on a kind."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pasd_verify.cli import KIND_NAMES, main
from pasd_verify.errors import PasdVerifyError
from pasd_verify.kinds import KINDS, CalibrationError, get_kind, graph_of, kind_of, preset_model
from pasd_verify.presets import build_vae
from pasd_verify.sha import SingleHeads, convert_to_sha

SRC = Path(__file__).resolve().parent.parent / "src" / "pasd_verify"


def test_the_command_line_offers_exactly_the_registry_kinds(capsys):
    assert tuple(KIND_NAMES) == tuple(KINDS) and all(name in KIND_NAMES for name in KINDS)
    assert "vae" not in KIND_NAMES
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--preset", "tiny", "--kind", "vae", "--out", "x"])
    assert exit_.value.code == 2
    choices = ", ".join(repr(name) for name in KINDS)
    assert f"invalid choice: 'vae' (choose from {choices})" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(KINDS))
def test_a_preset_of_each_kind_is_recognised_as_that_kind_in_either_form(name):
    for form in ("mha", "sha"):
        loaded = preset_model("tiny", name, form=form)
        assert kind_of(loaded.model) is loaded.kind is get_kind(name)
        assert (loaded.name_map is not None) == (form == "sha")
        assert any(isinstance(m, SingleHeads) for m in loaded.model.modules()) == (form == "sha")
        assert (loaded.partner is None) == (loaded.kind.partner is None)
        if loaded.partner is not None:
            assert kind_of(loaded.partner).name == loaded.kind.partner
        assert loaded.source == {"preset": "tiny", "kind": name, "seed": 0, "form": form,
                                 "model_class": type(loaded.model).__name__}


def _native(name: str, model, partner, sample):
    """The model called the diffusers (or transformers) way, with the sample's own (integer) timestep and int64 token
    ids as a tokenizer gives them; the VAE's halves as the whole AutoencoderKL of the same seed computes them, with
    its attentions rewritten as the kind's preset rewrote them: the independent reference."""
    if name == "text-encoder":
        with torch.no_grad():
            return [model(input_ids=sample["input_ids"].long()).last_hidden_state]
    if name.startswith("vae-"):
        vae = build_vae("tiny", seed=0)
        convert_to_sha(vae)
        with torch.no_grad():
            if name == "vae-encoder":
                posterior = vae.encode(sample["image"]).latent_dist
                return [posterior.mean, posterior.logvar]
            return [vae.decode(sample["latent"] / vae.config.scaling_factor).sample]
    args = (sample["latent"], sample["timestep"], sample["encoder_hidden_states"])
    with torch.no_grad():
        if name == "unet":
            return [model(*args).sample]
        if name == "pasd-controlnet":
            rgbs, down, mid = model(*args, sample["control_image"])
            return [*rgbs, *down, mid]
        _, down, mid = partner(*args, sample["control_image"])
        return [model(*args, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample]


@pytest.mark.parametrize("name", list(KINDS))
def test_the_flat_graph_and_the_calibration_calls_compute_what_the_model_computes(name):
    loaded = preset_model("tiny", name, form="sha")
    model, partner = loaded.model, loaded.partner
    samples = loaded.kind.seeded_samples(model, 2, latent=(8, 16), seed=3)
    graph = graph_of(model)
    calls = loaded.kind.calls(model, samples, partner=partner)
    for sample, call in zip(samples, calls):
        expected = _native(name, model, partner, sample)
        got = graph(graph.feeds(sample, partner))
        assert list(got) == graph.output_names and len(expected) == len(got)
        for e, g in zip(expected, got.values()):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        with torch.no_grad():
            out = call(model)
        first = out if isinstance(out, torch.Tensor) else out[0]
        torch.testing.assert_close(first, expected[0], rtol=0, atol=0)


def test_seeded_samples_carry_exactly_the_keys_the_kind_checks():
    for name, kind in KINDS.items():
        model = preset_model("tiny", name).model
        samples = kind.seeded_samples(model, 2, latent=(8, 8), seed=1)
        assert [set(s) for s in samples] == [set(kind.sample_keys)] * 2
        for i, sample in enumerate(samples):
            kind.check_sample(sample, model, f"sample {i}", like=samples[0])
        assert ("control_image" in kind.sample_keys) == kind.control
        extra = {**samples[0], "noise": next(iter(samples[0].values()))}
        with pytest.raises(CalibrationError, match=r"^where: unexpected key 'noise'"):
            kind.check_sample(extra, model, "where")
        if kind.control:
            flipped = {**samples[0], "control_image": samples[0]["control_image"] > 0.5}
            with pytest.raises(CalibrationError, match=r"^s.safetensors: control_image has dtype bool; expected floa"):
                kind.check_sample(flipped, model, "s.safetensors")


def test_a_partnered_kind_refuses_to_run_without_its_partner():
    loaded = preset_model("tiny", "pasd-unet")
    samples = loaded.kind.seeded_samples(loaded.model, 1, latent=(8, 8))
    with pytest.raises(CalibrationError, match="pasd-unet is calibrated on its pasd-controlnet's outputs"):
        loaded.kind.calls(loaded.model, samples)
    with pytest.raises(ValueError, match="down_residual_0.*pasd-controlnet"):
        graph_of(loaded.model).feeds(samples[0])


def test_unknown_kinds_presets_and_models_are_refused_naming_the_choices():
    with pytest.raises(PasdVerifyError, match=re.escape(f"unknown model kind 'vae'; choose one of {sorted(KINDS)}")):
        get_kind("vae")
    with pytest.raises(PasdVerifyError, match=r"unknown preset 'huge'; choose one of \['sd15', 'tiny'\]"):
        preset_model("huge", "unet")
    with pytest.raises(PasdVerifyError, match="form must be 'mha' or 'sha', got 'both'"):
        preset_model("tiny", "unet", form="both")
    classes = ", ".join(kind.class_name for kind in KINDS.values())
    with pytest.raises(PasdVerifyError, match=f"Linear is not a kind pasd-verify knows; expected one of {classes}$"):
        kind_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="config overrides apply to the plain UNet only, not to pasd-unet"):
        preset_model("tiny", "pasd-unet", attention_head_dim=8)


# Model classes and kind names, as code that branches on them would spell them: isinstance or identity against a
# model class, a comparison with a class's or a kind's name, or with a model's class name.
_CLASSES = ("UNet2DConditionModel|ControlNetModel|PASDUNet2DConditionModel|PASDControlNetModel|CLIPTextModel|"
            "AutoencoderKL|VAEEncoder|VAEDecoder")
_KIND_NAMES = "|".join(re.escape(name) for name in KINDS)
_KIND_BRANCH = re.compile(rf"isinstance\([^)]*({_CLASSES})|\bis(\s+not)?\s+({_CLASSES})\b|"
                          rf"\bkind\s*(==|!=)|\.kind\s*in\s|\bkind\.name\s*(==|!=|in)\s|\b__class__\b|type\([^)]*\)\s*(==|is)|"
                          rf"(==|!=)\s*[\"']({_KIND_NAMES}|{_CLASSES})[\"']|[\"']({_KIND_NAMES}|{_CLASSES})[\"']\s*(==|!=)")


def test_the_branch_pattern_finds_what_it_looks_for():
    """The grep below can fail: each way of branching on a kind it knows is found in a line written that way."""
    for line in ('if isinstance(model, AutoencoderKL):', 'if choice.cls is not PASDControlNetModel:',
                 'device = "cpu" if choice.name == "CLIPTextModel" else "meta"', 'if kind == "vae-decoder":',
                 'if graph.kind in kinds:', 'if kind.name in names:', 'if "text-encoder" != name:', 'if type(model) is VAEEncoder:',
                 'if model.__class__ in CLASSES:'):
        assert _KIND_BRANCH.search(line), line
    for line in ('if __name__ == "__main__":', 'kind = get_kind(name)', 'return kind_of(model).graph(model)',
                 'if law.name in names:'):
        assert not _KIND_BRANCH.search(line), line


def test_no_module_outside_the_registry_branches_on_a_kind():
    """What a kind is lives in the kinds package (and the model code itself): its registry, and kinds.loading, which
    reads from a user's folder which class it holds."""
    found = [f"{path.relative_to(SRC)}:{i}: {line.strip()}"
             for path in sorted(SRC.rglob("*.py")) if not {"kinds", "models"} & set(path.relative_to(SRC).parts)
             for i, line in enumerate(path.read_text().splitlines(), 1) if _KIND_BRANCH.search(line)]
    assert not found, "\n".join(found)
