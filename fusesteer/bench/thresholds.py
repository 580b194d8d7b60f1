"""Parity thresholds of the bench gate: the tolerances in :mod:`fusesteer.testing`, the one place the tests
and the bench both read them from."""

from fusesteer.testing import (  # noqa: F401
                               EXACT_TOKEN_DTYPES,
                               FP32_ABS,
                               HALF_ABS,
                               HALF_ABS_TRITON,
                               HALF_REL,
                               HALF_REL_TRITON,
                               INT8_ABS,
                               MIN_EFFECT,
                               describe,
                               logit_tolerance,
                               tokens_must_agree,
)
