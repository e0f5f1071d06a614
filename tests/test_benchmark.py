"""Smoke test of scripts/benchmark.py --quick --experts 4 (all variants, pt_moe included): one process and 2 gloo
ranks under torchrun; what its presets stand for; and scripts/benchmark_training.py on 2 ranks.

It checks what the benchmark reports (the JSON schema, the collectives it counted per forward, the output check, the
files), never the timings: those belong to the benchmark's own output, taken on a quiet machine.
"""

import json
import math
import sys
from pathlib import Path

import pytest

import benchmark
from helpers import child_env, run_launcher
from modeling_ptt import PTConfig, PTForCausalLM


ROOT = Path(__file__).resolve().parent.parent
BENCHMARK = ROOT / "scripts" / "benchmark.py"
LAYERS = 4  # --quick's shape
EXPERTS, TOP_K = 4, 2  # per track; pt_moe is merged at D = 8 (--moe-depth's default), as pt_D8
# the experts kernel: transformers' default in one process (grouped_mm where it can dispatch, else eager), chosen
# with --experts-implementation on 2 ranks
EXPERTS_IMPLEMENTATION = {1: None, 2: "eager"}
VARIANTS = ["tensor_parallel", "pt_D1", "pt_D2", "pt_D4", "pt_D8", "no_sync_bound", "transformers_llama", "pt_moe"]
LATENCY_KEYS = {"median", "p10", "p90", "min", "max", "n"}


def run_quick(tmp_path: Path, world_size: int) -> dict:
    prefix = tmp_path / f"w{world_size}"
    launcher = [sys.executable] if world_size == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={world_size}"]
    command = [*launcher, str(BENCHMARK), "--quick", "--experts", str(EXPERTS), "--profile", "--out", str(prefix)]
    if EXPERTS_IMPLEMENTATION[world_size]:
        command += ["--experts-implementation", EXPERTS_IMPLEMENTATION[world_size]]
    run_launcher(command, child_env())
    assert prefix.with_suffix(".png").stat().st_size > 10_000, "the plot was written"
    table = prefix.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in VARIANTS)
    return json.loads(prefix.with_suffix(".json").read_text())


@pytest.fixture(scope="module", params=[1, 2], ids=["one_process", "torchrun_2_ranks"])
def report(request, tmp_path_factory):
    return run_quick(tmp_path_factory.mktemp("benchmark"), request.param)


def test_report_schema(report):
    assert report["schema"] == "modeling_ptt/benchmark/1"
    assert {"argv", "environment"} <= set(report["command"]) and "--quick" in report["command"]["argv"]
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch_threads_per_rank"] == 1
    assert {"python", "torch", "transformers"} <= set(env["versions"])
    assert report["model"]["dtype"] == "float32" and report["model"]["layers"] == LAYERS
    assert [row["name"] for row in report["variants"]] == VARIANTS
    for row in report["variants"]:
        for metric in ("ttft_ms", "tpot_ms"):
            assert set(row[metric]) == LATENCY_KEYS
            assert 0 < row[metric]["min"] <= row[metric]["median"] <= row[metric]["max"]
        assert row["ttft_ms"]["n"] == report["workload"]["repeats"]
        assert row["tpot_ms"]["n"] == report["workload"]["repeats"] * (report["workload"]["new_tokens"] - 1)
        assert row["throughput_tokens_per_s"]["median"] > 0
        assert len(row["peak_memory_bytes_per_rank"]) == env["world_size"]
        assert all(peak > 0 for peak in row["peak_memory_bytes_per_rank"])
        assert len(row["median_ms_per_rank"]) == env["world_size"]
    assert {target["name"] for target in report["targets"]} == set(report["ratios"])
    assert len(report["decode_profile_per_rank"]) == env["world_size"]
    for profiled in report["decode_profile_per_rank"]:
        assert list(profiled) == VARIANTS
        assert all(cost["wall_ms_per_step"] > 0 and cost["aten_ms"] > 0 for cost in profiled.values())
    assert (report["bare_all_reduce_ms"] is None) == (env["world_size"] == 1)


def test_outputs_of_pt_in_tensor_parallel_layout_match_the_llama(report):
    (item,) = report["checks"]
    assert item["passed"] and item["relative_error"] < 1e-4


