//! Reader for Fluent Bit "Upstream" files, so operators can point sluice at
//! the node lists they already keep for Fluent Bit's Forward output.
//!
//! Two layouts are understood:
//! - the classic one: one `[UPSTREAM]` section with a `name`, then `[NODE]`
//!   sections with `name`, `host`, `port` and optional `tls*` keys, plus
//!   `@INCLUDE` and `${VAR}` / `${VAR:-default}` expansion;
//! - the YAML one (`.yaml` / `.yml`): `upstream_servers:` holding exactly one
//!   entry with `name` and `nodes`.
//!
//! Keys the balancer has no use for (`shared_key`, `username`, ...) are kept
//! in [`Node::extra`] in file order. Every error names the file and, where
//! there is one, the line.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use saphyr_parser::{Event, Parser, ScalarStyle, StrInput};

use crate::config::limits::{
    MAX_FILE_BYTES, MAX_INCLUDE_DEPTH, MAX_KEYS_PER_SECTION, MAX_LINE_BYTES, MAX_SERVERS,
};
use crate::config::{clip, clip_message, quoted};

/// How deep YAML collections may nest; an upstream file needs four levels,
/// and the bound keeps hostile input from exhausting the stack.
const MAX_YAML_DEPTH: usize = 16;

/// The upstream described by one file (and whatever it includes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamFile {
    pub name: String,
    /// Nodes in file order; included files contribute theirs where the
    /// `@INCLUDE` line stands.
    pub nodes: Vec<Node>,
}

/// One `[NODE]` section (or one entry of a YAML `nodes` list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: bool,
    /// Defaults to true, as in Fluent Bit.
    pub tls_verify: bool,
    /// SNI name to send instead of `host`.
    pub tls_vhost: Option<String>,
    /// Paths exactly as written (Fluent Bit does not resolve them either).
    pub tls_ca_file: Option<PathBuf>,
    pub tls_ca_path: Option<PathBuf>,
    pub tls_crt_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Every other key (lower-cased) with its value, in file order: plugin
    /// settings such as `shared_key`, kept but not interpreted.
    pub extra: Vec<(String, String)>,
    /// The file holding the section and the line where it starts.
    pub file: PathBuf,
    pub line: usize,
    /// The line of each key (lower-cased), in file order, for errors found
    /// only when a value is used, such as a host that does not resolve.
    pub key_lines: Vec<(String, usize)>,
}

impl Node {
    /// The line of `key` (lower-cased), else the line where the section starts.
    pub fn line_of(&self, key: &str) -> usize {
        self.key_lines
            .iter()
            .find(|(named, _)| named == key)
            .map_or(self.line, |(_, line)| *line)
    }
}

/// Why a file could not be read as an upstream file, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", location(.file, .line), clip_message(.message))]
pub struct FluentBitError {
    pub file: PathBuf,
    /// None when the problem is the file as a whole (unreadable, no upstream).
    pub line: Option<usize>,
    pub message: String,
}

fn location(file: &Path, line: &Option<usize>) -> String {
    match line {
        Some(line) => format!("{}:{line}", file.display()),
        None => file.display().to_string(),
    }
}

impl FluentBitError {
    fn at(file: &Path, line: usize, message: impl Into<String>) -> Self {
        FluentBitError {
            file: file.to_path_buf(),
            line: Some(line),
            message: message.into(),
        }
    }

    fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        FluentBitError {
            file: file.to_path_buf(),
            line: None,
            message: message.into(),
        }
    }
}

/// Reads an upstream file, expanding `${VAR}` from the process environment.
/// `.yaml` / `.yml` files (any case) are read as YAML, anything else as the
/// classic format.
pub fn load(path: &Path) -> Result<UpstreamFile, FluentBitError> {
    load_with_env(path, &|name| std::env::var(name).ok())
}

