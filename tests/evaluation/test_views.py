from microsearch.evaluation import audit
from microsearch.evaluation.views import counts, params_markdown, score_line, score_markdown, score_text
from microsearch.models import create_model

AUDIT = {
    "rule": "lab4",
    "passes": 2,
    "params": 1234,
    "nonzero_params": 1000,
    "ops": 56789,
    "params_32bit": 250.0,
    "ops_32bit": 14197.25,
    "param_term": 0.0123456,
    "ops_term": 0.0065432,
    "score": 0.0188888,
    "layers": [
        dict(
            name="stem.0",
            kind="QuantConv2d",
            params=432,
            nonzero=400,
            weight_bits=8,
            act_bits=8,
            bias_bits=8,
            mult_ops=1000,
            add_ops=900,
        ),
    ],
}


def test_one_audit_reads_the_same_in_every_view():
    line = score_line(AUDIT)
    assert line == (
        "score 0.01889 = params 0.01235 + ops 0.00654 (rule lab4, 2 pass(es); "
        "1,234 parameters (1,000 nonzero), 56,789 operations)"
    )
    md = score_markdown(AUDIT)
    assert "| stem.0 | QuantConv2d | 432 | 400 | 7% | 8/8 | 1,900 |" in md and md.endswith(f"**{line}**")
    assert "|---|---|---:|---:|---|---|---:|" in md  # numbers right-aligned
    text = score_text(AUDIT)
    assert counts(AUDIT) in text and "score = 0.0123 (params) + 0.0065 (ops) = 0.0189" in text
    assert params_markdown({"width": 16, "lr": 0.123456}) == (
        "| parameter | value |\n|---|---:|\n| width | 16 |\n| lr | 0.1235 |"
    )


def test_the_views_render_a_real_audit():
    record = audit(create_model("resnet20")).to_dict()
    assert f"{record['params']:,} parameters" in score_line(record)
    assert score_markdown(record).count("\n| ") == len(record["layers"])  # a row per layer below the head
