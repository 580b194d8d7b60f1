"""Greedy decoding with prefill reuse, and the objective's perplexity and repetition terms."""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch

from ...runtime.backends.base import model_device
from ...runtime.compat import output_cache, with_cache
from .prompts import DEFAULT_LAMBDA, DEFAULT_PPL_CAP, FusionError, _check_unsteered, _encode


# --------------------------------------------------------------------------------------------
# Greedy decoding with prefill reuse
# --------------------------------------------------------------------------------------------
class PromptRunner:
    """Greedy decoding of one prompt under several plans at once (one batch row per plan).

    The prompt is tokenized once. ``prefix`` = its unsteered KV cache over all tokens but the last,
    computed at first use and deep-copied per call (never modified), is reused by unsteered passes and by
    plans gated ``"generated"``; whenever a handle is given, its prompt length is set to ``n − 1`` so
    that generated-gated plans also steer the last prompt token (``"all"``-gated plans are unaffected).
    Decoding stops at EOS, at ``max_new_tokens``, or (``stop_at_newline``) once a line break follows
    non-blank text — the answer is cut there anyway (:func:`~fusesteer.evaluate.grading.extract_answer`).
    """

    def __init__(self, model, tokenizer, prompt: str, max_new_tokens: int = 24, *, stop_at_newline: bool = True,
                 reuse_prefill: bool = True):
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise FusionError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not isinstance(prompt, str) or not prompt:
            raise FusionError("prompt must be a non-empty string")
        self.model, self.tokenizer = model, tokenizer
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.stop_at_newline = stop_at_newline
        self.reuse_prefill = reuse_prefill
        self.device = model_device(model)
        ids = _encode(tokenizer, prompt)
        if not ids:
            raise FusionError(f"prompt {prompt[:60]!r} tokenizes to no tokens")
        self.ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        self.n = len(ids)
        eos = set()
        for src in (getattr(tokenizer, "eos_token_id", None), getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(int(i) for i in src)
        self.eos = eos
        self._prefix = None
        self._prefix_ready = False

    # ---- internals ------------------------------------------------------------------------------
    def _prefix_cache(self, handle):
        if not self._prefix_ready:
            if self.n >= 2:
                if handle is not None:
                    handle.route([None])
                with torch.inference_mode():
                    out = self.model(input_ids=self.ids[:, :-1], use_cache=True, logits_to_keep=1)
                self._prefix = output_cache(out)
            self._prefix_ready = True
        return self._prefix

    def _start(self, k: int, handle, reuse: bool):
        """(cache, input ids) for k rows: the copied prefix + last token, or the whole prompt."""
        if reuse and self.reuse_prefill:
            pre = self._prefix_cache(handle)
            if pre is not None:
                cache = copy.deepcopy(pre)
                if k > 1:
                    cache.batch_repeat_interleave(k)
                return cache, self.ids[:, -1:].repeat(k, 1)
        return None, self.ids.repeat(k, 1)

    def _finished_line(self, toks: list[int]) -> bool:
        text = self.tokenizer.decode(toks, skip_special_tokens=True).lstrip()
        return "\n" in text

    @staticmethod
    def _gating_of(handle, name) -> set[str]:
        return {e.gating for e in handle.plans[name].entries}

    # ---- API ------------------------------------------------------------------------------------
    def generate(self, rows: Sequence[str | None] = (None,), handle=None) -> list[list[int]]:
        """Generated token ids (EOS excluded) for each row: a plan name of ``handle`` or None."""
        rows = list(rows)
        if not rows:
            raise FusionError("generate needs at least one row")
        steered = [r for r in rows if r is not None]
        if steered and handle is None:
            raise FusionError("rows name plans but no handle was given")
        if handle is None:
            _check_unsteered(self.model, "unsteered generation")
        reuse = all(self._gating_of(handle, r) <= {"generated"} for r in steered) if steered else True
        k = len(rows)
        outs: list[list[int]] = [[] for _ in range(k)]
        done = [False] * k
        try:
            cache, x = self._start(k, handle, reuse)
            if handle is not None:
                handle.route(rows)
                handle.set_prompt_length(self.n - 1)
            with torch.inference_mode():
                for _ in range(self.max_new_tokens):
                    o = self.model(input_ids=x, use_cache=True, logits_to_keep=1, **with_cache(self.model, cache))
                    cache = output_cache(o)
                    nxt = o.logits[:, -1].float().argmax(-1)
                    for i in range(k):
                        if done[i]:
                            continue
                        t = int(nxt[i])
                        if t in self.eos:
                            done[i] = True
                            continue
                        outs[i].append(t)
                        if self.stop_at_newline and self._finished_line(outs[i]):
                            done[i] = True
                    if all(done):
                        break
                    x = nxt[:, None].to(torch.long)
        finally:
            if handle is not None:
                handle.set_prompt_length(None)
        return outs

    def decode(self, toks: Sequence[int]) -> str:
        return self.tokenizer.decode(list(toks), skip_special_tokens=True)

    def nll(self, answers: Sequence[Sequence[int]], handle=None) -> list[float]:
        """Mean NLL (nats/token) of each token list as a continuation of the prompt, **unsteered**
        (routed to no plan when a handle is attached). NaN for an empty list."""
        res = [math.nan] * len(answers)
        idx = [i for i, a in enumerate(answers) if len(a) > 0]
        if not idx:
            return res
        if handle is None:
            _check_unsteered(self.model, "the perplexity pass")
        cache, x0 = self._start(len(idx), handle, True)
        p = x0.shape[1]
        width = p + max(len(answers[i]) for i in idx)
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = int(pad) if isinstance(pad, int) else 0
        past = self.n - p
        X = torch.full((len(idx), width), pad, dtype=torch.long, device=self.device)
        M = torch.zeros((len(idx), past + width), dtype=torch.long, device=self.device)
        for r, i in enumerate(idx):
            a = torch.tensor(list(answers[i]), dtype=torch.long, device=self.device)
            X[r, :p] = x0[r]
            X[r, p:p + len(a)] = a
            M[r, :past + p + len(a)] = 1
        if handle is not None:
            handle.route([None] * len(idx))
        with torch.inference_mode():
            o = self.model(input_ids=X, attention_mask=M, use_cache=True, **with_cache(self.model, cache))
        logits = o.logits.float()
        for r, i in enumerate(idx):
            m = len(answers[i])
            lp = torch.log_softmax(logits[r, p - 1:p - 1 + m], dim=-1)
            tgt = X[r, p:p + m]
            res[i] = float(-lp.gather(-1, tgt[:, None]).mean())
        return res


def normalized_perplexity(nll: float, ppl_cap: float = DEFAULT_PPL_CAP) -> float:
    """min(1, log(ppl) / log(ppl_cap)) = min(1, NLL / ln(cap)), clipped to [0, 1]; 1 for NaN/inf."""
    if not (isinstance(ppl_cap, (int, float)) and ppl_cap > 1):
        raise FusionError(f"ppl_cap must be a number > 1, got {ppl_cap!r}")
    if nll is None or not math.isfinite(nll):
        return 1.0
    return min(1.0, max(0.0, nll / math.log(ppl_cap)))


def repetition_rate(tokens: Sequence[int]) -> float:
    """1 − distinct / total token bigrams of a generated sequence (0 for fewer than 3 tokens)."""
    toks = list(tokens)
    if len(toks) < 3:
        return 0.0
    bigrams = list(zip(toks, toks[1:]))
    return 1.0 - len(set(bigrams)) / len(bigrams)


def objective_score(overlap: float, nll: float, lam: float = DEFAULT_LAMBDA, ppl_cap: float = DEFAULT_PPL_CAP,
                    repetition: float = 0.0) -> float:
    """overlap − λ · max(normalized_perplexity(nll), repetition)  (repetition = 0 without the guard)."""
    return float(overlap) - float(lam) * max(normalized_perplexity(nll, ppl_cap), float(repetition))
