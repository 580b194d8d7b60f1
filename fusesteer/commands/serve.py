"""`fusesteer serve`: an OpenAI-compatible server with per-request steering and continuous batching."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import FuseSteerError

BACKENDS = ["auto", "torch", "triton"]


def register(sub, fmt):
    p = sub.add_parser(
        "serve", formatter_class=fmt, help="OpenAI-compatible HTTP server with per-request steering",
        description="Serve a model over OpenAI's /v1/completions and /v1/chat/completions (with streaming), "
                    "steering each request with the plan it names in its 'steering' field, several plans in "
                    "one continuously batched forward. Plans come from --plans DIR (fusesteer .safetensors "
                    "and GGUF control vectors, named by file stem) and from POST /v1/steering/plans. "
                    "Needs the serve extra: pip install 'fusesteer[serve]'.",
        epilog="examples:\n"
               "  fusesteer serve --model smollm2-135m --plans plans/\n"
               "  fusesteer serve --model ./my-hf-model --port 9000 --api-key $KEY --max-batch 16\n"
               "  fusesteer serve --model ./my-hf-model --tp 2          # tensor parallel over 2 processes\n"
               "  curl -s 127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' -d \\\n"
               "    '{\"model\": \"smollm2-135m\", \"prompt\": \"Hi\", "
               "\"steering\": {\"plan\": \"calm\", \"scale\": 0.8}}'")
    p.add_argument("--model", default="smollm2-135m", metavar="NAME|PATH",
                   help="embedded model name or local Hugging Face folder")
    p.add_argument("--served-name", default=None, help="model id clients send (default: --model)")
    p.add_argument("--plans", default=None, metavar="DIR", help="folder of plans to load at start")
    p.add_argument("--watch", action="store_true",
                   help="keep serving what --plans DIR holds: new, changed and deleted files are picked up (replicas "
                        "sharing one folder serve the same plans)")
    p.add_argument("--watch-interval", type=float, default=1.0, metavar="S", help="seconds between polls of --plans")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("FUSESTEER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $FUSESTEER_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=32, help="rows decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask for")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion limit (default: the model's)")
    p.add_argument("--plan-slots", type=int, default=None,
                   help="plans the model's plan table holds at once (default: max-batch + 8)")
    p.add_argument("--max-plan-bytes", type=int, default=64 * 1024 * 1024, help="size cap of an uploaded plan")
    p.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                   help="preallocated KV cache, rows x tokens per row (default 32768): --max-batch rows of "
                        "--max-model-len tokens if it holds them, else fewer rows; without --max-model-len each "
                        "row gets N / --max-batch tokens (at most the model's context)")
    p.add_argument("--max-prefill-tokens", type=int, default=512, metavar="N",
                   help="prompt tokens prefilled per engine step (chunked prefill: running requests decode between "
                        "the chunks of a long prompt)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode under torch.compile(fullgraph=True), one graph per batch bucket, warmed up at start "
                        "(CUDA graphs on CUDA); default: on with CUDA, off on CPU")
    p.add_argument("--compile-backend", default="inductor", choices=["inductor", "eager"],
                   help="torch.compile backend ('eager': dynamo tracing only, for checks)")
    p.add_argument("--decode-buckets", default=None, metavar="B1,B2,...",
                   help="batch sizes a compiled decode step runs at, one graph each (default: powers of two up to "
                        "--max-batch); eager decode runs at the number of busy rows")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="never reuse the KV of a shared prompt prefix (by default it is reused between requests "
                        "whose prompt tokens are steered alike)")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--tp", type=int, default=None, metavar="N",
                   help="tensor parallelism over N processes on this machine (transformers' tp_plan='auto'; NCCL "
                        "with CUDA, gloo on CPU): runs itself under torchrun; rank 0 serves HTTP. Under your own "
                        "torchrun, leave it out (or give the world size)")
    p.add_argument("--tp-timeout", type=float, default=120.0, metavar="S",
                   help="seconds a rank waits for another that stopped answering before the server stops")
    p.set_defaults(func=run)


def _buckets(text):
    if text is None:
        return None
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise FuseSteerError(f"--decode-buckets must be positive integers separated by commas, got {text!r}")
    return out


def _without_tp(argv: list[str]) -> list[str]:
    """The arguments after ``serve`` with ``--tp N`` taken out."""
    rest = argv[argv.index("serve") + 1:] if "serve" in argv else list(argv)
    out, skip = [], False
    for a in rest:
        if skip:
            skip = False
        elif a == "--tp":
            skip = True
        elif not a.startswith("--tp="):
            out.append(a)
    return out


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise FuseSteerError(f"fusesteer serve needs the serve extra ({e.name} is missing): "
                             "pip install 'fusesteer[serve]'") from None
    import torch

    from .. import models
    from ..serve.server import Server

    for name in ("max_batch", "max_tokens", "port"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise FuseSteerError(f"--{name.replace('_', '-')} must be positive")
    if args.watch and (not args.plans or not args.watch_interval > 0):
        raise FuseSteerError("--watch needs --plans DIR and a positive --watch-interval")
    if args.max_queue < 0:
        raise FuseSteerError("--max-queue must be >= 0")
    if args.threads is not None:
        if args.threads < 1:
            raise FuseSteerError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    from ..serve import parallel

    rank, world = parallel.world_from_env()
    if args.tp is not None and (args.tp < 1 or (world > 1 and args.tp != world)):
        raise FuseSteerError(f"--tp must be at least 1{f' and equal torchrun world size {world}' if world > 1 else ''}"
                             f", got {args.tp}")
    if not args.tp_timeout > 0:
        raise FuseSteerError(f"--tp-timeout must be positive, got {args.tp_timeout}")
    if args.tp is not None and args.tp > 1 and world == 1:  # become torchrun, which runs this command N times
        cmd = parallel.spawn_argv(_without_tp(args.argv), args.tp)
        print(f"fusesteer serve: tensor parallelism over {args.tp} processes: {' '.join(cmd[1:])}", flush=True)
        os.execv(cmd[0], cmd)
    logging.getLogger("fusesteer.serve").setLevel(logging.INFO)
    channel = None
    if world > 1:
        if args.device not in (None, "cpu", "cuda"):
            raise FuseSteerError("with tensor parallelism each rank picks its device (cuda:LOCAL_RANK, or cpu); "
                                 f"--device may be cpu or cuda, got {args.device!r}")
        channel = parallel.init(args.tp_timeout)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = models.load(args.model, dtype=args.dtype, device=device, tp_plan="auto" if channel else None)
    if channel is not None and rank != 0:
        rc = parallel.follow(model, channel)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # not a clean interpreter exit: it could wait on a rank that is gone
    name = args.served_name or (args.model if os.sep not in args.model else os.path.basename(args.model.rstrip(os.sep)))
    srv = Server(model, tok, name, plans_dir=args.plans, host=args.host, port=args.port, api_key=args.api_key,
                 max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                 max_model_len=args.max_model_len, backend=args.backend, plan_slots=args.plan_slots,
                 max_plan_bytes=args.max_plan_bytes, kv_cache_tokens=args.kv_cache_tokens,
                 max_prefill_tokens=args.max_prefill_tokens, compile=args.compile,
                 compile_backend=args.compile_backend, decode_buckets=_buckets(args.decode_buckets),
                 prefix_cache=args.prefix_cache, watch=args.watch, watch_interval=args.watch_interval,
                 channel=channel)
    fw = srv.engine.fw
    print(f"fusesteer serve: {name} on http://{args.host}:{args.port}/v1 ({len(srv.registry)} plan(s), backend "
          f"{srv.steerer.backend}, {fw.rows} rows x {fw.max_len} tokens of KV cache, decode "
          f"{'compiled' if fw.copts.enabled else 'eager'}"
          f"{f', tensor parallel over {channel.world} processes' if channel else ''})", flush=True)
    srv.run()
    return 0
