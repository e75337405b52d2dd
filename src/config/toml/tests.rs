use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{
    Address, AdminConfig, Balance, Config, ConfigError, FileLines, HashKey, HashRing,
    HealthCheckConfig, InvalidServerName, KeyLine, ProxyProtocol, ServerConfig,
};
// Only to check that the configuration places the errors of reading TLS files.
use crate::tls::TlsError;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("test.toml"))
}

const MINIMAL: &str = r#"
[[listener]]
name = "l"
bind = "127.0.0.1:7000"
upstream = "u"

[upstream.u]
[[upstream.u.server]]
address = "127.0.0.1:7001"
"#;

#[test]
fn defaults_match_the_contract() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.shutdown_timeout, Duration::from_secs(30));
    let listener = &config.listeners[0];
    assert_eq!(listener.connect_timeout, Duration::from_secs(5));
    assert_eq!(listener.idle_timeout, Some(Duration::from_secs(600)));
    assert_eq!(listener.next_upstream_tries, 0);
    assert_eq!(listener.next_upstream_timeout, None);
    assert_eq!(listener.proxy_protocol, ProxyProtocol::Off);
    assert!(!listener.accept_proxy_protocol);
    let server = &config.upstreams["u"].servers[0];
    assert_eq!(
        (server.weight, server.max_conns, server.max_fails),
        (1, 0, 1)
    );
    assert_eq!(server.fail_timeout, Duration::from_secs(10));
    assert!(!server.backup && !server.down);
    assert_eq!(server.slow_start, Duration::ZERO);
    assert!(!server.resolve);
    assert_eq!(server.resolve_interval, Duration::from_secs(5));
    assert!(config.upstreams["u"].resolver.is_empty());
    assert_eq!(config.upstreams["u"].balance, Balance::RoundRobin);
    assert_eq!(config.admin, None);
    assert!(listener.access_log);
    assert!(listener.delayed_ack);
}

#[test]
fn delayed_ack_is_a_boolean() {
    let with = |extra: &str| {
        parse(&MINIMAL.replace("upstream = \"u\"", &format!("upstream = \"u\"\n{extra}")))
    };
    let config = with("delayed_ack = false").unwrap();
    assert!(!config.listeners[0].delayed_ack);
    for value in ["\"no\"", "0", "\"off\""] {
        let err = with(&format!("delayed_ack = {value}")).unwrap_err();
        assert_eq!(err.line, Some(6), "{value}: {err}");
        assert!(err.message.contains("delayed_ack"), "{value}: {err}");
    }
}

#[test]
fn admin_bind_and_access_log() {
    let text = format!(
        "{}\n[admin]\nbind = \"unix:/run/sluice/admin.sock\"\n",
        MINIMAL.replace("upstream = \"u\"", "upstream = \"u\"\naccess_log = false")
    );
    let config = parse(&text).unwrap();
    assert_eq!(
        config.admin,
        Some(AdminConfig {
            bind: Address::Unix("/run/sluice/admin.sock".into()),
            token_file: None,
            state_file: None,
        })
    );
    assert!(!config.listeners[0].access_log);
}

#[test]
fn admin_bind_is_checked() {
    let err = error_of(&format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1\"\n"));
    assert_eq!(err.line, Some(12));
    assert!(err.message.contains("127.0.0.1"), "{err}");
    let err = error_of(&format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:7000\"\n"));
    assert_eq!(err.line, Some(12));
    assert!(err.message.contains("[admin]"), "{err}");
    let err = error_of(&format!("{MINIMAL}\n[admin]\nport = 9100\n"));
    assert!(err.message.contains("port"), "{err}");
    let err = error_of(&format!("{MINIMAL}\n[admin]\n"));
    assert!(err.message.contains("bind"), "{err}");
}

fn error_of(text: &str) -> ConfigError {
    match parse(text) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(err) => err,
    }
}

#[test]
fn unknown_key_names_key_and_line() {
    let err = error_of(&MINIMAL.replace("upstream = \"u\"", "upstream = \"u\"\ncolour = 1"));
    assert_eq!(err.line, Some(6));
    assert!(err.message.contains("colour"), "{err}");
}

#[test]
fn bad_duration_names_key_and_line() {
    let err = error_of(&MINIMAL.replace(
        "upstream = \"u\"",
        "upstream = \"u\"\nidle_timeout = \"5 parsecs\"",
    ));
    assert_eq!(err.line, Some(6));
    assert!(err.message.contains("idle_timeout"), "{err}");
    assert!(err.message.contains("5 parsecs"), "{err}");
}

#[test]
fn unknown_upstream_is_named() {
    let err = error_of(&MINIMAL.replace("upstream = \"u\"", "upstream = \"nope\""));
    assert_eq!(err.line, Some(5));
    assert!(err.message.contains("\"nope\""), "{err}");
}

