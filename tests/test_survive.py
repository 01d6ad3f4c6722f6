"""Runs that survive: SIGKILL at random moments resumes bit-identically, the last K checkpoints are kept, a
damaged newest one falls back to the previous, and every bad input or full disk is one line and a
non-zero exit with the previous checkpoint intact."""
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qiusuo.checkpoint import StageFolder, checkpoint_steps, load_checkpoint, verify_manifest
from qiusuo.cli import main
from qiusuo.model import CheckpointError
from qiusuo.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1}"
# One thread in every run: a subprocess and its resumed successor must do identical float arithmetic.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run(*args):
    assert main([str(a) for a in args]) == 0


def pretrain_args(corpus, out, steps, *extra):
    return ["pretrain", "--data", corpus, "--out", out, "--model", TINY_MODEL, "--steps", steps,
            "--batch-size", 4, "--max-len", 128, "--log-every", 100, *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    run("corpus", "--out", root, "--n-examples", 120)
    return root


@pytest.fixture(scope="module")
def base(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    run(*pretrain_args(corpus, out, 4, "--save-every", 2))
    return out


def copy_of(base: Path, dst: Path) -> Path:
    """A stage folder like `base` (4 steps, checkpoints at 2 and 4) without running it again."""
    shutil.copytree(base, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (wall-clock, not training, quantities)."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k != "time_s" and not k.startswith("perf/")} for m in lines]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert metrics(a) == metrics(b)


# A fork server: one process pays for importing torch (and torch._dynamo, which the optimizer pulls in)
# once; each run is a child forked from it that runs the real `qiusuo` command line and can be SIGKILLed.
# The server itself never runs a torch operation, so its children start with no thread pools to inherit.
ZYGOTE = r"""
import json, os, resource, signal, sys
import torch._dynamo  # noqa: F401
from qiusuo.cli import main
for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        if cmd["fsize"]:  # writes past the limit fail with EFBIG instead of killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (cmd["fsize"], cmd["fsize"]))
        try:
            rc = main(cmd["argv"])
        finally:
            sys.stderr.flush()
        os._exit(rc)
    print(pid, flush=True)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Runs:
    """Start `qiusuo …` runs as children of the fork server; `wait` gives (exit code, stderr)."""

    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        self.server = subprocess.Popen([sys.executable, "-c", ZYGOTE], env=ENV, cwd=ROOT, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def start(self, *args, fsize: int | None = None) -> int:
        self.n += 1
        self.err = self.tmp / f"stderr-{self.n}.txt"
        cmd = {"argv": [str(a) for a in args], "stderr": str(self.err), "fsize": fsize}
        self.server.stdin.write(json.dumps(cmd) + "\n")
        self.server.stdin.flush()
        return int(self.server.stdout.readline())

    def ended(self) -> bool:
        """Has the current run ended (its exit code is waiting to be read)?"""
        return bool(select.select([self.server.stdout], [], [], 0)[0])

    def wait(self) -> tuple[int, str]:
        return int(self.server.stdout.readline()), self.err.read_text()

    def run(self, *args, fsize: int | None = None) -> tuple[int, str]:
        self.start(*args, fsize=fsize)
        return self.wait()

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = Runs(tmp_path_factory.mktemp("runs"))
    yield r
    r.close()


def last_step(out: Path) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def kill_at(runs: Runs, pid: int, out: Path, step: int, rng: random.Random) -> None:
    """SIGKILL run `pid` once it has logged `step`, after a random further delay (often mid-save)."""
    deadline = time.monotonic() + 120
    while last_step(out) < step and time.monotonic() < deadline:
        if runs.ended():
            pytest.fail(f"the run ended before step {step}: {runs.wait()}")
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.02))
    if runs.ended():
        pytest.fail(f"the run ended before it could be killed: {runs.wait()}")
    os.kill(pid, signal.SIGKILL)
    rc, err = runs.wait()
    assert rc == -signal.SIGKILL, err


def killed_and_resumed(runs: Runs, args: list, out: Path, steps: int, kills: int, seed: int, margin: int) -> None:
    """Kill the run `kills` times, after random steps that leave `margin` steps to go, then finish it."""
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, steps - margin), kills))
    for i, target in enumerate(targets):
        kill_at(runs, runs.start(*args, *(["--resume"] if i else [])), out, target, rng)
    rc, err = runs.run(*args, "--resume")
    assert rc == 0, err


# --- kills ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pretrain_killed_three_times_resumes_bit_identically(runs, corpus, tmp_path):
    steps = 12
    rc, err = runs.run(*pretrain_args(corpus, tmp_path / "ref", steps, "--save-every", 1))
    assert rc == 0, err
    args = pretrain_args(corpus, tmp_path / "k", steps, "--save-every", 1)
    killed_and_resumed(runs, args, tmp_path / "k", steps, 3, seed=1, margin=3)
    assert_same_run(tmp_path / "ref", tmp_path / "k")
    assert [p.name for _, p in checkpoint_steps(tmp_path / "k")] == ["step-000011", "step-000012"]


@pytest.mark.slow
def test_dapo_killed_twice_resumes_bit_identically(runs, base, tmp_path):
    steps = 6

    def args(out):
        return ["grpo", "--init", base, "--out", out, "--loss", "dapo", "--steps", steps, "--prompts-per-step", 2,
                "--group-size", 2, "--max-new-tokens", 8, "--max-refills", 1, "--save-every", 1, "--sample-every", 1,
                "--tasks", "{arith: [2]}"]

    rc, err = runs.run(*args(tmp_path / "ref"))
    assert rc == 0, err
    killed_and_resumed(runs, args(tmp_path / "k"), tmp_path / "k", steps, 2, seed=2, margin=1)
    assert_same_run(tmp_path / "ref", tmp_path / "k")
    assert (tmp_path / "ref" / "samples.jsonl").read_text() == (tmp_path / "k" / "samples.jsonl").read_text()


# --- checkpoints kept, checked, locked ------------------------------------------------------------

def test_keeps_last_k_with_manifest_and_top_level_export(corpus, tmp_path):
    out = tmp_path / "b"
    run(*pretrain_args(corpus, out, 5, "--save-every", 1, "--keep-last", 3))
    held = checkpoint_steps(out)
    assert [s for s, _ in held] == [3, 4, 5]
    newest = held[-1][1]
    verify_manifest(newest)
    manifest = json.loads((newest / "manifest.json").read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "config.yaml", "train_state.pt"} <= set(manifest)
    # the top-level checkpoint is the newest one (the same file), and the state does not repeat the weights
    assert os.path.samefile(out / "model.safetensors", newest / "model.safetensors")
    state = torch.load(newest / "train_state.pt", weights_only=False)
    assert "model" not in state and state["step"] == 5 and state["data_pos"] == 5
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_corrupt_newest_falls_back_with_a_warning(corpus, base, tmp_path, capsys):
    out = copy_of(base, tmp_path / "b")
    newest = out / "checkpoints" / "step-000004" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # same size, caught by the CRC
    newest.write_bytes(bytes(data))
    capsys.readouterr()
    run(*pretrain_args(corpus, out, 4, "--save-every", 2, "--resume"))
    err = capsys.readouterr().err
    assert "checkpoints/step-000004 is corrupt (model.safetensors fails its CRC32 check)" in " ".join(err.split())
    assert "resumed" in err and "at step 2" in err
    assert (out / "checkpoints" / "step-000004.corrupt").is_dir()
    assert_same_run(base, out)


def test_truncated_state_falls_back_and_truncated_weights_are_one_line(corpus, base, tmp_path, capsys):
    out = copy_of(base, tmp_path / "b")
    state = out / "checkpoints" / "step-000004" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert main([str(a) for a in pretrain_args(corpus, out, 4, "--save-every", 2, "--resume")]) == 0
    assert "step-000004 is corrupt (train_state.pt has 100 bytes" in capsys.readouterr().err
    # --init from a folder whose weights are cut short: one line naming it
    bad = tmp_path / "cut"
    shutil.copytree(out, bad, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot read weights" in err and str(bad) in err


def test_fresh_run_into_checkpoints_refused_and_lock_excludes(corpus, base, tmp_path, capsys):
    out = copy_of(base, tmp_path / "b")
    assert main([str(a) for a in pretrain_args(corpus, out, 2)]) == 2
    assert "already holds checkpoints (newest: step-000004); use --resume" in capsys.readouterr().err
    run(*pretrain_args(corpus, out, 1, "--save-every", 1, "--overwrite"))
    assert [s for s, _ in checkpoint_steps(out)] == [1]
    held = StageFolder(out, resume=True)
    with pytest.raises(CheckpointError, match="being written by another run"):
        StageFolder(out, resume=True)
    held.close()
    StageFolder(out, resume=True).close()


def test_other_ranks_read_without_locking_or_renaming(base, tmp_path, capsys):
    out = copy_of(base, tmp_path / "b")
    state = out / "checkpoints" / "step-000004" / "train_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    held = StageFolder(out, resume=True)  # rank 0 holds the lock
    other = StageFolder(out, resume=True, primary=False)
    model, _ = load_checkpoint(out)
    _, found = other.newest(model)
    assert found["step"] == 2 and (out / "checkpoints" / "step-000004").is_dir()  # only rank 0 renames
    assert "step-000004 is corrupt" in capsys.readouterr().err
    other.close()
    held.close()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(runs, corpus, base, tmp_path):
    out = copy_of(base, tmp_path / "b")
    shutil.rmtree(out / "checkpoints" / "step-000004")
    limit = (out / "model.safetensors").stat().st_size // 2
    rc, err = runs.run(*pretrain_args(corpus, out, 4, "--save-every", 2, "--resume"), fsize=limit)
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("qiusuo pretrain: error: cannot save checkpoints/step-000004 (")
    assert last.endswith("step-000002 is intact") and "Traceback" not in err
    assert [s for s, _ in checkpoint_steps(out)] == [2]
    verify_manifest(out / "checkpoints" / "step-000002")
    assert not list((out / "checkpoints").glob(".tmp-*"))


# --- clear refusals -------------------------------------------------------------------------------

def test_unknown_keys_and_flags_suggest_the_right_name(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain:\n  stpes: 3\n")
    assert main(["pretrain", "--config", str(cfg)]) == 2
    assert "unknown SFTConfig setting(s): stpes (did you mean steps?)" in capsys.readouterr().err
    assert main(["grpo", "--group-sise", "4"]) == 2
    assert capsys.readouterr().err.strip() == "qiusuo grpo: error: unknown flag --group-sise (did you mean --group-size?)"


def test_other_architecture_and_foreign_tokenizer_refused(corpus, base, tmp_path, capsys):
    out = copy_of(base, tmp_path / "b")
    wider = TINY_MODEL.replace("hidden_size: 32", "hidden_size: 64")
    args = [str(a) for a in pretrain_args(corpus, out, 4, "--resume")]
    capsys.readouterr()
    assert main(args[:args.index("--model") + 1] + [wider] + args[args.index("--model") + 2:]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("qiusuo pretrain: error: ") and "another architecture (hidden_size 32 there, 64 here" in err
    # a checkpoint of a model family qiusuo does not implement
    other = tmp_path / "gpt2"
    shutil.copytree(base, other, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    hf = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    assert main(["eval", "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model_type 'gpt2' is not supported" in err
    # a tokenizer with more tokens than the model has embedding rows
    foreign = tmp_path / "foreign"
    shutil.copytree(base, foreign, ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    tok = Tokenizer.char_level()
    tok.backend.add_tokens([f"<extra_{i}>" for i in range(40)])
    (foreign / "tokenizer.json").unlink()
    tok.save(foreign)
    assert main(["grpo", "--init", str(foreign), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"the tokenizer has {tok.vocab_size} tokens but the model's embedding has" in err


def test_malformed_data_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "completion": "2"}\n{"prompt": 3}\n')
    args = ["pretrain", "--data", str(bad), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().startswith(f"qiusuo pretrain: error: {bad}:2: malformed corpus line")
    with pytest.raises(ValueError, match="bad.jsonl:2: malformed"):
        main(args + ["--debug"])


def test_unexpected_errors_are_one_line_too(monkeypatch, capsys):
    def boom(*a, **kw):
        raise RuntimeError("the kernel said no\nsecond line")

    monkeypatch.setattr("qiusuo.cli.run_stage", boom)
    assert main(["pretrain"]) == 1
    assert capsys.readouterr().err == ("qiusuo pretrain: error: RuntimeError: the kernel said no second line "
                                       "(rerun with --debug for the traceback)\n")
    with pytest.raises(RuntimeError, match="the kernel said no"):
        main(["pretrain", "--debug"])