/// Like [`load`], with `${VAR}` looked up through `env`.
pub fn load_with_env(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpstreamFile, FluentBitError> {
    let text = read_utf8(path, MAX_FILE_BYTES).map_err(|failure| match failure {
        ReadFailure::Io(error) => {
            FluentBitError::whole_file(path, format!("cannot read file: {error}"))
        }
        ReadFailure::NotUtf8 { line } => FluentBitError::at(path, line, "not valid UTF-8"),
    })?;
    if is_yaml_path(path) {
        parse_yaml(&text, path, env)
    } else {
        parse_classic(&text, path, env)
    }
}

/// Parses classic-format `text` as the content of `path`; `@INCLUDE` paths
/// are resolved relative to the directory of `path`.
pub fn parse_classic(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpstreamFile, FluentBitError> {
    check_size(text, path)?;
    let mut reader = ClassicReader {
        env: Environment::new(env),
        sections: Vec::new(),
        open_files: Vec::new(),
        read_files: HashSet::new(),
        read_bytes: text.len() as u64,
        nodes: 0,
    };
    // `path` may not exist (text handed in directly); then only its
    // includes take part in cycle detection.
    if let Ok(canonical) = fs::canonicalize(path) {
        reader.read_files.insert(canonical.clone());
        reader.open_files.push(canonical);
    }
    reader.read_text(text, path, 0)?;
    build_upstream(reader.sections, path)
}

/// Parses YAML-format `text` as the content of `path`.
pub fn parse_yaml(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<UpstreamFile, FluentBitError> {
    check_size(text, path)?;
    check_line_lengths(text, path)?;
    let root = read_yaml_document(text, path)?;
    let sections = yaml_sections(root, path, &mut Environment::new(env))?;
    build_upstream(sections, path)
}

fn is_yaml_path(path: &Path) -> bool {
    path.extension()
        .and_then(|extension| extension.to_str())
        .is_some_and(|extension| {
            extension.eq_ignore_ascii_case("yaml") || extension.eq_ignore_ascii_case("yml")
        })
}

/// A file of more than [`MAX_FILE_BYTES`] is refused whole.
fn check_size(text: &str, path: &Path) -> Result<(), FluentBitError> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(FluentBitError::whole_file(
            path,
            format!("the file is larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    Ok(())
}

/// Every line at most [`MAX_LINE_BYTES`] long; else an error at the first longer one.
fn check_line_lengths(text: &str, path: &Path) -> Result<(), FluentBitError> {
    match text
        .split('\n')
        .position(|line| line.len() > MAX_LINE_BYTES)
    {
        Some(index) => Err(line_too_long(path, index + 1)),
        None => Ok(()),
    }
}

fn too_many_nodes(path: &Path, line: usize) -> FluentBitError {
    FluentBitError::at(path, line, format!("more than {MAX_SERVERS} nodes"))
}

fn line_too_long(path: &Path, line: usize) -> FluentBitError {
    FluentBitError::at(
        path,
        line,
        format!("the line is longer than {MAX_LINE_BYTES} bytes"),
    )
}

enum ReadFailure {
    Io(std::io::Error),
    NotUtf8 { line: usize },
}

/// At most `limit` bytes are read: a device or a file that grows while it
/// is read (`/dev/zero`) fails at the limit.
fn read_utf8(path: &Path, limit: u64) -> Result<String, ReadFailure> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|file| file.take(limit.saturating_add(1)).read_to_end(&mut bytes))
        .map_err(ReadFailure::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadFailure::Io(std::io::Error::other(format!(
            "more than {MAX_FILE_BYTES} bytes in the file and its includes"
        ))));
    }
    String::from_utf8(bytes).map_err(|error| {
        let valid_len = error.utf8_error().valid_up_to();
        let newlines = error
            .as_bytes()
            .iter()
            .take(valid_len)
            .filter(|&&byte| byte == b'\n')
            .count();
        ReadFailure::NotUtf8 { line: newlines + 1 }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SectionKind {
    Upstream,
    Node,
}

/// A section as read, before its keys are interpreted; both layouts are
/// reduced to these so they share one set of checks.
struct RawSection {
    kind: SectionKind,
    file: PathBuf,
    line: usize,
    entries: Vec<RawEntry>,
    /// The line of each key so far, for a linear duplicate check.
    key_lines: HashMap<String, usize>,
}

struct RawEntry {
    /// Lower-cased.
    key: String,
    /// After `${VAR}` expansion.
    value: String,
    line: usize,
}

impl RawSection {
    fn new(kind: SectionKind, file: &Path, line: usize) -> Self {
        RawSection {
            kind,
            file: file.to_path_buf(),
            line,
            entries: Vec::new(),
            key_lines: HashMap::new(),
        }
    }

    /// Expands `raw_value` and records it under `key`.
    fn add(
        &mut self,
        key: &str,
        raw_value: &str,
        line: usize,
        env: &mut Environment<'_>,
    ) -> Result<(), FluentBitError> {
        let key = key.to_ascii_lowercase();
        let at = |message: String| FluentBitError::at(&self.file, line, message);
        let shown = quoted(&key);
        if self.kind == SectionKind::Upstream && key != "name" {
            return Err(at(format!(
                "unknown key {shown} in the upstream section (it takes only \"name\")"
            )));
        }
        if let Some(first) = self.key_lines.get(&key) {
            return Err(at(format!(
                "duplicate key {shown} (first set at line {first})"
            )));
        }
        if self.entries.len() == MAX_KEYS_PER_SECTION {
            return Err(at(format!(
                "more than {MAX_KEYS_PER_SECTION} keys in one section"
            )));
        }
        let value = env.expand(raw_value).map_err(at)?;
        if value.is_empty() {
            return Err(at(format!("{} has an empty value", clip(&key))));
        }
        self.key_lines.insert(key.clone(), line);
        self.entries.push(RawEntry { key, value, line });
        Ok(())
    }
}

struct ClassicReader<'env> {
    env: Environment<'env>,
    /// Every section of every file, in reading order.
    sections: Vec<RawSection>,
    /// Canonical paths of the files being read, outermost first.
    open_files: Vec<PathBuf>,
    /// Canonical paths of every file read so far: including one twice would
    /// duplicate its nodes.
    read_files: HashSet<PathBuf>,
    /// Bytes of every file read so far, held to [`MAX_FILE_BYTES`].
    read_bytes: u64,
    /// `[NODE]` sections read so far, held to [`MAX_SERVERS`].
    nodes: usize,
}

impl ClassicReader<'_> {
    fn read_text(&mut self, text: &str, file: &Path, depth: usize) -> Result<(), FluentBitError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // Each file starts outside any section, as in Fluent Bit; the
        // including file's section goes on after the include.
        let mut current_section: Option<usize> = None;
        // `trim` below also drops the `\r` of CRLF line endings.
        for (index, raw_line) in text.split('\n').enumerate() {
            let line = index + 1;
            if raw_line.len() > MAX_LINE_BYTES {
                return Err(line_too_long(file, line));
            }
            let content = raw_line.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            if content.starts_with('[') {
                let kind = parse_section_header(content)
                    .map_err(|message| FluentBitError::at(file, line, message))?;
                if kind == SectionKind::Node {
                    // Counted as read, not once all is held in memory.
                    self.nodes += 1;
                    if self.nodes > MAX_SERVERS {
                        return Err(too_many_nodes(file, line));
                    }
                }
                self.sections.push(RawSection::new(kind, file, line));
                current_section = Some(self.sections.len() - 1);
                continue;
            }
            let (key, raw_value) = split_key_value(content);
            if key.starts_with('@') {
                self.read_directive(key, raw_value, file, line, depth)?;
                continue;
            }
            let Some(section_index) = current_section else {
                return Err(FluentBitError::at(
                    file,
                    line,
                    format!("key {} is outside any section", quoted(key)),
                ));
            };
            if raw_value.is_empty() {
                return Err(FluentBitError::at(
                    file,
                    line,
                    format!("key {} has no value", quoted(key)),
                ));
            }
            self.sections[section_index].add(key, raw_value, line, &mut self.env)?;
        }
        Ok(())
    }

    fn read_directive(
        &mut self,
        directive: &str,
        raw_value: &str,
        file: &Path,
        line: usize,
        depth: usize,
    ) -> Result<(), FluentBitError> {
        let at = |message: String| FluentBitError::at(file, line, message);
        if !directive.eq_ignore_ascii_case("@include") {
            return Err(at(format!(
                "unknown directive {} (only @INCLUDE is supported)",
                quoted(directive)
            )));
        }
        if raw_value.is_empty() {
            return Err(at("@INCLUDE needs a file name".to_string()));
        }
        if depth + 1 > MAX_INCLUDE_DEPTH {
            return Err(at(format!(
                "@INCLUDE nested more than {MAX_INCLUDE_DEPTH} levels deep"
            )));
        }
        let target = self.env.expand(raw_value).map_err(at)?;
        let base = file.parent().unwrap_or(Path::new(""));
        if !target.contains(['*', '?', '[']) {
            return self.include_file(&base.join(&target), file, line, depth);
        }
        let pattern = glob_pattern(base, &target).map_err(at)?;
        let matches = glob::glob(&pattern)
            .map_err(|error| at(format!("bad @INCLUDE pattern {}: {error}", quoted(&target))))?;
        let mut paths = Vec::new();
        for entry in matches {
            let path = entry.map_err(|error| {
                at(format!(
                    "cannot read include {}: {}",
                    quoted(&error.path().display().to_string()),
                    error.error()
                ))
            })?;
            paths.push(path);
        }
        if paths.is_empty() {
            return Err(at(format!("@INCLUDE {} matched no file", quoted(&target))));
        }
        paths.sort();
        for path in paths {
            self.include_file(&path, file, line, depth)?;
        }
        Ok(())
    }

    fn include_file(
        &mut self,
        target: &Path,
        including_file: &Path,
        include_line: usize,
        depth: usize,
    ) -> Result<(), FluentBitError> {
        let at = |message: String| FluentBitError::at(including_file, include_line, message);
        let shown = quoted(&target.display().to_string());
        let canonical = fs::canonicalize(target)
            .map_err(|error| at(format!("cannot read include {shown}: {error}")))?;
        if self.open_files.contains(&canonical) {
            return Err(at(format!("include cycle: {shown} includes itself")));
        }
        if !self.read_files.insert(canonical.clone()) {
            return Err(at(format!("{shown} is included more than once")));
        }
        // Checked before opening: opening a FIFO would wait for a writer.
        let metadata = fs::metadata(&canonical)
            .map_err(|error| at(format!("cannot read include {shown}: {error}")))?;
        if !metadata.is_file() {
            return Err(at(format!(
                "cannot read include {shown}: not a regular file"
            )));
        }
        let room = MAX_FILE_BYTES.saturating_sub(self.read_bytes);
        if metadata.len() > room {
            return Err(at(format!(
                "cannot read include {shown}: more than {MAX_FILE_BYTES} bytes in the file and its includes"
            )));
        }
        let text = read_utf8(&canonical, room).map_err(|failure| match failure {
            ReadFailure::Io(error) => at(format!("cannot read include {shown}: {error}")),
            ReadFailure::NotUtf8 { line } => FluentBitError::at(target, line, "not valid UTF-8"),
        })?;
        self.read_bytes += text.len() as u64;
        self.open_files.push(canonical);
        let result = self.read_text(&text, target, depth + 1);
        self.open_files.pop();
        result
    }
}

/// `[NAME]` alone on its line, NAME being UPSTREAM or NODE in any case.
fn parse_section_header(content: &str) -> Result<SectionKind, String> {
    let Some(name) = content
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
    else {
        return Err(format!(
            "malformed section header {} (expected [NAME] alone on the line)",
            quoted(content)
        ));
    };
    let name = name.trim();
    if name.eq_ignore_ascii_case("upstream") {
        Ok(SectionKind::Upstream)
    } else if name.eq_ignore_ascii_case("node") {
        Ok(SectionKind::Node)
    } else {
        Err(format!(
            "unknown section [{}] (an upstream file holds only [UPSTREAM] and [NODE])",
            clip(name)
        ))
    }
}

/// Splits a trimmed line at its first run of whitespace.
fn split_key_value(content: &str) -> (&str, &str) {
    match content.split_once(char::is_whitespace) {
        Some((key, value)) => (key, value.trim()),
        None => (content, ""),
    }
}

/// The directory part is escaped so that `[` or `*` in a directory name is
/// taken literally; only the written pattern is a glob.
fn glob_pattern(base: &Path, written: &str) -> Result<String, String> {
    if base.as_os_str().is_empty() || Path::new(written).is_absolute() {
        return Ok(written.to_string());
    }
    let Some(base) = base.to_str() else {
        return Err(format!(
            "cannot match @INCLUDE {}: directory {} is not valid UTF-8",
            quoted(written),
            quoted(&base.display().to_string())
        ));
    };
    Ok(format!("{}/{written}", glob::Pattern::escape(base)))
}

/// `${VAR}` lookups, and how much expanded text they have made: each value
/// after expansion is held to [`MAX_LINE_BYTES`], and all of them together
/// to [`MAX_FILE_BYTES`], so a long variable used many times cannot exhaust
/// memory.
struct Environment<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    expanded_bytes: u64,
}

impl<'a> Environment<'a> {
    fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Environment {
            lookup,
            expanded_bytes: 0,
        }
    }

    /// Replaces `${VAR}` and `${VAR:-default}`. As in the shell, the default
    /// also stands in for a variable set to the empty string. Substituted
    /// text is not expanded again, and defaults cannot nest.
    fn expand(&mut self, value: &str) -> Result<String, String> {
        let mut expanded = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(start) = rest.find("${") {
            self.append(&mut expanded, &rest[..start])?;
            let after_open = &rest[start + 2..];
            let Some(end) = after_open.find('}') else {
                return Err(format!("unterminated \"${{\" in {}", quoted(value)));
            };
            let reference = &after_open[..end];
            let (name, default) = match reference.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (reference, None),
            };
            if !is_variable_name(name) {
                return Err(format!(
                    "invalid environment variable name {} in {}",
                    quoted(name),
                    quoted(value)
                ));
            }
            if default.is_some_and(|default| default.contains("${")) {
                return Err(format!(
                    "nested \"${{\" in the default of {name} is not supported"
                ));
            }
            match ((self.lookup)(name), default) {
                (Some(set), Some(default)) if set.is_empty() => {
                    self.append(&mut expanded, default)?
                }
                (Some(set), _) => self.append(&mut expanded, &set)?,
                (None, Some(default)) => self.append(&mut expanded, default)?,
                (None, None) => {
                    return Err(format!(
                        "environment variable {name:?} is not set and has no default"
                    ))
                }
            }
            rest = &after_open[end + 1..];
        }
        self.append(&mut expanded, rest)?;
        Ok(expanded)
    }

    fn append(&mut self, expanded: &mut String, text: &str) -> Result<(), String> {
        if expanded.len() + text.len() > MAX_LINE_BYTES {
            return Err(format!(
                "the value is longer than {MAX_LINE_BYTES} bytes after ${{VAR}} expansion"
            ));
        }
        self.expanded_bytes += text.len() as u64;
        if self.expanded_bytes > MAX_FILE_BYTES {
            return Err(format!(
                "the values are longer than {MAX_FILE_BYTES} bytes in all after ${{VAR}} expansion"
            ));
        }
        expanded.push_str(text);
        Ok(())
    }
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|first| first.is_ascii_alphabetic() || first == '_')
        && chars.all(|rest| rest.is_ascii_alphanumeric() || rest == '_')
}

