"""Quantized PT in transformers, beside a Llama of the same shape under the same `quantization_config`: torchao int8
quantizes the track weights as it does Llama's linear layers (share, accuracy, generate, save and reload), and every
method or config that would leave track weights in full precision says so, naming them."""

import json

import pytest
import torch
from safetensors import safe_open

from helpers import AFM_OPTIONS, require, tiny_llama, tiny_model

require("torchao", extra="finetune")
from torchao.quantization import (  # noqa: E402
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
)
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, QuantoConfig, TorchAoConfig  # noqa: E402

from modeling_ptt import PTForCausalLM  # noqa: E402

TRACK_WEIGHTS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A random Llama, the same Llama as PT in tensor-parallel layout (the same function of the same weights, so the
    two quantize the same matrices), and a random PT model in block mode."""
    root = tmp_path_factory.mktemp("quantization")
    llama = tiny_llama()
    models = {"llama": llama, "pt_from_llama": PTForCausalLM.from_llama(llama, 4), "pt": tiny_model()}
    for name, model in models.items():
        model.save_pretrained(root / name)
    return {name: (root / name, model) for name, model in models.items()}


@pytest.fixture
def input_ids():
    return torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def quantized_share(model) -> float:
    """The share of parameter elements held by a quantizer's tensor subclass."""
    sizes = [(param.numel(), type(param) is not torch.nn.Parameter) for param in model.parameters()]
    return sum(size for size, quantized in sizes if quantized) / sum(size for size, _ in sizes)


def load(path, config):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=TorchAoConfig(config)).eval()


@torch.no_grad()
def largest_logit_difference(quantized, model, input_ids) -> float:
    return (quantized(input_ids).logits - model(input_ids).logits).abs().max().item()


@pytest.mark.parametrize("config", [Int8WeightOnlyConfig(), Int8DynamicActivationInt8WeightConfig()],
                         ids=["int8_weight_only", "int8_dynamic_activation"])
@pytest.mark.parametrize("pt_name", ["pt_from_llama", "pt"])
def test_torchao_quantizes_track_weights_as_it_does_llamas_linear_layers(checkpoints, input_ids, config, pt_name):
    llama_path, llama = checkpoints["llama"]
    pt_path, pt = checkpoints[pt_name]
    quantized_llama, quantized_pt = load(llama_path, config), load(pt_path, config)
    for name, module in quantized_pt.named_modules():
        if name.rsplit(".", 1)[-1] in TRACK_WEIGHTS:
            assert type(module.weight).__name__ == "Int8Tensor", name
            assert module.weight.shape[0] == pt.config.num_tracks  # still one matrix per track
    # what transformers leaves out of Llama, PT keeps out too: embedding, head, norms
    assert type(quantized_pt.lm_head.weight) is torch.nn.Parameter
    llama_share = quantized_share(quantized_llama)
    assert llama_share > 0.5
    assert abs(quantized_share(quantized_pt) - llama_share) <= 0.1 * llama_share
    llama_error = largest_logit_difference(quantized_llama, llama, input_ids)
    assert 0 < largest_logit_difference(quantized_pt, pt, input_ids) <= 2 * llama_error


@torch.no_grad()
def test_a_quantized_model_generates_its_own_greedy_tokens(checkpoints, input_ids):
    quantized = load(checkpoints["pt"][0], Int8WeightOnlyConfig())
    generated = quantized.generate(input_ids, max_new_tokens=5, do_sample=False)
    # the cached decode (a few rows per track) gives the tokens a full forward of every prefix picks
    tokens = input_ids
    for _ in range(5):
        tokens = torch.cat([tokens, quantized(tokens).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, tokens)


def test_a_quantized_model_saves_and_reloads_as_llamas_does(checkpoints, input_ids, tmp_path):
    for name in ("llama", "pt"):
        quantized = load(checkpoints[name][0], Int8WeightOnlyConfig())
        quantized.save_pretrained(tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "torchao"
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert quantized_share(reloaded) == quantized_share(quantized)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids).logits, quantized(input_ids).logits, atol=0, rtol=0)
    with safe_open(tmp_path / "pt" / "model.safetensors", "pt") as checkpoint:
        stored = {name: checkpoint.get_slice(name).get_dtype() for name in checkpoint.keys()}
    assert stored["model.layers.0.self_attn.q_proj._weight_qdata"] == "I8"


