"""Smoke test of `ultramem bench decode --quick`: every output line is JSON, the cases of every scope
and kind are present with their fields, the derived baselines match UltraMem's parameters and FLOPs,
ratio and target lines are well formed, --out holds the same lines and --plot writes the charts.
No timing assertions (speed is not tested).

Usage: bench_decode_smoke.py PATH/TO/ultramem
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

CASE_FIELDS = ["case", "kind", "batch", "N", "Dv", "dtype", "latency_us", "latency_min_us", "latency_max_us",
               "repeats", "tokens_per_s", "bytes_per_token", "gbps", "eff_seq"]
TARGETS = ["faster than MoE", "within 1.5x of the smallest N", "of the dense FFN", "plain libtorch ops",
           ">= 10x faster than plain libtorch ops", "gather bandwidth", ">= 80% of the random-row gather",
           ">= 60% of the random-row gather"]


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def positive_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def main():
    if len(sys.argv) != 2:
        fail("usage: bench_decode_smoke.py PATH/TO/ultramem")
    um = sys.argv[1]
    work = tempfile.mkdtemp(prefix="bench_decode_")
    try:
        out_file = os.path.join(work, "decode.jsonl")
        plot_dir = os.path.join(work, "plots")
        have_gnuplot = shutil.which("gnuplot") is not None
        cmd = [um, "--threads", "1", "bench", "decode", "--quick", "--out", out_file]
        if have_gnuplot:
            cmd += ["--plot", plot_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        check(proc.returncode == 0, "exit code %d, stderr: %s" % (proc.returncode, proc.stderr[-2000:]))
        lines = [l for l in proc.stdout.splitlines() if l.strip()]
        check(len(lines) > 10, "too little output: %r" % proc.stdout[:500])
        records = []
        for l in lines:
            try:
                records.append(json.loads(l))
            except ValueError:
                fail("not a JSON line: %r" % l)
        with open(out_file) as f:
            check([json.loads(l) for l in f if l.strip()] == records, "--out file differs from stdout")

        check("context" in records[0] and records[0]["threads"] == 1, "first line is not the context line")
        check("context_end" in records[-1], "last line is not context_end")
        check(not any("skipped" in r for r in records), "quick sweep skipped a case: %r" %
              [r for r in records if "skipped" in r])

        seq = [r for r in records if r.get("bandwidth") == "sequential_read"]
        gather = [r for r in records if r.get("bandwidth") == "random_row_gather"]
        check(len(seq) == 2 and all(positive_number(r["gbps"]) for r in seq), "sequential read lines")
        check(gather and all(positive_number(r["gbps"]) and r["row_bytes"] % 64 == 0 for r in gather),
              "random-row gather lines")
        check({r["pages"] for r in gather} == {"4k", "value_table"}, "gather on both page kinds")

        cases = [r for r in records if "case" in r and "latency_us" in r]
        for r in cases:
            for k in CASE_FIELDS:
                check(k in r, "case line lacks %s: %r" % (k, r))
            check(r["latency_min_us"] <= r["latency_us"] <= r["latency_max_us"], "min <= median <= max: %r" % r)
            for k in ["latency_us", "tokens_per_s", "bytes_per_token", "gbps"]:
                check(positive_number(r[k]), "%s not positive: %r" % (k, r))
            check(abs(r["tokens_per_s"] - r["batch"] / (r["latency_us"] * 1e-6)) <= 1e-6 * r["tokens_per_s"],
                  "tokens/s is batch / latency: %r" % r)
        have = {(r["case"], r["kind"], r["dtype"]) for r in cases}
        want = {("layer", k, "fp32") for k in ["ultramem", "ultramem_plain", "moe", "dense", "pkm"]}
        want |= {("layer", "ultramem", d) for d in ["bf16", "int8"]}
        want |= {("pool", "pooled_lookup", d) for d in ["fp32", "bf16", "int8"]}
        want |= {("model", k, "fp32") for k in ["ultramem", "moe", "dense", "pkm"]}
        want |= {("model", "ultramem", d) for d in ["bf16", "int8"]}
        want |= {("model", "ultramem_v2", "fp32")} | {("model", "engram", d) for d in ["fp32", "bf16", "int8"]}
        check(want <= have, "missing cases: %r" % sorted(want - have))
        batches = records[0]["batches"]
        sizes = [1 << l for l in records[0]["log2_sizes"]]
        for scope, kind, dt in want:
            if scope != "layer":
                continue
            got = {(r["batch"], r["N"]) for r in cases if (r["case"], r["kind"], r["dtype"]) == (scope, kind, dt)}
            check(got == {(b, n) for b in batches for n in sizes}, "%s/%s/%s sweep incomplete: %r" %
                  (scope, kind, dt, sorted(got)))
        for r in cases:
            if r["case"] == "pool":
                check(all(positive_number(r[k]) for k in ["eff_gather", "gather_now_gbps", "gather_ref_gbps"]),
                      "pool efficiency: %r" % r)

        # Derived sizes: MoE at UltraMem's total params and FLOPs (within 5%: few experts at the quick
        # sizes), dense at its FLOPs (within 2%).
        layer_cfgs = [r["config"] for r in records if "config" in r and r["config"].get("scope") == "layer"]
        check(len(layer_cfgs) == len(sizes), "one layer config line per N")
        for c in layer_cfgs:
            u, moe, dense = c["ultramem"]["cost"], c["moe"]["cost"], c["dense"]["cost"]
            check(abs(moe["params"] / u["params"] - 1) < 0.05, "MoE total params: %r" % c)
            check(abs(moe["flops_per_token"] / u["flops_per_token"] - 1) < 0.05, "MoE FLOPs: %r" % c)
            check(abs(dense["flops_per_token"] / u["flops_per_token"] - 1) < 0.02, "dense FLOPs: %r" % c)
            check(c["pkm"]["N"] == c["ultramem"]["N"] and c["pkm"]["Dv"] == c["ultramem"]["Dv"], "PKM rows: %r" % c)
        model_cfgs = [r["config"] for r in records if "config" in r and r["config"].get("scope") == "model"]
        check(model_cfgs, "model config line")
        for c in model_cfgs:
            u = c["ultramem_cost"]
            check(abs(c["moe_cost"]["params"] / u["params"] - 1) < 0.05, "MoE model params: %r" % c)
            check(abs(c["moe_cost"]["flops_per_token"] / u["flops_per_token"] - 1) < 0.05, "MoE model FLOPs")
            check(abs(c["dense_cost"]["flops_per_token"] / u["flops_per_token"] - 1) < 0.02, "dense model FLOPs")
            # UltraMemV2 and Engram (issue 19) at the UltraMem model's FLOPs; Engram's tables hold as many values.
            for k in ("ultramem_v2", "engram"):
                check(abs(c[k + "_cost"]["flops_per_token"] / u["flops_per_token"] - 1) < 0.02, "%s model FLOPs" % k)
            check(abs(c["engram_cost"]["params"] / u["params"] - 1) < 0.10, "Engram model params: %r" % c)

        checks = [r for r in records if r.get("check") == "fused_vs_plain"]
        check(len(checks) == len(sizes), "one fused-vs-plain check per N")
        for c in checks:
            check(c["max_abs"] > 0 and c["max_abs_diff"] <= 1e-4 * max(1.0, c["max_abs"]),
                  "fused and plain-ops UltraMem differ: %r" % c)

        ratios = [r for r in records if "ratio" in r]
        names = {r["ratio"] for r in ratios}
        for n in ["layer:moe_over_ultramem", "layer:ultramem_over_dense", "layer:plain_over_fused",
                  "layer:ultramem_large_over_small_N", "model:moe_over_ultramem", "model:prefetch_off_over_on",
                  "model:engram_prefetch_off_over_on",
                  "model:ultramem_v2_over_ultramem_fp32", "model:ultramem_v2_over_ultramem_int8",
                  "model:engram_over_ultramem_int8", "model:ultramem_v2_over_ultramem_paired",
                  "model:engram_over_ultramem_paired"]:
            check(n in names, "missing ratio %s" % n)
        check(all(positive_number(r["value"]) for r in ratios), "ratio values positive")
        targets = [r for r in records if "target" in r]
        for t in TARGETS:
            hits = [r for r in targets if t in r["target"]]
            check(hits, "missing target line: %s" % t)
            check(any(isinstance(r["met"], bool) for r in hits), "target never evaluated: %s" % t)
            for r in hits:
                check("threshold" in r and (r["met"] is None or
                                            (isinstance(r["met"], bool) and positive_number(r["value"]))),
                      "target line malformed: %r" % r)

        if have_gnuplot:
            plots = [r for r in records if "plots" in r]
            check(plots, "no plots line")
            for p in plots[0]["plots"]:
                check(os.path.getsize(p) > 1000, "chart %s is missing or empty" % p)
                with open(p, "rb") as f:
                    check(f.read(8) == b"\x89PNG\r\n\x1a\n", "chart %s is not a PNG" % p)
            # The house chart style: legends outside the data, and each series (kind and value format)
            # with its own line style, the same in every panel.
            with open(os.path.join(plot_dir, "decode.gp")) as f:
                gp = f.read()
            check("set key outside" in gp, "decode.gp: legend not outside the data")
            styles = {}
            for m in re.finditer(r"with yerrorlines linestyle (\d+) title '([^']+)'", gp):
                styles.setdefault(m.group(2), set()).add(m.group(1))
            check(len(styles) >= 5, "decode.gp: too few styled series: %r" % styles)
            check(all(len(v) == 1 for v in styles.values()), "decode.gp: a series changes style: %r" % styles)
            firsts = [next(iter(v)) for v in styles.values()]
            check(len(set(firsts)) == len(firsts), "decode.gp: two series share a style: %r" % styles)
        print("bench decode smoke: %d lines, %d cases, %d ratios, %d targets OK" %
              (len(records), len(cases), len(ratios), len(targets)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
