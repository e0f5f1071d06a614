"""PEFT on PT with the configs written for Llama and Mixtral (`import modeling_ptt.peft_ptt`): one LoRA adapter per
track, PT-MoE's experts through `target_parameters`, merging, saving and reloading, and clear refusals."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, child_env, require, tiny_llama, tiny_model

peft = require("peft", extra="finetune")
import modeling_ptt.peft_ptt  # noqa: E402,F401  (the one line users add)
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model  # noqa: E402

from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: E402

from modeling_ptt import PTForCausalLM  # noqa: E402
from modeling_ptt.peft_ptt import adapter_for_vllm  # noqa: E402

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SPARSE = dict(mlp_layer_types=["sparse"] * 5, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.fixture
def input_ids():
    return torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))


def train_steps(model, input_ids, steps: int = 5) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def adapted_modules(model) -> set[str]:
    return {name.removeprefix("base_model.model.") for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], LLAMA_PROJECTIONS, "all-linear"])
def test_llamas_lora_configs_train_one_adapter_per_track(targets, input_ids):
    pt = get_peft_model(tiny_model(), LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.1))
    llama = get_peft_model(tiny_llama(), LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.1))
    # the same projections of every layer; "all-linear" leaves out the LM head on both
    assert adapted_modules(pt) == adapted_modules(llama)
    num_tracks = pt.config.num_tracks
    expected_trainable = 0
    for name, module in pt.named_modules():
        if hasattr(module, "lora_A"):
            base = module.get_base_layer()
            assert module.lora_A["default"].weight.shape == (num_tracks, 4, base.in_features), name
            assert module.lora_B["default"].weight.shape == (num_tracks, base.out_features, 4), name
            expected_trainable += num_tracks * 4 * (base.in_features + base.out_features)
    assert pt.get_nb_trainable_parameters()[0] == expected_trainable
    for model in (pt, llama):
        losses = train_steps(model, input_ids)
        assert losses[-1] < losses[0] - 0.05, losses


def test_a_one_track_model_with_lora_is_llama_with_lora(input_ids):
    """The oracle: PEFT's own LoRA on transformers' Llama. A one-track PT model converted from that Llama, given the
    same adapter weights, gives the same logits, adapters unmerged and merged."""
    llama = tiny_llama()
    pt = PTForCausalLM.from_llama(llama, num_tracks=1)
    config = dict(target_modules=LLAMA_PROJECTIONS, r=4, lora_alpha=16, init_lora_weights=False)
    llama, pt = get_peft_model(llama, LoraConfig(**config)), get_peft_model(pt, LoraConfig(**config))
    llama_layers = dict(llama.named_modules())
    for name, module in pt.named_modules():
        if hasattr(module, "lora_A"):
            for factor in ("lora_A", "lora_B"):
                getattr(module, factor)["default"].weight.data[0] = getattr(llama_layers[name], factor)["default"].weight
    with torch.no_grad():
        expected = llama(input_ids=input_ids).logits
        with llama.disable_adapter():
            assert (expected - llama(input_ids=input_ids).logits).abs().max() > 1e-2  # the adapters do something
        torch.testing.assert_close(pt(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(pt.merge_and_unload()(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)


def test_each_track_gets_its_own_update(input_ids):
    """Merging by hand, track by track (`W[t] += scaling * B[t] @ A[t]`), gives the adapted model's logits."""
    model = get_peft_model(tiny_model(), LoraConfig(target_modules="all-linear", r=2, lora_alpha=4,
                                                    init_lora_weights=False, use_rslora=True))
    by_hand = tiny_model()
    layers = dict(by_hand.named_modules())
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
            assert module.scaling["default"] == 4 / 2 ** 0.5
            weight = layers[name.removeprefix("base_model.model.")].weight.data
            for track in range(weight.shape[0]):
                weight[track] += module.scaling["default"] * B[track] @ A[track]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, by_hand(input_ids=input_ids).logits,
                                   atol=1e-5, rtol=0)


def test_pt_moe_experts_take_adapters_as_mixtrals_do(input_ids):
    model = tiny_model(**SPARSE)
    experts_shape = model.model.layers[0].mlp.experts.gate_up_proj.shape
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS, r=2))
    losses = train_steps(peft_model, input_ids)
    assert losses[-1] < losses[0] - 0.05, losses
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=input_ids).logits
        assert (adapted - tiny_model(**SPARSE)(input_ids=input_ids).logits).abs().max() > 1e-3
        merged = peft_model.merge_and_unload()
        # the checkpoint layout is untouched: dim 0 stays the track
        assert merged.model.layers[0].mlp.experts.gate_up_proj.shape == experts_shape
        torch.testing.assert_close(merged(input_ids=input_ids).logits, adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "pt_moe"])
