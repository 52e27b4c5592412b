"""docs/benchmarks.png: throughput and p95 latency against MACs."""

from __future__ import annotations

from pathlib import Path

from benchmarks.report_targets import row


def plot(path: Path, plan, manifests: dict, results: dict) -> bool:
    raw, service = results.get("raw") or {}, results.get("service") or []
    if not raw and not service:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({*raw, *(r["model"] for r in service)}, key=lambda n: manifests[n]["macs"])
    macs = {n: manifests[n]["macs"] / 1e9 for n in names}
    top_n = max(plan.concurrency)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))

    def series(ax, label, fn, style):
        pts = [(macs[n], v) for n in names if (v := fn(n)) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, style, label=label)
            if style.startswith("o"):
                for x, y, n in zip(xs, ys, [n for n in names if fn(n) is not None], strict=True):
                    ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)

    def raw_ips(n, kind, b):
        r = (raw.get(n) or {})
        r = r.get("default") if kind == "default" else r
        return ((r or {}).get("batches") or {}).get(b, {}).get("img_per_s")

    def svc(n, kind, conc, key):
        r = row(service, n, kind, conc)
        return r.get(key) if r else None

    series(ax1, "raw ORT default session, batch 1", lambda n: raw_ips(n, "default", "1"), "k:^")
    series(ax1, "raw ORT default session, batch 8", lambda n: raw_ips(n, "default", "8"), "k--s")
    series(ax1, "raw ORT server's session, batch 1", lambda n: raw_ips(n, "server", "1"), "c:v")
    series(ax1, f"service, {top_n} clients, model-res", lambda n: svc(n, "model-res", top_n, "img_per_s"), "o-")
    series(ax1, f"service, {top_n} clients, 1920×1080", lambda n: svc(n, "photo", top_n, "img_per_s"), "s-")
    ax1.set(xscale="log", yscale="log", xlabel="GMACs per image", ylabel="images / s", title="Throughput")
    series(ax2, "service, 1 client, model-res", lambda n: svc(n, "model-res", 1, "p95_ms"), "o-")
    series(ax2, "service, 1 client, 1920×1080", lambda n: svc(n, "photo", 1, "p95_ms"), "s-")
    series(ax2, f"service, {top_n} clients, 1920×1080", lambda n: svc(n, "photo", top_n, "p95_ms"), "d-")
    series(ax2, "raw ORT default session, batch 1 (median)", lambda n: ((raw.get(n) or {}).get("default") or {}).get("batches", {}).get("1", {}).get("batch_ms_p50"), "k:^")
    ax2.set(xscale="log", yscale="log", xlabel="GMACs per image", ylabel="latency, ms", title="p95 latency")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(("QUICK (smoke) run - " if plan.quick else "") + "EfficientNet serving on CPU", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
