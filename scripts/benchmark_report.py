"""The report of a latency benchmark: summaries, ratios, pass/fail targets, what ran where, the table, plot and files.

Nothing here measures or imports the model: any benchmark whose rows have this shape can use it (scripts/benchmark.py
does). A row is one measured variant, a dict with

    name                      the variant's name ("tensor_parallel", "pt_D8", ...)
    ttft_ms, tpot_ms          latency summaries in ms, as `spread` returns them ({"median", "p10", "p90", ...})
    throughput_tokens_per_s   {"median", ...} as `throughput_spread` returns it, or None
    track_block_depth         D of a PT variant, or None (the plot's x axis)
    collectives               optional: {"prefill": {"namespace.op": calls}, ...}
    peak_memory_bytes_per_rank  optional: [bytes or None per rank]

Entry points:

    spread(samples_s), throughput_spread(samples)    summaries of timed samples
    add_ratios(rows, baseline)                       row["ttft_vs_<baseline>"], "tpot_vs_...", "throughput_vs_..."
    latency_ratio(rows, name, baseline, metric), throughput_ratio(rows, name, baseline)
    target(name, value, limit, at_least)             one pass/fail target; pt_targets(rows, world_size): PT's
    exact_command(), environment(device, world_size) what was run, where
    variants_table(rows), targets_table(targets), checks_table(checks), command_line(command)   Markdown lines
    write_table(report)                              the whole table of a scripts/benchmark.py report
    plot(rows, path, title)                          TTFT and TPOT against D, with the baselines as lines
    write_files(prefix, report, table, title)        PREFIX.json, PREFIX.md and PREFIX.png
"""

import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers


ROOT = Path(__file__).resolve().parent.parent
# pt_moe's throughput must be at least this share of the dense PT model's at the same D (same active parameters)
MOE_THROUGHPUT_TARGET = 0.9
# What PT merged every D layers must reach on several ranks against tensor parallelism (at most this share of its
# latency): fewer merges must show in a decode step most, where a merge costs as much as the compute.
TARGET_VS_TENSOR_PARALLEL = {"tpot": 0.50, "ttft": 0.75}
# ... and against the no-sync bound: its ceil(L/D) merges may cost at most this much over PT's compute alone
TARGET_VS_NO_SYNC_BOUND = 1.10


# --- summaries and ratios -------------------------------------------------------------------------------------


def spread(samples_s: list[float]) -> dict:
    """Median and spread of latencies in milliseconds."""
    ms = sorted(1000 * sample for sample in samples_s)
    p10, p90 = (statistics.quantiles(ms, n=10, method="inclusive")[i] for i in (0, 8)) if len(ms) > 1 else ms * 2
    return {"median": statistics.median(ms), "p10": p10, "p90": p90, "min": ms[0], "max": ms[-1], "n": len(ms)}


def throughput_spread(samples: list[float]) -> dict | None:
    """Median and range of throughputs (tokens per second); None without samples."""
    if not samples:
        return None
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def latency_ratio(rows: list[dict], name: str, baseline: str, metric: str) -> float | None:
    """Median `metric` ("ttft" or "tpot") of `name` over that of `baseline`; None when either was not measured."""
    by_name = {row["name"]: row for row in rows}
    if name not in by_name or baseline not in by_name:
        return None
    return by_name[name][f"{metric}_ms"]["median"] / by_name[baseline][f"{metric}_ms"]["median"]


def throughput_ratio(rows: list[dict], name: str, baseline: str) -> float | None:
    by_name = {row["name"]: row for row in rows}
    throughputs = [(by_name.get(key) or {}).get("throughput_tokens_per_s") for key in (name, baseline)]
    return throughputs[0]["median"] / throughputs[1]["median"] if all(throughputs) else None


def add_ratios(rows: list[dict], baseline: str) -> None:
    """Every row's TTFT, TPOT and throughput against `baseline`'s, medians of the same run."""
    for row in rows:
        row[f"ttft_vs_{baseline}"] = latency_ratio(rows, row["name"], baseline, "ttft")
        row[f"tpot_vs_{baseline}"] = latency_ratio(rows, row["name"], baseline, "tpot")
        row[f"throughput_vs_{baseline}"] = throughput_ratio(rows, row["name"], baseline)


