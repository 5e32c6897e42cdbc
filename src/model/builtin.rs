//! The model and rules built into the binary (`models/` in the repository),
//! so the demo and a service without `--model` need no files.

use super::Model;
use super::rules::parse_rules;
use super::scorer::Scorer;

pub const DEFAULT_MODEL: &str = include_str!("../../models/default.json");
pub const DEFAULT_RULES: &str = include_str!("../../models/default.rules");

pub fn scorer() -> anyhow::Result<Scorer> {
    let model = Model::from_json(DEFAULT_MODEL, "built-in model")?;
    let rules = parse_rules(DEFAULT_RULES)?;
    Ok(Scorer::new(model, rules))
}
