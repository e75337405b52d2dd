//! The TOML reader: parsed with serde into raw types that keep source spans,
//! then validated into the plain types of [`crate::config`].

mod from_fluent_bit;
pub(super) mod raw;
mod validate;

use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::{Config, ConfigError, FileLines, KeyLine, PemKind};
use raw::RawConfig;

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            file: path.to_owned(),
            line: None,
            message: format!("cannot read the configuration: {err}"),
        })?;
        Config::parse(&text, path)
    }

    /// Validates configuration `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let source = Source { text, path };
        let raw: RawConfig = toml::from_str(text)
            .map_err(|err| source.error(err.span(), err.message().trim_end().to_owned()))?;
        source.validate(raw)
    }
}

/// The text being validated, for turning spans into line numbers.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    fn error(&self, span: Option<Range<usize>>, message: String) -> ConfigError {
        match span {
            Some(span) => self.key_line(span).error(message),
            None => ConfigError {
                file: self.path.to_owned(),
                line: None,
                message,
            },
        }
    }

    /// The line holding the start of `span`.
    fn key_line(&self, span: Range<usize>) -> KeyLine {
        let start = span.start.min(self.text.len());
        let line = self.text[..start].matches('\n').count() + 1;
        let quote = self
            .text
            .lines()
            .nth(line - 1)
            .map(str::trim)
            .filter(|text| !text.is_empty())
            .map(str::to_owned);
        KeyLine {
            file: self.path.to_owned(),
            line,
            quote,
        }
    }

    /// A TLS file key's path, relative to the file's directory; notes its line in `lines`.
    fn tls_file(&self, value: Spanned<PathBuf>, kind: PemKind, lines: &mut FileLines) -> PathBuf {
        let line = self.key_line(value.span());
        let path = self.relative(value.into_inner());
        lines.add(&path, kind, line);
        path
    }

    fn error_at<T>(&self, spanned: &Spanned<T>, message: String) -> ConfigError {
        self.error(Some(spanned.span()), message)
    }

    /// Relative paths in the file are relative to the file's directory.
    fn relative(&self, path: PathBuf) -> PathBuf {
        match self.path.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path,
        }
    }
}

#[cfg(test)]
mod tests;
