"""The step-cost benchmark's report: ratios to Adam, the tables, the targets and the chart.

``write`` produces ``speed.json`` (every measurement), ``speed.md`` (per model, a time table
and a memory table, then the targets) and ``speed.png``; ``load`` reads a ``speed.json``
back, so that ``--report-only`` rebuilds the rest from it.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from alsals_bench.speed.configs import CONFIGS
from alsals_bench.speed.measure import Measurement, ModelResult

# Targets: a configuration's step time as a multiple of Adam's, at most.
TIME_TARGETS = {"alsals": 1.8, "alsals-analytic": 1.45, "alsals-fast": 1.15}
OWN_TARGET = 2.0  # optimizer's own time / Adam's step()
MEMORY_TARGET = 1.0  # peak beyond Adam's, in parameter-sized buffers


def _median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _ratio(x: float, y: float) -> float:
    return x / y if y and not math.isnan(y) else math.nan


def summarize(result: ModelResult) -> list[dict[str, Any]]:
    """One row per configuration, with ratios to Adam's medians (wall and CPU time)."""
    ms = result.measurements
    adam = ms.get("adam", Measurement("adam"))
    adam_step, adam_cpu = _median(adam.step_s), _median(adam.cpu_step_s)
    adam_own, adam_cpu_own = _median(adam.own_s), _median(adam.cpu_own_s)
    rows = []
    for name, m in ms.items():
        step, cpu = _median(m.step_s), _median(m.cpu_step_s)
        counterpart = CONFIGS[name].salsa
        other = ms.get(counterpart) if counterpart else None
        rows.append(
            {
                "config": name,
                "step_ms": 1e3 * step,
                "step_ms_min": 1e3 * min(m.step_s),
                "step_ms_max": 1e3 * max(m.step_s),
                "x_adam": _ratio(step, adam_step),
                "x_adam_min": _ratio(min(m.step_s), adam_step),
                "x_adam_max": _ratio(max(m.step_s), adam_step),
                "cpu_x_adam": _ratio(cpu, adam_cpu),
                "cpu_x_adam_min": _ratio(min(m.cpu_step_s), adam_cpu),
                "cpu_x_adam_max": _ratio(max(m.cpu_step_s), adam_cpu),
                "passes_x_adam": _ratio(_median(m.closure_s), adam_step),
                "cpu_passes_x_adam": _ratio(_median(m.cpu_closure_s), adam_cpu),
                # The floor: this configuration's passes plus Adam's own time.
                "floor_x_adam": _ratio(_median(m.closure_s) + adam_own, adam_step),
                "cpu_floor_x_adam": _ratio(_median(m.cpu_closure_s) + adam_cpu_own, adam_cpu),
                "forwards": m.forwards,
                "backwards": m.backwards,
                "nominal": (m.forwards + 2 * m.backwards) / 3,
                # The nominal count with this model's measured pass costs.
                "pass_limit": m.backwards + (m.forwards - m.backwards) * result.trial_share,
                "own_ms": 1e3 * _median(m.own_s),
                "own_x_adam": _ratio(_median(m.own_s), adam_own),
                "cpu_own_x_adam": _ratio(_median(m.cpu_own_s), adam_cpu_own),
                "peak_mib": m.peak_bytes / 2**20,
                "peak_x_adam": _ratio(m.peak_bytes, adam.peak_bytes),
                "extra_params": (m.peak_bytes - adam.peak_bytes) / result.param_bytes,
                "state_mib": m.state_bytes / 2**20,
                "state_params": m.state_bytes / result.param_bytes,
                "peak_op": m.peak_op,
                "salsa": counterpart or "",
                "x_salsa": _ratio(step, _median(other.step_s)) if other else math.nan,
                "cpu_x_salsa": _ratio(cpu, _median(other.cpu_step_s)) if other else math.nan,
                "cancellations": m.cancellations,
            }
        )
    return rows


def _fmt(x: float, spec: str = ".2f") -> str:
    return "–" if math.isnan(x) else format(x, spec)


def _has_memory(result: ModelResult) -> bool:
    return any(m.peak_bytes for m in result.measurements.values())


def _pass_line(result: ModelResult) -> str:
    p = result.pass_s
    if not p:
        return ""
    return (
        f" Passes: forward+backward {1e3 * p['fwd_bwd']:.1f} ms, a backward = "
        f"{(p['fwd_bwd'] - p['fwd']) / p['fwd']:.2f} forwards, a no-grad (trial) forward = "
        f"{result.trial_share:.2f} of a forward+backward (nominal: 0.33)."
    )