def test_collectives_per_forward(report):
    rows = {row["name"]: row for row in report["variants"]}
    world_size = report["environment"]["world_size"]
    for name, row in rows.items():
        for phase in ("prefill", "decode"):
            counted = row["collectives"][phase]
            if world_size == 1:
                assert counted == {}, (name, phase)
            elif name == "transformers_llama":
                # transformers' TP plan for Llama: o_proj and down_proj reduce, the LM head's logits are gathered;
                # 5.24 also shards the embedding by vocabulary (one more all_reduce), 5.17 replicates it
                embedding = {"_c10d_functional.all_reduce": 1} if "_c10d_functional.all_reduce" in counted else {}
                assert counted == {"c10d.allreduce_": 2 * LAYERS, "_c10d_functional.all_gather_into_tensor": 1,
                                   **embedding}, (name, phase)
            else:
                depth = row["track_block_depth"]
                merges = 2 * LAYERS if name == "tensor_parallel" else math.ceil(LAYERS / depth)
                assert counted == {"c10d.allreduce_": merges} == {"c10d.allreduce_": row["expected_merges"]}, name
    if world_size > 1:
        assert rows["no_sync_bound"]["collectives"]["prefill"] == {"c10d.allreduce_": 1}
    # the experts of a track sit on its rank: routing adds no collective to the dense PT model's ceil(L/D) merges
    assert rows["pt_moe"]["collectives"] == rows["pt_D8"]["collectives"]


