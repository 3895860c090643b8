//! A streaming ustar reader for the archives `BASE_BACKUP` sends: fed
//! arbitrary pieces of the stream, it reports each member's header and its
//! bytes (zero-copy slices of what it was fed).

use bytes::Bytes;
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Relative path, without a trailing `/`.
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub link: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Member(Header),
    Data(Bytes),
    /// The current member's bytes are complete.
    MemberEnd,
    /// The end-of-archive blocks were read.
    End,
}

enum State {
    Header,
    Data { left: u64, pad: usize },
    Pad(usize),
    Done,
}

pub struct Reader {
    state: State,
    header: Vec<u8>,
    zero_blocks: u8,
}

impl Default for Reader {
    fn default() -> Self {
        Self::new()
    }
}

fn bad(m: impl Into<String>) -> Problem {
    Problem::new(
        Code::PgProtocol,
        format!("base backup tar stream: {}", m.into()),
    )
}

/// Octal ASCII, or GNU base-256 when the high bit of the first byte is set.
fn number(field: &[u8]) -> Result<u64, Problem> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for b in &field[1..] {
            v = v.checked_mul(256).ok_or_else(|| bad("number overflow"))? | *b as u64;
        }
        return Ok(v);
    }
    let s: String = field
        .iter()
        .take_while(|b| **b != 0)
        .map(|b| *b as char)
        .collect();
    let s = s.trim();
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| bad(format!("bad octal number {s:?}")))
}

fn text(field: &[u8]) -> Result<String, Problem> {
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    String::from_utf8(field[..end].to_vec()).map_err(|_| bad("non-UTF-8 name"))
}

fn parse_header(h: &[u8]) -> Result<Header, Problem> {
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, b)| {
            if (148..156).contains(&i) {
                b' ' as u64
            } else {
                *b as u64
            }
        })
        .sum();
    if number(&h[148..156])? != sum {
        return Err(bad("header checksum mismatch"));
    }
    let name = text(&h[0..100])?;
    let prefix = if &h[257..262] == b"ustar" {
        text(&h[345..500])?
    } else {
        String::new()
    };
    let full = if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    };
    let path = full
        .trim_end_matches('/')
        .trim_start_matches("./")
        .to_string();
    let kind = match h[156] {
        b'0' | 0 => Kind::File,
        b'5' => Kind::Dir,
        b'2' => Kind::Symlink,
        t => {
            return Err(bad(format!(
                "unsupported member type {:?} for {path:?}",
                t as char
            )))
        }
    };
    Ok(Header {
        kind,
        mode: (number(&h[100..108])? & 0o7777) as u32,
        uid: number(&h[108..116])? as u32,
        gid: number(&h[116..124])? as u32,
        size: number(&h[124..136])?,
        mtime: number(&h[136..148])? as i64,
        link: text(&h[157..257])?,
        path,
    })
}

impl Reader {
    pub fn new() -> Self {
        Reader {
            state: State::Header,
            header: Vec::with_capacity(512),
            zero_blocks: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Feeds the next piece of the stream.
    pub fn feed(
        &mut self,
        mut data: Bytes,
        out: &mut dyn FnMut(Event) -> Result<(), Problem>,
    ) -> Result<(), Problem> {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return Err(bad("data after the end of the archive")),
                State::Header => {
                    let take = (512 - self.header.len()).min(data.len());
                    self.header.extend_from_slice(&data.split_to(take));
                    if self.header.len() < 512 {
                        continue;
                    }
                    let h = std::mem::take(&mut self.header);
                    if h.iter().all(|b| *b == 0) {
                        self.zero_blocks += 1;
                        if self.zero_blocks == 2 {
                            self.state = State::Done;
                            out(Event::End)?;
                        }
                        continue;
                    }
                    self.zero_blocks = 0;
                    let header = parse_header(&h)?;
                    let size = if header.kind == Kind::File {
                        header.size
                    } else {
                        0
                    };
                    out(Event::Member(header))?;
                    let pad = ((512 - size % 512) % 512) as usize;
                    self.state = if size == 0 {
                        out(Event::MemberEnd)?;
                        State::Header
                    } else {
                        State::Data { left: size, pad }
                    };
                }
                State::Data { left, pad } => {
                    let take = (*left).min(data.len() as u64) as usize;
                    let piece = data.split_to(take);
                    *left -= take as u64;
                    let (done, pad) = (*left == 0, *pad);
                    out(Event::Data(piece))?;
                    if done {
                        out(Event::MemberEnd)?;
                        self.state = if pad > 0 {
                            State::Pad(pad)
                        } else {
                            State::Header
                        };
                    }
                }
                State::Pad(left) => {
                    let take = (*left).min(data.len());
                    let _ = data.split_to(take);
                    *left -= take;
                    if *left == 0 {
                        self.state = State::Header;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(name: &str, kind: u8, size: u64, mode: u32) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let put = |h: &mut Vec<u8>, at: usize, len: usize, v: u64| {
            let s = format!("{:0width$o}\0", v, width = len - 1);
            h[at..at + len].copy_from_slice(s.as_bytes());
        };
        put(&mut h, 100, 8, mode as u64);
        put(&mut h, 108, 8, 26);
        put(&mut h, 116, 8, 26);
        put(&mut h, 124, 12, size);
        put(&mut h, 136, 12, 1_700_000_000);
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|b| *b as u64).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        h
    }

    fn archive(files: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut a = header("base/", b'5', 0, 0o700);
        for (name, data) in files {
            a.extend(header(name, b'0', data.len() as u64, 0o600));
            a.extend_from_slice(data);
            a.extend(std::iter::repeat_n(0u8, (512 - data.len() % 512) % 512));
        }
        a.extend(vec![0u8; 1024]);
        a
    }

    proptest! {
        #[test]
        fn any_split_gives_the_same_members(sizes in prop::collection::vec(0usize..3000, 0..6), cut in 1usize..700) {
            let files: Vec<(String, Vec<u8>)> = sizes.iter().enumerate()
                .map(|(i, n)| (format!("base/f{i}"), (0..*n).map(|j| (j * 7 + i) as u8).collect()))
                .collect();
            let a = archive(&files);
            let mut r = Reader::new();
            let mut got: Vec<(String, Vec<u8>)> = Vec::new();
            let mut ended = false;
            for piece in a.chunks(cut) {
                r.feed(Bytes::copy_from_slice(piece), &mut |e| {
                    match e {
                        Event::Member(h) if h.kind == Kind::File => got.push((h.path, Vec::new())),
                        Event::Data(d) => got.last_mut().expect("member").1.extend_from_slice(&d),
                        Event::End => ended = true,
                        _ => {}
                    }
                    Ok(())
                }).expect("feed");
            }
            prop_assert!(ended);
            prop_assert_eq!(got, files);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(data in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Reader::new().feed(Bytes::from(data), &mut |_| Ok(()));
        }
    }
}