def markdown(results: Sequence[ModelResult]) -> str:
    """Per model: a time table and a memory table."""
    lines = [
        "Time ratios read *wall time / CPU time* (the process's CPU time, which other jobs on a "
        "shared machine do not inflate), medians over the repeats; (min–max) is the spread of "
        "the wall-time ratio over repeats. *nominal*: the pass count with a backward costing 2 "
        "forwards; *pass limit*: the same with this model's measured pass costs. *floor*: this "
        "configuration's measured passes plus Adam's own time, as timed in the run. *own*: "
        "step time minus the time inside the closure (for Adam: `optimizer.step()`). "
        "P: the parameters' size.",
        "",
    ]
    for result in results:
        rows = summarize(result)
        lines += [
            f"### {result.model}",
            "",
            f"{result.description}; {result.params:,} parameters "
            f"(P = {result.param_bytes / 2**20:.1f} MiB).{_pass_line(result)}",
            "",
            "| configuration | ms/step (min–max) | **× Adam** (min–max) | fwd / bwd per step "
            "| nominal (F+2B)/3 | pass limit | floor | own ms | own × Adam `step()` | × SaLSa |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            salsa = (
                f"{_fmt(r['x_salsa'])} / {_fmt(r['cpu_x_salsa'])} ({r['salsa']})"
                if r["salsa"]
                else ""
            )
            lines.append(
                f"| {r['config']} "
                f"| {r['step_ms']:.1f} ({r['step_ms_min']:.1f}–{r['step_ms_max']:.1f}) "
                f"| **{_fmt(r['x_adam'])}** / **{_fmt(r['cpu_x_adam'])}** "
                f"({_fmt(r['x_adam_min'])}–{_fmt(r['x_adam_max'])}) "
                f"| {r['forwards']:.2f} / {r['backwards']:.2f} "
                f"| {r['nominal']:.2f} "
                f"| {_fmt(r['pass_limit'])} "
                f"| {_fmt(r['floor_x_adam'])} / {_fmt(r['cpu_floor_x_adam'])} "
                f"| {r['own_ms']:.2f} "
                f"| {_fmt(r['own_x_adam'])} / {_fmt(r['cpu_own_x_adam'])} "
                f"| {salsa} |"
            )
        if not _has_memory(result):
            lines.append("")
            continue
        lines += [
            "",
            "| configuration | peak MiB | × Adam | beyond Adam (× P) | optimizer state MiB (× P) "
            "| peak reached in |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['config']} | {r['peak_mib']:.1f} | {_fmt(r['peak_x_adam'])} "
                f"| {_fmt(r['extra_params'], '+.2f')} "
                f"| {r['state_mib']:.1f} ({r['state_params']:.2f}) "
                f"| {r['peak_op'].replace('aten::', '') or '–'} |"
            )
        lines.append("")
    return "\n".join(lines)


def target_rows(result: ModelResult) -> list[dict[str, Any]]:
    """The targets on one model: what, the measured value (wall; CPU time), the limit."""
    rows = {r["config"]: r for r in summarize(result)}
    out = []

    def add(what: str, value: float, cpu: float, limit: float) -> None:
        out.append(
            {"model": result.model, "target": what, "value": value, "cpu": cpu, "limit": limit}
        )

    for name, limit in TIME_TARGETS.items():
        if name in rows:
            r = rows[name]
            add(f"{name}: step ≤ {limit}× Adam", r["x_adam"], r["cpu_x_adam"], limit)
    ours = [n for n in rows if CONFIGS[n].ours]
    for name in ours:
        r = rows[name]
        add(
            f"{name}: own time ≤ {OWN_TARGET:g}× Adam `step()`",
            r["own_x_adam"],
            r["cpu_own_x_adam"],
            OWN_TARGET,
        )
    for name in ours if _has_memory(result) else ():
        r = rows[name]
        add(
            f"{name}: peak ≤ Adam + {MEMORY_TARGET:g} P (× P beyond Adam)",
            r["extra_params"],
            math.nan,
            MEMORY_TARGET,
        )
    for name in ours:
        r = rows[name]
        if r["salsa"] and not math.isnan(r["x_salsa"]):
            add(f"{name}: faster than {r['salsa']} (× SaLSa)", r["x_salsa"], r["cpu_x_salsa"], 1)
    return out


