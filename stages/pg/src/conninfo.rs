//! libpq-style connection strings: `key=value` pairs or a
//! `postgresql://user:password@host:port/dbname` URL.

use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// A host name, an IP address, or a directory holding the Unix socket.
    /// TLS checks the server's certificate against it.
    pub host: String,
    /// An IP address to connect to instead of resolving `host`.
    pub hostaddr: Option<String>,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    /// Where a password is looked up when the server asks for one and none
    /// was given (`passfile`, `PGPASSFILE`, `~/.pgpass`).
    pub passfile: Option<PathBuf>,
    pub dbname: String,
    pub tls: TlsSettings,
    pub require_auth: RequireAuth,
    pub connect_timeout: Option<std::time::Duration>,
    /// Every host of a multi-host string (`host=a,b port=5432,5433`), in
    /// order; `host`, `hostaddr` and `port` above are the first one's.
    pub hosts: Vec<Host>,
    /// libpq's `target_session_attrs`: which of the hosts to settle on.
    pub session_attrs: SessionAttrs,
}

/// One server of a connection string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub host: String,
    pub hostaddr: Option<String>,
    pub port: u16,
}

/// libpq's `target_session_attrs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SessionAttrs {
    #[default]
    Any,
    /// `transaction_read_only` is off.
    ReadWrite,
    ReadOnly,
    /// Not in hot standby.
    Primary,
    Standby,
    /// A standby if one answers, else any.
    PreferStandby,
}

impl SessionAttrs {
    fn parse(v: &str) -> Result<Self, Problem> {
        Ok(match v {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            "primary" => SessionAttrs::Primary,
            "standby" => SessionAttrs::Standby,
            "prefer-standby" => SessionAttrs::PreferStandby,
            _ => {
                return Err(bad(format!(
                    "target_session_attrs {v:?} is not any, read-write, read-only, primary, standby or prefer-standby"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(v: &str) -> Result<Self, Problem> {
        Ok(match v {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return Err(bad(format!(
                "sslmode {v:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
            ))),
        })
    }
}

/// Where the server's certificate is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootCert {
    /// `sslrootcert` named a file (or `~/.postgresql/root.crt`).
    File(PathBuf),
    /// `sslrootcert=system`: the system's trust store.
    System,
}

/// The TLS settings of a connection, as libpq reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// `None`: no file named and `~/.postgresql/root.crt` absent.
    pub rootcert: Option<RootCert>,
    /// A client certificate and its key (`sslcert`, `sslkey`).
    pub cert: Option<(PathBuf, PathBuf)>,
    /// `sslnegotiation=direct`: TLS from the first byte (PostgreSQL 17+).
    pub direct: bool,
    /// `channel_binding`: whether SCRAM binds to the TLS channel.
    pub channel_binding: ChannelBinding,
}

/// libpq's `channel_binding`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never bind (plain SCRAM-SHA-256 even over TLS).
    Disable,
    /// Bind when on TLS and the server offers SCRAM-SHA-256-PLUS.
    Prefer,
    /// Bind or refuse to authenticate.
    Require,
}

/// An authentication method a server may ask for (`require_auth`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// The server asked for nothing (trust).
    None,
    Password,
    Md5,
    ScramSha256,
    /// Named so a libpq string parses; never offered by this client.
    Gss,
    Sspi,
}

/// libpq's `require_auth`: the methods the client accepts, or (each
/// prefixed with `!`) those it refuses. Empty accepts every method.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequireAuth {
    negated: bool,
    methods: Vec<AuthMethod>,
}

impl AuthMethod {
    /// The name `require_auth` uses.
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
            AuthMethod::Gss => "gss",
            AuthMethod::Sspi => "sspi",
        }
    }
}

impl RequireAuth {
    fn parse(v: &str) -> Result<Self, Problem> {
        let mut r = RequireAuth::default();
        for (i, m) in v.split(',').map(str::trim).enumerate() {
            let (neg, name) = match m.strip_prefix('!') {
                Some(n) => (true, n),
                None => (false, m),
            };
            if i > 0 && neg != r.negated {
                return Err(bad(
                    "require_auth mixes refused (!) and required methods".into()
                ));
            }
            r.negated = neg;
            r.methods.push(match name {
                "none" => AuthMethod::None,
                "password" => AuthMethod::Password,
                "md5" => AuthMethod::Md5,
                "scram-sha-256" => AuthMethod::ScramSha256,
                "gss" => AuthMethod::Gss,
                "sspi" => AuthMethod::Sspi,
                other => {
                    return Err(bad(format!(
                        "require_auth method {other:?} is not one of none, password, md5, scram-sha-256, gss, sspi"
                    )))
                }
            });
        }
        Ok(r)
    }

