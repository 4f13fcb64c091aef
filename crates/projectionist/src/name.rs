//! `ProjectionName`: a projection name proven safe to use as a file name inside
//! the projection directory.

use std::fmt;

use crate::error::{Error, Result};
use crate::limits::NAME_LEN_MAX;

/// The message for a name over [`NAME_LEN_MAX`] (a `&'static str`, so the
/// number is checked against the bound at compile time below).
const NAME_TOO_LONG: &str = "name is longer than 128 bytes";
const _: () = assert!(NAME_LEN_MAX == 128, "update NAME_TOO_LONG");

/// A validated projection name.
///
/// Allowed: 1 to [`NAME_LEN_MAX`] bytes of ASCII letters, digits, `_`, `-` and `.`,
/// not starting with `.` or `-`, not containing `..`. Everything else (path
/// separators, NUL and control characters, spaces, non-ASCII, Windows device
/// names) is rejected, so a name can never reach outside the directory or collide
/// with the directory's own lock files (which start with a dot).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProjectionName(String);

impl ProjectionName {
    /// Validates `name`.
    ///
    /// # Errors
    /// [`Error::InvalidName`] quoting the name and saying why.
    pub fn new(name: &str) -> Result<Self> {
        match check(name) {
            Ok(()) => Ok(ProjectionName(name.to_owned())),
            Err(reason) => Err(Error::InvalidName {
                name: name.to_owned(),
                reason,
            }),
        }
    }

    /// The name as text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ProjectionName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Device names that Windows refuses as file names, whatever the extension.
const RESERVED: [&str; 22] = [
    "con", "prn", "aux", "nul", "com1", "com2", "com3", "com4", "com5", "com6", "com7", "com8",
    "com9", "lpt1", "lpt2", "lpt3", "lpt4", "lpt5", "lpt6", "lpt7", "lpt8", "lpt9",
];

fn check(name: &str) -> std::result::Result<(), &'static str> {
    if name.is_empty() {
        return Err("name is empty");
    }
    if name.len() > NAME_LEN_MAX {
        return Err(NAME_TOO_LONG);
    }
    if name.contains('/') || name.contains('\\') {
        return Err("name contains a path separator");
    }
    if name.chars().any(|c| c == '\0' || c.is_control()) {
        return Err("name contains a NUL or control character");
    }
    if name.contains("..") {
        return Err("name contains '..'");
    }
    if name.starts_with('.') {
        return Err("name starts with '.'");
    }
    if name.starts_with('-') {
        return Err("name starts with '-'");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err("name may contain only ASCII letters, digits, '_', '-' and '.'");
    }
    let stem = name.split('.').next().unwrap_or(name).to_ascii_lowercase();
    if RESERVED.contains(&stem.as_str()) {
        return Err("name is a reserved device name");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for name in ["orders", "order_summary", "v2.customers", "a-b", "A1"] {
            assert!(ProjectionName::new(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn length_bound_is_exact() {
        assert!(ProjectionName::new(&"a".repeat(NAME_LEN_MAX)).is_ok());
        assert!(ProjectionName::new(&"a".repeat(NAME_LEN_MAX + 1)).is_err());
    }
}
