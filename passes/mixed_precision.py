"""mixed_precision: a precision per compute node from measured sensitivity, under a budget or an accuracy target.

Bit allocation is a multiple-choice knapsack: each quantizable group (a Conv/MatMul/Gemm with its weight;
a fused Relu follows its producer in the lowering) picks one candidate (fp32, fp16, int16 activations,
int8, int8/int4 weight blocks), each with a cost (bytes, bit-ops, or latency) and a loss (the output
degradation measured with only that group at that precision). The exact solver (onnxq.mckp) replaces the
greedy promotion peers use. Modes:
- `budget`: the objective's cost as a fraction of the all-fp32 model; the exact optimum under it.
- `target`: the cheapest point of the Pareto front whose validated score (`sqnr` dB, `cosine`, or a task
  metric `module:function`) meets `min`, found by bisection along the front (each probe lowers and runs the
  whole model). If no point meets it the best one found is kept and a note says so.
The result is only annotations; insert_qdq / quantize_weights / lower_fp16 lower them. Latency costs come
from whole-model measurements of each candidate on the target provider (onnxruntime CPU here), shared out
to the groups by their multiply-accumulates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from onnxq import ir as onnxq_ir
from onnxq import mckp, sensitivity
from onnxq.errors import UsageError, did_you_mean
from onnxq.pass_base import CALIB_FIX, Pass, PassConfig
from onnxq.qspec import (
    COMPUTE_OPS,
    DEFAULT_ACTIVATIONS,
    DEFAULT_WEIGHTS,
    NodeQuant,
    QuantSpec,
    get_qspec,
    set_qspec,
)

from ._graph import constant_array, default_opset

BITS = {"fp32": (32, 32), "fp16": (16, 16), "int16": (8, 16), "int8": (8, 8), "w8": (8, 32), "w4": (4, 32)}
# weight-only candidates may name their block size: w4b128 = 4-bit blocks of 128 (w4 uses block_size)
WEIGHT_ONLY = re.compile(r"^w(4|8)(?:b(16|32|64|128|256))?$")


def _bits(candidate: str) -> tuple[int, int]:
    found = WEIGHT_ONLY.match(candidate)
    return (int(found.group(1)), 32) if found else BITS[candidate]


class Target(PassConfig):
    metric: str = Field("sqnr", description="sqnr (worst output, dB), cosine (worst output), or module:function")
    min: float = Field(description="the score the chosen configuration must reach on the calibration samples")


class MixedPrecisionConfig(PassConfig):
    candidates: list[str] = Field(
        default_factory=lambda: ["fp32", "int8"],
        description="precisions each group may take (those that do not apply to an op are dropped for it): "
        "fp32, fp16 (Cast boundaries), int16 (16-bit activations, int8 weights; opset 21), int8 (the recipe "
        "defaults), w8 / w4 (weight-only blocks, MatMul/Gemm; opset 21; w4b128 names the block size)",
    )

    @field_validator("candidates")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in BITS and not WEIGHT_ONLY.match(name):
                raise ValueError(f"unknown candidate {name!r}; {did_you_mean(name, [*BITS, 'w4b128', 'w8b128'])}")
        if not names:
            raise ValueError("at least one candidate")
        return names

    objective: Literal["size", "bitops", "latency"] = Field(
        "latency", description="the cost: weight bytes, multiply-accumulates × bits, or measured latency"
    )
    budget: float | None = Field(
        None, gt=0, description="the objective as a fraction of the all-fp32 model (budget mode)"
    )
    target: Target | None = Field(
        default_factory=lambda: Target(metric="sqnr", min=20.0),
        description="accuracy-target mode (used when no budget is given)",
    )
    sensitivity: Literal["measured", "diag_hessian", "hessian_trace"] = Field(
        "measured", description="losses from onnxruntime runs of one-group variants, or a proxy (no variants)"
    )
    loss: Literal["noise", "kl", "metric"] = Field(
        "noise", description="measured loss: relative noise energy, KL of softmax outputs, or the target's task metric"
    )
    solver: Literal["exact", "greedy"] = "exact"
    refine: int = Field(
        0,
        ge=0,
        description="budget mode: rounds of re-measuring every group's candidates around the chosen plan (the "
        "interactions a one-group-at-a-time table misses) and solving again; a round is kept only if the new "
        "plan measures better",
    )
    samples: int = Field(16, ge=1, description="calibration samples per sensitivity measurement")
    target_samples: int = Field(64, ge=1, description="calibration samples each target probe is validated on")
    workers: int | None = Field(None, ge=1, description="processes measuring variants; default calibration.workers")
    block_size: int = Field(32, ge=16, le=256, description="w8/w4 block size")
    latency_threads: int = Field(1, ge=0, description="onnxruntime threads when measuring latency costs")


class MixedPrecision(Pass):
    """A precision per compute node from measured sensitivity, under a budget or an accuracy target."""

    name = "mixed_precision"
    Config = MixedPrecisionConfig
    after = ("assign_precision", "simplify", "fold_batchnorm", "upgrade_opset", "smooth_quant")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg = self.config
        started = time.perf_counter()
        timings: dict[str, float] = {}
        nodes = list(model.graph)
        groups = self._groups(model, nodes)
        if not groups:
            self.context.notes.append("mixed_precision: no annotated Conv/MatMul/Gemm with a weight; nothing chosen")
            return ir.passes.PassResult(model, modified=False)
        batches = sensitivity.first_samples(model, self.context, max(cfg.samples, cfg.target_samples))
        if not batches:
            raise UsageError(
                "mixed_precision measures sensitivity and needs calibration data",
                CALIB_FIX,
            )
        base = {i: get_qspec(n) for i, n in enumerate(nodes)}
        reference = self._reference_config(groups, base)
        candidates = {i: self._candidates(model, nodes[i]) for i in groups}
        self._weights_in_memory(model)
        float_bytes = onnxq_ir.model_bytes(model)

        tick = time.perf_counter()
        ranges = self._collect_ranges(model, nodes, candidates)
        timings["ranges"] = time.perf_counter() - tick
        tick = time.perf_counter()
        stats = sensitivity.layer_stats(model, [nodes[i] for i in groups], batches[: min(len(batches), 8)])
        timings["statistics"] = time.perf_counter() - tick

        workers = cfg.workers or int(self.context.calibration_settings.get("workers", 1) or 1)
        evaluator = sensitivity.Evaluator(
            float_bytes, reference, ranges, batches[: cfg.samples], self._metric_source(), workers=workers
        )
        self._probe = (
            lambda: sensitivity.Evaluator(  # built only in target mode: its own reference outputs
                float_bytes, reference, ranges, batches[: cfg.target_samples], self._metric_source()
            )
        )
        metric_reference = evaluator.metric_reference

        tick = time.perf_counter()
        costs = self._costs(model, nodes, groups, candidates, stats, evaluator, float_bytes, ranges)
        timings["costs"] = time.perf_counter() - tick

        table = self._losses(nodes, groups, candidates, stats, ranges, evaluator, metric_reference, timings)
        mckp_groups = [
            mckp.Group(str(i), tuple(mckp.Option(c, costs[i][c], table[i][c]["loss"]) for c in candidates[i]))
            for i in groups
        ]
        total_fp32 = sum(costs[i]["fp32"] for i in groups) + costs["rest"]
        tick = time.perf_counter()
        choice, search = self._choose(mckp_groups, total_fp32, costs["rest"], evaluator, candidates)
        timings["search"] = time.perf_counter() - tick

        for i in groups:
            set_qspec(nodes[i], candidates[i][choice[str(i)]])
        counts: dict[str, int] = {}
        for c in choice.values():
            counts[c] = counts.get(c, 0) + 1
        spent = sum(costs[int(g)][c] for g, c in choice.items()) + costs["rest"]
        timings["total"] = time.perf_counter() - started
        self.context.notes.extend(search.pop("notes", []))  # the search's verdict, then the plan it led to
        self.context.notes.append(
            f"mixed_precision: {len(groups)} groups → "
            + ", ".join(f"{n} {c}" for c, n in sorted(counts.items()))
            + f"; {cfg.objective} {spent / total_fp32:.3f} of fp32"
            + f"; sensitivity {timings.get('sensitivity', 0.0):.1f} s with {workers} worker(s)"
            + f", total {timings['total']:.1f} s"
        )
        if search.get("greedy"):  # by node name, so that a user (or a bench) can apply it as rules
            search["greedy"]["choice"] = {nodes[int(g)].name: c for g, c in search["greedy"]["choice"].items()}
        self.context.artifacts["mixed_precision"] = sensitivity.to_json(
            {
                "objective": cfg.objective,
                "budget": cfg.budget,
                "target": cfg.target.model_dump() if cfg.target and cfg.budget is None else None,
                "workers": workers,
                "seconds": timings,
                "cost_fp32": total_fp32,
                "cost_rest": costs["rest"],
                "chosen_cost_ratio": spent / total_fp32,
                "groups": [
                    {
                        "node": nodes[i].name,
                        "op_type": nodes[i].op_type,
                        "choice": choice[str(i)],
                        "options": {c: {"cost": costs[i][c], **table[i][c]} for c in candidates[i]},
                    }
                    for i in groups
                ],
                **search,
                "proxy_agreement": self._agreement(table, groups),
            }
        )
        return ir.passes.PassResult(model, modified=True)

    def _weights_in_memory(self, model: ir.Model) -> None:
        """Every variant is lowered from and run on the serialized model, so external weights are read in
        (a model this pass can measure fits in memory; one over 2 GB cannot be serialized at all)."""
        external = onnxq_ir.external_weight_bytes(model)
        if not external:
            return
        if onnxq_ir.total_weight_bytes(model) >= onnxq_ir.TWO_GB:
            raise UsageError(
                "mixed_precision lowers and runs every variant in memory, and this model's weights exceed 2 GB",
                "choose precisions with assign_precision rules and quantize_weights instead",
            )
        ir.external_data.load_to_model(model)
        self.context.notes.append(f"mixed_precision: read {external / 2**20:.0f} MB of external weights into memory")

    # --- what can be chosen ----------------------------------------------------------------------------

    def _groups(self, model: ir.Model, nodes: list[ir.Node]) -> list[int]:
        found = []
        for index, node in enumerate(nodes):
            spec = get_qspec(node)
            if spec is None or spec.skip or spec.frozen_by or node.op_type not in COMPUTE_OPS:
                continue
            if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            weight = constant_array(node.inputs[1])
            if weight is not None and weight.dtype == np.float32 and weight.ndim >= 2:
                found.append(index)
        return found

    def _reference_config(self, groups: list[int], base: dict[int, NodeQuant | None]) -> dict[int, NodeQuant | None]:
        """Every group in float; other annotated nodes (data movement) follow what their inputs become."""
        return {**base, **{i: NodeQuant(skip=True) for i in groups}}

    def _candidates(self, model: ir.Model, node: ir.Node) -> dict[str, NodeQuant]:
        defaults = self.context.defaults
        if defaults.activations.is_float or defaults.weights.granularity == "block":
            defaults = NodeQuant(activations=DEFAULT_ACTIVATIONS, weights=DEFAULT_WEIGHTS)
        opset = default_opset(model)
        weight = constant_array(node.inputs[1])
        blockable = node.op_type in ("MatMul", "Gemm") and weight is not None and weight.ndim == 2 and opset >= 21
        blockable = blockable and (node.op_type != "Gemm" or node.attributes.get_int("transA", 0) == 0)
        float_act = QuantSpec(dtype="fp32")
        bs = self.config.block_size
        table = {
            "fp32": NodeQuant(skip=True),
            "fp16": NodeQuant(activations=QuantSpec(dtype="fp16"), weights=QuantSpec(dtype="fp16")),
            "int16": NodeQuant(activations=QuantSpec(dtype="uint16", granularity="tensor"), weights=defaults.weights)
            if opset >= 21
            else None,
            "int8": defaults,
        }
        for name in self.config.candidates:
            found = WEIGHT_ONLY.match(name)
            if found and blockable:
                size = int(found.group(2) or bs)
                table[name] = NodeQuant(
                    activations=float_act,
                    weights=QuantSpec(dtype="int8", granularity="block", block_size=size, symmetric=True)
                    if found.group(1) == "8"
                    else QuantSpec(dtype="uint4", granularity="block", block_size=size),
                )
        chosen = {c: table[c] for c in self.config.candidates if table.get(c) is not None}
        if not chosen:
            chosen = {"fp32": table["fp32"]}
        return chosen  # type: ignore[return-value]

    def _metric_source(self):  # type: ignore[no-untyped-def]
        target = self.config.target
        if target is not None and target.metric not in ("sqnr", "cosine"):
            return target.metric
        return None

    # --- statistics, costs, losses ----------------------------------------------------------------------

    def _collect_ranges(self, model: ir.Model, nodes: list[ir.Node], candidates: dict[int, dict[str, NodeQuant]]):  # type: ignore[no-untyped-def]
        """Ranges of every activation any candidate rounds, collected once (one onnxruntime pass) by
        lowering a clone with every group at its integer-activation candidate; variants reuse them."""
        from onnxq.passes.insert_qdq import InsertQDQ

        changes = {}
        for i, options in candidates.items():
            quantized = [spec for spec in options.values() if not spec.skip and not spec.activations.is_float]
            if quantized:
                changes[i] = quantized[0]
        if changes:
            clone = onnxq_ir.from_proto(onnxq_ir.to_proto(model))
            clone_nodes = list(clone.graph)
            for i, spec in {**{j: get_qspec(n) for j, n in enumerate(nodes)}, **changes}.items():
                set_qspec(clone_nodes[i], spec)
            from onnxq.qspec import ANNOTATED_KEY

            clone.graph.meta[ANNOTATED_KEY] = True
            quiet = dataclasses.replace(self.context, notes=[])  # shares the ranges dict and the stats store
            InsertQDQ({}, quiet)(clone)
            self.context.stats_fingerprint = quiet.stats_fingerprint
        return dict(self.context.ranges)

    def _costs(self, model, nodes, groups, candidates, stats, evaluator, float_bytes, ranges):  # type: ignore[no-untyped-def]
        objective = self.config.objective
        costs: dict = {}
        macs = {}
        for i in groups:
            weight = constant_array(nodes[i].inputs[1])
            out_channels = _out_channels(nodes[i], weight)
            macs[i] = stats[groups.index(i)].output_size * weight.size / max(out_channels, 1)
            costs[i] = {}
            for c, spec in {**candidates[i], "fp32": NodeQuant(skip=True)}.items():  # fp32: the reference cost
                if objective == "size":
                    costs[i][c] = _weight_bytes(weight, out_channels, spec)
                else:
                    wb, ab = _bits(c)
                    costs[i][c] = macs[i] * wb * ab
        costs["rest"] = 0.0
        if objective == "size":
            grouped = {id(nodes[i].inputs[1]) for i in groups}
            costs["rest"] = float(
                sum(
                    v.const_value.nbytes
                    for v in model.graph.initializers.values()
                    if v.const_value is not None and id(v) not in grouped
                )
            )
        if objective == "latency":
            costs.update(self._latency_costs(model, groups, candidates, macs, evaluator, float_bytes, ranges))
        return costs

    def _latency_costs(self, model, groups, candidates, macs, evaluator, float_bytes, ranges):  # type: ignore[no-untyped-def]
        """Whole-model latency of the all-fp32 model and of each candidate applied everywhere it can be,
        measured interleaved on the first sample; each group's share is proportional to its MACs. With a
        stats store the measurements are kept, keyed by model, candidate, input shapes, threads, onnxruntime
        and CPU, so a rerun (another budget, another target) does not time the variants again."""
        from onnxq.validate import latency

        feeds = sensitivity.model_feeds(float_bytes, evaluator.feeds[:1])
        store = self.context.stats_store
        base_key = _latency_key_base(model, feeds[0], self.config.latency_threads) if store is not None else ""
        total_macs = sum(macs.values()) or 1.0
        float_ms = None
        per_mac: dict[str, float] = {}
        for c in sorted({c for options in candidates.values() for c in options} - {"fp32"}):
            members = [i for i in groups if c in candidates[i]]
            changes = {i: candidates[i][c] for i in members}
            key = _hash(base_key, c, [(i, repr(changes[i])) for i in members]) if store is not None else ""
            measured = store.measurement(key) if store is not None else None
            cached = measured is not None
            if measured is None:
                quant = sensitivity.lower(float_bytes, {**evaluator.base, **changes}, ranges)
                measured = latency(float_bytes, quant, feeds[0], threads=self.config.latency_threads, budget_s=1.0)
                measured = {k: measured[k] for k in ("float_ms", "quantized_ms")}
                if store is not None:
                    store.save_measurement(key, measured)
            float_ms = measured["float_ms"] if float_ms is None else min(float_ms, measured["float_ms"])
            share = sum(macs[i] for i in members) / total_macs
            per_mac[c] = (measured["quantized_ms"] - measured["float_ms"]) / max(sum(macs[i] for i in members), 1.0)
            self.context.notes.append(
                f"mixed_precision: latency all-{c} {measured['quantized_ms']:.2f} ms vs fp32 "
                f"{measured['float_ms']:.2f} ms ({share:.0%} of MACs)" + (", cached" if cached else "")
            )
        if float_ms is None:
            return {}
        out: dict = {}
        for i in groups:
            base_ms = float_ms * macs[i] / total_macs
            out[i] = {c: max(base_ms + per_mac[c] * macs[i], 0.0) for c in candidates[i] if c != "fp32"}
            out[i]["fp32"] = base_ms
        return out

    def _losses(self, nodes, groups, candidates, stats, ranges, evaluator, metric_reference, timings):  # type: ignore[no-untyped-def]
        cfg = self.config
        table: dict[int, dict[str, dict[str, float]]] = {}
        for i in groups:
            node = nodes[i]
            weight = constant_array(node.inputs[1]).astype(np.float32)
            layer = stats[groups.index(i)]
            input_range = ranges.get(node.inputs[0].name)
            table[i] = {}
            for c, spec in candidates[i].items():
                diag, trace = (0.0, 0.0) if spec.skip else sensitivity.proxies(node, weight, spec, layer, input_range)
                table[i][c] = {"diag_hessian": diag, "hessian_trace": trace}
        variants = [(i, c) for i in groups for c, spec in candidates[i].items() if not spec.skip]
        if cfg.sensitivity == "measured" and variants:
            from onnxq.progress import progress

            tick = time.perf_counter()
            with progress(self.context.show_progress, "measuring sensitivity", len(variants)) as advance:
                scores = evaluator.many([{i: candidates[i][c]} for i, c in variants], advance)
            timings["sensitivity"] = time.perf_counter() - tick
            for (i, c), s in zip(variants, scores, strict=True):
                table[i][c]["measured"] = s.loss(cfg.loss, metric_reference)
                table[i][c]["sqnr_db"] = s.sqnr_db
        key = "measured" if cfg.sensitivity == "measured" else cfg.sensitivity
        for i in groups:
            for c in candidates[i]:
                row = table[i][c]
                row["loss"] = 0.0 if candidates[i][c].skip else max(float(row.get(key, 0.0)), 0.0)
        return table

    def _agreement(self, table, groups) -> dict[str, float]:  # type: ignore[no-untyped-def]
        pairs = [row for i in groups for row in table[i].values() if "measured" in row]
        if not pairs:
            return {}
        measured = [r["measured"] for r in pairs]
        return {p: sensitivity.spearman([r[p] for r in pairs], measured) for p in ("diag_hessian", "hessian_trace")}

    # --- choosing ---------------------------------------------------------------------------------------

    def _choose(self, groups, total_fp32, rest, evaluator, candidates):  # type: ignore[no-untyped-def]
        cfg = self.config
        solve = mckp.solve_exact if cfg.solver == "exact" else mckp.solve_greedy
        front = mckp.pareto_front(groups)
        front_json = [{"cost_ratio": (p.cost + rest) / total_fp32, "loss": p.loss} for p in front]
        if cfg.budget is not None:
            budget = cfg.budget * total_fp32 - rest
            found = solve(groups, budget)
            if found is None:
                cheapest = (front[0].cost + rest) / total_fp32 if front else float("nan")
                raise UsageError(
                    f"mixed_precision budget {cfg.budget:g} of fp32 {cfg.objective} is below the cheapest "
                    f"configuration ({cheapest:.3f})",
                    f"raise budget to at least {cheapest:.3f}, or add cheaper candidates",
                )
            greedy = mckp.solve_greedy(groups, budget)
            rounds: list[dict] = []
            if cfg.refine:
                found, rounds = self._refine(groups, found, budget, evaluator, candidates)
            return found.choice, {
                "front": front_json,
                "chosen": {"cost_ratio": (found.cost + rest) / total_fp32, "loss": found.loss},
                **({"refine": rounds} if cfg.refine else {}),
                "greedy": {
                    "cost_ratio": (greedy.cost + rest) / total_fp32,
                    "loss": greedy.loss,
                    "choice": greedy.choice,
                }
                if greedy
                else None,
            }
        return self._search_target(front, front_json, rest, total_fp32, evaluator, candidates)

    def _refine(self, groups, found, budget, evaluator, candidates):  # type: ignore[no-untyped-def]
        """Sequential re-linearisation: around the current plan P, measure P with one group switched to each
        other candidate, take the loss changes as the knapsack's table (shifted per group to be >= 0, which
        changes no argmin), solve under the same budget, and keep the new plan only if it measures better.
        Returns the kept plan (its loss the measured one once a round was kept) and one record per round."""
        from onnxq.progress import progress

        cfg = self.config
        solve = mckp.solve_exact if cfg.solver == "exact" else mckp.solve_greedy
        reference = evaluator.metric_reference

        def lowered(choice: dict[str, str]) -> dict:  # type: ignore[type-arg]
            return {int(g): candidates[int(g)][c] for g, c in choice.items()}

        def measured(choice: dict[str, str]) -> float:
            return evaluator.one(lowered(choice)).loss(cfg.loss, reference)

        current, current_loss = found, measured(found.choice)
        rounds: list[dict] = []
        for _ in range(cfg.refine):
            switches = [(g.name, o.name) for g in groups for o in g.options if o.name != current.choice[g.name]]
            plan = lowered(current.choice)
            with progress(self.context.show_progress, "refining around the plan", len(switches)) as advance:
                scores = evaluator.many([{**plan, int(g): candidates[int(g)][c]} for g, c in switches], advance)
            delta = {k: s.loss(cfg.loss, reference) - current_loss for k, s in zip(switches, scores, strict=True)}
            table = []
            for g in groups:
                raw = {o.name: delta.get((g.name, o.name), 0.0) for o in g.options}
                low = min(raw.values())
                table.append(
                    mckp.Group(g.name, tuple(mckp.Option(o.name, o.cost, raw[o.name] - low) for o in g.options))
                )
            proposal = solve(table, budget)
            changed = sum(proposal.choice[g] != current.choice[g] for g in proposal.choice) if proposal else 0
            record = {"measured_before": current_loss, "changed_groups": changed, "accepted": False}
            if proposal is None or not changed:
                rounds.append(record)
                break
            loss = measured(proposal.choice)
            record.update(measured_after=loss, accepted=loss < current_loss)
            rounds.append(record)
            self.context.notes.append(
                f"mixed_precision: refine round {len(rounds)}: {changed} groups changed, measured loss "
                f"{current_loss:.4g} → {loss:.4g}" + ("" if loss < current_loss else " (kept the previous plan)")
            )
            if loss >= current_loss:
                break
            current, current_loss = mckp.Solution(proposal.choice, proposal.cost, loss), loss
        return current, rounds

    def _search_target(self, front, front_json, rest, total_fp32, evaluator, candidates):  # type: ignore[no-untyped-def]
        """Bisection along the front for the cheapest point meeting the target (scores rise with cost)."""
        target = self.config.target
        assert target is not None
        probes: dict[int, float] = {}
        evaluator = self._probe()
        # A mix must never lose to the uniform int8 plan it refines: where int8 everywhere meets the target,
        # the target becomes what int8 reaches (magika: a 20 dB mix flipped 1 of 16 held-out files that int8
        # kept), and int8 itself is the answer when no cheaper mix measures as well.
        groups = list(front[0].choice) if front else []
        uniform = {g: "int8" for g in groups} if all("int8" in candidates[int(g)] for g in groups) else None
        floor = target.min
        if uniform:
            reached = evaluator.one({int(g): candidates[int(g)]["int8"] for g in groups}).value(target.metric)
            floor = max(floor, reached) if reached >= target.min else floor

        def meets(index: int) -> bool:
            changes = {int(g): candidates[int(g)][c] for g, c in front[index].choice.items()}
            probes[index] = evaluator.one(changes).value(target.metric)
            return probes[index] >= floor

        lo, hi = 0, len(front) - 1
        if meets(lo):
            hi = lo
        elif hi == lo or not meets(hi):
            hi = -1
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if meets(mid):
                    hi = mid
                else:
                    lo = mid
        notes = []
        unit = " dB" if target.metric == "sqnr" else ""
        if hi < 0 and uniform and floor > target.min:
            notes.append(
                f"mixed_precision: no mix on the front measured as well as int8 everywhere ({floor:.4g}{unit}); "
                "kept int8 everywhere"
            )
            return uniform, {
                "front": front_json,
                "probes": [],
                "chosen": {"uniform": "int8", "score": floor},
                "notes": notes,
            }
        if floor > target.min:
            notes.append(f"mixed_precision: target raised to int8's own {floor:.4g}{unit} (a mix must not lose to it)")
        if hi < 0:
            hi = max(probes, key=lambda k: (probes[k], -k))
            notes.append(
                f"mixed_precision: target {target.metric} ≥ {target.min:g}{unit} not met; kept the best found "
                f"({probes[hi]:.4g}{unit} at {front_json[hi]['cost_ratio']:.3f} of fp32)"
            )
        else:
            notes.append(
                f"mixed_precision: target {target.metric} ≥ {target.min:g}{unit} met with {probes[hi]:.4g}{unit} at "
                f"{front_json[hi]['cost_ratio']:.3f} of fp32 (front of {len(front)} points, {len(probes)} probes)"
            )
        return front[hi].choice, {
            "front": front_json,
            "probes": [
                {"index": k, "cost_ratio": front_json[k]["cost_ratio"], "score": v} for k, v in sorted(probes.items())
            ],
            "chosen": {**front_json[hi], "index": hi, "score": probes[hi]},
            "notes": notes,
        }


def _latency_key_base(model: ir.Model, feeds: dict[str, np.ndarray], threads: int) -> str:
    """What a latency measurement depends on besides the candidate: model, input shapes, threads, runtime, CPU."""
    import platform

    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    shapes = sorted((k, tuple(v.shape)) for k, v in feeds.items())
    return _hash(onnxq_ir.model_fingerprint(model), shapes, threads, ort.__version__, cpu, os.cpu_count())


def _hash(*parts: object) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _out_channels(node: ir.Node, weight: np.ndarray) -> int:
    if node.op_type == "Conv":
        return weight.shape[0]
    if node.op_type == "ConvTranspose":
        return weight.shape[1] * node.attributes.get_int("group", 1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return weight.shape[0]
    return weight.shape[-1]


def _weight_bytes(weight: np.ndarray, out_channels: int, spec: NodeQuant) -> float:
    """Stored bytes of a weight under a candidate (codes, scales and zero points)."""
    n = weight.size
    w = spec.weights
    if spec.skip or w.dtype == "fp32":
        return 4.0 * n
    if w.dtype == "fp16":
        return 2.0 * n
    bits = 4 if w.dtype in ("int4", "uint4") else 8 if w.dtype in ("int8", "uint8") else 16
    if w.granularity == "block":
        blocks = n / (w.block_size or 32)
        return n * bits / 8 + 4 * blocks + (0 if w.symmetric else blocks * bits / 8)
    params = out_channels if w.granularity == "channel" else 1
    return n * bits / 8 + 4 * params + (0 if w.symmetric else params)