    /// Whether the client goes on when the server asks for `m`.
    pub fn permits(&self, m: AuthMethod) -> bool {
        self.methods.is_empty() || self.methods.contains(&m) != self.negated
    }
}

/// The hosts of `host`, `hostaddr` and `port` (each a comma-separated
/// list): one port for all hosts or one each; hostaddr one each, if given.
fn hosts(
    host: Option<String>,
    hostaddr: Option<String>,
    port: Option<String>,
) -> Result<Vec<Host>, Problem> {
    let list = |v: &Option<String>| -> Vec<String> {
        v.as_deref()
            .map(|s| s.split(',').map(|x| x.trim().to_string()).collect())
            .unwrap_or_default()
    };
    let (hs, addrs, ports) = (list(&host), list(&hostaddr), list(&port));
    let n = hs.len().max(addrs.len()).max(1);
    if (!hs.is_empty() && hs.len() != n) || (!addrs.is_empty() && addrs.len() != n) {
        return Err(bad(format!(
            "{} hosts but {} hostaddrs: give one each",
            hs.len(),
            addrs.len()
        )));
    }
    if ports.len() > 1 && ports.len() != n {
        return Err(bad(format!(
            "{n} hosts but {} ports: give one port, or one each",
            ports.len()
        )));
    }
    (0..n)
        .map(|i| {
            // The port alone: the string may hold a password.
            let p = ports.get(i).or(ports.first()).map(String::as_str);
            let port = match p.filter(|p| !p.is_empty()) {
                Some(p) => p.parse().map_err(|_| bad(format!("bad port {p:?}")))?,
                None => 5432,
            };
            let host = hs.get(i).filter(|h| !h.is_empty()).cloned();
            Ok(Host {
                host: host.unwrap_or_else(|| "/var/run/postgresql".into()),
                hostaddr: addrs.get(i).filter(|a| !a.is_empty()).cloned(),
                port,
            })
        })
        .collect()
}

fn bad(m: String) -> Problem {
    Problem::new(Code::DeploymentInvalid, m).suggest(
        "Use \"host=/var/run/postgresql port=5432 user=postgres\" or postgresql://user@host:port/db",
        None,
    )
}

/// `key = value` pairs as libpq reads them: spaces around `=` allowed; a
/// value may be single-quoted (to hold spaces or be empty), and `\'` and
/// `\\` escape a quote and a backslash. Errors never quote the string (it
/// may hold a password).
pub fn keyword_pairs(s: &str) -> Result<Vec<(String, String)>, Problem> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    let skip_space = |c: &mut std::iter::Peekable<std::str::Chars>| {
        while c.peek().is_some_and(|x| x.is_whitespace()) {
            c.next();
        }
    };
    loop {
        skip_space(&mut chars);
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        skip_space(&mut chars);
        if key.is_empty() || chars.next() != Some('=') {
            return Err(bad(format!(
                "connection parameter {} is not key=value",
                out.len() + 1
            )));
        }
        skip_space(&mut chars);
        let value = keyword_value(&mut chars)?;
        out.push((key, value));
    }
}

/// One value, unquoted and unescaped, consumed from `chars`.
fn keyword_value(chars: &mut std::iter::Peekable<std::str::Chars>) -> Result<String, Problem> {
    let mut v = String::new();
    let quoted = chars.peek() == Some(&'\'');
    if quoted {
        chars.next();
    }
    loop {
        match chars.next() {
            Some('\\') => match chars.next() {
                Some(n) => v.push(n),
                None => v.push('\\'),
            },
            Some('\'') if quoted => return Ok(v),
            Some(c) if !quoted && c.is_whitespace() => return Ok(v),
            Some(c) => v.push(c),
            None if quoted => {
                return Err(bad("a quoted connection parameter is not closed".into()))
            }
            None => return Ok(v),
        }
    }
}

