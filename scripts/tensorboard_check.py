"""Reads a helix run's TensorBoard event files with TensorBoard's own loaders and compares every
scalar with the run's metrics.jsonl: the same steps, each once, with the same values (as f32).

The run (tests/resume_cli.rs, tensorboard_events_follow_metrics_jsonl_across_a_resume) was
killed at step 12 and resumed from its step-10 checkpoint. Two directories are read:
tensorboard/ as the resume left it (one file), and watched/ with the killed run's file beside
it, as a TensorBoard watching throughout had read both. Each is read with EventAccumulator (the
classic reader) and plugin_event_accumulator (the Python server's); watched/ also by a
`tensorboard --logdir --load_fast=true` server (its Rust data server), asked over HTTP as the
browser asks it, and, in a copy with the killed run's last record cut short (as a kill
mid-write leaves it), by EventAccumulator. The run's config must be in the Text tab, and its
values in the HParams dashboard: the session start's hyperparameters equal the Text tab's
TOML flattened to dotted keys (parsed here by tomllib), the session ended in success, and a
server over tensorboard/ lists the hyperparameters and the scalar tags as the experiment's
and answers the run's session group with its last val/loss.

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
import tomllib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
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


@contextmanager
def serving(logdir):
    """A `tensorboard --logdir --load_fast=true` server over logdir; yields (get, post) for its
    /data routes, which raise OSError until it serves."""
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

    def alive():
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"FAIL tensorboard server exited {proc.returncode}:\n{log.read().decode()}")

    def get(path):
        alive()
        return json.load(urllib.request.urlopen(base + path, timeout=10))

    def post(path, body):
        alive()
        req = urllib.request.Request(
            base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        return json.load(urllib.request.urlopen(req, timeout=10))

    try:
        yield get, post
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def poll(ask, done, seconds=120):
    """ask() until done(answer) or `seconds` pass (the server loads files in the background);
    the last answer."""
    got, deadline = None, time.time() + seconds
    while time.time() < deadline:
        time.sleep(1)
        try:
            got = ask()
        except (OSError, KeyError, IndexError):
            continue  # not serving yet, or not loaded yet
        if done(got):
            break
    return got


def server(logdir, want):
    """What a `tensorboard --logdir` server answers for each scalar tag, once it answers
    `want` or has had two minutes to load the files."""

    def scalars(get):
        got = {}
        for tag in get("/plugin/scalars/tags").get(".", {}):
            q = urllib.parse.urlencode({"run": ".", "tag": tag})
            got[tag] = [(step, np.float32(v)) for _, step, v in get(f"/plugin/scalars/scalars?{q}")]
        return got

    with serving(logdir) as (get, _):
        return poll(lambda: scalars(get), lambda got: got == want) or {}


def flatten(prefix, v, out):
    """A TOML table's values by dotted key, as the HParams dashboard is to show them: lists of
    tables by index, other lists as their JSON text."""
    if isinstance(v, dict):
        for k, x in v.items():
            flatten(f"{prefix}.{k}" if prefix else k, x, out)
    elif isinstance(v, list) and any(isinstance(x, dict) for x in v):
        for i, x in enumerate(v):
            flatten(f"{prefix}[{i}]", x, out)
    elif isinstance(v, list):
        out[prefix] = json.dumps(v, separators=(",", ":"))
    elif isinstance(v, bool):
        out[prefix] = v
    elif isinstance(v, (int, float)):
        out[prefix] = float(v)
    else:
        out[prefix] = v
    return out


def hparams(logdir, config_toml, metrics):
    """The HParams dashboard's view of the run: the accumulator's session infos, then a
    server's experiment and session group."""
    acc = plugin_event_accumulator.EventAccumulator(
        str(logdir), size_guidance={plugin_event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = hparams_metadata.parse_session_start_info_plugin_data(content[hparams_metadata.SESSION_START_INFO_TAG])
    end = hparams_metadata.parse_session_end_info_plugin_data(content[hparams_metadata.SESSION_END_INFO_TAG])
    got = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    want = flatten("", tomllib.loads(config_toml), {})
    if got != want:
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        sys.exit(f"FAIL {logdir}: hyperparameters differ from the Text tab's config at {diff}")
    if end.status != 1:  # STATUS_SUCCESS
        sys.exit(f"FAIL {logdir}: session end status {end.status}")
    print(f"ok tensorboard {logdir.name}/ HParams session: {len(got)} hyperparameters equal the config, ended in success")

    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r][-1]
    # Served as `tensorboard --logdir runs/` serves a run: in a directory of runs, where the
    # run's scalars are its session's metrics (group "").
    runs = Path(tempfile.mkdtemp())
    shutil.copytree(logdir, runs / "lora" / "tensorboard")
    with serving(runs) as (_, post):
        exp = poll(
            lambda: post("/plugin/hparams/experiment", {"experimentName": "", "includeMetrics": True}),
            lambda e: len(e.get("hparamInfos", [])) == len(want) and e.get("metricInfos"),
        )
        names = {h["name"] for h in exp["hparamInfos"]}
        tags = {m["name"]["tag"] for m in exp["metricInfos"]}
        if names != set(want) or not set(TAGS.values()) <= tags:
            sys.exit(f"FAIL server experiment: hparams {sorted(names ^ set(want))}, metrics {sorted(tags)}")
        request = {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "val/loss", "group": ""}, "order": "ORDER_ASC"}],
            "startIndex": 0,
            "sliceSize": 10,
            "includeMetrics": True,
        }
        groups = post("/plugin/hparams/session_groups", request)["sessionGroups"]
    shutil.rmtree(runs)
    if [g["name"] for g in groups] != ["lora/tensorboard"]:
        sys.exit(f"FAIL server session groups: {[g['name'] for g in groups]}, expected the run's one")
    group = groups[0]
    metric = {m["name"]["tag"]: m for m in group["metricValues"]}["val/loss"]
    if (metric["trainingStep"], np.float32(metric["value"])) != (val[0], np.float32(val[1])):
        sys.exit(f"FAIL server session group: val/loss {metric}, expected step {val[0]} value {val[1]}")
    if group["sessions"][0]["status"] != "STATUS_SUCCESS" or group["hparams"]["optimizer.lr"] != want["optimizer.lr"]:
        sys.exit(f"FAIL server session group: {group['sessions'][0]['status']}, {group['hparams']}")
    print(
        f"ok tensorboard {logdir.name}/ HParams dashboard (--load_fast server): {len(names)} hyperparameters, "
        f"{len(tags)} metrics, the run's session with val/loss {metric['value']:.4f} at step {val[0]}"
    )


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
    config_toml = "\n".join(line.removeprefix("    ") for line in texts[0][1].splitlines())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
    hparams(run / "tensorboard", config_toml, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "watched"
        shutil.copytree(run / "watched", cut)
        first = sorted(cut.glob("events.out.tfevents.*"))[0]
        first.write_bytes(first.read_bytes()[:-5])
        compare("watched/ with the killed run's last record cut", classic(cut), want)


if __name__ == "__main__":
    main()
