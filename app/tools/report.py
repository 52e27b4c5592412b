"""`effnet report`: accuracy against MACs (and latency) for every model in a repository.

Reads each model's manifest (reference accuracy from the weights' publisher, measured
accuracy from `effnet eval`) and, optionally, a benchmark JSON:

    {
      "device": "2-core x86 CPU, onnxruntime 1.x",      # optional, shown in the report
      "batch": 1,                                      # optional
      "models": {
        "lite0": {"p50_ms": 9.8, "p95_ms": 12.1, "img_per_s": 101.0},
        "b0":    {"p50_ms": 14.2, "p95_ms": 17.9, "img_per_s": 70.4}
      }
    }

`p50_ms` is required per model, `p95_ms` and `img_per_s` are optional. Writes
`accuracy_vs_macs.png`, `accuracy_vs_latency.png` (with a benchmark) and `accuracy.md`
into the output folder. Random-weight models are listed in the table as plumbing only and
never plotted as accuracy points.

matplotlib is imported only here, inside the functions (the optional `report` extra).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..engine.manifest import MANIFEST_FILE, ManifestError, load_manifest

MACS_PNG = "accuracy_vs_macs.png"
LATENCY_PNG = "accuracy_vs_latency.png"
MARKDOWN = "accuracy.md"


class ReportError(Exception):
    """The report cannot be made from what was given."""


@dataclass
class Row:
    name: str
    family: str
    variant: str
    crop: int
    params: int
    macs: int
    pretrained: bool
    weights_source: str
    ref_top1: float | None
    ref_top5: float | None
    ref_source: str | None
    m_top1: float | None
    m_top5: float | None
    m_top1_ci: list[float] | None
    m_top5_ci: list[float] | None
    m_dataset: str | None
    m_size: int | None
    m_date: str | None
    m_errors: int | None
    p50_ms: float | None = None
    p95_ms: float | None = None
    img_per_s: float | None = None


def _ci(v) -> list[float] | None:
    return [float(v[0]), float(v[1])] if isinstance(v, (list, tuple)) and len(v) == 2 else None


def collect(repo: Path) -> tuple[list[Row], list[str]]:
    """Every model folder's facts, sorted by MACs; plus a message per folder that could not be read."""
    if not repo.is_dir():
        raise ReportError(f"{repo} is not a model repository (no such folder)")
    rows, skipped = [], []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / MANIFEST_FILE).is_file():
            continue
        try:
            m = load_manifest(folder)
        except ManifestError as exc:
            skipped.append(f"{folder.name}: {exc}")
            continue
        ref, meas = m.accuracy.reference, m.accuracy.measured
        rows.append(Row(
            name=m.name, family=m.family, variant=m.variant, crop=m.preprocess.crop, params=m.params, macs=m.macs,
            pretrained=m.weights.pretrained, weights_source=m.weights.source,
            ref_top1=ref.top1 if ref else None, ref_top5=ref.top5 if ref else None, ref_source=ref.source if ref else None,
            m_top1=meas.top1 if meas else None, m_top5=meas.top5 if meas else None,
            m_top1_ci=_ci(meas.top1_ci95) if meas else None, m_top5_ci=_ci(meas.top5_ci95) if meas else None,
            m_dataset=meas.dataset if meas else None, m_size=meas.size if meas else None,
            m_date=meas.date if meas else None, m_errors=getattr(meas, "errors", None) if meas else None,
        ))
    rows.sort(key=lambda r: (r.macs, r.name))
    return rows, skipped


