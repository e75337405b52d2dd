//! Bounds on configuration input (SPEC §8): past each, loading fails with an
//! error naming the file and line, before anything grows with the input.

use std::time::Duration;

/// A configuration or Fluent Bit Upstream file, and all its `@INCLUDE`d
/// files together.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// A TLS certificate, key or CA file.
pub const MAX_PEM_BYTES: u64 = 16 * 1024 * 1024;

/// One line, and one Fluent Bit value after `${VAR}` expansion.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Keys of one TOML table (`key = value` lines), or of one Fluent Bit
/// `[UPSTREAM]` or `[NODE]` section.
pub const MAX_KEYS_PER_SECTION: usize = 256;

/// Nesting of Fluent Bit `@INCLUDE` files.
pub const MAX_INCLUDE_DEPTH: usize = 16;

/// Any duration: far beyond any useful timeout, and far within what a
/// deadline (`Instant` + duration) can hold.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// A server's `weight` (the `hash` ring holds 160 points per unit of weight).
pub const MAX_WEIGHT: u32 = 1000;

/// The sum of the weights of a `balance = "hash"` upstream's servers, so its
/// ring (160 points per unit) stays within a few tens of megabytes.
pub const MAX_HASH_TOTAL_WEIGHT: u64 = 20_000;

/// Servers of the whole configuration (Fluent Bit nodes included).
pub const MAX_SERVERS: usize = 50_000;

/// Tables (`[...]` and `[[...]]` headers) of a TOML file: a server and its
/// `tls` table for each of [`MAX_SERVERS`]. Counted before parsing, so a
/// file of tiny tables is refused before the parser holds them all.
pub const MAX_TABLES: usize = 2 * MAX_SERVERS;

/// Listeners of the whole configuration.
pub const MAX_LISTENERS: usize = 1000;

/// Characters of a key or value an error quotes.
/// The most clients one upstream's queue may hold (SPEC §11).
pub const MAX_QUEUE: u32 = 100_000;

/// The longest a client may wait in a queue.
pub const MAX_QUEUE_TIMEOUT: Duration = Duration::from_secs(3600);

pub const QUOTE_CHARS: usize = 100;
