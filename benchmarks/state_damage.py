"""The measured calibration damage (mean per-token KL to the unpruned model, gate-masked) of given removal states, on
the first ``--measured-samples`` windows that a config with each ``--num-samples`` draws: whether a state another
method picked does less of the damage CBO minimises, whatever the window draw.

    python benchmarks/state_damage.py --model gemma3 --states "cbo=2,4,6,7,8,9;sleb=7,8,9,14,15,17"
"""

from __future__ import annotations

import argparse
import time

from _models import model_argument  # benchmarks/_models.py (run as `python benchmarks/<name>.py`)

from hf_blockcbo.config import BlockRemovalConfig
from hf_blockcbo.data import CalibrationSet
from hf_blockcbo.models import load_model, resolve_model
from hf_blockcbo.pipeline import calibration_samples
from hf_blockcbo.selection.diagnose import measure_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or any --model value of hf-blockcbo")
    parser.add_argument("--states", required=True, help="label=blocks;label=blocks, e.g. 'cbo=2,4;sleb=7,8'")
    parser.add_argument("--num-samples", default="32,8,128", help="the window draws: num_samples of each config")
    parser.add_argument("--measured-samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    states = {}
    for item in [i for i in args.states.split(";") if i]:
        label, blocks = item.split("=")
        states[label] = [int(b) for b in blocks.split(",")]
    model_arg = model_argument(args.model)
    model, tokenizer = load_model(resolve_model(model_arg, None), dtype="float32")
    began = time.perf_counter()
    print("| windows drawn with | " + " | ".join(f"{k} {v}" for k, v in states.items()) + " |")
    print("| --- |" + " --- |" * len(states))
    for count in [int(n) for n in args.num_samples.split(",")]:
        config = BlockRemovalConfig(model=model_arg, num_samples=count, seq_len=args.seq_len)
        drawn = calibration_samples(tokenizer, config)
        k = min(args.measured_samples, len(drawn))
        windows = CalibrationSet(drawn.input_ids[:k], drawn.attention_mask[:k], drawn.source)
        kl = measure_states(model, list(states.values()), windows).kl
        print(f"| num_samples = {count} (first {k}) | " + " | ".join(f"{v:.4f}" for v in kl) + " |", flush=True)
    print(f"({time.perf_counter() - began:.0f} s)")


if __name__ == "__main__":
    main()
