import json

import pytest
import torch

from hf_blockcbo.data import build_calibration_set, embedded_documents
from hf_blockcbo.errors import BlockCBOError


def test_embedded_sample_has_disjoint_splits():
    calibration = embedded_documents("calibration")
    validation = embedded_documents("validation")
    test = embedded_documents("test")
    assert calibration[0].startswith("PRIDE AND PREJUDICE")
    assert len(calibration) >= 6 * len(validation) > 0 and len(test) > 0
    long = {p for p in validation + test if len(p) > 200}  # short lines ("Yes.") recur in any novel
    assert long and not long & set(calibration)
    assert not {p for p in test if len(p) > 200} & set(validation)


def test_embedded_default_is_packed_into_full_windows(tokenizer):
    cal = build_calibration_set(tokenizer, None, num_samples=5, seq_len=32)
    assert cal.input_ids.shape == (5, 32) and bool(cal.attention_mask.all())
    assert cal.source == "embedded"
    again = build_calibration_set(tokenizer, "embedded", num_samples=5, seq_len=32)
    assert cal.fingerprint == again.fingerprint


def test_text_file(tokenizer, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("It is a truth universally acknowledged. " * 50)
    cal = build_calibration_set(tokenizer, str(path), num_samples=3, seq_len=16)
    assert cal.input_ids.shape == (3, 16)


def test_jsonl_text_records_are_truncated_and_padded(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "Short one."}, {"text": "A much longer record that will be truncated to the window. " * 5}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cal = build_calibration_set(tokenizer, str(path), num_samples=2, seq_len=20, packing="truncate")
    assert cal.input_ids.shape[1] == 20
    lengths = sorted(int(n) for n in cal.attention_mask.sum(1))
    assert lengths[0] < 20 == lengths[1]


def test_chat_records_use_the_chat_template(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]}
    path.write_text(json.dumps(record) + "\n" + json.dumps(record))
    cal = build_calibration_set(tokenizer, str(path), num_samples=2, seq_len=64)
    text = tokenizer.decode(cal.input_ids[0][cal.attention_mask[0].bool()])
    assert "user: What is 2+2?" in text and "assistant: 4." in text


@pytest.mark.parametrize(
    "content,match",
    [("", "no records"), ('{"text": "   "}\n', "empty texts"), ('{"body": "x"}\n', "neither"), ("{oops\n", "JSON")],
)
def test_bad_data_is_refused(tokenizer, tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(BlockCBOError, match=match):
        build_calibration_set(tokenizer, str(path), num_samples=1, seq_len=8)


def test_too_short_data_is_refused(tokenizer, tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("Too short.")
    with pytest.raises(BlockCBOError, match="lower `num_samples`"):
        build_calibration_set(tokenizer, str(path), num_samples=4, seq_len=64)


def test_every_sample_starts_with_bos_when_the_tokenizer_adds_one(tokenizer, tmp_path):
    import copy

    from tokenizers import processors

    bos = tokenizer.bos_token_id
    with_bos = copy.deepcopy(tokenizer)
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert with_bos("a")["input_ids"][0] == bos and tokenizer("a")["input_ids"][0] != bos
    packed = build_calibration_set(with_bos, None, num_samples=4, seq_len=16)
    assert packed.input_ids.shape == (4, 16) and (packed.input_ids[:, 0] == bos).all()
    assert (packed.input_ids[:, 1:] != bos).all(), "one BOS per window, then text"
    plain = build_calibration_set(tokenizer, None, num_samples=4, seq_len=16)
    assert (plain.input_ids[:, 0] != bos).any(), "tokenizers without a BOS habit are left as they are"
    chat = tmp_path / "chat.jsonl"
    record = {"messages": [{"role": "user", "content": "Is it a truth universally acknowledged?"}]}
    chat.write_text((json.dumps(record) + "\n") * 2)
    rows = build_calibration_set(with_bos, str(chat), num_samples=2, seq_len=32, packing="truncate")
    first = rows.input_ids[0, : int(rows.attention_mask[0].sum())].tolist()
    assert first[0] == bos and first[1] != bos, "the chat template's own BOS is not doubled"


def test_paragraphs_of_one_text_are_one_document_eos_only_between_documents(tokenizer, tmp_path):
    eos = tokenizer.eos_token_id
    cal = build_calibration_set(tokenizer, None, num_samples=20, seq_len=32)
    assert not (cal.input_ids == eos).any(), "the embedded novel is one document: no EOS inside it"
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"document {i} " + "words " * 30}) for i in range(6)))
    packed = build_calibration_set(tokenizer, str(path), num_samples=4, seq_len=16, packing="pack")
    assert int((packed.input_ids == eos).sum()) <= 5  # at most one EOS between each two of the 6 documents


