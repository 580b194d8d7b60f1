"""Fusion Steering (arXiv 2505.22572) as a plan builder on the fusesteer runtime.

Per prompt (question q with ground truth t):

1. **Explanation** — the model explains (q, t), greedy and bounded (:func:`generate_explanation`);
   StrategyQA-style records carry one already (``explanation="auto"`` uses the record's, else generates).
2. **Reference** (:func:`compute_reference`) — the enriched text
   ``"Question: {q}\\nAnswer and Explanation: {t} {explanation}"`` is run once; h_l is the mean
   ``layer.out`` activation over the tokens of ``" {t} {explanation}"`` (the exact span: the common prefix
   of the token ids of the prefix alone and of the full text is the prompt part, so a token merging the
   prefix's end with the target's start counts as target; trailing special tokens are dropped).
   μ_l is the mean over the tokens of the question-only prompt ``"Question: {q}\\nAnswer:"`` (the prompt
   the model answers), leading/trailing special tokens (BOS) excluded — the BOS position is an attention
   sink whose huge norm would otherwise dominate the mean. Δ_l = h_l − μ_l for every layer l. The
   *answer-only* variant (the paper's first ablation) drops the explanation.
3. **Plans** (:func:`fusion_plan`) at ``layer.out`` of every layer:

   * paper blend (default): fused = (1−α)·x + α·(x + γΔ_l)  ⇒  a = 1, b = α·γ·Δ_l;
   * interpolated patching (``blend="interp"``): (1−α)·(x + γΔ_l) + α·h_l  ⇒  a = 1−α,
     b = (1−α)·γ·Δ_l + α·h_l.

   ``mode="full"``: one (α, γ) for all layers. ``mode="segmented"``: early / middle / late thirds
   (:func:`segment_bounds`: sizes ⌊L/3⌋, the first L mod 3 segments one layer longer — 26 layers give
   9/9/8), each with its own (α, γ).
   Gating default ``"all"``: the paper's hooks fire on every forward, prompt prefill included. With
   ``gating="generated"`` the prompt's KV cache is computed once, unsteered, and reused by every trial;
   the steering then starts at the *last prompt token* (whose forward predicts the first answer token),
   so the first answer token is steered too. Under ``"all"`` the steered prefill differs per trial and
   cannot be reused; the unsteered prefix is still reused for the perplexity pass.
4. **Per-prompt search** (:class:`PromptSearch`, :func:`run_study`): Optuna TPE (fixed seed,
   multivariate, constant liar) over α ∈ [0, 1] (uniform) and γ ∈ [0.01, 1] (log-uniform: γ is a scale,
   and the per-layer shifts add up along the residual stream, so useful values sit near the low end)
   per segment, maximising::

       score = overlap(answer, truths) − λ · max(min(1, NLL / ln(ppl_cap)), repetition)

   overlap: SQuAD token F1 (:func:`fusesteer.evaluate.grading.token_overlap`) of the extracted answer;
   NLL: mean negative log-likelihood (nats/token) of the generated tokens (EOS excluded, the stopping
   line break included) under the **unsteered** model — the steered model would call its own degenerate
   output fluent — so log-perplexity is normalised by ln(ppl_cap) (default cap 1000, λ = 0.3) and
   clipped to [0, 1]; an empty answer scores 0 − λ. *repetition* (:func:`repetition_rate`, 1 − distinct /
   total token bigrams of the generated tokens) is our guard, on by default (``repetition_guard=False``
   gives the paper-literal objective): an unsteered model copies loops in context, so "ââââ…" or
   "~~~~…" get a low perplexity, and on SmolLM2-135M the literal objective preferred such loops to a fluent
   wrong answer. Trials run ``batch_size`` at a time as rows of one
   batch, each row routed to its own plan on a single attachment whose values change with
   ``handle.update()`` (no re-patching).

Studies live in an Optuna RDB storage (SQLite file by default, any SQLAlchemy URL) under a name derived
from (dataset, record id, mode, variant, blend, gating); the objective's settings are stored in the
study and checked on reload. The loop asks/tells trials itself instead of ``study.optimize``:

* it counts COMPLETE trials and runs only the missing ones (resume);
* a trial runs only if fewer than n live (COMPLETE or RUNNING) trials have a smaller number, else it is
  closed as PRUNED (``user_attrs["surplus"]``) — trial numbers are allotted atomically by the storage,
  so several workers sharing one study finish **exactly** n COMPLETE trials between them (plain
  ``MaxTrialsCallback`` can overshoot by one per extra worker);
* while running trials it records Optuna heartbeats; RUNNING trials left by a killed process go FAIL
  once their heartbeat is older than the grace period (``fail_stale_trials``), and their slot is re-run;
  ``fail_running=True`` fails every RUNNING trial at start (only when no other worker is alive);
* an exception in a trial marks that batch FAIL and propagates; rerunning resumes.

The sampler seed is derived from (seed, study name), so prompts do not share their random start-up
trials. TPE's random state is not stored: a resumed or multi-worker study reseeds its sampler with
``that + 7919·worker + (trials already in the study)``, so only an uninterrupted single-worker run is
exactly reproducible.
"""

from __future__ import annotations

from .pipeline import evaluate_run, optimize_records  # noqa: F401
from .plans import average_params, fusion_plan, layer_params, param_space, segment_bounds  # noqa: F401
from .prompts import (  # noqa: F401
    BLENDS,
    DEFAULT_LAMBDA,
    DEFAULT_PPL_CAP,
    MODES,
    SEGMENTS,
    VARIANTS,
    FusionError,
    enriched_parts,
    question_prompt,
    truth_of,
    truths_of,
)
from .references import Reference, compute_reference, explanation_for, generate_explanation, token_span  # noqa: F401
from .report import write_report  # noqa: F401
from .runner import PromptRunner, normalized_perplexity, objective_score, repetition_rate  # noqa: F401
from .search import PromptSearch, optimize_prompt  # noqa: F401
from .study import make_storage, run_study, study_name  # noqa: F401

__all__ = [
    "FusionError", "MODES", "BLENDS", "VARIANTS", "SEGMENTS", "DEFAULT_LAMBDA", "DEFAULT_PPL_CAP",
    "question_prompt", "enriched_parts", "truth_of", "truths_of", "generate_explanation", "explanation_for",
    "token_span", "Reference", "compute_reference", "segment_bounds", "param_space", "layer_params",
    "fusion_plan", "average_params", "PromptRunner", "normalized_perplexity", "repetition_rate", "objective_score",
    "make_storage", "study_name", "run_study", "PromptSearch", "optimize_prompt", "optimize_records",
    "evaluate_run", "write_report",
]
