"""A tiny Trainer run with `BlockRemovalCallback`, launched by tests with 1 or 2 processes (accelerate launch).

    python tests/multiprocess_training.py MODEL_DIR OUT_DIR [--remove-at-step S]

Each process writes OUT_DIR/rank<r>.json with what it saw (layers left, removed blocks, steps); the main process's
callback writes OUT_DIR/run/hessian.safetensors.
"""

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--remove-at-step", type=int)
    a = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from hf_blockcbo import BlockRemovalCallback, BlockRemovalConfig
    from hf_blockcbo.data import build_calibration_set

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model)
    cal = build_calibration_set(tokenizer, None, num_samples=16, seq_len=16)
    rows = [{"input_ids": ids.tolist()} for ids in cal.input_ids]
    callback = BlockRemovalCallback(
        BlockRemovalConfig(num_remove=2, top_k=3, curvature="empirical"),
        at="train_begin",
        remove_at_step=a.remove_at_step,
    )
    args = TrainingArguments(
        output_dir=str(Path(a.out) / "run"),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=4,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        learning_rate=1e-3,
        ddp_find_unused_parameters=a.remove_at_step is not None,
        seed=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=rows[:15],  # the callback's rows come from it at train begin: 15 samples, uneven shards
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        callbacks=[callback],
    )
    trainer.train()
    report = {
        "world_size": args.world_size,
        "layers": trainer.model.config.num_hidden_layers,
        "removed": callback.removed,
        "steps": trainer.state.global_step,
        "rows": list(callback.artifact.A.shape),
    }
    (Path(a.out) / f"rank{args.process_index}.json").write_text(json.dumps(report))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # join gloo's threads before exit (a rank aborted there once)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
