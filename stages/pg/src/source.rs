//! `BASE_BACKUP` as a pipeline source: the server's tar stream becomes one
//! block sequence per member file, and PostgreSQL's own `backup_manifest`
//! becomes one more file. Member headers are shared with the assembly layer,
//! which builds the repository manifest from them.

use crate::conn::{Conn, CopyEvent, Rows};
use crate::incremental::{self, Incremental};
use crate::tar::{Event, Header, Kind, Reader};
use bytes::{Bytes, BytesMut};
use pg_hardstorage_engine::stage::{Block, Source};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;
use std::collections::HashMap;
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
    /// Bytes of the tar stream and manifest the server sent.
    pub bytes_received: u64,
    /// Pages whose checksum the server found wrong (`data_checksums`):
    /// `(path in the data directory, block)`, as its warnings name them (at
    /// most five a file; `checksum_failures` counts them all).
    pub bad_pages: Vec<(String, u32)>,
    pub checksum_failures: u64,
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
    /// `Some(block size)`: an incremental backup (the previous manifest was
    /// uploaded on the connection).
    incremental: Option<u32>,
    /// Each `INCREMENTAL.*` member's header, by file id; the member itself
    /// is renamed to its whole file, at its whole size, and its blocks are
    /// what flows.
    pub increments: Arc<Mutex<HashMap<u64, Incremental>>>,
}

