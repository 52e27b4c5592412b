"""`make mutation`: a mutation score for the modules whose bugs the suite must catch.

For each module below, mutmut (pinned in the `mutation` extra) changes the code one small edit at a
time and runs only the tests that module answers to; a mutant that leaves them green "survived".
Each module runs in its own scratch folder, `.mutation/<module>/` (git-ignored), holding a snapshot of
app/, build/, tests/ and pyproject.toml (plus a `[tool.mutmut]` section written there, never into the
real pyproject.toml); mutmut then copies that snapshot into `mutants/` beside it, as it always does.
So an edit made to the working tree while a run is going on does not mix into it: the run reports the
commit and whether app/ or build/ had uncommitted changes when the snapshot was taken, and warns when
the module's source differs from its snapshot at the end (rerun that module then).

    .venv/bin/python tests/mutation/run.py                  # every module, then docs/testing.md
    .venv/bin/python tests/mutation/run.py batcher          # one module; the others keep their last result
    .venv/bin/python tests/mutation/run.py --workers 1 --no-doc preprocess

Results go to tests/mutation/results.json (one entry per module, replaced when that module reruns) and
docs/testing.md is rendered from it. Survivors are matched against tests/mutation/survivors.toml, which
says why each one that no test should kill is left alone; a survivor without an entry is listed as
"not explained" and makes the run exit 1, as does a module under the --goal score.

Score = (killed + timeout) / (mutants - skipped): a mutant whose tests hang is caught too (mutmut's own
formula). Runs under `nice -n 19` with --workers mutmut processes (default 2): the machine is shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
WORK = ROOT / ".mutation"
RESULTS = HERE / "results.json"
SURVIVORS = HERE / "survivors.toml"
DOC = ROOT / "docs" / "testing.md"


@dataclass(frozen=True)
class Module:
    path: str  # the file mutated
    tests: tuple[str, ...]  # the tests it answers to (mutmut runs, per mutant, those among them that reach the mutated function)
    # extra [tool.mutmut] settings: "forkserver" for tests that run torch (its OpenMP pool hangs in a
    # child forked after the parent used it), so each mutant forks from a process that ran no test
    mutmut: tuple[tuple[str, str], ...] = ()


MODULES: dict[str, Module] = {
    "preprocess": Module(
        "app/engine/preprocess.py",
        (
            "tests/serving/test_serve_preprocess.py",
            "tests/serving/test_serve_preprocess_mutants.py",
            "tests/serving/test_serve_limits.py",  # the memory budget's charge for a decode
        ),
    ),
    "batcher": Module(
        "app/engine/batcher.py",
        (
            "tests/serving/test_serve_batcher.py",
            "tests/serving/test_serve_batcher_mutants.py",
            "tests/serving/test_serve_devices.py",
        ),
    ),
    "manifest": Module(
        "app/engine/manifest.py",
        ("tests/serving/test_serve_config.py", "tests/serving/test_serve_manifest_mutants.py"),
    ),
    "scaling": Module(
        "build/scaling.py",
        (
            "tests/build_step/test_scaling.py",
            "tests/build_step/test_scaling_mutants.py",
            "tests/build_step/test_torchvision_compat.py::test_layout_count_equals_counting_the_real_modules",
        ),
        mutmut=(("process_isolation", '"forkserver"'),),
    ),
    "dataplane": Module(
        "app/engine/dataplane.py",
        (
            "tests/serving/test_serve_api.py",
            "tests/serving/test_serve_shutdown.py",
            "tests/serving/test_serve_dataplane_mutants.py",
            "tests/serving/test_serve_tracing.py",  # the spans and access-log fields the plane records
            "tests/family/test_routing.py",
            "tests/family/test_cascade.py",
            "tests/family/test_model_control.py",  # reloads: new work follows an entry's successor
        ),
    ),
}

# What the copy leaves out: caches, and test-repos built by earlier runs.
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache", ".cache", ".mutation", "mutants")


def sh(args: list[str], cwd: Path = ROOT, **kw) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True, **kw).stdout


def git_state() -> str:
    head = sh(["git", "rev-parse", "--short", "HEAD"]).strip()
    dirty = sh(["git", "status", "--porcelain", "app", "build"]).strip()
    return f"{head} with uncommitted changes" if dirty else head


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def tests_of(mod: Module) -> list[str]:
    missing = [t for t in mod.tests if not (ROOT / t.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"{mod.path}: test file(s) not found: {', '.join(missing)}")
    return list(mod.tests)


def prepare(name: str, mod: Module) -> Path:
    """A fresh scratch folder with a snapshot of the code and the tests, and mutmut's config for this module."""
    work = WORK / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for d in ("app", "build", "tests"):
        shutil.copytree(ROOT / d, work / d, ignore=IGNORE)
    config = f"""

# Written by tests/mutation/run.py for this scratch copy only.
[tool.mutmut]
source_paths = ["app", "build"]
only_mutate = {toml_list([mod.path])}
pytest_add_cli_args_test_selection = {toml_list(tests_of(mod))}
# No pytest cache in the snapshot. A mutant that hangs a test fails it after 15 s (pyproject's
# timeout is 600; no listed test takes 3 s), and mutmut's own limit is 5x the tests' measured time
# plus 5 s instead of 15x plus 15 s: hanging mutants of the batcher otherwise cost minutes each.
pytest_add_cli_args = ["-p", "no:cacheprovider", "--timeout=15"]
timeout_multiplier = 5.0
""" + "".join(f"{k} = {v}\n" for k, v in mod.mutmut)
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text(encoding="utf-8") + config, encoding="utf-8")
    return work


