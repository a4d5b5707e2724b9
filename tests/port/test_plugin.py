"""The pytest plugin in a user's own suite (pytester: a fresh project, pytest run on it as a user runs it): each law
is an item, configured by options or by [tool.pasd-verify]; a bad port fails naming the key; the fixtures serve a
user's own tests."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

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


# --- the plugin in an environment without the [test] extra (hypothesis), or without pasd-verify's dependencies ---

def _pytest_without(distributions: tuple[str, ...], project: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest run on ``project`` in a fresh interpreter whose packages are this one's less ``distributions`` (their
    modules and metadata, as if never installed): a folder of links to the rest is its only site-packages, so
    pasd-verify's plugin comes in through its pytest11 entry point, as it does for a user."""
    import pasd_verify

    site = Path(pytest.__file__).parents[1]
    packages = project.parent / f"{project.name}-site-packages"
    packages.mkdir()
    for entry in site.iterdir():
        if not entry.name.lstrip("_").lower().startswith(distributions):
            (packages / entry.name).symlink_to(entry)
    # -S: no site-packages but those on PYTHONPATH; the source tree first where this run imports it from one (where
    # pasd-verify is installed, as under tox, its package is among the links: the site folder itself on the path
    # would bring back what is left out)
    source = Path(pasd_verify.__file__).parents[1]
    path = os.pathsep.join([*([str(source)] if source != site else []), str(packages)])
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"} | {"PYTHONPATH": path}
    return subprocess.run([sys.executable, "-S", "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=project,
                          env=env, capture_output=True, text=True, timeout=300)


def test_an_unrelated_project_passes_where_neither_hypothesis_nor_torch_is_installed(tmp_path):
    (tmp_path / "test_theirs.py").write_text(
        "def test_theirs(request):\n"
        "    assert request.config.getoption('pasd_model') is None  # the plugin is loaded, and stays out of the way\n")
    done = _pytest_without(("hypothesis", "torch"), tmp_path, "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_a_named_port_runs_its_laws_where_hypothesis_is_not_installed(tmp_path, unet):
    _port(tmp_path, unet, ai_hub_checkpoint)
    done = _pytest_without(("hypothesis",), tmp_path, "--pasd-model", "model", "--pasd-sha", "sha.safetensors",
                           "-m", "pasd_port", "-q")
    needs_more = [law for law in LAWS if not set(law.needs) <= {"model", "mha", "sha"}]
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{len(LAWS) - len(needs_more)} passed, {len(needs_more)} skipped" in done.stdout


def test_a_named_port_without_the_dependencies_says_in_one_line_what_to_install(tmp_path):
    (tmp_path / "model").mkdir()
    done = _pytest_without(("torch",), tmp_path, "--pasd-model", "model")
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "'torch'" in errors[0] and "pip install pasd-verify" in errors[0], done.stderr


# --- [tool.pasd-verify] and --pasd-seed of the wrong type: pytest's usage error, naming the key -----------------

@pytest.mark.parametrize("toml, named", [
    ('[tool]\npasd-verify = "a string"\n', "tool.pasd-verify is a string 'a string'; expected a table"),
    ('[tool.pasd-verify]\nmodel = "model"\nseed = "7"\n', "seed is a string '7'; expected an integer"),
    ('[tool.pasd-verify]\nmodel = "model"\nseed = 4294967296\n', "seed is an integer 4294967296; expected an integer from 0"),
    ('[tool.pasd-verify]\nmodel = "model"\nseed = true\n', "seed is a boolean True"),
    ('[tool.pasd-verify]\nmodel = "model"\nsha = 5\n', "sha is an integer 5; expected a non-empty string (a path)"),
    ('[tool.pasd-verify]\nmodel = ["model"]\n', "model is an array *; expected a non-empty string"),
    ('[tool.pasd-verify]\nmodel = "model"\n[tool.pasd-verify.sha]\nfile = "sha.safetensors"\n', "sha is a table"),
    ('[tool.pasd-verify]\nkind = 3\n', "kind is an integer 3; expected a non-empty string (a kind name)"),
])
def test_a_pyproject_setting_of_the_wrong_type_is_a_usage_error_naming_it(pytester, toml, named):
    (pytester.path / "model").mkdir()
    pytester.makepyprojecttoml(toml)
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: *pyproject.toml: *{named}*"])


def test_a_seed_option_out_of_range_is_a_usage_error(pytester):
    (pytester.path / "model").mkdir()
    result = pytester.runpytest("--pasd-model", "model", "--pasd-seed", "99999999999999999999999")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --pasd-seed 99999999999999999999999: expected an integer from 0 to *"])

