"""Tables and PNG plots of a `specfleet simulate` report (the JSON the command writes)."""

from __future__ import annotations

from pathlib import Path

from specfleet_operator.simulator.systems import SYSTEMS

COLORS = {"plain": "#888888", "specinfer": "#d9822b", "pipeinfer": "#7b5ea7", "dsi": "#3b7dd8", "cosine": "#2a9d5c"}


def with_speedups(rows: list[dict]) -> list[dict]:
    """Adds speedup_p50 (plain's p50 latency / this system's, same trace and replicas) and throughput_vs_plain."""
    plain = {(r["trace"], r["replicas"]): r for r in rows if r["system"] == "plain"}
    out = []
    for r in rows:
        base = plain.get((r["trace"], r["replicas"]))
        extra = {}
        if base:
            extra["speedup_p50"] = round(base["p50_latency_s"] / r["p50_latency_s"], 3) if r["p50_latency_s"] else None
            extra["throughput_vs_plain"] = (round(r["tokens_per_s"] / base["tokens_per_s"], 3)
                                            if base["tokens_per_s"] else None)
        out.append({**r, **extra})
    return out


def format_table(rows: list[dict], replicas: int | None = None) -> str:
    """systems x (trace, replicas): served and peak throughput, p50 / p99 latency, TTFT, TPOT, mean draft length
    and the speedup of p50 latency vs plain decoding."""
    chosen = [r for r in rows if replicas is None or r["replicas"] == replicas]
    head = (f"{'trace':<8}{'replicas':>9}{'system':>11}{'GPUs':>8}{'tok/s':>11}{'peak tok/s':>12}{'peak/GPU':>10}"
            f"{'p50 s':>8}{'p99 s':>8}{'TTFT p50':>10}{'TPOT ms':>9}{'k':>5}{'speedup':>9}")
    lines = [head, "-" * len(head)]
    order = {name: i for i, name in enumerate(SYSTEMS)}
    for r in sorted(chosen, key=lambda r: (r["trace"], r["replicas"], order.get(r["system"], 99))):
        speedup = r.get("speedup_p50")
        peak, peak_per_gpu = r.get("peak_tokens_per_s", float("nan")), r.get("peak_tokens_per_gpu_s", float("nan"))
        lines.append(f"{r['trace']:<8}{r['replicas']:>9}{r['system']:>11}{r['gpus']:>8.0f}{r['tokens_per_s']:>11.0f}"
                     f"{peak:>12.0f}{peak_per_gpu:>10.1f}"
                     f"{r['p50_latency_s']:>8.2f}{r['p99_latency_s']:>8.2f}{r['p50_ttft_s']:>10.3f}"
                     f"{r['p50_tpot_ms']:>9.1f}{r['mean_k']:>5.1f}{(f'{speedup:.2f}x' if speedup else '-'):>9}")
    return "\n".join(lines)


def format_autoscale(autoscale: dict) -> str:
    head = f"{'policy':<14}{'SLO met':>9}{'GPU-hours':>11}{'actions':>9}{'reversals':>10}{'p99 ms/token':>14}"
    lines = [f"autoscaling on a {autoscale['duration_s']:.0f} s ramp, {autoscale['min_replicas']}..."
             f"{autoscale['max_replicas']} verifiers, SLO {autoscale['slo_ms_per_token']:.1f} ms per output token, "
             f"provisioning {autoscale['provision_s']:.0f} s", head, "-" * len(head)]
    for r in autoscale["results"]:
        lines.append(f"{r['policy']:<14}{r['slo_attainment']:>9.1%}{r['gpu_hours']:>11.1f}{r['scaling_actions']:>9}"
                     f"{r.get('reversals', 0):>10}{r['p99_latency_per_token_ms']:>14.1f}")
    if autoscale.get("left_out"):
        lines.append(f"left out: {autoscale['left_out']}")
    return "\n".join(lines)


