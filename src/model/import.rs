//! Gradient-boosted models trained elsewhere, on the features `peregrine
//! features` exports, turned into Peregrine's own trees: XGBoost's JSON
//! model and LightGBM's text model. They then score with the same tree
//! walker, and explain with the same path attribution, as a model trained
//! here.
//!
//! Both libraries' split rules map exactly onto the walker's `x <= t` on
//! `f32` features: XGBoost sends `x < t` left (in `f32`), so `t` becomes the
//! next `f32` below it; LightGBM sends `(f64) x <= t` left, so `t` becomes the
//! largest `f32` not above it. Their rules for missing values never apply:
//! the engine computes no feature as NaN (see `features::state_amount`).

use super::trees::{Gbt, LEAF, Tree};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not an XGBoost JSON model: {0}")]
    XgboostFormat(String),
    #[error("not a LightGBM text model: {0}")]
    LightgbmFormat(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("the model reads features the engine does not compute: {0}")]
    UnknownFeatures(String),
}

/// A split or a leaf, with the weight of the training rows that reached it
/// (the sum of hessians), from which inner nodes get their values.
enum Node {
    Split {
        feature: u16,
        threshold: f32,
        left: usize,
        right: usize,
        cover: f64,
    },
    Leaf {
        value: f64,
        cover: f64,
    },
}

/// Maps the source model's feature columns to the features file's
/// `columns`: by name where the model carries names, else by position when
/// it has exactly as many.
fn feature_map(
    names: Option<Vec<String>>,
    count: usize,
    columns: &[String],
) -> Result<Vec<u16>, ImportError> {
    match names {
        Some(names) => {
            let unknown: Vec<&str> = names
                .iter()
                .filter(|n| !columns.contains(n))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                return Err(ImportError::UnknownFeatures(format!(
                    "{} (train on the columns of `peregrine features` with the same --features file, without transaction_id and is_fraud)",
                    unknown.join(", ")
                )));
            }
            Ok(names
                .iter()
                .map(|n| columns.iter().position(|m| m == n).unwrap_or_default() as u16)
                .collect())
        }
        None if count == columns.len() => Ok((0..count as u16).collect()),
        None => Err(ImportError::UnknownFeatures(format!(
            "the model names no features and has {count} columns, not the features file's {}",
            columns.len()
        ))),
    }
}

/// Lays the nodes out depth first from `root`, so that children follow
/// their parent, and gives each inner node the cover-weighted mean of its
/// children's values, the value path attribution starts from.
fn layout(nodes: &[Node], root: usize) -> Result<Tree, ImportError> {
    let mut tree = Tree::default();
    fn visit(
        nodes: &[Node],
        i: usize,
        depth: usize,
        tree: &mut Tree,
    ) -> Result<(f64, f64), ImportError> {
        if depth > 256 {
            return Err(ImportError::Unsupported(
                "a tree deeper than 256 levels, or with a cycle".into(),
            ));
        }
        let node = nodes
            .get(i)
            .ok_or_else(|| ImportError::Unsupported(format!("a child index {i} out of range")))?;
        let at = tree.feature.len();
        tree.feature.push(LEAF);
        tree.threshold.push(0.0);
        tree.left.push(0);
        tree.right.push(0);
        tree.value.push(0.0);
        match *node {
            Node::Leaf { value, cover } => {
                tree.value[at] = value as f32;
                Ok((value, cover))
            }
            Node::Split {
                feature,
                threshold,
                left,
                right,
                cover,
            } => {
                tree.feature[at] = feature;
                tree.threshold[at] = threshold;
                tree.left[at] = tree.feature.len() as u32;
                let (lv, lc) = visit(nodes, left, depth + 1, tree)?;
                tree.right[at] = tree.feature.len() as u32;
                let (rv, rc) = visit(nodes, right, depth + 1, tree)?;
                let value = if lc + rc > 0.0 {
                    (lv * lc + rv * rc) / (lc + rc)
                } else {
                    (lv + rv) / 2.0
                };
                tree.value[at] = value as f32;
                Ok((value, cover))
            }
        }
    }
    visit(nodes, root, 0, &mut tree)?;
    Ok(tree)
}

/// The largest `f32` at or below `t`.
fn f32_at_or_below(t: f64) -> f32 {
    let c = t as f32;
    if c as f64 > t { c.next_down() } else { c }
}

