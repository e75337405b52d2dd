//! Test certificates generated with rcgen and written as PEM files.
//!
//! Shared by the unit tests of `src/tls.rs` (through `#[path]`) and by
//! integration tests (through `mod`), so there is one generator.

// Each test crate that includes this module uses only some of the helpers.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Names the test server certificates are valid for.
pub const SERVER_NAMES: [&str; 2] = ["backend.test", "127.0.0.1"];

/// Paths of a certificate file and its private key file.
pub struct CertAndKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority able to sign further certificates.
pub struct TestCa {
    pub cert_file: PathBuf,
    certificate: Certificate,
    key: KeyPair,
}

/// What a leaf certificate is for; sets its extended key usage.
#[derive(Clone, Copy)]
pub enum LeafUsage {
    Server,
    Client,
}

/// The full set the TLS tests use, all keys ECDSA P-256.
pub struct TestPki {
    /// Trust anchor of `server` and `client`.
    pub ca: PathBuf,
    /// Server certificate for [`SERVER_NAMES`], signed by `ca`; PKCS#8 key.
    pub server: CertAndKey,
    /// The key of `server`, as SEC1 (`EC PRIVATE KEY`).
    pub server_sec1_key: PathBuf,
    /// Client certificate signed by `ca`; PKCS#8 key.
    pub client: CertAndKey,
    /// Self-signed certificate for [`SERVER_NAMES`], trusted by nobody.
    pub impostor: CertAndKey,
}

/// Writes a CA, a server, a client and an impostor certificate into `dir`.
pub fn generate_pki(dir: &Path) -> TestPki {
    let ca = ca(dir, "ca");
    let server = signed_leaf(&ca, dir, "server", &SERVER_NAMES, LeafUsage::Server);
    let server_sec1_key = sec1_copy_of_key(&server.key, dir, "server-sec1");
    let client = signed_leaf(&ca, dir, "client", &["client.test"], LeafUsage::Client);
    let impostor = self_signed(dir, "impostor", &SERVER_NAMES);
    TestPki {
        ca: ca.cert_file,
        server,
        server_sec1_key,
        client,
        impostor,
    }
}