#[test]
fn port_out_of_range() {
    let err = error_of(&MINIMAL.replace("127.0.0.1:7001", "127.0.0.1:70000"));
    assert_eq!(err.line, Some(9));
    assert!(err.message.contains("70000"), "{err}");
}

#[test]
fn duplicate_listener_names() {
    let second = "\n[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:7002\"\nupstream = \"u\"\n";
    let err = error_of(&format!("{MINIMAL}{second}"));
    assert_eq!(err.line, Some(12));
    assert!(err.message.contains("duplicate listener name"), "{err}");
}

#[test]
fn backup_is_refused_with_hash() {
    let text =
        MINIMAL.replace("[upstream.u]", "[upstream.u]\nbalance = \"hash\"") + "backup = true\n";
    let err = error_of(&text);
    assert_eq!(err.line, Some(11));
    assert!(err.message.contains("backup"), "{err}");
    assert!(err.message.contains("hash"), "{err}");
}

#[test]
fn slow_start_only_with_round_robin_and_least_conn() {
    let with = |balance: &str| {
        parse(
            &(MINIMAL.replace(
                "[upstream.u]",
                &format!("[upstream.u]\nbalance = \"{balance}\""),
            ) + "slow_start = \"30s\"\n"),
        )
    };
    for balance in ["round_robin", "least_conn"] {
        let config = with(balance).unwrap();
        assert_eq!(
            config.upstreams["u"].servers[0].slow_start,
            Duration::from_secs(30)
        );
    }
    for balance in ["random", "random_two", "hash"] {
        let err = with(balance).unwrap_err();
        assert_eq!(err.line, Some(11), "{err}");
        assert!(err.message.contains("slow_start"), "{err}");
        assert!(err.message.contains(balance), "{err}");
    }
}

#[test]
fn proxy_protocol_versions() {
    let with = |extra: &str| {
        parse(&MINIMAL.replace("upstream = \"u\"", &format!("upstream = \"u\"\n{extra}")))
    };
    for (text, version) in [
        ("off", ProxyProtocol::Off),
        ("v1", ProxyProtocol::V1),
        ("v2", ProxyProtocol::V2),
    ] {
        let config = with(&format!("proxy_protocol = \"{text}\"")).unwrap();
        assert_eq!(config.listeners[0].proxy_protocol, version);
    }
    let err = with("proxy_protocol = \"v3\"").unwrap_err();
    assert_eq!(err.line, Some(6));
    assert!(err.message.contains("v3"), "{err}");
    let config = with("accept_proxy_protocol = true").unwrap();
    assert!(config.listeners[0].accept_proxy_protocol);
}

#[test]
fn health_check_defaults_and_limits() {
    assert_eq!(parse(MINIMAL).unwrap().upstreams["u"].health_check, None);
    let with = |body: &str| parse(&format!("{MINIMAL}\n[upstream.u.health_check]\n{body}"));
    let check = with("").unwrap().upstreams["u"]
        .health_check
        .clone()
        .unwrap();
    assert_eq!(
        check,
        HealthCheckConfig {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            fails: 3,
            passes: 2,
            send: None,
            expect: None,
        }
    );
    let check = with("send = \"version\\r\\n\"\nexpect = \"VERSION\"")
        .unwrap()
        .upstreams["u"]
        .health_check
        .clone()
        .unwrap();
    assert_eq!(check.send.as_deref(), Some(&b"version\r\n"[..]));
    assert_eq!(check.expect.as_deref(), Some(&b"VERSION"[..]));
    for (body, key) in [
        ("interval = \"0s\"", "interval"),
        ("timeout = \"0s\"", "timeout"),
        ("fails = 0", "fails"),
        ("passes = 0", "passes"),
        ("expect = \"\"", "expect"),
        ("port = 1", "port"),
    ] {
        let err = with(body).unwrap_err();
        assert_eq!(err.line, Some(12), "{err}");
        assert!(err.message.contains(key), "{err}");
    }
}

#[test]
fn resolve_keys() {
    let text = MINIMAL.replace(
        "[upstream.u]",
        "[upstream.u]\nresolver = [\"127.0.0.1:5353\", \"10.0.0.10\", \"[::1]:53\"]",
    ) + "resolve = true\nresolve_interval = \"1m\"\n";
    let config = parse(&text).unwrap();
    let upstream = &config.upstreams["u"];
    assert_eq!(
        upstream.resolver,
        vec![
            "127.0.0.1:5353".parse::<SocketAddr>().unwrap(),
            "10.0.0.10:53".parse().unwrap(),
            "[::1]:53".parse().unwrap()
        ]
    );
    assert!(upstream.servers[0].resolve);
    assert_eq!(
        upstream.servers[0].resolve_interval,
        Duration::from_secs(60)
    );

    let err =
        error_of(&MINIMAL.replace("[upstream.u]", "[upstream.u]\nresolver = [\"dns.local\"]"));
    assert_eq!(err.line, Some(8), "{err}");
    assert!(err.message.contains("resolver"), "{err}");
    let err =
        error_of(&(MINIMAL.replace("127.0.0.1:7001", "unix:/tmp/u.sock") + "resolve = true\n"));
    assert!(err.message.contains("resolve"), "{err}");
    let err = error_of(&(MINIMAL.to_owned() + "resolve_interval = \"0s\"\n"));
    assert!(err.message.contains("resolve_interval"), "{err}");
}

