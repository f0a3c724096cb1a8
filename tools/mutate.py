"""Mutation testing of one module with mutmut 3, in minutes (docs/testing.md).

    .venv/bin/python tools/mutate.py MODULE [--children N] [--dir DIR] [MUTANT_GLOB ...]

MODULE names a [mutate:MODULE] section of setup.cfg: transforms, models, engine (the step and the loop),
trainer (the run, recipe, resume, signals, logs), evaluation; its `files` are the ones mutated. The
working tree (tracked and untracked files, not ignored ones) is copied to DIR (default:
<tmp>/vgg-mutmut/MODULE), where setup.cfg's [mutmut] section is narrowed to those files and to the tests
of that section; `mutmut run` runs there (its mutants/ folder never lands in the repo). It
ends with the figures and the mutants that were not killed. Then, in DIR:

    ../../path/to/.venv/bin/mutmut show vgg.data.batches.transforms.x_scaled_size__mutmut_3   # one mutant's diff

MUTANT_GLOB (e.g. 'vgg.data.batches.transforms.x_scaled_size__mutmut_*') re-runs only those mutants in an
existing DIR (no fresh copy), after a test was added: copy the changed test file over first.

mutmut runs, against a mutant, only the tests it saw reach the mutated function; it misses tests
whose work happens in a module-scoped fixture, in DataLoader workers or in subprocesses. After a
run, `--survivors` takes each surviving mutant of DIR in turn and runs all of the module's tests
against it (pytest in DIR/mutants with mutmut's own switch, MUTANT_UNDER_TEST=NAME, which the
subprocesses of the CLI tests inherit), plus those given with `--also`; it prints `killed NAME
(the first failing test)` or `SURVIVES NAME` a line:

    .venv/bin/python tools/mutate.py trainer --survivors --also tests/test_shards.py
"""

import argparse
import configparser
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULES = ("transforms", "models", "engine", "trainer", "evaluation")  # each a [mutate:MODULE] section of setup.cfg


def copy_tree(dest: Path) -> None:
    """The working tree as it is: tracked and untracked files that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the working tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def narrow_config(dest: Path, module: str) -> list[str]:
    """Rewrite DIR/setup.cfg so mutmut mutates the section's files only, against its tests."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(dest / "setup.cfg")
    section = f"mutate:{module}"
    if section not in config:
        sys.exit(f"error: setup.cfg has no [{section}] section")
    tests = [line for line in config[section]["tests"].splitlines() if line.strip()]
    config["mutmut"]["only_mutate"] = "\n" + "\n".join(module_files(config, module))
    config["mutmut"]["pytest_add_cli_args_test_selection"] = "\n" + "\n".join(tests)
    with open(dest / "setup.cfg", "w") as f:
        config.write(f)
    return tests


def module_files(config: configparser.ConfigParser, module: str) -> list[str]:
    return [line.strip() for line in config[f"mutate:{module}"]["files"].splitlines() if line.strip()]


def rerun_survivors(dest: Path, also: list[str]) -> int:
    """Every mutant of DEST that survived mutmut's run, against all the tests of its [mutate:...] section."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(dest / "setup.cfg")
    options = config["mutmut"]["pytest_add_cli_args"].split()
    tests = config["mutmut"]["pytest_add_cli_args_test_selection"].split("\n")
    tests = [line.strip() for line in tests if line.strip()]
    if "-k" in tests:  # the section's -k filter applies to its own tests; --also's run unfiltered, after
        at = tests.index("-k")
        tests, keyword = tests[:at], tests[at + 1:at + 2]
    else:
        keyword = []
    survivors = []
    for meta in sorted((dest / "mutants").rglob("*.meta")):
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        survivors += [name for name, code in exit_codes.items() if code == 0]
    print(f"{len(survivors)} surviving mutants in {dest}", flush=True)
    pytest = [sys.executable, "-m", "pytest", "-q", "-x", *options]
    runs = [[*tests, *(["-k", *keyword] if keyword else [])]] + ([also] if also else [])
    for name in survivors:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MUTANT_UNDER_TEST": name}
        failed = None
        for selection in runs:
            result = subprocess.run([*pytest, *selection], cwd=dest / "mutants", env=env, capture_output=True,
                                    text=True)
            if result.returncode != 0:
                failed = next((line.split()[1] for line in result.stdout.splitlines() if line.startswith("FAILED")),
                              f"pytest exit {result.returncode}")
                break
        print(f"killed {name} ({failed})" if failed else f"SURVIVES {name}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", choices=MODULES)
    parser.add_argument("mutants", nargs="*", help="mutant names or globs to (re-)run in an existing DIR")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default <tmp>/vgg-mutmut/MODULE)")
    parser.add_argument("--survivors", action="store_true",
                        help="re-run each surviving mutant in an existing DIR against all the module's tests")
    parser.add_argument("--also", nargs="*", default=[], help="more tests for --survivors (files or node ids)")
    args = parser.parse_intermixed_args()
    dest = (args.dir or Path(tempfile.gettempdir()) / "vgg-mutmut" / args.module).resolve()
    if args.survivors:
        return rerun_survivors(dest, args.also)
    if not args.mutants:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        copy_tree(dest)
        tests = narrow_config(dest, args.module)
        print(f"mutating {args.module} in {dest}; tests: {' '.join(tests)}", flush=True)
    mutmut = str(Path(sys.executable).parent / "mutmut")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MUTANT_UNDER_TEST", None)
    run = subprocess.run([mutmut, "run", "--max-children", str(args.children), *args.mutants], cwd=dest, env=env)
    if run.returncode != 0:
        print(f"error: mutmut run exited with {run.returncode}", file=sys.stderr)
        return 1
    subprocess.run([mutmut, "export-cicd-stats"], cwd=dest, env=env, check=True, capture_output=True)
    stats = json.loads((dest / "mutants" / "mutmut-cicd-stats.json").read_text())
    tested = stats["total"] - stats["skipped"]
    killed = stats["killed"] + stats["timeout"]
    print(f"\n{args.module}: {stats['total']} mutants, {killed} killed ({stats['timeout']} by timeout), "
          f"{stats['survived']} survived, {stats['no_tests']} without tests, {stats['suspicious']} suspicious, "
          f"{stats['skipped']} skipped: {100 * killed / max(tested, 1):.1f}% killed")
    print("\nnot killed (`mutmut show NAME` in the scratch folder shows the diff):")
    results = subprocess.run([mutmut, "results"], cwd=dest, env=env, check=True, capture_output=True, text=True)
    print(results.stdout, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
