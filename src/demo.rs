//! `peregrine demo`: the whole engine on simulated data with the built-in model.

use clap::Args;

#[derive(Args)]
pub struct DemoArgs {}

pub fn run(_a: DemoArgs, _progress: bool) -> anyhow::Result<()> {
    anyhow::bail!("the demo needs the built-in model")
}
