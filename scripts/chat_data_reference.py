"""Writes the ids and assistant-only labels of multi-turn conversations as transformers'
chat template gives them, for tests/chat_data.rs (run by scripts/check-smollm2.sh).

input_ids = tokenizer.apply_chat_template(messages) (no special tokens added: the template
writes them). Labels are -100 except each assistant turn's tokens: for the assistant turn at
index i, the tokens from len(apply_chat_template(messages[:i], add_generation_prompt=True)) to
len(apply_chat_template(messages[:i + 1])). This counts tokens of each prefix tokenized on its
own (torchtune's way of masking a conversation turn by turn), where helix splits one
tokenization by byte offsets; each prefix's ids are checked to begin the whole conversation's.
labels_last keeps the last assistant turn's span alone (torchtune's train_on_last).
A row's "tools" go to the template as apply_chat_template(tools=...) takes them, and
--chat-template renders with a Jinja file in place of the tokenizer's template.
--generation-labels adds labels_generation: the ids where
apply_chat_template(return_assistant_tokens_mask=True) marks the template's
{% generation %} blocks (TRL's assistant_only_loss), -100 elsewhere.

Output (JSONL, one row per conversation, in file order):
  {"input_ids": [int], "labels": [int], "labels_last": [int]}
"""

import argparse
import json

from transformers import AutoTokenizer


def tokenized(tokenizer, messages, tools, chat_template, **kwargs):
    return tokenizer.apply_chat_template(
        messages, tools=tools, chat_template=chat_template, tokenize=True, **kwargs
    )


def ids_of(tokenizer, messages, generation_prompt, tools=None, chat_template=None):
    ids = tokenized(
        tokenizer, messages, tools, chat_template, add_generation_prompt=generation_prompt
    )
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="JSONL with a 'messages' list per row")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer_config.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--chat-template", help="a Jinja file to use as the chat template")
    parser.add_argument("--generation-labels", action="store_true")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    template = None
    if args.chat_template:
        with open(args.chat_template, encoding="utf-8") as f:
            template = f.read()
    rows = 0
    with open(args.data, encoding="utf-8") as src, open(args.out, "w") as out:
        for line in src:
            if not line.strip():
                continue
            row = json.loads(line)
            messages, tools = row["messages"], row.get("tools")

            def ids_of_prefix(n, generation_prompt):
                return ids_of(tokenizer, messages[:n], generation_prompt, tools, template)

            ids = ids_of_prefix(len(messages), False)
            labels = [-100] * len(ids)
            labels_last = list(labels)
            for i, m in enumerate(messages):
                if m["role"] != "assistant":
                    continue
                start = len(ids_of_prefix(i, True))
                through = ids_of_prefix(i + 1, False)
                assert ids[: len(through)] == through, f"row {rows + 1}: prefix {i} re-tokenizes"
                labels[start : len(through)] = ids[start : len(through)]
                labels_last = [-100] * len(ids)
                labels_last[start : len(through)] = ids[start : len(through)]
            row = {"input_ids": ids, "labels": labels, "labels_last": labels_last}
            if args.generation_labels:
                out_dict = tokenized(
                    tokenizer,
                    messages,
                    tools,
                    template,
                    return_dict=True,
                    return_assistant_tokens_mask=True,
                )
                assert list(out_dict["input_ids"]) == ids, f"row {rows + 1}: ids differ"
                mask = out_dict["assistant_masks"]
                row["labels_generation"] = [t if m else -100 for t, m in zip(ids, mask)]
            out.write(json.dumps(row) + "\n")
            rows += 1
    print(f"chat_data_reference: {rows} conversations")


if __name__ == "__main__":
    main()
