"""A study's summary: accuracy of the searched shapes against uniform and random ones, with tests of significance."""

from __future__ import annotations

import math
import os
from typing import Sequence

from scipy import stats

from tas_jax.report import tables
from tas_jax.runtime import files

# Study variants and the protocol variants that train them.
VARIANTS = {"scratch": "scratch-e", "kd": "kd"}
TITLES = {"scratch": "scratch", "kd": "KD"}
TAS_METHODS = ("tas", "tas-paper")
BASELINE_METHODS = ("uniform", "random", "l1")
JSON_FILE, MD_FILE, PNG_FILE = "study.json", "study.md", "study.png"
RULE = ("difference of means > 2 x Welch standard error sqrt(s_a^2/n_a + s_b^2/n_b) (|Welch t| > 2), "
        "sample variances over seeds (ddof 1)")


def significance(a: Sequence[float], b: Sequence[float]) -> dict:
  """Whether mean(a) - mean(b) exceeds the seed noise: ``|diff| > 2 * se``, ``se`` Welch's standard error.

  Returns ``{"n_a", "n_b", "mean_a", "mean_b", "std_a", "std_b", "diff",
  "se", "t", "df", "p", "significant", "verdict"}``; with fewer than two values
  on a side there is no noise estimate: ``se``, ``t``, ``df``, ``p`` and
  ``significant`` are None and the verdict says so. ``p`` is Welch's two-sided
  p-value (reported, not used by the rule).
  """
  a, b = [float(x) for x in a], [float(x) for x in b]
  ma, sa = tables.mean_std(a)
  mb, sb = tables.mean_std(b)
  out = {"n_a": len(a), "n_b": len(b), "mean_a": ma, "mean_b": mb, "std_a": sa, "std_b": sb,
         "diff": ma - mb if a and b else float("nan"), "se": None, "t": None, "df": None, "p": None,
         "significant": None}
  if len(a) < 2 or len(b) < 2:
    out["verdict"] = "too few seeds (need 2 a side)"
    return out
  va, vb = sa * sa / len(a), sb * sb / len(b)
  se = math.sqrt(va + vb)
  diff = out["diff"]
  if se == 0.0:
    t = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    df, p = None, (1.0 if diff == 0.0 else 0.0)
  else:
    t = diff / se
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    p = float(2.0 * stats.t.sf(abs(t), df))
  significant = abs(diff) > 2.0 * se
  out.update(se=se, t=t, df=df, p=p, significant=significant,
             verdict=("higher" if diff > 0 else "lower") if significant else "within seed noise")
  return out


def _pool(rows: Sequence[dict], method: str, variant: str) -> list[float]:
  return [x for r in rows if r["method"] == method and r["in_band"] for x in r["variants"][variant]["test_top1"]]


def comparisons(rows: Sequence[dict], variants: Sequence[str]) -> list[dict]:
  """TAS (and the paper's shape) against each baseline method, per variant, in-band shapes only."""
  out = []
  present = {r["method"] for r in rows if r["in_band"]}
  for v in variants:
    for a in TAS_METHODS:
      for b in BASELINE_METHODS:
        if a in present and b in present:
          out.append({"variant": v, "a": a, "b": b, **significance(_pool(rows, a, v), _pool(rows, b, v))})
  return out


def _pct(x) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _acc(cell: dict) -> str:
  n = cell.get("n", 0)
  if not n:
    return "–"
  text = f"{_pct(cell['mean'])} ± {100 * cell['std']:.2f}" if n > 1 else _pct(cell["mean"])
  return f"{text} ({n})"


