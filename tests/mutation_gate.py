"""The mutation score of the rewrite core, measured with mutmut 3.8.1 as ``[tool.mutmut]`` in pyproject.toml configures it.

    tox -- python tests/mutation_gate.py --all             every mutant (hours on 2 cores), each file's score
    tox -- python tests/mutation_gate.py --all --file sha.py   every mutant of one file (a run that fits a sitting)
    tox -- python tests/mutation_gate.py --all --file sha.py --pending   only those with no verdict yet: after an
                                           edit, mutmut resets the verdicts of the functions that changed alone
    tox -- python tests/mutation_gate.py --sample 10       10 seeded mutants per file (CI: minutes), gated
    tox -- python tests/mutation_gate.py --report          the scores of what mutants/ holds already; runs nothing

A file's score is (killed + timed out) / (mutants - equivalent): survivors and mutants no selected test reaches
count against it. Equivalent mutants (no test can tell them from the original, or they change only an error
message's wording) are listed in tests/mutation_equivalent.json, each by its function and the lines it changes
(not by mutmut's number, which moves whenever the function changes) with the reason it is equivalent. A listed
entry that matches no mutant any more is reported as stale.

``--all`` fails when a file is below its goal. A sample only estimates the score, so ``--sample`` fails a file when
its goal lies above the one-sided 95% (Clopper-Pearson) upper bound of the sample's score: a change that weakens the
tests fails CI, and a file whose true score meets its goal fails by sampling error with probability at most 5%. The
draw is seeded and the hypothesis profile is derandomized, so the same code always gets the same verdict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "mutation_equivalent.json"
# Issue 10: >= 95% on the module rewrite, >= 90% on the checkpoint and encodings rewrites (and the name map);
# issue 23: AdaRound's grid and the export's verdicts at the same 90%.
GOALS = {"sha.py": 0.95, "checkpoint.py": 0.90, "checkpoint_files.py": 0.90, "encodings.py": 0.90,
         "encodings_check.py": 0.90, "name_map.py": 0.90, "grid.py": 0.90, "agreement.py": 0.90,
         "localize.py": 0.90, "verdicts.py": 0.90}
KILLED, SURVIVED, TIMEOUT = "killed", "survived", "timeout"
ALPHA = 0.05  # the sampled gate's false-alarm rate at most, for a file exactly at its goal


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@dataclass
class FileScore:
    path: str
    verdicts: dict[str, str] = field(default_factory=dict)  # mutant name -> mutmut's status
    equivalent: set[str] = field(default_factory=set)
    changes: dict[str, tuple[str, str]] = field(default_factory=dict)  # lines removed/added, of each not killed

    @property
    def counted(self) -> dict[str, str]:
        return {name: status for name, status in self.verdicts.items()
                if name not in self.equivalent and status != "not checked"}

    @property
    def killed(self) -> int:
        return sum(status in (KILLED, TIMEOUT) for status in self.counted.values())

    @property
    def score(self) -> float:
        return self.killed / len(self.counted) if self.counted else float("nan")

    @property
    def upper_bound(self) -> float:
        """One-sided 95% Clopper-Pearson upper bound of the score this sample estimates: the score u at which
        killing at most this many of these mutants has probability 5%. Exact, so a file whose true score meets its
        goal fails the sampled gate with probability at most 5%."""
        n, k = len(self.counted), self.killed
        if not n:
            return float("nan")
        if k == n:
            return 1.0
        low, high = k / n, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if binomial_cdf(k, n, mid) > ALPHA else (low, mid)
        return high

    @property
    def goal(self) -> float:
        return GOALS[Path(self.path).name]


def generate_mutants(workers: int) -> None:
    """Write mutants/ as ``mutmut run`` does before it tests anything (mutmut has no command for this step alone)."""
    from mutmut.__main__ import (CatchOutput, copy_also_copy_files, copy_src_dir, create_mutants,
                                 setup_source_paths)
    from mutmut.mutation.trampoline import set_mutant_under_test

    set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    with CatchOutput(spinner_title="Generating mutants"):
        copy_src_dir()
        copy_also_copy_files()
        setup_source_paths()
        create_mutants(workers)


def mutants_by_file() -> dict[str, dict[str, str]]:
    """Every mutant of every configured file, with mutmut's status for it (``not checked`` before it ran)."""
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code
    from mutmut.utils.file_utils import walk_mutatable_files

    found = {}
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        found[str(path)] = {name: status_by_exit_code[code] for name, code in data.exit_code_by_key.items()}
    if not found:
        sys.exit("mutation gate: no mutants; is [tool.mutmut] only_mutate in pyproject.toml right?")
    return found


