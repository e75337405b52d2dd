//! `from_fluent_bit = "FILE"`: an upstream's servers read from a Fluent Bit
//! Upstream file, with the upstream's `tls` table as their defaults.

use std::path::PathBuf;

use toml::Spanned;

use super::raw::RawClientTls;
use super::Source;
use crate::config::fluent_bit::{config_error, reader, servers_from_nodes, GroupTls};
use crate::config::{
    parse_server_name, quoted, ClientTlsSettings, ConfigError, FileLines, PemKind, ServerConfig,
};

impl Source<'_> {
    /// The servers of `from_fluent_bit = "FILE"` (relative to the TOML file's
    /// directory). An error inside that file names that file and its line.
    pub(super) fn fluent_bit_servers(
        &self,
        upstream: &str,
        file: Spanned<PathBuf>,
        group_tls: Option<&Spanned<RawClientTls>>,
    ) -> Result<Vec<ServerConfig>, ConfigError> {
        let span = file.span();
        let path = self.relative(file.into_inner());
        // Like an @INCLUDE: checked before opening, which would wait on a FIFO.
        if std::fs::metadata(&path).is_ok_and(|metadata| !metadata.is_file()) {
            return Err(self.error(
                Some(span),
                format!(
                    "upstream {upstream}: key `from_fluent_bit`: {} is not a regular file",
                    quoted(&path.display().to_string())
                ),
            ));
        }
        let upstream_file = reader::load(&path).map_err(|err| {
            if err.line.is_none() && !path.exists() {
                // The file itself is missing: point at the key that names it.
                self.error(
                    Some(span.clone()),
                    format!("upstream {upstream}: key `from_fluent_bit`: {err}"),
                )
            } else {
                config_error(err)
            }
        })?;
        let group_tls = match group_tls {
            Some(tls) => Some(self.group_tls(upstream, tls.get_ref())?),
            None => None,
        };
        servers_from_nodes(&upstream_file, group_tls.as_ref())
    }

    /// The upstream's `tls` table as the nodes take it, with its files' lines.
    fn group_tls(&self, upstream: &str, tls: &RawClientTls) -> Result<GroupTls, ConfigError> {
        if let Some(name) = &tls.server_name {
            parse_server_name(name.get_ref())
                .map_err(|err| self.error_at(name, format!("upstream {upstream}: TLS: {err}")))?;
        }
        let mut lines = FileLines::default();
        let mut file = |path: &Option<Spanned<PathBuf>>, kind: PemKind| {
            path.clone()
                .map(|path| self.tls_file(path, kind, &mut lines))
        };
        let settings = ClientTlsSettings {
            verify: tls.verify.unwrap_or(true),
            server_name: tls.server_name.clone().map(Spanned::into_inner),
            ca_file: file(&tls.ca_file, PemKind::Certificates),
            ca_path: None,
            cert_file: file(&tls.cert_file, PemKind::Certificates),
            key_file: file(&tls.key_file, PemKind::PrivateKey),
        };
        Ok(GroupTls { settings, lines })
    }
}