/// A value written so [`keyword_pairs`] reads it back.
fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\') {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The connection string with every password replaced by `***`: a URI's
/// `user:password@` and `password=` query parameter, a keyword/value
/// string's `password=` (quoted or not); one that does not parse is `***`
/// whole (nothing of it is shown).
pub fn redact(conninfo: &str) -> String {
    if let Some(u) = split_uri(conninfo) {
        return redact_uri(&u);
    }
    // Parsed as given: trimming could cut what a trailing backslash escapes.
    match keyword_pairs(conninfo) {
        Ok(pairs) => pairs
            .iter()
            .map(|(k, v)| match k.eq_ignore_ascii_case("password") {
                true => format!("{k}=***"),
                false => format!("{k}={}", quote_value(v)),
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => "***".into(),
    }
}

/// A URI connection string in the parts both [`ConnInfo::parse`] and
/// [`redact`] read, so the two never disagree on where a password is.
struct Uri<'a> {
    scheme: &'a str,
    /// Up to the last '@' (a password may hold one).
    userinfo: Option<&'a str>,
    /// `host[:port][/dbname]`.
    hostpath: &'a str,
    query: Option<&'a str>,
}

/// `None` for a keyword/value string. The scheme is matched without
/// regard to case.
fn split_uri(s: &str) -> Option<Uri<'_>> {
    let s = s.trim_start();
    let scheme = ["postgresql://", "postgres://"]
        .into_iter()
        .find(|p| s.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p)))?;
    let (scheme, rest) = s.split_at(scheme.len());
    let (userinfo, after) = match rest.rsplit_once('@') {
        Some((u, r)) => (Some(u), r),
        None => (None, rest),
    };
    let (hostpath, query) = match after.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (after, None),
    };
    Some(Uri {
        scheme,
        userinfo,
        hostpath,
        query,
    })
}

fn redact_uri(u: &Uri) -> String {
    let mut out = u.scheme.to_string();
    if let Some(info) = u.userinfo {
        match info.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            None => out.push_str(&format!("{info}@")),
        }
    }
    out.push_str(u.hostpath);
    if let Some(q) = u.query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push_str(&format!("?{}", params.join("&")));
    }
    out
}

/// Every keyword this client reads, with the environment variable libpq
/// takes it from when the string leaves it out.
const KEYWORDS: &[(&str, Option<&str>)] = &[
    ("host", Some("PGHOST")),
    ("hostaddr", Some("PGHOSTADDR")),
    ("port", Some("PGPORT")),
    ("user", Some("PGUSER")),
    ("password", Some("PGPASSWORD")),
    ("passfile", Some("PGPASSFILE")),
    ("dbname", Some("PGDATABASE")),
    ("sslmode", Some("PGSSLMODE")),
    ("sslrootcert", Some("PGSSLROOTCERT")),
    ("sslcert", Some("PGSSLCERT")),
    ("sslkey", Some("PGSSLKEY")),
    ("sslnegotiation", Some("PGSSLNEGOTIATION")),
    ("channel_binding", Some("PGCHANNELBINDING")),
    ("require_auth", Some("PGREQUIREAUTH")),
    ("connect_timeout", Some("PGCONNECT_TIMEOUT")),
    ("target_session_attrs", Some("PGTARGETSESSIONATTRS")),
    ("service", Some("PGSERVICE")),
    ("application_name", None),
    ("fallback_application_name", None),
    ("sslsni", None),
];

/// What the environment holds, read through one function so tests can give
/// their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn process_env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

/// `%XX` escapes of a URI part decoded.
fn percent_decode(s: &str) -> Result<String, Problem> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            out.push(b[i]);
            i += 1;
            continue;
        }
        let hex = b
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit));
        let h = hex
            .ok_or_else(|| bad("a %-escape in the connection URI is not two hex digits".into()))?;
        out.push(u8::from_str_radix(std::str::from_utf8(h).unwrap_or("0"), 16).unwrap_or(0));
        i += 3;
    }
    String::from_utf8(out).map_err(|_| bad("the connection URI decodes to invalid UTF-8".into()))
}

/// One `host[:port]` of a URI's authority (`[v6]:port` too).
fn uri_host_port(hostport: &str) -> Result<(&str, Option<&str>), Problem> {
    Ok(match hostport.strip_prefix('[') {
        Some(v6) => {
            let (h, rest) = v6
                .split_once(']')
                .ok_or_else(|| bad("an IPv6 host in the connection URI has no closing ]".into()))?;
            (h, rest.strip_prefix(':'))
        }
        None => match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        },
    })
}

