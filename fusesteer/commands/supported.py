"""`fusesteer supported`: the architectures fusesteer attaches to, and what each backend does on them."""

from __future__ import annotations

import json


def register(sub, fmt):
    p = sub.add_parser("supported", formatter_class=fmt, help="list supported architectures and backend levels",
                       description="The family adapters (model types, HF classes, layer layout) and, per backend, "
                                   "what it does on that family; the last row is the generic hooks path.",
                       epilog="examples:\n  fusesteer supported\n  fusesteer supported --json")
    p.add_argument("--json", action="store_true", help="print the matrix as JSON")
    p.add_argument("--markdown", action="store_true", help="print the matrix as the README's Markdown table")
    p.set_defaults(func=run)


def run(args):
    from ..runtime.support import support_markdown, supported_models

    rows = supported_models()
    if args.markdown:
        print(support_markdown())
        return 0
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['family']}  ({', '.join(r['model_types'])}; {', '.join(r['classes'])}; layout {r['layout']})")
        if r["notes"]:
            print(f"    {r['notes']}")
        for backend, level in r["backends"].items():
            print(f"    {backend:<9} {level}")
    return 0
