"""A saved PT model loads through the Auto classes on a machine that never installed this package."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from helpers import run_without_package, tiny_model


def test_save_writes_remote_code_and_auto_map(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    files = {path.name for path in tmp_path.iterdir()}
    package = Path(__file__).resolve().parent.parent / "modeling_ptt"
    # the vLLM model and the PEFT integration are imported by their engines' users only, never by the remote code,
    # so they are not copied
    integrations = {"vllm_ptt.py", "peft_ptt.py"}
    remote_code = {path.name for path in package.glob("*.py")} - {"__init__.py"} - integrations
    assert {"config.json", "model.safetensors"} | remote_code <= files
    assert not integrations & files
    # nor is the training library (a subpackage: its modules would be written flat, beside the model's)
    training = {path.name for path in (package / "training").glob("*.py")}
    assert training and not (training - remote_code) & files and "training" not in files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_ptt.PTConfig",
        "AutoModel": "modeling_parallel_track.PTModel",
        "AutoModelForCausalLM": "modeling_parallel_track.PTForCausalLM",
    }
    # a module named like the package would shadow it for any Python started in this folder
    assert not any(name.split(".")[0] == "modeling_ptt" for name in files)


def test_importing_the_package_imports_no_training_code():
    """`modeling_ptt.training` stays out of `import modeling_ptt`, so the model needs none of its `train` extra."""
    result = subprocess.run(
        [sys.executable, "-c", "import sys, modeling_ptt; "
                               "print(sorted(name for name in sys.modules if name.startswith('modeling_ptt.training')))"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


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


def run_in_folder(code: str, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -c code` started inside `folder`, which puts the folder first on `sys.path`, as a script, `python -m`
    or a notebook started there does."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


LOAD_BOTH_WAYS = """
    import sys
    import torch
    from transformers import AutoModelForCausalLM
    expected = torch.load(sys.argv[2])
    with torch.no_grad():
        # remote code first: once the package is imported, its registered classes take precedence
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], atol=1e-6, rtol=0)
        import modeling_ptt
        from modeling_ptt.modeling_parallel_track import PTForCausalLM
        assert modeling_ptt.__file__.endswith("modeling_ptt/__init__.py"), modeling_ptt.__file__
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
        assert type(model) is PTForCausalLM, type(model).__module__
        torch.testing.assert_close(model(expected["input_ids"]).logits, expected["logits"], atol=1e-6, rtol=0)
    print("loaded both ways")
"""


def save_with_expected_logits(model, folder: Path, input_ids) -> Path:
    model.save_pretrained(folder)
    with torch.no_grad():
        torch.save({"input_ids": input_ids, "logits": model(input_ids).logits}, folder.parent / "expected.pt")
    return folder.parent / "expected.pt"


def test_saved_folder_does_not_shadow_the_package(tmp_path, input_ids):
    """Started inside a saved model's folder, Python still imports the installed package and loads the model with
    and without remote code."""
    folder = tmp_path / "my-ptt"
    expected = save_with_expected_logits(tiny_model(), folder, input_ids)
    result = run_in_folder(LOAD_BOTH_WAYS, folder, ".", str(expected))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded both ways" in result.stdout


def save_like_version_0_1(model, folder: Path) -> None:
    """What `save_pretrained` wrote before the model's module was renamed: `modeling_ptt.py` and an auto_map naming
    it."""
    model.save_pretrained(folder)
    (folder / "modeling_parallel_track.py").rename(folder / "modeling_ptt.py")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {key: value.replace("modeling_parallel_track.", "modeling_ptt.")
                          for key, value in config["auto_map"].items()}
    (folder / "config.json").write_text(json.dumps(config))


def test_models_saved_before_the_rename_still_load_and_resaving_ends_the_clash(tmp_path, input_ids):
    folder = tmp_path / "old-ptt"
    model = tiny_model()
    expected = save_with_expected_logits(model, tmp_path / "unused", input_ids)
    save_like_version_0_1(model, folder)
    # outside the folder both ways load, the remote code from the old module name
    result = run_in_folder(LOAD_BOTH_WAYS, tmp_path, str(folder), str(expected))
    assert result.returncode == 0, result.stderr[-3000:]
    # inside it the old file shadows the package, which is what re-saving ends
    assert run_in_folder("import modeling_ptt.modeling_parallel_track", folder).returncode != 0

    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    reloaded.save_pretrained(folder)
    assert not (folder / "modeling_ptt.py").exists() and (folder / "modeling_parallel_track.py").exists()
    result = run_in_folder(LOAD_BOTH_WAYS, folder, ".", str(expected))
    assert result.returncode == 0, result.stderr[-3000:]


def test_resaving_keeps_a_users_own_file_named_like_the_package(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "modeling_ptt.py").write_text("print('my own script')\n")
    tiny_model().save_pretrained(folder)
    assert (folder / "modeling_ptt.py").read_text() == "print('my own script')\n"
