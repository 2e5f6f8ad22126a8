"""Render the committed benchmark JSON as the tables of docs/benchmarks.md.

    .venv/bin/python bench/report.py            # rewrite the tables in docs/benchmarks.md
    .venv/bin/python bench/report.py --check    # exit 1 if a table differs from its JSON

docs/benchmarks.md marks each generated table with a pair of comments naming its JSON file
(relative to docs/benchmarks/):

    <!-- table: results/catalog_scale.json -->
    ...generated...
    <!-- end table -->

Everything between the two comments is replaced; the rest of the page is left as written. A table
whose file is not there yet says "Not yet measured". Each file
is rendered by its benchmark's renderer, chosen by the file's ``benchmark`` field (bench/results.py)
or, for the files train_throughput.py and serve_load.py write, by the start of the file name.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks.md"
BLOCK = re.compile(r"(<!-- table: (?P<file>\S+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)


def table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line(doc: dict) -> str:
    m = doc.get("machine", {})
    return (
        f"Measured {doc.get('date', '(date not recorded)')} on {m.get('cpus', '?')} CPUs "
        f"({m.get('processor', '?')}, {m.get('platform', '?')}, Python {m.get('python', '?')}), "
        f"1-minute load average {m.get('load_average_1min', '?')} at the end. Command:\n\n"
        f"```bash\n{doc.get('command', '(not recorded)')}\n```"
    )


def catalog_scale(doc: dict) -> str:
    r = doc["results"]
    rows = [[step, f"{seconds:.1f}"] for step, seconds in r["seconds"].items()]
    return (
        f"{r['rows']:,} synthetic header rows; peak resident memory {r['peak_rss_mib']:,} MiB.\n\n"
        + table(["step", "seconds"], rows)
    )


def preprocess_throughput(doc: dict) -> str:
    r = doc["results"]
    s = r["settings"]
    workers = s["workers"]
    rows = [
        [
            x["transfer_syntax"],
            f"{x['mb_per_image']:.2f}",
            f"{x['decode_ms']:.1f}",
            f"{x['preprocess_ms']:.1f}",
            f"{x['png_ms']:.1f}",
            f"{x['full_over_decode']:.2f}",
            f"{x['scaling']:.2f}×",
        ]
        for x in r["syntaxes"]
    ]
    header = ["transfer syntax", "MB/image", "decode ms", "preprocess ms", "PNG ms", "full ÷ decode"]
    return (
        f"{s['n']} images of {s['cols']}×{s['rows']} per syntax, best of {s['repeat']}, "
        f"pydicom {s['pydicom']}.\n\n" + table([*header, f"{workers} processes ÷ 1"], rows)
    )


def retrieval_throughput(doc: dict) -> str:
    r = doc["results"]
    rows = []
    for x in r["rows"]:
        low, high = x["images_per_s_range"]
        spread = f" ({low:.1f}–{high:.1f})" if r["rounds"] > 1 else ""
        ratio = "–"
        if x["over_dcmtk"] is not None:
            ratio = f"{x['over_dcmtk']:.2f}"
            if r["rounds"] > 1:
                ratio += f" ({x['over_dcmtk_range'][0]:.2f}–{x['over_dcmtk_range'][1]:.2f})"
        count = str(x["instances"]) if x["complete"] else f"{x['instances']} of {x['expected']}"
        cpu = "–" if x["cpu_ms_per_instance"] is None else f"{x['cpu_ms_per_instance']:.1f}"
        rows.append([x["method"], x["associations"], count, f"{x['images_per_s']:.1f}{spread}", ratio, cpu])
    header = ["method", "associations", "instances", "images/s", "÷ dcmtk, same round", "our CPU ms/instance"]
    notes = [f"- {x['method']} ({x['associations']}): {note}" for x in r["rows"] for note in x["notes"]]
    what = f"{r['instances']} instances in {r['studies']} studies ({r['data']}, {r['source_mb']} MB)"
    parts = []
    if r.get("planning"):
        planning = [
            [
                x["planner"],
                f"{x['studies_per_s']:.0f}",
                f"{x['range'][0]:.0f}–{x['range'][1]:.0f}",
                x["seconds"],
            ]
            for x in r["planning"]
        ]
        parts.append(
            f"Planning {r['studies']} studies ({r['data']}), {r['planning_runs']} run(s) each:\n\n"
            + table(["planner", "studies/s (median)", "range", "seconds"], planning)
        )
    if rows:
        plan = ""
        if r.get("plan_seconds") is not None:
            plan = f"; the C-FIND plan took {r['plan_seconds']} s"
            if r.get("dicomweb_plan_seconds") is not None:
                plan += f" (the QIDO-RS plan {r['dicomweb_plan_seconds']} s)"
            plan += " and is not in the rows"
        parts.append(
            f"{what}, {r['rounds']} round(s){plan}.\n\n"
            + table(header, rows)
            + ("\n\n" + "\n".join(notes) if notes else "")
        )
    return "\n\n".join(parts)


def train_throughput(doc: dict) -> str:
    s = doc["settings"]
    rows = []
    for mode, x in doc["results"].items():
        idle = x.get("gpu_idle_fraction")
        rows.append(
            [
                mode,
                f"{x['images_per_s']:.1f}",
                f"{x['step_ms']:.1f}",
                f"{100 * x['data_wait_fraction']:.1f}%",
                "–" if idle is None else f"{100 * idle:.1f}%",
            ]
        )
    source = f"shards {s['shards']}" if s.get("shards") else "synthetic input"
    return (
        f"{s['arch']}, {s['image_size']} px, batch {s['batch_size']}, {source}, {s['steps']} timed steps "
        f"after {s['warmup']}, device {s['device']} ({doc.get('device_name', '?')}, "
        f"{doc.get('cpu_count', '?')} CPUs), torch {doc.get('torch', '?')}.\n\n"
        + table(["mode", "images/s", "ms/step", "waiting for data", "GPU idle"], rows)
    )


def serve_load(doc: dict) -> str:
    rows = [
        [
            x["mode"],
            f"{x['images_per_s']:.2f}",
            f"{x.get('p50_ms', float('nan')):.0f}",
            f"{x.get('p99_ms', float('nan')):.0f}",
        ]
        for x in doc["results"]
    ]
    settings = doc.get("settings", {})
    model = settings.get("synthetic") or settings.get("checkpoint")
    ratios = (("batched_over_direct", "batched ÷ direct"), ("gated_over_ungated", "gated ÷ ungated bone age"))
    after = "".join(f"\n\n{label}: {doc[key]:.2f}" for key, label in ratios if doc.get(key) is not None)
    return (
        f"model {model}, {settings.get('clients')} clients, device {settings.get('device')}.\n\n"
        + table(["mode", "images/s", "p50 ms", "p99 ms"], rows)
        + after
    )


def cluster_scaling(doc: dict) -> str:
    r = doc["results"]
    rows = []
    for name, stage in r["stages"].items():
        key = "total_s" if name == "dask" else "images_per_s"
        one, two = stage["runs"]["1"][key], stage["runs"]["2"][key]
        figure = "seconds" if name == "dask" else "images/s"
        verdict = "met" if stage["ratio"] >= r["goals"][name] else "not met"
        rows.append([name, stage["unit"], f"{one:.2f} {figure}", f"{two:.2f} {figure}",
                     f"{stage['ratio']:.2f}×", f"≥ {r['goals'][name]}× ({verdict})"])  # fmt: skip
    return table(["stage", "units", "1 unit", "2 units", "2 ÷ 1", "goal"], rows)


def decode_levels(doc: dict) -> str:
    r = doc["results"]
    s = r["settings"]
    rows = [
        [
            name.split(" ")[0],
            f"{row['noise']:g}",
            row["ms_per_image"]["full"],
            row["ms_per_image"]["reduced"],
            f"{row['speedup']:.1f}×",
            f"{row['mad_mean']:.2f} (max {row['mad_max']:.2f})",
            f"{row['psnr_min_db']:.1f}",
        ]
        for name, row in r["rows"].items()
    ]
    header = ["transfer syntax", "noise σ", "full ms", "reduced ms", "speed-up", "MAD", "min PSNR dB"]
    return f"{s['n']} images of {s['cols']}×{s['rows']} per row, to {s['size']} px.\n\n" + table(header, rows)


def text_mask(doc: dict) -> str:
    r = doc["results"]
    rows = [
        ["text pixels masked", f"{100 * r['text_pixels_masked']:.1f}%"],
        ["non-background, non-text pixels lost (images with text)", f"{100 * r['anatomy_pixels_lost']:.2f}%"],
        [
            "non-background pixels lost (the same images without text)",
            f"{100 * r['anatomy_pixels_lost_without_text']:.2f}%",
        ],
        ["images with ≥ 90% of their text masked", f"{r['images_text_masked_90pct']} of {r['images']}"],
        ["detector time per image", f"{r['detector_ms_per_image']:.0f} ms"],
    ]
    return (
        f"{r['images']} phantom images ({r['studies']} studies), preprocessed to {r['size']} px.\n\n"
        + table(["measure", "value"], rows)
    )


def decode_agreement(doc: dict) -> str:
    r = doc["results"]
    rows = [
        ["samples (JPEG 2000 among them)", f"{r['samples']} ({r['jpeg2000_samples']})"],
        ["same label, all samples", f"{100 * r['same_label']:.1f}%"],
        ["same label, JPEG 2000 samples", f"{100 * r['same_label_jpeg2000']:.1f}%"],
        ["model inputs' mean absolute difference, JPEG 2000", f"{r['input_mad_jpeg2000']:.2f} grey levels"],
    ]
    return f"{r['granularity']}-class view model `{r['checkpoint']}`, the `{r['split']}` split.\n\n" + table(
        ["measure", "value"], rows
    )


def bone_age_rejection(doc: dict) -> str:
    r = doc["results"]
    rows = [
        [f"{100 * x['rejected']:.0f}%", x["kept"], f"{x['mae_kept']:.1f}", f"{x['sd_threshold']:.1f}"]
        for x in r["curve"]
    ]
    return (
        f"`{r['checkpoint']}`, {r['images']} test images, {r['tta']} test-time views; correlation of the "
        f"SD with the absolute error r = {r['sd_error_correlation']:.2f}; MAE of the same model's "
        f"single-view answers {r['mae_single_view']:.1f} months.\n\n"
        + table(["declined", "kept", "MAE of those kept (months)", "declined above SD (months)"], rows)
    )


RENDERERS: dict[str, Callable[[dict], str]] = {
    "bone_age_rejection": bone_age_rejection,
    "catalog_scale": catalog_scale,
    "cluster_scaling": cluster_scaling,
    "decode_agreement": decode_agreement,
    "decode_levels": decode_levels,
    "preprocess_throughput": preprocess_throughput,
    "retrieval_throughput": retrieval_throughput,
    "train_throughput": train_throughput,
    "serve_load": serve_load,
    "text_mask": text_mask,
}


def render(path: Path) -> str:
    if not path.exists():
        return f"*Not yet measured*: no `{path.name}` committed; the command above writes it.\n"
    doc = json.loads(path.read_text())
    name = doc.get("benchmark") or next((n for n in RENDERERS if path.name.startswith(n)), None)
    if name not in RENDERERS:
        raise ValueError(f"{path}: no renderer for it; name it after its benchmark ({sorted(RENDERERS)})")
    body = RENDERERS[name](doc)
    if "machine" in doc:
        body += "\n\n" + machine_line(doc)
    return body + "\n"


def rendered_page(text: str, base: Path) -> str:
    return BLOCK.sub(lambda m: m[1] + render(base / m["file"]) + m[4], text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--page", type=Path, default=PAGE, help="default docs/benchmarks.md")
    parser.add_argument("--check", action="store_true", help="only check that the page is up to date")
    args = parser.parse_args(argv)
    text = args.page.read_text()
    new = rendered_page(text, args.page.parent / "benchmarks")
    if args.check:
        if new != text:
            print(f"{args.page} is out of date: run python bench/report.py", file=sys.stderr)
            return 1
        return 0
    args.page.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
