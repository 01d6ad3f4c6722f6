"""GRPO math against hand-computed values on small tensors."""
import math

import pytest
import torch

from qiusuo.grpo import (VARIANTS, GRPOConfig, agg_constant_norm, agg_sequence_mean, agg_token_mean,
                         clipped_surrogate, group_advantages, kl_k3, policy_loss, token_logprobs, training_batch,
                         Rollout)
from qiusuo.engine import Completion


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(r, eps=0.0 + 1e-12)
    std = math.sqrt(((0.5 ** 2) * 4) / 3)  # unbiased std of [1,0,0,1]
    assert torch.allclose(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std, atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(4))  # equal rewards: no signal
    # Dr. GRPO: centred only
    assert torch.allclose(group_advantages(r, scale_by_std=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_kl_k3_by_hand():
    logp = torch.log(torch.tensor([0.5, 0.2]))
    ref = torch.log(torch.tensor([0.25, 0.2]))
    # ratio = ref/p = 0.5 → 0.5 − ln 0.5 − 1; identical → 0
    expected = torch.tensor([0.5 - math.log(0.5) - 1, 0.0])
    assert torch.allclose(kl_k3(logp, ref), expected, atol=1e-6)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_ratio_and_clipping_by_hand():
    logp_old = torch.zeros(2, 3)
    # ratios 1.5, 1.0, 0.5 for both rows
    logp = torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.5, 1.0, 0.5]]))
    adv = torch.tensor([2.0, -1.0])
    obj, clipped = clipped_surrogate(logp, logp_old, adv, eps_low=0.2, eps_high=0.28)
    # A>0: min(1.5·2, 1.28·2)=2.56, 2, min(0.5·2, 0.8·2)=1.0 ; A<0: min(-1.5, -1.28)=-1.5, -1, min(-0.5,-0.8)=-0.8
    assert torch.allclose(obj, torch.tensor([[2.56, 2.0, 1.0], [-1.5, -1.0, -0.8]]), atol=1e-6)
    assert clipped.tolist() == [[True, False, False], [False, False, True]]