def draw(population: dict[str, dict[str, str]], per_file: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    chosen = []
    for path in sorted(population):
        names = sorted(population[path])
        chosen += rng.sample(names, min(per_file, len(names)))
    return chosen


def of_file(population: dict[str, dict[str, str]], file: str) -> set[str]:
    """Every mutant of the one configured file whose path ends with ``file`` (``sha.py``, ``checkpoint.py`` ...)."""
    paths = [path for path in population if f"/{path}".endswith(f"/{file}")]
    if len(paths) != 1:
        sys.exit(f"mutation gate: --file {file} matches {len(paths)} of the mutated files {sorted(population)}")
    return set(population[paths[0]])


def of_functions(names: set[str], functions: list[str]) -> set[str]:
    """The mutants of the named functions (``convert_to_sha``, or ``SHACLIPAttention.forward`` for a method), as
    mutmut names them (``x_convert_to_sha``, ``xǁSHACLIPAttentionǁforward``): a run over the code one change touched."""
    wanted = {"x" + ("ǁ" + f.replace(".", "ǁ") if "." in f else "_" + f) for f in functions}
    chosen = {n for n in names if function_of(n).rpartition(".")[2] in wanted}
    found = {function_of(n).rpartition(".")[2] for n in chosen}
    if found != wanted:
        sys.exit(f"mutation gate: no mutants of {sorted(wanted - found)} in this file")
    return chosen


def run_mutmut(names: list[str], workers: int) -> None:
    """mutmut's own run over these mutants, each worker with one thread (more would oversubscribe the cores)."""
    env = dict(os.environ, HYPOTHESIS_PROFILE="mutation", OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", "from mutmut.__main__ import cli; cli()", "run", "--max-children",
               str(workers), *names]
    done = subprocess.run(command, env=env)
    if done.returncode:
        sys.exit(f"mutation gate: mutmut run failed with exit code {done.returncode} (its output is above)")


def change_of(name: str, path: str) -> tuple[str, str]:
    """The lines a mutant removes and adds, as mutmut's diff of the function shows them."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    diff = get_diff_for_mutant(name, path=path).splitlines()[2:]  # after the ---/+++ header
    removed = "\n".join(line[1:].strip() for line in diff if line.startswith("-"))
    added = "\n".join(line[1:].strip() for line in diff if line.startswith("+"))
    return removed, added


def function_of(name: str) -> str:
    return name.rpartition("__mutmut_")[0]


def load_equivalent() -> list[dict]:
    entries = json.loads(EQUIVALENT.read_text())
    for i, entry in enumerate(entries):
        missing = {"function", "removed", "added", "why"} - entry.keys()
        if missing:
            sys.exit(f"mutation gate: {EQUIVALENT} entry {i} lacks {sorted(missing)}")
    return entries


def score(population: dict[str, dict[str, str]], names: set[str] | None) -> tuple[list[FileScore], list[dict]]:
    """Per-file scores over ``names`` (every mutant when None), survivors matched against the equivalent list."""
    entries = load_equivalent()
    used = set()
    scores = []
    for path, verdicts in sorted(population.items()):
        file_score = FileScore(path, {n: s for n, s in verdicts.items() if names is None or n in names})
        for name, status in file_score.verdicts.items():
            if status in (KILLED, TIMEOUT, "not checked"):
                continue
            removed, added = file_score.changes[name] = change_of(name, path)
            if status != SURVIVED:
                continue
            for i, entry in enumerate(entries):
                if (entry["function"], entry["removed"], entry["added"]) == (function_of(name), removed, added):
                    file_score.equivalent.add(name)
                    used.add(i)
        scores.append(file_score)
    stale = [entry for i, entry in enumerate(entries) if i not in used]
    return scores, stale


def report(scores: list[FileScore], stale: list[dict], sampled: bool) -> bool:
    ok = True
    print(f"\n{'file':<34} {'mutants':>7} {'run':>5} {'equiv':>5} {'killed':>6} {'score':>7} {'goal':>5}"
          + ("  upper bound" if sampled else ""))
    for s in scores:
        measured = s.upper_bound if sampled else s.score
        passed = bool(s.counted) and measured >= s.goal  # a file none of whose mutants ran proves nothing
        ok &= passed
        run = sum(status != "not checked" for status in s.verdicts.values())
        print(f"{s.path:<34} {len(s.verdicts):>7} {run:>5} {len(s.equivalent):>5} {s.killed:>6} {s.score:>7.1%} "
              f"{s.goal:>5.0%}" + (f"  {s.upper_bound:.1%}" if sampled else "") + ("" if passed else "  BELOW GOAL"))
    for s in scores:
        for name, status in sorted(s.counted.items()):
            if status not in (KILLED, TIMEOUT):
                removed, added = s.changes[name]
                print(f"\n{status}: {name}\n  - {removed.replace(chr(10), chr(10) + '  - ')}"
                      f"\n  + {added.replace(chr(10), chr(10) + '  + ')}")
    if not sampled:
        for entry in stale:
            print(f"\nstale equivalent entry (matches no surviving mutant): {entry['function']}: {entry['removed']!r}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--all", action="store_true", help="run every mutant; fail when a file is below its goal")
    mode.add_argument("--sample", type=int, metavar="K", help="run K seeded mutants per file; fail on a clear drop")
    mode.add_argument("--report", action="store_true", help="score what mutants/ holds; run nothing")
    parser.add_argument("--file", help="with --all: only this mutated file's mutants (its score alone)")
    parser.add_argument("--function", action="append", metavar="NAME",
                        help="with --all --file: only this function's mutants (repeatable; Class.method for a method)")
    parser.add_argument("--pending", action="store_true",
                        help="with --all --file: run only the mutants without a verdict in mutants/ (those of functions "
                             "changed since); the kept verdicts stay sound only where tests were added, not removed")
    parser.add_argument("--seed", type=int, default=0)
    # Each worker is a fork of a server that holds torch and the collected tests (measured: server 1.1 GB resident,
    # workers 0.7-0.8 GB, partly shared): more than four costs memory for little speed on a 40-mutant sample.
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 2, 4))
    args = parser.parse_args(argv)
    if args.file and not args.all:
        parser.error("--file goes with --all")
    if (args.pending or args.function) and not args.file:
        parser.error("--pending and --function go with --all --file")

    os.chdir(ROOT)  # mutmut reads pyproject.toml and writes mutants/ in the working directory
    if not args.report:
        generate_mutants(args.workers)
    population = mutants_by_file()
    names = None
    if args.sample is not None:
        names = set(draw(population, args.sample, args.seed))
        run_mutmut(sorted(names), args.workers)
    elif args.file:
        names = of_file(population, args.file)
        if args.function:
            names = of_functions(names, args.function)
        statuses = {n: s for verdicts in population.values() for n, s in verdicts.items()}
        chosen = [n for n in sorted(names) if not args.pending or statuses[n] == "not checked"]
        if chosen:  # mutmut given no names would run every file's pending mutants
            run_mutmut(chosen, args.workers)
    elif args.all:
        run_mutmut([], args.workers)
    scores, stale = score(mutants_by_file(), names)
    if args.file:  # the other files ran nothing: only this one has a score, and equivalents of others are not stale
        scores = [s for s in scores if s.verdicts]
        stale = [e for e in stale if any(function_of(n) == e["function"] for n in names)]
    return 0 if report(scores, stale, sampled=args.sample is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
