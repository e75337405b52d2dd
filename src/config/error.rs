//! Configuration errors and where they are: the file, the line, and the
//! line of each value that is checked only when used.

use std::fmt;
use std::path::{Path, PathBuf};

use super::tls_settings::{NamesFile, PemKind};

#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file.display(), line, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Where a key was written, so that an error found only when its value is
/// used (a host that does not resolve, a TLS file that cannot be read) names
/// the line as an error found while reading the file does.
#[derive(Debug, Clone)]
pub struct KeyLine {
    pub(super) file: PathBuf,
    pub(super) line: usize,
    /// The line as written, quoted in errors; `None` in Fluent Bit files,
    /// whose errors do not quote their lines.
    pub(super) quote: Option<String>,
}

impl KeyLine {
    /// An error about the value written on this line.
    pub fn error(&self, message: String) -> ConfigError {
        // Quoting the offending line names the key even when the message
        // only talks about the value.
        let message = match &self.quote {
            Some(quote) => format!("{message} (in `{quote}`)"),
            None => message,
        };
        ConfigError {
            file: self.file.clone(),
            line: Some(self.line),
            message,
        }
    }
}

/// Where a value was written is not part of the configuration: a reload
/// that only moves lines changes nothing.
impl PartialEq for KeyLine {
    fn eq(&self, _: &KeyLine) -> bool {
        true
    }
}

impl Eq for KeyLine {}

/// The line naming each TLS file (or `ca_path` directory) of a listener or
/// server, in the order they are read, for the errors of reading them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileLines(Vec<(PathBuf, PemKind, KeyLine)>);

impl FileLines {
    pub(super) fn add(&mut self, path: &Path, kind: PemKind, line: KeyLine) {
        self.0.push((path.to_owned(), kind, line));
    }

    /// The line of the setting whose file `err` is about.
    pub fn naming(&self, err: &impl NamesFile) -> Option<&KeyLine> {
        let (path, kind) = err.file()?;
        self.of(path, kind)
    }

    /// The first line naming `path` for holding `kind` (any, if `None`), else
    /// the first naming a directory holding it.
    pub(super) fn of(&self, path: &Path, kind: Option<PemKind>) -> Option<&KeyLine> {
        let named = |exact: bool| {
            self.0
                .iter()
                .filter(|(_, holds, _)| kind.is_none_or(|kind| kind == *holds))
                .find(|(named, _, _)| {
                    if exact {
                        named == path
                    } else {
                        path.starts_with(named)
                    }
                })
                .map(|(_, _, line)| line)
        };
        named(true).or_else(|| named(false))
    }
}

/// A configuration error found only when a value is used, after the file
/// was read: with the line of the value where sluice knows it.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error(transparent)]
    At(#[from] ConfigError),
    #[error("{0}")]
    Unplaced(String),
}

impl ValueError {
    /// As an error of the configuration `file`, unless it names its own
    /// (a Fluent Bit file).
    pub fn in_file(self, file: &Path) -> ConfigError {
        match self {
            ValueError::At(err) => err,
            ValueError::Unplaced(message) => ConfigError {
                file: file.to_owned(),
                line: None,
                message,
            },
        }
    }
}