def target(name: str, value: float | None, limit: float, at_least: bool) -> dict:
    """A ratio that must be at least (`at_least`) or at most `limit`; `met` is None when it was not measured."""
    return dict(name=name, value=value, target=f"{'>=' if at_least else '<='} {limit:.2f}",
                met=None if value is None else (value >= limit if at_least else value <= limit))


def pt_targets(rows: list[dict], world_size: int) -> list[dict]:
    """PT at its deepest measured D against tensor parallelism and the no-sync bound (on several ranks) and against
    transformers' Llama; pt_moe against the dense PT model merged at the same D. None without a pt_D row."""
    depths = [row["track_block_depth"] for row in rows if row["name"].startswith("pt_D")]
    if not depths:
        return []
    deepest = f"pt_D{max(depths)}"
    targets = []
    if world_size > 1:
        for metric, limit in TARGET_VS_TENSOR_PARALLEL.items():
            targets.append(target(f"{deepest} {metric.upper()} / tensor_parallel",
                                  latency_ratio(rows, deepest, "tensor_parallel", metric), limit, False))
        for metric in ("tpot", "ttft"):
            targets.append(target(f"{deepest} {metric.upper()} / no_sync_bound",
                                  latency_ratio(rows, deepest, "no_sync_bound", metric), TARGET_VS_NO_SYNC_BOUND,
                                  False))
    for metric in ("ttft", "tpot"):  # a speed-up: >= 1.0 means PT is at least as fast as transformers' Llama
        targets.append(target(f"{metric.upper()} transformers_llama / {deepest}",
                              latency_ratio(rows, "transformers_llama", deepest, metric), 1.0, True))
    speed_up = throughput_ratio(rows, deepest, "transformers_llama")
    if speed_up is not None:
        targets.append(target(f"throughput {deepest} / transformers_llama", speed_up, 1.0, True))
    moe = next((row for row in rows if row["name"] == "pt_moe"), None)
    if moe is not None:
        dense = f"pt_D{moe['track_block_depth']}"
        for metric in ("ttft", "tpot"):
            targets.append(target(f"pt_moe {metric.upper()} / {dense}", latency_ratio(rows, "pt_moe", dense, metric),
                                  1 / MOE_THROUGHPUT_TARGET, False))
        targets.append(target(f"throughput pt_moe / {dense}", throughput_ratio(rows, "pt_moe", dense),
                              MOE_THROUGHPUT_TARGET, True))
    return targets


# --- what was run, where --------------------------------------------------------------------------------------


def exact_command() -> dict:
    """This process's command line, the launcher's when one started it, and the environment that changes a run."""
    command = {"argv": shlex.join([Path(sys.executable).name, *sys.argv])}
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun / accelerate launch: record the launcher's line
        with contextlib.suppress(OSError):
            launcher = [part.decode() for part in Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")]
            # the interpreter by name, as in argv: its path is this machine's
            command["launcher"] = shlex.join([Path(launcher[0]).name, *filter(None, launcher[1:])])
    command["environment"] = {name: os.environ[name] for name in (
        "OMP_NUM_THREADS", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "PYTHONPATH") if name in os.environ}
    return command


def cpu_name() -> str:
    with contextlib.suppress(OSError, StopIteration):
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    return platform.processor()


def environment(device: torch.device, world_size: int) -> dict:
    cpu = cpu_name()
    git = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads_per_rank": torch.get_num_threads(),
        "world_size": world_size,
        "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
        "load_average_1min": os.getloadavg()[0],
        "hostname": platform.node(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "modeling_ptt_git": git.stdout.strip() or None,
        },
    }


# --- the table ------------------------------------------------------------------------------------------------