def test_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert agg_sequence_mean(per_token, mask, 4).item() == pytest.approx((2.0 + 4.0) / 2)   # GRPO
    assert agg_token_mean(per_token, mask, 4).item() == pytest.approx(10.0 / 4)             # DAPO
    assert agg_constant_norm(per_token, mask, 4).item() == pytest.approx(10.0 / (2 * 4))    # Dr. GRPO


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo"])
def test_padding_never_contributes(loss):
    torch.manual_seed(0)
    logp = torch.randn(3, 5, requires_grad=True)
    old, ref = torch.randn(3, 5), torch.randn(3, 5)
    adv = torch.randn(3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    v = VARIANTS[loss]
    l1, _ = policy_loss(logp, old, ref, adv, mask, v, 0.2, v.eps_high, 0.1, 5)
    l1.backward()
    assert torch.all(logp.grad[~mask] == 0)
    # changing padded values changes nothing
    junk = torch.where(mask, logp.detach(), torch.full_like(logp, 50.0))
    l2, _ = policy_loss(junk, torch.where(mask, old, -50.0), torch.where(mask, ref, 9.0), adv, mask, v, 0.2,
                        v.eps_high, 0.1, 5)
    assert l2.item() == pytest.approx(l1.item(), abs=1e-6)


def test_mu_one_gradient_is_the_policy_gradient():
    """With π_old = π_θ (detached) the loss value is −mean(A) and its gradient is −A·∇logp."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([3.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = policy_loss(logp, logp.detach(), None, adv, mask, VARIANTS["grpo"], 0.2, 0.2, 0.0, 2)
    loss.backward()
    assert loss.item() == pytest.approx(-3.0)
    assert torch.allclose(logp.grad, torch.tensor([[-1.5, -1.5]]))


def test_kl_term_in_loss_by_hand():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    loss, parts = policy_loss(logp, logp, ref, torch.tensor([0.0]), torch.ones(1, 1, dtype=torch.bool),
                              VARIANTS["grpo"], 0.2, 0.2, 0.5, 1)
    kl = 0.5 - math.log(0.5) - 1
    assert parts["kl"] == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.5 * kl)


def test_variant_defaults_are_derived():
    assert GRPOConfig(loss="dapo").eps_high == 0.28 and GRPOConfig(loss="dapo").beta == 0.0
    assert GRPOConfig(loss="dapo").dynamic_sampling and GRPOConfig(loss="dapo").overlong_buffer > 0
    assert GRPOConfig(loss="grpo").beta == 0.001 and not GRPOConfig(loss="grpo").dynamic_sampling
    assert GRPOConfig(loss="grpo", beta=0.0).beta == 0.0
    with pytest.raises(ValueError, match="loss must be one of"):
        GRPOConfig(loss="ppo")


def test_training_batch_masks_exactly_the_completion(model, tok):
    prompts = [[5, 6, 7], [8]]
    comps = [Completion(0, [20, 21]), Completion(0, [22]), Completion(1, [23]), Completion(1, [24, 25])]
    r = Rollout(problems=[None, None], prompt_ids=prompts, completions=comps, rewards=torch.zeros(2, 2), parts={})
    batch = training_batch(r, tok.pad_id, "cpu")
    # sequences are packed whole (5, 4, 2 and 3 tokens fit 3 rows of 5), none split, none duplicated
    assert batch.ids.shape == (3, 5)
    rows = [[t for t, d in zip(ids, doc) if d == i] for i in range(4)
            for ids, doc in zip(batch.ids.tolist(), batch.doc_ids.tolist()) if i in doc]
    assert rows == [[5, 6, 7, 20, 21], [5, 6, 7, 22], [8, 23], [8, 24, 25]]
    # the per-sequence layout marks exactly the completion targets, and the packed outputs predict them
    assert batch.mask.shape == (4, 4) and batch.mask.sum() == 6
    assert batch.target.tolist() == [20, 21, 22, 23, 24, 25]
    assert batch.ids.flatten()[batch.source + 1].tolist() == batch.target.tolist()
    logp, ent = token_logprobs(model, batch)
    assert logp.shape == batch.mask.shape and (logp[batch.mask] < 0).all() and (ent[batch.mask] > 0).all()
    assert (logp[~batch.mask] == 0).all()


def test_packed_log_probs_equal_each_sequence_alone(model, tok):
    """Packing is only a layout: every completion token's log-prob (and its gradient) equals what the
    sequence gives when run alone."""
    prompts = [tok.prompt_ids("12+34"), tok.prompt_ids("reach 46 with 3 7 25 2")]
    comps = [Completion(0, tok.encode(t)) for t in ("<think>4+2=6</think>", "<answer>46</answer>", "x")] + \
            [Completion(1, tok.encode(t)) for t in ("<think>7*2=14", "25+14+7=46</think><answer>", "")]
    comps[-1].token_ids = [tok.eos_id]
    r = Rollout(problems=[None, None], prompt_ids=prompts, completions=comps, rewards=torch.zeros(2, 3), parts={})
    batch = training_batch(r, tok.pad_id, "cpu")
    assert batch.ids.shape[0] < len(comps)          # something was actually packed together
    logp, _ = token_logprobs(model, batch, temperature=0.7)
    for i, c in enumerate(comps):
        seq = prompts[i // 3] + c.token_ids
        alone = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0] / 0.7, -1)
        expected = alone[torch.arange(len(seq) - 1), torch.tensor(seq[1:])][-len(c.token_ids):]
        assert torch.allclose(logp[i][batch.mask[i]], expected, atol=1e-5)
    # minibatch subsets keep the full per-sequence width so π_old / π_ref rows line up
    part = batch.subset(slice(3, 6))
    assert part.mask.shape == (3, batch.mask.shape[1]) and torch.equal(part.mask, batch.mask[3:])
    assert torch.allclose(token_logprobs(model, part, 0.7)[0], logp[3:], atol=1e-5)


def test_temperature_zero_is_refused():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GRPOConfig(temperature=0.0)


def test_rollout_rounds_and_steps_draw_disjoint_streams():
    """Row r of a round samples with stream seed + r: every (run seed, step, refill round) must own
    its own block of P·G streams, so a refill never replays the first round's samples."""
    from qiusuo.grpo import rollout_seed

    cfg = GRPOConfig(prompts_per_step=4, group_size=3, max_refills=2)
    rows = 12
    blocks = [range(rollout_seed(c, step, r), rollout_seed(c, step, r) + rows)
              for c in (cfg, GRPOConfig(prompts_per_step=4, group_size=3, max_refills=2, seed=1))
              for step in range(50) for r in range(cfg.max_refills + 1)]
    streams = [s for b in blocks for s in b]
    assert len(set(streams)) == len(streams)


def _rollout(accuracy, fmt):
    acc, fm = torch.tensor(accuracy), torch.tensor(fmt)
    P, G = acc.shape
    return Rollout(problems=list(range(P)), prompt_ids=[[1]] * P, completions=[Completion(i // G, [2]) for i in range(P * G)],
                   rewards=acc + 0.2 * fm, parts={"accuracy": acc, "format": fm, "overlong": torch.zeros(P, G)})


def test_dynamic_sampling_filters_on_accuracy():
    """DAPO keeps groups with 0 < correct < G; a group that differs only in format is dropped."""
    from qiusuo.grpo import informative

    r = _rollout([[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    kept = informative(r, 2)
    assert kept.problems == [2]
    assert kept.rewards.tolist() == [[pytest.approx(1.2), pytest.approx(0.2)]]


@pytest.mark.parametrize("n, minibatches, sizes", [(8, 2, [4, 4]), (3, 4, [1, 1, 1]), (10, 4, [2, 3, 2, 3]),
                                                    (1, 1, [1])])
def test_minibatch_slices_cover_the_batch(n, minibatches, sizes):
    from qiusuo.grpo import minibatch_slices

    slices = minibatch_slices(n, minibatches)
    assert [s.stop - s.start for s in slices] == sizes
    assert slices[0].start == 0 and slices[-1].stop == n


def test_update_on_a_batch_smaller_than_minibatches(model, tok):
    """Dynamic sampling can keep fewer sequences than `minibatches`: the step still trains, once per
    sequence, and moves the weights."""
    from qiusuo.grpo import update

    cfg = GRPOConfig(prompts_per_step=4, group_size=2, minibatches=4, mu=1, beta=0.0)
    comps = [Completion(0, tok.encode("<think>1</think>")), Completion(0, tok.encode("<answer>2</answer>"))]
    r = Rollout(problems=[None], prompt_ids=[tok.prompt_ids("1+1")], completions=comps, rewards=torch.zeros(1, 2), parts={})
    batch = training_batch(r, tok.pad_id, "cpu")
    model.train()

    class CountingSGD(torch.optim.SGD):
        steps = 0

        def step(self, closure=None):
            CountingSGD.steps += 1
            return super().step(closure)

    opt = CountingSGD(model.parameters(), lr=0.0)   # lr 0: π_θ stays π_old, so every ratio is 1
    with torch.no_grad():
        old = token_logprobs(model, batch, 1.0)[0]
    stats = update(model, opt, batch, torch.tensor([1.0, -1.0]), old, None, VARIANTS["grpo"], cfg)
    assert CountingSGD.steps == 2                           # one optimizer step per sequence
    assert stats["loss"] == pytest.approx(0.0, abs=1e-6)    # −mean(A·1) of each one-sequence minibatch, averaged
    assert stats["grad_norm"] > 0
