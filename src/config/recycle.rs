//! The listener keys of SPEC §9 (recycling and rebalancing long-lived
//! connections): their raw forms and the checks that bound them.

use std::time::Duration;

use serde::Deserialize;

use super::limits::MAX_DURATION;

/// How sluice finds a quiet moment on a listener's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Any byte stream: both directions silent for `quiet_period` after an answer.
    #[default]
    Opaque,
    /// Fluentd Forward: a message boundary with every `chunk` acknowledged.
    Forward,
}

impl Protocol {
    /// As written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Opaque => "opaque",
            Protocol::Forward => "forward",
        }
    }
}

/// `rebalance_rate` is 1 ..= this many recycles per second per listener.
pub const MAX_REBALANCE_RATE: u32 = 10_000;

/// A listener's recycling settings, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecycleConfig {
    pub protocol: Protocol,
    /// `opaque`: how long both directions must be silent.
    pub quiet_period: Duration,
    /// `None`: connections are not recycled for their age.
    pub max_connection_age: Option<Duration>,
    /// Move excess connections when the peers' shares drift.
    pub rebalance: bool,
    /// At most this many recycles per second on the listener.
    pub rebalance_rate: u32,
    /// `None`: one access line per connection, at its close.
    pub access_log_interval: Option<Duration>,
}

impl Default for RecycleConfig {
    fn default() -> Self {
        RecycleConfig {
            protocol: Protocol::Opaque,
            quiet_period: Duration::from_millis(200),
            max_connection_age: None,
            rebalance: false,
            rebalance_rate: 20,
            access_log_interval: None,
        }
    }
}

impl RecycleConfig {
    /// Whether the listener's connections may be recycled at all (and so
    /// are registered and watched for quiet moments). Without it a listener
    /// relays exactly as before, and SIGTERM waits for its connections.
    pub fn recycles(&self) -> bool {
        self.rebalance || self.max_connection_age.is_some() || self.protocol == Protocol::Forward
    }

    /// Checks the bounds; an error names the key (the caller adds the line).
    pub(super) fn new(
        protocol: Protocol,
        quiet_period: Duration,
        max_connection_age: Option<Duration>,
        rebalance: bool,
        rebalance_rate: u32,
        access_log_interval: Option<Duration>,
    ) -> Result<RecycleConfig, (&'static str, String)> {
        if quiet_period < Duration::from_millis(1) || quiet_period > MAX_DURATION {
            return Err(("quiet_period", "must be from 1ms to 365 days".to_owned()));
        }
        for (key, value) in [
            ("max_connection_age", max_connection_age),
            ("access_log_interval", access_log_interval),
        ] {
            if value.is_some_and(|value| value < Duration::from_secs(1) || value > MAX_DURATION) {
                return Err((key, "must be \"off\" or from 1s to 365 days".to_owned()));
            }
        }
        if !(1..=MAX_REBALANCE_RATE).contains(&rebalance_rate) {
            return Err((
                "rebalance_rate",
                format!("must be from 1 to {MAX_REBALANCE_RATE} (recycles per second)"),
            ));
        }
        Ok(RecycleConfig {
            protocol,
            quiet_period,
            max_connection_age,
            rebalance,
            rebalance_rate,
            access_log_interval,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn listener_with(keys: &str) -> Result<RecycleConfig, String> {
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\nupstream = \"u\"\n{keys}\n\
             [upstream.u]\n[[upstream.u.server]]\naddress = \"127.0.0.1:2\"\n"
        );
        Config::parse(&text, Path::new("test.toml"))
            .map(|config| config.listeners[0].recycle)
            .map_err(|err| err.to_string())
    }

    #[test]
    fn defaults_match_the_contract_and_recycle_nothing() {
        let config = listener_with("").expect("valid");
        assert_eq!(config, RecycleConfig::default());
        assert_eq!(config.protocol, Protocol::Opaque);
        assert_eq!(config.quiet_period, Duration::from_millis(200));
        assert_eq!(config.max_connection_age, None);
        assert!(!config.rebalance);
        assert_eq!(config.rebalance_rate, 20);
        assert_eq!(config.access_log_interval, None);
        assert!(!config.recycles());
    }

    #[test]
    fn every_key_is_read() {
        let config = listener_with(
            "protocol = \"forward\"\nquiet_period = \"50ms\"\nmax_connection_age = \"15m\"\n\
             rebalance = true\nrebalance_rate = 5\naccess_log_interval = \"1m\"",
        )
        .expect("valid");
        assert_eq!(
            config,
            RecycleConfig {
                protocol: Protocol::Forward,
                quiet_period: Duration::from_millis(50),
                max_connection_age: Some(Duration::from_secs(900)),
                rebalance: true,
                rebalance_rate: 5,
                access_log_interval: Some(Duration::from_secs(60)),
            }
        );
        assert!(config.recycles());
        let off = listener_with("max_connection_age = \"off\"\naccess_log_interval = \"off\"")
            .expect("valid");
        assert_eq!(
            (off.max_connection_age, off.access_log_interval),
            (None, None)
        );
        for keys in [
            "protocol = \"forward\"",
            "rebalance = true",
            "max_connection_age = \"1h\"",
        ] {
            assert!(listener_with(keys).expect("valid").recycles(), "{keys}");
        }
    }

    #[test]
    fn bounds_are_errors_naming_key_and_line() {
        for (keys, key) in [
            ("quiet_period = \"0s\"", "quiet_period"),
            ("quiet_period = \"366days\"", "quiet_period"),
            ("max_connection_age = \"500ms\"", "max_connection_age"),
            ("max_connection_age = \"400years\"", "max_connection_age"),
            ("access_log_interval = \"0s\"", "access_log_interval"),
            ("access_log_interval = \"1000days\"", "access_log_interval"),
            ("rebalance_rate = 0", "rebalance_rate"),
            ("rebalance_rate = 10001", "rebalance_rate"),
        ] {
            let err = listener_with(keys).expect_err(keys);
            assert!(err.contains(key), "{keys}: {err}");
            assert!(err.contains("test.toml:5"), "{keys}: {err}");
        }
        // The largest values accepted.
        listener_with(
            "quiet_period = \"365days\"\nmax_connection_age = \"365days\"\nrebalance_rate = 10000",
        )
        .expect("valid");
        for keys in [
            "protocol = \"http\"",
            "max_connection_age = \"forever\"",
            "rebalance_rate = -1",
            "quiet_period = \"off\"",
        ] {
            assert!(listener_with(keys).is_err(), "{keys}");
        }
    }
}
