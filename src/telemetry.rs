//! Log lines: UTC time, level, message, on stderr.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by a caller that shows its own progress (the demo): INFO lines are dropped.
pub static QUIET: AtomicBool = AtomicBool::new(false);

pub fn log(level: &str, msg: impl std::fmt::Display) {
    if level == "INFO" && QUIET.load(Ordering::Relaxed) {
        return;
    }
    eprintln!("{} {level:<5} {msg}", crate::alerts::now_rfc3339());
}
