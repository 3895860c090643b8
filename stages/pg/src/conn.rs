//! A minimal PostgreSQL client for the simple query protocol and the
//! replication commands: startup (trust, password, md5, SCRAM-SHA-256),
//! `IDENTIFY_SYSTEM`, plain queries, and the `BASE_BACKUP` copy stream.
//! tokio-postgres cannot open replication connections (rust-postgres#116),
//! so this speaks the protocol with `postgres-protocol`'s codec over a tokio
//! socket, driven by a private current-thread runtime.

use crate::conninfo::{ChannelBinding as Binding, ConnInfo};
use bytes::{Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

enum Stream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

/// Whether one connection attempt speaks TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tls {
    Off,
    /// Asked for; a server that declines is spoken to in clear (`prefer`).
    Try,
    /// Asked for; a server that declines is refused.
    Must,
}

pub struct Conn {
    rt: tokio::runtime::Runtime,
    stream: Stream,
    buf: BytesMut,
    pub server_version: String,
    /// RFC 5929 `tls-server-end-point` of the server's certificate, on TLS.
    end_point: Option<Vec<u8>>,
    /// How it was reached: a second, plain session for what a walsender of
    /// an older server cannot answer.
    ci: ConnInfo,
    /// Warnings a `BASE_BACKUP` sent (checksum failures), in order.
    notices: Vec<String>,
}

/// What `IDENTIFY_SYSTEM` answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    pub system_identifier: String,
    pub timeline: u32,
    pub xlogpos: String,
}

/// One step of a copy-out stream.
pub enum CopyEvent {
    Data(Bytes),
}

pub type Rows = Vec<Vec<Option<String>>>;

/// No host of a multi-host string would do: one error naming each host
/// and why. Its code is the hosts' common one (all refused the password:
/// `pg.auth_failed`), else `pg.unreachable`.
fn no_host(ci: &ConnInfo, tried: Vec<(String, Problem)>) -> Problem {
    let why: Vec<String> = tried
        .iter()
        .map(|(h, p)| format!("{h}: {} ({})", p.message, p.code.as_ref()))
        .collect();
    let code = match tried.first() {
        Some((_, p)) if tried.iter().all(|(_, q)| q.code == p.code) => p.code,
        _ => Code::PgUnreachable,
    };
    Problem::new(
        code,
        format!("no host is {}: {}", ci.session_attrs.name(), why.join("; ")),
    )
    .suggest(
        "Check that one of the hosts is up and, for read-write, that it is the primary",
        None,
    )
}

fn proto(m: impl std::fmt::Display) -> Problem {
    Problem::new(Code::PgProtocol, format!("PostgreSQL protocol: {m}"))
}

/// The largest frame the client buffers. PostgreSQL's own messages stay
/// far below it (WAL comes in frames of at most 128 KiB); a server that
/// claims more is refused, not waited for until memory runs out.
pub const MAX_FRAME: usize = 64 << 20;

/// The length (after the tag) the frame at the front of `buf` claims, once
/// its header has arrived; refused when under 4 or over [`MAX_FRAME`].
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, Problem> {
    let Some(h) = buf.get(1..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    if len < 4 {
        return Err(proto("bad frame length"));
    }
    if len > MAX_FRAME {
        return Err(proto(format!(
            "a frame of {len} bytes is over the {MAX_FRAME}-byte bound"
        )));
    }
    Ok(Some(len))
}

/// The whole raw frame at the front of `buf` (tag, body), taken off it;
/// `None` until all of it has arrived.
pub fn take_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, Problem> {
    match frame_len(buf)? {
        Some(len) if buf.len() > len => {
            let frame = buf.split_to(len + 1).freeze();
            Ok(Some((frame[0], frame.slice(5..))))
        }
        _ => Ok(None),
    }
}

/// A replication stream's CopyData body: XLogData or a keepalive.
pub fn parse_replication_copy(body: Bytes) -> Result<ReplMsg, Problem> {
    match body.first() {
        Some(b'w') => {
            let start = be_u64(&body[1..])?;
            if body.len() < 25 {
                return Err(proto("short XLogData"));
            }
            Ok(ReplMsg::XLogData {
                start,
                data: body.slice(25..),
            })
        }
        Some(b'k') => {
            let end = be_u64(&body[1..])?;
            let reply = body.get(17).copied().unwrap_or(0) != 0;
            Ok(ReplMsg::Keepalive { end, reply })
        }
        _ => Err(proto("unknown replication CopyData")),
    }
}

fn io_err(e: std::io::Error) -> Problem {
    Problem::new(Code::PgUnreachable, format!("PostgreSQL connection: {e}")).suggest(
        "Check that the server runs and the deployment's --pg connection string",
        None,
    )
}

/// The SQLSTATE and message of an error or notice.
fn code_and_message(
    mut fields: postgres_protocol::message::backend::ErrorFields<'_>,
) -> (String, String) {
    let (mut code, mut msg) = (String::new(), String::new());
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => msg = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    (code, msg)
}

fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> Problem {
    let mut code = String::new();
    let mut msg = String::new();
    let mut fields = body.fields();
    while let Ok(Some(f)) = fields.next() {
        match f.type_() {
            b'C' => code = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            b'M' => msg = String::from_utf8_lossy(f.value_bytes()).into_owned(),
            _ => {}
        }
    }
    let (c, hint) = match code.as_str() {
        "28000" | "28P01" => (
            Code::PgAuthFailed,
            "Check the user, password and pg_hba.conf (replication needs its own line)",
        ),
        "42501" => (
            Code::PgReplicationDenied,
            "Grant REPLICATION to the user: ALTER ROLE name REPLICATION",
        ),
        "55000" => (
            Code::PgReplicationDenied,
            "Set wal_level = replica (or logical) and restart PostgreSQL",
        ),
        _ => (Code::PgServerError, "See the PostgreSQL server log"),
    };
    Problem::new(c, format!("PostgreSQL: {msg} (SQLSTATE {code})"))
        .with("sqlstate", code)
        .suggest(hint, None)
}

/// PostgreSQL's SSLRequest: length 8, code 1234.5679.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

fn runtime() -> Result<tokio::runtime::Runtime, Problem> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Problem::internal(format!("tokio: {e}")))
}

