"""Peak memory of the Hessian pass vs a plain inference forward on SmolLM2-135M (CPU), with and without gradient
checkpointing. Each mode runs in a fresh process (peak RSS is per process); printed side by side in one run.

    python benchmarks/hessian_memory.py --batch-size 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


CHILD = """
import json, resource, time, torch
from hf_blockcbo.hessian.gradients import compute_gate_gradients
from hf_blockcbo.data import build_calibration_set
from hf_blockcbo.models import load_model, resolve_model
mode, batch, seq = {mode!r}, {batch}, {seq}
model, tok = load_model(resolve_model(None), gradient_checkpointing=(mode == "hessian+checkpointing"))
cal = build_calibration_set(tok, None, num_samples=batch, seq_len=seq)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "inference":
    with torch.no_grad():
        model(input_ids=cal.input_ids, attention_mask=cal.attention_mask, use_cache=False)
else:
    compute_gate_gradients(model, cal, batch_size=batch, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"loaded_mib": loaded / 1024, "peak_mib": peak / 1024, "seconds": time.perf_counter() - start}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    results = {}
    for mode in ("inference", "hessian", "hessian+checkpointing"):
        code = CHILD.format(mode=mode, batch=args.batch_size, seq=args.seq_len)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results["inference"]
    print(f"SmolLM2-135M, batch {args.batch_size} × {args.seq_len} tokens, float32, CPU (peak RSS per process)")
    for mode, r in results.items():
        extra = r["peak_mib"] - r["loaded_mib"]
        print(
            f"  {mode:<24} peak {r['peak_mib']:7.0f} MiB  (+{extra:6.0f} MiB over the loaded model)  "
            f"{r['seconds']:.1f} s  ratio vs inference peak {r['peak_mib'] / base['peak_mib']:.2f}"
        )


if __name__ == "__main__":
    main()
