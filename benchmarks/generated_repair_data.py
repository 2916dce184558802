"""Fit the training-free repair on text the unpruned model writes itself: tried, not kept.

    python benchmarks/generated_repair_data.py --model smollm2 \
        --states '{"cbo": [13,14,15,16,17,18], "norm_ratio": [3,12,13,14,17,26], "bi": [13,14,15,17,25,26]}'

Self-generated calibration text is domain-free in the sense that it is whatever the model finds likely. For each
state the repair maps are fitted three ways on 64 windows of 128 tokens: the config's repair data (the embedded
novel), 64 windows the unpruned model samples (seeded, temperature 1, no top-k / top-p; from the BOS token, or EOS
where the tokenizer has no BOS; ``--prompt-tokens N`` starts each from the first N tokens of a novel window instead),
and 32 + 32 of both. Prints, per state, the test perplexity on Persuasion and As You Like It (16 windows each, from
`examples/offline_eval_data.py`) and the share of the pruning's perplexity rise each fit removes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from _models import model_argument  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import CalibrationSet, _bos_prefix, build_calibration_set, repair_samples
from hf_blockcbo.evaluation.likelihood import perplexity
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.repair.least_squares import fit_repair


def generated_windows(model, tokenizer, prompts: torch.Tensor, length: int, seed: int) -> CalibrationSet:
    """One sampled window of ``length`` tokens per row of ``prompts`` (seeded)."""
    torch.manual_seed(seed)
    new = length - prompts.shape[1]
    with torch.no_grad():
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new,
            min_new_tokens=new,
            pad_token_id=tokenizer.eos_token_id,
        )[:, :length]
    return CalibrationSet(out, torch.ones_like(out), "generated")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--states", required=True, help='JSON: {"label": [removed blocks], ...}')
    parser.add_argument("--prompt-tokens", type=int, default=0)
    parser.add_argument("--eval-dir", default="eval_data")
    args = parser.parse_args()
    model_arg = model_argument(args.model)
    model, tokenizer = load_model(resolve_model(model_arg, None), dtype="float32")
    config = BlockRemovalConfig(model=model_arg, seq_len=128, repair_samples=64)
    novel = repair_samples(tokenizer, config)
    tests = {
        name: build_calibration_set(tokenizer, str(Path(args.eval_dir) / file), 16, 128)
        for name, file in (("Persuasion", "austen_persuasion.txt"), ("Shakespeare", "shakespeare_as_you_like_it.txt"))
    }
    if args.prompt_tokens:
        prompts = novel.input_ids[:, : args.prompt_tokens]
    else:
        prompts = torch.tensor([_bos_prefix(tokenizer) or [tokenizer.eos_token_id]] * len(novel))
    began = time.perf_counter()
    generated = generated_windows(model, tokenizer, prompts, config.seq_len, config.seed)
    print(f"generated {len(generated)} windows in {time.perf_counter() - began:.1f} s", flush=True)
    mixed = CalibrationSet(
        torch.cat([novel.input_ids[:32], generated.input_ids[:32]]),
        torch.cat([novel.attention_mask[:32], generated.attention_mask[:32]]),
        "novel + generated",
    )
    unpruned = {name: perplexity(model, test) for name, test in tests.items()}
    print("unpruned", json.dumps(unpruned), flush=True)
    for label, blocks in json.loads(args.states).items():
        pruned = {name: perplexity(model, test, blocks) for name, test in tests.items()}
        row = {"state": label, "blocks": blocks, "pruned": pruned}
        for fit, data in (("novel", novel), ("generated", generated), ("half", mixed)):
            repair = fit_repair(model, blocks, data, config.repair_settings)
            with repair.applied(model):
                for name, test in tests.items():
                    value = perplexity(model, test, blocks)
                    removed = (pruned[name] - value) / (pruned[name] - unpruned[name])
                    row[f"{fit} {name}"] = [round(value, 2), round(removed, 3)]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