def test_windows_are_drawn_seeded_from_the_whole_source(tokenizer, tmp_path):
    words = [f"w{i}" for i in range(3000)]
    path = tmp_path / "numbered.txt"
    path.write_text(" ".join(words))
    cal = build_calibration_set(tokenizer, str(path), num_samples=12, seq_len=16, seed=0)
    again = build_calibration_set(tokenizer, str(path), num_samples=12, seq_len=16, seed=0)
    other = build_calibration_set(tokenizer, str(path), num_samples=12, seq_len=16, seed=1)
    assert cal.fingerprint == again.fingerprint != other.fingerprint
    stream = torch.tensor(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    positions = []
    for row in cal.input_ids:
        for start in range(len(stream) - 16 + 1):
            if torch.equal(stream[start : start + 16], row):
                positions.append(start)
                break
    assert len(positions) == 12, "every window is a slice of the token stream"
    assert max(positions) > 0.6 * len(stream) and min(positions) < 0.4 * len(stream), positions


def test_chat_records_are_taken_in_a_seeded_order(tokenizer, tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(12)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    a = build_calibration_set(tokenizer, str(path), num_samples=4, seq_len=32, seed=0)
    b = build_calibration_set(tokenizer, str(path), num_samples=4, seq_len=32, seed=0)
    c = build_calibration_set(tokenizer, str(path), num_samples=4, seq_len=32, seed=5)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    in_file_order = build_calibration_set(tokenizer, str(path), num_samples=12, seq_len=32, seed=0)
    ids, masks = in_file_order.input_ids, in_file_order.attention_mask
    texts = [tokenizer.decode(r[m.bool()]) for r, m in zip(ids, masks, strict=True)]
    numbers = [int(t.split("question")[1].split("<")[0]) for t in texts]
    assert sorted(numbers) == list(range(12)) and numbers != list(range(12)), "all records, in the seed's order"


def test_a_smaller_draw_is_a_prefix_of_a_larger_one(tokenizer, tmp_path):
    # `measured` uses the first `measured_samples` of the calibration set: they must not depend on `num_samples`
    text = tmp_path / "numbered.txt"
    text.write_text(" ".join(f"w{i}" for i in range(3000)))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"document {i} " + "words " * 40}) for i in range(40)))
    for source in (None, str(text), str(docs)):
        small = build_calibration_set(tokenizer, source, num_samples=4, seq_len=16, seed=3)
        large = build_calibration_set(tokenizer, source, num_samples=12, seq_len=16, seed=3)
        assert torch.equal(large.input_ids[:4], small.input_ids), source
        assert not torch.equal(large.input_ids[4:8], small.input_ids), "the rest is not a repeat"


def test_repair_data_sources_share_the_repair_windows(tokenizer, tmp_path):
    from hf_blockcbo.config import BlockRemovalConfig
    from hf_blockcbo.data import repair_samples

    play = tmp_path / "play.txt"
    play.write_text("\n\n".join(f"Enter a messenger, the {i}th, with a letter." for i in range(80)), encoding="utf-8")
    config = BlockRemovalConfig(repair_samples=5, seq_len=16, repair_data=f"embedded, {play}")
    mixed = repair_samples(tokenizer, config)
    first = build_calibration_set(tokenizer, "embedded", num_samples=3, seq_len=16)
    second = build_calibration_set(tokenizer, str(play), num_samples=2, seq_len=16)
    interleaved = torch.stack([first.input_ids[0], second.input_ids[0], first.input_ids[1], second.input_ids[1]])
    assert torch.equal(mixed.input_ids, torch.cat([interleaved, first.input_ids[2:]]))
    assert mixed.source == f"{first.source} + {second.source}"
    own = BlockRemovalConfig(repair_samples=5, seq_len=16, data=str(play))  # repair_data unset: `data`
    assert own.repair_fit_data == str(play)
    plain = repair_samples(tokenizer, own)
    assert torch.equal(
        plain.input_ids, build_calibration_set(tokenizer, str(play), num_samples=5, seq_len=16).input_ids
    )
    with pytest.raises(BlockCBOError, match="give each source at least one window"):
        repair_samples(tokenizer, config.replace(repair_samples=1))
    with pytest.raises(BlockCBOError, match="repair_data must name at least one source"):
        BlockRemovalConfig(repair_data=",")