/// An XGBoost model saved with `Booster.save_model("model.json")`, with the
/// `binary:logistic` objective and numeric splits.
pub fn from_xgboost(text: &str, columns: &[String]) -> Result<Gbt, ImportError> {
    let bad = |what: &str| ImportError::XgboostFormat(what.to_string());
    let doc: Value = serde_json::from_str(text).map_err(|e| bad(&e.to_string()))?;
    let learner = doc
        .get("learner")
        .ok_or_else(|| bad("no `learner` object"))?;
    let objective = learner
        .pointer("/objective/name")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("no `learner.objective.name`"))?;
    if objective != "binary:logistic" {
        return Err(ImportError::Unsupported(format!(
            "XGBoost objective {objective:?}: only \"binary:logistic\" scores a fraud probability"
        )));
    }
    let booster = learner
        .get("gradient_booster")
        .ok_or_else(|| bad("no `learner.gradient_booster`"))?;
    match booster.get("name").and_then(Value::as_str) {
        Some("gbtree") => {}
        other => {
            return Err(ImportError::Unsupported(format!(
                "XGBoost booster {other:?}: only \"gbtree\" (dart and gblinear score differently)"
            )));
        }
    }
    let param = learner
        .get("learner_model_param")
        .ok_or_else(|| bad("no `learner.learner_model_param`"))?;
    let count: usize = param
        .get("num_feature")
        .and_then(Value::as_str)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no `num_feature`"))?;
    for key in ["num_class", "num_target"] {
        let n: usize = param
            .get(key)
            .and_then(Value::as_str)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if n > 1 {
            return Err(ImportError::Unsupported(format!(
                "XGBoost {key} {n}: only a single binary target"
            )));
        }
    }
    // "5E-1" before XGBoost 3, "[5E-1]" since: a probability either way.
    let base_score: f64 = param
        .get("base_score")
        .and_then(Value::as_str)
        .map(|s| s.trim_matches(|c| c == '[' || c == ']'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no readable `base_score`"))?;
    if !(base_score > 0.0 && base_score < 1.0) {
        return Err(bad(&format!(
            "base_score {base_score} is not a probability"
        )));
    }
    let names = learner
        .get("feature_names")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        });
    let columns = feature_map(names, count, columns)?;
    let trees = booster
        .pointer("/model/trees")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("no `gradient_booster.model.trees`"))?;
    let mut out = Vec::with_capacity(trees.len());
    for (t, tree) in trees.iter().enumerate() {
        let array = |key: &str| -> Result<&Vec<Value>, ImportError> {
            tree.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| bad(&format!("tree {t} has no `{key}` array")))
        };
        let (left, right) = (array("left_children")?, array("right_children")?);
        let (index, condition) = (array("split_indices")?, array("split_conditions")?);
        let hessian = array("sum_hessian")?;
        let split_type = array("split_type").ok();
        let n = left.len();
        if [right.len(), index.len(), condition.len(), hessian.len()]
            .iter()
            .any(|&l| l != n)
            || n == 0
        {
            return Err(bad(&format!("tree {t}'s node arrays differ in length")));
        }
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let num = |v: &Value, what: &str| {
                v.as_f64()
                    .ok_or_else(|| bad(&format!("tree {t} node {i}: `{what}` is not a number")))
            };
            let l = left[i].as_i64().unwrap_or(-1);
            let cover = num(&hessian[i], "sum_hessian")?;
            if l < 0 {
                nodes.push(Node::Leaf {
                    value: num(&condition[i], "split_conditions")?,
                    cover,
                });
                continue;
            }
            if split_type.and_then(|s| s.get(i)).and_then(Value::as_i64) == Some(1) {
                return Err(ImportError::Unsupported(format!(
                    "tree {t} node {i} splits on a category; Peregrine's features are numbers"
                )));
            }
            let col = index[i].as_u64().unwrap_or(u64::MAX) as usize;
            let feature = *columns.get(col).ok_or_else(|| {
                bad(&format!(
                    "tree {t} node {i} splits on column {col} of {count}"
                ))
            })?;
            let r = right[i].as_i64().unwrap_or(-1);
            // Read as f64 from the decimal text, the f32 threshold is exact.
            let threshold = num(&condition[i], "split_conditions")? as f32;
            nodes.push(Node::Split {
                feature,
                threshold: threshold.next_down(),
                left: l as usize,
                right: r.max(0) as usize,
                cover,
            });
        }
        out.push(layout(&nodes, 0)?);
    }
    Ok(Gbt {
        base_margin: (base_score / (1.0 - base_score)).ln(),
        trees: out,
    })
}