/// A new CA whose certificate is written to `dir/{name}.pem`.
pub fn ca(dir: &Path, name: &str) -> TestCa {
    let key = KeyPair::generate().expect("CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("sluice test CA {name}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let certificate = params.self_signed(&key).expect("CA certificate");
    let cert_file = write(dir, &format!("{name}.pem"), &certificate.pem());
    TestCa {
        cert_file,
        certificate,
        key,
    }
}

/// A leaf certificate for `names` (DNS names or IP addresses) signed by `ca`.
pub fn signed_leaf(
    ca: &TestCa,
    dir: &Path,
    name: &str,
    names: &[&str],
    usage: LeafUsage,
) -> CertAndKey {
    let key = KeyPair::generate().expect("leaf key");
    let certificate = leaf_params(name, names, usage)
        .signed_by(&key, &ca.certificate, &ca.key)
        .expect("leaf certificate");
    write_pair(dir, name, &certificate, &key)
}

/// A self-signed server certificate for `names`.
pub fn self_signed(dir: &Path, name: &str, names: &[&str]) -> CertAndKey {
    let key = KeyPair::generate().expect("self-signed key");
    let certificate = leaf_params(name, names, LeafUsage::Server)
        .self_signed(&key)
        .expect("self-signed certificate");
    write_pair(dir, name, &certificate, &key)
}

/// Rewrites a PKCS#8 ECDSA P-256 key file as SEC1, written to `dir/{name}.key.pem`.
///
/// rcgen (ring backend) only emits PKCS#8 and cannot generate RSA keys, so
/// PKCS#1 is not produced; SEC1 is derived here: the PKCS#8 structure wraps
/// the SEC1 `ECPrivateKey`, to which the curve parameters `[0]` are added as
/// OpenSSL writes them (`openssl ec` output).
pub fn sec1_copy_of_key(pkcs8_key_file: &Path, dir: &Path, name: &str) -> PathBuf {
    let pem = fs::read_to_string(pkcs8_key_file).expect("read PKCS#8 key");
    let key = KeyPair::from_pem(&pem).expect("parse PKCS#8 key");
    let sec1 = sec1_from_pkcs8_p256(key.serialized_der());
    write(
        dir,
        &format!("{name}.key.pem"),
        &pem_encode("EC PRIVATE KEY", &sec1),
    )
}

fn leaf_params(name: &str, names: &[&str], usage: LeafUsage) -> CertificateParams {
    let sans: Vec<String> = names.iter().map(|san| san.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("leaf parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("sluice test {name}"));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![match usage {
        LeafUsage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        LeafUsage::Client => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    params
}

fn write_pair(dir: &Path, name: &str, certificate: &Certificate, key: &KeyPair) -> CertAndKey {
    CertAndKey {
        cert: write(dir, &format!("{name}.pem"), &certificate.pem()),
        key: write(dir, &format!("{name}.key.pem"), &key.serialize_pem()),
    }
}

fn write(dir: &Path, file_name: &str, contents: &str) -> PathBuf {
    let path = dir.join(file_name);
    fs::write(&path, contents).expect("write PEM file");
    path
}

const DER_SEQUENCE: u8 = 0x30;
const DER_INTEGER: u8 = 0x02;
const DER_OCTET_STRING: u8 = 0x04;
/// `[0]` holding the namedCurve OID prime256v1 (1.2.840.10045.3.1.7).
const SEC1_P256_PARAMETERS: [u8; 12] = [
    0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
];

/// PKCS#8 `PrivateKeyInfo { version, algorithm, privateKey OCTET STRING }`:
/// the octet string is the SEC1 `ECPrivateKey { version, privateKey, [1] publicKey }`.
fn sec1_from_pkcs8_p256(pkcs8: &[u8]) -> Vec<u8> {
    let (tag, info, _) = der_element(pkcs8);
    assert_eq!(tag, DER_SEQUENCE, "PrivateKeyInfo");
    let (tag, _version, rest) = der_element(info);
    assert_eq!(tag, DER_INTEGER, "PKCS#8 version");
    let (tag, _algorithm, rest) = der_element(rest);
    assert_eq!(tag, DER_SEQUENCE, "PKCS#8 algorithm");
    let (tag, ec_private_key, _) = der_element(rest);
    assert_eq!(tag, DER_OCTET_STRING, "PKCS#8 privateKey");

    let (tag, fields, _) = der_element(ec_private_key);
    assert_eq!(tag, DER_SEQUENCE, "ECPrivateKey");
    let (_, _, after_version) = der_element(fields);
    let (_, _, public_key) = der_element(after_version);
    let private_key_end = fields.len() - public_key.len();

    let mut content = fields[..private_key_end].to_vec();
    content.extend_from_slice(&SEC1_P256_PARAMETERS);
    content.extend_from_slice(public_key);
    let mut sec1 = vec![DER_SEQUENCE];
    sec1.extend(der_length(content.len()));
    sec1.extend(content);
    sec1
}

/// Splits one DER element off `input`: (tag, contents, rest).
fn der_element(input: &[u8]) -> (u8, &[u8], &[u8]) {
    let tag = input[0];
    let (length, header) = match input[1] {
        short @ 0..=0x7f => (usize::from(short), 2),
        0x81 => (usize::from(input[2]), 3),
        0x82 => ((usize::from(input[2]) << 8) | usize::from(input[3]), 4),
        other => panic!("DER length form {other:#x} not expected in a test key"),
    };
    let end = header + length;
    (tag, &input[header..end], &input[end..])
}

fn der_length(length: usize) -> Vec<u8> {
    match length {
        0..=0x7f => vec![length as u8],
        0x80..=0xff => vec![0x81, length as u8],
        _ => vec![0x82, (length >> 8) as u8, length as u8],
    }
}

/// PEM armour; no base64 crate is a dependency, and the tests need only encoding.
fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut base64 = String::new();
    for chunk in der.chunks(3) {
        let bytes = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let group = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for position in 0..4 {
            if position <= chunk.len() {
                let index = (group >> (18 - 6 * position)) & 0x3f;
                base64.push(char::from(ALPHABET[index as usize]));
            } else {
                base64.push('=');
            }
        }
    }
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in base64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}
