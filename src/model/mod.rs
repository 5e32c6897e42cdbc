//! Models: stored formats with metadata, training, and scoring with reasons.

pub mod builtin;
pub mod iforest;
pub mod import;
pub mod logistic;
pub mod rules;
pub mod scorer;
pub mod trees;
pub mod tune;

use crate::features::file::Plan;
use crate::features::{FeatureConfig, idx};
use iforest::{IsolationForest, IsolationParams};
use logistic::{Logistic, LogisticParams};
use serde::{Deserialize, Serialize};
use std::path::Path;
use trees::{Forest, ForestParams, Gbt, GbtParams};

pub const FORMAT: &str = "peregrine-model";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Algo {
    /// Logistic regression (linfa-logistic).
    Logistic,
    /// Random forest.
    Forest,
    /// Gradient-boosted trees.
    Gbt,
    /// Isolation forest: unsupervised, ignores the labels.
    Iforest,
}

impl Algo {
    pub fn as_str(self) -> &'static str {
        match self {
            Algo::Logistic => "logistic",
            Algo::Forest => "forest",
            Algo::Gbt => "gbt",
            Algo::Iforest => "iforest",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Body {
    Logistic(Logistic),
    Forest(Forest),
    Gbt(Gbt),
    Iforest(IsolationForest),
}

/// Score cut-offs: at or over `review` an alert asks for review, at or over
/// `block` for a block.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    pub review: f64,
    pub block: f64,
    /// The anomaly score at which an alert is raised whatever the model's
    /// score. `None`: the anomaly score is only reported on alerts, which
    /// spares computing it for every transaction.
    pub anomaly_review: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Training {
    pub data: String,
    pub from: String,
    pub to: String,
    pub rows: usize,
    pub frauds: usize,
    pub seconds: f64,
    /// The library and file a model was imported from (`peregrine import`);
    /// the window fields are then empty, as Peregrine did not see the data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<String>,
}

/// A stored model: what it needs to score, and what a reader needs to trust it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub format: String,
    pub format_version: u32,
    pub model_version: String,
    pub algo: Algo,
    pub created_at: String,
    /// Feature names in the order the model reads them.
    pub features: Vec<String>,
    /// The features file the columns come from; none for the default one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features_file: Option<String>,
    pub feature_config: FeatureConfig,
    pub training: Training,
    /// In-sample metrics of the training window, and any evaluations added later.
    pub metrics: serde_json::Map<String, serde_json::Value>,
    pub thresholds: Thresholds,
    pub body: Body,
    /// An unsupervised score trained alongside, reported with every score.
    pub anomaly: Option<IsolationForest>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read model {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("model {path} is not a valid model file: {reason}")]
    Invalid { path: String, reason: String },
    #[error(
        "model {path} was trained on features that differ from this engine's: {reason}; retrain it with this version"
    )]
    FeatureMismatch { path: String, reason: String },
}

/// The features the anomaly score reads: the card's behaviour, not labels.
pub const ANOMALY_FEATURES: [usize; 12] = [
    idx::AMOUNT,
    idx::CARD_COUNT_1D,
    idx::CARD_MEAN_30D,
    idx::RATIO_7D,
    idx::RATIO_30D,
    idx::ZSCORE_30D,
    idx::LARGE_7D,
    idx::CARD_COUNT_1H,
    idx::DISTINCT_MERCHANTS_1D,
    idx::SECS_SINCE_PREV,
    idx::VELOCITY,
    idx::MERCHANT_COUNT_1H,
];

#[derive(Debug, Clone, Copy, Default)]
pub struct TrainParams {
    pub logistic: LogisticParams,
    pub forest: ForestParams,
    pub gbt: GbtParams,
    pub iforest: IsolationParams,
}

/// A training parameter out of its range, named as `train`'s flag is.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {reason}")]
pub struct ParamError {
    pub flag: &'static str,
    pub reason: String,
}

impl TrainParams {
    /// Checks every parameter up front, so that a typo trains nothing
    /// rather than a constant or diverging model.
    pub fn validate(&self) -> Result<(), ParamError> {
        let fail = |flag, reason: String| Err(ParamError { flag, reason });
        let g = &self.gbt;
        for (flag, n) in [
            ("trees", g.rounds),
            ("trees", self.forest.trees),
            ("trees", self.iforest.trees),
        ] {
            if n == 0 || n > 100_000 {
                return fail(flag, format!("must be between 1 and 100000, got {n}"));
            }
        }
        for d in [g.tree.max_depth, self.forest.tree.max_depth] {
            if d == 0 || d > 32 {
                return fail("max-depth", format!("must be between 1 and 32, got {d}"));
            }
        }
        if !(g.learning_rate > 0.0 && g.learning_rate <= 1.0) {
            return fail(
                "learning-rate",
                format!("must be above 0 and at most 1, got {}", g.learning_rate),
            );
        }
        for (flag, v) in [
            ("lambda", g.tree.lambda),
            ("lambda", self.logistic.alpha),
            ("min-child-weight", g.tree.min_child_weight),
            ("min-child-weight", self.forest.tree.min_child_weight),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return fail(
                    flag,
                    format!("must be a finite number of at least 0, got {v}"),
                );
            }
        }
        Ok(())
    }
}

impl Model {
    /// Fits `algo` on row-major features `x` (the columns of `plan`) with
    /// labels `y`.
    pub fn fit(
        algo: Algo,
        plan: &Plan,
        x: &[f32],
        y: &[u8],
        p: &TrainParams,
    ) -> anyhow::Result<(Body, Option<IsolationForest>)> {
        let cols = plan.width();
        let anomaly = IsolationForest::train(x, cols, plan.anomaly.clone(), &p.iforest);
        let body = match algo {
            Algo::Logistic => Body::Logistic(Logistic::train(x, y, cols, &p.logistic)?),
            Algo::Forest => Body::Forest(Forest::train(x, y, cols, &p.forest)),
            Algo::Gbt => Body::Gbt(Gbt::train(x, y, cols, &p.gbt)),
            Algo::Iforest => return Ok((Body::Iforest(anomaly), None)),
        };
        Ok((body, Some(anomaly)))
    }