@pytest.mark.parametrize("quantization_config", [
    BitsAndBytesConfig(load_in_4bit=True), BitsAndBytesConfig(load_in_8bit=True), QuantoConfig(weights="int8"),
], ids=["bnb_4bit", "bnb_8bit", "quanto_int8"])
def test_methods_that_know_only_nn_linear_are_refused_naming_the_track_weights(checkpoints, quantization_config):
    method = quantization_config.quant_method.value
    with pytest.raises(ValueError, match=rf"quantization_config \({method}\).*35 track weights .*"
                                         r"self_attn\.q_proj\.weight.* would stay in full precision"):
        AutoModelForCausalLM.from_pretrained(checkpoints["pt"][0], quantization_config=quantization_config)


def test_a_checkpoint_quantized_by_another_method_is_refused_before_loading(checkpoints, tmp_path):
    """A pre-quantized checkpoint's config asks for its method itself."""
    path = tmp_path / "bnb"
    checkpoints["pt"][1].save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True).to_dict()
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bitsandbytes.*track weights"):
        AutoModelForCausalLM.from_pretrained(path)


def test_torchao_configs_that_cannot_quantize_a_track_weight_say_so(checkpoints):
    with pytest.raises(ValueError, match=r"IntxWeightOnlyConfig cannot quantize model\.layers\.0\.self_attn\.q_proj"):
        load(checkpoints["pt"][0], IntxWeightOnlyConfig())
    # torchao 0.18 has no CPU int4 kernel: it leaves a Llama's linear layers in full precision without a word
    assert quantized_share(load(checkpoints["llama"][0], Int4WeightOnlyConfig())) == 0
    with pytest.raises(ValueError, match=r"Int4WeightOnlyConfig left the 35 track weights .* in full precision"):
        load(checkpoints["pt"][0], Int4WeightOnlyConfig())


def test_pt_moe_experts_stay_in_full_precision_with_a_warning_naming_them(tmp_path, input_ids, caplog):
    model = tiny_model(**AFM_OPTIONS)
    model.save_pretrained(tmp_path)
    with caplog.at_level("WARNING"):
        quantized = load(tmp_path, Int8WeightOnlyConfig())
    assert "the 6 expert weights (model.layers.1.mlp.experts.gate_up_proj" in caplog.text
    assert type(quantized.model.layers[1].mlp.experts.gate_up_proj) is torch.nn.Parameter
    assert type(quantized.model.layers[1].mlp.gate.weight) is torch.nn.Parameter  # routers, as Mixtral's
    assert type(quantized.model.layers[1].self_attn.q_proj.weight).__name__ == "Int8Tensor"
    assert 0 < largest_logit_difference(quantized, model, input_ids) < 0.05


def test_track_parallel_loading_refuses_quantization(checkpoints):
    with pytest.raises(ValueError, match="track parallelism.*quantiz"):
        PTForCausalLM.from_pretrained(checkpoints["pt"][0], tp_size=2,
                                      quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))


def test_lora_trains_on_a_quantized_base_and_refuses_to_merge_into_it(checkpoints, input_ids):
    require("peft", extra="finetune")
    import modeling_ptt.peft_ptt  # noqa: F401
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load(checkpoints["pt"][0], Int8WeightOnlyConfig()), LoraConfig(target_modules="all-linear"))
    optimizer = torch.optim.AdamW([param for param in model.parameters() if param.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="Cannot merge a LoRA adapter into a quantized track weight"):
        model.merge_and_unload()