#[test]
fn hash_key_only_with_hash() {
    let err = error_of(&MINIMAL.replace("[upstream.u]", "[upstream.u]\nhash_key = \"client_ip\""));
    assert!(err.message.contains("hash_key"), "{err}");
    let ok = parse(&MINIMAL.replace(
        "[upstream.u]",
        "[upstream.u]\nbalance = \"hash\"\nhash_key = \"client_addr\"",
    ))
    .unwrap();
    assert_eq!(
        ok.upstreams["u"].balance,
        Balance::Hash(HashKey::ClientAddr)
    );
}

#[test]
fn hash_ring_is_nginx_by_default_ketama_on_request_and_only_with_hash() {
    let hash = |extra: &str| {
        MINIMAL.replace(
            "[upstream.u]",
            &format!("[upstream.u]\nbalance = \"hash\"\n{extra}"),
        )
    };
    assert_eq!(
        parse(&hash("")).unwrap().upstreams["u"].hash_ring,
        HashRing::Nginx
    );
    let ketama = parse(&hash("hash_ring = \"ketama\"")).unwrap();
    assert_eq!(ketama.upstreams["u"].hash_ring, HashRing::Ketama);
    let err = error_of(&hash("hash_ring = \"md5\""));
    assert!(err.message.contains("md5"), "{err}");
    let err = error_of(&MINIMAL.replace("[upstream.u]", "[upstream.u]\nhash_ring = \"ketama\""));
    assert!(err.message.contains("`hash_ring` applies only"), "{err}");
    assert!(err.to_string().contains(":8:"), "{err}");
}

#[test]
fn syntax_error_has_a_line() {
    let err = error_of(&MINIMAL.replace("name = \"l\"", "name = "));
    assert_eq!(err.line, Some(3));
}

#[test]
fn unix_mode_only_for_unix() {
    let err =
        error_of(&MINIMAL.replace("upstream = \"u\"", "upstream = \"u\"\nunix_mode = \"0600\""));
    assert!(err.message.contains("unix_mode"), "{err}");
    let ok = parse(
        &MINIMAL
            .replace("127.0.0.1:7000", "unix:/tmp/x.sock")
            .replace("upstream = \"u\"", "upstream = \"u\"\nunix_mode = \"0600\""),
    )
    .unwrap();
    assert_eq!(ok.listeners[0].unix_mode, 0o600);
}

#[test]
fn server_tls_overrides_the_groups_and_group_tls_turns_tls_on() {
    let text = MINIMAL.replace(
        "[upstream.u]",
        "[upstream.u]\n[upstream.u.tls]\nca_file = \"ca.pem\"\nserver_name = \"group.test\"",
    ) + "[upstream.u.server.tls]\nverify = false\nserver_name = \"own.test\"\n\
         cert_file = \"/abs/client.pem\"\nkey_file = \"client.key\"\n\
         [[upstream.u.server]]\naddress = \"127.0.0.1:7002\"\n";
    let config = Config::parse(&text, Path::new("/etc/sluice/sluice.toml")).unwrap();
    let servers = &config.upstreams["u"].servers;
    let own = servers[0].tls.as_ref().unwrap();
    assert!(!own.verify);
    assert_eq!(own.server_name.as_deref(), Some("own.test"));
    assert_eq!(
        own.ca_file.as_deref(),
        Some(Path::new("/etc/sluice/ca.pem"))
    );
    assert_eq!(own.cert_file.as_deref(), Some(Path::new("/abs/client.pem")));
    assert_eq!(
        own.key_file.as_deref(),
        Some(Path::new("/etc/sluice/client.key"))
    );
    let inherited = servers[1].tls.as_ref().unwrap();
    assert!(inherited.verify);
    assert_eq!(inherited.server_name.as_deref(), Some("group.test"));
    assert_eq!(inherited.cert_file, None);
    assert_eq!(parse(MINIMAL).unwrap().upstreams["u"].servers[0].tls, None);
}

#[test]
fn listener_tls_paths_are_relative_to_the_file() {
    let text = MINIMAL.replace(
        "upstream = \"u\"",
        "upstream = \"u\"\n[listener.tls]\ncert_file = \"tls.pem\"\nkey_file = \"/k.pem\"",
    );
    let config = Config::parse(&text, Path::new("/etc/sluice/sluice.toml")).unwrap();
    let tls = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.cert_file, Path::new("/etc/sluice/tls.pem"));
    assert_eq!(tls.key_file, Path::new("/k.pem"));
    assert_eq!(tls.client_ca_file, None);
}

