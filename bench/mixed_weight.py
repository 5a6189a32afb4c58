"""Mixed int4/int8 weight-only (W4/W8 blocks of 32) on the tiny GPT and MiniLM at one model size: the
ModelOpt-style heuristic (first and last eighth of the layers and every third layer int8, the rest int4;
the LM head int8), greedy promotion, and the exact MCKP plan from measured sensitivity, all at the
heuristic's size. Every plan is lowered the same way (RTN) and scored on held-out data.

    python bench/mixed_weight.py [--models gpt,minilm] [--samples 16] [--candidates w4,w8] [--heuristic w4,w8]

The LP bound row is the LP relaxation of the measured table at that size: no plan, from any solver, can
predict a lower loss. Where greedy's predicted loss meets it, exactness has nothing left to win.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.weight_only import Task  # noqa: E402

W8 = {"dtype": "int8", "granularity": "block", "block_size": 32, "symmetric": True}
W4 = {"dtype": "uint4", "granularity": "block", "block_size": 32, "symmetric": False}
LOSS = {"gpt": "kl", "minilm": "noise"}


def recipe(mixed: dict[str, Any] | None, rules: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    passes: list[dict[str, Any]] = [
        {"upgrade_opset": {"target": 21}},
        {"simplify": {"onnxsim": False}},
        {
            "assign_precision": {
                "targets": ["MatMul", "Gemm"],
                "ignore": [{"op_types": ["MatMul"], "has_weight": False}],
                "rules": rules,
            }
        },
    ]
    if mixed is not None:
        passes.append({"mixed_precision": mixed})
    passes += [{"quantize_weights": {"algorithm": "rtn"}}, {"cleanup": {}}]
    return {
        "name": "mixed-weight",
        "calibration": {"num_samples": max(samples, 16)},
        "defaults": {"activations": {"dtype": "fp32"}, "weights": W4},
        "passes": passes,
        "validate": {"enabled": False},
    }


def layer_of(name: str) -> int | None:
    found = re.search(r"(?:layer|blocks?|h)\.(\d+)\.", name)
    return int(found.group(1)) if found else None


def heuristic_int8(names: list[str]) -> list[str]:
    """ModelOpt's int4/int8 mix: first and last eighth of the layers and every third layer in int8."""
    layers = sorted({n for n in map(layer_of, names) if n is not None})
    count = len(layers)
    edge = math.ceil(count / 8)
    keep = {i for i in layers if i < edge or i >= count - edge or i % 3 == 0}
    return [n for n in names if layer_of(n) is None or layer_of(n) in keep]


def weight_spec(candidate: str) -> dict[str, Any]:
    """The block spec a weight-only candidate name stands for (w4, w8, w4b128, …)."""
    found = re.match(r"^w(4|8)(?:b(\d+))?$", candidate)
    assert found, candidate
    spec = dict(W8 if found.group(1) == "8" else W4)
    spec["block_size"] = int(found.group(2) or 32)
    return spec


def rules_for(plan: dict[str, str]) -> list[dict[str, Any]]:
    """assign_precision rules that reproduce a plan (the defaults are w4)."""
    rules: list[dict[str, Any]] = []
    for choice in sorted(set(plan.values())):
        names = sorted(n for n, c in plan.items() if c == choice)
        rules.append({"names": names, **({"skip": True} if choice == "fp32" else {"weights": weight_spec(choice)})})
    return rules