def test_each_rank_holds_its_share_of_the_weights(report):
    model, world_size = report["model"], report["environment"]["world_size"]
    d, ffn, layers, n = model["hidden_size"], model["intermediate_size"], model["layers"], model["num_tracks"]
    kv_width = model["kv_heads"] * d // model["heads"]
    shared = 2 * model["vocab_size"] * d + d  # embedding, LM head, final norm: on every rank
    attention_and_norms = 2 * d * d + 2 * d * kv_width + 2 * n * d
    tracks = layers * (attention_and_norms + 3 * d * ffn)  # split over the ranks
    # pt_moe: per track E experts of width (ffn / n) / k and a router [E, d]
    moe_tracks = layers * (attention_and_norms + n * EXPERTS * (3 * d * ffn // n // TOP_K + d))
    rows = {row["name"]: row for row in report["variants"]}
    for name, row in rows.items():
        if name != "transformers_llama":
            expected = moe_tracks if name == "pt_moe" else tracks
            assert row["weight_bytes_per_rank"] == [4 * (shared + expected // world_size)] * world_size, name
    dense = 4 * (shared + tracks - 2 * (n - 1) * layers * d)  # the Llama has one norm vector per layer and kind
    llama = rows["transformers_llama"]["weight_bytes_per_rank"]
    assert llama == [dense] if world_size == 1 else max(llama) < dense, "transformers' TP shards the Llama"


def test_pt_moe_has_the_dense_models_active_parameters_and_its_ratios(report):
    model, world_size = report["model"], report["environment"]["world_size"]
    moe = model["moe"]
    assert (moe["experts"], moe["experts_per_tok"], moe["track_block_depth"]) == (EXPERTS, TOP_K, 8)
    assert moe["moe_intermediate_size"] * TOP_K == model["intermediate_size"] // model["num_tracks"]
    chosen = EXPERTS_IMPLEMENTATION[world_size]
    assert moe["experts_implementation"] in ((chosen,) if chosen else ("grouped_mm", "eager"))
    routers = model["layers"] * model["num_tracks"] * EXPERTS * model["hidden_size"] // world_size
    assert moe["active_parameters_per_rank"] - moe["dense_parameters_per_rank"] == routers
    # the targets: latencies at most 1 / 0.9 of the dense model's, throughput at least 0.9 of it
    targets = {target["name"]: target for target in report["targets"]}
    rows = {row["name"]: row for row in report["variants"]}
    for metric in ("ttft", "tpot"):
        value = rows["pt_moe"][f"{metric}_ms"]["median"] / rows["pt_D8"][f"{metric}_ms"]["median"]
        target = targets[f"pt_moe {metric.upper()} / pt_D8"]
        assert target["value"] == pytest.approx(value) and target["met"] == (value <= 1 / 0.9), target
    median = {name: rows[name]["throughput_tokens_per_s"]["median"] for name in ("pt_moe", "pt_D8")}
    target = targets["throughput pt_moe / pt_D8"]
    value = median["pt_moe"] / median["pt_D8"]
    assert target["value"] == pytest.approx(value) and target["met"] == (value >= 0.9), target


# The flags each preset stands for, written out: the command lines the presets replaced.
PRESET_FLAGS = {
    "single_device": ["--num-tracks", "8", "--kv-heads", "8", "--variants", "pt_D8", "transformers_llama"],
    "moe": ["--num-tracks", "4", "--layers", "4", "--hidden-size", "512", "--heads", "16", "--kv-heads", "16",
            "--intermediate-size", "5888", "--vocab-size", "4096", "--experts", "8", "--experts-per-tok", "2",
            "--depths", "2", "--moe-depth", "2", "--variants", "pt_D2", "pt_moe",
            "--batch", "4", "--prompt-len", "256", "--new-tokens", "17", "--out", "benchmark-results/moe"],
}


@pytest.mark.parametrize("preset", sorted(PRESET_FLAGS))
@pytest.mark.parametrize("extra", [[], ["--quick"], ["--batch", "2", "--out", "elsewhere"]],
                         ids=["alone", "quick", "overridden"])
def test_a_preset_is_its_flags_and_explicit_flags_win(preset, extra):
    chosen = vars(benchmark.parse_args(["--preset", preset, *extra]))
    spelled_out = vars(benchmark.parse_args([*PRESET_FLAGS[preset], *extra]))
    assert chosen.pop("preset") == preset and spelled_out.pop("preset") is None
    assert chosen == spelled_out
    if "--batch" in extra:
        assert (chosen["batch"], chosen["out"]) == (2, "elsewhere")


def test_training_benchmark_counts_collectives_and_state_per_rank(tmp_path):
    """scripts/benchmark_training.py on 2 gloo ranks, tiny shape: every variant reported; per optimizer step
    2*ceil(L/D) + 1 all_reduces track-parallel, 2 + 1 for the no-sync bound (D=L), 4L + 1 in tensor_parallel mode
    (+1: the clipping norm), DDP's buckets data-parallel; a track rank holds exactly half of the track-stacked
    weights plus all the shared ones."""
    layers, depth = 4, 3
    prefix = tmp_path / "training"
    run_launcher([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2",
                  str(ROOT / "scripts" / "benchmark_training.py"), "--layers", str(layers), "--hidden-size", "32",
                  "--intermediate-size", "64", "--heads", "4", "--kv-heads", "2", "--vocab-size", "100", "--depth",
                  str(depth), "--batch", "2", "--seq-len", "16", "--warmup", "1", "--steps", "2", "--output",
                  str(prefix)], child_env())
    results = json.loads(prefix.with_suffix(".json").read_text())["results"]
    assert list(results) == ["track_parallel", "no_sync_bound", "tensor_parallel", "data_parallel"]
    assert results["track_parallel"]["collectives_per_step"] == {"c10d.allreduce_": 2 * math.ceil(layers / depth) + 1}
    assert results["no_sync_bound"]["collectives_per_step"] == {"c10d.allreduce_": 2 + 1}
    assert results["no_sync_bound"]["merges_per_forward"] == 1
    assert results["tensor_parallel"]["collectives_per_step"] == {"c10d.allreduce_": 4 * layers + 1}
    data_parallel = results["data_parallel"]
    assert data_parallel["ddp_bucket_all_reduces_per_step"] >= 1
    assert data_parallel["collectives_per_step"]["c10d.allreduce_"] >= data_parallel["ddp_bucket_all_reduces_per_step"]

    config = PTConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, num_tracks=2)
    model = PTForCausalLM(config)
    track_names = set(model.track_stacked_parameter_names())
    track = sum(p.numel() * 4 for name, p in model.named_parameters() if name in track_names)
    shared = sum(p.numel() * 4 for name, p in model.named_parameters() if name not in track_names)
    assert data_parallel["bytes_per_rank"]["weights"] == track + shared
    for variant in ("track_parallel", "no_sync_bound", "tensor_parallel"):
        held = results[variant]["bytes_per_rank"]
        assert held["weights"] == held["gradients"] == track // 2 + shared
        assert held["optimizer"] == 2 * held["weights"]  # AdamW's two moments
        assert results[variant]["peak_resident_growth_bytes"] > held["weights"]
    table = prefix.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in results)
    bound = results["no_sync_bound"]["step_s"]
    assert f"| track_parallel | {results['track_parallel']['step_s']:.3f} | " in table
    assert f"| {results['track_parallel']['step_s'] / bound:.3f}x |" in table
