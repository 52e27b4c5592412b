"""`make mutation`: a mutation score for the modules whose bugs the suite must catch.

For each module below, mutmut (pinned in the `mutation` extra) changes the code one small edit at a
time and runs only the tests that module answers to; a mutant that leaves them green "survived".
Each module runs in its own scratch folder, `.mutation/<module>/` (git-ignored), holding a snapshot of
app/, build/, tests/ and pyproject.toml (plus a `[tool.mutmut]` section written there, never into the
real pyproject.toml); mutmut then copies that snapshot into `mutants/` beside it, as it always does.
So an edit made to the working tree while a run is going on does not mix into it.

Each result records what it measured: the sha256 of the module and of every test file it ran (as they
were in the snapshot), of the mutmut and pytest configuration, and mutmut's version. A row is "stale"
when any of them differs from the working tree now; docs/testing.md says so, naming what changed, and
the script exits 1 (`--render-only` too), so a score can never describe code or tests it did not run.
What is not fingerprinted: helpers and conftest.py files the tests import, and the rest of app/.

    .venv/bin/python tests/mutation/run.py                  # every module, then docs/testing.md
    .venv/bin/python tests/mutation/run.py batcher          # one module; the others keep their last result
    .venv/bin/python tests/mutation/run.py --workers 1 --no-doc preprocess

Results go to tests/mutation/results.json (one entry per module, replaced when that module reruns) and
the region of docs/testing.md between its `mutation:begin` / `mutation:end` markers is rendered from it
(the rest of that file is written by hand). Survivors are matched against tests/mutation/survivors.toml:
each entry names one mutant exactly and says whether it is "equivalent" (no correct test can kill it) or
"not tested yet" (a real gap, shown as such). A survivor without an entry is "not explained"; that, a
stale row, an entry that matches nothing in an up-to-date row, or a module under the --goal score makes
the script exit 1.

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
BEGIN, END = "<!-- mutation:begin -->", "<!-- mutation:end -->"  # the part of DOC this script writes
KINDS = ("equivalent", "not tested yet")


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
            "tests/serving/test_serve_answers.py",  # the inference thread's hooks and the room they free
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
            "tests/serving/test_serve_workers_link.py",  # the verbs as worker processes drive them
            "tests/serving/test_serve_reload_admission.py",  # waiting for room across a reload
        ),
    ),
    "answers": Module(
        "app/engine/link/answers.py",
        ("tests/serving/test_serve_answers.py", "tests/serving/test_serve_answers_races.py",
         "tests/serving/test_serve_workers_link.py"),
    ),
}

# What the copy leaves out: caches, and test-repos built by earlier runs.
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache", ".cache", ".mutation", "mutants")


def sh(args: list[str], cwd: Path = ROOT, **kw) -> str:
    return subprocess.run(args, cwd=cwd, check=True, capture_output=True, text=True, **kw).stdout


def git_state(paths: list[str]) -> str:
    """HEAD, and whether the measured files differed from it (the digests say exactly what was run)."""
    head = sh(["git", "rev-parse", "--short", "HEAD"]).strip()
    dirty = sh(["git", "status", "--porcelain", "--", *paths]).strip()
    return f"{head} with uncommitted changes" if dirty else head


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_files(tests) -> list[str]:
    """tests/a.py::test_x -> tests/a.py, each file once, in order."""
    return list(dict.fromkeys(t.split("::")[0] for t in tests))


def mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


INSTALLED = {"app": "effnet_serve", "build": "effnet_build"}


def installed_path(path: str) -> str:
    """app/engine/batcher.py -> effnet_serve/engine/batcher.py: where the scratch copy holds it."""
    top, _, rest = path.partition("/")
    return f"{INSTALLED.get(top, top)}/{rest}"


def toml_list(items) -> str:
    return "[" + ", ".join(json.dumps(str(i)) for i in items) + "]"


def tests_of(mod: Module) -> list[str]:
    missing = [t for t in mod.tests if not (ROOT / t.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"{mod.path}: test file(s) not found: {', '.join(missing)}")
    return list(mod.tests)


def mutmut_config(mod: Module) -> str:
    """The [tool.mutmut] section a module's scratch pyproject.toml gets."""
    return f"""

# Written by tests/mutation/run.py for this scratch copy only.
[tool.mutmut]
source_paths = ["effnet_serve", "effnet_build"]
only_mutate = {toml_list([installed_path(mod.path)])}
pytest_add_cli_args_test_selection = {toml_list(tests_of(mod))}
# No pytest cache in the snapshot. A mutant that hangs a test fails it after 15 s (pyproject's
# timeout is 600; no listed test takes 3 s), and mutmut's own limit is 5x the tests' measured time
# plus 5 s instead of 15x plus 15 s: hanging mutants of the batcher otherwise cost minutes each.
pytest_add_cli_args = ["-p", "no:cacheprovider", "--timeout=15"]
timeout_multiplier = 5.0
""" + "".join(f"{k} = {v}\n" for k, v in mod.mutmut)


