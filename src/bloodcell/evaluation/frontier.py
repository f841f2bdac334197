"""The frontier report: test accuracy against parameters, FLOPs, CPU inference time and training CPU time.

Our points (mean +- std over seeds) come from the suite's finished runs; the paper's Table 3 models sit on the
parameter and FLOP axes at their published accuracy at 64 px (their times were measured on another machine, so they are
left off the time axes), and the best published BloodMNIST results are horizontal lines. A point is on the
Pareto frontier of an axis when no other of our points is at least as accurate for at most its cost.
"""

from __future__ import annotations

from pathlib import Path

from bloodcell.io import markdown_table, write_json, write_text
from bloodcell.paper import PAPER_SIZE, PUBLISHED_BEST, TABLE3

AXES = (("params", "parameters (trainable)"), ("mflops", "MFLOPs per image (forward)"),
        ("infer_ms", "CPU inference ms per image (batched, this machine)"),
        ("train_cpu_min", "training CPU-minutes (wall x threads, this machine)"))


def model_costs(model: str, size: int) -> tuple[int, float]:
    """Trainable parameters and forward MFLOPs of a registry model at ``size``."""
    from bloodcell.models import count_params_trainable, create_model
    from bloodcell.models.flops import forward_mflops

    m = create_model(model, input_size=size)
    return count_params_trainable(m), forward_mflops(m, size)


def frontier_points(groups: list[dict], size: int) -> list[dict]:
    """One point per group: accuracy mean and std, the four costs (None when not measured)."""
    points = []
    for g in groups:
        params, mflops = model_costs(g["model"], size)
        runs = g["runs"]
        ips = [r["infer_images_per_s"] for r in runs if r.get("infer_images_per_s")]
        cpu_min = [r["total_seconds"] * (r.get("threads") or 1) / 60 for r in runs if r.get("total_seconds")]
        acc, std = g["stats"]["accuracy"]
        points.append({"label": g["label"], "model": g["model"], "seeds": [r["seed"] for r in runs],
                       "accuracy": acc, "accuracy_std": std, "params": params, "mflops": mflops,
                       "infer_ms": round(1000 / (sum(ips) / len(ips)), 4) if ips else None,
                       "train_cpu_min": round(sum(cpu_min) / len(cpu_min), 4) if cpu_min else None})
    for axis, _ in AXES:
        for p in points:
            p[f"pareto_{axis}"] = on_frontier(p, points, axis)
    return points


def on_frontier(p: dict, points: list[dict], axis: str) -> bool | None:
    """No other point is at least as accurate at no more cost and strictly better in one of the two."""
    if p[axis] is None:
        return None
    for q in points:
        if q is p or q[axis] is None:
            continue
        if q["accuracy"] >= p["accuracy"] and q[axis] <= p[axis] and (q["accuracy"] > p["accuracy"]
                                                                       or q[axis] < p[axis]):
            return False
    return True


def paper_points(size: int) -> list[dict]:
    """The paper's Table 3 models at our parameter-exact implementations' costs and the paper's accuracy (at the
    paper's size only: its accuracies say nothing of another size)."""
    if size != PAPER_SIZE:
        return []
    out = []
    for model, (acc, *_rest) in TABLE3.items():
        params, mflops = model_costs(model, size)
        out.append({"label": f"paper {model}", "accuracy": acc, "params": params, "mflops": mflops})
    return out


def frontier_png(points: list[dict], paper: list[dict], size: int, path: Path) -> Path:
    from bloodcell.plotting import plt, save_figure

    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    published = PUBLISHED_BEST.get(size)
    for ax, (axis, xlabel) in zip(axes.flat, AXES):
        ours = sorted((p for p in points if p[axis] is not None), key=lambda p: p[axis])
        for p in ours:
            ax.errorbar(p[axis], p["accuracy"], yerr=p["accuracy_std"] or 0, fmt="o", capsize=3,
                        color="C0" if p[f"pareto_{axis}"] else "C7")
            ax.annotate(p["label"], (p[axis], p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = [p for p in ours if p[f"pareto_{axis}"]]
        if len(front) > 1:
            ax.plot([p[axis] for p in front], [p["accuracy"] for p in front], "-", color="C0", alpha=0.5,
                    label="our Pareto frontier")
        if axis in ("params", "mflops"):
            for p in paper:
                ax.scatter(p[axis], p["accuracy"], marker="x", color="C3", s=20)
            if paper:
                ax.scatter([], [], marker="x", color="C3", label="the paper (Table 3, its settings)")
        if published:
            ax.axhline(published[0], color="C2", linestyle="--", label=f"{published[2]}: {published[0]:.4f}")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"BloodMNIST-like PBC split, {size}x{size}: accuracy against cost (mean +- std over seeds)")
    return save_figure(fig, path)


def frontier_markdown(points: list[dict], size: int) -> str:
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [(p["label"], len(p["seeds"]), f"{p['accuracy']:.4f}" + (f" ± {p['accuracy_std']:.4f}"
                                                                      if p["accuracy_std"] is not None else ""),
             f"{p['params']:,}", num(p["mflops"], ",.1f"), num(p["infer_ms"], ".3f"), num(p["train_cpu_min"], ".1f"),
             ", ".join(a for a, _ in AXES if p[f"pareto_{a}"]) or "-") for p in points]
    published = PUBLISHED_BEST.get(size)
    ref = f"\n\nBest published at {size} px: {published[0]:.4f} ({published[2]}).\n" if published else "\n"
    return (f"## Frontier at {size}x{size}\n\n"
            + markdown_table(["model", "seeds", "test accuracy", "parameters", "MFLOPs", "infer ms/image",
                              "train CPU-min", "Pareto on"], rows)
            + ref + "\n![frontier](frontier.png)\n")


def write_frontier(groups: list[dict], root: str | Path, *, size: int) -> list[str]:
    """FRONTIER.md, frontier.json and frontier.png beside the suite's report; returns the paths written."""
    root = Path(root)
    points = frontier_points(groups, size)
    paper = paper_points(size)
    fig = frontier_png(points, paper, size, root / "frontier.png")
    write_text(root / "FRONTIER.md", frontier_markdown(points, size))
    write_json(root / "frontier.json", {"size": size, "points": points, "paper": paper,
                                        "published_best": PUBLISHED_BEST.get(size)})
    return [str(root / "FRONTIER.md"), str(root / "frontier.json"), str(fig)]
