//! The command line (SPEC §1) and exit statuses.

use std::io::IsTerminal;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::config::limits::MAX_DURATION;
use crate::config::{quoted, AdminConfig, Config};
use crate::ctl::{self, CtlArgs};
use crate::lifecycle::config_watch::ConfigWatch;
use crate::lifecycle::{self, supervisor, workers, StartError};

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "A Layer-4 stream load balancer with nginx upstream semantics"
)]
pub struct Cli {
    /// The TOML configuration file.
    #[arg(long, env = "SLUICE_CONFIG", default_value = "./sluice.toml")]
    pub config: PathBuf,
    /// Validate the configuration, print a summary and exit.
    #[arg(long)]
    pub check: bool,
    /// Run one listener in front of the nodes of this Fluent Bit Upstream
    /// file, round-robin, instead of reading a TOML configuration.
    #[arg(long, value_name = "FILE")]
    pub fluent_bit: Option<PathBuf>,
    /// With --fluent-bit: the listener's address (HOST:PORT, [IPv6]:PORT or unix:/path).
    #[arg(long, value_name = "ADDR", requires = "fluent_bit")]
    pub bind: Option<String>,
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, such as `info` or `sluice=debug` (default: $RUST_LOG, else info).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Read the configuration file this often, such as `10s`, and reload when its content changes (default: off).
    #[arg(long, env = "SLUICE_WATCH_CONFIG", value_name = "INTERVAL")]
    pub watch_config: Option<String>,
    /// Serve the admin endpoint on ADDR (HOST:PORT or unix:/path); overrides `[admin] bind`.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Threads that accept and relay connections (default: one per CPU core
    /// the process may use).
    #[arg(long, env = "SLUICE_WORKERS", value_name = "N")]
    pub workers: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Control a running sluice through its runtime API: status, drain, up,
    /// down, weight, max-conns, add, remove.
    Ctl(CtlArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

const EXIT_CONFIG: u8 = 1;
const EXIT_START: u8 = 2;

/// Prints clap's message. `--help` and `--version` exit 0; a bad command
/// line is a configuration error (exit 1), like a bad option value found
/// later, not clap's usual 2, which the contract keeps for start-up failures.
fn command_line_error(err: clap::Error) -> ExitCode {
    let _ = err.print();
    if err.use_stderr() {
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::SUCCESS
    }
}

pub fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|matches| Ok((Cli::from_arg_matches(&matches)?, matches)));
    let (mut cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(err) => return command_line_error(err),
    };
    if let Some(Command::Ctl(args)) = cli.command.take() {
        return ctl::main(args);
    }
    // Checked here, not by clap, so that $SLUICE_CONFIG in the environment
    // does not count as a conflicting --config.
    if cli.fluent_bit.is_some() && matches.value_source("config") == Some(ValueSource::CommandLine)
    {
        return command_line_error(Cli::command().error(
            ErrorKind::ArgumentConflict,
            "--fluent-bit and --config cannot be used together",
        ));
    }
    // Checked after the conflict, which is the more useful thing to say.
    if cli.fluent_bit.is_some() && cli.bind.is_none() {
        return command_line_error(Cli::command().error(
            ErrorKind::MissingRequiredArgument,
            "--fluent-bit needs --bind ADDR, the listener's address",
        ));
    }
    if let Err(err) = init_logging(cli.log_format, cli.log_level.as_deref()) {
        eprintln!("sluice: invalid --log-level: {err}");
        return ExitCode::from(EXIT_CONFIG);
    }
    // The file that configuration errors found after parsing are about.
    let source = cli.fluent_bit.as_ref().unwrap_or(&cli.config).clone();
    let watch = match watch_interval(cli.watch_config.as_deref()) {
        Ok(interval) => interval.map(|interval| ConfigWatch {
            path: source.clone(),
            interval,
        }),
        Err(err) => {
            eprintln!("sluice: invalid --watch-config: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let check = cli.check;
    let worker_count = match cli.workers.as_deref().map(str::parse::<NonZeroUsize>) {
        None => workers::default_count(),
        Some(Ok(count)) => count,
        Some(Err(_)) => {
            eprintln!(
                "sluice: invalid --workers: expected a positive whole number, got {:?}",
                cli.workers.as_deref().unwrap_or_default()
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Reads the configuration as at start-up; a reload (SIGHUP) reads it again.
    let load = move || -> Result<Config, String> {
        let mut config = match (&cli.fluent_bit, &cli.bind) {
            (Some(file), Some(bind)) => Config::from_fluent_bit(file, bind),
            _ => Config::load(&cli.config),
        }
        .map_err(|err| err.to_string())?;
        apply_admin_flag(&mut config, cli.admin.as_deref())?;
        Ok(config)
    };
    let config = match load() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("sluice: configuration error: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // The control plane's runtime; connections run on the workers' own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sluice: cannot start the runtime: {err}");
            return ExitCode::from(EXIT_START);
        }
    };
    let result = if check {
        runtime.block_on(async {
            let upstreams = supervisor::check(&config)
                .await
                .map_err(StartError::Config)?;
            lifecycle::check_admin(&config)?;
            print!("{}", lifecycle::summary(&config, &upstreams));
            println!("configuration {} is valid", source.display());
            Ok(())
        })
    } else {
        runtime.block_on(lifecycle::run(config, load, watch, worker_count))
    };
    // Connections still open after the drain are closed here, not waited for.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(err)) => {
            eprintln!("sluice: configuration error: {}", err.in_file(&source));
            ExitCode::from(EXIT_CONFIG)
        }
        Err(err) => {
            eprintln!("sluice: cannot start: {err}");
            ExitCode::from(EXIT_START)
        }
    }
}

/// `None` when the watch is off: no flag, or `0s`.
fn watch_interval(value: Option<&str>) -> Result<Option<Duration>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    let interval = humantime::parse_duration(value)
        .map_err(|err| format!("invalid duration {}: {err}", quoted(value)))?;
    if interval > MAX_DURATION {
        return Err(format!(
            "{} is longer than the longest allowed duration, {}d",
            quoted(value),
            MAX_DURATION.as_secs() / (24 * 60 * 60)
        ));
    }
    Ok((!interval.is_zero()).then_some(interval))
}

/// `--admin ADDR` sets or overrides `[admin] bind`, however the configuration was built.
fn apply_admin_flag(config: &mut Config, flag: Option<&str>) -> Result<(), String> {
    if let Some(address) = flag {
        let bind = address.parse().map_err(|err| format!("--admin: {err}"))?;
        match &mut config.admin {
            Some(admin) => admin.bind = bind,
            None => {
                config.admin = Some(AdminConfig {
                    bind,
                    token_file: None,
                    state_file: None,
                })
            }
        }
    }
    Ok(())
}

fn init_logging(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let filter = match level {
        Some(level) => EnvFilter::try_new(level).map_err(|err| err.to_string())?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}
