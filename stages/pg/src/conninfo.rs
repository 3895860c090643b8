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

impl ConnInfo {
    pub fn parse(s: &str) -> Result<Self, Problem> {
        let mut c = ConnInfo {
            host: "/var/run/postgresql".into(),
            port: 5432,
            user: std::env::var("PGUSER").unwrap_or_else(|_| "postgres".into()),
            password: std::env::var("PGPASSWORD").ok(),
            dbname: "postgres".into(),
        };
        if let Some(rest) = s
            .strip_prefix("postgresql://")
            .or_else(|| s.strip_prefix("postgres://"))
        {
            let (auth, rest) = match rest.rsplit_once('@') {
                Some((a, r)) => (Some(a), r),
                None => (None, rest),
            };
            if let Some(a) = auth {
                match a.split_once(':') {
                    Some((u, p)) => {
                        c.user = u.to_string();
                        c.password = Some(p.to_string());
                    }
                    None => c.user = a.to_string(),
                }
            }
            let (hostport, db) = rest.split_once('/').unwrap_or((rest, ""));
            let db = db.split('?').next().unwrap_or("");
            if !db.is_empty() {
                c.dbname = db.to_string();
            }
            if let Some((h, p)) = hostport.rsplit_once(':') {
                c.host = h.to_string();
                c.port = p.parse().map_err(|_| bad(format!("bad port in {s:?}")))?;
            } else if !hostport.is_empty() {
                c.host = hostport.to_string();
            }
            return Ok(c);
        }
        for kv in s.split_whitespace() {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("{kv:?} is not key=value")))?;
            let v = v.trim_matches('\'').to_string();
            match k {
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
}
