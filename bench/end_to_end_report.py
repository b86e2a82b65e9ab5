"""The end-to-end benchmark's report: its markdown table, the targets' verdicts and its chart (bench/end_to_end.py
makes the records)."""

from __future__ import annotations

from pathlib import Path

MIB = 1 << 20
# A step whose CPU time per wall second falls below this fraction of the thread count did not have the cores to itself.
CONTENDED = 0.75
COLORS = {"dama_prefix_shared": "darkgreen", "dama": "tab:green"}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(records: list[dict]) -> str:
    """A markdown table, one row per provider; ratios are over the baseline ("x base"), over packed ("x packed") and
    over TRL's DPOTrainer ("x TRL"); MFU in % of the measured matmul peak (GPU runs)."""
    header = ["provider", "layout", "tokens/step", "padding", "pairs/s", "x base", "x packed", "step s", "CPU s/step",
              "x packed", "CPU/wall", "peak work MiB", "x base", "x packed", "peak RSS MiB", "x base", "RSS+ MiB",
              "tokens/s", "pairs/s x TRL", "peak work x TRL", "CUDA peak MiB", "MFU"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        if r["status"] != "ok":
            rows.append(f"| {r['provider']} | skipped: {r['reason']} |")
            continue
        ratios = r["ratios"]
        cells = [r["provider"], f"{r['layout']}, {r['head']}, {r['attention']}", f"{r['layout_tokens_mean']:.0f}",
                 f"{100 * r['padding_fraction']:.1f}%", f"{r['pairs_per_s']:.3f}",
                 _fmt(ratios["pairs_per_s_vs_baseline"], ".2f"), _fmt(ratios["pairs_per_s_vs_packed"], ".2f"),
                 f"{r['step_time_s']:.2f}", f"{r['step_cpu_s']:.2f}", _fmt(ratios["cpu_s_per_step_vs_packed"], ".2f"),
                 f"{r['cpu_per_wall']:.2f}",
                 f"{r['peak_bytes'] / MIB:.0f}", _fmt(ratios["peak_vs_baseline"], ".3f"),
                 _fmt(ratios["peak_vs_packed"], ".3f"),
                 f"{r['rss_peak_bytes'] / MIB:.0f}", _fmt(ratios["rss_peak_vs_baseline"], ".3f"),
                 f"{r['rss_extra_bytes'] / MIB:.0f}", f"{r['tokens_per_s']:.0f}",
                 _fmt(ratios.get("pairs_per_s_vs_trl"), ".2f"), _fmt(ratios.get("peak_vs_trl"), ".3f"),
                 _fmt(r.get("cuda_peak_bytes") and r["cuda_peak_bytes"] / MIB, ".0f"),
                 _fmt(r.get("mfu") and 100 * r["mfu"], ".1f")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_targets(records: list[dict]) -> str:
    """The targets' verdicts, after a warning for each provider whose steps shared the cores with other work."""
    lines = [f"- WARNING: {r['provider']} ran at {r['cpu_per_wall']:.2f} CPU s per wall s with {r['threads']} threads: "
             "other work shared the cores, which slows the many small operations of a step most; re-run on a quiet "
             "machine" for r in records if r["status"] == "ok" and r["cpu_per_wall"] < CONTENDED * r["threads"]]
    for r in records:
        for target in r.get("targets", []):
            verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
            lines.append(f"- {target['target']}: {_fmt(target['value'], '.3f')} (limit {target['limit']}) -> {verdict}")
    return "\n".join(lines)


def write_chart(records: list[dict], path: Path, baseline: str) -> None:
    """Bars of pairs/s, peak working memory and peak RSS for each provider, with ratios over the `baseline`
    provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in records if r["status"] == "ok"]
    names = [r["provider"] for r in measured]
    colors = [COLORS.get(name, "tab:gray") for name in names]
    panels = (("pairs_per_s", 1, ".3f", "pairs / s (higher is better)", "pairs_per_s_vs_baseline"),
              ("peak_bytes", MIB, ".0f", "peak working memory, MiB", "peak_vs_baseline"),
              ("rss_peak_bytes", MIB, ".0f", "peak RSS, MiB", "rss_peak_vs_baseline"))
    figure, axes = plt.subplots(1, len(panels), figsize=(12, 4))
    for axis, (key, unit, spec, title, ratio_key) in zip(axes, panels, strict=True):
        values = [r[key] / unit for r in measured]
        bars = axis.bar(names, values, color=colors)
        # A ratio under each bar but the baseline's (none when the run left the baseline out).
        labels = [format(v, spec) + (f"\n({r['ratios'][ratio_key]:.2f}x)"
                                     if r["provider"] != baseline and r["ratios"][ratio_key] is not None else "")
                  for v, r in zip(values, measured, strict=True)]
        axis.bar_label(bars, labels=labels, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.margins(y=0.25)
        axis.tick_params(axis="x", labelsize=8)
    shape = measured[0]["shape"] if measured else {}
    figure.suptitle(f"DAMA training step, LLaVA-1.5 shapes (576 image tokens, V {shape.get('vocab_size')}), "
                    f"H {shape.get('hidden_size')}, "
                    f"{shape.get('num_layers')} layers, P {shape.get('num_pairs')}; {measured[0]['device_name']}"
                    if measured else "no provider measured", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
