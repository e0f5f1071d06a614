"""Bad input gets an early error that names it: broken checkpoints, bad model inputs, paths the scripts cannot write.

Each case is compared with what the unchecked code did (an anonymous safetensors/IndexError/reshape error, a silent
cast or a silently accepted mask, a script that exits 0 having written nothing); valid inputs next to them must keep
working, in the forms transformers itself passes.
"""

import json
import logging
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.testing_utils import CaptureLogger

import modeling_ptt.distributed_ptt as distributed
import modeling_ptt.modeling_parallel_track as modeling
from helpers import ROOT, SUPPORT, child_env, run_launcher, tiny_model
from modeling_ptt import PTForCausalLM, PTModel, check_batch


LOADS = {"plain": {}, "track_parallel": {"tp_size": 1}}  # transformers' loader, and this package's slice reader
VOCAB = 97  # helpers.TINY


# --- checkpoints -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad_input") / "model"
    tiny_model(num_tracks=2).save_pretrained(path)
    return path


def broken_copy(saved: Path, tmp_path: Path, content: bytes, name: str = "model.safetensors") -> Path:
    shutil.copytree(saved, tmp_path / "model")
    (tmp_path / "model" / name).write_bytes(content)
    return tmp_path / "model"


def weights(saved: Path) -> bytes:
    return (saved / "model.safetensors").read_bytes()


