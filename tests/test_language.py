"""Language of questions and chains of thought: posing, the consistency measure, the reward, the corpus."""
import random
from collections import Counter

import pytest

from qiusuo.corpus import CorpusConfig, examples
from qiusuo.evaluate import EvalConfig, heldout_problems, score_samples
from qiusuo.grpo import GRPOConfig, draw_problems
from qiusuo.language import consistency, localize, pose, question_lang, words
from qiusuo.rewards import RewardWeights, language_reward, parse_completion, score_completion
from qiusuo.tasks import format_completion, get_task, heldout
from qiusuo.tokenizer import Tokenizer


def arith(a=12, op="+", b=30):
    return get_task("arith").make_problem(a, op, b)


def test_words_are_latin_runs_or_chinese_characters():
    assert words("let me 算一下: 12+30=42 c1") == {"en": 3, "zh": 3}
    assert words("12+30=42>2,") == {"en": 0, "zh": 0}
    assert consistency("let me 算一下", "en") == pytest.approx(2 / 5)
    assert consistency("let me 算一下", "zh") == pytest.approx(3 / 5)
    assert consistency("1+2=3", "zh") == 0.0   # no words: in no language, not consistent


def test_pose_asks_the_same_problem_in_another_language():
    p = arith()
    en, zh = pose(p, "en"), pose(p, "zh")
    assert (en.prompt, zh.prompt) == ("compute 12+30", "计算 12+30")
    assert en.key() == zh.key() == p.key()           # same side of the held-out split
    assert question_lang(zh) == "zh" and question_lang(p) is None
    assert get_task("arith").score(zh, "42") == (1.0, "correct")
    cd = get_task("countdown").sample("train", seed=3, difficulty=3)
    assert pose(cd, "zh").prompt.startswith("用 ") and pose(cd, "zh").key() == cd.key()
    with pytest.raises(ValueError, match="cannot pose"):
        pose(p, "fr")


def test_localize_writes_the_trace_in_its_language():
    assert localize("", "zh") == ""
    en = localize("7+4=11 no;4*7=28 yes", "en")
    zh = localize("7+4=11 no;4*7=28 yes", "zh")
    assert consistency(en, "en") == 1.0 and consistency(zh, "zh") == 1.0
    assert "对" in zh and "错" in zh and "yes" not in zh
    # Chinese traces read the operators out, so every step carries words to measure.
    assert "7加4得11" in zh and "4乘7得28" in zh and "+" not in zh
    assert "7+4=11" in en
    # A Chinese trace that re-checks a step still counts as reflection.
    from qiusuo.tasks import reflects
    assert reflects(localize("3+4=8 wait 3+4=7", "zh")) and "wait" not in localize("3+4=8 wait 3+4=7", "zh")


def test_language_reward_is_the_share_in_the_question_language():
    zh = pose(arith(), "zh")
    mixed = format_completion("我来算一下：c1 so that is it", "42")   # 5 zh words, 5 en words (c, so, that, is, it)
    r = language_reward(zh, mixed)
    assert r.value == pytest.approx(5 / 10)
    assert language_reward(zh, "no tags") .value == 0.0
    # A CoT without words is in no language: no reward, else dropping every word would pay.
    assert language_reward(zh, format_completion("6*7=42", "42")).value == 0.0
    assert language_reward(zh, format_completion("", "42")).value == 0.0
    assert language_reward(arith(), mixed).value == 1.0     # a question in no language: nothing to match
    total, parts = score_completion(get_task("arith"), zh, mixed, RewardWeights(accuracy=1, format=0.2, language=0.5))
    assert parts["language"].value == pytest.approx(0.5)
    assert total == pytest.approx(1 + 0.2 + 0.25)


