"""Markdown report of the speed benchmark (:mod:`lbyl.bench.speed`)."""
from __future__ import annotations


def _mb(n):
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def _s(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def _ms(x):
    return "n/a" if x is None else f"{1000 * x:.1f}"


def format_markdown(data: dict) -> str:
    """The speed report of :func:`lbyl.bench.speed.run`'s results as Markdown."""
    return "\n".join(_restore_section(data)) + "\n"


def _restore_section(data: dict) -> list[str]:
    m = data["machine"]
    lines = [
        "# lbyl speed benchmark",
        "",
        f"- command: `{data['command']}`",
        f"- machine: {m['nproc']} CPU cores ({m['cpu']}), torch {m['torch']} with {m['torch_threads']} threads, "
        f"Python {m['python']}, OMP_WAIT_POLICY={m.get('omp_wait_policy')}",
        f"- load average at start / end: {data['load_start']} / {data['load_end']}",
        f"- date: {data['date']}; medians of {data['settings']['repeats']} runs "
        f"(per-neuron reference: {data['settings']['reference_repeats']}; latency: "
        f"{data['settings']['latency_repeats']} alternating calls after one warm-up)",
        "- models: random weights; BatchNorm gamma ~ U(0.5, 1.5), beta ~ N(0, 0.04), running statistics "
        "measured on random inputs; method `lbyl`, criterion `auto` (`l2` on these CNNs), lambdas 0, default layers",
        "",
        "## Restore wall time (seconds)",
        "",
        "`copy`: the deep copy that becomes the result; `graph`: dependency trace (the only forward pass), "
        "group detection and the plan; `delivery`: producer statistics and each layer's solve; `surgery`: "
        "corrections, folding into consumers, channel removal and the recount; `other`: validation and the rest. "
        "`forward`: one no-grad forward pass of the original model at the given batch, timed alternately with "
        "each restore in the same process.",
        "",
        "| model | ratio | total | copy | graph | delivery | surgery | other | forward (batch) | restore / forward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in data["models"]:
        for row in model["ratios"]:
            t = row["restore"]["median"]
            forward = f"{_s(t.get('forward'))} ({row['restore'].get('forward_batch')})" if "forward" in t else "n/a"
            lines.append(
                f"| {model['model']} | {row['ratio']} | {_s(t['wall'])} | {_s(t.get('copy'))} | {_s(t.get('graph'))} | "
                f"{_s(t.get('delivery'))} | {_s(t.get('surgery'))} | {_s(t.get('other'))} | {forward} | "
                f"{_s(t.get('restore_over_forward'), 2)} |"
            )
    return lines + _delivery_section(data) + _memory_section(data) + _latency_section(data)


def _delivery_section(data: dict) -> list[str]:
    lines = []
    if any("delivery" in row for model in data["models"] for row in model["ratios"]):
        lines += [
            "",
            "## Delivery matrices: one factorisation per layer against one least-squares solve per neuron",
            "",
            "All pruned layers of the model; relative difference: `max |A - B| / max |B|`, worst layer. "
            "Per-neuron times marked * are extrapolated from the neurons solved (column `solved`): "
            "each layer's time is scaled by its pruned / solved neurons.",
            "",
            "| model | ratio | layers | pruned neurons | solved | batched (s) | per neuron (s) | speed-up | max rel. difference |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model in data["models"]:
            for row in model["ratios"]:
                d = row.get("delivery")
                if d:
                    lines.append(
                        f"| {model['model']} | {row['ratio']} | {d['layers']} | {d['pruned_neurons']} | "
                        f"{d['reference_neurons']} | {_s(d['batched_s'])} | "
                        f"{_s(d['per_neuron_s'], 2)}{'*' if d['per_neuron_extrapolated'] else ''} | {d['speedup']:.0f}x | "
                        f"{d['max_relative_difference']:.1e} |"
                    )
    return lines


def _memory_section(data: dict) -> list[str]:
    lines = []
    if any("memory" in row for model in data["models"] for row in model["ratios"]):
        lines += [
            "",
            "## Peak extra memory of one restore call (MiB)",
            "",
            "Rise of the resident set size during the call, in a fresh process. `copy`: the default "
            "(`inplace=False`, so it includes the deep copy that becomes the result); `inplace`: the "
            "restoration's own working memory.",
            "",
            "| model | ratio | model size | restored size | peak extra (copy) | peak extra (inplace) |",
            "|---|---|---|---|---|---|",
        ]
        for model in data["models"]:
            for row in model["ratios"]:
                mem = row.get("memory")
                if mem:
                    lines.append(
                        f"| {model['model']} | {row['ratio']} | {_mb(model['model_bytes'])} | "
                        f"{_mb(row['restored_bytes'])} | {_mb(mem['copy'].get('peak_extra_bytes'))} | "
                        f"{_mb(mem['inplace'].get('peak_extra_bytes'))} |"
                    )
    return lines


def _latency_section(data: dict) -> list[str]:
    lines = []
    if any(row.get("latency") for model in data["models"] for row in model["ratios"]):
        lines += [
            "",
            "## CPU latency, original against restored (milliseconds per batch)",
            "",
            "Latency ratio = restored / original; gap = latency ratio / MAC ratio - 1.",
            "",
            "| model | ratio | batch | original | restored | latency ratio | MAC ratio | gap | ORT original | ORT restored | ORT ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for model in data["models"]:
            for row in model["ratios"]:
                for batch, e in row.get("latency", {}).items():
                    gap = e["latency_ratio"] / row["mac_ratio"] - 1
                    ort = e.get("ort_original"), e.get("ort_restored")
                    lines.append(
                        f"| {model['model']} | {row['ratio']} | {batch} | {_ms(e['original']['median_s'])} | "
                        f"{_ms(e['restored']['median_s'])} | {e['latency_ratio']:.3f} | {row['mac_ratio']:.3f} | "
                        f"{100 * gap:+.1f}% | {_ms(ort[0]['median_s']) if ort[0] else 'n/a'} | "
                        f"{_ms(ort[1]['median_s']) if ort[1] else 'n/a'} | "
                        f"{_s(e.get('ort_latency_ratio'))} |"
                    )
        errors = {m["model"]: r["onnx_error"] for m in data["models"] for r in m["ratios"] if "onnx_error" in r}
        for name, error in errors.items():
            lines.append(f"\nONNX Runtime not measured for {name}: {error}")
        if not data["onnxruntime"]:
            lines.append("\nONNX Runtime: not installed (optional: `pip install onnxruntime onnx`).")
    return lines
