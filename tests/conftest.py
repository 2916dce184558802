"""Shared fixtures: tiny randomly initialised models and a word-level tokenizer, all built offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_gemma3_config(**overrides):
    from transformers import Gemma3TextConfig

    values = dict(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        sliding_window=4,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    values.update(overrides)
    return Gemma3TextConfig(**values)


def make_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # random init leaves some branches near zero; widen the weights so every block matters
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return make_model(tiny_llama_config())


@pytest.fixture
def tiny_gemma3():
    return make_model(tiny_gemma3_config())


def make_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on the embedded sample; offline and deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from hf_blockcbo.data import embedded_documents

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(embedded_documents("calibration")[:300], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A saved tiny Llama (6 blocks, vocab of the test tokenizer) with its tokenizer: a local 'Hub' model."""
    tok = make_tokenizer()
    config = tiny_llama_config(vocab_size=len(tok))
    model = make_model(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_plain_transformers(script: str, timeout: int = 300, env: dict | None = None) -> dict:
    """Run ``script`` in a fresh interpreter that never imports hf_blockcbo; it prints one JSON line."""
    guard = (
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'hf_blockcbo': raise ImportError('hf_blockcbo must not be imported')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", guard + script], capture_output=True, text=True, timeout=timeout, env=env, cwd="/"
    )
    if out.returncode != 0:
        raise AssertionError(f"plain-transformers subprocess failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
