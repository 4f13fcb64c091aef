//! Connecting the way `psql` does: a URL (or `key=value` string), the `PG*`
//! environment variables for whatever it leaves out, the password file, and
//! `sslmode` with its certificates, over rustls (no system OpenSSL). What
//! does not live here: anything done once connected.
//!
//! `sslmode`, as libpq reads it:
//!
//! | mode | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | - |
//! | `allow`, `prefer` (default) | if the server offers it | not checked |
//! | `require` | always | not checked, unless a root certificate file exists: then as `verify-ca` |
//! | `verify-ca` | always | signed by a root in `sslrootcert` |
//! | `verify-full` | always | signed by such a root, and issued for the host connected to |
//!
//! `sslrootcert` names a PEM file (default `~/.postgresql/root.crt`), or
//! `system` for the operating system's roots (which implies `verify-full`
//! unless a mode is given). `sslcert` and `sslkey` name the client
//! certificate and its key (default `~/.postgresql/postgresql.crt` and
//! `.key`, used when both exist).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use postgres::Client;
use postgres::config::{Host, SslMode};
use projectionist::{Error, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// The connection settings that rustls, not the driver, acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct TlsParams {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
    passfile: Option<String>,
}

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    ChainAndHost,
}

/// Connects to `url` (see the module documentation for what is read besides
/// it).
///
/// # Errors
/// [`Error::InvalidOptions`] for an unknown `sslmode` or an unreadable
/// certificate or key file; [`Error::External`] naming the server (never its
/// password) when it cannot be reached or refuses us.
pub(crate) fn connect_client(url: &str) -> Result<Client> {
    let step = || format!("connect to PostgreSQL at {}", redact(url));
    let (rest, tls) = split_tls_params(url);
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut config: postgres::Config = rest.parse().map_err(|e| Error::External {
        step: step(),
        source: Box::new(e),
    })?;
    fill_from_environment(&mut config, &env);
    let mode = tls
        .sslmode
        .clone()
        .or_else(|| env("PGSSLMODE"))
        .unwrap_or_else(|| "prefer".to_owned());
    let home = env("HOME").map(PathBuf::from);
    let rootcert = tls.sslrootcert.clone().or_else(|| env("PGSSLROOTCERT"));
    let (ssl_mode, verify) = verification(&mode, rootcert.as_deref(), home.as_deref())?;
    config.ssl_mode(ssl_mode);
    if config.get_password().is_none() {
        let passfile = tls
            .passfile
            .clone()
            .or_else(|| env("PGPASSFILE"))
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".pgpass")));
        if let Some(password) = passfile.and_then(|file| password_from_file(&file, &config)) {
            config.password(password);
        }
    }
    let client_auth = client_certificate(
        tls.sslcert.or_else(|| env("PGSSLCERT")),
        tls.sslkey.or_else(|| env("PGSSLKEY")),
        home.as_deref(),
    )?;
    let tls_config = tls_config(verify, rootcert.as_deref(), home.as_deref(), client_auth)?;
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config);
    config.connect(connector).map_err(|e| Error::External {
        step: format!("{} ({}, sslmode {mode})", step(), target(&config)),
        source: Box::new(e),
    })
}

/// Where a connection goes, as resolved from the URL and the environment:
/// `user@host:port/database`.
fn target(config: &postgres::Config) -> String {
    let host = match (config.get_hosts().first(), config.get_hostaddrs().first()) {
        (Some(Host::Tcp(host)), _) => host.clone(),
        #[cfg(unix)]
        (Some(Host::Unix(path)), _) => path.display().to_string(),
        (_, Some(addr)) => addr.to_string(),
        _ => "?".to_owned(),
    };
    format!(
        "{}@{host}:{}/{}",
        config.get_user().unwrap_or("?"),
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_dbname().unwrap_or("?")
    )
}