/// A LightGBM model saved with `Booster.save_model("model.txt")`, with the
/// `binary` objective and numeric splits.
pub fn from_lightgbm(text: &str, columns: &[String]) -> Result<Gbt, ImportError> {
    let bad = |what: &str| ImportError::LightgbmFormat(what.to_string());
    let mut lines = text.lines();
    if lines.next().map(str::trim) != Some("tree") {
        return Err(bad("the first line is not `tree`"));
    }
    let mut header = std::collections::HashMap::new();
    let mut blocks: Vec<std::collections::HashMap<&str, &str>> = Vec::new();
    for line in lines {
        let line = line.trim();
        if line == "end of trees" {
            break;
        }
        if line.starts_with("Tree=") {
            blocks.push(Default::default());
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            match blocks.last_mut() {
                Some(b) => b.insert(k, v),
                None => header.insert(k, v),
            };
        }
    }
    let objective = header
        .get("objective")
        .ok_or_else(|| bad("no `objective` line"))?;
    let mut words = objective.split_whitespace();
    if words.next() != Some("binary") {
        return Err(ImportError::Unsupported(format!(
            "LightGBM objective {objective:?}: only \"binary\" scores a fraud probability"
        )));
    }
    let sigmoid: f64 = words
        .find_map(|w| w.strip_prefix("sigmoid:"))
        .map_or(Ok(1.0), |s| {
            s.parse().map_err(|_| bad("unreadable sigmoid"))
        })?;
    if header.contains_key("average_output") {
        return Err(ImportError::Unsupported(
            "a LightGBM random forest (average_output): only boosted trees".into(),
        ));
    }
    for key in ["num_class", "num_tree_per_iteration"] {
        if header.get(key).is_some_and(|v| v.trim() != "1") {
            return Err(ImportError::Unsupported(format!(
                "LightGBM {key} {}: only a single binary target",
                header[key]
            )));
        }
    }
    let count: usize = header
        .get("max_feature_idx")
        .and_then(|s| s.trim().parse::<usize>().ok())
        .ok_or_else(|| bad("no `max_feature_idx`"))?
        + 1;
    // LightGBM names unnamed columns Column_0, Column_1, ...
    let names: Option<Vec<String>> = header
        .get("feature_names")
        .map(|s| s.split_whitespace().map(String::from).collect::<Vec<_>>())
        .filter(|n| {
            !n.iter()
                .enumerate()
                .all(|(i, n)| *n == format!("Column_{i}"))
        });
    let columns = feature_map(names, count, columns)?;
    let mut out = Vec::with_capacity(blocks.len());
    for (t, b) in blocks.iter().enumerate() {
        let field = |key: &str| -> Result<Vec<f64>, ImportError> {
            let Some(v) = b.get(key) else {
                return Ok(Vec::new());
            };
            v.split_whitespace()
                .map(|s| s.parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    bad(&format!(
                        "tree {t}: `{key}` holds a value that is not a number"
                    ))
                })
        };
        if b.get("is_linear").is_some_and(|v| v.trim() != "0") {
            return Err(ImportError::Unsupported(format!(
                "tree {t} is linear (linear_tree): only constant leaves"
            )));
        }
        if b.get("num_cat").is_some_and(|v| v.trim() != "0") {
            return Err(ImportError::Unsupported(format!(
                "tree {t} splits on categories; Peregrine's features are numbers"
            )));
        }
        let leaf_value = field("leaf_value")?;
        if leaf_value.is_empty() {
            return Err(bad(&format!("tree {t} has no leaf_value")));
        }
        let leaf_weight = field("leaf_weight")?;
        let (feature, threshold) = (field("split_feature")?, field("threshold")?);
        let (decision, left, right) = (
            field("decision_type")?,
            field("left_child")?,
            field("right_child")?,
        );
        let inner = leaf_value.len() - 1;
        if [
            feature.len(),
            threshold.len(),
            decision.len(),
            left.len(),
            right.len(),
        ]
        .iter()
        .any(|&l| l != inner)
        {
            return Err(bad(&format!("tree {t}'s node arrays differ in length")));
        }
        // Inner nodes first, then leaves; a child below zero is leaf !child.
        let leaf_at = |leaf: usize| inner + leaf;
        let child = |c: f64| {
            if c < 0.0 {
                leaf_at((-c) as usize - 1)
            } else {
                c as usize
            }
        };
        let mut nodes = Vec::with_capacity(2 * inner + 1);
        for i in 0..inner {
            let d = decision[i] as u32;
            if d & 1 != 0 {
                return Err(ImportError::Unsupported(format!(
                    "tree {t} node {i} splits on a category; Peregrine's features are numbers"
                )));
            }
            // Missing type Zero treats 0 as missing, which no threshold expresses.
            if (d >> 2) & 3 == 1 {
                return Err(ImportError::Unsupported(format!(
                    "tree {t} node {i} treats zero as missing (zero_as_missing): retrain without it"
                )));
            }
            let col = feature[i] as usize;
            let feature = *columns.get(col).ok_or_else(|| {
                bad(&format!(
                    "tree {t} node {i} splits on column {col} of {count}"
                ))
            })?;
            nodes.push(Node::Split {
                feature,
                threshold: f32_at_or_below(threshold[i]),
                left: child(left[i]),
                right: child(right[i]),
                cover: 0.0,
            });
        }
        for (l, v) in leaf_value.iter().enumerate() {
            nodes.push(Node::Leaf {
                value: v * sigmoid,
                cover: leaf_weight.get(l).copied().unwrap_or(1.0),
            });
        }
        out.push(layout(&nodes, 0)?);
    }
    Ok(Gbt {
        base_margin: 0.0,
        trees: out,
    })
}