def mutmut(work: Path, *args: str, log=None, nice: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    cmd = (["nice", "-n", "19"] if nice else []) + [str(exe), *args]
    env = dict(os.environ)
    # The session-scoped model builds of tests/conftest.py reuse the checkout's cache (built from the
    # unmutated build step: only app/ modules are mutated while they are read). build/scaling.py's tests
    # build nothing; a private folder keeps any build of a mutated layout away from the shared cache.
    env["EFFNET_TEST_REPOS"] = str(ROOT / ".cache" / "test-repos") if not str(work).endswith("scaling") else str(work / "test-repos")
    env.setdefault("PYTHONHASHSEED", "0")
    return subprocess.run(cmd, cwd=work, env=env, text=True, stdout=log or subprocess.PIPE,
                          stderr=subprocess.STDOUT if log else subprocess.PIPE)


DIFF_LINE = re.compile(r"^([-+])(?![-+]{2} )(.*)$")


def changed_lines(diff: str) -> tuple[list[str], list[str]]:
    before, after = [], []
    for line in diff.splitlines():
        if line.startswith(("---", "+++")):
            continue
        m = DIFF_LINE.match(line)
        if m:
            (before if m.group(1) == "-" else after).append(m.group(2).strip())
    return before, after


def function_of(mutant: str) -> str:
    """app.engine.batcher.xǁBatcherǁreserve__mutmut_3 -> Batcher.reserve; ...x_open_image__mutmut_1 -> open_image."""
    last = mutant.rsplit(".", 1)[-1]
    last = re.sub(r"__mutmut_\d+$", "", last)
    if last.startswith("xǁ"):
        return ".".join(p for p in last[2:].split("ǁ") if p)
    return last[2:] if last.startswith("x_") else last


def run_module(name: str, mod: Module, workers: int) -> dict:
    source = ROOT / mod.path
    meta = {"commit": git_state(), "source_sha256": digest(source), "workers": workers, "tests": tests_of(mod),
            "date": dt.date.today().isoformat()}
    work = prepare(name, mod)
    started = time.monotonic()
    cmd = ["run", "--max-children", str(workers)]
    print(f"[{name}] mutmut {' '.join(cmd)} in {work.relative_to(ROOT)} (log: mutmut.log)", flush=True)
    with (work / "mutmut.log").open("w") as log:
        rc = mutmut(work, *cmd, log=log, nice=True).returncode
    meta["seconds"] = round(time.monotonic() - started)
    if rc != 0:
        tail = (work / "mutmut.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"[{name}] mutmut run failed (exit {rc}); the end of {work / 'mutmut.log'}:\n{tail}")
    (work / "run.json").write_text(json.dumps(meta, indent=1))
    return collect(name, mod)


def collect(name: str, mod: Module) -> dict:
    """The result of the finished run in .mutation/<name>: counts, and each mutant not killed with its diff."""
    work = WORK / name
    meta = json.loads((work / "run.json").read_text())
    mutmut(work, "export-cicd-stats")
    counts = json.loads((work / "mutants" / "mutmut-cicd-stats.json").read_text())
    survivors = []
    for line in mutmut(work, "results").stdout.splitlines():
        key, _, status = line.strip().rpartition(": ")
        if not key or status == "killed":
            continue
        diff = mutmut(work, "show", key).stdout
        old, new = changed_lines(diff)
        survivors.append({"mutant": key, "status": status, "function": function_of(key), "from": old, "to": new})
    tested = counts["total"] - counts["skipped"]
    caught = counts["killed"] + counts["timeout"]
    result = {
        "module": mod.path,
        "tests": meta["tests"],
        "command": f"nice -n 19 mutmut run --max-children {meta['workers']}  # in .mutation/{name}",
        "date": meta["date"],
        "commit": meta["commit"],
        "source_sha256": meta["source_sha256"],
        "mutmut": mutmut_version(),
        "seconds": meta["seconds"],
        "counts": counts,
        "score": round(100.0 * caught / tested, 1) if tested else 0.0,
        "survivors": survivors,
    }
    if digest(ROOT / mod.path) != meta["source_sha256"]:
        print(f"[{name}] WARNING: {mod.path} is not the code this run mutated (changed since); rerun this module", flush=True)
        result["stale"] = True
    print(f"[{name}] {caught}/{tested} caught ({result['score']}%), {len(survivors)} not killed, {meta['seconds']} s", flush=True)
    return result


def save(name: str, result: dict) -> dict:
    """Replace this module's entry in results.json, keeping the others as they are on disk now (another
    run of this script may have written one meanwhile)."""
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[name] = result
    RESULTS.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    return results


# --- explanations ----------------------------------------------------------------------------------


def load_notes() -> dict:
    return tomllib.loads(SURVIVORS.read_text(encoding="utf-8")) if SURVIVORS.exists() else {}


def glob(pattern: str, text: str) -> bool:
    """`*` matches anything; every other character only itself (mutated lines are full of brackets)."""
    return re.fullmatch(".*".join(re.escape(part) for part in pattern.split("*")), text, re.DOTALL) is not None


def explain(module: str, s: dict, rules: list[dict], used: set[int] | None = None) -> str | None:
    """The first rule of survivors.toml that matches: same module, function (glob), and the mutated
    line (glob on the stripped `+` line of `mutmut show`; `from` optionally on the `-` line)."""
    after, before = " | ".join(s["to"]), " | ".join(s["from"])
    for i, r in enumerate(rules):
        if r.get("module") != module:
            continue
        if not glob(r.get("function", "*"), s["function"]):
            continue
        if "to" in r and not glob(r["to"], after):
            continue
        if "from" in r and not glob(r["from"], before):
            continue
        if used is not None:
            used.add(i)
        return r["why"]
    return None


# --- the document ----------------------------------------------------------------------------------


def code(s: str) -> str:
    s = s if len(s) <= 150 else s[:147] + "..."
    return "`` " + s.replace("|", "\\|") + " ``" if "`" in s else "`" + s.replace("|", "\\|") + "`"


def render(results: dict, notes: dict) -> tuple[str, int]:
    rules = notes.get("explained", [])
    unexplained = 0
    out = [
        "# Testing: the mutation score",
        "",
        "<!-- Written by tests/mutation/run.py (make mutation) from tests/mutation/results.json and",
        "     tests/mutation/survivors.toml; edit those, not this file. -->",
        "",
        "A suite only protects the product if a wrong product turns it red. `make mutation` measures that",
        "for the modules where a silent bug costs the most: [mutmut](https://github.com/boxed/mutmut) makes",
        "one small change at a time (an operator, a constant, a condition, a dropped argument or statement),",
        "runs the module's own tests against each such *mutant*, and counts the mutants that no test notices.",
        "",
        "- Each module is mutated on its own, against only the tests listed for it, so the score says what",
        "  *those* tests pin down (mutmut runs, per mutant, the listed tests that reach the mutated function).",
        "- mutmut 3 mutates function and method bodies; module-level constants, class bodies (pydantic",
        "  fields) and decorated functions (pydantic validators, properties) are not mutated.",
        "- **score** = (killed + timeout) / (mutants - skipped): a mutant whose tests hang is caught too.",
        "- Not part of `make test` (about half an hour on 2 cores). Run it after changing one of these",
        "  modules: `make mutation`, or `.venv/bin/python tests/mutation/run.py MODULE` for one of them",
        "  (`--collect` re-reads finished runs, `--render-only` rewrites this file from results.json).",
        "- Each module runs in a snapshot of app/, build/ and tests/ in `.mutation/MODULE/` (git-ignored),",
        "  under `nice -n 19`, with pytest's per-test timeout at 15 s and mutmut's at 5x the tests' measured",
        "  time plus 5 s, so a mutant that hangs a test costs seconds; build/scaling.py's tests run torch, whose",
        "  thread pool hangs in a forked child, so mutmut forks those workers from a fork server instead.",
        "- A survivor is either killed by a new test or explained below (tests/mutation/survivors.toml).",
        "",
        "## Scores",
        "",
        "| module | mutants | killed | timeout | survived | other | score | run time | commit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    used: set[int] = set()
    for name in MODULES:
        r = results.get(name)
        if r is None:
            out.append(f"| `{MODULES[name].path}` | not run | | | | | | | |")
            continue
        c = r["counts"]
        other = c["total"] - c["killed"] - c["timeout"] - c["survived"]
        # Stale: the module's source is not the one that run mutated (whatever else changed since is not).
        stale = " (stale: the module changed since)" if r.get("stale") or digest(ROOT / r["module"]) != r["source_sha256"] else ""
        out.append(
            f"| `{r['module']}` | {c['total']} | {c['killed']} | {c['timeout']} | {c['survived']} | {other} |"
            f" **{r['score']}%** | {r['seconds']} s | {r['commit']}{stale} |"
        )
    out += ["", "\"other\": no tests reached the mutated code, suspicious, or segfault (listed with the survivors).",
            "\"commit\": HEAD when the module's snapshot was taken (\"with uncommitted changes\": app/ or build/ differed",
            "from it); a row is marked stale when the module's own file has changed since its run.", ""]
    for name in MODULES:
        r = results.get(name)
        if r is None:
            continue
        c = r["counts"]
        out += [
            f"## `{r['module']}`",
            "",
            f"mutmut {r['mutmut']}, {r['date']}, commit {r['commit']}, {r['seconds']} s (2 cores, shared).",
            "",
            "```sh",
            f".venv/bin/python tests/mutation/run.py {name}   # runs: {r['command']}",
            "```",
            "",
            "Tests: " + ", ".join(f"`{t}`" for t in r["tests"]) + ".",
            "",
            "| mutants | killed | timeout | survived | no tests | suspicious | skipped | score |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {c['total']} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['no_tests']} | {c['suspicious']} |"
            f" {c['skipped']} | **{r['score']}%** |",
            "",
        ]
        if not r["survivors"]:
            out += ["Every mutant was killed.", ""]
            continue
        out += [f"Not killed ({len(r['survivors'])}):", "", "| mutant | status | change | why it is left |", "| --- | --- | --- | --- |"]
        for s in r["survivors"]:
            why = explain(name, s, rules, used)
            if why is None:
                unexplained += 1
                why = "**not explained**"
            change = "; ".join(code(x) for x in s["from"]) + " → " + ("; ".join(code(x) for x in s["to"]) or "(removed)")
            short = s["mutant"].rsplit(".", 1)[-1]
            out.append(f"| `{short}` | {s['status']} | {change} | {why} |")
        out.append("")
    findings = notes.get("finding", [])
    if findings:
        out += ["## Found on the way", "", "Behaviour that writing these tests brought up; reported, not changed here.", ""]
        out += [f"- **{f['module']}**: {f['what']}" for f in findings]
        out.append("")
    for i, rule in enumerate(rules):
        if i not in used and rule.get("module") in results:
            print(f"note: survivors.toml rule for {rule['module']} {rule.get('function', '*')} ({rule.get('to', '')!r}) matched nothing")
    added = notes.get("added", [])
    if added:
        out += [
            "## Mutants killed by tests added for this score",
            "",
            "Survivors of the first runs that pointed at a real gap, and the test that now kills them.",
            "",
            "| module | test | what it kills |",
            "| --- | --- | --- |",
        ]
        for a in added:
            out.append(f"| {a['module']} | `{a['test']}` | {a['kills']} |")
        out.append("")
    return "\n".join(out), unexplained


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    ap.add_argument("--workers", type=int, default=2, help="mutmut processes (default 2)")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/testing.md")
    ap.add_argument("--render-only", action="store_true", help="rewrite docs/testing.md from results.json, run nothing")
    ap.add_argument("--collect", action="store_true",
                    help="read the finished runs in .mutation/ again instead of running mutmut (e.g. after editing survivors.toml)")
    ap.add_argument("--goal", type=float, default=80.0, help="exit 1 when a module scores below this (default 80)")
    args = ap.parse_args(argv)
    names = args.modules or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    started = time.monotonic()
    if not args.render_only:
        for name in names:
            if args.collect:
                save(name, collect(name, MODULES[name]))
            else:
                save(name, run_module(name, MODULES[name], args.workers))
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc, unexplained = render(results, load_notes())
    if not args.no_doc:
        DOC.write_text(doc + "\n", encoding="utf-8")
        print(f"wrote {DOC.relative_to(ROOT)}")
    low = [n for n in names if n in results and results[n]["score"] < args.goal]
    stale = [n for n in names if n in results and results[n].get("stale")]
    if not args.render_only:
        print(f"{len(names)} module(s) in {time.monotonic() - started:.0f} s")
    for n in low:
        print(f"{n}: {results[n]['score']}% is under the goal of {args.goal}%")
    if unexplained:
        print(f"{unexplained} survivor(s) not explained in {SURVIVORS.relative_to(ROOT)}")
    for n in stale:
        print(f"{n}: its source changed during the run; rerun it")
    return 1 if low or unexplained or stale else 0


if __name__ == "__main__":
    sys.exit(main())
