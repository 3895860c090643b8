//! `BASE_BACKUP` as a pipeline source: the server's tar stream becomes one
//! block sequence per member file, and PostgreSQL's own `backup_manifest`
//! becomes one more file. Member headers are shared with the assembly layer,
//! which builds the repository manifest from them.

use crate::conn::{Conn, CopyEvent, Rows};
use crate::tar::{Event, Header, Kind, Reader};
use bytes::{Bytes, BytesMut};
use pg_hardstorage_engine::stage::{Block, Source};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::sync::{Arc, Mutex};

/// One member of the backup, in stream order; its index is its file id.
pub type TarEntry = Header;

/// What the server said about the backup around the copy stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BaseBackupInfo {
    pub start_lsn: String,
    pub start_timeline: u32,
    pub end_lsn: String,
    pub end_timeline: u32,
    pub has_manifest: bool,
    /// `(oid, location)` of each tablespace; their members are stored under
    /// `pg_tblspc/<oid>/`, where PostgreSQL's backup_manifest lists them.
    pub tablespaces: Vec<(String, String)>,
}

pub struct BaseBackupSource {
    conn: Option<Conn>,
    /// The backup's label (`BASE_BACKUP LABEL`).
    label: String,
    pub entries: Arc<Mutex<Vec<TarEntry>>>,
    pub info: Arc<Mutex<BaseBackupInfo>>,
    block: usize,
}

impl BaseBackupSource {
    pub fn new(conn: Conn, label: String) -> Self {
        BaseBackupSource {
            conn: Some(conn),
            label,
            entries: Arc::new(Mutex::new(Vec::new())),
            info: Arc::new(Mutex::new(BaseBackupInfo::default())),
            block: 8 << 20,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accumulates a member's bytes into blocks of `block` bytes.
struct Current {
    file: u64,
    offset: u64,
    pending: BytesMut,
}

struct Emitter<'a> {
    emit: &'a mut dyn FnMut(Block) -> Result<(), Problem>,
    entries: &'a Mutex<Vec<TarEntry>>,
    current: Option<Current>,
    block: usize,
    /// Prepended to member paths (`pg_tblspc/<oid>/` in a tablespace archive).
    prefix: String,
}

impl Emitter<'_> {
    fn member(&mut self, mut h: Header) -> Result<(), Problem> {
        if !self.prefix.is_empty() {
            h.path = if h.path.is_empty() || h.path == "." {
                self.prefix.trim_end_matches('/').to_string()
            } else {
                format!("{}{}", self.prefix, h.path)
            };
        }
        let mut entries = lock(self.entries);
        let file = entries.len() as u64;
        let is_file = h.kind == Kind::File && h.size > 0;
        entries.push(h);
        drop(entries);
        self.current = is_file.then(|| Current {
            file,
            offset: 0,
            pending: BytesMut::new(),
        });
        Ok(())
    }

    fn data(&mut self, d: Bytes) -> Result<(), Problem> {
        let Some(c) = self.current.as_mut() else {
            return Err(Problem::new(
                Code::PgProtocol,
                "file data outside a file member",
            ));
        };
        c.pending.extend_from_slice(&d);
        if c.pending.len() >= self.block {
            let data = c.pending.split().freeze();
            let block = Block {
                file: c.file,
                offset: c.offset,
                data,
                eof: false,
            };
            c.offset += block.data.len() as u64;
            (self.emit)(block)?;
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), Problem> {
        if let Some(mut c) = self.current.take() {
            (self.emit)(Block {
                file: c.file,
                offset: c.offset,
                data: c.pending.split().freeze(),
                eof: true,
            })?;
        }
        Ok(())
    }
}

fn cstrings(b: &[u8]) -> Vec<String> {
    b.split(|c| *c == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn lsn_row(sets: &[Rows], which: usize) -> (String, u32) {
    let row = sets.get(which).and_then(|s| s.first());
    let get = |i: usize| {
        row.and_then(|r| r.get(i).cloned().flatten())
            .unwrap_or_default()
    };
    (get(0), get(1).parse().unwrap_or(0))
}

impl Source for BaseBackupSource {
    fn name(&self) -> &'static str {
        "read"
    }

    fn run(&mut self, emit: &mut dyn FnMut(Block) -> Result<(), Problem>) -> Result<(), Problem> {
        let mut conn = self
            .conn
            .take()
            .ok_or_else(|| Problem::internal("base backup source run twice"))?;
        let entries = self.entries.clone();
        let mut out = Emitter {
            emit,
            entries: &entries,
            current: None,
            block: self.block,
            prefix: String::new(),
        };
        let mut tablespaces = Vec::new();
        let mut reader = Reader::new();
        let mut archives = 0;
        let mut in_manifest = false;
        let (before, after) = {
            let mut on_copy = |ev: CopyEvent| -> Result<(), Problem> {
                let CopyEvent::Data(bytes) = ev;
                let Some(&kind) = bytes.first() else {
                    return Ok(());
                };
                let payload = bytes.slice(1..);
                match kind {
                    b'n' => {
                        if archives > 0 && !reader.is_done() {
                            return Err(Problem::new(
                                Code::PgProtocol,
                                "a tar archive of the base backup ended early",
                            ));
                        }
                        archives += 1;
                        let names = cstrings(&payload);
                        let name = names.first().cloned().unwrap_or_default();
                        let location = names.get(1).cloned().unwrap_or_default();
                        out.prefix = if location.is_empty() {
                            String::new()
                        } else {
                            let oid = name.trim_end_matches(".tar");
                            if oid.is_empty() || !oid.chars().all(|c| c.is_ascii_digit()) {
                                return Err(Problem::new(
                                    Code::PgProtocol,
                                    format!("tablespace archive named {name:?}"),
                                ));
                            }
                            tablespaces.push((oid.to_string(), location.clone()));
                            format!("pg_tblspc/{oid}/")
                        };
                        reader = Reader::new();
                        Ok(())
                    }
                    b'd' if in_manifest => out.data(payload),
                    b'd' => reader.feed(payload, &mut |e| match e {
                        Event::Member(h) => out.member(h),
                        Event::Data(d) => out.data(d),
                        Event::MemberEnd => out.end(),
                        Event::End => Ok(()),
                    }),
                    b'p' => Ok(()),
                    b'm' => {
                        in_manifest = true;
                        let first = lock(&entries).first().cloned();
                        out.member(Header {
                            path: "backup_manifest".into(),
                            kind: Kind::File,
                            mode: 0o600,
                            uid: first.as_ref().map_or(0, |h| h.uid),
                            gid: first.as_ref().map_or(0, |h| h.gid),
                            mtime: std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs() as i64),
                            size: 1,
                            link: String::new(),
                        })
                    }
                    other => Err(Problem::new(
                        Code::PgProtocol,
                        format!("unknown BASE_BACKUP copy message {:?}", other as char),
                    )),
                }
            };
            conn.base_backup(&self.label, &mut on_copy)?
        };
        out.end()?;
        if !reader.is_done() {
            return Err(Problem::new(
                Code::PgProtocol,
                "the base backup tar stream ended early",
            ));
        }
        let (start_lsn, start_timeline) = lsn_row(&before, 0);
        let (end_lsn, end_timeline) = lsn_row(&after, 0);
        *lock(&self.info) = BaseBackupInfo {
            start_lsn,
            start_timeline,
            end_lsn,
            end_timeline,
            has_manifest: in_manifest,
            tablespaces,
        };
        Ok(())
    }
}