/// Where the upstream section of a file is, kept to report "no node" and a
/// second upstream section.
struct UpstreamHeader {
    name: String,
    file: PathBuf,
    line: usize,
}

fn build_upstream(
    sections: Vec<RawSection>,
    top_file: &Path,
) -> Result<UpstreamFile, FluentBitError> {
    let mut upstream: Option<UpstreamHeader> = None;
    let mut nodes = Vec::new();
    for section in sections {
        match section.kind {
            SectionKind::Upstream => {
                if let Some(first) = &upstream {
                    return Err(FluentBitError::at(
                        &section.file,
                        section.line,
                        format!(
                            "second [UPSTREAM] section (the first is at {}:{})",
                            first.file.display(),
                            first.line
                        ),
                    ));
                }
                upstream = Some(build_upstream_header(section)?);
            }
            SectionKind::Node if nodes.len() == MAX_SERVERS => {
                return Err(too_many_nodes(&section.file, section.line));
            }
            SectionKind::Node => nodes.push(build_node(section)?),
        }
    }
    let Some(upstream) = upstream else {
        return Err(FluentBitError::whole_file(
            top_file,
            "no [UPSTREAM] section",
        ));
    };
    if nodes.is_empty() {
        return Err(FluentBitError::at(
            &upstream.file,
            upstream.line,
            format!("upstream {} has no node", quoted(&upstream.name)),
        ));
    }
    Ok(UpstreamFile {
        name: upstream.name,
        nodes,
    })
}

fn build_upstream_header(section: RawSection) -> Result<UpstreamHeader, FluentBitError> {
    // `RawSection::add` admits only "name" in an upstream section.
    let name = section.entries.into_iter().next().map(|entry| entry.value);
    let Some(name) = name else {
        return Err(FluentBitError::at(
            &section.file,
            section.line,
            "upstream is missing mandatory key \"name\"",
        ));
    };
    Ok(UpstreamHeader {
        name,
        file: section.file,
        line: section.line,
    })
}

fn build_node(section: RawSection) -> Result<Node, FluentBitError> {
    let RawSection {
        file,
        line,
        entries,
        ..
    } = section;
    let mut name = None;
    let mut host = None;
    let mut port = None;
    let mut tls = false;
    let mut tls_verify = true;
    let mut tls_vhost = None;
    let mut tls_ca_file = None;
    let mut tls_ca_path = None;
    let mut tls_crt_file = None;
    let mut tls_key_file = None;
    let mut extra = Vec::new();
    let mut key_lines = Vec::with_capacity(entries.len());
    for entry in entries {
        key_lines.push((entry.key.clone(), entry.line));
        let at = |message: String| FluentBitError::at(&file, entry.line, message);
        match entry.key.as_str() {
            "name" => name = Some(entry.value),
            "host" => host = Some(entry.value),
            "port" => port = Some(parse_port(&entry.value).map_err(at)?),
            "tls" => tls = parse_bool(&entry.key, &entry.value).map_err(at)?,
            "tls.verify" => tls_verify = parse_bool(&entry.key, &entry.value).map_err(at)?,
            "tls.vhost" => tls_vhost = Some(entry.value),
            "tls.ca_file" => tls_ca_file = Some(PathBuf::from(entry.value)),
            "tls.ca_path" => tls_ca_path = Some(PathBuf::from(entry.value)),
            "tls.crt_file" => tls_crt_file = Some(PathBuf::from(entry.value)),
            "tls.key_file" => tls_key_file = Some(PathBuf::from(entry.value)),
            _ => extra.push((entry.key, entry.value)),
        }
    }
    let missing = |key: &str| {
        FluentBitError::at(
            &file,
            line,
            format!("node is missing mandatory key {key:?}"),
        )
    };
    let name = name.ok_or_else(|| missing("name"))?;
    let host = host.ok_or_else(|| missing("host"))?;
    let port = port.ok_or_else(|| missing("port"))?;
    Ok(Node {
        name,
        host,
        port,
        tls,
        tls_verify,
        tls_vhost,
        tls_ca_file,
        tls_ca_path,
        tls_crt_file,
        tls_key_file,
        extra,
        file,
        line,
        key_lines,
    })
}

fn parse_port(value: &str) -> Result<u16, String> {
    if !value.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(format!(
            "port {} is not an integer in 1-65535",
            quoted(value)
        ));
    }
    match value.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(format!("port {} is not in 1-65535", quoted(value))),
    }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!(
            "{key} {} is not a boolean (on/off, true/false, yes/no)",
            quoted(value)
        )),
    }
}

/// A YAML node reduced to what an upstream file needs: scalars as their
/// text (so `port: 43000` and `port: "43000"` read alike) and the line
/// where the node starts.
struct YamlNode {
    line: usize,
    value: YamlValue,
}

enum YamlValue {
    /// Empty for null (`~`, `null`, nothing).
    Scalar(String),
    Sequence(Vec<YamlNode>),
    Mapping(Vec<(YamlNode, YamlNode)>),
}

struct YamlEvents<'input, 'file> {
    parser: Parser<'input, StrInput<'input>>,
    file: &'file Path,
}