/// The URL without its password, for messages.
pub(crate) fn redact(url: &str) -> String {
    if let (Some(scheme), Some(at)) = (url.find("://"), url.rfind('@'))
        && at > scheme
    {
        let userinfo = &url[scheme + 3..at];
        if let Some(colon) = userinfo.find(':') {
            return format!(
                "{}{}:***{}",
                &url[..scheme + 3],
                &userinfo[..colon],
                &url[at..]
            );
        }
    }
    // key=value form: hide the value of `password`.
    if !url.contains("://") && url.contains("password") {
        return url
            .split_whitespace()
            .map(|word| {
                if word.starts_with("password=") {
                    "password=***"
                } else {
                    word
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
    }
    url.to_owned()
}

/// Takes the TLS and password-file settings out of a URL's query (or a
/// `key=value` string), leaving what the driver reads.
fn split_tls_params(url: &str) -> (String, TlsParams) {
    let mut tls = TlsParams::default();
    let mut take = |key: &str, value: String| -> bool {
        let slot = match key {
            "sslmode" => &mut tls.sslmode,
            "sslrootcert" => &mut tls.sslrootcert,
            "sslcert" => &mut tls.sslcert,
            "sslkey" => &mut tls.sslkey,
            "passfile" => &mut tls.passfile,
            _ => return false,
        };
        *slot = Some(value);
        true
    };
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), tls);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(key, percent_decode(value))
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, tls);
    }
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|word| {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            !take(key.trim(), value.trim().trim_matches('\'').to_owned())
        })
        .collect();
    (kept.join(" "), tls)
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the URL left out, from `PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`,
/// `PGDATABASE` and `PGAPPNAME`, then libpq's defaults (the local socket if
/// there is one, else `localhost`; port 5432; the login name as user; the
/// user's name as database).
fn fill_from_environment(config: &mut postgres::Config, env: &dyn Fn(&str) -> Option<String>) {
    if config.get_ports().is_empty()
        && let Some(port) = env("PGPORT").and_then(|p| p.parse().ok())
    {
        config.port(port);
    }
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        match env("PGHOST") {
            Some(hosts) => {
                for host in hosts.split(',') {
                    config.host(host);
                }
            }
            None => {
                let port = config.get_ports().first().copied().unwrap_or(5432);
                let socket_dir = ["/var/run/postgresql", "/tmp"]
                    .into_iter()
                    .find(|dir| Path::new(dir).join(format!(".s.PGSQL.{port}")).exists());
                config.host(socket_dir.unwrap_or("localhost"));
            }
        }
    }
    if config.get_user().is_none()
        && let Some(user) = env("PGUSER").or_else(|| env("USER"))
    {
        config.user(&user);
    }
    if config.get_password().is_none()
        && let Some(password) = env("PGPASSWORD")
    {
        config.password(password);
    }
    if config.get_dbname().is_none()
        && let Some(dbname) = env("PGDATABASE").or_else(|| config.get_user().map(str::to_owned))
    {
        config.dbname(&dbname);
    }
    if config.get_application_name().is_none()
        && let Some(name) = env("PGAPPNAME")
    {
        config.application_name(&name);
    }
}

/// The driver's TLS mode and how to check the certificate, for `sslmode`.
fn verification(
    mode: &str,
    rootcert: Option<&str>,
    home: Option<&Path>,
) -> Result<(SslMode, Verify)> {
    let root_file_exists = match rootcert {
        Some("system") => true,
        Some(path) => Path::new(path).exists(),
        None => home.is_some_and(|h| h.join(".postgresql/root.crt").exists()),
    };
    Ok(match mode {
        "disable" => (SslMode::Disable, Verify::Nothing),
        "allow" | "prefer" => (SslMode::Prefer, Verify::Nothing),
        "require" if root_file_exists => (SslMode::Require, Verify::Chain),
        "require" => (SslMode::Require, Verify::Nothing),
        "verify-ca" => (SslMode::Require, Verify::Chain),
        "verify-full" => (SslMode::Require, Verify::ChainAndHost),
        other => {
            return Err(Error::InvalidOptions(format!(
                "sslmode {other:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            )));
        }
    })
}

/// The client certificate chain and key, when configured (or both default
/// files exist).
fn client_certificate(
    cert: Option<String>,
    key: Option<String>,
    home: Option<&Path>,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
    let default = |name: &str| home.map(|h| h.join(".postgresql").join(name));
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (PathBuf::from(cert), PathBuf::from(key)),
        (Some(cert), None) => (
            PathBuf::from(cert),
            default("postgresql.key").unwrap_or_default(),
        ),
        (None, Some(key)) => (
            default("postgresql.crt").unwrap_or_default(),
            PathBuf::from(key),
        ),
        (None, None) => match (default("postgresql.crt"), default("postgresql.key")) {
            (Some(cert), Some(key)) if cert.exists() && key.exists() => (cert, key),
            _ => return Ok(None),
        },
    };
    let chain = certificates(&cert, "sslcert")?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
        Error::InvalidOptions(format!(
            "sslkey {}: no private key read: {e}",
            key.display()
        ))
    })?;
    Ok(Some((chain, key)))
}

