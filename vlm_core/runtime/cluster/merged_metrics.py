"""Several replicas' `/metrics` pages as one, each series labelled with the replica that reported it.

Prometheus refuses a page where one metric family appears twice, so the families of every replica are
joined under one HELP/TYPE header, and each sample gains ``replica="<id>"``: a dashboard sums over the label
for the application, or splits by it per replica.

    text = merge({"r1": page_of_r1, "r2": page_of_r2})
"""
from __future__ import annotations

import math


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def merge(pages: dict) -> str:
    """{replica id: Prometheus text page} -> one page in the text format (0.0.4)."""
    from prometheus_client.parser import text_string_to_metric_families

    families: dict = {}  # name -> (type, help, [lines])
    for replica, text in pages.items():
        for family in text_string_to_metric_families(text):
            name = family.name + "_total" if family.type == "counter" else family.name
            _, _, lines = families.setdefault(name, (family.type, family.documentation, []))
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # creation times: per process, no use summed over replicas
                labels = {**sample.labels, "replica": replica}
                rendered = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                lines.append(f"{sample.name}{{{rendered}}} {_number(sample.value)}")
    out = []
    for name, (kind, documentation, lines) in families.items():
        out.append(f"# HELP {name} {documentation}")
        out.append(f"# TYPE {name} {kind if kind != 'unknown' else 'untyped'}")
        out.extend(lines)
    return "\n".join(out) + "\n"