#[test]
fn tls_table_errors_name_the_line() {
    let err = error_of(&format!(
        "{MINIMAL}[upstream.u.server.tls]\nkey_file = \"k.pem\"\n"
    ));
    assert_eq!(err.line, Some(10));
    assert!(
        err.message
            .contains("`key_file` is given without `cert_file`"),
        "{err}"
    );
    let err = error_of(&format!(
        "{MINIMAL}[upstream.u.server.tls]\nverfy = false\n"
    ));
    assert_eq!(err.line, Some(11));
    assert!(err.message.contains("verfy"), "{err}");
    let err = error_of(
        &format!("{MINIMAL}[upstream.u.server.tls]\n")
            .replace("127.0.0.1:7001", "unix:/run/u.sock"),
    );
    assert!(err.message.contains("server_name"), "{err}");
    let err = error_of(&MINIMAL.replace(
        "upstream = \"u\"",
        "upstream = \"u\"\n[listener.tls]\ncert_file = \"tls.pem\"",
    ));
    assert!(err.message.contains("key_file"), "{err}");
}

/// An error found when the value written at `line` is used: (file, line, message).
fn placed(line: &KeyLine) -> (PathBuf, Option<usize>, String) {
    let err = line.error("cannot use it".to_owned());
    (err.file, err.line, err.message)
}

#[test]
fn values_checked_when_used_keep_the_line_naming_them() {
    let text = r#"
[[listener]]
name = "l"
bind = "127.0.0.1:7000"
upstream = "u"
[listener.tls]
cert_file = "tls.pem"
key_file = "/k.pem"
client_ca_file = "clients.pem"

[upstream.u.tls]
cert_file = "group.pem"
key_file = "group.key"
[[upstream.u.server]]
address = "127.0.0.1:7001"
[upstream.u.server.tls]
ca_file = "own-ca.pem"
"#;
    let file = Path::new("/etc/sluice/sluice.toml");
    let config = Config::parse(text, file).unwrap();
    let line_of = |lines: &FileLines, path: &str| {
        let (named_in, line, message) = placed(lines.of(Path::new(path), None).unwrap());
        assert_eq!(named_in, file);
        (line.unwrap(), message)
    };
    let listener = &config.listeners[0].tls_lines;
    assert_eq!(
        line_of(listener, "/etc/sluice/tls.pem"),
        (7, "cannot use it (in `cert_file = \"tls.pem\"`)".to_owned())
    );
    assert_eq!(line_of(listener, "/k.pem").0, 8);
    assert_eq!(line_of(listener, "/etc/sluice/clients.pem").0, 9);
    assert!(listener
        .of(Path::new("/etc/sluice/other.pem"), None)
        .is_none());

    let server = &config.upstreams["u"].servers[0];
    assert_eq!(
        placed(&server.address_line),
        (
            file.to_owned(),
            Some(15),
            "cannot use it (in `address = \"127.0.0.1:7001\"`)".to_owned()
        )
    );
    assert_eq!(line_of(&server.tls_lines, "/etc/sluice/own-ca.pem").0, 17);
    // Files the server takes from the group's table: the group's lines.
    assert_eq!(line_of(&server.tls_lines, "/etc/sluice/group.pem").0, 12);
    assert_eq!(line_of(&server.tls_lines, "/etc/sluice/group.key").0, 13);

    // Lines are not part of the configuration: moving them changes nothing.
    let moved = Config::parse(&format!("# moved down\n{text}"), file).unwrap();
    assert_eq!(moved, config);
}

#[test]
fn one_file_named_by_two_keys_is_told_apart_by_what_failed() {
    let text = MINIMAL.replace(
        "upstream = \"u\"",
        "upstream = \"u\"\n[listener.tls]\ncert_file = \"/c.pem\"\nkey_file = \"/same.pem\"\nclient_ca_file = \"/same.pem\"",
    );
    let config = parse(&text).unwrap();
    let lines = &config.listeners[0].tls_lines;
    let path = PathBuf::from("/same.pem");
    let line_for = |err: TlsError| lines.naming(&err).and_then(|line| placed(line).1);
    assert_eq!(
        line_for(TlsError::NoPrivateKey { path: path.clone() }),
        Some(8)
    );
    assert_eq!(
        line_for(TlsError::NoCertificate { path: path.clone() }),
        Some(9)
    );
    let unreadable = TlsError::Read {
        path,
        source: std::io::ErrorKind::NotFound.into(),
    };
    assert_eq!(line_for(unreadable), Some(8), "the first read");
    assert_eq!(
        line_for(TlsError::InvalidServerName(InvalidServerName {
            name: "x".into()
        })),
        None
    );
}

