"""Plant one-line bugs (mutants) in a temporary copy of the repository and see whether the tests catch them.

Not part of CI (each mutant runs test files; a full run takes many CPU-minutes). Usage, from the repository root::

    python tools/mutate.py                      # every mutant in tools/mutants.py
    python tools/mutate.py --only F1 C2         # some of them
    python tools/mutate.py --list               # what they are
    python tools/mutate.py --json out.json      # also write the results

A mutant (see :class:`Mutant` in ``tools/mutants.py``) names a source file, a snippet that must occur exactly once in
it, its replacement, and stages of pytest arguments. The script copies the working tree (tracked and untracked
files, not ``.git``, virtual environments or caches) to a temporary directory, checks once that the unmutated copy
passes every stage, then for each mutant writes the mutated file, runs the stages in order with ``pytest -x`` under a
per-stage timeout and restores the file. A stage that fails *kills* the mutant (the later stages are skipped); a
mutant that passes every stage *survives*; a stage past its timeout counts as killed but is reported apart (a
mutant that makes a loop endless is caught, but a slow machine could be the cause). ``PYTHONPATH`` puts the copy first,
so the copy's ``kvcache_plugins`` is the one imported (checked before the run).

The kill rate is ``killed / mutants``. Results per mutant name the first stage that failed: stage 1 is, by
convention, the tests written for the behaviour, later stages the closest existing tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", ".mypy_cache", ".ruff_cache"}


def load_mutants(path: Path):
    spec = importlib.util.spec_from_file_location("mutants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module.MUTANTS


def check(mutants) -> None:
    """Every id unique, every snippet present exactly once in its file: fail before any test runs."""
    ids = [m.id for m in mutants]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SystemExit(f"duplicate mutant ids: {dup}")
    for m in mutants:
        text = (ROOT / m.file).read_text()
        found = text.count(m.original)
        if found != 1:
            raise SystemExit(f"mutant {m.id}: the snippet occurs {found} times in {m.file} (must be once): {m.original!r}")
        if m.original == m.replacement:
            raise SystemExit(f"mutant {m.id}: the replacement equals the original")


def copy_tree(dest: Path) -> None:
    def ignore(_dir: str, names: list[str]) -> list[str]:
        return [n for n in names if n in SKIP or n.startswith(".venv") or n.endswith(".egg-info")]

    shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def run_stage(work: Path, args: list[str], timeout: float) -> tuple[str, float, str]:
    """``("pass" | "fail" | "timeout", seconds, last lines of output)`` of ``pytest -x args`` in the copy."""
    env = dict(os.environ, PYTHONPATH=str(work) + os.pathsep + os.environ.get("PYTHONPATH", ""), CI="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return "timeout", time.monotonic() - start, out[-800:]
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-6:])
    return ("pass" if proc.returncode == 0 else "fail"), time.monotonic() - start, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=Path, default=ROOT / "tools" / "mutants.py")
    parser.add_argument("--only", nargs="*", help="mutant ids to run (default: all)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per stage (generous: a loaded machine)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the unmutated copy first")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--stages", type=int, help="run only the first N stages of each mutant")
    opts = parser.parse_args(argv)

    mutants = load_mutants(opts.mutants)
    if opts.only:
        unknown = sorted(set(opts.only) - {m.id for m in mutants})
        if unknown:
            raise SystemExit(f"unknown mutant ids {unknown}")
        mutants = [m for m in mutants if m.id in opts.only]
    check(mutants)
    if opts.stages is not None:
        mutants = [replace(m, stages=m.stages[: opts.stages]) for m in mutants]
    if opts.list:
        for m in mutants:
            print(f"{m.id:4} {m.file}: {m.note}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        work = Path(tmp)
        copy_tree(work)
        probe = subprocess.run(
            [sys.executable, "-c", "import kvcache_plugins; print(kvcache_plugins.__file__)"],
            cwd=work, env=dict(os.environ, PYTHONPATH=str(work)), capture_output=True, text=True,
        )
        if not probe.stdout.strip().startswith(str(work)):
            raise SystemExit(f"the copy's package is not the one imported: {probe.stdout.strip()} {probe.stderr}")
        if not opts.skip_baseline:
            for args in sorted({tuple(a) for m in mutants for a in m.stages}):
                status, secs, tail = run_stage(work, list(args), opts.timeout)
                print(f"baseline {' '.join(args)}: {status} ({secs:.0f} s)", flush=True)
                if status != "pass":
                    raise SystemExit(f"the unmutated copy does not pass {' '.join(args)}:\n{tail}")
        for m in mutants:
            path = work / m.file
            original = path.read_text()
            path.write_text(original.replace(m.original, m.replacement, 1))
            outcome, stage, secs_total, tail = "survived", None, 0.0, ""
            try:
                for i, args in enumerate(m.stages, 1):
                    status, secs, tail = run_stage(work, list(args), opts.timeout)
                    secs_total += secs
                    if status != "pass":
                        outcome, stage = ("killed" if status == "fail" else "timeout"), i
                        break
            finally:
                path.write_text(original)
            results.append(dict(
                id=m.id, file=m.file, note=m.note, outcome=outcome, stage=stage, seconds=round(secs_total, 1),
                output=tail if stage else "",
            ))
            where = f" by stage {stage}" if stage else ""
            print(f"{m.id:4} {outcome}{where} ({secs_total:.0f} s)  {m.note}", flush=True)

    killed = [r for r in results if r["outcome"] != "survived"]
    first = [r for r in killed if r["stage"] == 1]
    print(f"\nkilled {len(killed)} of {len(results)} ({100 * len(killed) / max(1, len(results)):.0f}%), "
          f"{len(first)} by stage 1 (the behaviour's own tests); timeouts: "
          f"{[r['id'] for r in results if r['outcome'] == 'timeout']}")
    survivors = [r for r in results if r["outcome"] == "survived"]
    for r in survivors:
        print(f"  survived {r['id']}: {r['file']}: {r['note']}")
    if opts.json:
        opts.json.write_text(json.dumps(results, indent=2) + "\n")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
