"""A saved PT model loads through the Auto classes on a machine that never installed this package."""

import json
from pathlib import Path

import torch

from helpers import run_without_package, tiny_model


def test_save_writes_remote_code_and_auto_map(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    package = Path(__file__).resolve().parent.parent / "modeling_ptt"
    # the vLLM model is imported by vLLM's plugin only, never by the remote code, so it is not copied
    remote_code = {path.name for path in package.glob("*.py")} - {"__init__.py", "vllm_ptt.py"}
    assert {"config.json", "model.safetensors"} | remote_code <= files
    assert "vllm_ptt.py" not in files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_ptt.PTConfig",
        "AutoModel": "modeling_ptt.PTModel",
        "AutoModelForCausalLM": "modeling_ptt.PTForCausalLM",
    }


def test_auto_classes_load_remote_code_without_the_package(tmp_path, input_ids):
    model = tiny_model(tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.save(
            {"input_ids": input_ids, "logits": model(input_ids).logits, "hidden": model.model(input_ids).last_hidden_state},
            tmp_path / "expected.pt",
        )
    result = run_without_package(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        try:
            import modeling_ptt
            raise SystemExit("modeling_ptt must not be importable in this test")
        except ImportError:
            pass
        expected = torch.load("{tmp_path / 'expected.pt'}")
        model = AutoModelForCausalLM.from_pretrained("{tmp_path / 'model'}", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        with torch.no_grad():
            torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], atol=1e-6, rtol=0)
            base = AutoModel.from_pretrained("{tmp_path / 'model'}", trust_remote_code=True).eval()
            torch.testing.assert_close(base(expected["input_ids"]).last_hidden_state, expected["hidden"], atol=1e-6, rtol=0)
        assert model.generate(expected["input_ids"], max_new_tokens=3, do_sample=False).shape[1] == 14
        print("remote code OK")
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "remote code OK" in result.stdout


def test_from_pretrained_rebuilds_rope_frequencies(tmp_path, input_ids):
    """transformers 5 loads on the meta device: non-persistent buffers must be recomputed, not left as garbage."""
    model = tiny_model()
    model.save_pretrained(tmp_path)
    from modeling_ptt import PTForCausalLM

    reloaded = PTForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits, atol=0, rtol=0)