def test_adapters_save_and_reload(sparse, tmp_path, input_ids):
    options = SPARSE if sparse else {}
    tiny_model(**options).save_pretrained(tmp_path / "base")
    config = LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear",
                        target_parameters=EXPERTS if sparse else None, r=2, lora_bias=not sparse)
    model = get_peft_model(PTForCausalLM.from_pretrained(tmp_path / "base"), config)
    train_steps(model, input_ids, steps=2)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits
        reloaded = PeftModel.from_pretrained(PTForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        torch.testing.assert_close(reloaded.eval()(input_ids=input_ids).logits, expected, atol=1e-6, rtol=0)
        auto = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
        torch.testing.assert_close(auto(input_ids=input_ids).logits, expected, atol=1e-6, rtol=0)
        # a base model loaded through remote code has its own copies of PT's classes
        remote_class = get_class_from_dynamic_module("modeling_parallel_track.PTForCausalLM", tmp_path / "base")
        assert remote_class is not PTForCausalLM
        remote = PeftModel.from_pretrained(remote_class.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        torch.testing.assert_close(remote.eval()(input_ids=input_ids).logits, expected, atol=1e-6, rtol=0)


def test_dropout_applies_in_training_only(input_ids):
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], lora_dropout=0.5,
                                                     init_lora_weights=False))
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)
        model.eval()
        torch.testing.assert_close(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


def test_each_sample_of_a_batch_takes_its_own_adapter(input_ids):
    model = get_peft_model(tiny_model(), LoraConfig(target_modules=["v_proj", "down_proj"], init_lora_weights=False),
                           adapter_name="first")
    model.add_adapter("second", LoraConfig(target_modules=["v_proj", "down_proj"], init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=["second", "__base__"]).logits
        model.set_adapter("second")
        torch.testing.assert_close(mixed[0], model(input_ids=input_ids[:1]).logits[0], atol=1e-5, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(mixed[1], model(input_ids=input_ids[1:]).logits[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["IA3Config", "LoHaConfig", "LoKrConfig", "OFTConfig"])
def test_other_peft_methods_on_track_layers_name_lora(method):
    options = dict(feedforward_modules=[]) if method == "IA3Config" else {}
    config = getattr(peft, method)(target_modules=["q_proj"], **options)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*take LoRA \(peft\.LoraConfig\)"):
        get_peft_model(tiny_model(), config)


@pytest.mark.parametrize("options, named", [
    (dict(use_dora=True), "DoRA"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
])
def test_lora_options_the_track_layers_cannot_take_are_refused(options, named):
    with pytest.raises(ValueError, match=named):
        get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], **options))


def test_lora_without_targets_takes_llamas_default():
    model = get_peft_model(tiny_model(), LoraConfig())
    assert set(model.peft_config["default"].target_modules) == {"q_proj", "v_proj"}
    assert adapted_modules(model) == adapted_modules(get_peft_model(tiny_llama(), LoraConfig()))


def test_the_vllm_adapter_holds_each_tracks_factors_as_its_own(tmp_path):
    model = get_peft_model(tiny_model(), LoraConfig(target_modules="all-linear", r=2, lora_bias=True,
                                                     init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_adapter_for_vllm.py"), str(tmp_path / "adapter"),
                    str(tmp_path / "vllm")], check=True, capture_output=True, env=child_env())
    converted = load_file(tmp_path / "vllm" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(converted) == len(saved) * model.config.num_tracks
    for name, factor in saved.items():
        layer, _, rest = name.partition(".layers.")
        index, _, within = rest.partition(".")
        for track in range(model.config.num_tracks):
            assert torch.equal(converted[f"{layer}.layers.{index}.tracks.{track}.{within}"], factor[track]), name
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(LLAMA_PROJECTIONS)


def test_the_vllm_adapter_refuses_what_vllms_pt_model_cannot_serve(tmp_path):
    get_peft_model(tiny_model(**SPARSE), LoraConfig(target_modules=["q_proj"], target_parameters=EXPERTS)
                   ).save_pretrained(tmp_path / "experts")
    with pytest.raises(ValueError, match=r"adapter_config\.json: adapters of PT-MoE's experts"):
        adapter_for_vllm(tmp_path / "experts", tmp_path / "out")
    get_peft_model(tiny_model(), LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
                   ).save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: .*lm_head.* is not a LoRA factor"):
        adapter_for_vllm(tmp_path / "head", tmp_path / "out")
