"""The Python face: from_pretrained-style block removal on the embedded SmolLM2 (offline), then a look at the spectrum.

python examples/python_api.py
"""

from hf_blockcbo import BlockRemovalConfig, BlockRemover


config = BlockRemovalConfig(num_remove=4, num_samples=32, seq_len=128, top_k=8, validation_samples=64)
remover = BlockRemover.from_pretrained(None, config)  # None: the embedded SmolLM2-135M-Instruct
remover.calibrate()
for candidate in remover.solve().candidates:
    print(f"state {candidate.rank}: remove {list(candidate.blocks)}  energy {candidate.energy:.5f}")
selection = remover.prune()
print(f"chosen by {selection.how}: {selection.blocks} (validation perplexity {selection.validation_ppl:.2f})")
remover.save_pretrained("smollm2-pruned-api", overwrite=True)