@pytest.mark.parametrize("load", LOADS)
def test_a_truncated_safetensors_file_is_named(saved, tmp_path, load):
    data = weights(saved)
    path = broken_copy(saved, tmp_path, data[: len(data) * 2 // 3])  # an interrupted download or copy
    with pytest.raises(OSError, match=rf"{path / 'model.safetensors'} .*tensor '[\w.]+' ends at byte \d+ .*truncated"):
        PTForCausalLM.from_pretrained(path, **LOADS[load])


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("case", ["garbage", "header_not_json", "shorter_than_a_header"])
def test_a_garbage_safetensors_header_is_named(saved, tmp_path, load, case):
    data = weights(saved)
    header_size = struct.unpack("<Q", data[:8])[0]
    content = {
        "garbage": b"<html>not found</html>" * 50,  # what a proxy serves for a missing file
        "header_not_json": data[:8] + b"\xff" * header_size + data[8 + header_size:],
        "shorter_than_a_header": b"\x01\x02",
    }[case]
    path = broken_copy(saved, tmp_path, content)
    with pytest.raises(OSError, match=rf"{path / 'model.safetensors'} is not a valid safetensors file"):
        PTForCausalLM.from_pretrained(path, **LOADS[load])


@pytest.mark.parametrize("load", LOADS)
def test_a_corrupt_shard_index_is_named(tmp_path, load):
    path = tmp_path / "model"
    tiny_model(num_tracks=2).save_pretrained(path, max_shard_size="20KB")
    (path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(OSError, match=rf"{path / 'model.safetensors.index.json'} is not a safetensors index"):
        PTForCausalLM.from_pretrained(path, **LOADS[load])


@pytest.mark.parametrize("load", LOADS)
@pytest.mark.parametrize("stored", [torch.int64, torch.bool])
def test_a_tensor_stored_as_integers_is_refused_naming_it_and_both_dtypes(saved, tmp_path, load, stored):
    state = load_file(saved / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(stored)  # loaded cast to float, silently, before
    shutil.copytree(saved, tmp_path / "model")
    save_file(state, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    for dtype, loaded_as in ((None, torch.float32), (torch.bfloat16, torch.bfloat16)):
        with pytest.raises(ValueError, match=rf"model\.safetensors: tensor 'model\.norm\.weight' is stored as "
                                             rf"{stored}, but the model loads it as {loaded_as}"):
            PTForCausalLM.from_pretrained(tmp_path / "model", dtype=dtype, **LOADS[load])


@pytest.mark.parametrize("model_class", [PTForCausalLM, PTModel])
def test_an_integer_tensor_that_is_none_of_the_models_is_left_to_transformers(saved, tmp_path, model_class):
    # transformers reports a tensor the model does not have as unexpected and loads nothing from it: no cast to refuse
    # (its common test `test_model_weights_reload_no_missing_tied_weights` saves such a checkpoint)
    state = load_file(saved / "model.safetensors")
    state["step"] = torch.tensor([7])
    shutil.copytree(saved, tmp_path / "model")
    save_file(state, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    model, info = model_class.from_pretrained(tmp_path / "model", output_loading_info=True)
    assert "step" in info["unexpected_keys"] and not info["missing_keys"]
    # one of the model's own, under the name transformers maps to it (a base model strips the head's `model.`), is not
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int64)
    save_file(state, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' is stored as torch\.int64"):
        model_class.from_pretrained(tmp_path / "model")


@pytest.mark.parametrize("load", LOADS)
def test_tensors_the_model_does_not_have_are_reported_and_the_rest_loads(saved, tmp_path, load, input_ids):
    """As transformers does (its common test adds an int64 tensor named `tensor`): not refused as a wrong dtype or
    as "not a parameter", but reported as unexpected, and the model's own weights load."""
    state = load_file(saved / "model.safetensors")
    state["tensor"] = torch.arange(5)
    state["model.layers.0.extra.weight"] = torch.ones(3)
    shutil.copytree(saved, tmp_path / "model")
    save_file(state, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    # transformers' loader reports on its logger, the track-parallel one on this package's
    with CaptureLogger(logging.getLogger("transformers")) as ours, CaptureLogger(distributed.logger) as theirs:
        model = PTForCausalLM.from_pretrained(tmp_path / "model", **LOADS[load]).eval()
    report = ours.out + theirs.out
    assert re.search(r"\btensor\b", report) and "model.layers.0.extra.weight" in report
    with torch.no_grad():
        expected = PTForCausalLM.from_pretrained(saved).eval()(input_ids).logits
        torch.testing.assert_close(model(input_ids).logits, expected, atol=0, rtol=0)


def test_a_quantized_checkpoints_integer_tensors_are_its_quantizers_format(saved, tmp_path):
    """torchao's int8 data beside its scales, say: the integer check stays out of the way of a model whose config (or
    call) names a quantization, while it still covers the same names unquantized."""
    assert distributed.model_tensor_names(PTForCausalLM, saved, None, {})("model.norm.weight")
    shutil.copytree(saved, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "torchao", "quant_type": "int8_weight_only"}
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    assert not distributed.model_tensor_names(PTForCausalLM, tmp_path / "model", None, {})("model.norm.weight")


@pytest.mark.parametrize("load", LOADS)
def test_a_float_tensor_of_another_dtype_is_cast_as_before(saved, tmp_path, load):
    state = load_file(saved / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.float16)
    shutil.copytree(saved, tmp_path / "model")
    save_file(state, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    model = PTForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32, **LOADS[load])
    assert model.model.norm.weight.dtype == torch.float32
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"].float())


def test_a_train_config_that_is_not_json_is_named(tmp_path):
    from modeling_ptt.training.trainer import build_config
    from train import parse_args

    config = tmp_path / "ptt.json"
    config.write_text("hidden_size: 64\n")  # YAML, not JSON
    with pytest.raises(ValueError, match=rf"--config {config} is not a JSON file"):
        build_config(parse_args(["--config", str(config)]), tokenizer=None)


def test_a_projection_config_that_is_not_json_is_named(tmp_path):
    config = tmp_path / "ptt.json"
    config.write_bytes(b"\x89PNG\r\n")
    done = subprocess.run([sys.executable, str(ROOT / "scripts/project_multi_gpu.py"), "--config", str(config),
                           "--compute", "roofline"], env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"--config {config} is not a JSON file" in done.stderr, done.stderr[-2000:]


# --- what the forward and generate() are given -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> PTForCausalLM:
    return tiny_model()


IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])


@pytest.mark.parametrize("bad_id,where", [(VOCAB, (1, 2)), (VOCAB + 1000, (0, 0)), (-1, (0, 3))])
def test_a_token_id_out_of_the_vocabulary_is_named(model, bad_id, where):
    """Before: an anonymous IndexError on the CPU; on CUDA a device-side assert that ends the process."""
    ids = IDS.clone()
    ids[where] = bad_id
    message = rf"input_ids holds token id {bad_id} at position \({where[0]}, {where[1]}\): ids must be in \[0, " \
              rf"vocab_size={VOCAB}\)"
    with pytest.raises(ValueError, match=message):
        model(ids)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=2, do_sample=False)


def test_float_token_ids_are_named(model):
    with pytest.raises(ValueError, match=r"input_ids has dtype torch\.float32: token ids are integers"):
        model(IDS.float())


@pytest.mark.parametrize("call", ["forward", "generate"])
def test_an_empty_prompt_is_named(model, call):
    """Before: a reshape error from inside attention (forward), an IndexError from generate()."""
    empty = IDS[:, :0]
    with pytest.raises(ValueError, match=r"input_ids has shape \(2, 0\): every sequence needs at least one token"):
        model(empty) if call == "forward" else model.generate(empty, max_new_tokens=2)


def test_inputs_embeds_of_the_wrong_width_are_named(model):
    for embeds in (torch.randn(2, 4, 31), torch.randn(4, 32)):
        with pytest.raises(ValueError, match=re.escape(f"inputs_embeds has shape {tuple(embeds.shape)}, expected "
                                                       "(batch, sequence_length, hidden_size=32)")):
            model(inputs_embeds=embeds)


@pytest.mark.parametrize("labels_shape", [(2, 3), (1, 4), (2, 4, 1)])
def test_labels_whose_shape_differs_from_the_inputs_are_named(model, labels_shape):
    labels = torch.zeros(labels_shape, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"labels has shape \({', '.join(map(str, labels_shape))}\), expected "
                                         r"\(2, 4\)"):
        model(IDS, labels=labels)


def test_labels_out_of_the_vocabulary_are_named_and_minus_100_is_ignored(model):
    labels = IDS.clone()
    labels[0, 0] = -100
    assert model(IDS, labels=labels).loss.isfinite()
    labels[1, 1] = VOCAB
    with pytest.raises(ValueError, match=rf"labels holds token id {VOCAB} at position \(1, 1\).*-100 \(ignored\)"):
        model(IDS, labels=labels)


@pytest.mark.parametrize("mask_shape", [(2, 3), (2, 5), (1, 4), (3, 4)])
def test_a_padding_mask_that_does_not_fit_the_input_is_named(model, mask_shape):
    """Before: accepted silently, and the logits computed with a mask of other tokens (a silent wrong answer)."""
    with pytest.raises(ValueError, match=rf"attention_mask has shape \({mask_shape[0]}, {mask_shape[1]}\), "
                                         r"expected \(2, 4\)"):
        model(IDS, attention_mask=torch.ones(mask_shape, dtype=torch.long))


def test_a_padding_mask_must_cover_the_cached_tokens_too(model):
    with torch.no_grad():
        cache = model(IDS, use_cache=True).past_key_values
        step = IDS[:, :1]
        with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 1\), expected \(2, 5\).*"
                                             r"\(4 cached \+ 1 new\)"):
            model(step, attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=cache)
        # the mask of cached + new tokens is what generate() passes: it works, and equals the full forward
        stepped = model(step, attention_mask=torch.ones(2, 5, dtype=torch.long), past_key_values=cache).logits
        full = model(torch.cat([IDS, step], 1)).logits[:, -1:]
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_the_mask_forms_transformers_passes_keep_working(model):
    """Left padding with a dynamic and a static cache (whose 2-D mask generate() turns into a dict per layer type),
    and a prepared 4-D mask."""
    ids, mask = IDS.clone(), torch.ones_like(IDS)
    ids[0, :2], mask[0, :2] = 0, 0
    dynamic = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    static = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    with torch.no_grad():
        prepared = model(IDS, attention_mask=causal.expand(2, 1, 4, 4)).logits
        torch.testing.assert_close(prepared, model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_token_ids_are_read_at_generate_entry_and_prefill_only(model, monkeypatch):
    """No host sync per decoding step: the values are checked twice per generate() (its entry, the prefill forward),
    whatever the number of new tokens, with a dynamic and a static cache."""
    reads = []
    check = modeling.check_token_ids
    monkeypatch.setattr(modeling, "check_token_ids",
                        lambda name, *args, **kwargs: reads.append(name) or check(name, *args, **kwargs))
    for cache_implementation in (None, "static"):
        reads.clear()
        model.generate(IDS, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                       cache_implementation=cache_implementation)
        assert reads == ["input_ids", "input_ids"], cache_implementation


class HostReads(TorchDispatchMode):
    """Counts what reads a tensor's values back to the host: the ops that sync (`.item()`, `bool()`, `int()` reach
    `_local_scalar_dense`; `nonzero` sizes its output from the values), copies to the CPU, and `.tolist()` (which
    copies outside the dispatcher, so it is wrapped)."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}

    def __init__(self, monkeypatch):
        super().__init__()
        self.reads = []
        tolist = torch.Tensor.tolist
        monkeypatch.setattr(torch.Tensor, "tolist", lambda t: self.reads.append("tolist") or tolist(t))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        to_host = func is torch.ops.aten._to_copy.default and torch.device(kwargs.get("device") or args[0].device) \
            .type == "cpu" and args[0].device.type != "cpu"
        if func in self.SYNCING or to_host:
            self.reads.append(str(func))
        return func(*args, **kwargs)


def test_a_dense_training_forward_on_an_accelerator_reads_no_values(monkeypatch):
    """0 host syncs per training step (forward, loss and backward) of a dense PT model on a device. The meta device
    stands in for an accelerator: any read of a value fails there. The same counter sees the reads an eval forward
    (a prefill) and a training forward in host memory still make."""
    for device, mode, reads in (("meta", "train", 0), ("cpu", "train", 2), ("cpu", "eval", 2)):
        model = getattr(tiny_model(num_tracks=2, track_block_depth=2).to(device), mode)()
        ids = IDS.to(device)
        with HostReads(monkeypatch) as counter:
            loss = model(ids, labels=ids, use_cache=False).loss
            if mode == "train":
                loss.backward()
        assert len(counter.reads) == reads, (device, mode, counter.reads)


def test_check_batch_refuses_what_the_forward_refuses(model):
    """What a training loop calls once per batch while the batch is on the CPU: the forward's errors."""
    check_batch(model.config, IDS, labels=IDS)
    ids, labels = IDS.clone(), IDS.clone()
    ids[1, 2], labels[1, 1] = VOCAB, VOCAB
    with pytest.raises(ValueError, match=rf"input_ids holds token id {VOCAB} at position \(1, 2\): ids must be in"):
        check_batch(model.config, ids, labels=IDS)
    with pytest.raises(ValueError, match=rf"labels holds token id {VOCAB} at position \(1, 1\).*-100 \(ignored\)"):
        check_batch(model.config, IDS, labels=labels)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 3\), expected \(2, 4\)"):
        check_batch(model.config, IDS, labels=IDS[:, :3])
    with pytest.raises(ValueError, match=r"input_ids has dtype torch\.float32"):
        check_batch(model.config, IDS.float())


def test_train_refuses_a_token_id_out_of_the_vocabulary_before_training(corpus, tmp_path, monkeypatch):
    """train.py's Trainer checks its training blocks on the CPU, before the first step, with the forward's error."""
    from helpers import TRAIN_ARGS
    from modeling_ptt.training import trainer
    from train import parse_args

    prepare = trainer.prepare_data

    def with_a_bad_id(args):
        tokenizer, train_blocks, *rest = prepare(args)
        train_blocks[1, 2] = len(tokenizer)  # a tokenizer whose ids pass its own length
        return tokenizer, train_blocks, *rest

    monkeypatch.setattr(trainer, "prepare_data", with_a_bad_id)
    monkeypatch.setattr(trainer.Trainer, "train_step", lambda *a: pytest.fail("trained on blocks it cannot train on"))
    with pytest.raises(ValueError, match=r"input_ids holds token id \d+ at position \(1, 2\): ids must be in \[0, "
                                         r"vocab_size=\d+\)"):
        trainer.training_function(parse_args(["--data", str(corpus), "--output-dir", str(tmp_path / "out"),
                                              *TRAIN_ARGS]))


def test_the_checks_compile_without_a_graph_break(model):
    compiled = torch.compile(model.forward, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)


def test_generating_past_max_position_embeddings_warns_once_naming_the_lengths(model):
    """Before: transformers' generic reminder, only once the sequence had passed the limit mid-generation."""
    limit = model.config.max_position_embeddings
    prompt = torch.randint(3, VOCAB, (1, limit - 3), generator=torch.Generator().manual_seed(0))
    logger = logging.getLogger(modeling.__name__)
    with CaptureLogger(logger) as within:
        model.generate(prompt, max_new_tokens=3, do_sample=False)
    assert "max_position_embeddings" not in within.out
    with CaptureLogger(logger) as beyond:
        output = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert output.shape[1] == limit + 2, "it generates, with a warning"
    assert beyond.out.count(f"the prompt ({limit - 3} tokens) plus max_new_tokens (5) reaches position {limit + 2}, "
                            f"beyond max_position_embeddings={limit}") == 1, beyond.out


# --- track parallelism: every rank raises the same error, and stays in step ---------------------------------------


def test_every_rank_raises_the_same_error(saved, tmp_path):
    data = weights(saved)
    truncated = broken_copy(saved, tmp_path, data[: len(data) // 2])
    out = tmp_path / "observed"
    out.mkdir()
    run_launcher([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node=2",
                  str(SUPPORT / "bad_input_worker.py"), "--model", str(saved), "--truncated", str(truncated),
                  "--out", str(out)], child_env())
    first, second = (json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2))
    assert first == second
    assert first["token_id"].startswith(f"ValueError: input_ids holds token id {VOCAB} at position (0, 1)")
    assert first["empty_prompt"].startswith("ValueError: input_ids has shape (1, 0)")
    assert first["attention_mask"].startswith("ValueError: attention_mask has shape (1, 2), expected (1, 3)")
    assert first["truncated"].startswith(f"OSError: {truncated / 'model.safetensors'} is not a valid safetensors")


# --- scripts that cannot write what they promise -------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from helpers import tiny_llama

    path = tmp_path_factory.mktemp("llama") / "llama"
    tiny_llama().save_pretrained(path)
    return path


@pytest.mark.parametrize("target", ["existing_file", "below_a_file"])
def test_convert_llama_into_a_file_fails_naming_it(llama_dir, tmp_path, target):
    """Before: exit 0 with nothing written (transformers only logs that the path should be a directory)."""
    blocker = tmp_path / "out"
    blocker.write_text("precious")
    out = blocker if target == "existing_file" else blocker / "model"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/convert_llama.py"), str(llama_dir), str(out),
                           "--num-tracks", "2"], env=child_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stdout[-2000:]
    assert f"cannot write the converted model to {out}" in done.stderr, done.stderr[-2000:]
    assert blocker.read_text() == "precious"


def blocked_paths(tmp_path: Path) -> list[Path]:
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    return [blocker, blocker / "below"]


def test_quality_sweep_and_demo_fail_before_training_naming_the_directory(tmp_path, monkeypatch):
    import demo
    import quality_sweep
    from modeling_ptt.training import trainer

    monkeypatch.setattr(trainer, "training_function",
                        lambda args: pytest.fail("trained although the output cannot be written"))
    for out in blocked_paths(tmp_path):
        with pytest.raises(SystemExit, match=rf"cannot write the sweep's results to {out}"):
            quality_sweep.main(["--output-dir", str(out)])
        with pytest.raises(SystemExit, match=rf"cannot write the demo model to {out}"):
            demo.main(["--output-dir", str(out)])


def test_benchmark_fails_before_measuring_naming_the_output(tmp_path, monkeypatch):
    import benchmark

    monkeypatch.setattr(benchmark, "build_models", lambda *a: pytest.fail("measured although it cannot write"))
    blocker = blocked_paths(tmp_path)[0]
    with pytest.raises(SystemExit, match=rf"cannot write the benchmark results to {blocker}: it exists and is not"):
        benchmark.main(["--quick", "--out", str(blocker / "w1")])


def test_project_multi_gpu_fails_naming_its_json_output(tmp_path):
    out = blocked_paths(tmp_path)[1] / "projection.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts/project_multi_gpu.py"), "--compute", "roofline",
                           "--json", str(out)], env=child_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and f"cannot write the projection to {out}" in done.stderr, done.stderr[-2000:]


def test_output_path_checks_accept_what_can_be_written(tmp_path):
    from script_io import check_output_dir, check_output_file

    assert check_output_dir(tmp_path / "new" / "nested", "x") == tmp_path / "new" / "nested"
    assert not (tmp_path / "new").exists(), "nothing is created before the work succeeds"
    (tmp_path / "file.json").write_text("{}")
    check_output_file(tmp_path / "file.json", "x")
    with pytest.raises(SystemExit, match=rf"cannot write x to {tmp_path}: it is a directory"):
        check_output_file(tmp_path, "x")
