"""One prompt: a study whose trials are rows of one steered batch."""

from __future__ import annotations

import hashlib
import math
from typing import Mapping, Sequence

from ...evaluate.grading import extract_answer, token_overlap
from ...runtime.attach import attach
from ...runtime.plan import ModelSpec, SteeringPlan
from .plans import fusion_plan, param_space
from .prompts import DEFAULT_LAMBDA, DEFAULT_PPL_CAP, MODES, FusionError, _check_unsteered, question_prompt
from .references import Reference
from .runner import PromptRunner, normalized_perplexity, objective_score, repetition_rate
from .study import _optuna, run_study, study_name


# --------------------------------------------------------------------------------------------
# One prompt
# --------------------------------------------------------------------------------------------
class PromptSearch:
    """The Fusion Steering objective of one prompt, attached once, evaluated in batches of trials.

    One attachment holds ``batch_size`` plan slots (``t0``…); each batch of parameter sets updates the slots
    in place (``handle.update``) and decodes one row per slot. Use as a context manager (detaches).
    """

    def __init__(self, model, tokenizer, reference: Reference, truths: Sequence[str], *, mode: str = "full",
                 blend: str = "paper", gating: str = "all", lam: float = DEFAULT_LAMBDA,
                 ppl_cap: float = DEFAULT_PPL_CAP, max_new_tokens: int = 24, batch_size: int = 4,
                 repetition_guard: bool = True, backend: str = "torch"):
        _check_unsteered(model, "PromptSearch")
        if mode not in MODES:
            raise FusionError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
        if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise FusionError(f"lam must be a non-negative number, got {lam!r}")
        normalized_perplexity(0.0, ppl_cap)  # validates the cap
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FusionError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.tokenizer = model, tokenizer
        self.reference = reference
        self.truths = list(truths)
        self.mode, self.blend, self.gating = mode, blend, gating
        self.lam, self.ppl_cap = float(lam), float(ppl_cap)
        self.repetition_guard = bool(repetition_guard)
        self.batch_size = batch_size
        self.spec = ModelSpec.from_model(model)
        self.space = param_space(mode)
        self.runner = PromptRunner(model, tokenizer, question_prompt(reference.question), max_new_tokens)
        zero = {k: spec_[0] for k, spec_ in self.space.items()}
        placeholder = fusion_plan(reference, self.spec, zero, mode, blend, gating)
        self.slots = [f"t{i}" for i in range(batch_size)]
        self.handle = attach(model, {s: placeholder for s in self.slots}, backend=backend, check_finite=False)

    def plan(self, params: Mapping) -> SteeringPlan:
        return fusion_plan(self.reference, self.spec, params, self.mode, self.blend, self.gating)

    def evaluate(self, params_list: Sequence[Mapping]) -> list[tuple[float, dict]]:
        out = []
        for i in range(0, len(params_list), self.batch_size):
            chunk = list(params_list[i:i + self.batch_size])
            names = self.slots[:len(chunk)]
            for nm, p in zip(names, chunk):
                self.handle.update(nm, self.plan(p))
            out += self._score(names)
        return out

    def unsteered(self) -> tuple[float, dict]:
        """The objective of no steering at all (the row routed to no plan), scored as every trial is."""
        return self._score([None])[0]

    def _score(self, rows) -> list[tuple[float, dict]]:
        gen = self.runner.generate(rows, self.handle)
        nlls = self.runner.nll(gen, self.handle)
        out = []
        for toks, nll in zip(gen, nlls):
            ans = extract_answer(self.runner.decode(toks))
            ov = token_overlap(ans, self.truths)
            pn = normalized_perplexity(nll, self.ppl_cap)
            rep = repetition_rate(toks) if self.repetition_guard else 0.0
            value = objective_score(ov, nll, self.lam, self.ppl_cap, rep)
            out.append((value, {"answer": ans, "overlap": ov, "nll": nll if math.isfinite(nll) else None,
                                "ppl_norm": pn, "repetition": rep, "n_tokens": len(toks)}))
        return out

    def close(self) -> None:
        self.handle.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _config(model, reference: Reference, *, mode, blend, gating, lam, ppl_cap, max_new_tokens,
            repetition_guard) -> dict:
    ex = reference.explanation or ""
    return {"model": ModelSpec.from_model(model).fingerprint(), "mode": mode, "blend": blend, "gating": gating,
            "lam": float(lam), "ppl_cap": float(ppl_cap), "max_new_tokens": int(max_new_tokens),
            "repetition_guard": bool(repetition_guard),
            "variant": reference.variant, "truth": reference.truth,
            "explanation_sha": hashlib.sha256(ex.encode()).hexdigest()[:16]}


def optimize_prompt(model, tokenizer, reference: Reference, truths: Sequence[str], *, n_trials: int = 16,
                    mode: str = "full", blend: str = "paper", gating: str = "all", lam: float = DEFAULT_LAMBDA,
                    ppl_cap: float = DEFAULT_PPL_CAP, max_new_tokens: int = 24, batch_size: int = 4,
                    storage=None, name: str | None = None, seed: int = 0, worker: int = 0,
                    fail_running: bool = False, progress: bool = True, position: int | None = None,
                    repetition_guard: bool = True, backend: str = "torch") -> dict:
    """Search (α, γ) for one prompt; returns the best trial and the plan kept (``"plan"``, a SteeringPlan).

    No steering is always a candidate: it is scored on the same objective (``"unsteered_value"``), and unless
    the best trial scores strictly above it the prompt keeps no steering — ``"kept"`` is ``"unsteered"``,
    ``"plan"`` has no entries (its metadata still names the best trial) and ``"kept_value"`` is the unsteered
    score. Otherwise ``"kept"`` is ``"steered"`` and ``"kept_value"`` the best trial's value.
    """
    optuna = _optuna()
    name = name or study_name("adhoc", hashlib.sha256(reference.question.encode()).hexdigest()[:12], mode,
                              reference.variant, blend, gating)
    cfg = _config(model, reference, mode=mode, blend=blend, gating=gating, lam=lam, ppl_cap=ppl_cap,
                  max_new_tokens=max_new_tokens, repetition_guard=repetition_guard)
    with PromptSearch(model, tokenizer, reference, truths, mode=mode, blend=blend, gating=gating, lam=lam,
                      ppl_cap=ppl_cap, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      repetition_guard=repetition_guard, backend=backend) as search:
        study = run_study(search.evaluate, search.space, study_name=name, storage=storage, n_trials=n_trials,
                          seed=seed, batch_size=batch_size, config=cfg, fail_running=fail_running,
                          worker=worker, progress=progress, position=position)
        best = study.best_trial
        plan = search.plan(best.params)
        u_value, u_attrs = search.unsteered()
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    steered = best.value > u_value
    if not steered:
        meta = dict(plan.metadata)
        plan = SteeringPlan(plan.spec, name=f"fusion-{mode}-unsteered", metadata=meta)
    plan.metadata.update({"score": best.value, "study": name, "trial": best.number,
                          "kept": "steered" if steered else "unsteered", "unsteered_score": u_value})
    return {"study": name, "n_complete": len(complete), "best_value": best.value, "best_params": dict(best.params),
            "best_trial": best.number, "best_attrs": dict(best.user_attrs), "plan": plan,
            "kept": "steered" if steered else "unsteered", "kept_value": max(best.value, u_value),
            "unsteered_value": u_value, "unsteered_attrs": u_attrs,
            "values": [t.value for t in sorted(complete, key=lambda t: t.number)]}
