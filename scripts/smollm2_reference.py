"""Writes reference outputs of the real SmolLM2-135M-Instruct GGUF, computed with transformers.

The output is NOT committed; it is regenerated into a directory of your choice:

    $(scripts/setup-python.sh) scripts/smollm2_reference.py \\
        --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --alpaca ../shared/assets/alpaca/alpaca_4000.json --out /tmp/smollm2-ref

transformers dequantizes the Q4_1 weights to f32 and runs eager attention on CPU.
Files written into --out:
  logits.safetensors  prompt{i}.input_ids [1,S] int64, prompt{i}.logits [1,S,V] f32, i = 0..3
  generate.json       greedy generations (32 new tokens) for two chat prompts
  encodings.jsonl     {"text", "ids"} per line: 1,000 Alpaca strings + 20 edge cases
  chat_template.json  template source and two rendered conversations
  meta.json           versions, gguf path and sha256, prompt sources, tokenizer notes, timings
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import time

N_ALPACA_STRINGS = 1000
MAX_PROMPT_TOKENS = 40
MAX_NEW_TOKENS = 32
CHAT_QUESTION = "What is the capital of France?"
EXPECTED_ANSWER = "The capital of France is Paris."
PLAIN_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."

# Edge cases for tokenizer parity: special tokens, digits, emoji, whitespace runs, non-ASCII.
EXTRA_STRINGS = [
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|im_end|>more<|im_start|>",
    "0123456789",
    "Pi is 3.14159 and 1,000,000 > 999.",
    "2024-01-15T12:30:00Z",
    "😀",
    "I ❤️ 🦀 and 🐍!",
    "👨‍👩‍👧‍👦 family",
    "a  b   c    d",
    "        eight leading spaces",
    "trailing spaces   ",
    "\n",
    "line1\n\n\nline4",
    "\r\n windows\r\n",
    "\t\ttabs\tand  spaces \n",
    "café naïve résumé — “quotes” ‘single’",
    "日本語のテキスト 中文 한국어",
    "def f(x):\n    return x**2  # square\n",
]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", required=True, help="path to SmolLM2-135M-Instruct .gguf")
    ap.add_argument("--alpaca", required=True, help="Alpaca JSON file (list of {instruction,input,output})")
    ap.add_argument("--out", required=True, help="output directory (created if missing)")
    args = ap.parse_args()
    if not os.path.isfile(args.gguf):
        ap.error(f"--gguf: no such file: {args.gguf} (fetch it with scripts/fetch-smollm2.sh)")
    if not args.gguf.endswith(".gguf"):
        ap.error(f"--gguf: expected a .gguf file, got {args.gguf}")
    if not os.path.isfile(args.alpaca):
        ap.error(f"--alpaca: no such file: {args.alpaca}")
    try:
        with open(args.alpaca, encoding="utf-8") as f:
            rows = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        ap.error(f"--alpaca: cannot read JSON from {args.alpaca}: {e}")
    if not isinstance(rows, list) or not rows or not all(
        isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("instruction", "input", "output"))
        for r in rows
    ):
        ap.error(f"--alpaca: {args.alpaca} must be a non-empty list of objects with string "
                 "'instruction', 'input' and 'output' fields")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        ap.error(f"--out: {args.out} exists and is not a directory")
    return args, rows


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gguf_tokenizer_facts(path: str) -> dict:
    from gguf import GGUFReader

    r = GGUFReader(path)
    keys = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"]
    facts = {k: r.fields[k].contents() for k in keys if k in r.fields}
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in facts.items()}, r


def independent_tokenizer(reader):
    """Byte-level BPE built straight from the GGUF vocab and merges, pre-tokenized the way
    llama.cpp's "smollm" pre-type and the original SmolLM2 tokenizer.json do (single digits,
    then the GPT-2 split). transformers' GGUF converter drops the digit split, so this only
    reports where the two differ; encodings.jsonl keeps transformers' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return tk


def alpaca_strings(rows, n):
    out = []
    for r in rows:
        for k in ("instruction", "input", "output"):
            if r[k]:
                out.append(r[k])
                if len(out) == n:
                    return out
    return out


def chat(tok, messages):
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode(tok, text):
    return tok(text, add_special_tokens=True)["input_ids"]


