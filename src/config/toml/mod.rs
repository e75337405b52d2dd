//! The TOML reader: parsed with serde into raw types that keep source spans,
//! then validated into the plain types of [`crate::config`].

mod from_fluent_bit;
pub(super) mod raw;
mod validate;

use std::borrow::Cow;
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::limits::{MAX_FILE_BYTES, MAX_KEYS_PER_SECTION, MAX_LINE_BYTES, MAX_TABLES};
use super::{clip, Config, ConfigError, FileLines, KeyLine, PemKind};
use raw::RawConfig;

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let whole_file = |message: String| ConfigError {
            file: path.to_owned(),
            line: None,
            message,
        };
        let text = read_bounded(path)
            .map_err(|err| whole_file(format!("cannot read the configuration: {err}")))?;
        let text = String::from_utf8(text).map_err(|_| {
            whole_file("cannot read the configuration: it is not valid UTF-8".to_owned())
        })?;
        Config::parse(&text, path)
    }

    /// Validates configuration `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let source = Source::new(text, path)?;
        let raw: RawConfig = toml::from_str(text)
            .map_err(|err| source.error(err.span(), clip_quoted_names(err.message().trim_end())))?;
        source.validate(raw)
    }
}

/// The file's content, or an error past [`MAX_FILE_BYTES`] having read only
/// that much (the file may be a device or pipe that never ends).
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut text = Vec::new();
    File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "it is larger than {MAX_FILE_BYTES} bytes"
        )));
    }
    Ok(text)
}

/// The TOML parser's message, with each name or value it quotes in
/// backticks (an unknown key, an unknown variant) cut to [`QUOTE_CHARS`]
/// characters.
fn clip_quoted_names(message: &str) -> String {
    message
        .split('`')
        .enumerate()
        .map(|(index, part)| {
            if index % 2 == 1 {
                clip(part)
            } else {
                Cow::Borrowed(part)
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

/// Counts the `key = value` lines of the current table, so that a table of
/// a million keys is refused before the TOML parser builds it. Lines inside
/// multi-line strings are not keys.
#[derive(Default)]
struct TableKeys {
    /// Table headers so far.
    tables: usize,
    keys: usize,
    /// Inside a multi-line string: its delimiter.
    open_string: Option<&'static str>,
}

impl TableKeys {
    /// Takes the next line; returns the keys of its table so far.
    fn read(&mut self, line: &str) -> usize {
        let content = line.trim_start();
        if self.open_string.is_none() {
            if content.starts_with('[') {
                self.tables += 1;
                self.keys = 0;
            } else if !content.starts_with('#') && content.contains('=') {
                self.keys += 1;
            }
        }
        for delimiter in ["\"\"\"", "'''"] {
            if self.open_string.is_none_or(|open| open == delimiter)
                && content.matches(delimiter).count() % 2 == 1
            {
                self.open_string = match self.open_string {
                    Some(_) => None,
                    None => Some(delimiter),
                };
            }
        }
        self.keys
    }
}

/// The text being validated, for turning spans into line numbers.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
    /// The byte offset where each line starts, found in one pass so that
    /// placing every key costs a binary search, not a scan of the file.
    line_starts: Vec<usize>,
}

impl<'a> Source<'a> {
    /// Indexes the lines of `text`, which must each be at most
    /// [`MAX_LINE_BYTES`] long.
    fn new(text: &'a str, path: &'a Path) -> Result<Source<'a>, ConfigError> {
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(ConfigError {
                file: path.to_owned(),
                line: None,
                message: format!("the file is larger than {MAX_FILE_BYTES} bytes"),
            });
        }
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(at, _)| at + 1));
        let source = Source {
            text,
            path,
            line_starts,
        };
        let mut table_keys = TableKeys::default();
        for line in 1..=source.line_starts.len() {
            let text = source.line_text(line);
            if text.len() > MAX_LINE_BYTES {
                return Err(source
                    .key_line_at(line)
                    .error(format!("the line is longer than {MAX_LINE_BYTES} bytes")));
            }
            if table_keys.read(text) > MAX_KEYS_PER_SECTION {
                return Err(source.key_line_at(line).error(format!(
                    "more than {MAX_KEYS_PER_SECTION} keys in one table"
                )));
            }
            if table_keys.tables > MAX_TABLES {
                return Err(source
                    .key_line_at(line)
                    .error(format!("more than {MAX_TABLES} tables in the file")));
            }
        }
        Ok(source)
    }

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
        let line = self
            .line_starts
            .partition_point(|&line_start| line_start <= start);
        self.key_line_at(line)
    }

    fn key_line_at(&self, line: usize) -> KeyLine {
        KeyLine::quoting(self.path, line, self.line_text(line))
    }

    /// Line `line` (from 1), without its line ending.
    fn line_text(&self, line: usize) -> &'a str {
        let start = self.line_starts[line - 1];
        let end = self
            .line_starts
            .get(line)
            .map_or(self.text.len(), |next| next - 1);
        let text = &self.text[start..end];
        text.strip_suffix('\r').unwrap_or(text)
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