impl BaseBackupSource {
    pub fn new(conn: Conn, label: String) -> Self {
        BaseBackupSource {
            conn: Some(conn),
            label,
            entries: Arc::new(Mutex::new(Vec::new())),
            info: Arc::new(Mutex::new(BaseBackupInfo::default())),
            block: 8 << 20,
            incremental: None,
            increments: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Asks for an incremental backup of pages of `block_size` bytes.
    pub fn incremental(mut self, block_size: u32) -> Self {
        self.incremental = Some(block_size);
        self
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
    /// Held back until the member ends or its header is read.
    held: Held,
}

enum Held {
    Nothing,
    /// An `INCREMENTAL.*` member's bytes until its header is whole.
    Header(BytesMut),
    /// After the header: the block bytes still to come.
    Blocks(u64),
    /// `backup_label` of an incremental backup, rewritten at its end.
    Label,
}

struct Emitter<'a> {
    emit: &'a mut dyn FnMut(Block) -> Result<(), Problem>,
    entries: &'a Mutex<Vec<TarEntry>>,
    current: Option<Current>,
    block: usize,
    /// Prepended to member paths (`pg_tblspc/<oid>/` in a tablespace archive).
    prefix: String,
    /// An incremental backup's block size.
    incremental: Option<u32>,
    increments: &'a Mutex<HashMap<u64, Incremental>>,
    /// For the manifest: each rewritten member's path → (new path, size).
    changes: HashMap<String, (String, u64)>,
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
        let held = match self.incremental {
            Some(_) if h.kind == Kind::File && incremental::bare_path(&h.path).is_some() => {
                Held::Header(BytesMut::new())
            }
            Some(_) if h.kind == Kind::File && h.path == "backup_label" => Held::Label,
            _ => Held::Nothing,
        };
        let mut entries = lock(self.entries);
        let file = entries.len() as u64;
        let is_file = h.kind == Kind::File && h.size > 0;
        entries.push(h);
        drop(entries);
        self.current = is_file.then(|| Current {
            file,
            offset: 0,
            pending: BytesMut::new(),
            held,
        });
        Ok(())
    }

    /// Reads an incremental member's header from the bytes held so far;
    /// once whole, renames the member to its whole file and lets the
    /// blocks after it through.
    fn header(&mut self) -> Result<(), Problem> {
        let (Some(c), Some(bs)) = (self.current.as_mut(), self.incremental) else {
            return Ok(());
        };
        let Held::Header(buf) = &mut c.held else {
            return Ok(());
        };
        let Some((inc, len)) = incremental::parse_header(buf, bs)? else {
            return Ok(());
        };
        let rest = buf.split_off(len);
        let blocks = inc.blocks.len() as u64 * bs as u64;
        let left = blocks.checked_sub(rest.len() as u64).ok_or_else(|| {
            Problem::new(
                Code::PgProtocol,
                "an incremental file holds more than its blocks",
            )
        })?;
        c.pending.extend_from_slice(&rest);
        c.held = Held::Blocks(left);
        let size = inc.length_blocks() as u64 * bs as u64;
        let mut entries = lock(self.entries);
        let e = entries
            .get_mut(c.file as usize)
            .ok_or_else(|| Problem::internal("member vanished"))?;
        let bare = incremental::bare_path(&e.path).unwrap_or_default();
        self.changes
            .insert(std::mem::replace(&mut e.path, bare.clone()), (bare, size));
        e.size = size;
        lock(self.increments).insert(c.file, inc);
        Ok(())
    }

    fn data(&mut self, d: Bytes) -> Result<(), Problem> {
        let Some(c) = self.current.as_mut() else {
            return Err(Problem::new(
                Code::PgProtocol,
                "file data outside a file member",
            ));
        };
        if let Held::Header(buf) = &mut c.held {
            buf.extend_from_slice(&d);
            return self.header();
        }
        if let Held::Blocks(left) = &mut c.held {
            *left = left.checked_sub(d.len() as u64).ok_or_else(|| {
                Problem::new(
                    Code::PgProtocol,
                    "an incremental file holds more than its blocks",
                )
            })?;
        }
        c.pending.extend_from_slice(&d);
        if c.pending.len() >= self.block && !matches!(c.held, Held::Label) {
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
            match c.held {
                Held::Header(_) | Held::Blocks(1..) => {
                    return Err(Problem::new(
                        Code::PgProtocol,
                        "an incremental file ended before its blocks",
                    ))
                }
                Held::Label => {
                    let text = incremental::rewrite_label(&c.pending);
                    let size = text.len() as u64;
                    if let Some(e) = lock(self.entries).get_mut(c.file as usize) {
                        e.size = size;
                    }
                    self.changes
                        .insert("backup_label".into(), ("backup_label".into(), size));
                    c.pending = BytesMut::from(&text[..]);
                }
                _ => {}
            }
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

/// The damaged pages the server's warnings name, and how many failures
/// it counted (its per-file totals, else the pages named).
pub fn checksum_failures(notices: &[String]) -> (Vec<(String, u32)>, u64) {
    let mut pages = Vec::new();
    // Per file: pages named, and the total the server gave (from two).
    let mut counts: HashMap<String, (u64, u64)> = HashMap::new();
    for n in notices {
        if let Some(rest) = n.strip_prefix("checksum verification failed in file \"") {
            let Some((file, tail)) = rest.split_once("\", block ") else {
                continue;
            };
            let block = tail
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap_or("");
            if let Ok(b) = block.parse() {
                let file = file.trim_start_matches("./").to_string();
                counts.entry(file.clone()).or_default().0 += 1;
                pages.push((file, b));
            }
        } else if let Some(rest) = n.strip_prefix("file \"") {
            let Some((file, tail)) = rest.split_once("\" has a total of ") else {
                continue;
            };
            let total = tail.split(' ').next().unwrap_or("").parse().unwrap_or(0);
            counts
                .entry(file.trim_start_matches("./").into())
                .or_default()
                .1 = total;
        }
    }
    let total = counts.values().map(|(named, all)| (*named).max(*all)).sum();
    (pages, total)
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
            incremental: self.incremental,
            increments: &self.increments,
            changes: HashMap::new(),
        };
        // An incremental backup's manifest is rewritten whole at its end.
        let mut manifest: Option<Vec<u8>> = self.incremental.map(|_| Vec::new());
        let mut tablespaces = Vec::new();
        let mut reader = Reader::new();
        let mut archives = 0;
        let mut in_manifest = false;
        let mut received = 0u64;
        let (before, after) = {
            let mut on_copy = |ev: CopyEvent| -> Result<(), Problem> {
                let CopyEvent::Data(bytes) = ev;
                let Some(&kind) = bytes.first() else {
                    return Ok(());
                };
                let payload = bytes.slice(1..);
                received += payload.len() as u64;
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
                    b'd' if in_manifest => match manifest.as_mut() {
                        Some(m) => {
                            m.extend_from_slice(&payload);
                            Ok(())
                        }
                        None => out.data(payload),
                    },
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
            conn.base_backup(&self.label, self.incremental.is_some(), &mut on_copy)?
        };
        if let (Some(m), true) = (manifest.take(), in_manifest) {
            let whole = incremental::rewrite_manifest(&m, &out.changes)?;
            out.data(Bytes::from(whole))?;
        }
        out.end()?;
        if !reader.is_done() {
            return Err(Problem::new(
                Code::PgProtocol,
                "the base backup tar stream ended early",
            ));
        }
        let (bad_pages, checksum_failures) = checksum_failures(&conn.take_notices());
        let (start_lsn, start_timeline) = lsn_row(&before, 0);
        let (end_lsn, end_timeline) = lsn_row(&after, 0);
        *lock(&self.info) = BaseBackupInfo {
            start_lsn,
            start_timeline,
            end_lsn,
            end_timeline,
            has_manifest: in_manifest,
            bytes_received: received,
            bad_pages,
            checksum_failures,
            tablespaces,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn damaged_pages_are_read_from_the_servers_warnings() {
        let n = |s: &str| s.to_string();
        let mut notices = vec![n("checksum verification failed in file \"./base/5/16384\", block 3: calculated 1A2B but expected 3C4D")];
        for b in 0..5 {
            notices.push(format!("checksum verification failed in file \"./base/5/99\", block {b}: calculated 1 but expected 2"));
        }
        notices.push(n(
            "further checksum verification failures in file \"./base/5/99\" will not be reported",
        ));
        notices.push(n(
            "file \"./base/5/99\" has a total of 9 checksum verification failures",
        ));
        notices.push(n("10 total checksum verification failures"));
        notices.push(n("checksum verification failure during base backup"));
        let (pages, total) = checksum_failures(&notices);
        assert_eq!(pages[0], ("base/5/16384".to_string(), 3));
        assert_eq!(pages.len(), 6);
        assert_eq!(total, 10, "1 in one file, 9 in the other");
        assert_eq!(checksum_failures(&[]), (Vec::new(), 0));
    }
}
