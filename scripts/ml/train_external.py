"""Trains XGBoost or LightGBM on a `peregrine features` export, as a data
scientist would, for `peregrine import`.

    train_external.py xgboost|lightgbm FEATURES.csv MODEL_OUT [ROUNDS] [DEPTH]

XGBoost writes JSON (give MODEL_OUT a .json name), LightGBM text.
"""

import sys

import numpy as np
import pandas as pd

library, features, out = sys.argv[1:4]
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 100
depth = int(sys.argv[5]) if len(sys.argv) > 5 else 4
frame = pd.read_csv(features)
# The engine's values are f32 printed as their shortest decimal: f32 recovers them.
x = frame.drop(columns=["transaction_id", "is_fraud"]).astype(np.float32)
y = frame["is_fraud"].astype(int)
if library == "xgboost":
    import xgboost as xgb

    params = {"objective": "binary:logistic", "max_depth": depth, "eta": 0.15, "seed": 1}
    xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=rounds).save_model(out)
elif library == "lightgbm":
    import lightgbm as lgb

    params = {"objective": "binary", "num_leaves": 2**depth, "max_depth": depth,
              "learning_rate": 0.15, "verbose": -1, "seed": 1}
    lgb.train(params, lgb.Dataset(x, y), num_boost_round=rounds).save_model(out)
else:
    sys.exit(f"unknown library {library!r}: xgboost or lightgbm")