#[cfg(test)]
mod tests {
    use crate::features::NAMES;

    fn names() -> Vec<String> {
        NAMES.iter().map(|n| n.to_string()).collect()
    }

    use super::*;

    #[test]
    fn lightgbm_thresholds_become_the_largest_f32_not_above() {
        for t in [
            0.354_795_560_240_745_6,
            -1.336_742_162_704_467_6,
            3.0,
            1e300,
        ] {
            let c = f32_at_or_below(t);
            assert!(c as f64 <= t);
            assert!(c.next_up() as f64 > t);
        }
    }

    #[test]
    fn an_xgboost_tree_sends_a_value_equal_to_its_threshold_right() {
        let text = r#"{"learner": {
            "objective": {"name": "binary:logistic"},
            "feature_names": ["card.count_1h"],
            "learner_model_param": {"base_score": "[5E-1]", "num_feature": "1", "num_class": "0"},
            "gradient_booster": {"name": "gbtree", "model": {"trees": [{
                "left_children": [1, -1, -1], "right_children": [2, -1, -1],
                "split_indices": [0, 0, 0], "split_conditions": [2.5, -0.25, 0.75],
                "split_type": [0, 0, 0], "sum_hessian": [4.0, 3.0, 1.0]}]}}}}"#;
        let gbt = from_xgboost(text, &names()).unwrap();
        assert_eq!(gbt.base_margin, 0.0);
        let tree = &gbt.trees[0];
        let at = NAMES.iter().position(|n| *n == "card.count_1h").unwrap();
        let mut x = [0f32; NAMES.len()];
        x[at] = 2.5;
        assert_eq!(tree.predict(&x), 0.75);
        x[at] = 2.5f32.next_down();
        assert_eq!(tree.predict(&x), -0.25);
        // The root holds the cover-weighted mean, where attribution starts.
        assert_eq!(tree.value[0], 0.0);
        let err = from_xgboost(
            &text.replace("\"split_type\": [0, 0, 0]", "\"split_type\": [1, 0, 0]"),
            &names(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("category"), "{err}");
    }

    #[test]
    fn unknown_feature_names_are_named() {
        let e = feature_map(Some(vec!["amount".into(), "hour".into()]), 2, &names()).unwrap_err();
        assert!(e.to_string().contains("hour"), "{e}");
        assert!(!e.to_string().contains("amount,"), "{e}");
    }

    #[test]
    fn a_lightgbm_tree_walks_as_written() {
        let text = "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nmax_feature_idx=1\n\
            objective=binary sigmoid:1\nfeature_names=amount card.count_1h\n\n\
            Tree=0\nnum_leaves=3\nnum_cat=0\nsplit_feature=0 1\nthreshold=100.5 2.0000000000000004\n\
            decision_type=2 2\nleft_child=1 -1\nright_child=-2 -3\nleaf_value=0.1 -0.2 0.3\n\
            leaf_weight=1 2 3\nis_linear=0\nshrinkage=1\n\nend of trees\n";
        let gbt = from_lightgbm(text, &names()).unwrap();
        let mut x = [0f32; NAMES.len()];
        let count = NAMES.iter().position(|n| *n == "card.count_1h").unwrap();
        let amount = NAMES.iter().position(|n| *n == "amount").unwrap();
        let leaf = |x: &[f32]| gbt.trees[0].predict(x);
        x[amount] = 100.5;
        x[count] = 2.0;
        assert_eq!(leaf(&x), 0.1);
        x[count] = 3.0;
        assert_eq!(leaf(&x), 0.3);
        x[amount] = 100.50001;
        assert_eq!(leaf(&x), -0.2);
        let err = from_lightgbm(&text.replace("amount", "hour_of_day"), &names()).unwrap_err();
        assert!(err.to_string().contains("hour_of_day"), "{err}");
        let err = from_lightgbm(
            &text.replace("decision_type=2 2", "decision_type=2 6"),
            &names(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("zero_as_missing"), "{err}");
    }
}
