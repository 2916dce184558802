"""Measured speed and memory of real models (blocks physically removed, never gated), side by side.

For each model: prefill tokens/s over a prompt, decode tokens/s of greedy generation with the KV cache, the KV-cache
size after generation, the weights' size and the peak working memory of a run (CUDA: peak allocated; Linux CPU: the
rise of the process's peak resident set, reset before each run). Models are measured interleaved (A, B, A, B, ...)
after warm-up runs that are not counted, so drifting clocks or caches hit every model alike; the report gives the
median and the spread (min–max) of the repetitions, and a speed-up is the median of the per-repetition ratios (the
runs of one repetition are measured back to back).

```python
report = benchmark({"original": model, "pruned": pruned}, prompt_len=128, new_tokens=64, repeats=5)
print(report.markdown())
report.ratio("decode_tokens_per_s", "pruned", "original")
```
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import BlockCBOError
from ..hessian.gradients import frozen_eval


METRICS = ("prefill_tokens_per_s", "decode_tokens_per_s")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_peak_reset() -> int | None:
    """Reset the process's peak RSS (Linux `clear_refs` 5) and return the current RSS in bytes, or None."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS") * 1024
    except (OSError, ValueError, TypeError):
        return None


def _status_kb(key: str) -> int | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return None


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache object (KV tensors and any recurrent states)."""
    total = 0
    for layer in getattr(cache, "layers", None) or []:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    if total == 0:  # legacy tuple caches
        for item in cache if isinstance(cache, (tuple, list)) else []:
            for t in item if isinstance(item, (tuple, list)) else [item]:
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total


def weights_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


@dataclass
class RunResult:
    prefill_seconds: float
    decode_seconds: float
    kv_cache_bytes: int
    peak_bytes: int | None


def _accepts(model: nn.Module, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(model.forward).parameters


def _cache_kwarg(model: nn.Module) -> str:
    """transformers ≥ 5.2x names the KV cache `cache`; earlier versions (and some models) `past_key_values`."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.inference_mode()
def measure_once(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> RunResult:
    """One prefill of ``prompt`` and ``new_tokens`` greedy decode steps with the KV cache, timed apart."""
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _cpu_peak_reset()
    cache_kwarg = _cache_kwarg(model)
    # as `generate` does: the prefill computes the LM head for the last position only
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    _sync(device)
    began = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True, **last_only)
    _sync(device)
    prefill = time.perf_counter() - began
    past, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    began = time.perf_counter()
    for _ in range(new_tokens):
        out = model(input_ids=token, use_cache=True, **{cache_kwarg: past})
        past, token = _cache_of(out), out.logits[:, -1:].argmax(-1)
    _sync(device)
    decode = time.perf_counter() - began
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        high = _status_kb("VmHWM")
        peak = None if base is None or high is None else max(high * 1024 - base, 0)
    return RunResult(prefill, decode, cache_bytes(past), peak)


@dataclass
class ModelSpeed:
    """Every counted run of one model."""

    layers: int
    weights_bytes: int
    runs: list[RunResult] = field(default_factory=list)

    def values(self, metric: str, prompt_tokens: int, new_tokens: int) -> list[float]:
        if metric == "prefill_tokens_per_s":
            return [prompt_tokens / r.prefill_seconds for r in self.runs]
        if metric == "decode_tokens_per_s":
            return [new_tokens / r.decode_seconds for r in self.runs]
        raise BlockCBOError(f"unknown metric {metric!r}; choose {', '.join(METRICS)}")


