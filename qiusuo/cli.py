"""`qiusuo <stage>`: the command line. Each stage has one config dataclass; `--config FILE` loads a YAML
mapping (or the section named after the stage in a multi-stage file such as configs/demo.yaml), and
every field has a `--flag` that overrides it. The CLI only wires stages together."""
from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path

from .config import ConfigError, add_arguments, build, from_args, read_yaml
from .corpus import CorpusConfig
from .evaluate import EvalConfig
from .grpo import GRPOConfig
from .model import CheckpointError
from .sample import SampleConfig
from .sft import SFTConfig

STAGES = {
    "corpus": (CorpusConfig, "write the synthetic pretraining corpus (direct answers, traces, flawed and reflecting traces)"),
    "pretrain": (SFTConfig, "train the base model on a corpus (or fine-tune a checkpoint with --init)"),
    "sft": (SFTConfig, "supervised fine-tuning of --init on a dataset file (prompt → response or chats; loss on the response)"),
    "grpo": (GRPOConfig, "reinforcement learning with GRPO / Dr. GRPO / DAPO on verifiable rewards"),
    "eval": (EvalConfig, "pass@1 over k samples and cons@k on held-out problems"),
    "sample": (SampleConfig, "rejection sampling: a checkpoint's correct answers on training problems → an SFT set"),
}


