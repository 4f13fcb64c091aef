//! What the benchmarks share: a line on stdout, and the `projectionist`
//! binary they measure.

use std::path::PathBuf;

use anyhow::{Context, bail};

/// Writes one line of text to stdout; a closed pipe is not an error.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}
#[allow(unused_imports)] // Used as `crate::common::out`.
pub(crate) use out;

pub(crate) static PROJECTIONIST: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The `projectionist` binary to run as the follower: `--projectionist`, else
/// the one built beside this binary (`cargo build --release` builds both).
pub(crate) fn projectionist_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = PROJECTIONIST.get() {
        return Ok(path.clone());
    }
    let exe = std::env::current_exe().context("locate this binary")?;
    let beside = exe.with_file_name(format!("projectionist{}", std::env::consts::EXE_SUFFIX));
    if !beside.is_file() {
        bail!(
            "no projectionist binary at {}: build it first (cargo build --release -p projectionist-cli) or pass --projectionist PATH",
            beside.display()
        );
    }
    Ok(beside)
}
