"""docs/benchmarks.png: throughput and p95 latency against MACs, from one run's records."""

from __future__ import annotations

from pathlib import Path

from benchmarks.records import LoadWindow, OrtTiming, Results


def plot(path: Path, res: Results) -> bool:
    names = {r.model for r in res.of(OrtTiming) if r.phase == "raw"} | {w.model for w in res.of(LoadWindow) if w.server == "service"}
    if not names:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(names, key=lambda n: res.models[n].macs)
    n = res.top_n
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))

    def series(ax, label, fn, style):
        pts = [(res.models[m].macs / 1e9, v, m) for m in order if (v := fn(m)) is not None]
        if pts:
            xs, ys, _ = zip(*pts, strict=True)
            ax.plot(xs, ys, style, label=label)
            if style.startswith("o"):
                for x, y, m in pts:
                    ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)

    def raw(session, batch, key="img_per_s"):
        return lambda m: getattr(t, key) if (t := res.ort("raw", m, session, batch)) else None

    def svc(kind, clients, key):
        return lambda m: getattr(w, key) if (w := res.service(m, kind, clients)) else None

    series(ax1, "raw ORT default session, batch 1", raw("default", 1), "k:^")
    series(ax1, "raw ORT default session, batch 8", raw("default", 8), "k--s")
    series(ax1, "raw ORT server's session, batch 1", raw("server", 1), "c:v")
    series(ax1, f"service, {n} clients, model-res", svc("model-res", n, "img_per_s"), "o-")
    series(ax1, f"service, {n} clients, 1920×1080", svc("photo", n, "img_per_s"), "s-")
    ax1.set(xscale="log", yscale="log", xlabel="GMACs per image", ylabel="images / s", title="Throughput")
    series(ax2, "service, 1 client, model-res", svc("model-res", 1, "p95_ms"), "o-")
    series(ax2, "service, 1 client, 1920×1080", svc("photo", 1, "p95_ms"), "s-")
    series(ax2, f"service, {n} clients, 1920×1080", svc("photo", n, "p95_ms"), "d-")
    series(ax2, "raw ORT default session, batch 1 (median)", raw("default", 1, "ms_p50"), "k:^")
    ax2.set(xscale="log", yscale="log", xlabel="GMACs per image", ylabel="latency, ms", title="p95 latency")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(("QUICK (smoke) run - " if res.run.quick else "") + "EfficientNet serving on CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
