"""Multi-stage experiments (Relay Diffusion): one YAML, several runs, then the evaluation of the last.

An experiment with a ``pipeline:`` section is a pipeline. Its file holds the shared sections (``run``,
``data``, ``trainer``, ``callbacks``, merged underneath every stage as usual) and, under ``stages:``,
one section per stage that completes it into an ordinary run config (``base: <experiment>`` in a
stage section starts it from that experiment file, e.g. ``edm_celeba64`` as Relay's stage 1):

    pipeline: {parts: [stage1, stage2, evaluate], only: null}
    stages: {stage1: {data: {resolution: 64}, module: ...}, stage2: {...}}
    evaluate: {n: 50000, ...}       # keyword arguments of experiments.evaluate.evaluate_run

Stage ``s`` runs as experiment ``<experiment>/<s>`` into ``<run.root>/<experiment>/<s>/<run.name>``; its
config gets ``pipeline.name`` / ``pipeline.stage`` so a stage can name another's folder
(``${run.root}/${pipeline.name}/stage1/${run.name}``). Interpolations resolve inside each stage's own
config (``${data.resolution}`` is the stage's). The ``evaluate`` part evaluates the last stage's run
and writes ``pipeline_metrics.json`` there: the record with the cost of all stages together.

Parts run in order; each resumes (a stage is an ordinary run: a finished one only checks its final
outputs; the evaluation's chunks are cached), and a finished evaluation is skipped. Stages are
independent runs, so a cluster may run them at once. Overrides: ``stages.<s>.<key>=v`` reaches one
stage (and wins over a general one), ``evaluate.<key>=v`` the evaluation, ``pipeline.only=<part>``
selects one part, and any other ``key=v`` reaches every stage that has the key (an error if none has it).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from freqdiff.config import ConfigError, apply_overrides, load, resolve_config

SHARED_ONLY = ("pipeline", "stages", "evaluate")  # sections of the pipeline file that are not run config


def is_pipeline(exp: str) -> bool:
    return "pipeline" in load(exp, resolve=False)


def _split(overrides: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(the pipeline file's own overrides, stage-specific ``stages.<s>.*`` ones, general ones)."""
    head = lambda o: o.lstrip("+").split(".", 1)[0]  # noqa: E731
    staged = [o for o in overrides if head(o) == "stages"]
    own = [o for o in overrides if head(o) in SHARED_ONLY and o not in staged]
    return own, staged, [o for o in overrides if o not in own and o not in staged]


def _has(cfg: DictConfig, override: str) -> bool:
    key = override.split("=", 1)[0]
    if key.startswith("+"):
        return True
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and last in node.keys()  # a missing value (???) is still a key


def load_pipeline(exp: str, overrides: list[str] | None = None) -> tuple[DictConfig, dict[str, DictConfig]]:
    """(the pipeline file with its own overrides, {stage: resolved run config})."""
    own, staged, general = _split(list(overrides or []))
    raw = load(exp, own, resolve=False)
    for o in staged:  # applied to the merged stage below (the key may come from a stage's base file)
        name = o.lstrip("+").split(".")[1] if o.count(".") >= 2 else ""
        if name not in raw.stages:
            raise ConfigError(f"{o.split('=', 1)[0]}: no stage {name!r} (stages: {', '.join(raw.stages)})")
    parts = list(raw.pipeline.parts)
    stages = [p for p in parts if p != "evaluate"]
    unknown = [s for s in stages if s not in raw.stages]
    if unknown:
        raise ConfigError(
            f"pipeline.parts: {unknown[0]!r} has no section under stages: ({', '.join(raw.stages)})"
        )
    if raw.pipeline.get("only") not in (None, *parts):
        raise ConfigError(
            f"pipeline.only={raw.pipeline.only!r}: expected one of {', '.join(parts)} (or null)"
        )
    shared = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k not in SHARED_ONLY])
    out = {}
    for s in stages:
        OmegaConf.set_struct(shared, False)
        section = raw.stages[s]
        if "base" in section:  # a stage may start from another experiment file (edm_celeba64 as stage 1)
            base = load(str(section.base), resolve=False)
            base = OmegaConf.masked_copy(base, [k for k in base.keys() if k != "experiment"])
            section = OmegaConf.merge(
                base, OmegaConf.masked_copy(section, [k for k in section if k != "base"])
            )
        cfg = OmegaConf.merge(shared, section)
        cfg.experiment = f"{raw.experiment}/{s}"
        cfg.pipeline = {"name": str(raw.experiment), "stage": s}
        OmegaConf.set_struct(cfg, True)
        cfg = apply_overrides(cfg, [o for o in general if _has(cfg, o)])
        mine = [o for o in staged if o.lstrip("+").startswith(f"stages.{s}.")]  # a stage's own key wins
        cfg = apply_overrides(
            cfg, [("+" if o.startswith("+") else "") + o.lstrip("+")[len(f"stages.{s}.") :] for o in mine]
        )
        out[s] = resolve_config(cfg, f"{exp} (stage {s})")
    for o in general:
        if not any(_has(c, o) for c in out.values()):
            raise ConfigError(
                f"{o.split('=', 1)[0]}: no stage of {exp} has this key (stages.<stage>.<key> for one)"
            )
    return raw, out


