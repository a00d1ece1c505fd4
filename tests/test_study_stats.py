"""kdjax.llm.study.stats: the t quantile and intervals against scipy, the summary's fields, paired
differences on a hand-made table, resolved and unresolved cases, comparisons.csv, and the figures'
error bars (95% intervals, not standard errors)."""

import csv
import math

import numpy as np
import pytest
from scipy import special
from scipy import stats as sps

from kdjax.llm.study import plots, stats


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 29, 100, 2.5])
def test_t_quantile_and_cdf_match_scipy(df):
  for p in (0.5, 0.6, 0.9, 0.975, 0.995, 0.025):
    assert stats.t_quantile(p, df) == pytest.approx(sps.t.ppf(p, df), rel=1e-10, abs=1e-12)
  for x in (-7.0, -1.3, 0.0, 0.4, 2.0, 12.7):
    assert stats.t_cdf(x, df) == pytest.approx(sps.t.cdf(x, df), rel=1e-10, abs=1e-14)
  for a, b, x in ((df / 2, 0.5, 0.3), (0.5, df / 2, 0.9), (df, 3.0, 0.5)):
    assert stats.betainc(a, b, x) == pytest.approx(special.betainc(a, b, x), rel=1e-11)


@pytest.mark.parametrize("values", [[1.0, 2.0], [3.1, -0.2, 0.7], [0.5, 0.6, 0.4, 0.9, 1.2],
                                    list(np.random.default_rng(0).normal(size=12))])
def test_mean_interval_is_scipys_t_interval(values):
  got = stats.mean_interval(values)
  v = np.asarray(values)
  se = v.std(ddof=1) / math.sqrt(len(v))
  low, high = sps.t.interval(0.95, len(v) - 1, loc=v.mean(), scale=sps.sem(v))
  assert got["n"] == len(v) and got["mean"] == pytest.approx(v.mean())
  assert got["se"] == pytest.approx(se, rel=1e-12)
  assert got["ci95_low"] == pytest.approx(low, rel=1e-9)
  assert got["ci95_high"] == pytest.approx(high, rel=1e-9)


def test_mean_interval_edge_cases():
  one = stats.mean_interval([2.0])
  assert one["mean"] == 2.0 and one["se"] is None and one["ci95_low"] is None
  assert stats.mean_interval([1.0, None])["mean"] is None
  assert stats.mean_interval([])["n"] == 0
  with pytest.raises(ValueError):
    stats.t_quantile(1.0, 3)


# precision: fkl is above seqkd by 1.0 +- 0.1 in every seed (resolved although the means'
# intervals overlap: the seeds move both); recall: fkl - seqkd alternates sign (not resolved)
ROWS = []
for seed, shift in enumerate([0.0, 3.0, -2.0]):
  ROWS += [
      {"objective": "direct", "temperature": None, "seed": seed, "precision": -5.0 + shift,
       "recall": -3.0 + shift},
      {"objective": "seqkd", "temperature": 0.8, "seed": seed, "precision": -3.0 + shift,
       "recall": -4.0 + shift},
      {"objective": "seqkd", "temperature": 1.0, "seed": seed, "precision": -3.5 + shift,
       "recall": -3.5 + shift},
      {"objective": "fkl", "temperature": 0.8, "seed": seed,
       "precision": -2.0 + shift + [0.0, 0.1, -0.1][seed], "recall": -4.0 + shift + [1, -1, 0.5][seed]},
      {"objective": "fkl", "temperature": 1.0, "seed": seed, "precision": -2.4 + shift,
       "recall": None},
  ]


def _get(comps, comparison, kind, t, metric):
  [c] = [c for c in comps if (c["comparison"], c["kind"], c["temperature"], c["metric"])
         == (comparison, kind, t, metric)]
  return c


def test_paired_differences_on_a_hand_made_table():
  comps = stats.comparisons(ROWS)
  c = _get(comps, "vs_seqkd", "fkl", 0.8, "precision")
  diffs = [1.0, 1.1, 0.9]
  low, high = sps.t.interval(0.95, 2, loc=np.mean(diffs), scale=sps.sem(diffs))
  assert (c["baseline_kind"], c["baseline_temperature"], c["n"], c["seeds"]) == ("seqkd", 0.8, 3,
                                                                                [0, 1, 2])
  assert c["mean"] == pytest.approx(1.0) and c["se"] == pytest.approx(sps.sem(diffs))
  assert (c["ci95_low"], c["ci95_high"]) == (pytest.approx(low), pytest.approx(high))
  assert c["resolved"] and c["ci95_low"] > 0
  # the unpaired means' intervals overlap: only the pairing resolves it
  s = {(e["objective"], e["temperature"]): e for e in stats.summarize(ROWS)}
  assert s[("fkl", 0.8)]["precision_ci95_low"] < s[("seqkd", 0.8)]["precision_ci95_high"]
  r = _get(comps, "vs_seqkd", "fkl", 0.8, "recall")
  assert r["mean"] == pytest.approx(0.5 / 3) and not r["resolved"]
  assert r["ci95_low"] < 0 < r["ci95_high"]
  # each T against the highest T of its kind; the kind minus the baseline
  t = _get(comps, "temperature", "seqkd", 0.8, "precision")
  assert (t["baseline_kind"], t["baseline_temperature"]) == ("seqkd", 1.0)
  assert t["mean"] == pytest.approx(0.5) and t["se"] == pytest.approx(0.0, abs=1e-12)
  d = _get(comps, "vs_direct", "seqkd", 1.0, "recall")
  assert d["mean"] == pytest.approx(-0.5) and d["resolved"]  # -0.5 in every seed: se 0
  # which comparisons exist: no kind against itself, no T = 1.0 vs 1.0, seqkd not vs seqkd,
  # direct vs nothing; fkl at T=1.0 has no recall, so no recall comparison with it
  keys = {(c["comparison"], c["kind"], c["temperature"], c["metric"]) for c in comps}
  assert ("temperature", "fkl", 1.0, "precision") not in keys
  assert not any(k[1] == "seqkd" and k[0] == "vs_seqkd" for k in keys)
  assert not any(k[1] == "direct" for k in keys)
  assert ("vs_direct", "fkl", 1.0, "recall") not in keys
  assert ("vs_direct", "fkl", 1.0, "precision") in keys
  # temperature 2 + 1, vs_seqkd 2 + 1, vs_direct 2 + 2 + 2 + 1 (fkl at 1.0: precision only);
  # no knn metric in these rows, so none compared
  assert len(comps) == 13


