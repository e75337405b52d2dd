//! Configuration errors and where they are: the file, the line, and the
//! line of each value that is checked only when used.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use super::limits::QUOTE_CHARS;
use super::tls_settings::{NamesFile, PemKind};

/// At most this many characters of a message are shown, whatever it quotes:
/// no input can make an error flood the terminal or the log.
const MAX_MESSAGE_CHARS: usize = 1000;

/// The first [`QUOTE_CHARS`] characters of `text`, marked when cut.
pub fn clip(text: &str) -> Cow<'_, str> {
    clip_to(text, QUOTE_CHARS)
}

/// `text` in double quotes, as `{:?}` shows it, cut to [`QUOTE_CHARS`].
pub fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTE_CHARS) {
        Some((end, _)) => format!("{:?}...", &text[..end]),
        None => format!("{text:?}"),
    }
}

/// A whole message, cut to [`MAX_MESSAGE_CHARS`].
pub(super) fn clip_message(message: &str) -> Cow<'_, str> {
    clip_to(message, MAX_MESSAGE_CHARS)
}

fn clip_to(text: &str, chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(chars) {
        Some((end, _)) => Cow::Owned(format!("{}...", &text[..end])),
        None => Cow::Borrowed(text),
    }
}

/// A configuration error: names the file, the line where known, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: ", self.file.display())?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        f.write_str(&clip_message(&self.message))
    }
}

/// `text` up to a `#` outside any quoted string (TOML's basic `"..."` with
/// escapes, and literal `'...'`).
fn without_comment(text: &str) -> &str {
    let mut quote = None;
    let mut escaped = false;
    for (at, char) in text.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if char == '\\' => escaped = true,
            Some(open) if char == open => quote = None,
            Some(_) => {}
            None if char == '#' => return &text[..at],
            None if char == '"' || char == '\'' => quote = Some(char),
            None => {}
        }
    }
    text
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

impl KeyLine {
    /// The line `line` of a TOML file, whose `text` an error quotes: the key
    /// and value it holds, without a comment, cut to [`QUOTE_CHARS`].
    pub(super) fn quoting(file: &Path, line: usize, text: &str) -> KeyLine {
        let setting = without_comment(text).trim();
        KeyLine {
            file: file.to_owned(),
            line,
            quote: (!setting.is_empty()).then(|| clip(setting).into_owned()),
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