def evaluation_done(run_dir: Path, kwargs: dict) -> Path | None:
    """The finished evaluation record of ``run_dir`` for these ``evaluate_run`` arguments, if any (its
    name holds the checkpoint steps, so a retrained stage is evaluated again)."""
    from experiments.evaluate import record_path

    path = record_path(str(run_dir), **kwargs)
    return path if path.is_file() else None


def run_pipeline(
    exp: str, overrides: list[str] | None = None, dry: bool = False, callbacks: list | None = None
) -> dict:
    """Run the parts of a pipeline experiment in order (or ``pipeline.only``); returns {part: result}.

    ``callbacks`` are added to every stage's trainer (the cluster job's requeue callback)."""
    from experiments.runner import run

    raw, stages = load_pipeline(exp, overrides)
    parts = [p for p in raw.pipeline.parts if raw.pipeline.get("only") in (None, p)]
    if dry:
        for s, cfg in stages.items():
            print(f"# ---- stage {s}: {cfg.run.root}/{cfg.experiment}/{cfg.run.name}")
            print(OmegaConf.to_yaml(cfg), end="")
        print("# ---- evaluate\n" + OmegaConf.to_yaml(raw.evaluate, resolve=True), end="")
        return {}
    results = {}
    for part in parts:
        if part == "evaluate":
            results[part] = _evaluate(raw, stages)
            continue
        print(f"==== {raw.experiment}: {part} ({parts.index(part) + 1} of {len(parts)})", flush=True)
        cfg = stages[part]
        if cfg.data.get("resolution", 0) is None:
            raise ConfigError(f"stages.{part}.data.resolution: a stage must name its resolution")
        out = run(cfg, callbacks=callbacks, data_note="set in the stage's config")
        results[part] = {"run_dir": out["run_dir"]}
        del out  # the trained module, optimiser state and trainer: free them before the next part
        gc.collect()
    return results


def _evaluate(raw: DictConfig, stages: dict[str, DictConfig]) -> dict:
    from experiments.evaluate import evaluate_run
    from experiments.rundir import run_dir_for

    last = list(stages)[-1]
    run_dir = run_dir_for(stages[last])
    kwargs = OmegaConf.to_container(raw.evaluate, resolve=True)
    print(f"==== {raw.experiment}: evaluate {run_dir} (the {len(stages)}-stage sampler)", flush=True)
    panel = kwargs.pop("panel", 0)  # seeds shown stage by stage in <run>/stages.png
    done = evaluation_done(run_dir, kwargs)
    if done is not None:
        print(f"evaluate: already done ({done}); delete it to recompute")
        record = json.loads(done.read_text())
    else:
        record = evaluate_run(str(run_dir), **kwargs)
    if panel and not (run_dir / "stages.png").is_file():
        write_stages_panel(run_dir, int(panel))
    from experiments.evaluate import record_path

    path = record_path(str(run_dir), **kwargs)  # its .npz beside it: samples and spectra for compare
    if done is None or not (run_dir / "pipeline_metrics.json").is_file():
        log_scalars(run_dir, record)
    write_pipeline_metrics(
        run_dir,
        {**record, "record_file": os.path.relpath(path, run_dir)},
        {s: run_dir_for(c) for s, c in stages.items()},
    )
    return record