impl<'input> YamlEvents<'input, '_> {
    fn next(&mut self) -> Result<(Event<'input>, usize), FluentBitError> {
        match self.parser.next_event() {
            Some(Ok((event, span))) => Ok((event, span.start.line())),
            Some(Err(error)) => Err(FluentBitError::at(
                self.file,
                error.marker().line(),
                format!("invalid YAML: {}", error.info()),
            )),
            None => Err(FluentBitError::whole_file(
                self.file,
                "invalid YAML: unexpected end of input",
            )),
        }
    }

    fn read_node(
        &mut self,
        event: Event<'input>,
        line: usize,
        depth: usize,
    ) -> Result<YamlNode, FluentBitError> {
        let file = self.file;
        let at = |message: &str| FluentBitError::at(file, line, message);
        let value = match event {
            Event::Scalar(text, style, _, _) => {
                YamlValue::Scalar(scalar_text(text.as_ref(), style))
            }
            Event::SequenceStart(..) => {
                if depth >= MAX_YAML_DEPTH {
                    return Err(at("YAML nested too deeply"));
                }
                let mut items = Vec::new();
                loop {
                    let (event, item_line) = self.next()?;
                    if matches!(event, Event::SequenceEnd) {
                        break;
                    }
                    items.push(self.read_node(event, item_line, depth + 1)?);
                }
                YamlValue::Sequence(items)
            }
            Event::MappingStart(..) => {
                if depth >= MAX_YAML_DEPTH {
                    return Err(at("YAML nested too deeply"));
                }
                let mut pairs = Vec::new();
                loop {
                    let (event, key_line) = self.next()?;
                    if matches!(event, Event::MappingEnd) {
                        break;
                    }
                    let key = self.read_node(event, key_line, depth + 1)?;
                    let (event, value_line) = self.next()?;
                    let value = self.read_node(event, value_line, depth + 1)?;
                    pairs.push((key, value));
                }
                YamlValue::Mapping(pairs)
            }
            Event::Alias(_) => return Err(at("YAML aliases are not supported here")),
            _ => return Err(at("invalid YAML: unexpected structure")),
        };
        Ok(YamlNode { line, value })
    }
}

fn scalar_text(text: &str, style: ScalarStyle) -> String {
    let is_null = style == ScalarStyle::Plain && matches!(text, "~" | "null" | "Null" | "NULL");
    if is_null {
        String::new()
    } else {
        text.to_string()
    }
}

/// The root node of the only document in `text`.
fn read_yaml_document(text: &str, file: &Path) -> Result<YamlNode, FluentBitError> {
    let mut events = YamlEvents {
        parser: Parser::new_from_str(text),
        file,
    };
    let mut root = None;
    loop {
        let (event, line) = events.next()?;
        match event {
            Event::StreamStart | Event::DocumentEnd => {}
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                if root.is_some() {
                    return Err(FluentBitError::at(
                        file,
                        line,
                        "more than one YAML document",
                    ));
                }
                let (event, root_line) = events.next()?;
                root = Some(events.read_node(event, root_line, 0)?);
            }
            _ => {
                return Err(FluentBitError::at(
                    file,
                    line,
                    "invalid YAML: unexpected structure",
                ))
            }
        }
    }
    root.ok_or_else(|| FluentBitError::whole_file(file, "no \"upstream_servers\" key"))
}

/// Reduces the YAML layout to the sections the classic layout produces.
fn yaml_sections(
    root: YamlNode,
    file: &Path,
    env: &mut Environment<'_>,
) -> Result<Vec<RawSection>, FluentBitError> {
    let at = |line: usize, message: String| FluentBitError::at(file, line, message);
    let YamlValue::Mapping(top_level) = root.value else {
        return Err(at(
            root.line,
            "the top level must be a mapping holding \"upstream_servers\"".to_string(),
        ));
    };
    let mut servers = None;
    for (key, value) in top_level {
        let key_name = yaml_key(&key, file)?;
        if key_name != "upstream_servers" {
            return Err(at(
                key.line,
                format!(
                    "unknown top-level key {} (expected \"upstream_servers\")",
                    quoted(&key_name)
                ),
            ));
        }
        if servers.is_some() {
            return Err(at(
                key.line,
                "duplicate key \"upstream_servers\"".to_string(),
            ));
        }
        servers = Some(value);
    }
    let Some(servers) = servers else {
        return Err(FluentBitError::whole_file(
            file,
            "no \"upstream_servers\" key",
        ));
    };
    let YamlValue::Sequence(entries) = servers.value else {
        return Err(at(
            servers.line,
            "upstream_servers must be a list".to_string(),
        ));
    };
    let entry_count = entries.len();
    let Ok([entry]) = <[YamlNode; 1]>::try_from(entries) else {
        return Err(at(
            servers.line,
            format!("upstream_servers must hold exactly one upstream, found {entry_count}"),
        ));
    };
    let YamlValue::Mapping(fields) = entry.value else {
        return Err(at(
            entry.line,
            "an upstream must be a mapping with \"name\" and \"nodes\"".to_string(),
        ));
    };
    let mut upstream = RawSection::new(SectionKind::Upstream, file, entry.line);
    let mut nodes: Option<Vec<RawSection>> = None;
    for (key, value) in fields {
        let key_name = yaml_key(&key, file)?;
        match key_name.as_str() {
            "name" => {
                let name = yaml_scalar(value, &key_name, file)?;
                upstream.add(&key_name, &name, key.line, env)?;
            }
            "nodes" => {
                if nodes.is_some() {
                    return Err(at(key.line, "duplicate key \"nodes\"".to_string()));
                }
                let YamlValue::Sequence(items) = value.value else {
                    return Err(at(value.line, "nodes must be a list".to_string()));
                };
                let sections = items
                    .into_iter()
                    .map(|item| yaml_node_section(item, file, &mut *env))
                    .collect::<Result<Vec<_>, _>>()?;
                nodes = Some(sections);
            }
            _ => {
                let message = format!(
                    "unknown key {} in the upstream (it takes \"name\" and \"nodes\")",
                    quoted(&key_name)
                );
                return Err(at(key.line, message));
            }
        }
    }
    let mut sections = vec![upstream];
    sections.extend(nodes.unwrap_or_default());
    Ok(sections)
}

fn yaml_node_section(
    item: YamlNode,
    file: &Path,
    env: &mut Environment<'_>,
) -> Result<RawSection, FluentBitError> {
    let YamlValue::Mapping(fields) = item.value else {
        return Err(FluentBitError::at(
            file,
            item.line,
            "a node must be a mapping of keys to values",
        ));
    };
    let mut section = RawSection::new(SectionKind::Node, file, item.line);
    for (key, value) in fields {
        let key_name = yaml_key(&key, file)?;
        let text = yaml_scalar(value, &key_name, file)?;
        section.add(&key_name, &text, key.line, env)?;
    }
    Ok(section)
}

/// A mapping key as a lower-cased string.
fn yaml_key(key: &YamlNode, file: &Path) -> Result<String, FluentBitError> {
    match &key.value {
        YamlValue::Scalar(text) => Ok(text.to_ascii_lowercase()),
        _ => Err(FluentBitError::at(
            file,
            key.line,
            "a key must be a plain value, not a list or mapping",
        )),
    }
}