def test_the_default_repair_data_is_the_embedded_novel_and_play(tokenizer):
    from hf_blockcbo.config import DEFAULT_REPAIR_DATA, BlockRemovalConfig
    from hf_blockcbo.data import (
        EMBEDDED_PLAY,
        calibration_samples,
        embedded_documents,
        embedded_play,
        load_records,
        repair_samples,
    )

    play = embedded_play()
    assert play.lstrip().startswith("Twelfth Night") and "DUKE ORSINO" in play and "our play is done" in play
    assert not any(
        "Orsino" in p or "ORSINO" in p for split in ("calibration", "test") for p in embedded_documents(split)
    )
    assert load_records(EMBEDDED_PLAY) == ([{"text": play}], "embedded:play")
    config = BlockRemovalConfig(repair_samples=5, seq_len=16, seed=1)
    assert config.repair_fit_data == DEFAULT_REPAIR_DATA == "embedded,embedded:play"
    assert BlockRemovalConfig(data="embedded").repair_fit_data == DEFAULT_REPAIR_DATA
    default = repair_samples(tokenizer, config)
    novel = build_calibration_set(tokenizer, "embedded", num_samples=3, seq_len=16, seed=1)
    plays = build_calibration_set(tokenizer, EMBEDDED_PLAY, num_samples=2, seq_len=16, seed=1)
    assert torch.equal(default.input_ids[0::2], novel.input_ids) and torch.equal(
        default.input_ids[1::2], plays.input_ids
    )
    assert default.source == "embedded + embedded:play"
    # the calibration windows do not change: only the repair fits on both
    assert calibration_samples(tokenizer, config).source == "embedded"
    with pytest.raises(
        BlockCBOError, match=r"the repair fits on embedded,embedded:play \(2 sources\) but repair_samples is 1"
    ):
        BlockRemovalConfig(repair_samples=1)
    with pytest.raises(
        BlockCBOError, match=r"the repair fits on embedded,a.txt,b.txt \(3 sources\) but repair_samples"
    ):
        BlockRemovalConfig(data="embedded,a.txt,b.txt", repair_samples=2)
    assert BlockRemovalConfig(repair_samples=1, repair_data="embedded").repair_fit_data == "embedded"


def test_several_sources_share_the_windows_interleaved_and_every_prefix_is_a_balanced_mix(tokenizer, tmp_path):
    play = tmp_path / "play.txt"
    play.write_text("\n\n".join(f"Enter a messenger, the {i}th, with a letter." for i in range(200)), encoding="utf-8")
    source = f"embedded, {play}"
    mixed = build_calibration_set(tokenizer, source, num_samples=7, seq_len=16, seed=2)
    novel = build_calibration_set(tokenizer, "embedded", num_samples=4, seq_len=16, seed=2)
    plays = build_calibration_set(tokenizer, str(play), num_samples=3, seq_len=16, seed=2)
    assert torch.equal(mixed.input_ids[0::2], novel.input_ids) and torch.equal(mixed.input_ids[1::2], plays.input_ids)
    assert mixed.source == f"embedded + {play}"
    smaller = build_calibration_set(tokenizer, source, num_samples=4, seq_len=16, seed=2)
    assert torch.equal(mixed.input_ids[:4], smaller.input_ids), (
        "the measured pass's prefix does not depend on the size"
    )
    assert mixed.fingerprint != build_calibration_set(tokenizer, f"{play}, embedded", 7, 16, seed=2).fingerprint
    with pytest.raises(BlockCBOError, match="give each source at least one sample"):
        build_calibration_set(tokenizer, source, num_samples=1, seq_len=16)
    with pytest.raises(BlockCBOError, match="does not exist"):
        build_calibration_set(tokenizer, f"embedded, {tmp_path / 'missing.txt'}", num_samples=4, seq_len=16)


@pytest.mark.parametrize(
    ("field", "count"),
    [("data", "num_samples"), ("validation_data", "validation_samples"), ("repair_data", "repair_samples")],
)
def test_a_data_setting_with_more_sources_than_windows_is_refused(field, count):
    from hf_blockcbo.config import BlockRemovalConfig

    with pytest.raises(BlockCBOError, match=f"{field} names 3 sources but {count} is 2"):
        BlockRemovalConfig(**{field: "a.txt,b.txt,c.txt", count: 2})
    with pytest.raises(BlockCBOError, match=f"{field} must name at least one source"):
        BlockRemovalConfig(**{field: " , "})