def main():
    args, rows = parse_args()
    t_all = time.time()
    timings = {}

    import numpy
    import safetensors
    import tokenizers
    import torch
    import transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))

    t = time.time()
    facts, reader = gguf_tokenizer_facts(args.gguf)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    timings["load_tokenizer_s"] = time.time() - t

    # transformers' GGUF conversion ignores tokenizer.ggml.add_bos_token=false and would prefix
    # every encoding with <|im_start|> (id 1); honour the GGUF flag like llama.cpp and the original
    # SmolLM2 tokenizer do. It also reports eos as <|im_start|>, so eos comes from the GGUF below.
    hf_default_bos = encode(tok, "hi")[:1] == [facts["tokenizer.ggml.bos_token_id"]]
    if not facts.get("tokenizer.ggml.add_bos_token", True):
        tok.add_bos_token = False
        assert encode(tok, "hi")[:1] != [facts["tokenizer.ggml.bos_token_id"]], "could not disable BOS"
    eos_id = facts["tokenizer.ggml.eos_token_id"]
    pad_id = facts.get("tokenizer.ggml.padding_token_id", eos_id)

    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=gguf_name, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    timings["load_model_s"] = time.time() - t
    vocab = model.config.vocab_size

    # --- logits for four short prompts --------------------------------------------------------
    short_instr = [(i, r["instruction"]) for i, r in enumerate(rows)
                   if len(encode(tok, r["instruction"])) <= MAX_PROMPT_TOKENS][:2]
    prompts = [
        {"kind": "chat", "source": f"chat template, user: {CHAT_QUESTION!r}",
         "text": chat(tok, [{"role": "user", "content": CHAT_QUESTION}])},
        *({"kind": "alpaca_instruction", "source": f"alpaca row {i} instruction", "text": s}
          for i, s in short_instr),
        {"kind": "plain", "source": "plain sentence", "text": PLAIN_TEXT},
    ]
    t = time.time()
    tensors = {}
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = encode(tok, p["text"])
            if len(ids) > MAX_PROMPT_TOKENS:
                sys.exit(f"prompt {i} has {len(ids)} tokens > {MAX_PROMPT_TOKENS}: {p['text']!r}")
            x = torch.tensor([ids], dtype=torch.int64)
            logits = model(input_ids=x).logits.float().contiguous()
            assert logits.shape == (1, len(ids), vocab)
            tensors[f"prompt{i}.input_ids"] = x
            tensors[f"prompt{i}.logits"] = logits
            p["num_tokens"] = len(ids)
    # One metadata key keeps the header byte-stable across runs.
    save_file(tensors, os.path.join(args.out, "logits.safetensors"),
              metadata={"prompts": json.dumps([p["text"] for p in prompts])})
    timings["logits_s"] = time.time() - t

    # --- greedy generation ----------------------------------------------------------------------
    gen_row = next(i for i, r in enumerate(rows)
                   if not r["input"] and len(encode(tok, r["instruction"])) <= MAX_PROMPT_TOKENS)
    gen_inputs = [
        ("chat", CHAT_QUESTION),
        (f"alpaca row {gen_row} instruction", rows[gen_row]["instruction"]),
    ]
    t = time.time()
    generations = []
    for source, content in gen_inputs:
        text = chat(tok, [{"role": "user", "content": content}])
        ids = encode(tok, text)
        x = torch.tensor([ids], dtype=torch.int64)
        with torch.no_grad():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)
        new = out[0, len(ids):].tolist()
        # The same greedy decoding without stopping at EOS, so every one of the 32 steps is
        # compared (a plain argmax loop over the KV cache: none of generate()'s logits processing applies).
        full = list(ids)
        with torch.no_grad():
            step = model(torch.tensor([ids]), use_cache=True)
            for _ in range(MAX_NEW_TOKENS):
                full.append(int(step.logits[0, -1].argmax()))
                step = model(torch.tensor([[full[-1]]]), past_key_values=step.past_key_values, use_cache=True)
        generations.append({
            "greedy_32_no_stop": full[len(ids):],
            "source": source, "user": content, "prompt": text, "prompt_ids": ids,
            "new_ids": new, "stopped_on_eos": bool(new) and new[-1] == eos_id,
            "text": tok.decode(new, skip_special_tokens=True),
            "text_with_special": tok.decode(new, skip_special_tokens=False),
        })
    timings["generate_s"] = time.time() - t
    with open(os.path.join(args.out, "generate.json"), "w", encoding="utf-8") as f:
        json.dump({"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False, "eos_token_id": eos_id,
                   "generations": generations}, f, ensure_ascii=False, indent=1)

    # --- tokenizer encodings ------------------------------------------------------------------
    t = time.time()
    texts = alpaca_strings(rows, N_ALPACA_STRINGS)
    if len(texts) < N_ALPACA_STRINGS:
        print(f"warning: alpaca file yields only {len(texts)} non-empty strings", file=sys.stderr)
    texts += EXTRA_STRINGS
    indep = independent_tokenizer(reader)
    pretok_differs = []
    with open(os.path.join(args.out, "encodings.jsonl"), "w", encoding="utf-8") as f:
        for line_no, s in enumerate(texts):
            ids = encode(tok, s)
            f.write(json.dumps({"text": s, "ids": ids}, ensure_ascii=False) + "\n")
            if indep.encode(s).ids != ids:
                pretok_differs.append(line_no)
    timings["encodings_s"] = time.time() - t

    # --- chat template ------------------------------------------------------------------------
    convs = [
        [{"role": "system", "content": "You are a concise assistant."},
         {"role": "user", "content": "Name three primary colors."}],
        [{"role": "user", "content": "Hi!"},
         {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Tell me a fun fact about octopuses."}],
    ]
    with open(os.path.join(args.out, "chat_template.json"), "w", encoding="utf-8") as f:
        json.dump({
            "template": tok.chat_template,
            "add_generation_prompt": True,
            "conversations": [{"messages": m, "rendered": chat(tok, m), "ids": encode(tok, chat(tok, m))}
                              for m in convs],
        }, f, ensure_ascii=False, indent=1)

    # --- meta ---------------------------------------------------------------------------------
    t = time.time()
    digest = sha256_file(args.gguf)
    timings["sha256_s"] = time.time() - t
    timings["total_s"] = time.time() - t_all
    meta = {
        "script": "scripts/smollm2_reference.py",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                     "safetensors": safetensors.__version__, "numpy": numpy.__version__},
        "gguf": {"path": args.gguf, "sha256": digest, "size_bytes": os.path.getsize(args.gguf)},
        "alpaca": {"path": args.alpaca, "rows": len(rows)},
        "model": {"vocab_size": vocab, "dtype": "float32", "attn_implementation": "eager",
                  "device": "cpu", "threads": torch.get_num_threads()},
        "tokenizer": {
            "gguf_metadata": facts,
            "transformers_adds_bos_by_default": hf_default_bos,
            "bos_added_in_these_files": encode(tok, "hi")[:1] == [facts["tokenizer.ggml.bos_token_id"]],
            # transformers' GGUF path pre-tokenizes with ByteLevel only; llama.cpp ("smollm") and
            # the original tokenizer split digits first. They differ e.g. on " \n2" (216,198 vs 3717).
            "transformers_pretokenizer": json.loads(tok.backend_tokenizer.pre_tokenizer.__getstate__()),
            "llamacpp_pretok_differs_count": len(pretok_differs),
            "llamacpp_pretok_differs_lines": pretok_differs,
        },
        "logits_prompts": [{k: p[k] for k in ("kind", "source", "text", "num_tokens")} for p in prompts],
        "encodings": {"alpaca_strings": len(texts) - len(EXTRA_STRINGS), "extra_strings": len(EXTRA_STRINGS)},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    with open(os.path.join(args.out, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=1)

    # --- summary ------------------------------------------------------------------------------
    for g in generations:
        print(f"[{g['source']}] {g['user']!r}\n  -> {g['text']!r} ({len(g['new_ids'])} tokens)")
    print(f"encodings where llama.cpp-style digit pre-splitting would differ: {len(pretok_differs)} of {len(texts)}")
    print("timings:", meta["timings"])
    for name in sorted(os.listdir(args.out)):
        print(f"  {name:22s} {os.path.getsize(os.path.join(args.out, name)):>12,d} B")
    if not generations[0]["text"].strip().startswith(EXPECTED_ANSWER):
        sys.exit(f"unexpected greedy answer {generations[0]['text']!r}; expected {EXPECTED_ANSWER!r}")


if __name__ == "__main__":
    main()
