"""The family catalogue and drawing tasks from it (pskernels.synthesis.families): no model involved."""
import pytest

from pskernels.synthesis.families import FAMILIES, HELD_OUT_FAMILIES, TRAIN_FAMILIES, draw_workflows, select_families


def test_at_least_12_families_split_into_disjoint_train_and_held_out():
    assert len(FAMILIES) >= 12
    assert set(TRAIN_FAMILIES).isdisjoint(HELD_OUT_FAMILIES)
    assert set(TRAIN_FAMILIES) | set(HELD_OUT_FAMILIES) == set(FAMILIES)
    assert 3 <= len(HELD_OUT_FAMILIES) <= 5
    assert [f.name for f in select_families("train")] == list(TRAIN_FAMILIES)
    assert [f.name for f in select_families("held_out")] == list(HELD_OUT_FAMILIES)
    assert all(f.split == "held_out" for f in select_families("held_out"))
    assert [f.name for f in select_families("sum, intersect")] == ["sum", "intersect"]
    with pytest.raises(ValueError, match="families: unknown family 'nope'"):
        select_families(["sum", "nope"])
    with pytest.raises(ValueError, match="families: expected at least one"):
        select_families([])


def test_every_family_has_several_wordings_and_its_own_texts():
    specs = draw_workflows(None, 30, seed=0)
    texts = {}
    for name in FAMILIES:
        mine = [s for s in specs if s.family == name]
        assert len(mine) == 30
        assert len({s.task.meta["wording"] for s in mine}) >= 3, name
        assert len({s.task.synthesis for s in mine}) >= 2, name
        assert len({s.task.task for s in mine}) >= 3, name
        assert len({s.system for s in mine}) >= 3, name
        texts[name] = {s.task.task for s in mine} | {t for s in mine for t in s.task.subtasks}
    names = list(texts)
    for i, a in enumerate(names):  # no family shares a task or sub-task text with another
        for b in names[i + 1:]:
            assert texts[a].isdisjoint(texts[b]), (a, b)


def test_drawing_is_deterministic_and_independent_of_the_other_families():
    a = draw_workflows(None, 3, seed=11)
    assert a == draw_workflows(None, 3, seed=11)
    assert a != draw_workflows(None, 3, seed=12)
    only = draw_workflows(["conflict"], 3, seed=11)
    assert only == [s for s in a if s.family == "conflict"]
    assert len({s.id for s in a}) == len(a)
    assert [s.family for s in draw_workflows(["sum", "rank"], 2)] == ["sum", "rank", "sum", "rank"]  # round-robin


def test_2_to_8_workers_and_the_range_is_respected():
    counts = [len(s.task.subtasks) for s in draw_workflows(None, 20, seed=1)]
    assert min(counts) == 2 and max(counts) == 8
    assert {len(s.task.subtasks) for s in draw_workflows(None, 10, seed=2, n_workers=(3, 4))} <= {3, 4}
    assert all(len(s.task.subtasks) <= 5 for s in draw_workflows(["summary"], 20, seed=1))
    with pytest.raises(ValueError, match="n_workers"):
        draw_workflows(None, 1, n_workers=(3, 2))
    with pytest.raises(ValueError, match="n_workers"):
        draw_workflows(["summary"], 1, n_workers=(6, 8))


def test_ground_truth_answers_follow_from_the_workers_facts():
    for s in draw_workflows(None, 10, seed=3):
        t = s.task
        if t.answer is None:
            continue
        if s.family == "sum":
            assert t.answer == str(sum(t.meta["counts"]))
        elif s.family == "merge_lists":
            assert t.answer == str(len(t.meta["merged"]))
        elif s.family == "count":
            assert t.answer == str(t.meta["states"].count(t.meta["target"]))
            assert all(st in sub for st, sub in zip(t.meta["states"], t.subtasks))
        else:  # the answer is stated in at least one worker's sub-task (its branch)
            assert any(t.answer in sub for sub in t.subtasks), (s.family, t.answer)
        if s.family == "intersect":
            assert all(t.answer in sub for sub in t.subtasks)
        if s.family == "vote":
            assert t.meta["votes"].count(t.answer) > len(t.subtasks) / 2
        if s.family == "chain":  # every link stated once; following them from the start reaches the answer
            nodes = t.meta["chain"]
            assert sum(nodes[-1] in sub for sub in t.subtasks) == 1 and nodes[0] in t.synthesis
        if s.family in ("odd_one_out", "below_threshold"):  # exactly one worker's value stands out
            assert sum(t.answer in sub for sub in t.subtasks) == 1
        if s.family == "below_threshold":
            assert sum(v < t.meta["threshold"] for v in t.meta["values"]) == 1