async fn open_tcp(ci: &ConnInfo) -> Result<tokio::net::TcpStream, Problem> {
    let host = ci.hostaddr.as_deref().unwrap_or(&ci.host);
    let connect = tokio::net::TcpStream::connect((host, ci.port));
    let r = match ci.connect_timeout {
        Some(d) => tokio::time::timeout(d, connect).await.unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("connect_timeout of {} s passed", d.as_secs()),
            ))
        }),
        None => connect.await,
    };
    let tcp = r.map_err(|e| io_err(e).with("host", ci.host.clone()))?;
    tcp.set_nodelay(true).map_err(io_err)?;
    Ok(tcp)
}

/// The socket for one attempt: Unix (never TLS, as in libpq), TCP in
/// clear, or TCP with TLS negotiated by SSLRequest or, with
/// `sslnegotiation=direct`, from the first byte.
async fn open_stream(ci: &ConnInfo, tls: Tls) -> Result<Stream, Problem> {
    if ci.is_unix() {
        let path = format!("{}/.s.PGSQL.{}", ci.host, ci.port);
        return tokio::net::UnixStream::connect(path)
            .await
            .map(Stream::Unix)
            .map_err(|e| io_err(e).with("host", ci.host.clone()));
    }
    let mut tcp = open_tcp(ci).await?;
    if tls == Tls::Off {
        return Ok(Stream::Tcp(tcp));
    }
    let plan = crate::tls::plan(ci)?;
    if !ci.tls.direct {
        tcp.write_all(&SSL_REQUEST).await.map_err(io_err)?;
        // Exactly one byte: nothing sent in clear after it is ever read as
        // part of the session (CVE-2021-23222); rustls reads the rest.
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await.map_err(io_err)?;
        match (answer[0], tls) {
            (b'S', _) => {}
            (b'N', Tls::Try) => return Ok(Stream::Tcp(tcp)),
            (b'N', _) => {
                return Err(Problem::new(
                    Code::PgTlsUnavailable,
                    "the server does not offer TLS and the connection requires it",
                )
                .suggest(
                    "Turn ssl = on in the server's postgresql.conf, or relax sslmode",
                    None,
                ))
            }
            _ => return Err(proto("unexpected answer to SSLRequest")),
        }
    }
    let s = tokio_rustls::TlsConnector::from(plan.config)
        .connect(plan.server_name, tcp)
        .await
        .map_err(|e| {
            let p = crate::tls::handshake_error(e);
            match ci.tls.direct {
                // A server before 17 reads the ClientHello as a startup
                // packet and hangs up.
                true => p.context("direct TLS (sslnegotiation=direct)").suggest(
                    "Direct TLS needs PostgreSQL 17 or later: use sslnegotiation=postgres",
                    None,
                ),
                false => p,
            }
        })?;
    if ci.tls.direct && s.get_ref().1.alpn_protocol() != Some(b"postgresql") {
        return Err(Problem::new(
            Code::PgTlsFailed,
            "the server did not accept the postgresql ALPN protocol on direct TLS",
        )
        .suggest(
            "Direct TLS needs PostgreSQL 17 or later: use sslnegotiation=postgres",
            None,
        ));
    }
    Ok(Stream::Tls(Box::new(s)))
}

fn refused(m: impl Into<String>) -> Problem {
    Problem::new(Code::PgAuthMethodRefused, m.into()).suggest(
        "The server's pg_hba.conf asks for a method this connection's require_auth (or channel_binding=require) refuses: change one of them",
        None,
    )
}

/// The password to answer a challenge with: the connection string's (or
/// `PGPASSWORD`), else the password file's.
fn password(ci: &ConnInfo, replication: bool) -> Result<String, Problem> {
    if let Some(p) = &ci.password {
        return Ok(p.clone());
    }
    ci.passfile_password(replication)?.ok_or_else(|| {
        Problem::new(
            Code::PgAuthFailed,
            "the server asks for a password and none was given",
        )
        .suggest(
            "Put the password in ~/.pgpass (or passfile=...), or set PGPASSWORD",
            None,
        )
    })
}

/// What the startup exchange has seen, to hold the server to the
/// connection's `require_auth` and `channel_binding`.
#[derive(Default)]
struct Auth {
    scram: Option<ScramSha256>,
    scram_done: bool,
    asked: bool,
}

