"""The two protocols AUSteer and its baselines can be built and swept under (one place for their settings).

* ``fusesteer`` — today's behaviour: cloze pairs (``Question: …\\nAnswer:`` + `` {choice}``), forced-choice
  scoring by summed log-probability, 300 sweep pairs, grids k ∈ {5, 10, 20, 50, 100}, α ∈ {1, 5, 10, 20, 50, 100}.
* ``official`` — as the authors run it (paper §5 / appendix B, code ``zijian678/AUSteer``): options listed in
  the prompt and the answer a letter or Yes/No token (:mod:`fusesteer.evaluate.generate`, template
  ``letter``), one pair per record (negative: the other option, or a seeded random wrong one), 1,000 pairs,
  the paper's grid (its reported optima k ∈ {2, 4, 8, 16, 50, 64, 80, 100}, α ∈ {8, 10, 15, 20, 50, 100}
  all lie on it) and validation scored by the greedy one-token answer (exact match, non-answers wrong).

Both follow the paper's tie rule (r_pos = r_neg steers negatively) unless ``ties="code"`` (the authors' code
gives ties the positive sign); see :func:`fusesteer.methods.austeer.austeer_gammas`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FuseSteerError

__all__ = ["Protocol", "PROTOCOLS", "TIES", "get"]

TIES = ("paper", "code")


@dataclass(frozen=True)
class Protocol:
    name: str
    template: str  # pair and prompt template: "cloze" or "letter" (fusesteer.evaluate.generate)
    scoring: str  # validation scoring of a sweep: "logprob" or "generate"
    max_new_tokens: int  # for "generate"
    build_pairs: int
    sweep_pairs: int
    k_grid: tuple
    alpha_grid: tuple


PROTOCOLS = {
    "fusesteer": Protocol("fusesteer", "cloze", "logprob", 1, 1000, 300, (5, 10, 20, 50, 100),
                          (1.0, 5.0, 10.0, 20.0, 50.0, 100.0)),
    "official": Protocol("official", "letter", "generate", 1, 1000, 1000, (2, 4, 8, 16, 32, 50, 64, 80, 100),
                         (1.0, 8.0, 10.0, 15.0, 20.0, 32.0, 50.0, 100.0)),
}


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise FuseSteerError(f"unknown protocol {name!r}; expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
