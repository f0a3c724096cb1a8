"""Mutation testing of one module with mutmut 3, in minutes (docs/testing.md).

    .venv/bin/python tools/mutate.py MODULE [--children N] [--dir DIR] [MUTANT_GLOB ...]

MODULE is one of transforms, models, engine, trainer, evaluation (vgg/MODULE.py). The working tree
(tracked and untracked files, not ignored ones) is copied to DIR (default: <tmp>/vgg-mutmut/MODULE),
where setup.cfg's [mutmut] section is narrowed to vgg/MODULE.py and to the tests of its
[mutate:MODULE] section; `mutmut run` runs there (its mutants/ folder never lands in the repo). It
ends with the figures and the mutants that were not killed. Then, in DIR:

    ../../path/to/.venv/bin/mutmut show vgg.transforms.x_scaled_size__mutmut_3   # one mutant's diff

MUTANT_GLOB (e.g. 'vgg.transforms.x_scaled_size__mutmut_*') re-runs only those mutants in an
existing DIR (no fresh copy), after a test was added: copy the changed test file over first.
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
MODULES = ("transforms", "models", "engine", "trainer", "evaluation")


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
    """Rewrite DIR/setup.cfg so mutmut mutates vgg/MODULE.py only, against that module's tests."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(dest / "setup.cfg")
    section = f"mutate:{module}"
    if section not in config:
        sys.exit(f"error: setup.cfg has no [{section}] section")
    tests = [line for line in config[section]["tests"].splitlines() if line.strip()]
    config["mutmut"]["only_mutate"] = f"vgg/{module}.py"
    config["mutmut"]["pytest_add_cli_args_test_selection"] = "\n" + "\n".join(tests)
    with open(dest / "setup.cfg", "w") as f:
        config.write(f)
    return tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", choices=MODULES)
    parser.add_argument("mutants", nargs="*", help="mutant names or globs to (re-)run in an existing DIR")
    parser.add_argument("--children", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default <tmp>/vgg-mutmut/MODULE)")
    args = parser.parse_intermixed_args()
    dest = (args.dir or Path(tempfile.gettempdir()) / "vgg-mutmut" / args.module).resolve()
    if not args.mutants:
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        copy_tree(dest)
        tests = narrow_config(dest, args.module)
        print(f"mutating vgg/{args.module}.py in {dest}; tests: {' '.join(tests)}", flush=True)
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
    print(f"\nvgg/{args.module}.py: {stats['total']} mutants, {killed} killed ({stats['timeout']} by timeout), "
          f"{stats['survived']} survived, {stats['no_tests']} without tests, {stats['suspicious']} suspicious, "
          f"{stats['skipped']} skipped: {100 * killed / max(tested, 1):.1f}% killed")
    print("\nnot killed (`mutmut show NAME` in the scratch folder shows the diff):")
    results = subprocess.run([mutmut, "results"], cwd=dest, env=env, check=True, capture_output=True, text=True)
    print(results.stdout, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
