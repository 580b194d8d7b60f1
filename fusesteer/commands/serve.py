"""`fusesteer serve`: an OpenAI-compatible server with per-request steering and continuous batching."""

from __future__ import annotations

import logging
import os

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
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.set_defaults(func=run)


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
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    logging.getLogger("fusesteer.serve").setLevel(logging.INFO)
    model, tok = models.load(args.model, dtype=args.dtype, device=device)
    name = args.served_name or (args.model if os.sep not in args.model else os.path.basename(args.model.rstrip(os.sep)))
    srv = Server(model, tok, name, plans_dir=args.plans, host=args.host, port=args.port, api_key=args.api_key,
                 max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
                 max_model_len=args.max_model_len, backend=args.backend, plan_slots=args.plan_slots,
                 max_plan_bytes=args.max_plan_bytes, watch=args.watch, watch_interval=args.watch_interval)
    print(f"fusesteer serve: {name} on http://{args.host}:{args.port}/v1 ({len(srv.registry)} plan(s), backend "
          f"{srv.steerer.backend}, max batch {args.max_batch})", flush=True)
    srv.run()
    return 0
