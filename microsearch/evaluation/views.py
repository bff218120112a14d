"""Text views of the records microsearch stores: an audit (``Score.to_dict()``) and a set of
hyperparameters. The CLI, the trial notes, the Pareto hover text, the report and the model cards
all render from these, so one number reads the same everywhere."""

from typing import Any


def score_terms(audit: dict, digits: int = 5) -> str:
    """``0.01898 = params 0.00412 + ops 0.01486``."""
    return f"{audit['score']:.{digits}f} = params {audit['param_term']:.{digits}f} + ops {audit['ops_term']:.{digits}f}"


def counts(audit: dict) -> str:
    """What was counted: parameters, nonzero ones, operations (every pass)."""
    return f"{audit['params']:,} parameters ({audit['nonzero_params']:,} nonzero), {audit['ops']:,} operations"


def score_line(audit: dict) -> str:
    return f"score {score_terms(audit)} (rule {audit['rule']}, {audit['passes']} pass(es); {counts(audit)})"


def layer_table(audit: dict) -> tuple[list[str], list[list]]:
    """The layers of an audit as table headers and rows."""
    head = ["layer", "kind", "params", "nonzero", "sparsity", "bits w/a", "ops"]
    rows = [
        [
            x["name"],
            x["kind"],
            x["params"],
            x["nonzero"],
            f"{1 - x['nonzero'] / x['params']:.0%}" if x["params"] else "",
            f"{x['weight_bits']}/{x['act_bits']}",
            x["mult_ops"] + x["add_ops"],
        ]
        for x in audit["layers"]
    ]
    return head, rows


def cell(value: Any) -> str:
    """One table cell: floats to 4 significant digits, integers with thousands separators."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(head: list[str], rows: list[list]) -> str:
    """Numbers right-aligned, everything else left-aligned (by the first row's cells)."""
    align = ["---:" if rows and isinstance(v, int | float) and not isinstance(v, bool) else "---" for v in rows[0]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align or ["---"] * len(head)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def score_markdown(audit: dict) -> str:
    """The audit in markdown: one row per layer, then the score, its terms and the counts."""
    return markdown_table(*layer_table(audit)) + f"\n\n**{score_line(audit)}**"


def score_text(audit: dict) -> str:
    """The audit as a fixed-width table for a terminal."""
    head = f"{'layer':<28} {'kind':<16} {'params':>9} {'nonzero':>9} {'w/a/b bits':>10} {'ops':>12}"
    rows = [head, "-" * len(head)]
    for x in audit["layers"]:
        bits = f"{x['weight_bits']}/{x['act_bits']}/{x['bias_bits']}"
        ops = x["mult_ops"] + x["add_ops"]
        rows.append(f"{x['name']:<28} {x['kind']:<16} {x['params']:>9,} {x['nonzero']:>9,} {bits:>10} {ops:>12,}")
    rows += [
        "-" * len(head),
        f"rule {audit['rule']}, {audit['passes']} forward pass(es) per image",
        counts(audit),
        f"32-bit equivalents: params {audit['params_32bit']:,.1f}, ops {audit['ops_32bit']:,.1f}",
        f"score = {audit['param_term']:.4f} (params) + {audit['ops_term']:.4f} (ops) = {audit['score']:.4f}",
    ]
    return "\n".join(rows)


def params_markdown(params: dict[str, Any]) -> str:
    """A trial's hyperparameters as a markdown table."""
    return markdown_table(["parameter", "value"], [[k, v] for k, v in params.items()])


def params_inline(params: dict[str, Any], width: int = 0) -> str:
    """``width=16, lr=0.2, ...``; wrapped into lines of ``width`` characters (HTML breaks) if given."""
    text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return "<br>".join(text[i : i + width] for i in range(0, len(text), width)) if width else text