fn certificates(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>> {
    let unreadable = |e: &dyn std::fmt::Display| {
        Error::InvalidOptions(format!("{setting} {}: {e}", path.display()))
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(&e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| unreadable(&e))?;
    if chain.is_empty() {
        return Err(unreadable(&"no PEM certificate in it"));
    }
    Ok(chain)
}

fn tls_config(
    verify: Verify,
    rootcert: Option<&str>,
    home: Option<&Path>,
    client_auth: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidOptions(format!("TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(AnyCertificate(provider.signature_verification_algorithms)),
        Verify::Chain | Verify::ChainAndHost => {
            let roots = roots(rootcert, home)?;
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::InvalidOptions(format!("sslrootcert: {e}")))?;
            if verify == Verify::Chain {
                Arc::new(ChainOnly(webpki))
            } else {
                webpki
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match client_auth {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::InvalidOptions(format!("sslcert/sslkey: {e}"))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The roots a server's certificate must chain to.
fn roots(rootcert: Option<&str>, home: Option<&Path>) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    if rootcert == Some("system") {
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if roots.is_empty() {
            return Err(Error::InvalidOptions(
                "sslrootcert=system: the operating system has no root certificates".into(),
            ));
        }
        return Ok(roots);
    }
    let path = match rootcert {
        Some(path) => PathBuf::from(path),
        None => home
            .map(|h| h.join(".postgresql/root.crt"))
            .ok_or_else(|| {
                Error::InvalidOptions(
                    "certificate checks need sslrootcert (no home directory for ~/.postgresql/root.crt)"
                        .into(),
                )
            })?,
    };
    for cert in certificates(&path, "sslrootcert")? {
        roots
            .add(cert)
            .map_err(|e| Error::InvalidOptions(format!("sslrootcert {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// `allow`, `prefer`, `require`: encrypted, the certificate not checked (as
/// libpq does). The handshake's signatures are still verified.
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked, the host name is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The password for `config`'s first host, port, database and user in a
/// libpq password file (`host:port:database:user:password`, `*` matches
/// anything, `\` escapes `:` and `\`). Like libpq, a file that others can
/// read is ignored.
fn password_from_file(file: &Path, config: &postgres::Config) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            return None;
        }
    }
    let text = std::fs::read_to_string(file).ok()?;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        // libpq matches a socket connection as `localhost`.
        _ => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let wanted = [
        host.as_str(),
        port.as_str(),
        config.get_dbname().unwrap_or_default(),
        config.get_user().unwrap_or_default(),
    ];
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .find_map(|line| {
            let fields = pgpass_fields(line);
            let matches = fields.len() == 5
                && fields[..4]
                    .iter()
                    .zip(wanted)
                    .all(|(field, want)| field == "*" || field == want);
            matches.then(|| fields[4].clone())
        })
}

fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("one field").push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_are_taken_out_of_the_url_and_decoded() {
        let (rest, tls) = split_tls_params(
            "postgres://u@h:5/db?sslmode=verify-full&options=-c%20search_path%3Ds&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u@h:5/db?options=-c%20search_path%3Ds");
        assert_eq!(tls.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(tls.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, tls) = split_tls_params("host=h user=u sslmode=require sslcert=/c.pem");
        assert_eq!(rest, "host=h user=u");
        assert_eq!(tls.sslmode.as_deref(), Some("require"));
        assert_eq!(tls.sslcert.as_deref(), Some("/c.pem"));
        let (rest, _) = split_tls_params("postgres://u@h/db?sslmode=disable");
        assert_eq!(rest, "postgres://u@h/db");
    }

    #[test]
    fn sslmode_maps_as_libpq_does() {
        let none = None;
        assert_eq!(
            verification("require", none, None).unwrap(),
            (SslMode::Require, Verify::Nothing)
        );
        assert_eq!(
            verification("verify-ca", none, None).unwrap(),
            (SslMode::Require, Verify::Chain)
        );
        assert_eq!(
            verification("require", Some("system"), None).unwrap(),
            (SslMode::Require, Verify::Chain)
        );
        let err = verification("verify_full", none, None).unwrap_err();
        assert!(err.to_string().contains("verify_full"), "{err}");
    }

    #[test]
    fn the_environment_fills_what_the_url_leaves_out() {
        let vars = |name: &str| match name {
            "PGHOST" => Some("db.example".to_owned()),
            "PGPORT" => Some("6543".to_owned()),
            "PGUSER" => Some("app".to_owned()),
            "PGPASSWORD" => Some("secret".to_owned()),
            "PGDATABASE" => Some("events".to_owned()),
            _ => None,
        };
        let mut config: postgres::Config = "postgres://".parse().unwrap();
        fill_from_environment(&mut config, &vars);
        assert_eq!(config.get_hosts(), [Host::Tcp("db.example".into())]);
        assert_eq!(config.get_ports(), [6543]);
        assert_eq!(config.get_user(), Some("app"));
        assert_eq!(config.get_password(), Some(&b"secret"[..]));
        assert_eq!(config.get_dbname(), Some("events"));
        // The URL wins over the environment.
        let mut config: postgres::Config = "postgres://me@here:1/mine".parse().unwrap();
        fill_from_environment(&mut config, &vars);
        assert_eq!(config.get_hosts(), [Host::Tcp("here".into())]);
        assert_eq!(config.get_user(), Some("me"));
        assert_eq!(config.get_dbname(), Some("mine"));
        assert_eq!(config.get_ports(), [1]);
    }

    #[test]
    fn the_password_file_matches_wildcards_and_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(
            &file,
            "# comment\nother:*:*:*:nope\nh:5432:db:u:pa\\:ss\\\\word\n*:*:*:*:fallback\n",
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let config: postgres::Config = "postgres://u@h/db".parse().unwrap();
        assert_eq!(
            password_from_file(&file, &config).as_deref(),
            Some("pa:ss\\word")
        );
        let config: postgres::Config = "postgres://x@y/z".parse().unwrap();
        assert_eq!(
            password_from_file(&file, &config).as_deref(),
            Some("fallback")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert_eq!(
                password_from_file(&file, &config),
                None,
                "readable by others"
            );
        }
    }

    #[test]
    fn passwords_never_appear_in_messages() {
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
        assert_eq!(
            redact("host=h password=secret user=u"),
            "host=h password=*** user=u"
        );
    }
}