#[test]
fn an_invalid_server_name_is_named_with_its_line() {
    let err = error_of(&format!(
        "{MINIMAL}[upstream.u.server.tls]\nserver_name = \"not a name!\"\n"
    ));
    assert_eq!(err.line, Some(11), "{err}");
    assert!(err.message.contains("invalid TLS server name"), "{err}");
    assert!(err.message.contains("server_name"), "{err}");
}

#[test]
fn servers_of_one_upstream_need_distinct_labels() {
    let second = |extra: &str| {
        format!(
            "{MINIMAL}name = \"x\"\n[[upstream.u.server]]\naddress = \"127.0.0.1:7002\"\n{extra}"
        )
    };
    let err = error_of(&second("name = \"x\"\n"));
    assert_eq!(err.line, Some(13), "{err}");
    assert!(
        err.message
            .contains("server name \"x\" is already used by another server of this upstream"),
        "{err}"
    );
    assert!(parse(&second("name = \"y\"\n")).is_ok());

    // Without `name`, the address is the label: listing it twice would
    // merge the two servers' metrics.
    let twice = format!("{MINIMAL}[[upstream.u.server]]\naddress = \"127.0.0.1:7001\"\n");
    let err = error_of(&twice);
    assert_eq!(err.line, Some(11), "{err}");
    assert!(err.message.contains("distinct `name`s"), "{err}");
    assert!(parse(&format!("{twice}name = \"again\"\n")).is_ok());

    // Labels are per upstream.
    let other = MINIMAL.replace("upstream = \"u\"", "upstream = \"v\"")
        + "[[upstream.v.server]]\naddress = \"127.0.0.1:7001\"\n";
    assert!(parse(&other).is_ok());
}

const UPSTREAM_FILE: &str = "[UPSTREAM]\n    name  fb\n\n[NODE]\n    name  one\n    host  127.0.0.1\n    port  7101\n\n\
    [NODE]\n    name  two\n    host  backend.test\n    port  7102\n    tls   on\n    tls.vhost  sni.test\n\
    \x20   tls.ca_path  /cas\n    shared_key  secret\n";

fn with_upstream_file(toml: &str, upstream_file: &str) -> Result<Config, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("nodes.conf"), upstream_file).unwrap();
    Config::parse(toml, &dir.path().join("sluice.toml"))
}

#[test]
fn from_fluent_bit_takes_the_nodes_before_the_servers() {
    let text = MINIMAL.replace(
        "[upstream.u]",
        "[upstream.u]\nfrom_fluent_bit = \"nodes.conf\"\n[upstream.u.tls]\nca_file = \"/ca.pem\"",
    );
    let config = with_upstream_file(&text, UPSTREAM_FILE).unwrap();
    let servers = &config.upstreams["u"].servers;
    let labels: Vec<String> = servers.iter().map(ServerConfig::label).collect();
    assert_eq!(labels, ["one", "two", "127.0.0.1:7001"]);
    assert_eq!(servers[0].tls, None, "a node without `tls on` stays plain");
    let tls = servers[1].tls.as_ref().unwrap();
    assert!(tls.verify);
    assert_eq!(tls.server_name.as_deref(), Some("sni.test"));
    assert_eq!(tls.ca_file.as_deref(), Some(Path::new("/ca.pem")));
    assert_eq!(tls.ca_path.as_deref(), Some(Path::new("/cas")));
    assert_eq!(
        servers[1].plugin_keys,
        [("shared_key".to_owned(), "secret".to_owned())]
    );
    assert_eq!(servers[1].address.to_string(), "backend.test:7102");
    // The group's table turns TLS on for [[server]] entries as usual.
    assert!(servers[2].tls.is_some());

    // Values used later keep the line naming them: in the node file
    // (its errors do not quote lines), or in the TOML for the group's.
    let (file, line, message) = placed(&servers[1].address_line);
    assert!(file.ends_with("nodes.conf"), "{file:?}");
    assert_eq!((line, message.as_str()), (Some(11), "cannot use it"));
    let (file, line, _) = placed(
        servers[1]
            .tls_lines
            .of(Path::new("/cas/a.pem"), None)
            .unwrap(),
    );
    assert!(file.ends_with("nodes.conf"), "{file:?}");
    assert_eq!(line, Some(15));
    let (file, line, message) =
        placed(servers[1].tls_lines.of(Path::new("/ca.pem"), None).unwrap());
    assert!(file.ends_with("sluice.toml"), "{file:?}");
    assert_eq!(line, Some(10));
    assert!(
        message.ends_with("(in `ca_file = \"/ca.pem\"`)"),
        "{message}"
    );
}

