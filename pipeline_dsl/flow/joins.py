"""Joins: the branches of one request meet, and one merged result goes on.

A join fires for a request once no live item of it can still reach the join (`ready`);
it merges what arrived with its policy (stages/impl.py Join.merge: first, majority,
longest, or the user's fn, which the runtime runs on the join's own workers) and `result`
makes the merged item's dict: a new dict from fn gets the fields it left out
(finish_reason, usage, generated_by, constrained, request, id) from the first branch, and every merged
result carries `branches`; the merged result of a `returns = many` stage's items answers the
request that stage got (its `request`), not the first element. `on_reject = drop` lets a Reject
in one branch leave that branch out instead of failing the request (`drops`). A `returns = many`
stage's empty list leaves a hollow item (items.Item.hollow) at the join that collects its items:
the join fires then with no results (a fn gets [], a built-in policy fails), the hollow item
giving `id` and `request`; but a join left with no results because branches headed there were
refused (RequestState.rejected_at, kept per the join a branch reaches first) merges nothing, as
one whose every branch was refused.

State lives on the request (RequestState.joins); these methods run under the runtime's lock
except `result`.
"""
from __future__ import annotations

from typing import Any

from .items import PipelineError, check_result

FILLED = ("finish_reason", "usage", "generated_by", "constrained", "request", "id")   # from the first branch


def same_stage(out: dict, source: dict) -> bool:
    """Whether a result made from `source` is still the answer of source's generate stage: only then
    does source's `constrained` (whether that stage held the answer to a format) hold for it."""
    return out.get("generated_by") in (None, source.get("generated_by"))


class Joins:
    def __init__(self, reach: dict[str, set], impls: dict[str, Any], on_reject: dict[str, str]):
        self.reach = reach            # stage -> every stage reachable from it
        self.impls = impls            # join stage -> its stages.impl.Join
        self.on_reject = on_reject    # join stage -> fail | drop

    def arrive(self, req, stage: str, item) -> list[tuple]:
        """An item reached a join: it waits there; the joins that can fire now."""
        req.joins.setdefault(stage, []).append(item)
        item.at = stage
        return self.ready(req)

    def ready(self, req) -> list[tuple]:
        """(join, waiting items) for every join of `req` that nothing else can reach any more."""
        fired = []
        for j, waiting in list(req.joins.items()):
            if not waiting:
                continue
            here = set(map(id, waiting))
            blocked = any(id(it) not in here and (it.at == j or j in self.reach.get(it.at, ()))
                          for it in req.items)
            if not blocked:
                del req.joins[j]
                fired.append((j, waiting))
        return fired

    def inputs(self, stage: str, waiting: list) -> list:
        """The waiting items in the order the policy sees them: `first` in arrival order, the
        others in branch order (ties go to the earliest branch; a `returns = many` stage's items
        in list order). Hollow items are none of them."""
        real = [it for it in waiting if not it.hollow]
        if self.impls[stage].policy == "first":
            return real
        return sorted(real, key=lambda it: it.branch)

    def empty(self, stage: str, waiting: list) -> PipelineError | None:
        """The error of a join that got no results (only hollow items: a `returns = many` stage
        returned an empty list) whose built-in policy has nothing to choose from; None when it has
        results, or a fn, which decides what no results give."""
        if any(not it.hollow for it in waiting) or self.user_code(stage):
            return None
        made = ", ".join(sorted({f"'{it.data.get('from_many')}'" for it in waiting}))
        return PipelineError(f"join '{stage}' got no results to merge: stage {made} returned an empty list, and "
                             f"policy = {self.impls[stage].policy} has none to choose from (a join fn decides "
                             "what an empty list gives)", "failed", stage)

    def user_code(self, stage: str) -> bool:
        return self.impls[stage].policy == "fn"

    def result(self, stage: str, waiting: list, merged: Any, vocab_of=lambda gen: None,
               request: dict | None = None) -> dict:
        """The merged item's dict: completed from the first branch, checked as a python stage's result
        is (items.check_result: its token ids of the vocabulary vocab_of(its generated_by) gives),
        with `branches`. `request`: the request a `returns = many` stage got, whose items this join
        collects; the merged result answers it (its `request`), not the first element, and keeps no
        element's prompt_token_ids or prompt_logprobs (those of the element's prompt)."""
        ordered = sorted((it for it in waiting if not it.hollow), key=lambda it: it.branch)
        first = ordered[0] if ordered else waiting[0]       # no results: the hollow item's id and request
        if not isinstance(merged, dict) or not isinstance(merged.get("text"), str):
            got = type(merged).__name__ if not isinstance(merged, dict) else "a dict without a text string"
            raise PipelineError(f"join '{stage}' produced no result: its merge gave {got}", "failed", stage)
        if any(merged is it.data or merged == it.data for it in ordered):
            merged = _answering(dict(merged), ordered, request)
        else:
            merged = _answering(merged, ordered, request)
            for key in FILLED:                  # (generated_by before constrained: the flag is the first
                if key == "constrained" and not same_stage(merged, first.data):    # branch's stage's alone)
                    continue
                if merged.get(key) is None and first.data.get(key) is not None:
                    merged[key] = first.data[key]
            check_result(merged, stage, f"join '{stage}' produced", vocab=vocab_of(merged.get("generated_by")))
        merged["branches"] = [{"text": it.data.get("text"), "finish_reason": it.data.get("finish_reason")}
                              for it in ordered]
        return merged

    def drops(self, stage: str) -> bool:
        """Whether a Reject at `stage` only drops its branch: some join lies ahead of it, and
        every join ahead says on_reject = drop."""
        ahead = self._all_ahead(stage)
        return bool(ahead) and all(self.on_reject[j] == "drop" for j in ahead)

    def _all_ahead(self, stage: str) -> list[str]:
        return [j for j in self.on_reject if j in self.reach.get(stage, ())]

    def reached_first(self, stage: str) -> list[str]:
        """The joins a branch at `stage` reaches first: those ahead of it that no other join ahead
        leads to (every join ahead where joins lie in a loop)."""
        ahead = self._all_ahead(stage)
        first = [j for j in ahead if not any(j in self.reach.get(k, ()) for k in ahead if k != j)]
        return first or ahead


ELEMENT_PROMPT = ("prompt_token_ids", "prompt_logprobs")     # of the prompt an element of a many stage's list had


def _answering(merged: dict, ordered: list, request: dict | None) -> dict:
    """A merged result of a `returns = many` stage's items as the answer to `request`, the request that
    stage got: that is its `request` unless the join fn gave one of its own (not a branch's), and what
    it copied of a branch's prompt (its ids, their logprobs) is left out."""
    if request is None:
        return merged
    if merged.get("request") is None or any(merged["request"] == it.data.get("request") for it in ordered):
        merged["request"] = request
    for key in ELEMENT_PROMPT:
        if merged.get(key) is not None and any(merged[key] == it.data.get(key) for it in ordered):
            del merged[key]
    return merged
