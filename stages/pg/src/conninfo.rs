//! libpq-style connection strings: `key=value` pairs or a
//! `postgresql://user:password@host:port/dbname` URL.

use pg_hardstorage_engine::Problem;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnInfo {
    /// A host name, an IP address, or a directory holding the Unix socket.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub dbname: String,
}

fn bad(m: String) -> Problem {
    Problem::new("deployment.invalid", m).suggest(
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

impl ConnInfo {
    pub fn parse(s: &str) -> Result<Self, Problem> {
        let mut c = ConnInfo {
            host: "/var/run/postgresql".into(),
            port: 5432,
            user: std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into()),
            password: std::env::var("PGPASSWORD").ok(),
            dbname: "postgres".into(),
        };
        if let Some(u) = split_uri(s) {
            if let Some(a) = u.userinfo {
                match a.split_once(':') {
                    Some((user, p)) => {
                        c.user = user.to_string();
                        c.password = Some(p.to_string());
                    }
                    None => c.user = a.to_string(),
                }
            }
            let (hostport, db) = u.hostpath.split_once('/').unwrap_or((u.hostpath, ""));
            if !db.is_empty() {
                c.dbname = db.to_string();
            }
            if let Some((h, p)) = hostport.rsplit_once(':') {
                c.host = h.to_string();
                // The port alone: the string may hold a password.
                c.port = p.parse().map_err(|_| bad(format!("bad port {p:?}")))?;
            } else if !hostport.is_empty() {
                c.host = hostport.to_string();
            }
            return Ok(c);
        }
        for (k, v) in keyword_pairs(s)? {
            match k.as_str() {
                "host" | "hostaddr" => c.host = v,
                "port" => c.port = v.parse().map_err(|_| bad(format!("bad port {v:?}")))?,
                "user" => c.user = v,
                "password" => c.password = Some(v),
                "dbname" => c.dbname = v,
                "sslmode" | "application_name" | "connect_timeout" => {}
                other => return Err(bad(format!("unsupported connection parameter {other:?}"))),
            }
        }
        Ok(c)
    }

    pub fn is_unix(&self) -> bool {
        self.host.starts_with('/')
    }
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
}