    /// Wraps gradient-boosted trees trained by another library on the
    /// features of `feature_config` (see [`import`]). It has no anomaly
    /// score, which needs the data, and the default thresholds.
    pub fn imported(
        body: Gbt,
        library: &str,
        file: &str,
        plan: &Plan,
        feature_config: FeatureConfig,
    ) -> Model {
        let digest =
            crate::features::store::key_hash(&serde_json::to_string(&body).unwrap_or_default());
        Model {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            model_version: format!("{library}-{:08x}", digest >> 32),
            algo: Algo::Gbt,
            created_at: crate::alerts::now_rfc3339(),
            features: plan.names.clone(),
            features_file: Model::file_of(plan),
            feature_config,
            training: Training {
                data: String::new(),
                from: String::new(),
                to: String::new(),
                rows: 0,
                frauds: 0,
                seconds: 0.0,
                imported_from: Some(format!("{library} {file}")),
            },
            metrics: serde_json::Map::new(),
            thresholds: Model::default_thresholds(Algo::Gbt),
            body: Body::Gbt(body),
            anomaly: None,
        }
    }

    /// What a model stores of its plan: the file's text, unless it is the default.
    pub fn file_of(plan: &Plan) -> Option<String> {
        (!plan.is_default()).then(|| plan.source.clone())
    }

    /// The model's features file, compiled.
    pub fn plan(&self) -> Result<Plan, crate::features::file::FileError> {
        match &self.features_file {
            Some(text) => Plan::compile(text),
            None => Ok(Plan::default_plan().clone()),
        }
    }

    pub fn default_thresholds(algo: Algo) -> Thresholds {
        match algo {
            Algo::Iforest => Thresholds {
                review: 0.65,
                block: 0.75,
                anomaly_review: None,
            },
            _ => Thresholds {
                review: 0.5,
                block: 0.9,
                anomaly_review: None,
            },
        }
    }

    pub fn load(path: &Path) -> Result<Model, ModelError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: shown.clone(),
            source,
        })?;
        Model::from_json(&text, &shown)
    }

    pub fn from_json(text: &str, path: &str) -> Result<Model, ModelError> {
        let invalid = |reason: String| ModelError::Invalid {
            path: path.to_string(),
            reason,
        };
        let head: serde_json::Value =
            serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        if head.get("format").and_then(|v| v.as_str()) != Some(FORMAT) {
            return Err(invalid(format!("`format` is not \"{FORMAT}\"")));
        }
        let version = head.get("format_version").and_then(|v| v.as_u64());
        if version != Some(FORMAT_VERSION as u64) {
            return Err(invalid(format!(
                "format_version {version:?} is not supported (this build reads {FORMAT_VERSION})"
            )));
        }
        let mismatch = |reason: String| ModelError::FeatureMismatch {
            path: path.to_string(),
            reason,
        };
        let file = head.get("features_file").and_then(|v| v.as_str());
        let plan = match file {
            Some(text) => Plan::compile(text).map_err(|e| mismatch(e.to_string()))?,
            None => Plan::default_plan().clone(),
        };
        if let Some(names) = head.get("features").and_then(|v| v.as_array()) {
            let names: Vec<&str> = names.iter().filter_map(|v| v.as_str()).collect();
            check_features(&names, &plan).map_err(mismatch)?;
        }
        let model: Model = serde_json::from_value(head).map_err(|e| invalid(e.to_string()))?;
        model.validate(plan.width()).map_err(invalid)?;
        Ok(model)
    }

    fn validate(&self, width: usize) -> Result<(), String> {
        let trees: Vec<&trees::Tree> = match &self.body {
            Body::Logistic(l) => {
                if l.weights.len() != width
                    || l.scaling.mean.len() != width
                    || l.scaling.std.len() != width
                    || l.scaling.log1p.len() != width
                {
                    return Err("logistic weights or scaling do not match the feature count".into());
                }
                Vec::new()
            }
            Body::Forest(f) => f.trees.iter().collect(),
            Body::Gbt(g) => g.trees.iter().collect(),
            Body::Iforest(f) => f.trees.iter().collect(),
        };
        for t in trees
            .into_iter()
            .chain(self.anomaly.iter().flat_map(|a| a.trees.iter()))
        {
            t.validate(width)?;
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string(self)?;
        std::fs::write(path, text)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))
    }
}

/// The model's feature list must be its features file's (the default
/// file's when it stores none), name for name and in order.
pub fn check_features(names: &[&str], plan: &Plan) -> Result<(), String> {
    let expected: Vec<&str> = plan.names.iter().map(String::as_str).collect();
    if names == expected {
        return Ok(());
    }
    let missing: Vec<&str> = expected
        .iter()
        .filter(|n| !names.contains(n))
        .copied()
        .collect();
    let unknown: Vec<&str> = names
        .iter()
        .filter(|n| !expected.contains(n))
        .copied()
        .collect();
    if missing.is_empty() && unknown.is_empty() {
        return Err("the same features in a different order".into());
    }
    let mut parts = Vec::new();
    if !unknown.is_empty() {
        parts.push(format!("not in its features file: {}", unknown.join(", ")));
    }
    if !missing.is_empty() {
        parts.push(format!("missing from the model: {}", missing.join(", ")));
    }
    Err(parts.join("; "))
}
