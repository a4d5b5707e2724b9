"""A port check's results as people and CI systems read them: a table, ``report.json`` and JUnit XML (one test case
per law; a failed law's keys in its failure message, an unchecked law skipped with the artifact it needs)."""

from __future__ import annotations

import json
import re
import unicodedata
import xml.etree.ElementTree as ET
from typing import Any

from .artifacts import LawResult, PortArtifacts

_SHOWN_FAILURES = 5

# Keys and messages come from other tools' files and can hold any character. On a terminal a control or format
# character moves the cursor, clears lines or reorders what follows (the command's error line escapes the same
# categories); XML 1.0 cannot hold most control characters, a NUL or a lone surrogate at all, so one such key made
# junit.xml not well-formed. Both show them as Python escapes instead.
_HIDDEN = ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _escape(char: str) -> str:
    return char.encode("unicode_escape", "backslashreplace").decode("ascii")


def printable(text: str) -> str:
    """``text`` with every control and format character (newlines and tabs too: a key is one field of one line)
    written as its Python escape."""
    return "".join(_escape(c) if unicodedata.category(c) in _HIDDEN else c for c in text)


def _xml_text(text: str) -> str:
    """``text`` as XML 1.0 can hold it: the characters it forbids written as their Python escapes."""
    return _NOT_XML.sub(lambda match: _escape(match.group()), text)


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def table(results: list[LawResult]) -> str:
    """One line per law: status, name, and the failures' keys or the figures; unchecked laws say what they need."""
    width = max(len(r.law) for r in results)
    lines = []
    for r in results:
        if r.status == "failed":
            detail = f"{len(r.failures)} failure(s)"
        elif r.status == "unchecked":
            detail = printable(r.reason)
        else:
            detail = ", ".join(printable(f"{k}={_figure(v)}") for k, v in r.figures.items()
                               if not isinstance(v, (dict, list)))
        lines.append(f"{r.status.upper():9}  {r.law:{width}}  {detail}")
        for failure in r.failures[:_SHOWN_FAILURES]:
            lines.append(f"{'':9}    {printable(str(failure))}")
        if len(r.failures) > _SHOWN_FAILURES:
            lines.append(f"{'':9}    ... and {len(r.failures) - _SHOWN_FAILURES} more (report.json lists every one)")
    return "\n".join(lines)


def verdict(results: list[LawResult]) -> dict[str, Any]:
    counts = {status: sum(r.status == status for r in results) for status in ("passed", "failed", "unchecked")}
    # holds: no checked law failed, and at least one was checked
    return {"holds": counts["failed"] == 0 and counts["passed"] > 0, **counts}


def report(results: list[LawResult], artifacts: PortArtifacts, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"verdict": verdict(results),
            "artifacts": {k: str(v) for k, v in vars(artifacts).items() if v is not None},
            **(extra or {}),
            "laws": [r.as_dict() for r in results]}


def junit_xml(results: list[LawResult], suite: str = "pasd-verify check") -> str:
    """JUnit XML, as CI systems (GitLab, Jenkins, GitHub's test reporters) read it."""
    counts = verdict(results)
    root = ET.Element("testsuites")
    node = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)), failures=str(counts["failed"]),
                         skipped=str(counts["unchecked"]), errors="0",
                         time=f"{sum(r.seconds for r in results):.3f}")
    for r in results:
        case = ET.SubElement(node, "testcase", classname="pasd_verify.port", name=r.law, time=f"{r.seconds:.3f}")
        props = ET.SubElement(case, "properties")
        for key, value in r.figures.items():
            ET.SubElement(props, "property", name=_xml_text(key), value=_xml_text(
                json.dumps(value) if isinstance(value, (dict, list)) else _figure(value)))
        if r.status == "failed":
            failure = ET.SubElement(case, "failure", message=f"{r.law}: {len(r.failures)} key(s) at fault")
            failure.text = "\n".join(_xml_text(str(f)) for f in r.failures)
        elif r.status == "unchecked":
            ET.SubElement(case, "skipped", message=_xml_text(r.reason))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
