"""Writes the Stanford Alpaca preprocessing of real Alpaca rows with the Llama 2 tokenizer, as
transformers does it, for tests/alpaca_llama2.rs (run by scripts/check-llama2-data.sh).

The prompt text is PROMPT_DICT from tatsu-lab/stanford_alpaca train.py; the target is
f"{output}{eos_token}"; input_ids = tokenizer(source + target); labels ignore the first
len(tokenizer(source)) tokens, exactly as that script's `preprocess` does (no truncation here).

Output (JSONL, one row per record, in file order):
  {"source": str, "input_ids": [int], "source_len": int}
"""

import argparse
import json

from transformers import AutoTokenizer

PROMPT_DICT = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--alpaca", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rows = json.load(open(args.alpaca, encoding="utf-8"))
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            key = "prompt_input" if r.get("input", "") != "" else "prompt_no_input"
            source = PROMPT_DICT[key].format_map(r)
            target = f"{r['output']}{tok.eos_token}"
            ids = tok(source + target).input_ids
            source_len = len(tok(source).input_ids)
            f.write(json.dumps({"source": source, "input_ids": ids, "source_len": source_len}) + "\n")
    print(f"{len(rows)} rows, tokenizer {type(tok).__name__}, written to {args.out}")


if __name__ == "__main__":
    main()