/// A URI's parts as keyword/value pairs (decoded); its query parameters
/// come last, so they override what the authority says, as in libpq.
fn uri_pairs(u: &Uri) -> Result<Vec<(String, String)>, Problem> {
    let mut out = Vec::new();
    if let Some(a) = u.userinfo {
        let (user, pw) = match a.split_once(':') {
            Some((user, p)) => (user, Some(p)),
            None => (a, None),
        };
        if !user.is_empty() {
            out.push(("user".into(), percent_decode(user)?));
        }
        if let Some(p) = pw {
            out.push(("password".into(), percent_decode(p)?));
        }
    }
    let (hostport, db) = u.hostpath.split_once('/').unwrap_or((u.hostpath, ""));
    if !db.is_empty() {
        out.push(("dbname".into(), percent_decode(db)?));
    }
    // Several hosts (`h1:p1,h2:p2`): host and port lists, as libpq reads them.
    let (mut hosts, mut ports) = (Vec::new(), Vec::new());
    for piece in hostport.split(',') {
        let (h, p) = uri_host_port(piece)?;
        hosts.push(percent_decode(h)?);
        ports.push(p.unwrap_or("").to_string());
    }
    if hosts.iter().any(|h| !h.is_empty()) {
        out.push(("host".into(), hosts.join(",")));
    }
    if ports.iter().any(|p| !p.is_empty()) {
        out.push(("port".into(), ports.join(",")));
    }
    for (i, kv) in u
        .query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .enumerate()
    {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| bad(format!("URI query parameter {} is not key=value", i + 1)))?;
        out.push((percent_decode(k)?, percent_decode(v)?));
    }
    Ok(out)
}

fn known(k: &str) -> Result<(), Problem> {
    match KEYWORDS.iter().any(|(n, _)| *n == k) {
        true => Ok(()),
        false => Err(bad(format!("unsupported connection parameter {k:?}"))),
    }
}

/// The `[name]` section of the first connection service file that has
/// one: `PGSERVICEFILE` (or `~/.pg_service.conf`), then
/// `PGSYSCONFDIR/pg_service.conf`.
fn service_pairs(name: &str, env: Env) -> Result<Vec<(String, String)>, Problem> {
    let user_file = env("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pg_service.conf")));
    let sys = env("PGSYSCONFDIR").unwrap_or_else(|| "/etc/postgresql-common".into());
    for f in user_file
        .into_iter()
        .chain([Path::new(&sys).join("pg_service.conf")])
    {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        if let Some(pairs) = service_section(&text, name)? {
            return Ok(pairs);
        }
    }
    Err(bad(format!(
        "connection service {name:?} is not defined in any service file"
    ))
    .suggest(
        "Define it in ~/.pg_service.conf (or PGSERVICEFILE): [name] then key=value lines",
        None,
    ))
}

/// One section of a service file's text; `None` when it has no such section.
pub fn service_section(text: &str, name: &str) -> Result<Option<Vec<(String, String)>>, Problem> {
    let mut inside = false;
    let mut found = None::<Vec<(String, String)>>;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(sect) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            inside = sect == name;
            if inside && found.is_none() {
                found = Some(Vec::new());
            }
            continue;
        }
        if let (true, Some(pairs)) = (inside, found.as_mut()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| bad(format!("a line of service {name:?} is not key=value")))?;
            let k = k.trim();
            if k == "service" {
                return Err(bad(format!(
                    "service {name:?} names another service (nesting is not allowed)"
                )));
            }
            known(k)?;
            pairs.push((k.to_string(), v.trim().to_string()));
        }
    }
    Ok(found)
}

/// The settings named by the string, then its service, then the
/// environment, in libpq's order of precedence.
fn settings(s: &str, env: Env) -> Result<BTreeMap<String, String>, Problem> {
    let explicit = match split_uri(s) {
        Some(u) => uri_pairs(&u)?,
        None => keyword_pairs(s)?,
    };
    let mut m = BTreeMap::new();
    for (k, v) in explicit {
        known(&k)?;
        m.insert(k, v);
    }
    if let Some(svc) = m.get("service").cloned().or_else(|| env("PGSERVICE")) {
        for (k, v) in service_pairs(&svc, env)? {
            m.entry(k).or_insert(v);
        }
    }
    for (k, var) in KEYWORDS {
        if let (false, Some(v)) = (m.contains_key(*k), var.and_then(env)) {
            m.insert(k.to_string(), v);
        }
    }
    Ok(m)
}

fn home_file(env: Env, rel: &str) -> Option<PathBuf> {
    env("HOME").map(|h| Path::new(&h).join(rel))
}