fn yaml_scalar(value: YamlNode, key: &str, file: &Path) -> Result<String, FluentBitError> {
    match value.value {
        YamlValue::Scalar(text) => Ok(text),
        _ => Err(FluentBitError::at(
            file,
            value.line,
            format!("{key} must be a single value, not a list or mapping"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    /// The operator's file from the issue, verbatim.
    const OPERATOR_SAMPLE: &str = "\
# An Upstream file as Fluent Bit operators write it: three Forward nodes,
# the third over TLS without verification and with a Forward shared key.
[UPSTREAM]
    name       forward-balancing

[NODE]
    name       node-1
    host       127.0.0.1
    port       43000

[NODE]
    name       node-2
    host       127.0.0.1
    port       44000

[NODE]
    name       node-3
    host       127.0.0.1
    port       45000
    tls        on
    tls.verify off
    shared_key secret
";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn test_env(name: &str) -> Option<String> {
        match name {
            "NODE_HOST" => Some("10.0.0.7".to_string()),
            "NODE_PORT" => Some("7000".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn parse(text: &str) -> Result<UpstreamFile, FluentBitError> {
        parse_classic(text, Path::new("upstream.conf"), &test_env)
    }

    fn parse_err(text: &str) -> FluentBitError {
        match parse(text) {
            Ok(file) => panic!("expected an error, got {file:?}"),
            Err(error) => error,
        }
    }

    /// One upstream and one complete node, ending in the node section so
    /// tests can append node keys.
    const MINIMAL: &str = "[UPSTREAM]\nname up\n[NODE]\nname n1\nhost h1\nport 1\n";

    fn write(dir: &Path, relative: &str, text: &str) -> PathBuf {
        let path = dir.join(relative);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn operator_sample_yields_three_nodes() {
        let parsed = parse(OPERATOR_SAMPLE).unwrap();
        assert_eq!(parsed.name, "forward-balancing");
        let summary: Vec<_> = parsed
            .nodes
            .iter()
            .map(|node| (node.name.as_str(), node.host.as_str(), node.port, node.line))
            .collect();
        assert_eq!(
            summary,
            [
                ("node-1", "127.0.0.1", 43000, 6),
                ("node-2", "127.0.0.1", 44000, 11),
                ("node-3", "127.0.0.1", 45000, 16),
            ]
        );
        let plain = &parsed.nodes[0];
        assert!(!plain.tls);
        assert!(plain.tls_verify);
        assert!(plain.extra.is_empty());
        let third = &parsed.nodes[2];
        assert!(third.tls);
        assert!(!third.tls_verify);
        assert_eq!(
            third.extra,
            [("shared_key".to_string(), "secret".to_string())]
        );
        assert_eq!(third.file, Path::new("upstream.conf"));
    }

    #[test]
    fn crlf_line_endings_read_like_lf() {
        let crlf = OPERATOR_SAMPLE.replace('\n', "\r\n");
        assert_eq!(parse(&crlf).unwrap(), parse(OPERATOR_SAMPLE).unwrap());
    }

    #[test]
    fn comments_blank_lines_and_any_indentation() {
        let text = "\u{feff}  # leading comment\n\
                    [UPSTREAM]\n\
                    name up\n\
                    \n\
                    \t\t# indented comment\n\
                    [NODE]\n\
                    name\tn1\n\
                    \t   host    h1   \n\
                    port 1\n\
                    \x20\x20\x20\x20\x20\x20\x20\x20password  two  words # not a comment\n";
        let parsed = parse(text).unwrap();
        let node = &parsed.nodes[0];
        assert_eq!((node.name.as_str(), node.host.as_str()), ("n1", "h1"));
        assert_eq!(node.line, 6);
        assert_eq!((node.line_of("host"), node.line_of("port")), (8, 9));
        assert_eq!(node.line_of("tls.ca_file"), 6, "a key not set: the section");
        assert_eq!(
            node.extra,
            [(
                "password".to_string(),
                "two  words # not a comment".to_string()
            )]
        );
    }

    #[test]
    fn section_and_key_names_ignore_case() {
        let text = "[upstream]\nNAME up\n[Node]\nName n1\nHOST h1\nPort 1\nTLS On\nTLS.Verify NO\nShared_Key s\n";
        let node = &parse(text).unwrap().nodes[0];
        assert!(node.tls);
        assert!(!node.tls_verify);
        assert_eq!(node.extra, [("shared_key".to_string(), "s".to_string())]);
    }

    #[test]
    fn every_boolean_spelling() {
        for (spelling, expected) in [
            ("on", true),
            ("ON", true),
            ("true", true),
            ("True", true),
            ("yes", true),
            ("YeS", true),
            ("off", false),
            ("OFF", false),
            ("false", false),
            ("FALSE", false),
            ("no", false),
            ("No", false),
        ] {
            let node = &parse(&format!("{MINIMAL}tls {spelling}\ntls.verify {spelling}\n"))
                .unwrap()
                .nodes[0];
            assert_eq!(
                (node.tls, node.tls_verify),
                (expected, expected),
                "{spelling}"
            );
        }
    }

    #[test]
    fn tls_settings_and_other_keys_in_file_order() {
        let long_key = "x".repeat(300);
        let text = format!(
            "{MINIMAL}tls on\ntls.vhost sni.example\ntls.ca_file /ca.pem\ntls.ca_path /cas\n\
             tls.crt_file crt.pem\ntls.key_file key.pem\nusername u\nshared_key k\n\
             self_hostname me\npassword p\ntls.key_passwd kp\n{long_key} long\n"
        );
        let node = &parse(&text).unwrap().nodes[0];
        assert_eq!(node.tls_vhost.as_deref(), Some("sni.example"));
        assert_eq!(node.tls_ca_file.as_deref(), Some(Path::new("/ca.pem")));
        assert_eq!(node.tls_ca_path.as_deref(), Some(Path::new("/cas")));
        assert_eq!(node.tls_crt_file.as_deref(), Some(Path::new("crt.pem")));
        assert_eq!(node.tls_key_file.as_deref(), Some(Path::new("key.pem")));
        let extra: Vec<(&str, &str)> = node
            .extra
            .iter()
            .map(|(key, value)| (key.as_str(), value.as_str()))
            .collect();
        assert_eq!(
            extra,
            [
                ("username", "u"),
                ("shared_key", "k"),
                ("self_hostname", "me"),
                ("password", "p"),
                ("tls.key_passwd", "kp"),
                (long_key.as_str(), "long"),
            ]
        );
    }

    #[test]
    fn environment_references_expand() {
        let text = "[UPSTREAM]\nname ${UNSET:-fallback}\n[NODE]\nname n-${NODE_PORT}\n\
                    host ${NODE_HOST}\nport ${NODE_PORT}\nshared_key ${EMPTY:-dflt}/${UNSET:-}x$1\n";
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.name, "fallback");
        let node = &parsed.nodes[0];
        assert_eq!(
            (node.name.as_str(), node.host.as_str(), node.port),
            ("n-7000", "10.0.0.7", 7000)
        );
        assert_eq!(node.extra[0].1, "dflt/x$1");
    }

    #[test]
    fn substituted_text_is_not_expanded_again() {
        let env = |name: &str| (name == "OUTER").then(|| "${INNER}".to_string());
        let text = format!("{MINIMAL}shared_key ${{OUTER}}\n");
        let parsed = parse_classic(&text, Path::new("u.conf"), &env).unwrap();
        assert_eq!(parsed.nodes[0].extra[0].1, "${INNER}");
    }

    #[test]
    fn second_upstream_is_rejected_at_its_line() {
        let error = parse_err(&format!("{MINIMAL}[UPSTREAM]\nname again\n"));
        assert_eq!(error.line, Some(7));
        assert_eq!(
            error.to_string(),
            "upstream.conf:7: second [UPSTREAM] section (the first is at upstream.conf:1)"
        );
    }

    #[test]
    fn missing_upstream_is_rejected() {
        let error = parse_err("[NODE]\nname n\nhost h\nport 1\n");
        assert_eq!(error.line, None);
        assert_eq!(error.to_string(), "upstream.conf: no [UPSTREAM] section");
    }

    #[test]
    fn upstream_without_node_is_rejected_at_the_upstream() {
        let error = parse_err("# c\n[UPSTREAM]\nname up\n");
        assert_eq!(error.line, Some(2));
        assert!(error.message.contains("\"up\" has no node"), "{error}");
    }

    #[test]
    fn missing_mandatory_node_key_is_named_at_the_section_line() {
        for (missing, kept) in [
            ("name", "host h\nport 1\n"),
            ("host", "name n\nport 1\n"),
            ("port", "name n\nhost h\n"),
        ] {
            let error = parse_err(&format!("[UPSTREAM]\nname up\n\n[NODE]\n{kept}"));
            assert_eq!(error.line, Some(4), "{missing}");
            assert_eq!(
                error.message,
                format!("node is missing mandatory key \"{missing}\"")
            );
        }
    }

    #[test]
    fn upstream_without_name_is_rejected() {
        let error = parse_err("[UPSTREAM]\n[NODE]\nname n\nhost h\nport 1\n");
        assert_eq!(error.line, Some(1));
        assert!(error.message.contains("\"name\""), "{error}");
    }

    #[test]
    fn empty_value_is_rejected() {
        let error = parse_err("[UPSTREAM]\nname up\n[NODE]\nname n\nhost ${EMPTY}\nport 1\n");
        assert_eq!(
            error.to_string(),
            "upstream.conf:5: host has an empty value"
        );
    }

    #[test]
    fn unknown_section_is_rejected() {
        let error = parse_err("[SERVICE]\nflush 1\n");
        assert_eq!(error.line, Some(1));
        assert!(
            error.message.contains("unknown section [SERVICE]"),
            "{error}"
        );
    }

    #[test]
    fn malformed_section_header_is_rejected() {
        let error = parse_err("[UPSTREAM\nname up\n");
        assert_eq!(error.line, Some(1));
        assert!(
            error.message.contains("malformed section header"),
            "{error}"
        );
        let error = parse_err(&format!("{MINIMAL}[NODE] # trailing\n"));
        assert_eq!(error.line, Some(7));
    }

    #[test]
    fn port_must_be_an_integer_in_range() {
        let base = "[UPSTREAM]\nname up\n[NODE]\nname n\nhost h\n";
        let error = parse_err(&format!("{base}port 70000\n"));
        assert_eq!(
            error.to_string(),
            "upstream.conf:6: port \"70000\" is not in 1-65535"
        );
        let error = parse_err(&format!("{base}port 0\n"));
        assert_eq!(error.message, "port \"0\" is not in 1-65535");
        let error = parse_err(&format!("{base}port 99999999999999999999999\n"));
        assert_eq!(error.line, Some(6));
        for not_integer in ["http", "+80", "-1", "80.0", "8 0"] {
            let error = parse_err(&format!("{base}port {not_integer}\n"));
            assert_eq!(error.line, Some(6));
            assert_eq!(
                error.message,
                format!("port {not_integer:?} is not an integer in 1-65535")
            );
        }
        assert_eq!(
            parse(&format!("{base}port 65535\n")).unwrap().nodes[0].port,
            65535
        );
    }

    #[test]
    fn boolean_must_be_one() {
        let error = parse_err(&format!("{MINIMAL}tls.verify maybe\n"));
        assert_eq!(error.line, Some(7));
        assert_eq!(
            error.message,
            "tls.verify \"maybe\" is not a boolean (on/off, true/false, yes/no)"
        );
        let error = parse_err(&format!("{MINIMAL}TLS 1\n"));
        assert!(error.message.starts_with("tls \"1\""), "{error}");
    }

    #[test]
    fn unset_variable_without_default_is_rejected() {
        let error = parse_err("[UPSTREAM]\nname up\n[NODE]\nname n\nhost ${NOPE}\nport 1\n");
        assert_eq!(
            error.to_string(),
            "upstream.conf:5: environment variable \"NOPE\" is not set and has no default"
        );
    }

    #[test]
    fn malformed_variable_references_are_rejected() {
        for (value, fragment) in [
            ("${NODE_HOST", "unterminated"),
            ("${}", "invalid environment variable name"),
            ("${9X}", "invalid environment variable name"),
            ("${A B}", "invalid environment variable name"),
            ("${A:-${B}}", "nested"),
        ] {
            let error = parse_err(&format!("{MINIMAL}shared_key {value}\n"));
            assert_eq!(error.line, Some(7), "{value}");
            assert!(error.message.contains(fragment), "{value}: {error}");
        }
    }

    #[test]
    fn key_without_value_is_rejected() {
        let error = parse_err("[UPSTREAM]\nname up\n[NODE]\nname n\n  host   \nport 1\n");
        assert_eq!(
            error.to_string(),
            "upstream.conf:5: key \"host\" has no value"
        );
    }

    #[test]
    fn key_outside_any_section_is_rejected() {
        let error = parse_err("# first\nname up\n[UPSTREAM]\n");
        assert_eq!(
            error.to_string(),
            "upstream.conf:2: key \"name\" is outside any section"
        );
    }

    #[test]
    fn duplicate_key_is_rejected() {
        let error = parse_err(&format!("{MINIMAL}PORT 2\n"));
        assert_eq!(error.line, Some(7));
        assert_eq!(
            error.message,
            "duplicate key \"port\" (first set at line 6)"
        );
    }

    #[test]
    fn unknown_upstream_key_is_rejected() {
        let error = parse_err("[UPSTREAM]\nname up\nbalancing random\n");
        assert_eq!(error.line, Some(3));
        assert!(error.message.contains("\"balancing\""), "{error}");
    }

    #[test]
    fn unknown_directive_is_rejected() {
        let error = parse_err("@SET A=1\n");
        assert_eq!(error.line, Some(1));
        assert!(error.message.contains("\"@SET\""), "{error}");
        let error = parse_err("@INCLUDE\n");
        assert_eq!(error.message, "@INCLUDE needs a file name");
    }

    #[test]
    fn include_is_relative_to_the_including_file() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "conf/upstream.conf",
            "[UPSTREAM]\nname up\n@include nodes/one.conf\n[NODE]\nname last\nhost h\nport 3\n",
        );
        write(
            dir.path(),
            "conf/nodes/one.conf",
            "# included\n[NODE]\nname first\nhost h\nport 1\n",
        );
        let parsed = load_with_env(&main, &no_env).unwrap();
        let nodes: Vec<_> = parsed
            .nodes
            .iter()
            .map(|node| (node.name.as_str(), node.file.clone(), node.line))
            .collect();
        assert_eq!(
            nodes,
            [
                ("first", dir.path().join("conf/nodes/one.conf"), 2),
                ("last", main.clone(), 4),
            ]
        );
    }

    #[test]
    fn include_glob_reads_matches_in_sorted_order() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            "[UPSTREAM]\nname up\n@INCLUDE nodes.d/*.conf\n",
        );
        for name in ["c", "a", "b"] {
            write(
                dir.path(),
                &format!("nodes.d/{name}.conf"),
                &format!("[NODE]\nname {name}\nhost h\nport 1\n"),
            );
        }
        write(dir.path(), "nodes.d/ignored.txt", "[SERVICE]\n");
        let parsed = load_with_env(&main, &no_env).unwrap();
        let names: Vec<_> = parsed.nodes.iter().map(|node| node.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
    }

    #[test]
    fn include_path_expands_variables() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            "[UPSTREAM]\nname up\n@INCLUDE ${WHICH:-nodes}.conf\n",
        );
        write(dir.path(), "nodes.conf", "[NODE]\nname n\nhost h\nport 1\n");
        assert_eq!(load_with_env(&main, &no_env).unwrap().nodes.len(), 1);
    }

    #[test]
    fn section_of_including_file_goes_on_after_the_include() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            "[UPSTREAM]\nname up\n[NODE]\nname n\n@INCLUDE other.conf\nhost h\nport 1\n",
        );
        write(dir.path(), "other.conf", "# nothing but a comment\n");
        let node = &load_with_env(&main, &no_env).unwrap().nodes[0];
        assert_eq!((node.host.as_str(), node.line), ("h", 3));
    }

    #[test]
    fn included_file_starts_outside_any_section() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            "[UPSTREAM]\nname up\n[NODE]\n@INCLUDE keys.conf\n",
        );
        let keys = write(dir.path(), "keys.conf", "\nname n\n");
        let error = load_with_env(&main, &no_env).unwrap_err();
        assert_eq!((error.file, error.line), (keys, Some(2)));
    }

    #[test]
    fn unreadable_include_is_reported_at_the_include_line() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            "[UPSTREAM]\nname up\n\n@INCLUDE missing.conf\n",
        );
        let error = load_with_env(&main, &no_env).unwrap_err();
        assert_eq!((&error.file, error.line), (&main, Some(4)));
        assert!(error.message.starts_with("cannot read include"), "{error}");
        assert!(error.message.contains("missing.conf"), "{error}");
    }

    #[test]
    fn include_glob_without_match_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            "[UPSTREAM]\nname up\n@INCLUDE none/*.conf\n",
        );
        let error = load_with_env(&main, &no_env).unwrap_err();
        assert_eq!(error.line, Some(3));
        assert!(error.message.contains("matched no file"), "{error}");
    }

    #[test]
    fn include_cycle_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            "[UPSTREAM]\nname up\n@INCLUDE a.conf\n",
        );
        let a = write(dir.path(), "a.conf", "@INCLUDE upstream.conf\n");
        let error = load_with_env(&main, &no_env).unwrap_err();
        assert_eq!((error.file, error.line), (a, Some(1)));
        assert!(error.message.contains("include cycle"), "{}", error.message);
    }

    #[test]
    fn self_include_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "upstream.conf", "@INCLUDE upstream.conf\n");
        let error = load_with_env(&main, &no_env).unwrap_err();
        assert!(error.message.contains("include cycle"), "{error}");
    }

    #[test]
    fn same_file_included_twice_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            "[UPSTREAM]\nname up\n@INCLUDE n.conf\n@INCLUDE ./n.conf\n",
        );
        write(dir.path(), "n.conf", "[NODE]\nname n\nhost h\nport 1\n");
        let error = load_with_env(&main, &no_env).unwrap_err();
        assert_eq!(error.line, Some(4));
        assert!(error.message.contains("more than once"), "{error}");
    }

    #[test]
    fn include_depth_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let main = write(dir.path(), "upstream.conf", "@INCLUDE 1.conf\n");
        for level in 1..=MAX_INCLUDE_DEPTH + 2 {
            write(
                dir.path(),
                &format!("{level}.conf"),
                &format!("@INCLUDE {}.conf\n", level + 1),
            );
        }
        let error = load_with_env(&main, &no_env).unwrap_err();
        assert_eq!(
            error.file,
            dir.path().join(format!("{MAX_INCLUDE_DEPTH}.conf"))
        );
        assert!(error.message.contains("nested more than"), "{error}");
    }

    #[test]
    fn include_refuses_anything_but_a_regular_file_before_opening_it() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.conf");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for target in [fifo.to_str().unwrap(), "/dev/zero", "/"] {
            let text = format!("{MINIMAL}@INCLUDE {target}\n");
            let main = write(dir.path(), "upstream.conf", &text);
            // Opening the FIFO would block this test for ever: the check
            // must come first.
            let error = load_with_env(&main, &no_env).unwrap_err();
            assert_eq!(error.line, Some(7), "{target}: {error}");
            assert!(
                error.message.contains("not a regular file"),
                "{target}: {error}"
            );
        }
    }

    #[test]
    fn files_and_their_includes_are_bounded_together() {
        let dir = tempfile::tempdir().unwrap();
        // Sparse: as large as the limit allows, with nothing written.
        let big = File::create(dir.path().join("big.conf")).unwrap();
        big.set_len(MAX_FILE_BYTES).unwrap();
        let main = write(
            dir.path(),
            "upstream.conf",
            &format!("{MINIMAL}@INCLUDE big.conf\n"),
        );
        let error = load_with_env(&main, &no_env).unwrap_err();
        assert_eq!(error.line, Some(7), "{error}");
        assert!(
            error.message.contains("more than 16777216 bytes"),
            "{error}"
        );
        big.set_len(MAX_FILE_BYTES + 1).unwrap();
        let error = load_with_env(&dir.path().join("big.conf"), &no_env).unwrap_err();
        assert_eq!(error.line, None, "{error}");
        assert!(
            error.message.contains("more than 16777216 bytes"),
            "{error}"
        );
    }

    #[test]
    fn expansion_is_bounded_per_value_and_in_all() {
        let long = "v".repeat(MAX_LINE_BYTES / 2 + 1);
        let env = |name: &str| (name == "LONG").then(|| long.clone());
        let parse_with = |text: &str| parse_classic(text, Path::new("upstream.conf"), &env);
        parse_with(&format!("{MINIMAL}shared_key ${{LONG}}\n")).unwrap();
        let error = parse_with(&format!("{MINIMAL}shared_key ${{LONG}}${{LONG}}\n")).unwrap_err();
        assert_eq!(error.line, Some(7), "{error}");
        assert!(
            error
                .message
                .contains("longer than 16384 bytes after ${VAR} expansion"),
            "{error}"
        );
        // Each value within its bound, but more than 16 MiB in all within
        // the 2,048th node (every value counts, `name`, `host`, `port` too).
        let node = "[NODE]\nname n\nhost h\nport 1\nshared_key ${LONG}\n";
        let text = format!("[UPSTREAM]\nname up\n{}", node.repeat(2049));
        let error = parse_with(&text).unwrap_err();
        assert!(
            error.message.contains("in all after ${VAR} expansion"),
            "{error}"
        );
        let node_2048 = (3 + 5 * 2047)..(3 + 5 * 2048);
        assert!(
            error.line.is_some_and(|line| node_2048.contains(&line)),
            "{error}"
        );
    }

    #[test]
    fn a_section_holds_at_most_256_keys_found_in_linear_time() {
        let keys: String = (0..80_000).map(|index| format!("key{index} v\n")).collect();
        let error = parse_err(&format!("{MINIMAL}{keys}"));
        // MINIMAL's node has 3 keys: the 257th is key253, on line 6 + 254.
        assert_eq!(error.line, Some(260), "{error}");
        assert!(
            error.message.contains("more than 256 keys in one section"),
            "{error}"
        );
        let yaml_keys: String = (0..=MAX_KEYS_PER_SECTION)
            .map(|index| format!("        key{index}: v\n"))
            .collect();
        let text =
            format!("upstream_servers:\n  - name: up\n    nodes:\n      - name: n1\n{yaml_keys}");
        let error = yaml_err(&text);
        assert!(
            error.message.contains("more than 256 keys in one section"),
            "{error}"
        );
    }

    #[test]
    fn nodes_are_bounded() {
        let node = "[NODE]\nname n\nhost h\nport 1\n";
        let text = format!("[UPSTREAM]\nname up\n{}", node.repeat(MAX_SERVERS + 1));
        let error = parse_err(&text);
        assert_eq!(error.line, Some(3 + 4 * MAX_SERVERS), "{error}");
        assert!(error.message.contains("more than 50000 nodes"), "{error}");
    }

    #[test]
    fn lines_are_bounded_in_both_layouts() {
        let error = parse_err(&format!("{MINIMAL}# {}\n", "c".repeat(MAX_LINE_BYTES)));
        assert_eq!(error.line, Some(7), "{error}");
        let error = yaml_err(&format!("# {}\n{YAML_SAMPLE}", "c".repeat(MAX_LINE_BYTES)));
        assert_eq!(error.line, Some(1), "{error}");
        for error in [
            parse_err(&format!(
                "{MINIMAL}port {}\n",
                "9".repeat(MAX_LINE_BYTES - 10)
            )),
            parse_err(&format!("{}{MINIMAL}", "k".repeat(5000))),
        ] {
            assert!(error.to_string().len() < 300, "{error}");
        }
    }

    #[test]
    fn load_reports_unreadable_and_non_utf8_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("absent.conf");
        let error = load(&missing).unwrap_err();
        assert_eq!((&error.file, error.line), (&missing, None));
        assert!(error.message.starts_with("cannot read file"), "{error}");

        let binary = dir.path().join("binary.conf");
        fs::write(&binary, b"[UPSTREAM]\nname \xff\n").unwrap();
        let error = load(&binary).unwrap_err();
        assert_eq!(
            (error.line, error.message.as_str()),
            (Some(2), "not valid UTF-8")
        );
    }

    #[test]
    fn load_reads_the_classic_format_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "forward.upstream", OPERATOR_SAMPLE);
        let parsed = load(&path).unwrap();
        assert_eq!(parsed.nodes.len(), 3);
        assert!(parsed.nodes.iter().all(|node| node.file == path));
    }

    const YAML_SAMPLE: &str = "\
# Fluent Bit's YAML layout
upstream_servers:
  - name: forward-balancing
    nodes:
      - name: node-1
        host: 127.0.0.1
        port: 43000

      - name: node-2
        host: \"127.0.0.1\"
        port: '44000'
        tls: true
        tls.vhost: sni.example

      - name: node-3
        host: 127.0.0.1
        port: 45000
        tls: on
        tls.verify: off
        shared_key: secret
