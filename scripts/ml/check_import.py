"""Models trained in Python score in Peregrine as in their own library.

Simulates a stream, exports the engine's features with `peregrine features`,
trains XGBoost and LightGBM on them the way a data scientist would (pandas,
the libraries' own APIs), imports each with `peregrine import`, scores the
test window with `peregrine eval --predictions`, and compares every row's
score with the library's prediction on the same features.

    check_import.py BINARY WORKDIR

Prints `check NAME ... ok|FAILED` per check, with the reason under a failure.
"""

import subprocess
import sys
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
import xgboost as xgb
from checks import report, run

TOLERANCE = 1e-6
TRAIN = ("2018-05-01", "2018-06-01")
TEST = ("2018-06-08", "2018-06-22")


def features(bin, data, window, out):
    run(bin, "--quiet", "features", "--data", data, "--from", window[0], "--to", window[1], "--out", out)
    frame = pd.read_csv(out)
    # The engine computes in f32 and prints each value's shortest decimal,
    # so f32 recovers the engine's exact values.
    x = frame.drop(columns=["transaction_id", "is_fraud"]).astype(np.float32)
    return frame["transaction_id"], x, frame["is_fraud"].astype(int)


def compare(bin, work, data, name, model_flag, model_path, ids, expected):
    """Imports the model, scores the test window in Peregrine, and returns
    the largest difference from the library's own predictions."""
    imported = work / f"{name}.peregrine.json"
    run(bin, "import", model_flag, model_path, "--out", imported)
    predictions = work / f"{name}.predictions.csv"
    run(bin, "--quiet", "eval", "--data", data, "--model", imported,
        "--test-from", TEST[0], "--test-to", TEST[1], "--predictions", predictions)
    ours = pd.read_csv(predictions).set_index("transaction_id")["score"]
    theirs = pd.Series(expected, index=ids)
    if len(ours) != len(theirs) or not ours.index.equals(theirs.index):
        raise AssertionError(f"{len(ours)} rows scored by peregrine, {len(theirs)} by {name}, or in another order")
    gap = float(np.max(np.abs(ours.to_numpy() - theirs.to_numpy())))
    if not gap <= TOLERANCE:
        worst = int(np.argmax(np.abs(ours.to_numpy() - theirs.to_numpy())))
        raise AssertionError(
            f"scores differ by up to {gap:.3g} (tolerance {TOLERANCE}); worst row "
            f"{theirs.index[worst]}: {name} {theirs.iloc[worst]!r}, peregrine {ours.iloc[worst]!r}")
    spread = float(np.std(theirs.to_numpy()))
    if spread < 1e-3:
        raise AssertionError(f"{name}'s scores hardly vary (std {spread:.3g}): the comparison proves little")
    return f"{len(ours)} rows, largest difference {gap:.2g}"


def refused(bin, flag, path, out, needle):
    done = subprocess.run([bin, "import", flag, path, "--out", out], capture_output=True, text=True)
    if done.returncode == 0 or needle not in done.stderr:
        raise AssertionError(f"import of {path} should fail naming {needle!r}; exit {done.returncode}: {done.stderr}")
    if Path(out).exists():
        raise AssertionError(f"a refused import wrote {out}")
    return done.stderr.strip().splitlines()[-1]


def main():
    bin, work = sys.argv[1], Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    data = work / "sim.csv"
    run(bin, "simulate", "--out", data, "--customers", "1500", "--terminals", "3000", "--days", "90")
    _, x_train, y_train = features(bin, data, TRAIN, work / "train.csv")
    ids, x_test, _ = features(bin, data, TEST, work / "test.csv")

    def xgboost_check():
        booster = xgb.train(
            {"objective": "binary:logistic", "max_depth": 5, "eta": 0.2, "seed": 1},
            xgb.DMatrix(x_train, label=y_train), num_boost_round=80)
        path = work / "xgboost.json"
        booster.save_model(path)
        expected = booster.predict(xgb.DMatrix(x_test)).astype(np.float64)
        return compare(bin, work, data, "xgboost", "--xgboost", path, ids, expected)

    def lightgbm_check():
        booster = lgb.train(
            {"objective": "binary", "num_leaves": 24, "max_depth": 6, "learning_rate": 0.1,
             "min_data_in_leaf": 10, "verbose": -1, "seed": 1},
            lgb.Dataset(x_train, y_train), num_boost_round=80)
        path = work / "lightgbm.txt"
        booster.save_model(path)
        expected = booster.predict(x_test)
        return compare(bin, work, data, "lightgbm", "--lightgbm", path, ids, expected)

    def foreign_columns_check():
        # A column the engine does not compute cannot be fed at scoring time.
        x = x_train.assign(hour_of_day=np.float32(3))
        booster = lgb.train({"objective": "binary", "num_leaves": 4, "verbose": -1},
                            lgb.Dataset(x, y_train), num_boost_round=3)
        path = work / "foreign.txt"
        booster.save_model(path)
        return refused(bin, "--lightgbm", path, work / "foreign.peregrine.json", "hour_of_day")

    def objective_check():
        booster = xgb.train({"objective": "reg:squarederror", "max_depth": 2},
                            xgb.DMatrix(x_train, label=y_train), num_boost_round=2)
        path = work / "regression.json"
        booster.save_model(path)
        return refused(bin, "--xgboost", path, work / "regression.peregrine.json", "reg:squarederror")

    report([
        ("import-xgboost-scores-as-xgboost", xgboost_check),
        ("import-lightgbm-scores-as-lightgbm", lightgbm_check),
        ("import-refuses-foreign-columns", foreign_columns_check),
        ("import-refuses-other-objectives", objective_check),
    ])


if __name__ == "__main__":
    main()