fn tls_settings(m: &BTreeMap<String, String>, env: Env) -> Result<TlsSettings, Problem> {
    let get = |k: &str| m.get(k).map(String::as_str);
    let rootcert = match get("sslrootcert") {
        Some("system") => Some(RootCert::System),
        Some(f) => Some(RootCert::File(f.into())),
        None => home_file(env, ".postgresql/root.crt")
            .filter(|p| p.exists())
            .map(RootCert::File),
    };
    let mode = match (get("sslmode"), &rootcert) {
        (Some(v), _) => SslMode::parse(v)?,
        // libpq: sslrootcert=system makes verify-full the default.
        (None, Some(RootCert::System)) => SslMode::VerifyFull,
        (None, _) => SslMode::Prefer,
    };
    if rootcert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        return Err(bad("sslrootcert=system needs sslmode=verify-full".into()));
    }
    let cert = match (get("sslcert"), get("sslkey")) {
        (Some(c), k) => Some((
            c.into(),
            k.map(PathBuf::from)
                .unwrap_or_else(|| Path::new(c).with_extension("key")),
        )),
        (None, k) => home_file(env, ".postgresql/postgresql.crt")
            .filter(|p| p.exists())
            .map(|c| {
                (
                    c,
                    k.map(PathBuf::from)
                        .or_else(|| home_file(env, ".postgresql/postgresql.key"))
                        .unwrap_or_default(),
                )
            }),
    };
    let direct = match get("sslnegotiation").unwrap_or("postgres") {
        "postgres" => false,
        "direct" if mode >= SslMode::Require => true,
        "direct" => {
            return Err(bad(
                "sslnegotiation=direct needs sslmode=require or stronger".into(),
            ))
        }
        v => {
            return Err(bad(format!(
                "sslnegotiation {v:?} is not postgres or direct"
            )))
        }
    };
    let channel_binding = match get("channel_binding").unwrap_or("prefer") {
        "disable" => ChannelBinding::Disable,
        "prefer" => ChannelBinding::Prefer,
        "require" => ChannelBinding::Require,
        v => {
            return Err(bad(format!(
                "channel_binding {v:?} is not disable, prefer or require"
            )))
        }
    };
    Ok(TlsSettings {
        mode,
        rootcert,
        cert,
        direct,
        channel_binding,
    })
}

impl ConnInfo {
    /// Reads a connection string as libpq does, with the process
    /// environment behind it.
    pub fn parse(s: &str) -> Result<Self, Problem> {
        Self::parse_with(s, &process_env)
    }

    /// Like [`ConnInfo::parse`], reading the environment through `env`.
    pub fn parse_with(s: &str, env: Env) -> Result<Self, Problem> {
        let m = settings(s, env)?;
        let get = |k: &str| m.get(k).cloned();
        let hosts = hosts(get("host"), get("hostaddr"), get("port"))?;
        let connect_timeout = match get("connect_timeout") {
            Some(t) => match t.parse::<u64>() {
                Ok(0) => None,
                Ok(n) => Some(std::time::Duration::from_secs(n.max(2))),
                Err(_) => {
                    return Err(bad(format!(
                        "connect_timeout {t:?} is not a whole number of seconds"
                    )))
                }
            },
            None => None,
        };
        let first = hosts[0].clone();
        Ok(ConnInfo {
            host: first.host,
            hostaddr: first.hostaddr,
            port: first.port,
            user: get("user").unwrap_or_else(|| "postgres".into()),
            password: get("password"),
            passfile: get("passfile")
                .map(PathBuf::from)
                .or_else(|| home_file(env, ".pgpass")),
            dbname: get("dbname").unwrap_or_else(|| "postgres".into()),
            tls: tls_settings(&m, env)?,
            require_auth: match get("require_auth") {
                Some(v) => RequireAuth::parse(&v)?,
                None => RequireAuth::default(),
            },
            connect_timeout,
            hosts,
            session_attrs: match get("target_session_attrs") {
                Some(v) => SessionAttrs::parse(&v)?,
                None => SessionAttrs::Any,
            },
        })
    }

    /// This connection string aimed at `h` alone.
    pub fn for_host(&self, h: &Host) -> ConnInfo {
        ConnInfo {
            host: h.host.clone(),
            hostaddr: h.hostaddr.clone(),
            port: h.port,
            hosts: vec![h.clone()],
            ..self.clone()
        }
    }

