//! zstd compression. A chunk that does not shrink is stored raw.
#![deny(clippy::unwrap_used)]

use pg_hardstorage_engine::stage::{flags, Chunk, ChunkStage, StageFactory};
use pg_hardstorage_engine::Code;
use pg_hardstorage_engine::Problem;

pub struct Zstd {
    level: i32,
    cx: zstd::bulk::Compressor<'static>,
    buf: Vec<u8>,
}

impl Zstd {
    pub fn new(level: i32) -> Result<Self, Problem> {
        let cx = zstd::bulk::Compressor::new(level)
            .map_err(|e| Problem::internal(format!("zstd level {level}: {e}")))?;
        Ok(Zstd {
            level,
            cx,
            buf: Vec::new(),
        })
    }
}

impl ChunkStage for Zstd {
    fn name(&self) -> &'static str {
        "compress"
    }
    fn process(&mut self, chunk: &mut Chunk) -> Result<(), Problem> {
        let src = &chunk.data;
        self.buf.clear();
        self.buf.reserve(zstd::zstd_safe::compress_bound(src.len()));
        self.cx
            .compress_to_buffer(src, &mut self.buf)
            .map_err(|e| Problem::internal(format!("zstd level {}: {e}", self.level)))?;
        if self.buf.len() < src.len() {
            chunk.payload = Some(std::mem::take(&mut self.buf));
            chunk.flags |= flags::COMPRESSED_ZSTD;
        }
        Ok(())
    }
}

/// Decompresses a chunk body that must expand to exactly `raw_len` bytes.
pub fn decompress(body: &[u8], raw_len: usize) -> Result<Vec<u8>, Problem> {
    thread_local! {
        // One context per thread: creating one per chunk cost ~3% of a restore.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let zerr = |e: std::io::Error| Problem::new(Code::VerifyMalformed, format!("zstd: {e}"));
    let out = DCTX.with(|cell| -> Result<Vec<u8>, Problem> {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().map_err(zerr)?);
        }
        match slot.as_mut() {
            Some(d) => d.decompress(body, raw_len).map_err(zerr),
            None => Err(Problem::internal("zstd context missing")),
        }
    })?;
    if out.len() != raw_len {
        return Err(Problem::new(
            Code::VerifyChecksumMismatch,
            format!("decompressed {} bytes, expected {raw_len}", out.len()),
        ));
    }
    Ok(out)
}

/// Compresses a metadata body (manifests, indexes) at `level`.
pub fn compress(data: &[u8], level: i32) -> Result<Vec<u8>, Problem> {
    zstd::bulk::compress(data, level).map_err(|e| Problem::internal(format!("zstd: {e}")))
}

pub struct ZstdFactory {
    pub level: i32,
}

impl StageFactory for ZstdFactory {
    fn name(&self) -> &'static str {
        "compress"
    }
    fn build(&self, _worker: usize) -> Result<Box<dyn ChunkStage>, Problem> {
        Ok(Box::new(Zstd::new(self.level)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn compressible_shrinks_and_random_stays_raw() {
        let mut z = Zstd::new(1).expect("zstd");
        let mut text = Chunk::new(0, 0, Bytes::from(vec![b'a'; 10_000]));
        z.process(&mut text).expect("ok");
        assert_eq!(text.flags, flags::COMPRESSED_ZSTD);
        let back = decompress(text.payload.as_deref().expect("payload"), 10_000).expect("ok");
        assert_eq!(back, vec![b'a'; 10_000]);

        let noise: Vec<u8> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut r = Chunk::new(0, 0, Bytes::from(noise));
        z.process(&mut r).expect("ok");
        if r.payload.is_none() {
            assert_eq!(r.flags, 0);
        }
    }

    #[test]
    fn decompress_rejects_wrong_length() {
        let c = compress(b"hello hello hello", 1).expect("ok");
        assert!(decompress(&c, 5).is_err());
    }
}