impl Auth {
    fn check(&mut self, ci: &ConnInfo, msg: &Message) -> Result<(), Problem> {
        use crate::conninfo::AuthMethod as M;
        let method = match msg {
            Message::AuthenticationCleartextPassword => M::Password,
            Message::AuthenticationMd5Password(_) => M::Md5,
            Message::AuthenticationSasl(_) => M::ScramSha256,
            Message::AuthenticationOk if self.scram.is_some() && !self.scram_done => {
                return Err(refused(
                    "the server ended SCRAM authentication before proving it knows the password",
                ));
            }
            Message::AuthenticationOk if !self.asked => M::None,
            _ => return Ok(()),
        };
        self.asked = true;
        if !ci.require_auth.permits(method) {
            return Err(refused(format!(
                "the server asks for {} authentication, which require_auth refuses",
                method.name()
            )));
        }
        if ci.tls.channel_binding == Binding::Require && method != M::ScramSha256 {
            return Err(refused(format!(
                "the server asks for {} authentication, which channel_binding=require refuses",
                method.name()
            )));
        }
        Ok(())
    }
}

impl Conn {
    /// Connects and authenticates; `replication` opens a physical walsender.
    /// TLS follows `sslmode` as libpq does: `allow` tries clear first and
    /// TLS when the server refuses it; `prefer` tries TLS first and clear
    /// when the server declines or the handshake fails; `require` and the
    /// `verify-*` modes never speak in clear.
    /// Connects as libpq does: each host in turn until one answers and
    /// matches `target_session_attrs` (for `prefer-standby`, a pass for a
    /// standby first, then any).
    pub fn connect(ci: &ConnInfo, replication: bool) -> Result<Conn, Problem> {
        use crate::conninfo::SessionAttrs;
        if ci.hosts.len() <= 1 && ci.session_attrs == SessionAttrs::Any {
            return Self::connect_one(ci, replication);
        }
        let passes: &[SessionAttrs] = match ci.session_attrs {
            SessionAttrs::PreferStandby => &[SessionAttrs::Standby, SessionAttrs::Any],
            a => &[a],
        };
        let mut tried: Vec<(String, Problem)> = Vec::new();
        for &want in passes {
            for h in &ci.hosts {
                let where_ = format!("{}:{}", h.host, h.port);
                let r = Self::connect_one(&ci.for_host(h), replication)
                    .and_then(|mut c| c.session_is(want).map(|ok| (c, ok)));
                match r {
                    Ok((c, true)) => return Ok(c),
                    Ok((_, false)) => tried.push((
                        where_,
                        Problem::new(Code::PgUnreachable, format!("not {}", want.name())),
                    )),
                    Err(p) => tried.push((where_, p)),
                }
            }
        }
        Err(no_host(ci, tried))
    }

    /// `SHOW name`: the setting's value (empty if the server gave none).
    pub fn show(&mut self, name: &str) -> Result<String, Problem> {
        let rows = self.simple_query(&format!("SHOW {name}"))?;
        let v = rows.first().and_then(|s| s.first()).and_then(|r| r.first());
        Ok(v.cloned().flatten().unwrap_or_default())
    }

    /// Whether this session is what `want` asks for.
    fn session_is(&mut self, want: crate::conninfo::SessionAttrs) -> Result<bool, Problem> {
        use crate::conninfo::SessionAttrs;
        let major = self.server_major();
        let mut show = |what: &str| self.show(what).map(|v| v == "on");
        Ok(match want {
            SessionAttrs::Any => true,
            SessionAttrs::ReadWrite => !show("transaction_read_only")?,
            SessionAttrs::ReadOnly => show("transaction_read_only")?,
            SessionAttrs::Primary | SessionAttrs::Standby | SessionAttrs::PreferStandby => {
                // in_hot_standby is 14's; before it a standby is read-only.
                let hot = match major >= 14 {
                    true => show("in_hot_standby")?,
                    false => show("transaction_read_only")?,
                };
                hot == (want != SessionAttrs::Primary)
            }
        })
    }

    fn connect_one(ci: &ConnInfo, replication: bool) -> Result<Conn, Problem> {
        use crate::conninfo::SslMode;
        if ci.is_unix() {
            return Self::attempt(ci, replication, Tls::Off);
        }
        match ci.tls.mode {
            SslMode::Disable => Self::attempt(ci, replication, Tls::Off),
            SslMode::Allow => Self::attempt(ci, replication, Tls::Off).or_else(|p| {
                match matches!(p.code.as_ref(), "pg.auth_failed" | "pg.server_error") {
                    true => Self::attempt(ci, replication, Tls::Must),
                    false => Err(p),
                }
            }),
            SslMode::Prefer => Self::attempt(ci, replication, Tls::Try).or_else(|p| {
                match p.code == "pg.tls_failed" {
                    true => Self::attempt(ci, replication, Tls::Off),
                    false => Err(p),
                }
            }),
            _ => Self::attempt(ci, replication, Tls::Must),
        }
    }