def format_autoscale_grid(grid: dict) -> str:
    """The autoscaling grid (`autoscale.score_grid` rows): one line per trace x scale x policy."""
    from specfleet_operator.simulator.autoscale import POLICIES

    head = (f"{'trace':<9}{'verifiers':>11}  {'policy':<14}{'SLO met':>8}{'GPU-h':>10}{'actions':>9}{'reversals':>10}"
            f"{'surge->up s':>12}{'no up':>7}{'p99 ms/tok':>12}")
    seeds = ",".join(str(s) for s in grid["seeds"])
    lines = [f"autoscaling grid: {grid['duration_s']:.0f} s traces (ramp-5m: 300 s), provisioning "
             f"{grid['provision_s']:.0f} s, seeds {seeds} (averaged)", head, "-" * len(head)]
    traces = {name: i for i, name in enumerate(grid["traces"])}
    order = {name: i for i, name in enumerate(POLICIES)}
    rows = sorted(grid["rows"], key=lambda r: (traces.get(r["trace"], 99), r["max_replicas"],
                                               order.get(r["policy"], 99)))
    for r in rows:
        surge = "-" if r["surge_to_scale_up_s"] is None else f"{r['surge_to_scale_up_s']:.1f}"
        lines.append(f"{r['trace']:<9}{r['min_replicas']:>5}..{r['max_replicas']:<4}  {r['policy']:<14}"
                     f"{r['slo_attainment']:>8.1%}{r['gpu_hours']:>10.1f}{r['scaling_actions']:>9.1f}"
                     f"{r['reversals']:>10.1f}{surge:>12}{r['surges_without_scale_up']:>7.1f}"
                     f"{r['p99_latency_per_token_ms']:>12.1f}")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(report: dict, path: Path) -> Path:
    """p50 and p99 latency and tokens/s per GPU against replicas, one line per system, per trace."""
    plt = _pyplot()
    rows = report["results"]
    traces = sorted({r["trace"] for r in rows})
    fig, axes = plt.subplots(len(traces), 3, figsize=(15, 4.2 * len(traces)), squeeze=False)
    for row_axes, trace in zip(axes, traces, strict=True):
        for system in SYSTEMS:
            mine = sorted((r for r in rows if r["trace"] == trace and r["system"] == system),
                          key=lambda r: r["replicas"])
            if not mine:
                continue
            x = [r["replicas"] for r in mine]
            style = {"marker": "o", "color": COLORS.get(system), "label": system}
            row_axes[0].plot(x, [r["p50_latency_s"] for r in mine], **style)
            row_axes[1].plot(x, [r["p99_latency_s"] for r in mine], **style)
            row_axes[2].plot(x, [r.get("peak_tokens_per_gpu_s", r["tokens_per_gpu_s"]) for r in mine], **style)
        for ax, label in zip(row_axes, ("p50 latency (s)", "p99 latency (s)", "peak tokens/s per GPU"), strict=True):
            ax.set_xscale("log")
            ax.set_xlabel("replicas")
            ax.set_ylabel(label)
            ax.set_title(f"{trace}: {label}")
            ax.grid(alpha=0.3)
        row_axes[0].legend()
    cfg = report["config"]
    fig.suptitle(f"specfleet simulate: preset {cfg['preset']}, load {cfg['load']} x plain capacity, "
                 f"{cfg['duration_s']:.0f} s, seed {cfg['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_autoscale(report: dict, path: Path) -> Path:
    """Replicas over time per policy, with the offered load."""
    plt = _pyplot()
    autoscale = report["autoscale"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 7), sharex=True)
    for result in autoscale["results"]:
        line = autoscale["timelines"][result["policy"]]
        top.plot(line["time_s"], line["ready"], label=f"{result['policy']} ({result['slo_attainment']:.0%} SLO, "
                 f"{result['gpu_hours']:.0f} GPU-h, {result['scaling_actions']} actions)")
        bottom.plot(line["time_s"], line["queue_wait_ms"], label=result["policy"])
    any_line = next(iter(autoscale["timelines"].values()))
    load = top.twinx()
    load.plot(any_line["time_s"], any_line["load_tokens_per_s"], color="#bbbbbb", lw=0.8, zorder=0)
    load.set_ylabel("offered tokens/s (grey)")
    top.set_ylabel("ready verifiers")
    top.legend(fontsize=8, loc="upper left")
    top.set_title(f"autoscaling policies on a ramp (preset {report['config']['preset']}, provisioning "
                  f"{autoscale['provision_s']:.0f} s)")
    bottom.set_yscale("symlog", linthresh=1.0)
    bottom.set_ylim(bottom=0)
    bottom.set_ylabel("queue wait (ms)")
    bottom.set_xlabel("time (s)")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
