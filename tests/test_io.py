"""Output folders: one run's outputs as a set, nothing left by a failure, every location checked before work."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest

from pasd_verify.errors import OutputFolderError, PasdVerifyError
from pasd_verify.io import private_folder, read_manifest, refuse_overwriting_inputs, staged_outputs, write_json

NAMES = ("a.bin", "b.json", "c")


def test_a_successful_run_replaces_the_whole_set_and_keeps_other_files(tmp_path):
    (tmp_path / "a.bin").write_text("old a")
    (tmp_path / "b.json").write_text("old b: this run writes no b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "inside").write_text("old c")
    (tmp_path / "notes.txt").write_text("the user's")
    with staged_outputs(tmp_path, NAMES) as staging:
        (staging / "a.bin").write_text("new a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "notes.txt"]
    assert (tmp_path / "a.bin").read_text() == "new a"


def test_a_failed_run_changes_nothing_and_removes_the_folders_it_made(tmp_path):
    (tmp_path / "a.bin").write_text("old a")
    with pytest.raises(RuntimeError), staged_outputs(tmp_path, NAMES) as staging:
        (staging / "a.bin").write_text("new a")
        raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"] and (tmp_path / "a.bin").read_text() == "old a"
    deep = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(KeyboardInterrupt), staged_outputs(deep, NAMES) as staging:
        (staging / "a.bin").write_text("new a")
        raise KeyboardInterrupt
    assert not (tmp_path / "new").exists()


def test_folders_of_a_dead_process_are_swept_and_a_living_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = tmp_path / f".pasd-verify-{int(dead.stdout)}-abc"
    gone.mkdir()
    (gone / "model.onnx").write_text("half a run")
    alive = tmp_path / f".pasd-verify-{os.getppid()}-def"
    alive.mkdir()
    with staged_outputs(tmp_path, NAMES):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name]
    with private_folder("pasd-verify-htp-", tmp_path) as mine:
        assert mine.name.startswith(f"pasd-verify-htp-{os.getpid()}-")
    assert not mine.exists()


def test_output_locations_are_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(PasdVerifyError, match="file: is a file, not a folder"):
        refuse_overwriting_inputs(tmp_path / "file", NAMES, [])
    with pytest.raises(PasdVerifyError, match="file: is a file, not a folder"):
        refuse_overwriting_inputs(tmp_path / "file" / "below", NAMES, [])
    (tmp_path / "a.bin").write_text("an input")
    with pytest.raises(PasdVerifyError, match="a.bin: an output would overwrite this input"):
        refuse_overwriting_inputs(tmp_path, NAMES, [tmp_path / "a.bin"])
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    with pytest.raises(PasdVerifyError, match="dangling: a broken symbolic link"):
        refuse_overwriting_inputs(tmp_path / "dangling" / "out", NAMES, [])


@contextlib.contextmanager
def undeletable(path):
    """``path`` made impossible to remove: immutable (chattr +i, which holds for root too), or where that is not
    allowed, its folder made read-only (which holds for anyone but root)."""
    pinned = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
    mode = path.parent.stat().st_mode
    if not pinned:
        os.chmod(path.parent, 0o555)
        if os.access(path.parent, os.W_OK):
            os.chmod(path.parent, mode)
            pytest.skip("neither chattr +i nor a read-only folder can stop this user removing a file")
    try:
        yield
    finally:
        if pinned:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        else:
            os.chmod(path.parent, mode)


def test_a_command_replaces_only_what_its_manifest_says_it_wrote(tmp_path):
    with staged_outputs(tmp_path, NAMES, command="demo") as staging:
        (staging / "a.bin").write_text("first a")
        (staging / "c").mkdir()
        (staging / "c" / "inside").write_text("first c")
    assert read_manifest(tmp_path) == {"a.bin": None, "c": ["inside"]}
    # the command's own outputs are replaced on a rerun; b.json, which it never wrote, is the user's: refused, naming it
    (tmp_path / "b.json").write_text("the user's own")
    with pytest.raises(OutputFolderError, match=r"b\.json: this run would replace it, and no earlier `pasd-verify"):
        refuse_overwriting_inputs(tmp_path, NAMES, [], command="demo")
    (tmp_path / "b.json").unlink()
    # a file the user put into one of the command's folders is theirs too
    (tmp_path / "c" / "notes.txt").write_text("the user's own")
    with pytest.raises(OutputFolderError, match=r"c: this run would replace this folder, which holds entries no "
                                                r"earlier `pasd-verify demo` wrote \(notes\.txt\)"):
        refuse_overwriting_inputs(tmp_path, NAMES, [], command="demo")
    (tmp_path / "c" / "notes.txt").unlink()
    with staged_outputs(tmp_path, NAMES, command="demo") as staging:
        (staging / "a.bin").write_text("second a")
    assert (tmp_path / "a.bin").read_text() == "second a" and not (tmp_path / "c").exists()
    assert read_manifest(tmp_path) == {"a.bin": None}


def test_a_users_folder_in_the_way_is_refused_before_any_work_and_kept(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "thesis.tex").write_text("a year of work")
    with pytest.raises(OutputFolderError, match="c: this run would replace it"):
        refuse_overwriting_inputs(tmp_path, NAMES, [], command="demo")
    # and if it appears while the command runs, the outputs do not move either
    (tmp_path / "c" / "thesis.tex").unlink()
    (tmp_path / "c").rmdir()
    with pytest.raises(OutputFolderError, match="c: this run would replace it"), \
            staged_outputs(tmp_path, NAMES, command="demo") as staging:
        (staging / "a.bin").write_text("new a")
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "thesis.tex").write_text("a year of work")
    assert (tmp_path / "c" / "thesis.tex").read_text() == "a year of work" and not (tmp_path / "a.bin").exists()


def test_an_undeletable_old_output_is_refused_before_anything_is_replaced(tmp_path):
    with staged_outputs(tmp_path, NAMES, command="demo") as staging:
        (staging / "a.bin").write_text("old a")
        (staging / "c").mkdir()
        (staging / "c" / "inside").write_text("old c")
    with undeletable(tmp_path / "c" / "inside"):
        with pytest.raises(OutputFolderError, match="c/inside: this run would replace .*c and cannot remove it"):
            refuse_overwriting_inputs(tmp_path, NAMES, [], command="demo")
        with pytest.raises(OutputFolderError, match="cannot remove it"), \
                staged_outputs(tmp_path, NAMES, command="demo") as staging:
            (staging / "a.bin").write_text("new a")
        assert (tmp_path / "a.bin").read_text() == "old a" and (tmp_path / "c" / "inside").read_text() == "old c"


def _no_constant(word):
    raise AssertionError(f"{word} is not JSON")


def test_write_json_writes_strict_json_naming_non_finite_floats(tmp_path):
    write_json(tmp_path / "r.json", {"sqnr_db": math.inf, "worst": [-math.inf, math.nan], "ok": (1.5, 0), "n": None})
    body = json.loads((tmp_path / "r.json").read_text(), parse_constant=_no_constant)
    assert body == {"sqnr_db": "Infinity", "worst": ["-Infinity", "NaN"], "ok": [1.5, 0], "n": None}
    assert float(body["sqnr_db"]) == math.inf and math.isnan(float(body["worst"][1]))