def test_corpus_poses_mixes_and_makes_one_language_weaker():
    cfg = CorpusConfig(tasks={"arith": [3, 4]}, task_weights={"arith": 1.0}, styles={"steps": 0.5, "checked": 0.5},
                       langs={"en": 0.5, "zh": 0.5}, mixed_share={"zh": 0.4}, weak_lang="zh", weak_slip_share=0.4,
                       n_examples=1500)
    rows = list(examples(cfg))
    langs = Counter(r["lang"] for r in rows)
    assert abs(langs["en"] - langs["zh"]) < 200
    zh_rows = [r for r in rows if r["lang"] == "zh"]
    assert all(r["trace_lang"] == "en" for r in rows if r["lang"] == "en")
    assert 0.33 < sum(r["trace_lang"] == "en" for r in zh_rows) / len(zh_rows) < 0.47
    task = get_task("arith")

    def accuracy(trace_lang):
        mine = [r for r in rows if r["trace_lang"] == trace_lang]
        right = 0
        for r in mine:
            a, op, b = next((int(x), o, int(y)) for o in "+-*" for x, _, y in [r["prompt"].split(" ")[1].partition(o)] if y)
            right += task.score(task.make_problem(a, op, b), parse_completion(r["completion"])[1])[0]
        return right / len(mine)

    assert accuracy("en") == 1.0
    assert 0.5 < accuracy("zh") < 0.7            # 40 % of zh traces replaced by a flawed one
    for r in rows:
        think = parse_completion(r["completion"])[0]
        assert consistency(think, r["trace_lang"]) == 1.0
    # Without languages the corpus is as before: no language fields, prompts as the tasks write them.
    plain = next(examples(CorpusConfig(n_examples=1)))
    assert "lang" not in plain and not plain["prompt"].startswith(("compute", "计算"))


def test_bad_language_settings_are_refused():
    with pytest.raises(ValueError, match="unknown language"):
        CorpusConfig(langs={"fr": 1.0})
    with pytest.raises(ValueError, match="weak_lang"):
        CorpusConfig(langs={"en": 1.0}, weak_lang="zh")
    with pytest.raises(ValueError, match="unknown language"):
        GRPOConfig(langs={"de": 1.0})
    with pytest.raises(ValueError, match="unknown language"):
        EvalConfig(langs=["xx"])


def test_eval_poses_each_heldout_question_in_every_language():
    cfg = EvalConfig(tasks={"arith": [3]}, n_per_difficulty=5, langs=["en", "zh"])
    problems = heldout_problems(cfg)
    assert len(problems) == 10
    assert [question_lang(p) for p in problems[:2]] == ["en", "zh"] and problems[0].key() == problems[1].key()
    assert all(heldout(p.key()) for p in problems)
    zh = problems[1]
    good = format_completion("我来算一下：3+4=7", zh.answer)
    mixed = format_completion("let me work it out", zh.answer)
    row = score_samples(zh, [good, mixed, "junk"])
    assert row["lang_consistency"] == pytest.approx(0.5)   # over the two samples with a CoT
    assert "lang_consistency" not in score_samples(arith(), [format_completion("x", "42")])


def test_grpo_poses_training_questions_in_the_configured_languages():
    cfg = GRPOConfig(tasks={"arith": [3]}, langs={"en": 0.5, "zh": 0.5})
    problems = draw_problems(cfg, random.Random(0), 200)
    counts = Counter(question_lang(p) for p in problems)
    assert counts["en"] > 60 and counts["zh"] > 60
    assert not any(heldout(p.key()) for p in problems)


def test_char_tokenizer_takes_a_corpus_characters_without_moving_ascii_ids():
    plain, wide = Tokenizer.char_level(), Tokenizer.char_level(extra_chars="计算一下，")
    assert wide.vocab_size == plain.vocab_size + 5
    assert wide.encode("12+30") == plain.encode("12+30")
    ids = wide.encode("计算 12+30")
    assert wide.decode(ids) == "计算 12+30" and len(ids) == 8


def test_prompt_and_cot_language_are_read_from_the_text():
    from qiusuo.language import cot_lang, prompt_lang

    assert prompt_lang(pose(arith(), "zh").prompt) == "zh" and prompt_lang(pose(arith(), "en").prompt) == "en"
    assert cot_lang(localize("2+3=5", "zh"), "zh") == "same"
    assert cot_lang(localize("2+3=5", "en"), "zh") == "other"
    assert cot_lang("我来算 so 5", "zh") == "mixed"
    assert cot_lang("2+3=5", "zh") is None