def test_pairs_only_common_seeds_and_two_seeds_make_an_interval():
  rows = [{"objective": "direct", "temperature": None, "seed": s, "precision": p}
          for s, p in [(0, 1.0), (1, 2.0), (2, 3.0)]]
  rows += [{"objective": "fkl", "temperature": 1.0, "seed": s, "precision": p}
           for s, p in [(1, 2.5), (2, 3.4), (3, 9.0)]]  # seed 3: no direct to pair with
  [c] = stats.comparisons(rows, metrics=("precision",))
  assert c["seeds"] == [1, 2] and c["n"] == 2 and c["mean"] == pytest.approx(0.45)
  assert c["ci95_high"] - c["mean"] == pytest.approx(sps.t.ppf(0.975, 1) * 0.05)  # 12.7 se
  assert not c["resolved"]
  one = stats.comparisons(rows[1:2] + rows[3:4], metrics=("precision",))  # seed 1 only
  assert one[0]["n"] == 1 and one[0]["se"] is None and not one[0]["resolved"]
  with pytest.raises(ValueError, match="one per seed"):
    stats.comparisons(rows + rows[:1])


def test_summarize_keeps_its_fields_and_adds_intervals():
  s = {(e["objective"], e["temperature"]): e for e in plots.summarize(ROWS)}
  e = s[("seqkd", 0.8)]
  v = np.asarray([-3.0, 0.0, -5.0])
  assert e["n"] == 3 and e["precision_mean"] == pytest.approx(v.mean())
  assert e["precision_se"] == pytest.approx(sps.sem(v))
  low, high = sps.t.interval(0.95, 2, loc=v.mean(), scale=sps.sem(v))
  assert (e["precision_ci95_low"], e["precision_ci95_high"]) == (pytest.approx(low),
                                                                 pytest.approx(high))
  assert s[("fkl", 1.0)]["recall_mean"] is None and s[("fkl", 1.0)]["recall_ci95_low"] is None
  for m in plots.METRICS:
    assert {f"{m}_mean", f"{m}_se", f"{m}_ci95_low", f"{m}_ci95_high"} <= set(e)


def test_comparisons_csv_and_table(tmp_path):
  comps = stats.comparisons(ROWS)
  path = str(tmp_path / "comparisons.csv")
  stats.write_csv(comps, path)
  with open(path) as f:
    got = list(csv.DictReader(f))
  assert len(got) == len(comps) and tuple(got[0]) == stats.CSV_COLUMNS
  row = [g for g in got if (g["comparison"], g["kind"], g["temperature"], g["metric"])
         == ("vs_seqkd", "fkl", "0.8", "precision")][0]
  assert row["resolved"] == "True" and float(row["mean"]) == pytest.approx(1.0)
  assert [g for g in got if g["baseline_kind"] == "direct"][0]["baseline_temperature"] == ""
  table = stats.format_comparisons(comps)
  assert "| vs_seqkd | precision | fkl | 0.8 | seqkd T=0.8 | 3 | +1.00 |" in table
  assert "| vs_seqkd | recall | fkl | 0.8 | seqkd T=0.8 | 3 | +0.17 |" in table
  assert table.count("not resolved") == sum(not c["resolved"] for c in comps)


def test_figure_error_bars_are_the_95_intervals():
  es = plots._by_kind(plots.summarize(ROWS))["seqkd"]
  bars = plots._err(es, "precision")
  for j, e in enumerate(es):
    assert bars[0, j] == pytest.approx(e["precision_mean"] - e["precision_ci95_low"])
    assert bars[1, j] == pytest.approx(e["precision_ci95_high"] - e["precision_mean"])
    assert bars[1, j] == pytest.approx(sps.t.ppf(0.975, 2) * e["precision_se"])
  assert plots._err(plots._by_kind(plots.summarize(ROWS[:1]))["direct"], "precision") is None