    /// The password file's entry for this connection (`replication` as the
    /// database of a walsender). A file others can read is refused, as
    /// libpq ignores one; a missing file is no password.
    pub fn passfile_password(&self, replication: bool) -> Result<Option<String>, Problem> {
        let Some(path) = &self.passfile else {
            return Ok(None);
        };
        let Ok(meta) = std::fs::metadata(path) else {
            return Ok(None);
        };
        use std::os::unix::fs::PermissionsExt;
        if !meta.is_file() {
            return Ok(None);
        }
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(Problem::new(
                Code::PgAuthFailed,
                "the password file has group or world access and is not used",
            )
            .with("path", path.display().to_string())
            .suggest("chmod 0600 the password file", None));
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            Problem::new(
                Code::PgAuthFailed,
                format!("the password file cannot be read: {e}"),
            )
        })?;
        let db = if replication {
            "replication"
        } else {
            self.dbname.as_str()
        };
        let port = self.port.to_string();
        Ok(pgpass_lookup(
            &text,
            &[&self.host, &port, db, &self.user],
            self.is_unix(),
        ))
    }

    pub fn is_unix(&self) -> bool {
        self.hostaddr.is_none() && self.host.starts_with('/')
    }
}

/// The password of the first `.pgpass` line whose four fields match
/// `want` (`*` matches anything; `\:` and `\\` escape). A socket
/// directory also matches `localhost`, as in libpq.
pub fn pgpass_lookup(text: &str, want: &[&str; 4], unix: bool) -> Option<String> {
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        let fields = pgpass_fields(line);
        let [h, p, d, u, pw] = fields.as_slice() else {
            continue;
        };
        let host_ok = h == "*" || h == want[0] || (unix && h == "localhost");
        let rest_ok = [p, d, u]
            .iter()
            .zip(&want[1..])
            .all(|(f, w)| *f == "*" || f == w);
        if host_ok && rest_ok {
            return Some(pw.to_string());
        }
    }
    None
}