def targets(results: Sequence[ModelResult]) -> str:
    lines = ["| model | target | wall time | CPU time | met |", "|---|---|---|---|---|"]
    for result in results:
        for t in target_rows(result):
            ok = t["value"] <= t["limit"]
            lines.append(
                f"| {t['model']} | {t['target']} | {_fmt(t['value'])} | {_fmt(t['cpu'])} "
                f"| {'yes' if ok else '**no**'} |"
            )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    import os

    info["cpus"] = os.cpu_count()
    with contextlib.suppress(OSError):
        info["load_average"] = os.getloadavg()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(ImportError):
        import importlib.metadata as md

        info["salsa-optimizer"] = md.version("salsa-optimizer")
        info["transformers"] = md.version("transformers")
    return info


def plot(results: Sequence[ModelResult], path: Path) -> None:
    """Bar chart: step time as a multiple of Adam's, split into passes and optimizer time; a
    row for wall time and, for CPU runs, one for CPU time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clocks = ["wall"] + (["cpu"] if all(r.device == "cpu" for r in results) else [])
    fig, axes = plt.subplots(
        len(clocks),
        len(results),
        figsize=(4.2 * len(results), 3.6 * len(clocks)),
        sharey=True,
        squeeze=False,
    )
    for row, clock in enumerate(clocks):
        pre = "" if clock == "wall" else "cpu_"
        for ax, result in zip(axes[row], results, strict=True):
            rows = summarize(result)
            names = [r["config"] for r in rows]
            total = [r[f"{pre}x_adam"] for r in rows]
            passes = [r[f"{pre}passes_x_adam"] for r in rows]
            own = [t - p for t, p in zip(total, passes, strict=True)]
            lo = [t - r[f"{pre}x_adam_min"] for t, r in zip(total, rows, strict=True)]
            hi = [r[f"{pre}x_adam_max"] - t for t, r in zip(total, rows, strict=True)]
            y = list(range(len(rows)))
            ax.barh(y, passes, color="#8fb3d9", label="forward/backward passes")
            ax.barh(y, own, left=passes, color="#d9822b", label="optimizer's own time")
            ax.errorbar(total, y, xerr=[lo, hi], fmt="none", ecolor="black", capsize=2, lw=0.8)
            ax.plot(
                [r[f"{pre}floor_x_adam"] for r in rows],
                y,
                "k|",
                ms=9,
                label="floor: its passes + Adam's own time",
            )
            for name, limit in TIME_TARGETS.items():
                if name in names:
                    i = names.index(name)
                    ax.plot([limit, limit], [i - 0.4, i + 0.4], color="green", lw=2)
            ax.axvline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_yticks(y, names)
            ax.set_title(f"{result.model}: {'wall' if clock == 'wall' else 'CPU'} time")
            ax.set_xlabel("step time / Adam's")
    axes[0][0].invert_yaxis()  # shared by all panels: the first configuration on top
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.suptitle("Step time relative to Adam (median of repeats, min–max bars; green: target)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    results: Sequence[ModelResult],
    out: Path,
    command: str,
    plot_chart: bool,
    host: dict[str, Any] | None = None,
) -> str:
    """``speed.json`` (every measurement), ``speed.md`` (the tables) and ``speed.png``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "machine": host or machine(),
        "results": [
            {
                **{k: v for k, v in asdict(r).items() if k != "measurements"},
                "measurements": {k: asdict(m) for k, m in r.measurements.items()},
                "summary": summarize(r),
            }
            for r in results
        ],
    }
    (out / "speed.json").write_text(json.dumps(payload, indent=1))
    text = "\n".join(
        [
            f"Command: `{command}`",
            "",
            f"Machine: {json.dumps(payload['machine'])}",
            "",
            markdown(results),
            "### Targets",
            "",
            targets(results),
            "",
        ]
    )
    (out / "speed.md").write_text(text)
    if plot_chart:
        plot(results, out / "speed.png")
    return text


def load(path: Path) -> tuple[str, dict[str, Any], list[ModelResult]]:
    """The command, machine and results of a ``speed.json``."""
    payload = json.loads(path.read_text())
    fields = {f for f in Measurement.__dataclass_fields__}
    results = []
    for r in payload["results"]:
        measurements = {
            k: Measurement(**{f: v for f, v in m.items() if f in fields})
            for k, m in r["measurements"].items()
        }
        results.append(
            ModelResult(
                model=r["model"],
                description=r["description"],
                params=r["params"],
                param_bytes=r["param_bytes"],
                buffer_bytes=r["buffer_bytes"],
                measurements=measurements,
                device=r.get("device", "cpu"),
                pass_s=r.get("pass_s", {}),
            )
        )
    return payload["command"], payload["machine"], results
