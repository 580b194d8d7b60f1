"""The command-line options of `fusesteer bench VERB`, one set per verb (fusesteer/commands/bench.py adds one
sub-command per entry of :data:`VERBS`).

Imports nothing heavy (no torch, no suite): building the `fusesteer` parser must stay cheap and must not turn
the Triton interpreter on for the other verbs.
"""

from __future__ import annotations

DTYPES = ("fp32", "bf16", "fp16", "int8")
ARMS = ("torch", "triton", "fold", "auto", "reference", "hook", "steering-vectors", "repeng")
# the tiny model families (fusesteer.testing.TINY_FAMILIES; kept literal so building the CLI does not import torch,
# tests/test_families.py checks the two agree)
FAMILIES = ("llama", "gemma2", "gemma3", "qwen2", "qwen3", "mistral", "gemma", "granite", "phi3", "olmo2", "qwen3_moe")
SCENARIOS = ("blend+gains", "additive", "per-row")
PHASES = ("decode", "prefill")
SERVE_BACKENDS = ("auto", "torch", "triton")
EPILOG = """examples:
  fusesteer bench parity --quick            # CI gate: tiny models of every family, exits 1 on a regression
  fusesteer bench all --model smollm2-135m  # full CPU run: parity + latency (results: see --out)
  fusesteer bench latency --device cuda     # on a GPU: CUDA events, torch.compile + zero-recompile check
  fusesteer bench gpu                       # one NVIDIA GPU, <= 10 min: kernel parity + GB/s, decode ratios
                                            # eager and with CUDA graphs, zero-recompile check
  fusesteer bench gpu --dry-run             # any machine: print and build every step of `bench gpu`
  fusesteer bench serve --quick             # load test of `fusesteer serve` on loopback (a smoke run)

Each suite has its own options: `fusesteer bench SUITE --help`.
"""
OUT_HELP = ("output folder (default: bench/results{sub} of the fusesteer source checkout holding the current "
            "directory, else ./fusesteer-bench-results{sub})")


def _run_options(p) -> None:
    """What parity and latency share: the model, the device, the output folder."""
    p.add_argument("--quick", action="store_true",
                   help="tiny random models of every family, a few seconds per suite (CI)")
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded model name or local HF folder for the full run (ignored with --quick)")
    p.add_argument("--out", default=None, help=OUT_HELP.format(sub="") + "; a quick/ subfolder with --quick")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 for the full run; unchanged with --quick)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                   help="backends/peers to include (vanilla and the reference are always run)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--seed", type=int, default=0)


def _parity_options(p) -> None:
    g = p.add_argument_group("parity")
    g.add_argument("--steps", type=int, default=None, help="greedy decode steps (default: quick 4, full 16)")
    g.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None, help="dtypes (default: all)")
    g.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                   help="tiny model families (with --quick)")
    g.add_argument("--all-triton", action="store_true",
                   help="--quick on CPU: run every Triton (interpreter) row, not just a few (slow)")


def _latency_options(p) -> None:
    g = p.add_argument_group("latency")
    g.add_argument("--cycles", type=int, default=None, help="decode timing cycles (default: quick 6, full 300)")
    g.add_argument("--prefill-cycles", type=int, default=None, help="prefill timing cycles (default: quick 5, full 60)")
    g.add_argument("--warmup", type=int, default=None, help="warm-up cycles (default: quick 1, full 10)")
    g.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS), help="scenarios")
    g.add_argument("--batches", nargs="+", type=int, default=[1, 8], help="batch sizes")
    g.add_argument("--check-finite", action="store_true",
                   help="attach our arms with check_finite=True (default off: that check runs once per attach, so "
                        "the attach protocol would charge it to every timed step)")
    g.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES), help="phases")
    g.add_argument("--protocol", choices=("attach", "copies"), default="attach",
                   help="'attach' = one model, each arm attached/detached around its timed step; 'copies' = one "
                        "deep copy of the model per arm, arm applied once (no set-up churn next to the timed step; "
                        "one model copy per arm in memory)")
    g.add_argument("--compiled", action="store_true",
                   help="also time static-cache torch.compile(fullgraph) decode steps: compiled steered vs "
                        "compiled vanilla vs eager vanilla, per batch size (always on with CUDA; inductor on CPU "
                        "compiles for minutes)")
    g.add_argument("--progress", action="store_true", help="progress bars for the timing loops")