def mix(plan: dict[str, str]) -> str:
    return " ".join(f"{k}:{v}" for k, v in sorted(Counter(plan.values()).items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt,minilm")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--candidates", default="w4,w8", help="what greedy and MCKP may choose from")
    parser.add_argument("--heuristic", default="w4,w8", help="the heuristic's int4 and int8 candidates")
    parser.add_argument("--refine", type=int, default=0, help="also run exact and greedy with this many refine rounds")
    args = parser.parse_args()
    import onnxq
    from onnxq import mckp

    for name in args.models.split(","):
        task = Task(name)
        with tempfile.TemporaryDirectory(prefix="onnxq-mixw-") as work:
            tmp = Path(work)
            low, high = args.heuristic.split(",")
            probe = {
                "candidates": sorted({low, high, *args.candidates.split(",")}),
                "objective": "size",
                "budget": 1.0,
                "sensitivity": "diag_hessian",
            }
            costs = onnxq.run(task.model, recipe(probe, [], args.samples), calib=task.calib, dry_run=True).artifacts[
                "mixed_precision"
            ]
            names = [g["node"] for g in costs["groups"]]
            int8 = set(heuristic_int8(names))
            spent = costs["cost_rest"] + sum(
                g["options"][high if g["node"] in int8 else low]["cost"] for g in costs["groups"]
            )
            budget = spent / costs["cost_fp32"]
            mixed = {
                "candidates": args.candidates.split(","),
                "objective": "size",
                "budget": budget,
                "loss": LOSS[name],
                "samples": args.samples,
            }
            started = time.perf_counter()
            exact = onnxq.run(task.model, recipe(mixed, [], args.samples), calib=task.calib, output=tmp / "exact.onnx")
            seconds = time.perf_counter() - started
            report = exact.artifacts["mixed_precision"]
            plans = {
                "heuristic": {n: high if n in int8 else low for n in names},
                "greedy": report["greedy"]["choice"],
                "exact MCKP": {g["node"]: g["choice"] for g in report["groups"]},
            }
            outputs = {"exact MCKP": exact.output}
            for label in ("heuristic", "greedy"):
                rules = rules_for(plans[label])
                outputs[label] = onnxq.run(
                    task.model, recipe(None, rules, args.samples), calib=task.calib, output=tmp / f"{label}.onnx"
                ).output
            losses = {g["node"]: g["options"] for g in report["groups"]}
            print(
                f"\n== {name}: {args.candidates} at the size of the {low}/{high} heuristic "
                f"({budget:.4f} of fp32 weights) =="
            )
            print(f"{'plan':12s} {'mix':>24s} {'size':>7s} {'pred. loss':>11s} {task.header():>28s}")
            print(f"{'fp32':12s} {'':>24s} {1.0:7.4f} {'':>11s} {task.fp32_row():>28s}")
            fp32_size = Path(task.model).stat().st_size
            for label in ("heuristic", "greedy", "exact MCKP"):
                predicted = sum(losses[n][plans[label][n]]["loss"] for n in losses)
                size = Path(outputs[label]).stat().st_size / fp32_size
                score = task.score(str(outputs[label]))
                print(f"{label:12s} {mix(plans[label]):>24s} {size:7.4f} {predicted:11.4g} {score:>28s}")
            table = [
                mckp.Group(n, tuple(mckp.Option(c, o["cost"], o["loss"]) for c, o in losses[n].items())) for n in losses
            ]
            bound = mckp.lp_bound(table, budget * report["cost_fp32"] - report["cost_rest"])
            print(f"{'LP bound':12s} {'':>24s} {'':>7s} {bound:11.4g}   (no plan of this size predicts less)")
            for solver in ("exact", "greedy") if args.refine else ():
                label = f"{solver} + refine"
                run = onnxq.run(
                    task.model,
                    recipe({**mixed, "solver": solver, "refine": args.refine}, [], args.samples),
                    calib=task.calib,
                    output=tmp / f"{solver}-refined.onnx",
                )
                refined = run.artifacts["mixed_precision"]
                plan = {g["node"]: g["choice"] for g in refined["groups"]}
                predicted = sum(losses[n][plan[n]]["loss"] for n in losses)
                size = Path(run.output).stat().st_size / fp32_size
                print(f"{label:12s} {mix(plan):>24s} {size:7.4f} {predicted:11.4g} {task.score(str(run.output)):>28s}")
                for r in refined["refine"]:
                    after = f" → {r['measured_after']:.4g}" if "measured_after" in r else ""
                    print(
                        f"{'':12s}   round: {r['changed_groups']} groups changed, measured "
                        f"{r['measured_before']:.4g}{after}{'' if r['accepted'] else ' (not kept)'}"
                    )
            print(
                f"sensitivity: {len(names)} groups × {len(mixed['candidates'])} candidates in "
                f"{report['seconds'].get('sensitivity', 0):.1f} s; "
                f"whole run {seconds:.1f} s; proxy agreement "
                + ", ".join(f"{k} {v:.2f}" for k, v in report["proxy_agreement"].items())
            )


if __name__ == "__main__":
    main()
