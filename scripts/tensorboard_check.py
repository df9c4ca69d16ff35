"""Reads a helix run's TensorBoard event files with TensorBoard's own loaders and compares every
scalar with the run's metrics.jsonl: the same steps, each once, with the same values (as f32).

The run (tests/resume_cli.rs, tensorboard_events_follow_metrics_jsonl_across_a_resume) was
killed at step 12 and resumed from its step-10 checkpoint. Two directories are read:
tensorboard/ as the resume left it (one file), and watched/ with the killed run's file beside
it, as a TensorBoard watching throughout had read both. Each is read with EventAccumulator (the
classic reader) and plugin_event_accumulator (the Python server's); watched/ also by a
`tensorboard --logdir --load_fast=true` server (its Rust data server), asked over HTTP as the
browser asks it, and, in a copy with the killed run's last record cut short (as a kill
mid-write leaves it), by EventAccumulator. The run's config must be in the Text tab.

Usage: python scripts/tensorboard_check.py --run DIR   (DIR holds metrics.jsonl, tensorboard/,
watched/)
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.util import tensor_util

# metrics.jsonl field -> TensorBoard tag, as helix writes them.
TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens": "train/tokens",
    "tokens_per_s": "train/tokens_per_s",
    "step_time_s": "train/step_time_s",
    "ckpt_stall_s": "train/ckpt_stall_s",
    "val_loss": "val/loss",
}


def expected(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    want = {}
    for field, tag in TAGS.items():
        points = [(r["step"], np.float32(r[field])) for r in rows if field in r]
        if points:
            want[tag] = points
    return want


def classic(logdir):
    acc = event_accumulator.EventAccumulator(str(logdir), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(s.step, np.float32(s.value)) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def served(logdir):
    acc = plugin_event_accumulator.EventAccumulator(
        str(logdir), size_guidance={plugin_event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    out = {}
    for tag in acc.PluginTagToContent("scalars"):
        out[tag] = [(t.step, np.float32(tensor_util.make_ndarray(t.tensor_proto).item())) for t in acc.Tensors(tag)]
    return out


def config_text(logdir):
    """The run's config as the Text tab reads it: one text per run, at the step it started."""
    acc = plugin_event_accumulator.EventAccumulator(
        str(logdir), size_guidance={plugin_event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    tags = list(acc.PluginTagToContent("text"))
    if tags != ["config"]:
        sys.exit(f"FAIL {logdir}: text tags {tags}, expected ['config']")
    texts = [(t.step, tensor_util.make_ndarray(t.tensor_proto).item().decode()) for t in acc.Tensors("config")]
    return texts


def server(logdir, want):
    """What a `tensorboard --logdir` server answers for each scalar tag, once it answers
    `want` or has had two minutes to load the files."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "tensorboard"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [str(exe), "--logdir", str(logdir), "--port", str(port), "--load_fast=true", "--reload_interval", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://localhost:{port}/data"
    get = lambda path: json.load(urllib.request.urlopen(base + path, timeout=10))
    got = {}
    try:
        deadline = time.time() + 120
        while got != want and time.time() < deadline:
            time.sleep(1)
            if proc.poll() is not None:
                log.seek(0)
                sys.exit(f"FAIL tensorboard server exited {proc.returncode}:\n{log.read().decode()}")
            try:
                got = {}
                for tag in get("/plugin/scalars/tags").get(".", {}):
                    q = urllib.parse.urlencode({"run": ".", "tag": tag})
                    points = get(f"/plugin/scalars/scalars?{q}")
                    got[tag] = [(step, np.float32(v)) for _, step, v in points]
            except OSError:
                pass  # not serving yet
        return got
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def compare(what, got, want):
    if set(got) != set(want):
        sys.exit(f"FAIL {what}: tags {sorted(got)} != {sorted(want)}")
    for tag, points in want.items():
        if got[tag] != points:
            steps = [s for s, _ in got[tag]]
            sys.exit(f"FAIL {what}: {tag}: steps {steps} values differ from metrics.jsonl")
    n = sum(len(p) for p in want.values())
    print(f"ok tensorboard {what}: {len(want)} tags, {n} scalars equal metrics.jsonl")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, type=Path)
    run = ap.parse_args().run
    want = expected(run)
    for sub in ["tensorboard", "watched"]:
        logdir = run / sub
        compare(f"{sub}/ EventAccumulator", classic(logdir), want)
        compare(f"{sub}/ plugin_event_accumulator", served(logdir), want)
    compare("watched/ tensorboard --logdir --load_fast=true server", server(run / "watched", want), want)
    texts = config_text(run / "tensorboard")
    # The resumed run's, at step 10: its [output] section asks for these events.
    if [step for step, _ in texts] != [10] or "    tensorboard = true" not in texts[0][1].splitlines():
        sys.exit(f"FAIL tensorboard/: config text {texts}")
    print(f"ok tensorboard tensorboard/ Text tab: the run's config at step 10 ({len(texts[0][1].splitlines())} lines)")
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "watched"
        shutil.copytree(run / "watched", cut)
        first = sorted(cut.glob("events.out.tfevents.*"))[0]
        first.write_bytes(first.read_bytes()[:-5])
        compare("watched/ with the killed run's last record cut", classic(cut), want)


if __name__ == "__main__":
    main()
