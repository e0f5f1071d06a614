"""Pull PT models from a Hub in a fresh process that cannot import this package, as on a user's machine.

    python hub_pull_worker.py JOBS.json

JOBS.json: `{"input_ids": [[...]], "text": "...", "jobs": [{"repo": ..., "revision": ... or null, "out": PATH}]}`.
For each job the model loads through `AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True,
revision=...)`; PATH gets its state dict plus `__logits__` (for `input_ids`) and, when the repo has a tokenizer,
`__tokens__` (`text` encoded by `AutoTokenizer`), as safetensors. One JSON line per job on stdout names the commit the
revision resolved to, the class's module, and the files of that snapshot. `HF_ENDPOINT`, `HF_HOME` and
`HF_HUB_OFFLINE` come from the environment, set by the test before this process imports huggingface_hub.
"""

import json
import os
import sys
from pathlib import Path

import block_package  # noqa: F401  (first: the pull must not find an installed modeling_ptt)

import torch  # noqa: E402
from huggingface_hub import hf_hub_download  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    spec = json.loads(Path(sys.argv[1]).read_text())
    input_ids = torch.tensor(spec["input_ids"])
    for job in spec["jobs"]:
        model = AutoModelForCausalLM.from_pretrained(job["repo"], trust_remote_code=True, revision=job["revision"])
        tensors = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
        with torch.no_grad():
            tensors["__logits__"] = model.eval()(input_ids).logits
        try:
            tokenizer = AutoTokenizer.from_pretrained(job["repo"], revision=job["revision"], trust_remote_code=True)
            tensors["__tokens__"] = torch.tensor(tokenizer(spec["text"]).input_ids)
        except (OSError, ValueError):  # no tokenizer in the repo; a test that expects one checks `__tokens__`
            pass
        save_file(tensors, job["out"])
        snapshot = Path(hf_hub_download(job["repo"], "config.json", revision=job["revision"])).parent
        print(json.dumps({
            "repo": job["repo"],
            "revision": job["revision"],
            "commit": snapshot.name,
            "module": type(model).__module__,
            "files": sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()),
            "offline": os.environ.get("HF_HUB_OFFLINE"),
        }), flush=True)


if __name__ == "__main__":
    main()
