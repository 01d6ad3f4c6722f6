"""SFT batches: every row of every epoch is trained on, a set smaller than one batch trains, and resume
(in one process and in two) continues the very stream of batches an uninterrupted run takes."""
import json
from itertools import islice

import pytest

from qiusuo.sft import batches, epoch_rows


def seqs_of(lengths):
    return [([1] * n, [True] * n) for n in lengths]


SEQS = seqs_of([5, 17, 9, 30, 12, 3, 22, 8, 14, 6, 27, 11, 19, 4, 25, 10, 7, 16, 21, 2, 13, 18, 9])


def test_every_row_of_every_epoch_is_trained_on_once():
    B, max_len = 4, 32
    epochs = [epoch_rows(SEQS, max_len, seed=3, epoch=e) for e in range(4)]
    for rows in epochs:   # an epoch's rows hold every example once
        assert sorted(i for row in rows for i in row) == list(range(len(SEQS)))
    assert len(epochs[0]) % B   # the epoch does not end on a batch boundary: the case that used to drop rows
    n = sum(map(len, epochs[:3])) // B + 1
    got = list(islice(batches(SEQS, B, max_len, seed=3, position=0), n))
    assert all(len(b) == B for b in got)
    stream = [row for b in got for row in b]
    assert stream == [row for rows in epochs for row in rows][:len(stream)]


def test_resume_at_any_position_continues_the_same_stream():
    B, max_len = 4, 32
    whole = list(islice(batches(SEQS, B, max_len, seed=1, position=0), 20))
    for p in range(20):
        assert list(islice(batches(SEQS, B, max_len, seed=1, position=p), 20 - p)) == whole[p:]


def test_a_set_smaller_than_one_batch_fills_it_from_several_epochs():
    seqs = seqs_of([30, 30, 30])           # 3 rows of 32 tokens, one example each
    first = next(batches(seqs, 8, 32, seed=0, position=0))
    assert len(first) == 8
    assert first == [row for e in range(3) for row in epoch_rows(seqs, 32, 0, e)][:8]


# --- the stage ---------------------------------------------------------------------------------------

CHATS = [{"messages": [{"role": "user", "content": f"{a}+{a}?"}, {"role": "assistant", "content": str(2 * a)}]}
         for a in (3, 14, 25, 47, 58)]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory, tok):
    from conftest import tiny_model
    from qiusuo.model import save_model

    root = tmp_path_factory.mktemp("sft")
    save_model(tiny_model(tok, max_position_embeddings=512), root / "init")
    tok.save(root / "init")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return root


def sft(root, out, *extra):
    # max_len 16: each example (9-13 tokens) fills a row of its own, so the 5 examples pack into 5 rows
    return ["sft", "--init", root / "init", "--data", root / "chats.jsonl", "--out", root / out, "--batch-size", 4,
            "--max-len", 16, "--lr", 1e-3, "--warmup-steps", 1, "--log-every", 1, *extra]


def _metric(folder, key):
    return [json.loads(x)[key] for x in (folder / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_set_smaller_than_a_batch_trains_and_resumes_exactly(small_set, capsys):
    from test_dist import alone, rel_diff

    root = small_set
    alone(*sft(root, "few", "--batch-size", 8, "--steps", 2))
    assert "packs into 5 rows of 16 tokens, fewer than batch_size=8" in capsys.readouterr().err
    assert _metric(root / "few", "step") == [1, 2]
    # 5 rows, 4 a step: steps 2 and 4 cross an epoch boundary
    alone(*sft(root, "whole", "--steps", 4))
    alone(*sft(root, "resumed", "--steps", 2, "--save-every", 2))
    alone(*sft(root, "resumed", "--steps", 4, "--save-every", 2, "--resume"))
    assert _metric(root / "resumed", "train/loss") == _metric(root / "whole", "train/loss")
    assert rel_diff(_weights(root / "resumed"), _weights(root / "whole")) == 0


@pytest.mark.slow
def test_two_processes_across_epoch_boundaries_equal_one(small_set):
    """4 rows a step, 2 + 2 per rank, over 5-row epochs; and a 2-process resume at an epoch boundary."""
    from test_dist import alone, rel_diff, torchrun

    root = small_set
    alone(*sft(root, "one", "--steps", 4))
    torchrun(sft(root, "two", "--steps", 4),
             sft(root, "two_resumed", "--steps", 2, "--save-every", 2),
             sft(root, "two_resumed", "--steps", 4, "--save-every", 2, "--resume"))
    for run in ("two", "two_resumed"):
        assert _metric(root / run, "train/loss") == pytest.approx(_metric(root / "one", "train/loss"), rel=1e-5)
        assert rel_diff(_weights(root / run), _weights(root / "one")) <= 1e-5