def markdown(summary: dict) -> str:
  """``study.md``: the settings, one row per shape, and the significance tests."""
  cfg = summary["config"]
  lo, hi = summary["band"]
  lat_keys = [str(b) for b in cfg["latency_batch_sizes"]]
  t = summary["teacher"]
  lines = [f"# Searched vs uniform vs random shapes: {cfg['model']} at {cfg['target_flops_ratio']} of the MACs", "",
           f"* dataset `{summary.get('dataset')}`, {cfg['num_train_examples'] or 'all'} training examples; "
           f"recipe `{cfg['recipe']}`, {cfg['epochs']} epochs per shape, batch {cfg['batch_size']}, "
           f"{cfg['seeds']} seed(s) per shape and variant",
           f"* MACs band: ratio [{lo:.3f}, {hi:.3f}] of the unpruned {summary['unpruned_macs']:,} MACs; shapes "
           "outside it are flagged and left out of the tests",
           f"* teacher (unpruned, {t.get('epochs')} epochs): test top-1 {_pct(t.get('test_top1'))} %",
           f"* {len(summary['searches'])} TAS search(es) of {cfg['search_epochs']} epochs; "
           f"{cfg['random_draws']} random draw(s)",
           "* accuracy: final-epoch test top-1 in %, mean ± sample std over seeds (runs finished)"]
  if lat_keys:
    dev = next((r["latency"][k]["device"] for r in summary["shapes"] for k in lat_keys if k in r["latency"]), "?")
    lines.append(f"* latency: median eval-mode forward time on {dev}, {cfg['latency_runs']} runs, per batch size")
  lines.append("")
  head = ["shape", "method", "MACs", "ratio", "params", "in band"] + [f"latency b{k} (ms)" for k in lat_keys]
  head += [f"{TITLES[v]} top-1 (%)" for v in cfg["variants"]]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in summary["shapes"]:
    cells = [r["name"], r["method"], f"{r['macs']:,}", f"{r['ratio']:.4f}", f"{r['params']:,}",
             "yes" if r["in_band"] else "**no** (flagged)"]
    cells += [f"{r['latency'][k]['median_ms']:.3f}" if k in r["latency"] else "–" for k in lat_keys]
    cells += [_acc(r["variants"][v]) for v in cfg["variants"]]
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "## Significance", "", f"Rule: {summary['rule']}. A method with several shapes (searches, random "
            "draws) pools the runs of all of them. Welch's df and two-sided p are shown for reference; with 2-3 "
            "seeds a side, |t| > 2 is a rough screen, not a 5 % test.", ""]
  head = ["variant", "TAS", "baseline", "TAS (%)", "baseline (%)", "diff (pp)", "2 SE (pp)", "t", "df", "p",
          "verdict"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for c in summary["comparisons"]:
    se = c["se"]
    cells = [TITLES[c["variant"]], c["a"], c["b"], f"{_pct(c['mean_a'])} (n={c['n_a']})",
             f"{_pct(c['mean_b'])} (n={c['n_b']})", f"{100 * c['diff']:+.2f}" if c["n_a"] and c["n_b"] else "–",
             f"{200 * se:.2f}" if se is not None else "–",
             f"{c['t']:.2f}" if c["t"] is not None else "–", f"{c['df']:.1f}" if c["df"] is not None else "–",
             f"{c['p']:.3f}" if c["p"] is not None else "–",
             f"TAS {c['verdict']}" if c["significant"] else c["verdict"]]
    lines.append("| " + " | ".join(cells) + " |")
  if not summary["comparisons"]:
    lines.append("| – | – | – | – | – | – | – | – | – | – | no in-band TAS and baseline shapes to compare |")
  return "\n".join(lines) + "\n"


def figure(summary: dict, path: str) -> None:
  """Accuracy against MACs with error bars (sample std over seeds), one colour per method, one marker per variant."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cfg = summary["config"]
  colours = {"tas": "C3", "tas-paper": "C1", "uniform": "C0", "random": "C2", "l1": "C4"}
  markers = {"scratch": "o", "kd": "s"}
  fig, ax = plt.subplots(figsize=(7, 4.5))
  full = summary["unpruned_macs"]
  lo, hi = summary["band"]
  ax.axvspan(lo * full / 1e6, hi * full / 1e6, color="0.92", zorder=0, label="MACs band")
  seen = set()
  for i, v in enumerate(cfg["variants"]):
    for r in summary["shapes"]:
      cell = r["variants"][v]
      if not cell["n"]:
        continue
      key = (r["method"], v)
      label = None if key in seen else f"{r['method']} ({TITLES[v]})"
      seen.add(key)
      x = r["macs"] / 1e6 * (1 + 0.004 * (i - 0.5))  # variants side by side
      ax.errorbar(x, 100 * cell["mean"], yerr=100 * cell["std"], fmt=markers[v], color=colours.get(r["method"], "k"),
                  mfc="none" if not r["in_band"] else None, capsize=3, label=label)
  t = summary["teacher"]
  if t.get("test_top1") is not None:
    ax.axhline(100 * t["test_top1"], color="0.5", ls="--", lw=1, label="unpruned teacher")
  ax.set_xlabel("MACs (millions)")
  ax.set_ylabel("final test top-1 (%)")
  ax.set_title(f"{cfg['model']}, target {cfg['target_flops_ratio']} of the MACs (open: outside the band)")
  ax.legend(fontsize=7, loc="best")
  fig.tight_layout()
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def write_reports(workdir: str, summary: dict) -> None:
  files.write_json(os.path.join(workdir, JSON_FILE), summary)
  files.write_text(os.path.join(workdir, MD_FILE), markdown(summary))
  figure(summary, os.path.join(workdir, PNG_FILE))