";

    fn parse_yaml_text(text: &str) -> Result<UpstreamFile, FluentBitError> {
        parse_yaml(text, Path::new("upstream.yaml"), &test_env)
    }

    fn yaml_err(text: &str) -> FluentBitError {
        match parse_yaml_text(text) {
            Ok(file) => panic!("expected an error, got {file:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn yaml_layout_reads_like_the_classic_one() {
        let parsed = parse_yaml_text(YAML_SAMPLE).unwrap();
        assert_eq!(parsed.name, "forward-balancing");
        let summary: Vec<_> = parsed
            .nodes
            .iter()
            .map(|node| {
                (
                    node.name.as_str(),
                    node.port,
                    node.tls,
                    node.tls_verify,
                    node.line,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("node-1", 43000, false, true, 5),
                ("node-2", 44000, true, true, 9),
                ("node-3", 45000, true, false, 15),
            ]
        );
        assert_eq!(parsed.nodes[1].tls_vhost.as_deref(), Some("sni.example"));
        assert_eq!(parsed.nodes[0].line_of("host"), 6);
        assert_eq!(
            parsed.nodes[2].extra,
            [("shared_key".to_string(), "secret".to_string())]
        );
    }

    #[test]
    fn load_picks_yaml_by_extension() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.yaml", "b.yml", "c.YAML"] {
            let path = write(dir.path(), name, YAML_SAMPLE);
            let parsed = load_with_env(&path, &no_env).unwrap();
            assert_eq!(parsed.nodes.len(), 3, "{name}");
            assert_eq!(parsed.nodes[0].file, path);
        }
    }

    #[test]
    fn yaml_values_expand_variables() {
        let text = "upstream_servers:\n- name: up\n  nodes:\n  - name: n\n    host: ${NODE_HOST}\n    port: ${NODE_PORT}\n";
        let node = &parse_yaml_text(text).unwrap().nodes[0];
        assert_eq!((node.host.as_str(), node.port), ("10.0.0.7", 7000));
        let error = yaml_err(&text.replace("NODE_HOST", "NOPE"));
        assert_eq!(error.line, Some(5));
        assert!(error.message.contains("\"NOPE\""), "{error}");
    }

    #[test]
    fn yaml_needs_exactly_one_upstream() {
        let two = "upstream_servers:\n  - name: a\n    nodes: []\n  - name: b\n    nodes: []\n";
        let error = yaml_err(two);
        assert_eq!(error.line, Some(2));
        assert!(
            error.message.contains("exactly one upstream, found 2"),
            "{error}"
        );
        let error = yaml_err("upstream_servers: []\n");
        assert!(error.message.contains("found 0"), "{error}");
        let error = yaml_err("# nothing\n");
        assert_eq!(
            error.to_string(),
            "upstream.yaml: no \"upstream_servers\" key"
        );
    }

    #[test]
    fn yaml_errors_carry_lines() {
        let base =
            "upstream_servers:\n  - name: up\n    nodes:\n      - name: n\n        host: h\n";
        let error = yaml_err(&format!("{base}        port: 70000\n"));
        assert_eq!(
            error.to_string(),
            "upstream.yaml:6: port \"70000\" is not in 1-65535"
        );
        let error = yaml_err(base);
        assert_eq!(error.line, Some(4));
        assert_eq!(error.message, "node is missing mandatory key \"port\"");
        let error = yaml_err(&format!("{base}        port: 1\n        tls: maybe\n"));
        assert_eq!(error.line, Some(7));
        let error = yaml_err(&format!("{base}        port:\n"));
        assert_eq!(error.message, "port has an empty value");
        let error = yaml_err(&format!("{base}        port: [1]\n"));
        assert_eq!(error.line, Some(6));
        assert!(error.message.contains("single value"), "{error}");
        let error = yaml_err("upstream_servers:\n  - name: up\n    nodes: []\n");
        assert_eq!(error.line, Some(2));
        assert!(error.message.contains("has no node"), "{error}");
    }

    #[test]
    fn yaml_syntax_error_carries_the_line() {
        let error = yaml_err("upstream_servers:\n  - name: up\n    nodes: [\n\n");
        assert!(error.message.starts_with("invalid YAML"), "{error}");
        assert!(error.line.is_some(), "{error}");
        let error = yaml_err("upstream_servers:\n  - name: \"up\n");
        assert!(error.message.starts_with("invalid YAML"), "{error}");
    }

    #[test]
    fn yaml_rejects_unknown_keys_aliases_and_extra_documents() {
        let error = yaml_err("service:\n  flush: 1\n");
        assert_eq!(error.line, Some(1));
        assert!(error.message.contains("\"service\""), "{error}");
        let error = yaml_err("upstream_servers:\n  - name: up\n    balancing: random\n");
        assert_eq!(error.line, Some(3));
        let error = yaml_err(
            "upstream_servers:\n  - name: &n up\n    nodes:\n      - name: *n\n        host: h\n        port: 1\n",
        );
        assert_eq!(error.line, Some(4));
        assert!(error.message.contains("aliases"), "{error}");
        let error = yaml_err(&format!("{YAML_SAMPLE}---\nupstream_servers: []\n"));
        assert_eq!(error.line, Some(21));
        assert!(error.message.contains("more than one"), "{error}");
        let error = yaml_err("- a\n");
        assert!(error.message.contains("top level"), "{error}");
    }

    #[test]
    fn yaml_nesting_is_bounded() {
        let levels = MAX_YAML_DEPTH + 4;
        let nested = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        let error = yaml_err(&nested);
        assert_eq!(error.line, Some(1));
        assert!(error.message.contains("nested too deeply"), "{error}");
        // Far deeper input is stopped by the YAML parser itself (on many
        // lines: a line longer than MAX_LINE_BYTES is stopped before that).
        let deep = format!("{}{}", "[\n".repeat(100_000), "]\n".repeat(100_000));
        assert!(yaml_err(&deep).message.starts_with("invalid YAML"));
    }

    /// Where fuzzed text pretends to live: a directory that does not exist,
    /// so fuzzed `@INCLUDE` lines find nothing to read.
    const FUZZ_PATH: &str = "/nonexistent-sluice-fuzz/upstream.conf";

    /// Lines built from the format's own vocabulary, to reach deeper code
    /// than random text does.
    fn classic_line() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("name"),
            Just("host"),
            Just("port"),
            Just("tls"),
            Just("tls.verify"),
            Just("tls.ca_file"),
            Just("shared_key"),
            Just("@INCLUDE"),
            Just("@SET"),
            Just("[UPSTREAM]"),
            Just("[NODE]"),
            Just("[node"),
            Just("#"),
        ];
        let value = prop_oneof![
            Just(String::new()),
            Just("on".to_string()),
            Just("70000".to_string()),
            Just("${NODE_HOST}".to_string()),
            Just("${X:-d}".to_string()),
            Just("${".to_string()),
            Just("*.conf".to_string()),
            "\\PC{0,12}",
        ];
        (key, "[ \t]{0,3}", value).prop_map(|(key, gap, value)| format!("{gap}{key} {value}"))
    }

    #[derive(Debug, Clone)]
    enum Mutation {
        DeleteChars(Index, usize),
        InsertText(Index, String),
        DuplicateLine(Index),
        DropLine(Index),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<Index>(), 1..16usize).prop_map(|(at, len)| Mutation::DeleteChars(at, len)),
            (any::<Index>(), "\\PC{0,8}|\r|\n|\\[|\\]|\\$\\{|#|@")
                .prop_map(|(at, text)| Mutation::InsertText(at, text)),
            any::<Index>().prop_map(Mutation::DuplicateLine),
            any::<Index>().prop_map(Mutation::DropLine),
        ]
    }

    fn apply(text: &str, mutation: &Mutation) -> String {
        let chars: Vec<char> = text.chars().collect();
        let lines: Vec<&str> = text.split('\n').collect();
        match mutation {
            Mutation::DeleteChars(at, len) => {
                if chars.is_empty() {
                    return String::new();
                }
                let start = at.index(chars.len());
                let end = (start + len).min(chars.len());
                chars[..start].iter().chain(&chars[end..]).collect()
            }
            Mutation::InsertText(at, inserted) => {
                let position = at.index(chars.len() + 1);
                let mut mutated: String = chars[..position].iter().collect();
                mutated.push_str(inserted);
                mutated.extend(&chars[position..]);
                mutated
            }
            Mutation::DuplicateLine(at) => {
                let mut mutated = lines.clone();
                let line = at.index(lines.len());
                mutated.insert(line, lines[line]);
                mutated.join("\n")
            }
            Mutation::DropLine(at) => {
                let mut mutated = lines.clone();
                mutated.remove(at.index(lines.len()));
                mutated.join("\n")
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn classic_parser_never_panics_on_arbitrary_text(text in any::<String>()) {
            let _ = parse_classic(&text, Path::new(FUZZ_PATH), &test_env);
        }

        #[test]
        fn classic_parser_never_panics_on_vocabulary_soup(
            lines in proptest::collection::vec(classic_line(), 0..24),
            crlf in any::<bool>(),
        ) {
            let text = lines.join(if crlf { "\r\n" } else { "\n" });
            let _ = parse_classic(&text, Path::new(FUZZ_PATH), &test_env);
        }

        #[test]
        fn classic_parser_never_panics_on_mutated_sample(
            mutations in proptest::collection::vec(mutation(), 1..8),
        ) {
            let text = mutations
                .iter()
                .fold(OPERATOR_SAMPLE.to_string(), |text, mutation| apply(&text, mutation));
            let _ = parse_classic(&text, Path::new(FUZZ_PATH), &test_env);
        }

        #[test]
        fn yaml_parser_never_panics_on_mutated_sample(
            mutations in proptest::collection::vec(mutation(), 1..8),
        ) {
            let text = mutations
                .iter()
                .fold(YAML_SAMPLE.to_string(), |text, mutation| apply(&text, mutation));
            let _ = parse_yaml(&text, Path::new("fuzz.yaml"), &test_env);
        }
    }
}