def run_stage(name: str, cfg, resume: bool = False, overwrite: bool = False):
    if name == "corpus":
        from .corpus import write_corpus

        counts = write_corpus(cfg)
        print(f"wrote {sum(counts.values())} examples to {cfg.out}/train.jsonl: "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    elif name == "pretrain":
        from .sft import train

        train(cfg, resume=resume, overwrite=overwrite)
    elif name == "sft":
        from dataclasses import replace

        from .sft import train

        if not cfg.init:
            raise ConfigError("qiusuo sft fine-tunes a checkpoint: give --init (a fresh model trains with qiusuo pretrain)")
        train(cfg if cfg.data_options is not None else replace(cfg, data_options={}), resume=resume,
              overwrite=overwrite)
    elif name == "grpo":
        from .grpo import train

        train(cfg, resume=resume, overwrite=overwrite)
    elif name == "eval":
        from .evaluate import evaluate

        evaluate(cfg)
    elif name == "sample":
        from .sample import sample

        sample(cfg)


def grpo_flops(run: Path) -> float:
    """The FLOPs the GRPO stage spent (its ledger): the control's training budget."""
    from .ledger import read_json

    zero = read_json(run / "zero" / "ledger.json")
    if not zero or not zero.get("flops"):
        raise FileNotFoundError(f"{run}: the control needs zero/ledger.json with its FLOPs")
    return float(zero["flops"])


def control_cap(run: Path) -> int:
    """A step cap for the control: twice the steps the base's mean FLOPs per step would need (the FLOP
    budget stops it first; the cap only keeps its progress line and eta meaningful)."""
    import math

    from .ledger import read_json

    base = read_json(run / "base" / "ledger.json") or {}
    metrics = run / "base" / "metrics.jsonl"   # one line per pretraining step
    steps = sum(1 for line in metrics.open() if line.strip()) if metrics.exists() else 0
    if not base.get("flops") or not steps:
        return 1_000_000
    return 2 * math.ceil(grpo_flops(run) / (base["flops"] / steps)) + 10


def control_config(run: Path, sections: dict, price_kw: dict) -> SFTConfig:
    """The equal-compute control of a run: the base's pretraining continued at its final learning rate
    (constant), on a fresh shuffle of the same corpus, until it has spent GRPO's FLOPs (`<run>/zero`'s
    ledger); the `control` section can change any of it."""
    pre = build(SFTConfig, {**(sections.get("pretrain") or {}), **price_kw})
    defaults = {"lr": pre.lr * pre.min_lr_ratio, "min_lr_ratio": 1.0, "warmup_steps": 0,
                "batch_size": pre.batch_size, "max_len": pre.max_len, "seed": pre.seed + 1,
                "log_every": pre.log_every, "save_every": pre.save_every, "steps": control_cap(run)}
    return build(SFTConfig, {**defaults, **(sections.get("control") or {}), "init": str(run / "base"),
                             "data": str(run / "corpus"), "out": str(run / "control"),
                             "flops_budget": grpo_flops(run), **price_kw})


def demo(run: Path, config: Path | None, resume: bool, price: float | None, overwrite: bool = False) -> None:
    """The whole tiny R1-Zero pipeline: corpus → pretrain (base) → grpo (zero) → control (the base
    pretrained further for GRPO's FLOPs) → eval of all three → report. Stages chain through explicit
    folder names; with --resume finished stages are skipped and a stopped one continues from its last
    checkpoint."""
    from .checkpoint import has_checkpoints
    from .report import write_report

    sections = read_yaml(config) if config else {}
    price_kw = {} if price is None else {"price_per_device_hour": price}

    def cfg(cls, section, **wiring):
        return build(cls, {**(sections.get(section) or {}), **wiring, **price_kw})

    def control():
        return control_config(run, sections, price_kw)

    plan = [
        ("corpus", lambda: cfg(CorpusConfig, "corpus", out=str(run / "corpus")), run / "corpus" / "ledger.json"),
        ("pretrain", lambda: cfg(SFTConfig, "pretrain", data=str(run / "corpus"), out=str(run / "base")),
         run / "base" / "ledger.json"),
        ("eval", lambda: cfg(EvalConfig, "eval", checkpoint=str(run / "base")), run / "eval" / "base.json"),
        ("grpo", lambda: cfg(GRPOConfig, "grpo", init=str(run / "base"), out=str(run / "zero")),
         run / "zero" / "ledger.json"),
        ("eval", lambda: cfg(EvalConfig, "eval", checkpoint=str(run / "zero")), run / "eval" / "zero.json"),
        ("pretrain", control, run / "control" / "ledger.json"),
        ("eval", lambda: cfg(EvalConfig, "eval", checkpoint=str(run / "control")), run / "eval" / "control.json"),
    ]
    for _, make, _ in plan:
        if make is not control:
            make()  # a bad config fails here, before any stage runs
    t0 = time.perf_counter()
    for name, make, done_marker in plan:
        if resume and done_marker.exists():
            print(f"[{name}] already done ({done_marker}), skipping")
            continue
        stage_cfg = make()
        partial = resume and has_checkpoints(Path(getattr(stage_cfg, "out", "") or ""))
        label = "control" if make is control else name
        print(f"[{label}] {'resuming' if partial else 'starting'}")
        run_stage(name, stage_cfg, resume=partial, overwrite=overwrite)
    report = write_report(run, price)
    print(f"pipeline done in {time.perf_counter() - t0:.0f} s — report: {report}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qiusuo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text))
        p.add_argument("--config", help="YAML file: the stage's mapping, or a multi-stage file with a section per stage")
        if name in ("pretrain", "sft", "grpo"):
            p.add_argument("--resume", action="store_true",
                           help="continue from the newest good checkpoint in <out>/checkpoints/")
            p.add_argument("--overwrite", action="store_true",
                           help="start over in an <out> that holds checkpoints (deletes them)")
        add_arguments(p, cls)
    p = sub.add_parser("report", help="write <run>/report.md and plots from a run folder")
    p.add_argument("run", type=Path, help="run folder, e.g. runs/tiny")
    p.add_argument("--price-per-device-hour", type=float, default=None, help="override each stage's price")
    p = sub.add_parser("paper", help="the whole R1 recipe in miniature: every stage, then the paper's table")
    p.add_argument("--run", type=Path, default=Path("runs/paper"), help="run folder (default runs/paper)")
    p.add_argument("--config", type=Path, default=None, help="multi-stage YAML, e.g. configs/paper.yaml")
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue a stopped one")
    p.add_argument("--price-per-device-hour", type=float, default=None, help="dollars per device-hour")
    p = sub.add_parser("demo", help="the tiny R1-Zero pipeline end to end: corpus, pretrain, grpo, eval, report")
    p.add_argument("--run", type=Path, default=Path("runs/tiny"), help="run folder (default runs/tiny)")
    p.add_argument("--config", type=Path, default=None, help="multi-stage YAML (default: each stage's defaults)")
    p.add_argument("--resume", action="store_true", help="skip finished stages, continue a stopped one")
    p.add_argument("--overwrite", action="store_true", help="start every stage over (deletes their checkpoints)")
    p.add_argument("--price-per-device-hour", type=float, default=None, help="dollars per device-hour")
    # ==== serving (docs/design.md §5): `qiusuo serve | keys | chat` — the one block the serving layer owns ====
    from .serve.keys import DEFAULT_DB

    try:
        from .serve.app import ServeConfig
    except ImportError:  # FastAPI & co. come with the `serve` extra
        ServeConfig = None
    p = sub.add_parser("serve", help="serve a checkpoint: OpenAI/DeepSeek-compatible API, chat page, keys, limits",
                       description=ServeConfig.__doc__ if ServeConfig else "needs: pip install 'qiusuo[serve]'",
                       conflict_handler="resolve")
    p.add_argument("checkpoint_path", nargs="?", metavar="CHECKPOINT", help="stage folder, e.g. runs/tiny/zero")
    p.add_argument("--config", help="YAML file: a ServeConfig mapping, or a file with a `serve` section")
    if ServeConfig:
        add_arguments(p, ServeConfig)
    p.add_argument("--no-auth", dest="cfg_no_auth", action="store_const", const="true", default=None,
                   help="serve without API keys (local use only; off by default)")
    p = sub.add_parser("keys", help="create, list and revoke API keys of `qiusuo serve`")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    k = keys_sub.add_parser("create", help="a new key (printed once)")
    k.add_argument("--name", required=True, help="who or what the key is for")
    k.add_argument("--rpm", type=int, default=60, help="requests per minute (default 60)")
    k.add_argument("--tpm", type=int, default=100_000, help="prompt + completion tokens per minute (default 100000)")
    k.add_argument("--balance", type=float, default=5.0, help="USD the key may spend (default 5.00)")
    k.add_argument("--max-concurrent", type=int, default=None,
                   help="requests in flight at once (default: the server's --key-max-concurrent)")
    keys_sub.add_parser("list", help="every key with its limits, balance and spend")
    keys_sub.add_parser("revoke", help="revoke a key by id").add_argument("key_id")
    for k in keys_sub.choices.values():
        k.add_argument("--db", default=DEFAULT_DB, help=f"SQLite file (default {DEFAULT_DB})")
    p = sub.add_parser("chat", help="chat with a running `qiusuo serve` in the terminal")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server address (default http://127.0.0.1:8000)")
    p.add_argument("--api-key", default=None, help="API key (default: $QIUSUO_API_KEY; none with --no-auth)")
    p.add_argument("--model", default=None, help="model id (default: the server's)")
    p.add_argument("--system", default=None, help="system prompt")
    for name in (*STAGES, "report", "paper", "demo"):
        sub.choices[name].add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"qiusuo {args.command}: error: {unknown_flags(sub.choices[args.command], unknown)}", file=sys.stderr)
        return 2
    if args.command in ("serve", "keys", "chat"):
        try:
            if args.command == "serve":
                if ServeConfig is None:
                    raise ConfigError("the server needs its extra: pip install -c constraints.txt -e '.[serve]'")
                from .serve.app import serve

                if args.checkpoint_path:
                    args.cfg_checkpoint = args.checkpoint_path
                cfg = from_args(ServeConfig, args, "serve")
                if not cfg.checkpoint:
                    raise ConfigError("which checkpoint? e.g. qiusuo serve runs/tiny/zero")
                serve(cfg)
            elif args.command == "keys":
                from .serve.keys import keys_command

                keys_command(args)
            else:
                import os

                from .serve.chat import ChatSession, run

                run(ChatSession(url=args.url, api_key=args.api_key or os.environ.get("QIUSUO_API_KEY"),
                                model=args.model, system=args.system))
        except (ConfigError, CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
            print(f"qiusuo {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        return 0
    # ==== end of serving ====
    try:
        if args.command == "report":
            from .report import write_report

            print(write_report(args.run, args.price_per_device_hour))
        elif args.command == "paper":
            from .paper import run_paper

            run_paper(args.run, args.config, args.resume, args.price_per_device_hour)
        elif args.command == "demo":
            demo(args.run, args.config, args.resume, args.price_per_device_hour, args.overwrite)
        else:
            cfg = from_args(STAGES[args.command][0], args, args.command)
            run_stage(args.command, cfg, resume=getattr(args, "resume", False),
                      overwrite=getattr(args, "overwrite", False))
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"qiusuo {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qiusuo {args.command}: interrupted — rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — anything else: still one line, the traceback on request
        if args.debug:
            raise
        print(f"qiusuo {args.command}: error: {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def one_line(e: BaseException) -> str:
    """An error's message as one line (library messages sometimes span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def unknown_flags(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """'unknown flag --stepz (did you mean --steps?)' for flags argparse did not recognise."""
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    parts, after_flag = [], False
    for arg in unknown:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("-"):
            if not after_flag:  # a value following an unknown flag is not a second error
                parts.append(f"unexpected argument {arg!r}")
            continue
        after_flag = "=" not in arg
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        parts.append(f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else ""))
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