/// A `.pgpass` line split on unescaped colons, escapes removed; the
/// password is everything after the fourth colon.
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out
                .last_mut()
                .into_iter()
                .for_each(|f| f.extend(chars.next())),
            ':' if out.len() < 5 => out.push(String::new()),
            c => out.last_mut().into_iter().for_each(|f| f.push(c)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let a = ConnInfo::parse("host=/tmp port=6543 user=bob dbname=app").expect("kv");
        assert_eq!(
            (a.host.as_str(), a.port, a.user.as_str(), a.dbname.as_str()),
            ("/tmp", 6543, "bob", "app")
        );
        assert!(a.is_unix());
        let b = ConnInfo::parse("postgresql://alice:s3cret@db.example:5433/orders").expect("url");
        assert_eq!(b.host, "db.example");
        assert_eq!(b.port, 5433);
        assert_eq!(b.password.as_deref(), Some("s3cret"));
        assert_eq!(b.dbname, "orders");
        assert!(ConnInfo::parse("port=abc").is_err());
        assert!(ConnInfo::parse("bogus").is_err());
    }

    #[test]
    fn every_form_of_password_is_redacted() {
        for (given, want) in [
            (
                "postgresql://app:s3cret@db.example:5432/prod",
                "postgresql://app:***@db.example:5432/prod",
            ),
            (
                "postgres://app:s3@cr@t@db/prod?sslmode=require&password=x2",
                "postgres://app:***@db/prod?sslmode=require&password=***",
            ),
            ("postgresql://app@db/prod", "postgresql://app@db/prod"),
            (
                "host=db user=app password=s3cret dbname=prod",
                "host=db user=app password=*** dbname=prod",
            ),
            (
                "host=db password = 'it\\'s a \\\\ secret' user=app",
                "host=db password=*** user=app",
            ),
            ("PASSWORD=x host=db", "PASSWORD=*** host=db"),
        ] {
            let got = redact(given);
            assert_eq!(got, want, "{given}");
            for secret in ["s3cret", "s3@cr@t", "x2", "secret"] {
                assert!(!got.contains(secret), "{given} leaked {secret}: {got}");
            }
        }
    }

    #[test]
    fn quoted_values_parse_as_libpq_reads_them() {
        let c = ConnInfo::parse("host = /tmp password='a b\\'c' user=''").expect("parse");
        assert_eq!(c.password.as_deref(), Some("a b'c"));
        assert_eq!(c.user, "");
        let e = ConnInfo::parse("host=/tmp password='Secret9").expect_err("open quote");
        assert!(!e.message.contains("Secret9"), "{e}");
        let e = ConnInfo::parse("host=/tmp password Secret9").expect_err("no =");
        assert!(!e.message.contains("Secret9"), "{e}");
        let e = ConnInfo::parse("postgresql://u:Secret9@h:x/db").expect_err("bad port");
        assert!(!e.message.contains("Secret9"), "{e}");
        // One reading of a URI for both: the scheme in any case.
        assert_eq!(
            redact("POSTGRESQL://u:Secret9@h/db"),
            "POSTGRESQL://u:***@h/db"
        );
        assert_eq!(
            ConnInfo::parse("POSTGRESQL://u:Secret9@h/db")
                .expect("uri")
                .host,
            "h"
        );
        assert_eq!(redact("host=/tmp password Secret9"), "***");
        // Found by the pg_frames fuzz target: a trailing escaped newline.
        let s = "k=\\\n";
        assert_eq!(
            keyword_pairs(&redact(s)).expect("reparse"),
            keyword_pairs(s).expect("parse")
        );
        // What redact writes parses back to the same settings.
        let r = redact("host='/a dir' user=it\\'s");
        assert_eq!(
            keyword_pairs(&r).expect("reparse"),
            keyword_pairs("host='/a dir' user=it\\'s").expect("parse")
        );
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let owned: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| owned.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_environment_fills_what_the_string_leaves_out() {
        let env = env_of(&[
            ("PGHOST", "db.env"),
            ("PGPORT", "6000"),
            ("PGSSLMODE", "verify-ca"),
            ("PGUSER", "envuser"),
        ]);
        let c = ConnInfo::parse_with("user=bob", &env).expect("parse");
        assert_eq!(
            (c.host.as_str(), c.port, c.user.as_str()),
            ("db.env", 6000, "bob")
        );
        assert_eq!(c.tls.mode, SslMode::VerifyCa);
        let c = ConnInfo::parse_with("host=h", &env_of(&[])).expect("defaults");
        assert_eq!(c.tls.mode, SslMode::Prefer);
        assert_eq!(c.tls.rootcert, None);
        assert!(ConnInfo::parse_with("sslmode=maybe", &env_of(&[])).is_err());
        assert!(
            ConnInfo::parse_with("sslnegotiation=direct sslmode=prefer", &env_of(&[])).is_err()
        );
        let c = ConnInfo::parse_with("sslrootcert=system", &env_of(&[])).expect("system");
        assert_eq!(
            (c.tls.mode, c.tls.rootcert),
            (SslMode::VerifyFull, Some(RootCert::System))
        );
        assert!(ConnInfo::parse_with("sslrootcert=system sslmode=require", &env_of(&[])).is_err());
    }

    #[test]
    fn uri_parts_are_decoded_and_its_query_is_read() {
        let c = ConnInfo::parse_with(
            "postgresql://us%40r:p%3Aw@[::1]:5433/my%20db?sslmode=require&application_name=x",
            &env_of(&[]),
        )
        .expect("uri");
        assert_eq!(
            (c.user.as_str(), c.password.as_deref()),
            ("us@r", Some("p:w"))
        );
        assert_eq!(
            (c.host.as_str(), c.port, c.dbname.as_str()),
            ("::1", 5433, "my db")
        );
        assert_eq!(c.tls.mode, SslMode::Require);
        let c = ConnInfo::parse_with("postgresql:///db?host=%2Ftmp%2Fsock", &env_of(&[]))
            .expect("socket");
        assert!(c.is_unix());
        assert_eq!(c.host, "/tmp/sock");
        for bad in [
            "postgresql://h/db?bogus=1",
            "postgresql://h/db?sslmode",
            "postgresql://u:%zz@h/db",
        ] {
            let e = ConnInfo::parse_with(bad, &env_of(&[])).expect_err(bad);
            assert!(!e.message.contains("%zz"), "{e}");
        }
    }

    #[test]
    fn a_service_file_section_sits_between_the_string_and_the_environment() {
        let dir = std::env::temp_dir().join(format!("phs-svc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("services");
        std::fs::write(
            &f,
            "# ours\n[prod]\nhost=db.svc\nport = 7000\nsslmode=verify-full\n[other]\nhost=no\n",
        )
        .expect("write");
        let file = f.display().to_string();
        let env = env_of(&[
            ("PGSERVICEFILE", file.as_str()),
            ("PGPORT", "9"),
            ("PGSSLROOTCERT", "/ca"),
        ]);
        let c = ConnInfo::parse_with("service=prod port=7001", &env).expect("service");
        assert_eq!((c.host.as_str(), c.port), ("db.svc", 7001));
        assert_eq!(c.tls.mode, SslMode::VerifyFull);
        assert_eq!(c.tls.rootcert, Some(RootCert::File("/ca".into())));
        let e = ConnInfo::parse_with("service=missing", &env).expect_err("undefined service");
        assert_eq!(e.code, "deployment.invalid");
        assert!(service_section("[a]\nservice=b\n", "a").is_err());
        assert!(service_section("[a]\nbogus=1\n", "a").is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn pgpass_lines_match_as_libpq_reads_them() {
        let text = "# c\nother:*:*:*:no\n*:5432:replication:app:r\\:pw\\\\\nlocalhost:*:*:*:sock\n";
        assert_eq!(
            pgpass_lookup(text, &["db", "5432", "replication", "app"], false).as_deref(),
            Some("r:pw\\")
        );
        assert_eq!(
            pgpass_lookup(text, &["/run/pg", "1", "x", "y"], true).as_deref(),
            Some("sock")
        );
        assert_eq!(
            pgpass_lookup(text, &["/run/pg", "1", "x", "y"], false),
            None
        );
        assert_eq!(
            pgpass_lookup("h:1:d:u:pa:ss", &["h", "1", "d", "u"], false).as_deref(),
            Some("pa:ss")
        );
    }

    #[test]
    fn require_auth_accepts_or_refuses_methods() {
        let r = RequireAuth::parse("scram-sha-256,md5").expect("list");
        assert!(
            r.permits(AuthMethod::Md5)
                && !r.permits(AuthMethod::Password)
                && !r.permits(AuthMethod::None)
        );
        let r = RequireAuth::parse("!password,!none").expect("negated");
        assert!(
            r.permits(AuthMethod::ScramSha256)
                && !r.permits(AuthMethod::Password)
                && !r.permits(AuthMethod::None)
        );
        assert!(RequireAuth::default().permits(AuthMethod::Password));
        assert!(RequireAuth::parse("md5,!password").is_err());
        assert!(RequireAuth::parse("kerberos").is_err());
    }

    #[test]
    fn several_hosts_are_read_as_libpq_reads_them() {
        let env = env_of(&[]);
        let c = ConnInfo::parse_with(
            "host=/tmp/a,db2 port=5433,5434 target_session_attrs=read-write",
            &env,
        )
        .expect("two hosts");
        let hp: Vec<_> = c.hosts.iter().map(|h| (h.host.as_str(), h.port)).collect();
        assert_eq!(hp, [("/tmp/a", 5433), ("db2", 5434)]);
        assert_eq!((c.host.as_str(), c.port), ("/tmp/a", 5433));
        assert_eq!(c.session_attrs, SessionAttrs::ReadWrite);
        let one = c.for_host(&c.hosts[1]);
        assert_eq!(
            (one.host.as_str(), one.port, one.hosts.len()),
            ("db2", 5434, 1)
        );
        // One port for all; the URI form; the default.
        let c = ConnInfo::parse_with("host=a,b port=6000", &env).expect("one port");
        assert!(c.hosts.iter().all(|h| h.port == 6000));
        let c = ConnInfo::parse_with(
            "postgresql://u@h1:5001,h2,[::1]:5003/db?target_session_attrs=prefer-standby",
            &env,
        )
        .expect("uri");
        let hp: Vec<_> = c.hosts.iter().map(|h| (h.host.as_str(), h.port)).collect();
        assert_eq!(hp, [("h1", 5001), ("h2", 5432), ("::1", 5003)]);
        assert_eq!(c.session_attrs, SessionAttrs::PreferStandby);
        let c = ConnInfo::parse_with("user=x", &env).expect("default");
        assert_eq!((c.hosts.len(), c.session_attrs), (1, SessionAttrs::Any));
        // Lists that do not line up, and an unknown attribute.
        for bad in [
            "host=a,b port=1,2,3",
            "host=a,b hostaddr=127.0.0.1",
            "host=a target_session_attrs=writable",
        ] {
            let e = ConnInfo::parse_with(bad, &env).expect_err(bad);
            assert_eq!(e.code, "deployment.invalid", "{bad}: {e}");
        }
    }
}