#[test]
fn fluent_bit_nodes_of_one_name_are_kept_but_a_server_may_not_join_them() {
    let text = MINIMAL.replace(
        "[upstream.u]",
        "[upstream.u]\nfrom_fluent_bit = \"nodes.conf\"",
    );
    let same_names = UPSTREAM_FILE.replace("name  two", "name  one");
    let config = with_upstream_file(&text, &same_names).unwrap();
    let labels: Vec<String> = config.upstreams["u"]
        .servers
        .iter()
        .map(ServerConfig::label)
        .collect();
    assert_eq!(labels, ["one", "one", "127.0.0.1:7001"]);

    let err = with_upstream_file(&format!("{text}name = \"two\"\n"), UPSTREAM_FILE).unwrap_err();
    assert!(err.file.ends_with("sluice.toml"), "{err}");
    assert_eq!(err.line, Some(11), "{err}");
    assert!(err.message.contains("\"two\" is already used"), "{err}");
}

#[test]
fn from_fluent_bit_alone_is_enough_and_its_errors_name_that_file() {
    let text = "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:7000\"\nupstream = \"u\"\n\
                [upstream.u]\nfrom_fluent_bit = \"nodes.conf\"\n";
    let config = with_upstream_file(text, UPSTREAM_FILE).unwrap();
    assert_eq!(config.upstreams["u"].servers.len(), 2);

    let err = with_upstream_file(text, &UPSTREAM_FILE.replace("7102", "70000")).unwrap_err();
    assert!(err.file.ends_with("nodes.conf"), "{err}");
    assert_eq!(err.line, Some(12));

    let err =
        with_upstream_file(&text.replace("nodes.conf", "absent.conf"), UPSTREAM_FILE).unwrap_err();
    assert!(err.file.ends_with("sluice.toml"), "{err}");
    assert_eq!(err.line, Some(6));
    assert!(err.message.contains("absent.conf"), "{err}");
}