def read_bench(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read the benchmark JSON {path}: {exc}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ReportError(f'{path}: expected {{"models": {{"<name>": {{"p50_ms": .., "p95_ms": .., "img_per_s": ..}}}}}}')
    usable, untimed = {}, []
    for name, entry in models.items():
        if not isinstance(entry, dict):
            raise ReportError(f"{path}: models.{name} must be an object")
        for key in ("p50_ms", "p95_ms", "img_per_s"):
            v = entry.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ReportError(f"{path}: models.{name}.{key} must be a number")
        if entry.get("p50_ms") is not None and entry["p50_ms"] > 0:
            usable[name] = entry
        else:
            untimed.append(name)  # e.g. a model the benchmark could not time: listed, not plotted
    return {**data, "models": usable, "untimed": untimed}


def read_cascades(repo: Path) -> list[dict]:
    """`effnet eval --cascade` results (<repo>/cascades.json), sorted by mean MACs; unreadable -> none."""
    try:
        data = json.loads((repo / "cascades.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict):
        return []
    ok = [c for c in data.values() if isinstance(c, dict) and isinstance(c.get("cascade"), list)
          and isinstance(c.get("mean_macs"), (int, float)) and isinstance(c.get("top1"), (int, float))]
    return sorted(ok, key=lambda c: (c["mean_macs"], c.get("threshold", 0)))


def _real(r: Row) -> bool:
    """Only trained weights give accuracy points; random weights exercise the plumbing."""
    return r.pretrained


def _plot(rows: list[Row], x_of, xlabel: str, title: str, out: Path, xerr_of=None, cascades=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.6), dpi=120)
    real = [r for r in rows if _real(r) and x_of(r) is not None]
    families = sorted({r.family for r in real})
    colours = dict(zip(families, ["tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange"]))
    ys: list[float] = []
    for fam in families:
        mine = sorted((r for r in real if r.family == fam), key=x_of)
        # (row, its top-1) pairs: the published reference, and what `effnet eval` measured (with its interval)
        pts = [(r, r.ref_top1) for r in mine if r.ref_top1 is not None]
        if pts:
            ax.plot([x_of(r) for r, _ in pts], [y for _, y in pts], "o-", color=colours[fam], ms=7,
                    label=f"{fam}: reference (published, ImageNet-1k val)")
            for r, y in pts:
                ax.annotate(r.name, (x_of(r), y), textcoords="offset points", xytext=(6, 4), fontsize=8, color=colours[fam])
            ys += [y for _, y in pts]
        meas = [(r, r.m_top1, r.m_top1_ci or [r.m_top1, r.m_top1]) for r in mine if r.m_top1 is not None]
        if meas:
            lo = [y - ci[0] for _, y, ci in meas]
            hi = [ci[1] - y for _, y, ci in meas]
            sets = sorted({f"{r.m_dataset}, n={r.m_size}" for r, _, _ in meas})
            ax.errorbar([x_of(r) for r, _, _ in meas], [y for _, y, _ in meas], yerr=[lo, hi], fmt="s", mfc="white",
                        color=colours[fam], ms=7, capsize=4, lw=1,
                        label=f"{fam}: measured top-1, 95% CI ({'; '.join(sets)})")
            for r, y, _ in meas:
                ax.annotate(r.name, (x_of(r), y), textcoords="offset points", xytext=(6, -11), fontsize=8, color=colours[fam])
            ys += [v for _, y, ci in meas for v in (y, *ci)]
        if xerr_of is not None:
            for r, y in pts or [(r, y) for r, y, _ in meas]:
                if xerr_of(r) is not None:
                    ax.plot([x_of(r), xerr_of(r)], [y, y], "-", color=colours[fam], alpha=0.35, lw=3)
    for c in (c for c in cascades if c.get("pretrained")):  # measured like the models, at their mean MACs
        x, y, ci = c["mean_macs"] / 1e9, c["top1"], c.get("top1_ci95")
        yerr = [[y - ci[0]], [ci[1] - y]] if isinstance(ci, list) and len(ci) == 2 else None
        ax.errorbar([x], [y], yerr=yerr, fmt="D", color="black", mfc="gold", ms=7, capsize=4, lw=1,
                    label=f"cascade {' → '.join(c['cascade'])} at {c.get('threshold', 0):g}: measured top-1 at mean MACs")
        ax.annotate(" → ".join(c["cascade"]), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ys += [y] + (list(ci) if isinstance(ci, list) and len(ci) == 2 else [])
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ImageNet top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if ys:
        ax.set_ylim(max(0.0, min(ys) - 5), min(100.0, max(ys) + 5))
    xs = [x_of(r) for r in real]
    if xs:  # pad the log axis so labels fit, and give a lone point some context
        left, right = min(xs) / 1.25, max(xs) * 1.6
        if right / left < 4:
            mid = math.sqrt(left * right)
            left, right = mid / 2, mid * 2
        ax.set_xlim(left, right)
    random_names = [r.name for r in rows if not _real(r)]
    notes = []
    if random_names:
        notes.append(f"random weights, plumbing only (not plotted): {', '.join(random_names)}")
    if not real:
        notes.append("no model with trained weights in this repository")
    if notes:
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, color="dimgray", va="bottom")
    if ax.get_legend_handles_labels()[0]:  # below the axes: error bars on small sets reach any corner
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    fig.tight_layout(rect=(0, 0.04 if notes else 0, 1, 1))
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def _ci_txt(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else f"{v:.1f}"


def _num(n: int, unit: float, suffix: str) -> str:
    if n < 0.1 * unit:  # 0.02B reads worse than 21M
        return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"
    return f"{n / unit:.2f}{suffix}"


def markdown(rows: list[Row], skipped: list[str], bench: dict | None, notes: str | None, command: str, plots: list[tuple[str, str]],
             cascades: list[dict] | tuple[()] = ()) -> str:
    out = ["# Accuracy", ""]
    out.append(f"Generated by `{command}` from the manifests in the model repository; rerun it to refresh.")
    out.append("")
    if notes:
        out += [notes.strip(), ""]
    for title, png in plots:
        out += [f"## {title}", "", f"![{title}]({png})", ""]
    out += ["## Models", ""]
    out.append("| model | family | resolution | params | MACs | reference top-1 % | measured top-1 % [95% CI] | measured top-5 % [95% CI] | measured on | weights |")
    out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        measured_on = f"{r.m_dataset}, n={r.m_size}" if r.m_size is not None else "–"
        if r.m_errors:
            measured_on += f", {r.m_errors} unreadable"
        weights = "pretrained" if r.pretrained else "**random — plumbing only**, accuracy meaningless"
        m1, m5 = _ci_txt(r.m_top1, r.m_top1_ci), _ci_txt(r.m_top5, r.m_top5_ci)
        if not r.pretrained and r.m_top1 is not None:
            m1, m5 = f"({m1})", f"({m5})"
        out.append(
            f"| {r.name} | {r.family} | {r.crop} | {_num(r.params, 1e6, 'M')} | {_num(r.macs, 1e9, 'B')} | {_pct(r.ref_top1)} "
            f"| {m1} | {m5} | {measured_on} | {weights} |"
        )
    out.append("")
    if cascades:
        out += ["## Cascades", "",
                ("`model=cascade:a,b` runs `a`, and `b` only for images whose top-1 probability from `a` is under the "
                 "threshold; measured with `effnet eval --cascade a,b --threshold T` (every model on every image, the "
                 "server's decision replayed), at the MACs the cascade spends on average per image."), "",
                "| cascade | threshold | mean MACs per image | escalated | measured top-1 % [95% CI] | measured top-5 % [95% CI] | the models alone, top-1 % | measured on |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in cascades:
            alone = ", ".join(f"{k} {_pct(v.get('top1'))}" for k, v in (c.get("models") or {}).items() if isinstance(v, dict))
            m1 = _ci_txt(c["top1"], _ci(c.get("top1_ci95")))
            m5 = _ci_txt(c.get("top5"), _ci(c.get("top5_ci95")))
            if not c.get("pretrained"):
                m1, m5 = f"({m1})", f"({m5}) random weights, plumbing only"
            frac = c.get("escalated_fraction")
            out.append(f"| {' → '.join(c['cascade'])} | {c.get('threshold', 0):g} | {_num(int(c['mean_macs']), 1e9, 'B')} "
                       f"| {'–' if frac is None else f'{100 * frac:.0f}%'} | {m1} | {m5} | {alone or '–'} "
                       f"| {c.get('dataset')}, n={c.get('size')} |")
        out.append("")
    refs = sorted({r.ref_source for r in rows if r.ref_source})
    if refs:
        out += ["Reference accuracy is the publisher's ImageNet-1k validation number for those weights (" + "; ".join(refs) + ").", ""]
    if bench:
        out += ["## Latency", ""]
        meta = ", ".join(f"{k}: {bench[k]}" for k in ("device", "batch", "date", "note") if k in bench)
        if meta:
            out += [meta, ""]
        out += ["| model | p50 ms | p95 ms | img/s | measured how |", "| --- | --- | --- | --- | --- |"]
        for name, e in sorted(bench["models"].items(), key=lambda kv: kv[1]["p50_ms"]):
            p95 = e.get("p95_ms")
            ips = e.get("img_per_s")
            out.append(f"| {name} | {e['p50_ms']:.2f} | {'–' if p95 is None else f'{p95:.2f}'} "
                       f"| {'–' if ips is None else f'{ips:.1f}'} | {e.get('source') or '–'} |")
        out.append("")
        if bench.get("untimed"):
            out += [f"No latency in the benchmark for: {', '.join(bench['untimed'])}.", ""]
    else:
        out += [('No benchmark was given, so there is no accuracy-vs-latency plot: `effnet report --bench FILE` adds one, '
                'from a JSON file `{"device": "...", "batch": 1, "models": {"lite0": {"p50_ms": 9.8, "p95_ms": 12.1, '
                '"img_per_s": 101.0}}}` (`p50_ms` required per model; the rest optional).'), ""]
    sizes = sorted({r.m_size for r in rows if r.m_size})
    out += ["## Reading the confidence intervals", ""]
    out.append(
        "Measured accuracy comes from `effnet eval`: the exported ONNX model, run through the server's own "
        "preprocessing, on the set named in *measured on*. The bracket is the 95% Wilson score interval for "
        "a binomial proportion: if the images were a random sample from some population of photos, intervals "
        "made this way cover the model's true accuracy on that population 95% of the time. It says nothing "
        "about images unlike the set."
    )
    if sizes:
        n = sizes[0]
        from .eval.metrics import wilson

        lo, hi = wilson(n - 1, n) if n > 1 else wilson(n, n)  # type: ignore[misc]  # n >= 1: never None
        out += ["", (f"The smallest set here has n={n} images: even {n - 1 if n > 1 else n} of {n} correct only bounds the "
                f"accuracy to [{100 * lo:.0f}%, {100 * hi:.0f}%]. A set this small checks that the pipeline is right "
                "(a broken preprocessing or a wrong label order scores near 0%), not which variant is better; "
                "compare variants with the reference numbers or on a few thousand ImageNet val images.")]
    if any(not r.pretrained for r in rows):
        out += ["", ("Models with random weights (*plumbing only*) exercise the build, export and evaluation path; "
                "their accuracy is chance level by construction and is neither plotted nor meaningful.")]
    if skipped:
        out += ["", "Not included (manifest unreadable): " + "; ".join(skipped)]
    out.append("")
    return "\n".join(out)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(repo: Path, out: Path, *, bench: Path | None = None, notes: Path | None = None, command: str = "effnet report") -> Path:
    rows, skipped = collect(repo)
    if not rows:
        raise ReportError(f"{repo} holds no readable model")
    bench_data = read_bench(bench) if bench else None
    cascades = read_cascades(repo)
    if bench_data:
        for r in rows:
            e = bench_data["models"].get(r.name)
            if e:
                r.p50_ms, r.p95_ms, r.img_per_s = e["p50_ms"], e.get("p95_ms"), e.get("img_per_s")
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    _plot(rows, lambda r: r.macs / 1e9, "multiply-adds per image (billions, log scale) — the paper's \"FLOPs\"",
          "Accuracy vs MACs", out / MACS_PNG, cascades=cascades)
    plots.append(("Accuracy vs MACs", MACS_PNG))
    if bench_data:
        timed = [r for r in rows if r.p50_ms is not None]
        if not timed:
            raise ReportError(f"{bench}: none of its models is in {repo}")
        _plot(timed, lambda r: r.p50_ms, "p50 latency per request (ms, log scale); the faint bar reaches p95",
              "Accuracy vs measured latency", out / LATENCY_PNG, xerr_of=lambda r: r.p95_ms)
        plots.append(("Accuracy vs latency", LATENCY_PNG))
    notes_text = notes.read_text(encoding="utf-8") if notes else None
    md = out / MARKDOWN
    _atomic_write(md, markdown(rows, skipped, bench_data, notes_text, command, plots, cascades))
    return md