def fmt(value, digits=2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def latency_cell(summary: dict) -> str:
    return f"{fmt(summary['median'])} [{fmt(summary['p10'])}–{fmt(summary['p90'])}]"


def variants_table(rows: list[dict], baseline: str = "tensor_parallel", short: str = "TP") -> list[str]:
    """One line per row: the collectives counted in a prefill, TTFT, TPOT and throughput with their ratios to
    `baseline` (as `add_ratios` set them, headed "/ short") and the peak memory of the busiest rank."""
    lines = [f"| variant | merges/forward (counted) | TTFT ms | TTFT / {short} | TPOT ms | TPOT / {short} | "
             f"throughput tok/s | tput / {short} | peak mem/rank MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        counted = row.get("collectives", {}).get("prefill", {})
        collectives = ", ".join(f"{count} {op.split('.')[-1]}" for op, count in sorted(counted.items())) or "0"
        peak = [p for p in row.get("peak_memory_bytes_per_rank", []) if p is not None]
        lines.append(
            f"| {row['name']} | {collectives} | {latency_cell(row['ttft_ms'])} | {fmt(row[f'ttft_vs_{baseline}'])} | "
            f"{latency_cell(row['tpot_ms'])} | {fmt(row[f'tpot_vs_{baseline}'])} | "
            f"{fmt((row['throughput_tokens_per_s'] or {}).get('median'), 1)} | "
            f"{fmt(row[f'throughput_vs_{baseline}'])} | {fmt(max(peak) / 2**20, 0) if peak else '–'} |"
        )
    return lines


def targets_table(targets: list[dict]) -> list[str]:
    lines = ["| target | value | required | met |", "|---|---|---|---|"]
    for item in targets:
        met = {True: "yes", False: "**no**", None: "–"}[item["met"]]
        lines.append(f"| {item['name']} | {fmt(item['value'], 3)} | {item['target']} | {met} |")
    return lines


def checks_table(checks: list[dict]) -> list[str]:
    """Output comparisons: dicts of name, relative_error, tolerance and passed."""
    lines = ["| output check | relative error | tolerance | passed |", "|---|---|---|---|"]
    for item in checks:
        lines.append(f"| {item['name']} | {item['relative_error']:.2e} | {item['tolerance']:.0e} | "
                     f"{'yes' if item['passed'] else '**NO**'} |")
    return lines


def command_line(command: dict) -> str:
    """The line that reruns the benchmark, as `exact_command` recorded it."""
    return (f"Command: `{command.get('launcher') or command['argv']}`"
            + (f" with {command['environment']}" if command["environment"] else ""))


def describe_run(report: dict) -> str:
    model, workload, env = report["model"], report["workload"], report["environment"]
    return (
        f"W={env['world_size']} ({env['backend'] or 'one process'}) on {env['device_name']}, "
        f"{env['torch_threads_per_rank']} thread(s) per rank, {model['dtype']}; L={model['layers']} "
        f"d={model['hidden_size']} "
        f"FFN={model['intermediate_size']} heads={model['heads']} KV heads={model['kv_heads']} V={model['vocab_size']} "
        f"n={model['num_tracks']}; prefill P={workload['prompt_len']} at batch {workload['batch']}, "
        f"{workload['new_tokens']} new tokens, throughput at batch {workload['throughput_batch']}; "
        f"{workload['repeats']} repeats after {workload['warmup']} warm-up, medians [p10-p90]; "
        f"{workload['cache']} cache{', torch.compile' if workload['compile'] else ''}; load average "
        f"{env['load_average_1min_before']:.1f} -> {env['load_average_1min']:.1f} on {env['cpu_count']} CPUs."
    )


def describe_moe(moe: dict | None) -> list[str]:
    """The table's note on what pt_moe ran (none without pt_moe)."""
    if not moe:
        return []
    return ["", f"pt_moe: every layer sparse, top-{moe['experts_per_tok']} of {moe['experts']} experts of width "
            f"{moe['moe_intermediate_size']} per track (the dense FFN width per track / k), merged every "
            f"{moe['track_block_depth']} layers, experts implementation {moe['experts_implementation']}; "
            f"{moe['active_parameters_per_rank']:,} active parameters per rank against the dense PT model's "
            f"{moe['dense_parameters_per_rank']:,} (the difference: the routers)."]


def all_reduce_lines(costs: dict | None) -> list[str]:
    if not costs:
        return []
    return [""] + [
        f"Bare all_reduce of the {phase} activations ({cost['bytes']:,} bytes), alone: median {cost['median']:.3f} "
        f"ms [p10 {cost['p10']:.3f}, p90 {cost['p90']:.3f}, max {cost['max']:.1f}] over {cost['n']}."
        for phase, cost in costs.items()
    ]


def profile_table(profiles: list[dict] | None) -> list[str]:
    """Rank 0's decode-step breakdown per variant, as `benchmark_harness.profile_decode` measures it."""
    if not profiles:
        return []
    lines = ["", "Decode step, rank 0 (ms per step): wall time without the profiler; collectives (including "
             "waiting for the other ranks) and ATen compute from torch.profiler; the rest is Python and "
             "dispatch (negative when the profiler inflated the ops more than that):", "",
             "| variant | wall | collectives | ATen compute | rest |", "|---|---|---|---|---|"]
    for name, cost in profiles[0].items():
        lines.append(f"| {name} | {cost['wall_ms_per_step']:.2f} | {cost['collectives_ms']:.2f} | "
                     f"{cost['aten_ms']:.2f} | {cost['other_ms']:.2f} |")
    return lines


def write_table(report: dict) -> str:
    """The Markdown of a scripts/benchmark.py report: the run, the variants, the collectives' costs and the
    decode breakdown when measured, the targets, the output checks and the command."""
    lines = [describe_run(report), *describe_moe(report["model"]["moe"]), "", *variants_table(report["variants"]),
             *all_reduce_lines(report["bare_all_reduce_ms"]), *profile_table(report["decode_profile_per_rank"]),
             "", *targets_table(report["targets"]), "", *checks_table(report["checks"]),
             "", command_line(report["command"])]
    if report.get("note"):
        lines += ["", f"Note: {report['note']}"]
    return "\n".join(lines) + "\n"


# --- the plot and the files -----------------------------------------------------------------------------------


BASELINE_LINES = (("tensor_parallel", "--", "gray", "tensor parallel (PT weights)"),
                  ("no_sync_bound", ":", "gray", "no-sync bound (D = L)"),
                  ("transformers_llama", "-.", "tab:red", "transformers Llama (its TP)"))


def plot(rows: list[dict], path: Path, title: str) -> None:
    """TTFT and TPOT of the pt_D rows against D (medians, p10–p90), pt_moe as a point, the baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {row["name"]: row for row in rows}
    pt_rows = sorted((row for row in rows if row["name"].startswith("pt_D")), key=lambda row: row["track_block_depth"])
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, metric, metric_title in zip(axes, ("ttft", "tpot"), ("TTFT (prefill)", "TPOT (decode step)")):
        if pt_rows:
            depths = [row["track_block_depth"] for row in pt_rows]
            medians = [row[f"{metric}_ms"]["median"] for row in pt_rows]
            low = [m - row[f"{metric}_ms"]["p10"] for m, row in zip(medians, pt_rows)]
            high = [row[f"{metric}_ms"]["p90"] - m for m, row in zip(medians, pt_rows)]
            axis.errorbar(depths, medians, yerr=[low, high], marker="o", capsize=3, label="PT (median, p10–p90)")
            axis.set_xscale("log", base=2)
            axis.set_xticks(depths, [str(d) for d in depths])
        if "pt_moe" in by_name:
            row = by_name["pt_moe"]
            axis.plot([row["track_block_depth"]], [row[f"{metric}_ms"]["median"]], "s", color="tab:green",
                      label="PT-MoE, same active parameters")
        for name, style, color, label in BASELINE_LINES:
            if name in by_name:
                axis.axhline(by_name[name][f"{metric}_ms"]["median"], linestyle=style, color=color, label=label)
        axis.set_xlabel("track block depth D")
        axis.set_ylabel("ms (median)")
        axis.set_title(metric_title)
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_title(report: dict) -> str:
    env, model = report["environment"], report["model"]
    return (f"W={env['world_size']}, {env['device_name']}, {model['dtype']}, L={model['layers']} "
            f"d={model['hidden_size']} n={model['num_tracks']}")


def write_files(prefix: Path, report: dict, table: str, title: str) -> None:
    """PREFIX.json (the whole report), PREFIX.md (`table`) and PREFIX.png (the plot of report["variants"])."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(table)
    plot(report["variants"], prefix.with_suffix(".png"), title)