#[test]
fn fluent_bit_mode_builds_one_round_robin_listener() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nodes.conf");
    std::fs::write(&file, UPSTREAM_FILE).unwrap();
    let config = Config::from_fluent_bit(&file, "[::1]:24224").unwrap();
    assert_eq!(config.listeners.len(), 1);
    let listener = &config.listeners[0];
    assert_eq!(
        (listener.name.as_str(), listener.upstream.as_str()),
        ("fb", "fb")
    );
    assert_eq!(listener.bind.to_string(), "[::1]:24224");
    assert_eq!(listener.connect_timeout, Duration::from_secs(5));
    let upstream = &config.upstreams["fb"];
    assert_eq!(upstream.balance, Balance::RoundRobin);
    assert_eq!(upstream.servers.len(), 2);
    let err = Config::from_fluent_bit(&file, "nowhere").unwrap_err();
    assert!(err.to_string().starts_with("--bind: "), "{err}");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Lines built from the configuration's own vocabulary, valid or not.
    fn config_line() -> impl Strategy<Value = String> {
        let key = prop::sample::select(vec![
            "name",
            "bind",
            "upstream",
            "connect_timeout",
            "idle_timeout",
            "next_upstream_tries",
            "next_upstream_timeout",
            "unix_mode",
            "balance",
            "hash_key",
            "address",
            "weight",
            "max_conns",
            "max_fails",
            "fail_timeout",
            "backup",
            "down",
            "shutdown_timeout",
            "colour",
        ]);
        let value = prop::sample::select(vec![
            "\"u\"",
            "\"l\"",
            "\"127.0.0.1:7000\"",
            "\"[::1]:7001\"",
            "\"unix:/tmp/s.sock\"",
            "\"unix:relative\"",
            "\"host:0\"",
            "\"host:99999\"",
            "\"5s\"",
            "\"0s\"",
            "\"5 parsecs\"",
            "\"hash\"",
            "\"random\"",
            "\"client_ip\"",
            "\"0660\"",
            "\"9999\"",
            "0",
            "1",
            "-1",
            "4294967296",
            "true",
            "\"\"",
            "[]",
            "{}",
            "\"",
        ]);
        prop_oneof![
            (key, value).prop_map(|(k, v)| format!("{k} = {v}")),
            prop::sample::select(vec![
                "[[listener]]",
                "[upstream.u]",
                "[upstream.v]",
                "[[upstream.u.server]]",
                "[[upstream.v.server]]",
                "[upstream.u.tls]",
                "[admin]",
                "[[upstream]]",
                "[",
            ])
            .prop_map(str::to_owned),
        ]
    }

    fn check_invariants(text: &str, result: Result<Config, ConfigError>) {
        match result {
            Ok(config) => {
                assert!(!config.listeners.is_empty());
                for listener in &config.listeners {
                    assert!(config.upstreams.contains_key(&listener.upstream));
                }
                for upstream in config.upstreams.values() {
                    assert!(!upstream.servers.is_empty());
                    assert!(upstream.servers.iter().all(|server| server.weight >= 1));
                }
            }
            Err(err) => {
                assert_eq!(err.file, Path::new("test.toml"));
                if let Some(line) = err.line {
                    assert!(line >= 1 && line <= text.lines().count() + 1, "{err}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_text_never_panics(text in any::<String>()) {
            check_invariants(&text, parse(&text));
        }

        #[test]
        fn vocabulary_soup_never_panics(lines in prop::collection::vec(config_line(), 0..32)) {
            let text = lines.join("\n");
            check_invariants(&text, parse(&text));
        }

        #[test]
        fn mutated_minimal_config_never_panics(
            cuts in prop::collection::vec((any::<prop::sample::Index>(), 0..8usize, config_line()), 1..6),
        ) {
            let mut text = MINIMAL.to_owned();
            for (at, len, insert) in cuts {
                let start = at.index(text.len() + 1);
                let end = (start + len).min(text.len());
                if text.is_char_boundary(start) && text.is_char_boundary(end) {
                    text.replace_range(start..end, &insert);
                }
            }
            check_invariants(&text, parse(&text));
        }

        #[test]
        fn generated_values_come_back_exactly(
            weight in 1..1000u32,
            max_conns in any::<u32>(),
            max_fails in any::<u32>(),
            fail_ms in 1..100_000u64,
            tries in any::<u32>(),
            port in 1..=65535u16,
            backup: bool,
        ) {
            let text = format!(
                "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:{port}\"\nupstream = \"u\"\n\
                 next_upstream_tries = {tries}\n\n[upstream.u]\n[[upstream.u.server]]\n\
                 address = \"[::1]:{port}\"\nweight = {weight}\nmax_conns = {max_conns}\n\
                 max_fails = {max_fails}\nfail_timeout = \"{fail_ms}ms\"\nbackup = {backup}\n"
            );
            let config = parse(&text).unwrap();
            let listener = &config.listeners[0];
            prop_assert_eq!(listener.next_upstream_tries, tries);
            prop_assert_eq!(&listener.bind, &Address::Inet { host: "127.0.0.1".into(), port });
            let server = &config.upstreams["u"].servers[0];
            prop_assert_eq!(&server.address, &Address::Inet { host: "::1".into(), port });
            prop_assert_eq!(
                (server.weight, server.max_conns, server.max_fails, server.backup),
                (weight, max_conns, max_fails, backup)
            );
            prop_assert_eq!(server.fail_timeout, Duration::from_millis(fail_ms));
        }
    }
}

mod bounds {
    use super::*;
    use crate::config::limits::{
        MAX_DURATION, MAX_KEYS_PER_SECTION, MAX_LINE_BYTES, MAX_SERVERS, MAX_TABLES, MAX_WEIGHT,
        QUOTE_CHARS,
    };
    use proptest::prelude::*;

    fn with_server_key(line: &str) -> String {
        format!("{MINIMAL}{line}\n")
    }

    #[test]
    fn durations_are_bare_seconds_or_with_a_unit_up_to_365_days() {
        for (written, seconds) in [("10", 10), ("\"10\"", 10), ("\"365d\"", 365 * 86_400)] {
            let config = parse(&with_server_key(&format!("fail_timeout = {written}"))).unwrap();
            let server = &config.upstreams["u"].servers[0];
            assert_eq!(
                server.fail_timeout,
                Duration::from_secs(seconds),
                "{written}"
            );
        }
        assert_eq!(MAX_DURATION, Duration::from_secs(365 * 86_400));
        for written in [
            "\"366d\"",
            "\"18446744073709551615s\"",
            "9223372036854775807",
            "-1",
            "\"-1s\"",
            "\"\"",
        ] {
            let err =
                parse(&with_server_key(&format!("fail_timeout = {written}"))).expect_err(written);
            assert_eq!(err.line, Some(10), "{written}: {err}");
        }
    }

    #[test]
    fn weight_is_at_most_1000() {
        let config = parse(&with_server_key(&format!("weight = {MAX_WEIGHT}"))).unwrap();
        assert_eq!(config.upstreams["u"].servers[0].weight, 1000);
        let err = parse(&with_server_key("weight = 1001")).unwrap_err();
        assert_eq!(err.line, Some(10), "{err}");
        assert!(err.message.contains("at most 1000"), "{err}");
    }

    #[test]
    fn a_table_holds_at_most_256_keys_but_a_multi_line_string_holds_any_lines() {
        let keys: String = (0..=MAX_KEYS_PER_SECTION)
            .map(|index| format!("k{index} = 1\n"))
            .collect();
        let err = parse(&format!("{MINIMAL}[admin]\n{keys}")).unwrap_err();
        // MINIMAL is 9 lines (the first empty), [admin] the 10th, its first
        // key the 11th: the 257th key is on line 267.
        assert_eq!(err.line, Some(11 + MAX_KEYS_PER_SECTION), "{err}");
        assert!(
            err.message.contains("more than 256 keys in one table"),
            "{err}"
        );
        let send: String = (0..2 * MAX_KEYS_PER_SECTION)
            .map(|index| format!("a{index} = b\n"))
            .collect();
        let text = format!("{MINIMAL}[upstream.u.health_check]\nsend = \"\"\"\n{send}\"\"\"\n");
        let config = parse(&text).unwrap();
        let check = config.upstreams["u"].health_check.as_ref().unwrap();
        assert_eq!(check.send.as_deref(), Some(send.as_bytes()));
    }

    #[test]
    fn tables_are_counted_before_parsing() {
        let tables = "[upstream.x.tls]\n".repeat(MAX_TABLES);
        let err = parse(&format!("{MINIMAL}{tables}")).unwrap_err();
        // MINIMAL holds 3 tables; the file's table 100,001 is on line
        // 9 + (MAX_TABLES - 2).
        assert_eq!(err.line, Some(9 + MAX_TABLES - 2), "{err}");
        assert!(err.message.contains("more than 100000 tables"), "{err}");
    }

    #[test]
    fn servers_of_the_configuration_are_bounded() {
        let servers: String = (0..=MAX_SERVERS)
            .map(|index| {
                format!(
                    "[[upstream.u.server]]\naddress = \"127.0.0.1:{}\"\nname = \"s{index}\"\n",
                    index % 60_000 + 1
                )
            })
            .collect();
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:7000\"\nupstream = \"u\"\n[upstream.u]\n{servers}"
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(5), "{err}");
        assert!(err.message.contains("more than 50000 servers"), "{err}");
    }

    #[test]
    fn a_line_past_the_limit_is_refused_at_its_number() {
        let text = format!("{MINIMAL}# {}\n", "c".repeat(MAX_LINE_BYTES));
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(10), "{err}");
        assert!(err.to_string().len() < 300, "{err}");
        let text = format!("{MINIMAL}# {}\n", "c".repeat(MAX_LINE_BYTES - 2));
        parse(&text).unwrap();
    }

    #[test]
    fn the_quoted_setting_drops_its_comment_but_not_a_hash_in_a_string() {
        let text = MINIMAL.replace(
            "name = \"l\"",
            "name = \"l\"\nunix_mode = \"07#7\" # not for TCP, a comment\r",
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(4), "{err}");
        assert!(
            err.message.ends_with("(in `unix_mode = \"07#7\"`)"),
            "{err}"
        );
    }

    #[test]
    fn keys_are_placed_on_their_lines_in_crlf_files() {
        let text = MINIMAL.replace('\n', "\r\n") + "weight = 0\r\n";
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(10), "{err}");
        assert!(err.message.ends_with("(in `weight = 0`)"), "{err}");
    }

    #[test]
    fn from_fluent_bit_reads_only_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("nodes.conf");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        for target in [fifo.to_str().unwrap(), "/dev/zero"] {
            let text = MINIMAL.replace(
                "[upstream.u]",
                &format!("[upstream.u]\nfrom_fluent_bit = \"{target}\""),
            );
            // Opening the FIFO would block this test for ever.
            let err = Config::parse(&text, &dir.path().join("sluice.toml")).unwrap_err();
            assert_eq!(err.line, Some(8), "{target}: {err}");
            assert!(
                err.message.contains("is not a regular file"),
                "{target}: {err}"
            );
        }
    }

    /// The message shown for an error: its key and value cut to QUOTE_CHARS
    /// each, the whole at most 1000 characters.
    fn assert_short(err: &ConfigError) {
        let shown = err.to_string();
        let prefix = format!("test.toml:{}: ", err.line.unwrap_or_default());
        assert!(shown.chars().count() <= prefix.len() + 1000, "{shown}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        #[test]
        fn errors_quote_at_most_100_characters_of_long_keys_and_values(
            key_len in 1..3000usize,
            value_len in 0..12_000usize,
            place in 0..4usize,
            comment in "SECRET[a-z ]{0,20}",
        ) {
            let key = "k".repeat(key_len);
            let value = "v".repeat(value_len);
            let line = match place {
                0 => format!("{key} = \"{value}\" # {comment}"),
                1 => format!("upstream = \"{value}\" # {comment}"),
                2 => format!("balance = \"{value}\" # {comment}"),
                _ => format!("address = \"{value}\" # {comment}"),
            };
            let text = match place {
                1 => MINIMAL.replace("upstream = \"u\"", &line),
                2 => MINIMAL.replace("[upstream.u]", &format!("[upstream.u]\n{line}")),
                _ => with_server_key(&line),
            };
            let err = parse(&text).unwrap_err();
            assert_short(&err);
            let shown = err.to_string();
            prop_assert!(!shown.contains(&"v".repeat(QUOTE_CHARS + 1)), "{}", shown);
            prop_assert!(!shown.contains(&"k".repeat(QUOTE_CHARS + 1)), "{}", shown);
            prop_assert!(!shown.contains("SECRET"), "{}", shown);
        }
    }
}