def config_digest(mod: Module, root: Path = ROOT) -> str:
    """What, besides the code and the tests, decides which mutant is killed: the mutmut section above and
    pyproject's pytest settings (the rest of pyproject.toml, dependencies included, is not counted)."""
    pytest_ini = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"].get("pytest", {})
    text = mutmut_config(mod) + json.dumps(pytest_ini, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fingerprint(mod: Module, root: Path = ROOT) -> dict:
    """The digests a result is checked against: the module, each test file, the configuration (of the checkout,
    or of a scratch copy, which holds the module under its installed name)."""
    source = root / mod.path if root == ROOT else root / installed_path(mod.path)
    return {
        "source_sha256": digest(source),
        "tests_sha256": {t: digest(root / t) for t in test_files(mod.tests)},
        "config_sha256": config_digest(mod, root),
    }


def stale_reasons(name: str, r: dict) -> list[str]:
    """Why a recorded result no longer describes the working tree; empty when it does."""
    mod = MODULES[name]
    if not r.get("tests_sha256") or not r.get("config_sha256"):
        return ["measured before run.py recorded the digests of its tests and configuration"]
    reasons = []
    if r["module"] != mod.path:
        reasons.append(f"the module is now {mod.path}, not {r['module']}")
    elif not (ROOT / mod.path).exists() or digest(ROOT / mod.path) != r["source_sha256"]:
        reasons.append(f"{mod.path} changed")
    if list(r["tests"]) != list(mod.tests):
        reasons.append("the test selection changed (now: " + ", ".join(mod.tests) + ")")
    for t, d in r["tests_sha256"].items():
        if not (ROOT / t).exists():
            reasons.append(f"{t} is gone")
        elif digest(ROOT / t) != d:
            reasons.append(f"{t} changed")
    if config_digest(mod) != r["config_sha256"]:
        reasons.append("the mutmut/pytest configuration changed")
    if mutmut_version() != r["mutmut"]:
        reasons.append(f"mutmut is now {mutmut_version()}, not {r['mutmut']}")
    return reasons


def prepare(name: str, mod: Module) -> Path:
    """A fresh scratch folder with a snapshot of the code and the tests, and mutmut's config for this module."""
    work = WORK / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    # The code under its installed names (pyproject.toml: app/ is effnet_serve, build/ is effnet_build), as
    # the tests import it: mutmut keys each mutant by the module name it is imported under.
    for d in ("app", "build", "tests"):
        shutil.copytree(ROOT / d, work / INSTALLED.get(d, d), ignore=IGNORE)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    (work / "pyproject.toml").write_text(text + mutmut_config(mod), encoding="utf-8")
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
    tests = tests_of(mod)
    meta = {"commit": git_state([mod.path, *test_files(tests)]), "workers": workers, "tests": tests,
            "date": dt.date.today().isoformat()}
    work = prepare(name, mod)
    meta |= fingerprint(mod, work)  # of the copy mutmut runs, whatever the tree does meanwhile
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
        "tests_sha256": meta.get("tests_sha256"),  # absent from a run made before they were recorded: stale
        "config_sha256": meta.get("config_sha256"),
        "mutmut": mutmut_version(),
        "seconds": meta["seconds"],
        "counts": counts,
        "score": round(100.0 * caught / tested, 1) if tested else 0.0,
        "survivors": survivors,
    }
    for reason in stale_reasons(name, result):
        print(f"[{name}] WARNING: {reason} since the snapshot was taken: this result is stale; rerun {name}", flush=True)
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
    notes = tomllib.loads(SURVIVORS.read_text(encoding="utf-8")) if SURVIVORS.exists() else {}
    for r in notes.get("survivor", []):
        missing = {"module", "mutant", "from", "to", "kind", "why"} - set(r)
        if missing or r["kind"] not in KINDS:
            raise SystemExit(f"{SURVIVORS.relative_to(ROOT)}: entry {r.get('mutant', r)} needs module, mutant, from, to,"
                             f" why and a kind out of {KINDS} (missing: {', '.join(sorted(missing)) or 'none'})")
    return notes


def short(mutant: str) -> str:
    """app.engine.batcher.xǁBatcherǁ_collect__mutmut_19 -> xǁBatcherǁ_collect__mutmut_19"""
    return mutant.rsplit(".", 1)[-1]


