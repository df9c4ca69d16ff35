"""Prints the training losses of a helix metrics.jsonl, one line, 6 decimals each: what the
memory scripts (activation-memory.sh, sequence-parallel-memory.sh) compare between runs."""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
print(" ".join(f"{r['loss']:.6f}" for r in rows if r.get("loss") is not None))