def _peak_here(kind: str | None) -> int:
    import torch

    from callbacks.cost import peak_memory

    if kind == "cuda_max_allocated" and torch.cuda.is_available():
        return peak_memory(torch.device("cuda"))[0]
    return peak_memory(torch.device("cpu"))[0] if kind == "cpu_rss" else 0


def log_scalars(run_dir: Path, record: dict) -> None:
    """The evaluation as TensorBoard scalars of the last stage's run (``eval/<metric>``,
    ``eval/floor/<metric>`` at its step), so the board's comparison charts show the pipeline too."""
    from torch.utils.tensorboard import SummaryWriter

    step = int(record.get("step") or 0)
    with SummaryWriter(str(run_dir), filename_suffix=".pipeline_eval") as w:
        for prefix, values in (("eval", record.get("metrics")), ("eval/floor", record.get("floor"))):
            for k, v in (values or {}).items():
                w.add_scalar(f"{prefix}/{k}", float(v), step)


COST_SUMS = ("params", "images_seen", "train_seconds")


def write_pipeline_metrics(run_dir: Path, record: dict, stage_dirs: dict[str, Path]) -> Path:
    """``<last stage>/pipeline_metrics.json``: the pipeline's evaluation record with the cost of all its
    stages together (``cost``: parameters, images seen and training seconds summed, FLOPs per image
    weighted by each stage's images, peak memory the largest of the stages' and of this process, which
    ran the evaluation, as a single-stage run's includes its own) and each stage's (``stage_costs``),
    so ``experiments.compare`` sets the whole pipeline against single-stage methods."""
    from callbacks.cost import read_cost, write_json

    costs = {s: read_cost(Path(d)) or {} for s, d in stage_dirs.items()}
    total: dict = {}
    if costs and all(c.get(k) is not None for c in costs.values() for k in COST_SUMS):
        total = {k: sum(c[k] for c in costs.values()) for k in COST_SUMS}
        flops = [c.get("flops_per_image") for c in costs.values()]
        total["flops_per_image"] = (
            sum(f * c["images_seen"] for f, c in zip(flops, costs.values())) / max(total["images_seen"], 1)
            if all(f is not None for f in flops)
            else None
        )
        total["img_per_s"] = total["images_seen"] / max(total["train_seconds"], 1e-9)
        kind = next(iter(costs.values())).get("peak_memory_kind")
        here = _peak_here(kind)  # this process's peak: the evaluation's too, as a single-stage run's
        total["peak_memory_bytes"] = max([c.get("peak_memory_bytes") or 0 for c in costs.values()] + [here])
        total["peak_memory_kind"] = kind
    total.update(sampler=record.get("sampler"), nfe=record.get("nfe"))
    out = {**record, "stages": {s: str(d) for s, d in stage_dirs.items()}, "cost": total}
    out["stage_costs"] = costs
    path = Path(run_dir) / "pipeline_metrics.json"
    write_json(path, out)  # atomic
    return path


def write_stages_panel(run_dir: Path, n: int) -> Path:
    """``<run>/stages.png``: for seeds 0..n−1, what each stage made (rows of a module's ``sample_stages``)."""
    import torch

    from freqdiff.analysis.images import make_grid, save_png, side_by_side
    from freqdiff.checkpoints import load_run

    module, _ = load_run(run_dir)
    with torch.no_grad():
        sets = module.sample_stages(list(range(n)))  # {label: [n, C, H_k, W_k]}
    side = max(x.shape[-1] for x in sets.values())
    up = max(1, 128 // side)  # small images are shown enlarged (nearest)
    panels = {k: make_grid(x, upscale=up * side // x.shape[-1]) for k, x in sets.items()}
    path = save_png(side_by_side(panels), run_dir / "stages.png")
    print(f"wrote {path}")
    return path