    fn attempt(ci: &ConnInfo, replication: bool, tls: Tls) -> Result<Conn, Problem> {
        let rt = runtime()?;
        let stream = rt.block_on(open_stream(ci, tls))?;
        let end_point = match &stream {
            Stream::Tls(s) => s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| crate::tls::server_end_point(c)),
            _ => None,
        };
        let mut c = Conn {
            rt,
            stream,
            buf: BytesMut::with_capacity(1 << 16),
            server_version: String::new(),
            end_point,
            ci: ci.clone(),
            notices: Vec::new(),
        };
        c.startup(ci, replication)?;
        Ok(c)
    }

    /// Whether the session runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    fn send(&mut self, msg: &[u8]) -> Result<(), Problem> {
        let Conn { rt, stream, .. } = self;
        rt.block_on(async {
            match stream {
                Stream::Tcp(s) => s.write_all(msg).await,
                Stream::Unix(s) => s.write_all(msg).await,
                Stream::Tls(s) => s.write_all(msg).await,
            }
        })
        .map_err(io_err)
    }

    /// Reads more bytes from the socket into the buffer.
    fn fill(&mut self, want: usize) -> Result<(), Problem> {
        match self.fill_within(want, None)? {
            true => Ok(()),
            false => Err(proto("read timed out")),
        }
    }

    /// Like `fill`; `Ok(false)` when `limit` passed with nothing read
    /// (`read_buf` is cancel-safe: nothing is lost).
    fn fill_within(
        &mut self,
        want: usize,
        limit: Option<std::time::Duration>,
    ) -> Result<bool, Problem> {
        let Conn {
            rt, stream, buf, ..
        } = self;
        buf.reserve(want);
        let read = async {
            match stream {
                Stream::Tcp(s) => s.read_buf(buf).await,
                Stream::Unix(s) => s.read_buf(buf).await,
                Stream::Tls(s) => s.read_buf(buf).await,
            }
        };
        let n = match limit {
            None => rt.block_on(read),
            Some(d) => match rt.block_on(async { tokio::time::timeout(d, read).await }) {
                Ok(r) => r,
                Err(_) => return Ok(false),
            },
        }
        .map_err(io_err)?;
        if n == 0 {
            return Err(Problem::new(
                Code::PgUnreachable,
                "PostgreSQL closed the connection",
            ));
        }
        Ok(true)
    }

    fn recv(&mut self) -> Result<Message, Problem> {
        loop {
            // Bounded before postgres-protocol waits for the whole frame.
            frame_len(&self.buf)?;
            if let Some(m) = Message::parse(&mut self.buf).map_err(proto)? {
                return Ok(m);
            }
            self.fill(1 << 16)?;
        }
    }

    fn startup(&mut self, ci: &ConnInfo, replication: bool) -> Result<(), Problem> {
        let mut params = vec![
            ("user", ci.user.as_str()),
            ("application_name", "pg_hardstorage"),
        ];
        if replication {
            params.push(("replication", "true"));
        } else {
            params.push(("database", ci.dbname.as_str()));
        }
        let mut b = BytesMut::new();
        frontend::startup_message(params, &mut b).map_err(proto)?;
        self.send(&b)?;
        let mut auth = Auth::default();
        loop {
            let msg = self.recv()?;
            auth.check(ci, &msg)?;
            let mut b = BytesMut::new();
            match msg {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password(ci, replication)?.as_bytes(), &mut b)
                        .map_err(proto)?;
                    self.send(&b)?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let h = postgres_protocol::authentication::md5_hash(
                        ci.user.as_bytes(),
                        password(ci, replication)?.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(h.as_bytes(), &mut b).map_err(proto)?;
                    self.send(&b)?;
                }
                Message::AuthenticationSasl(body) => {
                    let plus = body
                        .mechanisms()
                        .any(|m| Ok(m == "SCRAM-SHA-256-PLUS"))
                        .map_err(proto)?;
                    let (mech, binding) = self.channel_binding(ci, plus)?;
                    let pw = password(ci, replication)?;
                    let s = ScramSha256::new(pw.as_bytes(), binding);
                    frontend::sasl_initial_response(mech, s.message(), &mut b).map_err(proto)?;
                    self.send(&b)?;
                    auth.scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = auth
                        .scram
                        .as_mut()
                        .ok_or_else(|| proto("SASL continue without start"))?;
                    s.update(body.data())
                        .map_err(|e| Problem::new(Code::PgAuthFailed, e.to_string()))?;
                    frontend::sasl_response(s.message(), &mut b).map_err(proto)?;
                    self.send(&b)?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let s = auth
                        .scram
                        .as_mut()
                        .ok_or_else(|| proto("SASL final without start"))?;
                    // Checks the server's signature: it knew the password.
                    s.finish(body.data())
                        .map_err(|e| Problem::new(Code::PgAuthFailed, e.to_string()))?;
                    auth.scram_done = true;
                }
                Message::ParameterStatus(p) => {
                    if p.name().map_err(proto)? == "server_version" {
                        self.server_version = p.value().map_err(proto)?.to_string();
                    }
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(e) => return Err(server_error(&e)),
                _ => return Err(proto("unexpected message during startup")),
            }
        }
    }

    /// The SASL mechanism and channel binding to use: SCRAM-SHA-256-PLUS
    /// bound to the server's certificate when on TLS and offered.
    fn channel_binding(
        &self,
        ci: &ConnInfo,
        offered: bool,
    ) -> Result<(&'static str, ChannelBinding), Problem> {
        let mode = ci.tls.channel_binding;
        match (&self.end_point, offered) {
            (Some(ep), true) if mode != Binding::Disable => Ok((
                "SCRAM-SHA-256-PLUS",
                ChannelBinding::tls_server_end_point(ep.clone()),
            )),
            _ if mode == Binding::Require => Err(refused(
                "the server does not offer SCRAM channel binding and channel_binding=require",
            )),
            (Some(_), false) => Ok(("SCRAM-SHA-256", ChannelBinding::unrequested())),
            _ => Ok(("SCRAM-SHA-256", ChannelBinding::unsupported())),
        }
    }

    fn rows_of(
        body: &postgres_protocol::message::backend::DataRowBody,
    ) -> Result<Vec<Option<String>>, Problem> {
        let buf = body.buffer();
        let mut out = Vec::new();
        let mut ranges = body.ranges();
        while let Some(r) = ranges.next().map_err(proto)? {
            out.push(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
        }
        Ok(out)
    }

    /// Runs one simple-protocol statement; returns the rows of every result set.
    pub fn simple_query(&mut self, sql: &str) -> Result<Vec<Rows>, Problem> {
        let mut b = BytesMut::new();
        frontend::query(sql, &mut b).map_err(proto)?;
        self.send(&b)?;
        let mut sets: Vec<Rows> = Vec::new();
        let mut err = None;
        loop {
            match self.recv()? {
                Message::RowDescription(_) => sets.push(Vec::new()),
                Message::DataRow(d) => {
                    let row = Self::rows_of(&d)?;
                    match sets.last_mut() {
                        Some(s) => s.push(row),
                        None => sets.push(vec![row]),
                    }
                }
                Message::ErrorResponse(e) => err = Some(server_error(&e)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok(sets),
        }
    }

    /// The warnings the last `BASE_BACKUP` sent.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
    }

    /// `UPLOAD_MANIFEST` (PostgreSQL 17+): hands the server the previous
    /// backup's `backup_manifest`, against which a `BASE_BACKUP
    /// (INCREMENTAL)` on this session sends only changed blocks.
    pub fn upload_manifest(&mut self, manifest: &[u8]) -> Result<(), Problem> {
        let mut b = BytesMut::new();
        frontend::query("UPLOAD_MANIFEST", &mut b).map_err(proto)?;
        self.send(&b)?;
        let mut err = None;
        loop {
            match self.recv()? {
                Message::CopyInResponse(_) => {
                    let mut b = BytesMut::new();
                    for piece in manifest.chunks(1 << 20) {
                        frontend::CopyData::new(piece).map_err(proto)?.write(&mut b);
                    }
                    frontend::copy_done(&mut b);
                    self.send(&b)?;
                }
                Message::ErrorResponse(e) => err = Some(server_error(&e)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        err.map_or(Ok(()), Err)
    }

    pub fn identify_system(&mut self) -> Result<SystemInfo, Problem> {
        let sets = self.simple_query("IDENTIFY_SYSTEM")?;
        let row = sets
            .first()
            .and_then(|s| s.first())
            .ok_or_else(|| proto("IDENTIFY_SYSTEM returned no row"))?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemInfo {
            system_identifier: get(0),
            timeline: get(1).parse().map_err(|_| proto("bad timeline"))?,
            xlogpos: get(2),
        })
    }

    /// The server's major version, from the `server_version` it reported
    /// at startup ("13.23", "18.6 (Debian 18.6-1)"); 0 when unknown.
    pub fn server_major(&self) -> u32 {
        let digits: String = self
            .server_version
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().unwrap_or(0)
    }

    /// Runs `BASE_BACKUP` labelled `label` (fast checkpoint, a manifest,
    /// the WAL, no wait for archiving) in the syntax of the server's major:
    /// result sets before the copy stream go to the first element of the
    /// answer, those after it to the second; the stream goes to `on_copy`
    /// in PostgreSQL 15's framing ('n' archive, 'd' data, 'm' manifest),
    /// into which an older server's stream (one COPY per tablespace, then
    /// one for the manifest) is translated.
    /// With `incremental` (PostgreSQL 17+, after [`Conn::upload_manifest`]
    /// on this session), relation files come as `INCREMENTAL.<name>`.
    pub fn base_backup(
        &mut self,
        label: &str,
        incremental: bool,
        on_copy: &mut dyn FnMut(CopyEvent) -> Result<(), Problem>,
    ) -> Result<(Vec<Rows>, Vec<Rows>), Problem> {
        let label = label.replace('\'', "''");
        let legacy = self.server_major() < 15;
        let inc = if incremental { "INCREMENTAL, " } else { "" };
        let command = match legacy {
            false => format!(
                "BASE_BACKUP (LABEL '{label}', {inc}CHECKPOINT 'fast', MANIFEST 'yes', WAL true, WAIT false)"
            ),
            true => format!("BASE_BACKUP LABEL '{label}' FAST WAL NOWAIT MANIFEST 'yes'"),
        };
        let mut b = BytesMut::new();
        frontend::query(&command, &mut b).map_err(proto)?;
        self.send(&b)?;
        if legacy {
            let mut framed = LegacyFraming::default();
            return self.base_backup_stream(&mut |m, before| framed.translate(m, before, on_copy));
        }
        self.base_backup_stream(&mut |m, _| match m {
            LegacyMsg::Data(d) => on_copy(CopyEvent::Data(d)),
            LegacyMsg::CopyStart | LegacyMsg::CopyEnd => Ok(()),
        })
    }

    fn base_backup_stream(
        &mut self,
        on_copy: &mut CopyLoop<'_>,
    ) -> Result<(Vec<Rows>, Vec<Rows>), Problem> {
        let (mut before, mut after): (Vec<Rows>, Vec<Rows>) = (Vec::new(), Vec::new());
        let mut copying_done = false;
        let mut err = None;
        loop {
            match self.recv()? {
                Message::RowDescription(_) => if copying_done {
                    &mut after
                } else {
                    &mut before
                }
                .push(Vec::new()),
                Message::DataRow(d) => {
                    let row = Self::rows_of(&d)?;
                    let sets = if copying_done {
                        &mut after
                    } else {
                        &mut before
                    };
                    match sets.last_mut() {
                        Some(s) => s.push(row),
                        None => sets.push(vec![row]),
                    }
                }
                Message::CopyOutResponse(_) if err.is_none() => {
                    if let Err(p) = on_copy(LegacyMsg::CopyStart, &before) {
                        err = Some(p);
                    }
                }
                Message::CopyData(d) if err.is_none() => {
                    if let Err(p) = on_copy(LegacyMsg::Data(d.into_bytes()), &before) {
                        // Keep draining so the connection ends cleanly.
                        err = Some(p);
                    }
                }
                Message::CopyDone => {
                    copying_done = true;
                    if err.is_none() {
                        if let Err(p) = on_copy(LegacyMsg::CopyEnd, &before) {
                            err = Some(p);
                        }
                    }
                }
                Message::NoticeResponse(n) => {
                    let (_, msg) = code_and_message(n.fields());
                    self.notices.push(msg);
                }
                Message::ErrorResponse(e) => {
                    // Damaged pages (data_checksums): the server sent the
                    // whole backup, its end included, then says so. It is
                    // the database's damage, reported page by page in the
                    // warnings before; the backup stands.
                    let (code, msg) = code_and_message(e.fields());
                    if code == "XX001" && copying_done && !after.is_empty() && err.is_none() {
                        self.notices.push(msg);
                    } else {
                        err.get_or_insert(server_error(&e));
                    }
                }
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match err {
            Some(e) => Err(e),
            None => Ok((before, after)),
        }
    }
}

/// What the copy loop of a base backup hands on: each message, and the
/// result sets received before it.
type CopyLoop<'a> = dyn FnMut(LegacyMsg, &[Rows]) -> Result<(), Problem> + 'a;

/// What the copy loop of a base backup sees.
enum LegacyMsg {
    CopyStart,
    Data(Bytes),
    CopyEnd,
}

/// Translates a pre-15 base backup stream into 15's framing. Before 15 the
/// server lists the tablespaces in a result set (`spcoid, spclocation,
/// size`; the data directory last, with no oid), sends each as its own
/// COPY of a tar stream without the two closing zero blocks, then the
/// manifest as one more COPY.
#[derive(Default)]
struct LegacyFraming {
    copies: usize,
    in_tar: bool,
}

impl LegacyFraming {
    fn translate(
        &mut self,
        m: LegacyMsg,
        before: &[Rows],
        on_copy: &mut dyn FnMut(CopyEvent) -> Result<(), Problem>,
    ) -> Result<(), Problem> {
        let spaces = before
            .get(1)
            .ok_or_else(|| proto("no tablespace list before the base backup"))?;
        match m {
            LegacyMsg::CopyStart => {
                let i = self.copies;
                self.copies += 1;
                let Some(row) = spaces.get(i) else {
                    self.in_tar = false;
                    return on_copy(CopyEvent::Data(Bytes::from_static(b"m")));
                };
                self.in_tar = true;
                let oid = row.first().cloned().flatten();
                let location = row.get(1).cloned().flatten().unwrap_or_default();
                let name = oid.map_or("base.tar".to_string(), |o| format!("{o}.tar"));
                let mut frame = vec![b'n'];
                for part in [name.as_bytes(), location.as_bytes()] {
                    frame.extend_from_slice(part);
                    frame.push(0);
                }
                on_copy(CopyEvent::Data(Bytes::from(frame)))
            }
            LegacyMsg::Data(d) => {
                let mut frame = Vec::with_capacity(d.len() + 1);
                frame.push(b'd');
                frame.extend_from_slice(&d);
                on_copy(CopyEvent::Data(Bytes::from(frame)))
            }
            LegacyMsg::CopyEnd if self.in_tar => {
                // The end-of-archive marker the old server leaves out.
                let mut frame = vec![0u8; 1025];
                frame[0] = b'd';
                on_copy(CopyEvent::Data(Bytes::from(frame)))
            }
            LegacyMsg::CopyEnd => Ok(()),
        }
    }
}

/// One message of a physical replication stream.
#[derive(Debug)]
pub enum ReplMsg {
    /// WAL bytes starting at `start`.
    XLogData { start: u64, data: Bytes },
    /// The server's position; `reply` asks for a status update now.
    Keepalive { end: u64, reply: bool },
    /// The stream ended (timeline switch or server shutdown).
    End,
    /// Nothing arrived within the wait asked for.
    Idle,
}

/// Microseconds since 2000-01-01, the protocol's clock.
fn pg_now() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    unix - 946_684_800_000_000
}

fn be_u64(b: &[u8]) -> Result<u64, Problem> {
    let a: [u8; 8] = b
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| proto("short replication message"))?;
    Ok(u64::from_be_bytes(a))
}

pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

impl Conn {
    /// `(restart_lsn, timeline)` of a physical slot, `None` if it does not exist.
    /// Before PostgreSQL 15 (no `READ_REPLICATION_SLOT`) the slot is read
    /// from `pg_replication_slots` over a plain session, its timeline as 0.
    pub fn read_slot(&mut self, slot: &str) -> Result<Option<(u64, u32)>, Problem> {
        let sets = match self.server_major() < 15 {
            true => Conn::connect(&self.ci, false)?.simple_query(&format!(
                "SELECT slot_type, restart_lsn, 0 FROM pg_replication_slots WHERE slot_name = '{}'",
                slot.replace('\'', "''")
            ))?,
            false => self.simple_query(&format!("READ_REPLICATION_SLOT {slot}"))?,
        };
        let row = sets.first().and_then(|s| s.first());
        match row {
            Some(r) if r.first().cloned().flatten().is_some() => {
                let lsn = r
                    .get(1)
                    .cloned()
                    .flatten()
                    .and_then(|l| parse_lsn(&l))
                    .unwrap_or(0);
                let tli = r
                    .get(2)
                    .cloned()
                    .flatten()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                Ok(Some((lsn, tli)))
            }
            _ => Ok(None),
        }
    }

    /// `TIMELINE_HISTORY n`: the history file's name and contents.
    pub fn timeline_history(&mut self, timeline: u32) -> Result<(String, String), Problem> {
        let sets = self.simple_query(&format!("TIMELINE_HISTORY {timeline}"))?;
        let row = sets
            .first()
            .and_then(|s| s.first())
            .ok_or_else(|| proto("TIMELINE_HISTORY returned no row"))?;
        let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok((get(0), get(1)))
    }

    pub fn create_slot(&mut self, slot: &str) -> Result<(), Problem> {
        self.simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL"
        ))
        .map(|_| ())
    }

    /// Sends `START_REPLICATION` and waits for the copy-both answer.
    pub fn start_replication(
        &mut self,
        slot: &str,
        start: u64,
        timeline: u32,
    ) -> Result<(), Problem> {
        let mut b = BytesMut::new();
        let sql = format!(
            "START_REPLICATION SLOT {slot} PHYSICAL {} TIMELINE {timeline}",
            format_lsn(start)
        );
        frontend::query(&sql, &mut b).map_err(proto)?;
        self.send(&b)?;
        loop {
            let (tag, body) = self.recv_raw()?;
            match tag {
                b'W' => return Ok(()),
                b'E' => return Err(self.raw_error(body)),
                b'N' | b'S' => {}
                t => {
                    return Err(proto(format!(
                        "unexpected {:?} after START_REPLICATION",
                        t as char
                    )))
                }
            }
        }
    }

    fn raw_error(&self, body: Bytes) -> Problem {
        let mut fields = String::new();
        for f in body.split(|b| *b == 0) {
            if let Some((&t, v)) = f.split_first() {
                if t == b'M' || t == b'C' {
                    fields.push_str(&String::from_utf8_lossy(v));
                    fields.push(' ');
                }
            }
        }
        Problem::new(
            Code::PgServerError,
            format!("PostgreSQL: {}", fields.trim()),
        )
    }

    /// One raw protocol frame: the message types `postgres-protocol`
    /// does not know (CopyBothResponse) are read here.
    fn recv_raw(&mut self) -> Result<(u8, Bytes), Problem> {
        loop {
            if let Some(f) = self.recv_raw_within(None)? {
                return Ok(f);
            }
        }
    }

    /// A frame, or `None` when `limit` passed without one.
    fn recv_raw_within(
        &mut self,
        limit: Option<std::time::Duration>,
    ) -> Result<Option<(u8, Bytes)>, Problem> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf)? {
                return Ok(Some(frame));
            }
            if !self.fill_within(1 << 20, limit)? {
                return Ok(None);
            }
        }
    }

    /// The next message of a replication stream.
    /// The next message, waiting at most `limit` (`Idle` after that).
    pub fn recv_replication(&mut self, limit: std::time::Duration) -> Result<ReplMsg, Problem> {
        loop {
            let Some((tag, body)) = self.recv_raw_within(Some(limit))? else {
                return Ok(ReplMsg::Idle);
            };
            match tag {
                b'd' => return parse_replication_copy(body),
                b'c' => return Ok(ReplMsg::End),
                b'E' => return Err(self.raw_error(body)),
                _ => {}
            }
        }
    }

    /// Standby status update: what is written, what is durable (flush), applied.
    pub fn send_status(&mut self, write: u64, flush: u64, apply: u64) -> Result<(), Problem> {
        let mut payload = Vec::with_capacity(34);
        payload.push(b'r');
        payload.extend_from_slice(&write.to_be_bytes());
        payload.extend_from_slice(&flush.to_be_bytes());
        payload.extend_from_slice(&apply.to_be_bytes());
        payload.extend_from_slice(&pg_now().to_be_bytes());
        payload.push(0);
        let mut frame = vec![b'd'];
        frame.extend_from_slice(&((payload.len() + 4) as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        self.send(&frame)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut b = BytesMut::new();
        frontend::terminate(&mut b);
        let _ = self.send(&b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// A one-connection server on 127.0.0.1 that runs `script`.
    fn fake_server(script: impl FnOnce(std::net::TcpStream) + Send + 'static) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                script(s);
            }
        });
        port
    }

    fn backend(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// Reads one frontend message: the untagged startup one, or a tagged one.
    fn read_message(s: &mut std::net::TcpStream, tagged: bool) {
        let mut head = vec![0u8; if tagged { 5 } else { 4 }];
        s.read_exact(&mut head).expect("head");
        let len = u32::from_be_bytes(head[head.len() - 4..].try_into().expect("4")) as usize;
        let mut body = vec![0u8; len - 4];
        s.read_exact(&mut body).expect("body");
    }

    fn connect_to(port: u16, extra: &str) -> Result<Conn, Problem> {
        let s = format!("host=127.0.0.1 port={port} password=x {extra}");
        Conn::connect(&ConnInfo::parse_with(&s, &|_| None)?, false)
    }

    #[test]
    fn a_server_that_skips_the_scram_proof_is_refused() {
        let port = fake_server(|mut s| {
            read_message(&mut s, false);
            let _ = s.write_all(&backend(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0"));
            read_message(&mut s, true);
            let _ = s.write_all(&backend(b'R', &[0; 4]));
            let _ = s.write_all(&backend(b'Z', b"I"));
        });
        let e = connect_to(port, "sslmode=disable").err().expect("refused");
        assert_eq!(e.code, "pg.auth_method_refused", "{e}");
    }

    #[test]
    fn clear_bytes_after_the_ssl_answer_never_join_the_session() {
        let port = fake_server(|mut s| {
            let mut req = [0u8; 8];
            s.read_exact(&mut req).expect("SSLRequest");
            assert_eq!(req, SSL_REQUEST);
            let mut w = b"S".to_vec();
            w.extend(backend(b'E', b"SFATAL\0C28000\0Minjected\0\0"));
            let _ = s.write_all(&w);
            let _ = s.read(&mut [0u8; 512]);
        });
        let e = connect_to(port, "sslmode=require").err().expect("refused");
        assert_eq!(e.code, "pg.tls_failed", "{e}");
        assert!(!e.message.contains("injected"), "{e}");
    }

    #[test]
    fn a_frame_longer_than_the_bound_is_refused_before_it_is_buffered() {
        let mut buf = BytesMut::from(&b"d\x7f\xff\xff\xffxx"[..]);
        let e = take_frame(&mut buf).expect_err("2 GiB claimed");
        assert_eq!(e.code, "pg.protocol", "{e}");
        let mut buf = BytesMut::from(&b"d\x00\x00\x00\x02"[..]);
        assert!(take_frame(&mut buf).is_err(), "under 4");
        let mut buf = BytesMut::from(&b"d\x00\x00\x00\x06ab"[..]);
        let (tag, body) = take_frame(&mut buf).expect("ok").expect("whole");
        assert_eq!((tag, &body[..]), (b'd', &b"ab"[..]));
        let mut part = BytesMut::from(&b"d\x00\x00\x00\x06a"[..]);
        assert!(
            take_frame(&mut part).expect("ok").is_none(),
            "not all there yet"
        );
    }

    #[test]
    fn replication_copy_data_is_parsed_without_trusting_its_length() {
        for bad in [&b""[..], b"w", b"w1234567", b"k", b"x"] {
            assert!(
                parse_replication_copy(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        let mut w = vec![b'w'];
        w.extend_from_slice(&7u64.to_be_bytes());
        w.extend_from_slice(&[0; 16]);
        w.extend_from_slice(b"wal");
        match parse_replication_copy(Bytes::from(w)).expect("XLogData") {
            ReplMsg::XLogData { start, data } => assert_eq!((start, &data[..]), (7, &b"wal"[..])),
            other => panic!("{other:?}"),
        }
    }

    /// A pre-15 stream (a tablespace, then the data directory, then the
    /// manifest) comes out in 15's framing, each tar closed by its end
    /// marker.
    #[test]
    fn a_legacy_base_backup_stream_is_translated_into_15s_framing() {
        let row = |c: &[Option<&str>]| c.iter().map(|v| v.map(str::to_string)).collect();
        let before: Vec<Rows> = vec![
            vec![row(&[Some("0/2000028"), Some("1")])],
            vec![
                row(&[Some("16384"), Some("/srv/ts"), None]),
                row(&[None, None, None]),
            ],
        ];
        let mut f = LegacyFraming::default();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut push = |e: CopyEvent| {
            let CopyEvent::Data(b) = e;
            out.push(b.to_vec());
            Ok(())
        };
        for m in [
            LegacyMsg::CopyStart,
            LegacyMsg::Data(Bytes::from_static(b"ts-tar")),
            LegacyMsg::CopyEnd,
            LegacyMsg::CopyStart,
            LegacyMsg::Data(Bytes::from_static(b"base-tar")),
            LegacyMsg::CopyEnd,
            LegacyMsg::CopyStart,
            LegacyMsg::Data(Bytes::from_static(b"{manifest}")),
            LegacyMsg::CopyEnd,
        ] {
            f.translate(m, &before, &mut push).expect("translate");
        }
        let trailer =
            |v: &Vec<u8>| v.len() == 1025 && v[0] == b'd' && v[1..].iter().all(|b| *b == 0);
        assert_eq!(out[0], b"n16384.tar\0/srv/ts\0");
        assert_eq!(out[1], b"dts-tar");
        assert!(trailer(&out[2]));
        assert_eq!(out[3], b"nbase.tar\0\0");
        assert_eq!(out[4], b"dbase-tar");
        assert!(trailer(&out[5]));
        assert_eq!(out[6], b"m");
        assert_eq!(out[7], b"d{manifest}");
        assert_eq!(out.len(), 8, "no end marker after the manifest");
        // Without the tablespace list the stream is refused, not guessed.
        let mut g = LegacyFraming::default();
        let refused = g.translate(LegacyMsg::CopyStart, &before[..1], &mut |_| Ok(()));
        assert!(refused.is_err());
    }
}