@dataclass
class SpeedReport:
    """Side-by-side measurements; ``models`` keeps the order the models were given in (the first is the reference)."""

    device: str
    prompt_len: int
    new_tokens: int
    batch_size: int
    repeats: int
    models: dict[str, ModelSpeed]

    def median(self, name: str, metric: str) -> float:
        return statistics.median(self._values(name, metric))

    def spread(self, name: str, metric: str) -> tuple[float, float]:
        values = self._values(name, metric)
        return min(values), max(values)

    def _values(self, name: str, metric: str) -> list[float]:
        return self.models[name].values(metric, self.prompt_len * self.batch_size, self.new_tokens * self.batch_size)

    def paired_ratios(self, metric: str, name: str, reference: str) -> list[float]:
        """``name`` over ``reference`` in each repetition: the two runs of a repetition are measured back to back, so
        a clock or a neighbour that drifts between repetitions cancels out of each ratio."""
        return [a / b for a, b in zip(self._values(name, metric), self._values(reference, metric), strict=True)]

    def ratio(self, metric: str, name: str, reference: str) -> float:
        """The median of the paired ratios (a speed-up when > 1)."""
        return statistics.median(self.paired_ratios(metric, name, reference))

    def _ratio_cell(self, metric: str, name: str, reference: str) -> str:
        paired = self.paired_ratios(metric, name, reference)
        spread = f" ({min(paired):.3f}–{max(paired):.3f})" if name != reference else ""
        return f"{statistics.median(paired):.3f}×{spread}"

    def kv_cache_bytes(self, name: str) -> int:
        return max(r.kv_cache_bytes for r in self.models[name].runs)

    def peak_bytes(self, name: str) -> int | None:
        peaks = [r.peak_bytes for r in self.models[name].runs if r.peak_bytes is not None]
        return statistics.median(peaks) if peaks else None

    def to_dict(self) -> dict:
        reference = next(iter(self.models))
        out = {
            "device": self.device,
            "prompt_len": self.prompt_len,
            "new_tokens": self.new_tokens,
            "batch_size": self.batch_size,
            "repeats": self.repeats,
            "models": {},
        }
        for name, speed in self.models.items():
            row = {"layers": speed.layers, "weights_bytes": speed.weights_bytes}
            for metric in METRICS:
                low, high = self.spread(name, metric)
                row[metric] = {"median": self.median(name, metric), "min": low, "max": high}
                paired = self.paired_ratios(metric, name, reference)
                row[f"{metric}_ratio"] = statistics.median(paired)  # = self.ratio(metric, name, reference)
                row[f"{metric}_ratio_spread"] = [min(paired), max(paired)]
            row["kv_cache_bytes"] = self.kv_cache_bytes(name)
            row["peak_working_bytes"] = self.peak_bytes(name)
            out["models"][name] = row
        return out

    def markdown(self) -> str:
        reference = next(iter(self.models))
        ref_layers = self.models[reference].layers
        lines = [
            f"Measured on {self.device}: prompt {self.prompt_len} tokens, {self.new_tokens} greedy decode steps with "
            f"the KV cache, batch {self.batch_size}; median (min–max) of {self.repeats} interleaved runs after "
            "warm-up; the speed-up is the median (min–max) of the ratios of runs measured back to back.",
            "",
            "| model | blocks | prefill tok/s | decode tok/s | decode speed-up | ideal N/(N−M) | weights MB | "
            "KV cache MB | peak working MB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, speed in self.models.items():
            cells = []
            for metric in METRICS:
                low, high = self.spread(name, metric)
                cells.append(f"{self.median(name, metric):.1f} ({low:.1f}–{high:.1f})")
            peak = self.peak_bytes(name)
            lines.append(
                f"| {name} | {speed.layers} | {cells[0]} | {cells[1]} | "
                f"{self._ratio_cell('decode_tokens_per_s', name, reference)} | {ref_layers / speed.layers:.3f}× | "
                f"{speed.weights_bytes / 2**20:.1f} | {self.kv_cache_bytes(name) / 2**20:.2f} | "
                f"{'n/a' if peak is None else f'{peak / 2**20:.1f}'} |"
            )
        return "\n".join(lines) + "\n"


def _num_layers(model: nn.Module) -> int:
    from ..surgery.architectures import get_layers

    return len(get_layers(model))


def benchmark(
    models: dict[str, nn.Module],
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> SpeedReport:
    """Measure every model of ``models`` (name → model; the first is the reference) on the same random prompt."""
    if not models:
        raise BlockCBOError("nothing to benchmark: give at least one model")
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("batch_size", batch_size)):
        if not isinstance(value, int) or value <= 0:
            raise BlockCBOError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(repeats, int) or repeats <= 0 or not isinstance(warmup, int) or warmup < 0:
        raise BlockCBOError(f"repeats must be >= 1 and warmup >= 0, got {repeats!r} and {warmup!r}")
    vocab = min(m.get_input_embeddings().weight.shape[0] for m in models.values())
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (batch_size, prompt_len), generator=generator)
    speeds = {name: ModelSpeed(_num_layers(m), weights_bytes(m)) for name, m in models.items()}
    device = next(next(iter(models.values())).parameters()).device
    from tqdm.auto import tqdm

    total = (warmup + repeats) * len(models)
    with tqdm(total=total, desc="benchmark", disable=not progress, leave=False) as bar:
        for round_number in range(warmup + repeats):
            for name, model in models.items():
                with frozen_eval(model):
                    result = measure_once(model, prompt, new_tokens)
                if round_number >= warmup:
                    speeds[name].runs.append(result)
                bar.update(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return SpeedReport(name, prompt_len, new_tokens, batch_size, repeats, speeds)
