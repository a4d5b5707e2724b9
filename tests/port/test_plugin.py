"""The pytest plugin in a user's own suite (pytester: a fresh project, pytest run on it as a user runs it): each law
is an item, configured by options or by [tool.pasd-verify]; a bad port fails naming the key; the fixtures serve a
user's own tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from other_tools import ai_hub_checkpoint, attention_heads, reference_note_checkpoint
from pasd_verify.checkpoint import save_state_dict_file
from pasd_verify.port import LAWS
from pasd_verify.presets import build_unet


@pytest.fixture(scope="module")
def unet():
    return build_unet("tiny", seed=0)


def _port(folder, unet, writer):
    unet.save_pretrained(folder / "model")
    save_state_dict_file(writer(unet.state_dict(), attention_heads(unet)), folder / "sha.safetensors")


def test_laws_are_items_configured_by_the_pyproject_table(pytester, unet):
    _port(pytester.path, unet, ai_hub_checkpoint)
    pytester.makepyprojecttoml('[tool.pasd-verify]\nmodel = "model"\nsha = "sha.safetensors"\n')
    result = pytester.runpytest("-m", "pasd_port", "-rs")
    needs_more = [law for law in LAWS if not set(law.needs) <= {"model", "mha", "sha"}]
    result.assert_outcomes(passed=len(LAWS) - len(needs_more), skipped=len(needs_more))
    result.stdout.fnmatch_lines(["*sha-encodings.implied: needs --mha-encodings, --sha-encodings*"])


def test_a_defective_port_fails_its_items_naming_the_keys_in_junit_xml(pytester, unet):
    _port(pytester.path, unet, reference_note_checkpoint)
    result = pytester.runpytest("--pasd-model", "model", "--pasd-sha", "sha.safetensors", "--junitxml", "out.xml")
    result.assert_outcomes(failed=2, passed=4, skipped=len(LAWS) - 6)
    module = next(iter(attention_heads(unet)))
    result.stdout.fnmatch_lines([f"*{module}.to_q.weight: is an MHA projection key, still in the SHA checkpoint*"])
    cases = {case.get("name"): case for case in ET.parse(pytester.path / "out.xml").getroot().iter("testcase")
             if case.get("classname") == "pasd-verify"}
    assert cases["sha-checkpoint.no-mha-keys"].find("failure") is not None
    figures = {p.get("name"): p.get("value") for p in cases["sha-checkpoint.heads-split"].iter("property")}
    assert int(figures["projections_split"]) == 3 * len(attention_heads(unet))


def test_fixtures_serve_a_users_own_tests(pytester, unet):
    _port(pytester.path, unet, ai_hub_checkpoint)
    pytester.makepyfile(test_mine="""
        import torch
        from pasd_verify.kinds import kind_of

        def test_sha_equals_mha_on_my_inputs(pasd_mha_model, pasd_sha_model, pasd_inputs, pasd_name_map):
            assert pasd_name_map  # the model's MHA -> SHA map
            for feeds in pasd_inputs:
                a = kind_of(pasd_mha_model).graph(pasd_mha_model)(feeds)
                b = kind_of(pasd_sha_model).graph(pasd_sha_model)(feeds)
                for name in a:
                    torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    """)
    result = pytester.runpytest("--pasd-model", "model", "--pasd-sha", "sha.safetensors", "-k", "my_inputs",
                                "--hypothesis-profile", "pasd-dev")
    result.assert_outcomes(passed=1)


def test_an_unreadable_file_stops_the_session_naming_it(pytester, unet):
    _port(pytester.path, unet, ai_hub_checkpoint)
    data = (pytester.path / "sha.safetensors").read_bytes()
    (pytester.path / "sha.safetensors").write_bytes(data[:100])
    result = pytester.runpytest("--pasd-model", "model", "--pasd-sha", "sha.safetensors")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*sha.safetensors*"])


def test_without_a_port_the_plugin_adds_nothing(pytester):
    pytester.makepyfile(test_plain="def test_one():\n    pass\n")
    result = pytester.runpytest()
    result.assert_outcomes(passed=1)


def test_our_own_conversion_passes_through_the_plugin(pytester, unet):
    """pasd-verify convert's files, named in [tool.pasd-verify]: every law they allow is an item that passes."""
    from other_tools import weight_encodings
    from pasd_verify.convert import convert_files
    from pasd_verify.encodings import save_encodings

    unet.save_pretrained(pytester.path / "model")
    save_encodings(weight_encodings(unet.state_dict()), pytester.path / "mha.encodings")
    convert_files(pytester.path / "model", pytester.path / "model" / "diffusion_pytorch_model.safetensors",
                  pytester.path / "sha", encodings=pytester.path / "mha.encodings")
    pytester.makepyprojecttoml('[tool.pasd-verify]\nmodel = "model"\nsha = "sha/state_dict_sha.safetensors"\n'
                               'mha-encodings = "mha.encodings"\nsha-encodings = "sha/parameters_sha.encodings"\n')
    result = pytester.runpytest("-m", "pasd_port")
    needs_more = [law for law in LAWS if not set(law.needs) <= {"model", "mha", "sha", "mha_encodings",
                                                                 "sha_encodings"}]
    result.assert_outcomes(passed=len(LAWS) - len(needs_more), skipped=len(needs_more))
