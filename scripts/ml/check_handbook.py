"""The engine's fifteen baseline features are the Fraud Detection Handbook's.

Simulates a stream, exports every transaction's features with `peregrine
features`, and computes the Handbook's baseline features from the raw file
with pandas, as the book's code does (Le Borgne et al., "Baseline feature
transformation"): per card, rolling windows of 1, 7 and 30 days on the time
index, right-closed and including the transaction; per terminal, the count
and fraud share of the window of w days that ends one label delay (7 days)
before the transaction.

The card windows and the transaction's own features must agree on every row
(the engine computes in f32: means to 1e-5 relative). The merchant windows
are documented to run on whole hours (README, Features): they must agree on
every row with the same definition on hours, and the share of rows where
hours differ from the book's seconds is printed.

    check_handbook.py BINARY WORKDIR
"""

import sys
from pathlib import Path

import numpy as np
import pandas as pd
from checks import report, run

DELAY = pd.Timedelta(days=7)
CARD = {1: ("card.count_1d", "card.mean_amount_1d"), 7: ("card.count_7d", "card.mean_amount_7d"),
        30: ("card.count_30d", "card.mean_amount_30d")}
MERCHANT = {1: ("merchant.count_1d", "merchant.risk_1d"), 7: ("merchant.count_7d", "merchant.risk_7d"),
            30: ("merchant.count_30d", "merchant.risk_30d")}


def rolling(raw, key, column, days):
    """Per `key`, the rolling count and sum of `column` over `days` days on
    the time index (right-closed, the row included), in `raw`'s row order."""
    # Grouped rows contiguous, each group in time order (ties in file order):
    # the rolling result then comes out in this frame's order.
    frame = raw.sort_values("ts", kind="stable").sort_values(key, kind="stable")
    rolled = frame.groupby(key, sort=False).rolling(f"{days}D", on="ts")[column]
    count = pd.Series(rolled.count().to_numpy(), index=frame.index).loc[raw.index]
    total = pd.Series(rolled.sum().to_numpy(), index=frame.index).loc[raw.index]
    return count, total


def handbook(raw):
    """The book's baseline features, on seconds."""
    out = pd.DataFrame(index=raw.index)
    out["amount"] = raw.amount
    out["tx.weekend"] = (raw.ts.dt.day_of_week >= 5).astype(float)
    out["tx.night"] = (raw.ts.dt.hour <= 6).astype(float)
    for w, (count, mean) in CARD.items():
        n, s = rolling(raw, "card_id", "amount", w)
        out[count] = n
        out[mean] = s / n
    for w, (count, risk) in MERCHANT.items():
        n_d, f_d = rolling(raw, "merchant_id", "is_fraud", DELAY.days)
        n_dw, f_dw = rolling(raw, "merchant_id", "is_fraud", DELAY.days + w)
        n, f = n_dw - n_d, f_dw - f_d
        out[count] = n
        out[risk] = np.where(n > 0, f / n.where(n > 0, 1), 0.0)
    return out


def hourly_merchant(raw):
    """The merchant windows as the engine documents them: the whole hours
    from the one holding t - delay - w up to, not including, the one
    holding t - delay."""
    out = pd.DataFrame(index=raw.index)
    hour = raw.ts.dt.floor("h")
    frame = pd.DataFrame({"m": raw.merchant_id, "h": hour, "f": raw.is_fraud})
    per_hour = frame.groupby(["m", "h"]).f.agg(["count", "sum"])
    cum = per_hour.groupby(level=0).cumsum()
    cum_index = {m: g.droplevel(0) for m, g in cum.groupby(level=0)}

    def before(m, h):
        """Counts and frauds in the merchant's hours strictly before h."""
        g = cum_index[m]
        i = g.index.searchsorted(h, side="left")
        return (0, 0) if i == 0 else (g["count"].iloc[i - 1], g["sum"].iloc[i - 1])

    for w, (count, risk) in MERCHANT.items():
        counts, risks = [], []
        for m, t in zip(raw.merchant_id, raw.ts):
            end = (t - DELAY).floor("h")
            start = (t - DELAY - pd.Timedelta(days=w)).floor("h")
            n_end, f_end = before(m, end)
            n_start, f_start = before(m, start)
            n, f = n_end - n_start, f_end - f_start
            counts.append(n)
            risks.append(f / n if n > 0 else 0.0)
        out[count] = counts
        out[risk] = risks
    return out


def differ(ours, theirs, relative):
    ours, theirs = ours.to_numpy(dtype=float), theirs.to_numpy(dtype=float)
    return ~np.isclose(ours, theirs, rtol=relative, atol=1e-9)


def agree(ours, theirs, names, what):
    """Every row of every feature in `names` agrees, or the first that
    does not is named."""
    for name in names:
        bad = differ(ours[name], theirs[name], 1e-5)
        if bad.any():
            i = int(np.argmax(bad))
            raise AssertionError(
                f"{name}: {bad.sum()} of {len(bad)} rows differ from {what}; first, transaction "
                f"{ours.index[i]}: peregrine {ours[name].iloc[i]!r}, {what} {theirs[name].iloc[i]!r}")


def main():
    bin, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    data, exported = work / "handbook.csv", work / "handbook-features.csv"
    run(bin, "simulate", "--out", data, "--customers", "600", "--terminals", "1200", "--days", "75", "--seed", "11")
    run(bin, "--quiet", "features", "--data", data, "--from", "2018-04-01", "--to", "2018-07-01", "--out", exported)
    raw = pd.read_csv(data, usecols=["transaction_id", "timestamp", "card_id", "merchant_id", "amount", "is_fraud"])
    raw["ts"] = pd.to_datetime(raw.timestamp, utc=True).dt.tz_localize(None)
    raw = raw.set_index("transaction_id")
    ours = pd.read_csv(exported).set_index("transaction_id").loc[raw.index]
    book = handbook(raw).loc[raw.index]

    def card_and_transaction():
        names = ["amount", "tx.weekend", "tx.night"] + [c for pair in CARD.values() for c in pair]
        agree(ours, book, names, "pandas")
        return f"{len(names)} features on all {len(raw)} rows"

    def merchant_on_hours():
        names = [c for pair in MERCHANT.values() for c in pair]
        agree(ours, hourly_merchant(raw).loc[raw.index], names, "whole hours")
        shares = ", ".join(f"{n} {100 * differ(ours[n], book[n], 1e-5).mean():.1f}%" for n in names)
        return f"{len(names)} features on all {len(raw)} rows; rows where hours differ from the book's seconds: {shares}"

    report([
        ("handbook-card-and-transaction-features", card_and_transaction),
        ("handbook-merchant-features-on-whole-hours", merchant_on_hours),
    ])


if __name__ == "__main__":
    main()