def add_parity_arguments(p) -> None:
    """`fusesteer bench parity`: every backend and the peers against the reference hooks."""
    _run_options(p)
    _parity_options(p)


def add_latency_arguments(p) -> None:
    """`fusesteer bench latency`: interleaved paired step timing against vanilla."""
    _run_options(p)
    _latency_options(p)


def add_all_arguments(p) -> None:
    """`fusesteer bench all`: parity, then latency, one results folder."""
    _run_options(p)
    _parity_options(p)
    _latency_options(p)


def add_gpu_arguments(p) -> None:
    """`fusesteer bench gpu`: the GPU checks in one command."""
    p.add_argument("--device", default="cuda", help="the CUDA device (cuda or cuda:N)")
    p.add_argument("--out", default=None, help=OUT_HELP.format(sub=""))
    p.add_argument("--dry-run", action="store_true",
                   help="print every step and build what needs no GPU (plans, arms, kernel inputs); time nothing")
    p.add_argument("--budget", type=float, default=600.0,
                   help="time budget in seconds; steps that would not fit are skipped and listed")
    p.add_argument("--cycles", type=int, default=200, help="timed decode steps per arm")
    p.add_argument("--warmup", type=int, default=10, help="warm-up decode steps per arm")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_serve_arguments(p) -> None:
    """`fusesteer bench serve`: load test of `fusesteer serve` on loopback."""
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=1, help="requests per client per arm and round")
    p.add_argument("--rounds", type=int, default=3, help="paired (unsteered, steered) rounds per client count")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--arm-time-cap", type=float, default=180.0, help="no new requests after this many seconds")
    p.add_argument("--sequential-clients", type=int, default=8)
    p.add_argument("--backend", default="auto", choices=SERVE_BACKENDS)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server process")
    p.add_argument("--serve-args", default="", metavar="'FLAGS'",
                   help="extra `fusesteer serve` flags, e.g. '--compile' or '--max-prefill-tokens 4096'")
    p.add_argument("--versus", default="", metavar="'FLAGS'",
                   help="also run a second `fusesteer serve` with these flags added to --serve-args "
                        "(e.g. '--compile'); its unsteered and steered arms are interleaved with the first "
                        "server's, and the summary gives second / first tokens/s (one flag: --versus=--compile)")
    p.add_argument("--peer", default="none", choices=["none", "transformers", "transformers-compile"],
                   help="also run `transformers serve --continuous-batching` (optionally --compile) on the same "
                        "model, unsteered, interleaved with the fusesteer arms (its tokens counted as streamed)")
    p.add_argument("--long-prompt", type=int, default=0, metavar="TOKENS",
                   help="then: ITL of 4 running streams while a prompt of about TOKENS tokens arrives")
    p.add_argument("--no-sequential", action="store_true", help="skip the --max-batch 1 server")
    p.add_argument("--out", default=None, help=OUT_HELP.format(sub="/serve"))
    p.add_argument("--quick", action="store_true", help="1 and 2 clients, 1 request, 8 tokens (a smoke run)")


#: verb -> (one-line help, description, the options)
VERBS = {
    "parity": ("parity of every backend and the peers against the reference hooks (a gate: exit 1 on a FAIL)",
               "Steered logits of every backend and the peer libraries against the reference hooks; JSON, "
               "Markdown and PNG results. Exit 1 when the gate fails.", add_parity_arguments),
    "latency": ("steered / vanilla step latency, interleaved and paired",
                "Interleaved paired decode and prefill step timing of every arm against vanilla; JSON, Markdown "
                "and PNG results.", add_latency_arguments),
    "all": ("parity, then latency", "Runs `bench parity` and then `bench latency` into one results folder.",
            add_all_arguments),
    "gpu": ("the GPU checks in one command (one NVIDIA GPU, <= 10 min; --dry-run anywhere)",
            "Kernel parity and bandwidth on CUDA, model parity, steered/vanilla decode ratios eager and with CUDA "
            "graphs, and the zero-recompile check. Exit 1 when a check fails.", add_gpu_arguments),
    "serve": ("load test of `fusesteer serve` on loopback",
              "Starts `fusesteer serve` on 127.0.0.1 and measures aggregate throughput and latency, steered vs "
              "unsteered, under concurrent clients; serve.json and serve.png.", add_serve_arguments),
}
