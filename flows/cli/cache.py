"""`zhllama cache ls|du|gc`: inspect and clean the artifact store."""

from __future__ import annotations

import time

from pipeline_lib.fsutil import human_bytes
from pipeline_lib.store import Store


def register(sub) -> None:
    p = sub.add_parser("cache", help="inspect and clean the artifact store ($ZHLLAMA_HOME)")
    csub = p.add_subparsers(dest="cache_cmd", metavar="ACTION", required=True)
    ls = csub.add_parser("ls", help="list cached artifacts")
    ls.add_argument("--stage", help="only this stage")
    ls.add_argument("--verify", action="store_true", help="re-hash every file and flag damaged entries")
    ls.set_defaults(func=run_ls)
    du = csub.add_parser("du", help="disk use per stage")
    du.set_defaults(func=run_du)
    gc = csub.add_parser("gc", help="remove damaged entries and leftovers (and optionally old or all entries)")
    gc.add_argument("--older-than", type=float, metavar="DAYS", help="also remove entries older than DAYS")
    gc.add_argument("--stage", help="with --older-than: only this stage; alone: remove this stage's entries")
    gc.add_argument("--all", action="store_true", help="remove everything")
    gc.add_argument("--dry-run", action="store_true", help="say what would be removed")
    gc.set_defaults(func=run_gc)


def run_ls(args) -> int:
    store = Store()
    entries = [e for e in store.entries() if not args.stage or e.stage == args.stage]
    if not entries and not store.damaged():
        print(f"no cached artifacts in {store.root}")
        return 0
    for e in entries:
        state = ""
        if args.verify:
            bad = store.problems(e, verify=True)
            state = "  DAMAGED: " + "; ".join(bad) if bad else "  ok"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created))
        files = ", ".join(list(e.outputs)[:3]) + (" …" if len(e.outputs) > 3 else "")
        print(f"{e.key[:12]}  {e.stage:10} {human_bytes(e.size):>9}  {when}  {files}{state}")
    print(f"{len(entries)} entries in {store.root}")
    damaged = store.damaged()
    if damaged:
        print(f"{len(damaged)} damaged entr{'y' if len(damaged) == 1 else 'ies'} not listed "
              f"({damaged[0][0][:12]}: {damaged[0][1]}); `zhllama cache gc` removes them")
    return 0


def run_du(args) -> int:
    store = Store()
    sizes = store.du()
    for stage, n in sorted(sizes.items(), key=lambda kv: -kv[1]):
        print(f"{human_bytes(n):>10}  {stage}")
    print(f"{human_bytes(sum(sizes.values())):>10}  total in {store.root}")
    return 0


def run_gc(args) -> int:
    store = Store()
    older = args.older_than * 86400 if args.older_than is not None else None
    removed = store.gc(older_than_s=older, stage=args.stage, everything=args.all, dry_run=args.dry_run)
    locks = [r for r in removed if r.startswith("stale lock ")]
    items = [r for r in removed if not r.startswith("stale lock ")]
    for r in items:
        print(("would remove " if args.dry_run else "removed ") + r)
    print(f"{len(items)} item(s) {'to remove' if args.dry_run else 'removed'}"
          + (f", and {len(locks)} lock file(s) no process holds" if locks else ""))
    return 0
