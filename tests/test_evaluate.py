"""scripts/eval_perplexity.py: lm-eval's hf client on a saved PT model, offline, against the model's own log-likelihood."""

import json
import math

import pytest
import torch

from helpers import TRAIN_ARGS, require

require("lm_eval")

import eval_perplexity  # noqa: E402
from modeling_ptt.training.trainer import training_function  # noqa: E402
from train import parse_args  # noqa: E402


def test_lm_eval_perplexity_matches_the_model(corpus, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    model_dir = tmp_path / "model"
    training_function(parse_args(["--data", str(corpus), "--output-dir", str(model_dir), "--max-steps", "5", *TRAIN_ARGS]))
    docs = ["Enter the King and his lords.", "Good morrow, my lord; how fares your grace?"]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in docs))

    metrics = eval_perplexity.evaluate(model_dir, data=data, max_length=64)

    # oracle: each document fits one window, so lm-eval scores log p(doc | end-of-text) with the model as is
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    log_likelihood, num_bytes = 0.0, 0
    for text in docs:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) < 64
        inputs = torch.tensor([[tokenizer.eos_token_id, *ids[:-1]]])
        with torch.no_grad():
            log_probs = model(inputs).logits[0].log_softmax(-1)
        log_likelihood += log_probs.gather(-1, torch.tensor(ids)[:, None]).sum().item()
        num_bytes += len(text.encode("utf-8"))
    assert metrics["bits_per_byte"] == pytest.approx(-log_likelihood / num_bytes / math.log(2), rel=1e-4)
    assert metrics["byte_perplexity"] == pytest.approx(math.exp(-log_likelihood / num_bytes), rel=1e-4)


def test_missing_held_out_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="validation.jsonl"):
        eval_perplexity.evaluate(tmp_path)
