"""The pytest plugin: the laws of ``pasd-verify check`` as test items of a user's own suite.

Installed with pasd-verify (entry point ``pytest11``), it does nothing until a port's files are named, by options::

    pytest --pasd-model unet/ --pasd-sha unet_sha.safetensors --pasd-sha-encodings unet_sha.encodings

or by a ``[tool.pasd-verify]`` table in the ``pyproject.toml`` of the rootdir (``model = "unet/"``, ``sha = ...``;
paths relative to that file), or by ``pasd_model = ...`` lines in an ini file. Then each law is one item
(``pasd-verify::sha-checkpoint.heads-split``, marked ``pasd_port``): it passes, fails listing every key at fault, or
is skipped saying which file it needs; its figures go into the item's report and into JUnit XML
(``--junitxml``, as ``user_properties``).

For tests of one's own: fixtures ``pasd_port`` (the read :class:`~pasd_verify.port.artifacts.Port`), ``pasd_mha_model``
and ``pasd_sha_model`` (the MHA model and the SHA model holding the port's checkpoint), ``pasd_inputs`` (seeded
inputs of the model's graph) and ``pasd_name_map``; and hypothesis profiles ``pasd-ci``, ``pasd-dev``,
``pasd-thorough`` and ``pasd-mutation`` (``--hypothesis-profile pasd-ci``), the ones this project's suite runs on,
registered where hypothesis is installed.

Loading it is cheap and needs nothing beyond pytest: it is loaded in every pytest run of an environment that has
pasd-verify, and hypothesis (the ``[test]`` extra) may not be there. torch and the rest are imported once a port is
named; if one is missing then, the session stops with one line saying what to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from . import ARTIFACTS as _ARTIFACTS
from . import SEEDS

# Health checks by name (hypothesis' settings take the names): the profiles are plain data, readable without
# hypothesis.
_SLOW_DATA = ["too_slow", "data_too_large"]
# ci is derandomized: a merge gate must give the same verdict on the same code; dev and thorough explore anew;
# mutation is derandomized with fewer examples (each mutant reruns the tests that reach it, and its verdict must not
# depend on the draw).
PROFILES: dict[str, dict[str, Any]] = {
    "ci": dict(max_examples=50, deadline=None, suppress_health_check=_SLOW_DATA, print_blob=True, derandomize=True),
    "dev": dict(max_examples=8, deadline=None, suppress_health_check=_SLOW_DATA),
    "thorough": dict(max_examples=500, deadline=None, suppress_health_check=_SLOW_DATA, print_blob=True),
    "mutation": dict(max_examples=20, deadline=None, suppress_health_check=_SLOW_DATA, derandomize=True),
}

# The port's files: each is --pasd-<name> (dashes), pasd_<name> in an ini file, and <name> (dashes or underscores)
# in [tool.pasd-verify].
ARTIFACTS = _ARTIFACTS
MARKER = "pasd_port"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pasd-verify", "the laws of an MHA -> SHA port as test items (pasd-verify check)")
    for name, help in ARTIFACTS.items():
        group.addoption(f"--pasd-{name.replace('_', '-')}", dest=f"pasd_{name}", default=None, help=help)
        parser.addini(f"pasd_{name}", help=f"pasd-verify: {help}", default=None)
    group.addoption("--pasd-seed", dest="pasd_seed", type=int, default=None,
                    help="seed of the inputs the models are compared on (default 0)")


@pytest.hookimpl(tryfirst=True)  # before hypothesis' own plugin loads the profile --hypothesis-profile names
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a law of pasd-verify check on the port named by --pasd-* options")
    _register_profiles()


def _register_profiles() -> None:
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # no hypothesis, no tests that would load its profiles
        return
    for name, values in PROFILES.items():
        checks = [HealthCheck[check] for check in values.get("suppress_health_check", ())]
        settings.register_profile(f"pasd-{name}", **{**values, "suppress_health_check": checks})


def _toml_table(rootpath: Path) -> tuple[dict[str, Any], Path]:
    path = rootpath / "pyproject.toml"
    if not path.is_file():
        return {}, path
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise pytest.UsageError(f"{path}: not readable TOML ({e})") from e
    tool = data.get("tool", {})
    table = tool.get("pasd-verify", {}) if isinstance(tool, dict) else {}
    if not isinstance(table, dict):
        raise pytest.UsageError(f"{path}: tool.pasd-verify is {_toml_type(table)} {table!r}; expected a table "
                                "([tool.pasd-verify] with model = \"...\", sha = \"...\", ...)")
    unknown = sorted(k for k in table if k.replace("-", "_") not in {*ARTIFACTS, "seed"})
    if unknown:
        raise pytest.UsageError(f"{path}: [tool.pasd-verify] has unknown key(s) {unknown}; known: "
                                f"{sorted({*ARTIFACTS, 'seed'})}")
    for key, value in table.items():
        seed = key == "seed"
        if seed and (isinstance(value, bool) or not isinstance(value, int) or value not in SEEDS):
            raise pytest.UsageError(f"{path}: [tool.pasd-verify] seed is {_toml_type(value)} {value!r}; expected an "
                                    f"integer from 0 to {SEEDS[-1]}")
        if not seed and (not isinstance(value, str) or not value):
            expected = "a kind name" if key == "kind" else "a path"
            raise pytest.UsageError(f"{path}: [tool.pasd-verify] {key} is {_toml_type(value)} {value!r}; expected "
                                    f"a non-empty string ({expected})")
    return {k.replace("-", "_"): v for k, v in table.items()}, path


def _toml_type(value: Any) -> str:
    """What TOML calls the type of a parsed value."""
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a float"), (str, "a string"),
                       (list, "an array"), (dict, "a table")):
        if isinstance(value, kind):
            return name
    return "a date or time"


def port_settings(config: pytest.Config) -> tuple[dict[str, str], int]:
    """The port's files (name -> path) and the seed, from the options, else the ini file, else ``[tool.pasd-verify]``;
    paths relative to where each was written (the invocation folder, the ini file, pyproject.toml)."""
    table, toml_path = _toml_table(config.rootpath)
    values: dict[str, str] = {}
    for name in ARTIFACTS:
        given = config.getoption(f"pasd_{name}")
        base = config.invocation_params.dir
        if given is None and config.getini(f"pasd_{name}"):
            given, base = config.getini(f"pasd_{name}"), config.inipath.parent if config.inipath else config.rootpath
        if given is None and name in table:
            given, base = table[name], toml_path.parent
        if given is not None:
            values[name] = given if name == "kind" else str(base / given)
    seed = config.getoption("pasd_seed")
    if seed is not None and seed not in SEEDS:
        raise pytest.UsageError(f"--pasd-seed {seed}: expected an integer from 0 to {SEEDS[-1]}")
    return values, seed if seed is not None else table.get("seed", 0)


class _Session:
    """The port, read once per test session, and the results of the laws checked so far (a law reads the results of
    the laws it follows)."""

    def __init__(self, values: dict[str, str], seed: int):
        self.values, self.seed = values, seed
        self.results: dict[str, Any] = {}
        self._port = None

    @property
    def port(self):
        if self._port is None:
            from .artifacts import Port, PortArtifacts

            self._port = Port(PortArtifacts.of(**self.values), seed=self.seed)
        return self._port


_KEY = pytest.StashKey[_Session]()


class LawFailed(Exception):
    """A law that does not hold, with its failures."""


class LawItem(pytest.Item):
    """One law of :data:`~pasd_verify.port.laws.LAWS` on the configured port."""

    def __init__(self, *, law, **kwargs):
        super().__init__(**kwargs)
        self.law = law
        self.add_marker(MARKER)

    def runtest(self) -> None:
        from .laws import run_law
        from .report import printable

        session = self.config.stash[_KEY]
        result = run_law(session.port, self.law, session.results)
        for key, value in result.figures.items():
            self.user_properties.append((key, value))
        if result.figures:
            self.add_report_section("call", "pasd-verify figures",
                                    "\n".join(printable(f"{k}: {v}") for k, v in result.figures.items()))
        if result.status == "unchecked":
            pytest.skip(f"{self.law.name}: {printable(result.reason)}")
        if result.status == "failed":
            raise LawFailed(result)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, LawFailed):
            from .report import printable

            result = excinfo.value.args[0]
            return "\n".join([f"{result.law} does not hold: {result.says}",
                              *(f"  {printable(str(f))}" for f in result.failures)])
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, None, f"pasd-verify law {self.law.name}"


class PortNode(pytest.Collector):
    """The parent of the law items: their node ids read ``pasd-verify::<law>``, their JUnit class ``pasd-verify``."""

    def collect(self):
        return []


@pytest.hookimpl(tryfirst=True)  # before -k and -m deselect: the laws are items like any other
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    values, seed = port_settings(config)
    if not values:
        return
    from ..errors import PasdVerifyError

    config.stash[_KEY] = _Session(values, seed)
    try:
        from .laws import LAWS

        config.stash[_KEY].port  # every file read now: an unreadable one stops the session, naming it
    except PasdVerifyError as e:
        raise pytest.UsageError(f"pasd-verify: {e}") from e
    except ModuleNotFoundError as e:  # installed without its dependencies (pip --no-deps, a partial environment)
        raise pytest.UsageError(f"pasd-verify: checking a port needs the module {e.name!r}, which is not installed "
                                "here: install pasd-verify with its dependencies (pip install pasd-verify)") from e
    parent = PortNode.from_parent(session, name="pasd-verify", nodeid="pasd-verify")
    items.extend(LawItem.from_parent(parent, name=law.name, law=law) for law in LAWS)


def _port(request: pytest.FixtureRequest):
    session = request.config.stash.get(_KEY, None)
    if session is None:
        pytest.skip("no port configured: give --pasd-model and the port's files (or [tool.pasd-verify])")
    return session.port


@pytest.fixture(scope="session")
def pasd_port(request):
    """The configured port, read (skips the test when none is configured)."""
    return _port(request)


@pytest.fixture(scope="session")
def pasd_name_map(pasd_port):
    """The model's MHA -> SHA name map (under the checkpoint's names)."""
    return pasd_port.name_map


@pytest.fixture(scope="session")
def pasd_mha_model(pasd_port):
    """The MHA model with the MHA checkpoint."""
    if pasd_port.mha_path is None:
        pytest.skip("no MHA checkpoint: give --pasd-mha or a model folder with weights")
    return pasd_port.mha_model


@pytest.fixture(scope="session")
def pasd_sha_model(pasd_port):
    """The SHA model holding the port's SHA checkpoint (its heads renamed to ours), loaded strictly."""
    if pasd_port.artifacts.sha is None:
        pytest.skip("no SHA checkpoint: give --pasd-sha")
    return pasd_port.sha_model()


@pytest.fixture(scope="session")
def pasd_inputs(pasd_port, pasd_mha_model):
    """Two seeded inputs of the model's graph (the flat signature its kind exports), as name -> tensor dicts."""
    from ..kinds import kind_of
    from .laws import networks

    net = networks(pasd_port, pasd_mha_model)[0]
    graph = kind_of(net).graph(net)
    partner = pasd_port.partner_model()
    return [graph.feeds(sample, partner) for sample in pasd_port.samples_for(net, 2)]