def explain(module: str, s: dict, rules: list[dict], used: set[int]) -> dict | None:
    """The survivors.toml entry for this very mutant: same module and mutant name, and the same diff
    (`from`: the removed lines, `to`: the added ones, stripped, joined with " | "). A mutant renumbered
    or rewritten by a change to its function matches no entry, and is looked at again."""
    for i, r in enumerate(rules):
        if (r["module"], r["mutant"], r["from"], r["to"]) == (module, short(s["mutant"]), " | ".join(s["from"]), " | ".join(s["to"])):
            used.add(i)
            return r
    return None


# --- the document ----------------------------------------------------------------------------------


def code(s: str) -> str:
    s = s if len(s) <= 150 else s[:147] + "..."
    return "`` " + s.replace("|", "\\|") + " ``" if "`" in s else "`" + s.replace("|", "\\|") + "`"


@dataclass
class Verdict:
    """What rendering found, for the exit status and the summary."""
    stale: dict[str, list[str]]
    unexplained: int  # in up-to-date rows (a stale row's survivors wait for its rerun)
    gaps: list[str]
    unused: list[str]


def render(results: dict, notes: dict) -> tuple[str, Verdict]:
    """The part of docs/testing.md between the markers."""
    rules = notes.get("survivor", [])
    verdict = Verdict({}, 0, [], [])
    out = [
        BEGIN,
        "<!-- Written by tests/mutation/run.py (make mutation) from tests/mutation/results.json and",
        "     tests/mutation/survivors.toml; edit those, not the text between these markers. -->",
        "",
        "## The mutation score",
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
        "- Each row records the sha256 of the module, of each test file it ran and of the mutmut/pytest",
        "  configuration. A row whose module, tests or configuration differ now is marked **stale** with what",
        "  changed, and `tests/mutation/run.py` (`--render-only` too) exits 1 until that module is rerun.",
        "  Not fingerprinted: conftest.py and helper modules the tests import, and the rest of app/.",
        "- Every survivor is either killed by a new test or has an entry in tests/mutation/survivors.toml",
        "  naming that mutant exactly, of one of two kinds: **equivalent** (no correct test can tell it from",
        "  the code: the reason is given) or **not tested yet** (a real gap, counted against the score).",
        "- Not part of `make test` (about half an hour on 2 cores). Run it after changing one of these",
        "  modules or their tests: `make mutation`, or `.venv/bin/python tests/mutation/run.py MODULE` for one",
        "  (`--collect` re-reads finished runs, `--render-only` rewrites this part from results.json).",
        "- Each module runs in a snapshot of app/, build/ and tests/ in `.mutation/MODULE/` (git-ignored),",
        "  under `nice -n 19`, with pytest's per-test timeout at 15 s and mutmut's at 5x the tests' measured",
        "  time plus 5 s, so a mutant that hangs a test costs seconds; build/scaling.py's tests run torch, whose",
        "  thread pool hangs in a forked child, so mutmut forks those workers from a fork server instead.",
        "",
        "### Scores",
        "",
        "| module | mutants | killed | timeout | survived | other | score | equivalent | not tested yet | run time | measured |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    used: set[int] = set()
    tables: list[str] = []
    for name in MODULES:
        r = results.get(name)
        if r is None:
            out.append(f"| `{MODULES[name].path}` | not run | | | | | | | | | |")
            continue
        reasons = stale_reasons(name, r)
        if reasons:
            verdict.stale[name] = reasons
        c = r["counts"]
        other = c["total"] - c["killed"] - c["timeout"] - c["survived"]
        rows, kinds = [], {k: 0 for k in KINDS}
        for s in r["survivors"]:
            change = "; ".join(code(x) for x in s["from"]) + " → " + ("; ".join(code(x) for x in s["to"]) or "(removed)")
            if s["status"] == "timeout":  # caught (its tests hung past mutmut's limit): nothing to explain
                kind, why = "caught (timeout)", "Its tests ran past mutmut's time limit: counted as caught."
            else:
                rule = explain(name, s, rules, used)
                if rule is None:
                    verdict.unexplained += 0 if reasons else 1
                    kind, why = "**not explained**", "No entry in tests/mutation/survivors.toml."
                else:
                    kinds[rule["kind"]] += 1
                    kind, why = rule["kind"] if rule["kind"] == "equivalent" else f"**{rule['kind']}**", rule["why"]
                    if rule["kind"] == "not tested yet":
                        verdict.gaps.append(f"{name} {short(s['mutant'])}")
            rows.append(f"| `{short(s['mutant'])}` | {s['status']} | {change} | {kind} | {why} |")
        state = f"**stale**: {'; '.join(reasons)}" if reasons else "matches the code"
        out.append(
            f"| `{r['module']}` | {c['total']} | {c['killed']} | {c['timeout']} | {c['survived']} | {other} |"
            f" **{r['score']}%** | {kinds['equivalent']} | {kinds['not tested yet']} | {r['seconds']} s |"
            f" {r['date']}, {r['commit']}; {state} |"
        )
        tables += [
            f"### `{r['module']}`",
            "",
            f"mutmut {r['mutmut']}, {r['date']}, commit {r['commit']}, {r['seconds']} s (2 cores, shared)."
            + (f" **Stale**: {'; '.join(reasons)}." if reasons else ""),
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
        if rows:
            tables += [f"Not killed ({len(rows)}):", "", "| mutant | status | change | kind | why |",
                       "| --- | --- | --- | --- | --- |", *rows, ""]
        else:
            tables += ["Every mutant was killed.", ""]
    out += [
        "",
        "\"other\": no tests reached the mutated code, suspicious, or segfault (listed with the survivors).",
        "\"measured\": the date, and HEAD when the module's snapshot was taken (\"with uncommitted changes\": the",
        "module or its tests differed from it; the digests recorded are those of the files that ran).",
        "",
    ]
    if verdict.gaps:  # not hidden among the equivalents: each is behaviour no test checks yet
        out += ["**Known gaps** (survivors not tested yet): " + ", ".join(f"`{g}`" for g in verdict.gaps) + ".", ""]
    out += tables
    # An entry that matches nothing in an up-to-date row explains nothing any more. (A stale row's
    # survivors are not the code's: its entries wait for the rerun.)
    for i, rule in enumerate(rules):
        if i not in used and rule["module"] in results and rule["module"] not in verdict.stale:
            verdict.unused.append(f"{rule['module']} {rule['mutant']}")
    findings = notes.get("finding", [])
    if findings:
        out += ["### Found on the way", "", "Behaviour that writing these tests brought up.", ""]
        out += [f"- **{f['module']}**: {f['what']}" for f in findings]
        out.append("")
    added = notes.get("added", [])
    if added:
        out += [
            "### Mutants killed by tests added for this score",
            "",
            "Survivors of earlier runs that pointed at a real gap, and the test that now kills them.",
            "",
            "| module | test | what it kills |",
            "| --- | --- | --- |",
        ]
        for a in added:
            out.append(f"| {a['module']} | `{a['test']}` | {a['kills']} |")
        out.append("")
    out.append(END)
    return "\n".join(out), verdict


def write_doc(region: str) -> None:
    """Replace the marked region of docs/testing.md; the rest of the file is hand-written and kept."""
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{DOC.relative_to(ROOT)} needs exactly one {BEGIN} ... {END} region for run.py to write")
    before, rest = text.split(BEGIN)
    after = rest.split(END, 1)[1]
    DOC.write_text(before + region + after, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    ap.add_argument("--workers", type=int, default=2, help="mutmut processes (default 2)")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/testing.md")
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite docs/testing.md from results.json, run nothing; exit 1 on a stale row")
    ap.add_argument("--collect", action="store_true",
                    help="read the finished runs in .mutation/ again instead of running mutmut (e.g. after editing survivors.toml)")
    ap.add_argument("--goal", type=float, default=80.0, help="exit 1 when a module scores below this (default 80)")
    args = ap.parse_args(argv)
    names = args.modules or list(MODULES)
    unknown = [n for n in names if n not in MODULES]
    if unknown:
        ap.error(f"unknown module(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    started = time.monotonic()
    notes = load_notes()  # a malformed survivors.toml stops us before a half-hour run, not after it
    if not args.render_only:
        for name in names:
            if args.collect:
                save(name, collect(name, MODULES[name]))
            else:
                save(name, run_module(name, MODULES[name], args.workers))
        print(f"{len(names)} module(s) in {time.monotonic() - started:.0f} s")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    region, v = render(results, notes)
    if not args.no_doc:
        write_doc(region)
        print(f"wrote {DOC.relative_to(ROOT)}")
    low = [n for n in names if n in results and results[n]["score"] < args.goal]
    for n in low:
        print(f"{n}: {results[n]['score']}% is under the goal of {args.goal}%")
    for n, reasons in v.stale.items():
        print(f"{n}: stale ({'; '.join(reasons)}); rerun: .venv/bin/python tests/mutation/run.py {n}")
    if v.unexplained:
        print(f"{v.unexplained} survivor(s) not explained in {SURVIVORS.relative_to(ROOT)}")
    for u in v.unused:
        print(f"{SURVIVORS.relative_to(ROOT)}: the entry for {u} matches no survivor of its (up-to-date) row: delete it")
    if v.gaps:
        print(f"{len(v.gaps)} survivor(s) not tested yet (known gaps): {', '.join(v.gaps)}")
    return 1 if low or v.stale or v.unexplained or v.unused else 0


if __name__ == "__main__":
    sys.exit(main())
